"""Executor: one process per device; holds the model and keeps it busy.

Double-buffered: two batch slots. The main thread fills a free slot's host buffers (the
backend's, pinned on CUDA) with incoming images (up to the static batch size, or fewer
once `max_wait_ms` has passed and the device has nothing else to run), then calls the
backend's `upload` and `launch`: a device with a queue starts the batch right behind the
running one. The runner thread collects slots in order and sends each image's output
downstream. So the next batch is assembled, copied and queued while the current one runs,
and the device never waits for the host to collect, send and relaunch. Filler rows of a
partial batch carry an empty box and their outputs are never sent.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zmq

from stages import wire
from stages.backends import Backend, open_backend
from stages.child import SEND_LINGER_MS, Child, error_result
from stages.config import Addresses, PipelineConfig
from stages.exits import EXIT_FAILED
from stages.manifest import Manifest, pick_batch_size

STAGE = "executor"
NUM_SLOTS = 2
POLL_MS = 200
KEEP_TIMINGS = 10_000
SWITCH_INTERVAL_S = 0.0005
IDLE_CHECK_MS = 1                     # past max_wait, how often to look whether the device is free
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


def main(cfg: PipelineConfig, addrs: Addresses, index: int, supervised: bool = True,
         ) -> None:
    """Run until killed. `supervised`: started by the front, so exit when it is gone."""
    child = Child(STAGE, index, cfg, addrs.results, watch_parent=supervised)
    device = cfg.devices[index] if index < len(cfg.devices) else cfg.devices[-1]
    try:
        manifest = Manifest.read(cfg.model_dir)
        batch = pick_batch_size(manifest, cfg.batch_size)
        options = dict(cfg.backend_options)
        if cfg.executor_threads:
            options.setdefault("threads", str(cfg.executor_threads))
        backend = open_backend(cfg.backend, cfg.model_dir, batch, device=device,
                               precision=cfg.precision, options=options)
    except Exception as exc:  # any start-up failure is "cannot start", not a restart loop
        child.fatal(f"{cfg.backend} backend on {device}: {exc}")
    # a compile or a cold cache makes this the slowest part of a start; say how slow
    compile_s = backend.compile_seconds
    child.log.info("backend open", backend=cfg.backend, device=device, batch=batch,
                   precision=cfg.precision, backend_open_s=round(backend.open_seconds, 2),
                   **({} if compile_s is None else {"compile_s": round(compile_s, 2)}))
    # The runner thread waits on the device with the GIL released, then must win it back
    # from the assembling thread; at the default 5 ms switch interval that wait showed up
    # as 10-20% of an 80 ms batch (a sleep-as-device experiment on 2 cores). Hand over faster.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    Executor(child, cfg, addrs, backend).run()


def exit_for_restart(child: Child, reason: str) -> None:
    child.log.error("device keeps failing; exiting so that the front restarts this executor",
                    error=reason)
    os._exit(EXIT_FAILED)


class Executor:
    def __init__(self, child: Child, cfg: PipelineConfig, addrs: Addresses,
                 backend: Backend, give_up: Callable[[str], None] | None = None) -> None:
        """`give_up(reason)`: called from the runner thread when the device keeps failing;
        by default the process exits for the front to restart it."""
        self.child, self.cfg, self.addrs = child, cfg, addrs
        self.give_up = give_up or (lambda reason: exit_for_restart(child, reason))
        self.failed_in_a_row = 0
        self.backend = backend
        self.batch = backend.batch_size
        self.slots = [Slot(*backend.host_buffers(i), []) for i in range(NUM_SLOTS)]
        self.launch_errors: dict[int, Exception] = {}    # slot -> why upload/launch failed
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(NUM_SLOTS):
            self.free.put(i)
        self.ready: queue.Queue[int | None] = queue.Queue()
        self.waiting = 0                      # images received, not yet in a running batch
        self.on_device = 0                    # batches queued for or inside execute
        self.lock = threading.Lock()
        child.set_gauges(lambda: {"queue": self.waiting})

    def run(self) -> None:
        receiver = self.child.ctx.socket(zmq.PULL)   # images <- preprocess (via front)
        receiver.setsockopt(zmq.LINGER, 0)
        receiver.setsockopt(zmq.RCVHWM, 2 * self.batch)
        receiver.connect(self.addrs.images_out)
        runner = threading.Thread(target=self._run_batches, name="runner", daemon=True)
        runner.start()
        self.child.start_heartbeat()
        self.child.log.info("ready", backend=self.backend.name, batch=self.batch,
                            head=self.backend.head, max_wait_ms=self.cfg.max_wait_ms)
        while runner.is_alive():
            slot_index = self.free.get()
            slot = self.slots[slot_index]
            self._fill(receiver, slot)
            try:
                self.backend.upload(slot_index, slot.images, slot.boxes)
                self.backend.launch(slot_index)
            except Exception as exc:          # the runner answers for the batch
                self.launch_errors[slot_index] = exc
            with self.lock:
                self.on_device += 1
            self.ready.put(slot_index)

    def _fill(self, receiver: zmq.Socket, slot: Slot) -> None:
        """Block for the first image, then take more until the batch is full, or until
        max_wait_ms has passed and the device is idle. While another batch runs, a partial
        batch would only queue behind it and cost as much as a full one: keep filling."""
        slot.members.clear()
        slot.boxes[:] = 0
        deadline = None
        while len(slot.members) < self.batch:
            now = time.monotonic()
            if deadline is None:
                timeout = POLL_MS
            elif now < deadline:
                timeout = (deadline - now) * 1e3
            elif self._device_idle():
                return
            else:
                timeout = IDLE_CHECK_MS
            if not receiver.poll(timeout):
                continue
            frames = receiver.recv_multipart(copy=False)
            try:
                image = wire.decode_as(frames, wire.Image)
                if image.pixels.shape != slot.images.shape[1:]:
                    raise wire.WireError(f"pixels {image.pixels.shape}, model takes "
                                         f"{slot.images.shape[1:]}", image.request.id)
            except wire.WireError as exc:
                self.child.log.warning("malformed message dropped", error=str(exc),
                                       id=exc.request_id)
                self.child.count(errors=1)
                continue
            row = len(slot.members)
            slot.images[row] = image.pixels
            slot.boxes[row] = image.placement.box()
            slot.members.append((image.request, image.placement))
            with self.lock:                   # the runner thread subtracts
                self.waiting += 1
            if deadline is None:
                deadline = time.monotonic() + self.cfg.max_wait_ms / 1e3

    def _device_idle(self) -> bool:
        with self.lock:
            return self.on_device == 0

    def _run_batches(self) -> None:
        sender = self.child.ctx.socket(zmq.PUSH)     # outputs -> postprocess (via front)
        sender.setsockopt(zmq.LINGER, -1)
        sender.connect(self.addrs.outputs_in)
        notes = self.child.ctx.socket(zmq.PUSH)      # progress and errors -> front
        notes.setsockopt(zmq.LINGER, -1)
        notes.connect(self.addrs.results)
        head = self.backend.head
        while True:
            slot_index = self.ready.get()
            slot = self.slots[slot_index]
            members = list(slot.members)
            times = self.backend.execute_times_ms
            timed = len(times)
            started = time.perf_counter()
            try:
                failed = self.launch_errors.pop(slot_index, None)
                if failed is not None:
                    raise failed
                out = self.backend.collect(slot_index)
            except Exception as exc:
                self.child.log.exception("batch failed", size=len(members))
                for request, _ in members:
                    notes.send_multipart(wire.encode(
                        error_result(request, STAGE, f"inference failed: {exc}")))
                self.child.count(errors=len(members))
                self.failed_in_a_row += 1
                if self.failed_in_a_row >= FAILED_IN_A_ROW_BEFORE_RESTART:
                    for sock in (sender, notes):
                        sock.close(linger=SEND_LINGER_MS)   # the error answers reach the front
                    self.give_up(f"{self.failed_in_a_row} batches in a row failed; "
                                 f"the last: {exc}")
                    return
                out = None
            else:
                self.failed_in_a_row = 0
            # device time where the backend measures it (collect of a queued batch also
            # waits for the one ahead of it), else the wall time of the call
            busy = sum(times[timed:]) / 1e3 if len(times) > timed else \
                time.perf_counter() - started
            with self.lock:
                self.on_device -= 1
                self.waiting -= len(members)
            if len(times) > KEEP_TIMINGS:     # a daemon runs for weeks
                del times[:-KEEP_TIMINGS // 2]
            self.free.put(slot_index)                # host slot may be refilled now
            if out is None:
                continue
            for row, (request, placement) in enumerate(members):
                sender.send_multipart(
                    wire.encode(wire.Output(request, placement, head, out[row])), copy=False)
            notes.send_multipart(wire.encode(
                wire.Progress(STAGE, self.child.index, tuple(r.id for r, _ in members))))
            self.child.count(processed=len(members), batches=1, busy_s=busy,
                             filler=self.batch - len(members))
            self.child.log.debug("batch", size=len(members), ms=round(busy * 1e3, 2),
                                 pid=os.getpid())
