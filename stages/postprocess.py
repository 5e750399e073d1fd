"""Postprocess worker: one image's logits or labels -> mask PNG and IoU areas.

It asks each executor for work: one DEALER per executor (the front's `Peers` list says
where they listen), and credits on it for as many outputs as it can hold; each output
done returns one credit to the executor it came from, in one `Credit` for all it finished
while more of that executor's outputs were already waiting (a batch arrives together: one
message back per batch, not per image; at most half the grant is held back). So a slow
worker is never sent more than it can take, and the answer (with the areas: intersect,
union, pred, label per class) goes to the front, which sums them, so a crashed worker loses
no metric state. Answers go out together (`Notes`): all it finished while more outputs
were waiting, at most --coalesce-ms after the first (NOTE_SLICES times that while they
stream), and at once when nothing more is waiting.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import zmq

from pspnet.core import wire
from pspnet.core.config import DEFAULT_MAX_PIXELS, output_problem
from pspnet.core.files import name_problem
from pspnet.core.pipeline import Stage
from pspnet.model.labels import (
    GroundTruthError,
    class_pixels,
    counted_labels_from_logits,
    labels_from_labels,
    pixels_and_areas,
    read_ground_truth,
)
from pspnet.model.manifest import Manifest
from pspnet.model.masks import is_storage_error, mask_png, mask_target, png_bytes, store_mask
from pspnet.stages.child import POLL_S, Child, Notes, error_result

STAGE = Stage.POSTPROCESS


def main(child: Child) -> None:
    """Run until stopped."""
    cfg = child.cfg
    torch.set_num_threads(max(1, cfg.worker_threads))
    cv2.setNumThreads(max(1, cfg.worker_threads))  # calcHist: no pool waking beside ort
    try:
        manifest = Manifest.read(cfg.model_dir)
    except (OSError, ValueError) as exc:
        child.fatal(str(exc))
    out_dir = cfg.out_dir if cfg.write_masks else None
    if out_dir is not None:
        problem = output_problem(out_dir, directory=True)
        if problem:                      # every mask would fail; a crash would only restart us
            child.fatal(f"mask directory (--out) {problem}")
    h, w = manifest.input_size
    inboxes = Inboxes(child, max(manifest.num_classes * h * w * 4, wire.MAX_CONTROL_FRAME_BYTES))
    notes = Notes(child)
    child.log.info("ready", masks=str(out_dir) if out_dir else None)
    while True:
        child.tick()
        due_in = notes.due_in()             # answers pending: wake when their slice ends
        ready = inboxes.poll(POLL_S * 1e3 if due_in is None else min(POLL_S, due_in) * 1e3)
        if not ready:
            inboxes.repay_all()             # nothing waiting: no credit held back (a guard)
            notes.flush_if_due()
            continue
        if child.control in ready:
            inboxes.read_peers()            # may close an inbox that was ready
        for sock in ready:                  # one output per executor per turn: fair
            if sock not in inboxes.open:
                continue
            frames = sock.recv_multipart(copy=False)
            started = time.perf_counter()
            try:
                output = wire.decode_as(frames, wire.Output, cfg.max_pixels)
            except wire.WireError as exc:
                child.log.warning("malformed message dropped", error=str(exc),
                                  id=exc.request_id)
                child.count(errors=1)
                sock.send_multipart(wire.encode(wire.Credit(1)))
                continue
            executor = inboxes.executor_of(sock)
            if not child.trust.holds(output.request, executor):   # not handed out for it
                child.forged(executor, "output without its request's token",
                             id=output.request.id)
                sock.send_multipart(wire.encode(wire.Credit(1)))
                continue
            size = min(output.placement.orig_h * output.placement.orig_w, cfg.max_pixels)
            with child.long_step("labels and mask", size):   # resize, PNG: grow with size
                result = finish(output, manifest, out_dir, cfg.max_pixels)
            notes.result(result)
            notes.flush_if_due()            # a quiet worker answers at once
            inboxes.done(sock)              # its credit: now, or with the next ones
            child.count(processed=int(result.status == wire.OK),
                        errors=int(result.status != wire.OK),
                        busy_s=time.perf_counter() - started)
        notes.flush_if_due()


class Inboxes:
    """One DEALER per executor, kept in step with the front's Peers list."""

    def __init__(self, child: Child, max_frame_bytes: int) -> None:
        """`max_frame_bytes`: the largest output an executor may send (logits of the model
        input's size); ZeroMQ refuses a larger frame before allocating it."""
        self.child = child
        self.max_frame_bytes = max_frame_bytes
        self.by_executor: dict[str, zmq.Socket] = {}
        self.connections = 0                    # credits sockets made so far (identities)
        self.owed: dict[zmq.Socket, int] = {}   # outputs done, credit not yet returned
        self.hold = 1                           # at most this many credits held back
        self.poller = zmq.Poller()
        self.poller.register(child.control, zmq.POLLIN)

    @property
    def open(self) -> list[zmq.Socket]:
        return list(self.by_executor.values())

    def executor_of(self, sock: zmq.Socket) -> str:
        return next(name for name, s in self.by_executor.items() if s is sock)

    def poll(self, timeout_ms: float) -> list[zmq.Socket]:
        return [sock for sock, _ in self.poller.poll(timeout_ms)]

    def done(self, sock: zmq.Socket) -> None:
        """One output from `sock` finished: its credit goes back at once when nothing more
        from that executor is waiting (it may be idle for want of room), else with the next
        ones (they came as one batch; the executor still holds the rest of its grant), so
        one `Credit` per batch, not per image. A worker that dies owing credits loses only
        them: its outputs are the front's to retry, and its successor is granted afresh."""
        owed = self.owed.get(sock, 0) + 1
        if owed < self.hold and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.owed[sock] = owed
            return
        self.owed.pop(sock, None)
        sock.send_multipart(wire.encode(wire.Credit(owed)))

    def repay_all(self) -> None:
        """Every credit held back, returned (nothing is waiting any more)."""
        while self.owed:
            sock, owed = self.owed.popitem()
            sock.send_multipart(wire.encode(wire.Credit(owed)))

    def read_peers(self) -> None:
        frames = self.child.control.recv_multipart(copy=False)
        try:
            peers = wire.decode_as(frames, wire.Peers)
        except wire.WireError as exc:
            self.child.log.warning("malformed message dropped", error=str(exc))
            return
        wanted = dict(peers.executors)
        self.hold = max(1, peers.credits // 2)  # the executor keeps at least half its grant
        for name in [n for n in self.by_executor if n not in wanted]:
            sock = self.by_executor.pop(name)
            self.owed.pop(sock, None)
            self.poller.unregister(sock)
            sock.close(0)                       # what it still held is retried by the front
        for name, address in wanted.items():
            if name in self.by_executor:
                continue
            sock = self.child.ctx.socket(zmq.DEALER)  # credits out, outputs in <-> executor
            # an identity the executor can verify (it sends outputs only to the front's),
            # a new one per socket: an executor that went silent and came back may still
            # hold the last socket's connection, and a ROUTER refuses an identity it holds
            # (the new socket's credits would be lost, and the executor wait for ever)
            self.connections += 1
            sock.setsockopt(zmq.IDENTITY, self.child.trust.identity(
                self.child.name, "credits", connection=self.connections))
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
            self.child.connect_keyed(sock)            # tcp: CurveZMQ with the worker key
            try:
                sock.connect(address)
            except zmq.ZMQError as exc:               # (the front checks addresses first)
                sock.close(0)
                self.child.log.warning("cannot connect to the executor; not taking its "
                                       "outputs", executor=name, address=address,
                                       error=str(exc))
                continue
            sock.send_multipart(wire.encode(wire.Credit(peers.credits)))
            self.by_executor[name] = sock
            self.poller.register(sock, zmq.POLLIN)
        self.child.log.info("executors", executors=sorted(wanted))


def finish(output: wire.Output, manifest: Manifest, out_dir: Path | None,
           max_pixels: int = DEFAULT_MAX_PIXELS) -> wire.Result:
    """Labels at the original size, the mask written, the areas counted: one answer. A mask
    that cannot be stored for lack of space or a failing disk is an error the daemon may
    retry later (cause STORAGE)."""
    request = output.request
    try:
        counts = None                       # a large photo's, counted with its labels
        if output.head == "logits":         # (a ground truth counts them with the areas)
            labels, counts = counted_labels_from_logits(
                output.data, output.placement, manifest.input_size, manifest.align_corners,
                count=not request.ann)
        else:
            labels = labels_from_labels(output.data, output.placement)
        mask = png = None
        if out_dir is not None and request.write:
            target, source = mask_target(out_dir, request.path)   # one realpath for both
            if name_problem(target) is not None:   # a link into a folder not named in
                return error_result(                # UTF-8: no answer could carry the mask
                    request, STAGE, f"the image's real path is not UTF-8: {source}; rename "
                    "the folder or file named in another encoding (for Latin-1: convmv -f "
                    "latin1 -t utf8 --notest -r DIR)")   # source: the real path, escaped
            png = png_bytes(labels, manifest.palette, source)
            store_mask(png, target, source)
            mask = str(target)
        payload = returned(labels, request, manifest, png)
        areas = None
        if request.ann:                     # the class counts and the areas in one pass
            truth = read_ground_truth(request.ann, max_pixels, expected=labels.shape)
            counts, areas = pixels_and_areas(labels, truth, manifest.num_classes)
        elif counts is None:
            counts = class_pixels(labels)
        found = found_classes(counts, manifest.class_names)
    except OSError as exc:
        cause = wire.STORAGE if is_storage_error(exc) else None
        return error_result(request, STAGE, str(exc), cause)
    except (GroundTruthError, ValueError) as exc:
        return error_result(request, STAGE, str(exc))
    return wire.Result(id=request.id, attempt=request.attempt, status=wire.OK,
                       path=request.path, mask=mask, stage=STAGE, token=request.token,
                       areas=np.ascontiguousarray(areas, dtype=np.int64)
                       if areas is not None else None,
                       size=(int(labels.shape[0]), int(labels.shape[1])),
                       found=found, payload=payload,
                       returned=request.want if payload is not None else "")


def returned(labels: np.ndarray, request: wire.Request, manifest: Manifest,
             written: bytes | None = None) -> bytes | np.ndarray | None:
    """What the request asked back in its answer: the palette PNG (the same bytes as the
    mask file the daemon writes for it: `written`, when it wrote one), the raw label map,
    or nothing."""
    if request.want == wire.WANT_PNG:
        if written is not None:
            return written
        return mask_png(labels, manifest.palette, source=request.path)
    if request.want == wire.WANT_LABELS:
        return np.ascontiguousarray(labels, dtype=np.uint8)
    return None


def found_classes(counts: np.ndarray, class_names: Sequence[str],
                  ) -> tuple[tuple[int, str, int], ...]:
    """(class id, name, pixels) of every class in the mask (`counts`: its
    `model.labels.class_pixels`), largest first: what the answer says was found. A class
    without a usable name (none, past the model's classes, not printable) is named by its
    number."""
    order = sorted(np.flatnonzero(counts).tolist(), key=lambda k: (-counts[k], k))
    return tuple((k, _class_name(class_names, k), int(counts[k])) for k in order)


def _class_name(class_names: Sequence[str], k: int) -> str:
    name = class_names[k][:wire.MAX_NAME_CHARS] if k < len(class_names) else ""
    return name if name and name.isprintable() else str(k)
