"""Executor: one process per device; holds the model and keeps it busy.

Images come straight from the preprocess workers to a PULL socket the executor binds; the
front routes it no more than its room (`capacity`: two batches), so a slow device is never
sent more than it can take and a fast one asks for more as it goes. Double-buffered: two
batch slots. The main thread fills a free slot's host buffers (the backend's, pinned on
CUDA) with incoming images until `stages.batcher` says run: at once when the device is
idle (what is queued, at the smallest built batch size that holds it: the model is opened
at each, `backends.ladder`), else when full or `max_wait_ms` after its first image; the
runner wakes it when the device frees, no poll interval. It calls the backend's `upload`
and `launch` (a device with a queue starts the batch right behind the running one), and
tells the front which requests it took: that room is free again. The runner thread
collects slots in order and sends each image's output to a postprocess worker that has
room for it (credits, on a ROUTER the executor binds), then tells the front where each
went. Both notes of a batch ("took", then "handed") leave on the worker's one control
socket, in that order. So the next batch
is assembled, copied and queued while the current one runs. Filler rows of a partial
batch carry an empty box and their outputs are never sent.
"""

from __future__ import annotations

import collections
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zmq

from pspnet.core import wire
from pspnet.core.backend_rules import SCHED
from pspnet.core.config import PipelineConfig
from pspnet.core.exits import EXIT_FAILED
from pspnet.core.pipeline import Stage, first_index
from pspnet.model.manifest import Manifest, pick_batch_size
from pspnet.stages.backends import Backend
from pspnet.stages.backends.ladder import open_ladder
from pspnet.stages.batcher import Batcher
from pspnet.stages.child import POLL_S, BatchNotes, Child, error_result

STAGE = Stage.EXECUTOR
NUM_SLOTS = 2
ROOM_BATCHES = 2                      # images routed here and not yet taken: two batches
KEEP_TIMINGS = 10_000
SWITCH_INTERVAL_S = 0.0005
SLOW_CALL_FACTOR = 4                  # a device call may take this x the slowest batch seen
CREDIT_READS_PER_TURN = 256
# A device error can poison the process for good (a CUDA error leaves the context unusable):
# after this many failed batches in a row the executor exits, and the front restarts it
# with a fresh one (the requests it held are retried once there).
FAILED_IN_A_ROW_BEFORE_RESTART = 3


@dataclass
class Slot:
    """One host batch buffer and the requests whose pixels sit in it."""

    images: np.ndarray        # uint8 B x H x W x 3
    boxes: np.ndarray         # int32 B x 4; zero rows are filler
    members: list[tuple[wire.Request, wire.Placement]]
    size: int = 0             # the built batch size it runs at


def main(child: Child) -> None:
    """Run until stopped."""
    cfg = child.cfg
    place = child.index - first_index(STAGE, cfg)     # its device within its generation
    device = cfg.devices[place] if 0 <= place < len(cfg.devices) else cfg.devices[-1]
    schedule(child, cfg)        # before the backend's threads exist: they inherit it
    try:
        manifest = Manifest.read(cfg.model_dir)
        batch = pick_batch_size(manifest, cfg.batch_size)
        backend = open_ladder(cfg.backend, cfg.model_dir, manifest.batch_sizes, batch,
                              device=device, precision=cfg.precision,
                              options=cfg.executor_options())
    except Exception as exc:  # any start-up failure is "cannot start", not a restart loop
        child.fatal(f"{cfg.backend} backend on {device}: {exc}")
    if cfg.first_batch_check:     # a live reload's model: fail here, the old one serving
        try:
            first_batch(backend)
        except Exception as exc:
            child.fatal(f"{cfg.backend} backend on {device}: the model's first batch "
                        f"failed: {type(exc).__name__}: {exc}")
    # a compile or a cold cache makes this the slowest part of a start; say how slow
    compile_s = backend.compile_seconds
    child.log.info("backend open", backend=cfg.backend, device=device, batch=batch,
                   sizes=backend.sizes,
                   precision=cfg.precision, backend_open_s=round(backend.open_seconds, 2),
                   **({} if compile_s is None else {"compile_s": round(compile_s, 2)}))
    # The runner thread waits for the device with the GIL released (torch and onnxruntime
    # release it in their calls; the acl backend's session runs in a process of its own,
    # because aclruntime's bindings never release it), then must win the GIL back from the
    # assembling thread; at the default 5 ms switch interval that wait showed up as 10-20%
    # of an 80 ms batch (a sleep-as-device experiment on 2 cores). Hand over faster.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    Executor(child, backend).run()


def schedule(child: Child, cfg: PipelineConfig) -> None:
    """The scheduling class the plan (or --backend-option sched=) gives this executor:
    SCHED_BATCH where its threads share the cores with the workers (core.plan). Set on
    this thread before the backend opens, so the runtime's pool threads and the runner
    inherit it; where the system cannot, the executor runs on as it is."""
    sched = cfg.plan.get("executor_sched") or cfg.backend_options.get(SCHED) or ""
    if str(sched).strip().lower() != "batch":
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:       # not Linux, or refused
        child.log.warning("executor not scheduled as batch; running as it is",
                          error=str(exc))


def first_batch(backend: Backend) -> None:
    """One batch of blank images through the backend, its outputs checked for shape and
    finite values: a model that loads but cannot run is refused before it serves."""
    images, boxes = backend.host_buffers(0)
    images[:] = 0
    boxes[:] = (0, 0, images.shape[1], images.shape[2])
    backend.upload(0, images, boxes)
    backend.launch(0)
    out = np.asarray(backend.collect(0))
    if out.shape[0] < len(images):
        raise ValueError(f"{out.shape[0]} outputs for a batch of {len(images)}")
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise ValueError("outputs that are not finite numbers")


def exit_for_restart(child: Child, reason: str) -> None:
    child.log.error("device keeps failing; exiting so that the front restarts this executor",
                    error=reason)
    os._exit(EXIT_FAILED)


def bind(child: Child, sock: zmq.Socket, kind: str, max_frame_bytes: int) -> str:
    """Bind a data socket where the front's addressing says; the endpoint actually bound
    (tcp: the port the system chose), or fatal. A frame over `max_frame_bytes` is refused
    by ZeroMQ before it allocates it, and its sender disconnected."""
    where = child.addrs.data(STAGE, child.index, kind)
    sock.setsockopt(zmq.MAXMSGSIZE, max(max_frame_bytes, wire.MAX_CONTROL_FRAME_BYTES))
    child.serve_keyed(sock)                  # tcp: CurveZMQ, the worker key only
    try:
        sock.bind(where)
    except zmq.ZMQError as exc:
        child.fatal(f"cannot listen at {where}: {zmq.strerror(exc.errno)}")
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class Executor:
    def __init__(self, child: Child, backend: Backend,
                 give_up: Callable[[str], None] | None = None) -> None:
        """`give_up(reason)`: called from the runner thread when the device keeps failing;
        by default the process exits for the front to restart it."""
        self.child, self.cfg = child, child.cfg
        self.give_up = give_up or (lambda reason: exit_for_restart(child, reason))
        self.failed_in_a_row = 0
        self.backend = backend
        self.batch = backend.batch_size
        self.batcher = Batcher(getattr(backend, "sizes", [self.batch]), self.cfg.max_wait_ms)
        self.slots = [Slot(*backend.host_buffers(i), []) for i in range(NUM_SLOTS)]
        self.launch_errors: dict[int, Exception] = {}    # slot -> why upload/launch failed
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(NUM_SLOTS):
            self.free.put(i)
        self.ready: queue.Queue[int] = queue.Queue()
        self.waiting = 0                      # images received, not yet in a running batch
        self.on_device = 0                    # batches queued for or inside execute
        self.slowest_s: float | None = None   # the longest collect so far
        self.lock = threading.Lock()
        self.images = child.ctx.socket(zmq.PULL)     # <- preprocess PUSHes: pixels
        self.images.setsockopt(zmq.LINGER, 0)
        self.outputs = child.ctx.socket(zmq.ROUTER)  # <-> postprocess DEALERs: credits in,
        self.outputs.setsockopt(zmq.LINGER, -1)      # outputs out (the runner thread's)
        self.outputs.setsockopt(zmq.ROUTER_MANDATORY, 1)
        child.inputs = bind(child, self.images, "in", self.slots[0].images[0].nbytes)
        child.outputs = bind(child, self.outputs, "out", 0)     # credits only
        child.capacity, child.batch = ROOM_BATCHES * self.batch, self.batch
        # the runner says when a batch leaves the device, so that a waiting partial batch
        # runs at once (no poll interval); inproc, both ends made here, one per thread
        self.freed = child.ctx.socket(zmq.PAIR)      # <- runner thread: "device freed"
        self.freed.bind(f"inproc://freed-{id(self)}")
        self.tell_freed = child.ctx.socket(zmq.PAIR)  # -> main thread (the runner's)
        self.tell_freed.connect(f"inproc://freed-{id(self)}")
        self.waits = zmq.Poller()
        self.waits.register(self.images, zmq.POLLIN)
        self.waits.register(self.freed, zmq.POLLIN)
        self.runner = child.watch("runner thread")
        self.notes = BatchNotes(child)        # "took" and "handed", in order, per slice
        self.last_sent_to: bytes | None = None  # the postprocess worker sent the last output

    def run(self) -> None:
        thread = threading.Thread(target=self._runner_main, name="runner", daemon=True)
        self.runner.thread = thread
        thread.start()
        self.child.log.info("ready", backend=self.backend.name, batch=self.batch,
                            head=self.backend.head, max_wait_ms=self.cfg.max_wait_ms,
                            images=self.child.inputs, outputs=self.child.outputs)
        while True:
            self.child.tick(queue=self.waiting)
            try:
                slot_index = self.free.get(timeout=POLL_S)
            except queue.Empty:
                continue                      # both slots on the device: keep beating
            slot = self.slots[slot_index]
            self._fill(slot)
            size = slot.size
            try:
                if size == self.batch:
                    self.backend.upload(slot_index, slot.images, slot.boxes)
                else:                         # a smaller built size: a prefix of the rows
                    self.backend.upload(slot_index, slot.images[:size], slot.boxes[:size])
                self.backend.launch(slot_index)
            except Exception as exc:          # the runner answers for the batch
                self.launch_errors[slot_index] = exc
            with self.lock:
                self.on_device += 1
            self.notes.took(tuple(r.id for r, _ in slot.members))
            self.ready.put(slot_index)

    def _fill(self, slot: Slot) -> None:
        """Take images into the slot until the batcher says run (stages.batcher: at once
        on an idle device; while a batch runs, until full or max_wait_ms)."""
        slot.members.clear()
        slot.boxes[:] = 0
        self.batcher.begin()
        while True:
            self.child.tick(queue=self.waiting)
            self._drain(self.freed)
            step = self.batcher.next(len(slot.members), self.images.poll(0) != 0,
                                     not self._device_idle())
            if step.run:
                slot.size = step.size
                return
            timeout = POLL_S if step.wait_s is None else min(POLL_S, step.wait_s)
            ready = dict(self.waits.poll(timeout * 1e3))
            if self.images not in ready:
                continue                      # the device freed, the wait ran out, or a beat
            image = self._receive(slot)
            if image is None:
                continue
            row = len(slot.members)
            slot.images[row] = image.pixels
            slot.boxes[row] = image.placement.box()
            slot.members.append((image.request, image.placement))
            self.batcher.took()
            with self.lock:                   # the runner thread subtracts
                self.waiting += 1

    @staticmethod
    def _drain(sock: zmq.Socket) -> None:
        while sock.poll(0):
            sock.recv(copy=False)

    def _receive(self, slot: Slot) -> wire.Image | None:
        frames = self.images.recv_multipart(copy=False)
        try:
            image = wire.decode_as(frames, wire.Image, self.cfg.max_pixels)
            if image.pixels.shape != slot.images.shape[1:]:
                raise wire.WireError(f"pixels {image.pixels.shape}, model takes "
                                     f"{slot.images.shape[1:]}", image.request.id)
        except wire.WireError as exc:
            self.child.log.warning("malformed message dropped", error=str(exc),
                                   id=exc.request_id)
            self.child.count(errors=1)
            return None
        return image if meant_here(self.child, image) else None

    def _device_idle(self) -> bool:
        with self.lock:
            return self.on_device == 0

    def _allowance_s(self) -> float:
        """How long one device call may take before the heartbeat calls it stuck: the
        first batch may compile or warm caches; later ones, a few times the slowest."""
        if self.slowest_s is None:
            return max(self.cfg.liveness_timeout_s, self.cfg.start_timeout_s)
        return max(self.cfg.liveness_timeout_s, SLOW_CALL_FACTOR * self.slowest_s)

    # ---- the runner thread ---------------------------------------------------------------

    def _runner_main(self) -> None:
        try:
            self._run_batches()
        except BaseException as exc:          # the heartbeat sees the thread gone; say why
            self.runner.error = f"{type(exc).__name__}: {exc}"
            raise

    def _run_batches(self) -> None:
        credits: dict[bytes, int] = {}        # postprocess identity -> outputs it can take
        while True:
            try:                                     # wake for the notes' slice too
                slot_index = self.ready.get(timeout=self.notes.due_in())
            except queue.Empty:
                self.notes.flush_if_due()
                continue
            slot = self.slots[slot_index]
            members = list(slot.members)
            out = self._collect(slot_index, members)
            with self.lock:
                self.on_device -= 1
                self.waiting -= len(members)
            self.free.put(slot_index)                # host slot may be refilled now
            try:                                     # a waiting partial batch may run
                self.tell_freed.send(b"", flags=zmq.NOBLOCK)
            except zmq.Again:                        # wake-ups already queued: enough
                pass
            if out is not None:
                self._send_outputs(members, out, credits)

    def _collect(self, slot_index: int, members: list[tuple[wire.Request, wire.Placement]],
                 ) -> np.ndarray | None:
        """The slot's outputs, or None after answering its images with the error."""
        times = self.backend.execute_times_ms
        timed = len(times)
        started = time.perf_counter()
        self.runner.busy(self._allowance_s())
        try:
            failed = self.launch_errors.pop(slot_index, None)
            if failed is not None:
                raise failed
            out = self.backend.collect(slot_index)
        except Exception as exc:
            self.runner.idle()
            self.child.log.exception("batch failed", size=len(members))
            if members:
                self.child.send(wire.Results(tuple(
                    error_result(request, STAGE, f"inference failed: {exc}")
                    for request, _ in members)))
            self.child.count(errors=len(members))
            self.failed_in_a_row += 1
            if self.failed_in_a_row >= FAILED_IN_A_ROW_BEFORE_RESTART:
                time.sleep(0.2)                       # let the error answers leave
                self.give_up(f"{self.failed_in_a_row} batches in a row failed; "
                             f"the last: {exc}")
                self.failed_in_a_row = 0
            return None
        self.runner.idle()
        self.failed_in_a_row = 0
        wall = time.perf_counter() - started
        self.slowest_s = max(self.slowest_s or 0.0, wall)
        # device time where the backend measures it (collect of a queued batch also
        # waits for the one ahead of it), else the wall time of the call
        busy = sum(times[timed:]) / 1e3 if len(times) > timed else wall
        if len(times) > KEEP_TIMINGS:         # a daemon runs for weeks
            del times[:-KEEP_TIMINGS // 2]
        self.child.count(processed=len(members), batches=1, busy_s=busy,
                         filler=self.slots[slot_index].size - len(members))
        self.child.log.debug("batch", size=len(members), ms=round(busy * 1e3, 2))
        return out

    def _send_outputs(self, members: list[tuple[wire.Request, wire.Placement]],
                      out: np.ndarray, credits: dict[bytes, int]) -> None:
        """Each output to a postprocess worker with room, then one note per worker."""
        head = self.backend.head
        sent: dict[bytes, list[str]] = collections.defaultdict(list)
        for row, (request, placement) in enumerate(members):
            frames = wire.encode(wire.Output(request, placement, head, out[row]))
            while True:
                worker = self._take_credit(credits)
                try:
                    self.outputs.send_multipart([worker, *frames], flags=zmq.NOBLOCK,
                                                copy=False)
                except zmq.ZMQError:          # gone (ROUTER_MANDATORY) or not reading
                    credits.pop(worker, None)
                    continue
                sent[worker].append(request.id)
                break
        for worker, ids in sent.items():
            name = self.child.trust.name_of(worker) or "?"   # credits came only from those
            self.notes.handed(tuple(ids), name)

    def _take_credit(self, credits: dict[bytes, int]) -> bytes:
        """The next postprocess worker with room, in turn; waits for one when none has any
        (the device then stops being fed: backpressure, not a fault)."""
        self._read_credits(credits, timeout_ms=0)
        while not any(n > 0 for n in credits.values()):
            self._read_credits(credits, timeout_ms=POLL_S * 1e3)
        worker = next_with_credit(credits, self.last_sent_to)
        credits[worker] -= 1
        self.last_sent_to = worker
        return worker

    def _read_credits(self, credits: dict[bytes, int], timeout_ms: float) -> None:
        for _ in range(CREDIT_READS_PER_TURN):
            if not self.outputs.poll(timeout_ms):
                return
            timeout_ms = 0
            worker, *frames = self.outputs.recv_multipart()
            if not from_postprocess(self.child, worker):    # never sent an output
                continue
            try:
                credit = wire.decode_as(frames, wire.Credit)
            except wire.WireError as exc:
                self.child.log.warning("malformed credit dropped", error=str(exc))
                continue
            credits[worker] = credits.get(worker, 0) + credit.credits


def meant_here(child: Child, image: wire.Image) -> bool:
    """Whether pixels are this executor's to run: sent to this life of it (else they are
    stale: the front has retried them already) with the token the front handed out for
    their request and this executor (else forged: counted, dropped)."""
    if image.to != child.name:
        child.count(stale_dropped=1)
        return False
    if not child.trust.holds(image.request, child.name):
        child.forged("images", "pixels without their request's token", id=image.request.id)
        return False
    return True


def from_postprocess(child: Child, identity: bytes) -> bool:
    """Whether credits come from a postprocess worker the front started (or admitted with
    the worker key): its identity proves it (core.trust); others are counted as forged."""
    name = child.trust.name_of(identity)
    if name is not None and name.startswith("postprocess-"):
        return True
    child.forged(identity.hex()[:32], "credits from a peer the front did not start")
    return False


def next_with_credit(credits: dict[bytes, int], after: bytes | None) -> bytes:
    """The first worker after `after` (in the order they first asked) that has credit.
    In turn, not by most credit: equally fast workers get equal shares whatever each was
    granted (most-credit sent everything to the one granted more while it kept up); a slow
    one, out of credit, is passed over."""
    names = list(credits)
    start = names.index(after) + 1 if after in credits else 0
    for k in range(len(names)):
        name = names[(start + k) % len(names)]
        if credits[name] > 0:
            return name
    raise ValueError("no postprocess worker has credit")
