"""Preprocess worker: image path -> letterboxed uint8 pixels, straight to an executor.

The front hands it at most `PREFETCH` requests at a time (one decoding, one waiting), each
naming the executor whose room the front has set aside for it; the pixels go to that
executor directly, and only a small "handed" note goes back to the front. A bad image is
answered as an error here and goes no further.
"""

from __future__ import annotations

import collections
import time

import cv2
import zmq

from pspnet.core import wire
from pspnet.model.image_io import ImageError, decode_image, letterbox
from pspnet.model.manifest import Manifest
from pspnet.stages.child import POLL_S, Child, error_result

STAGE = "preprocess"
PREFETCH = 2                 # requests a worker holds: one working, one waiting
MAX_EXECUTOR_SOCKETS = 64    # executors (by address) kept connected; least recent closed
IMAGES_HWM = 1024            # images queued for one executor before a send gives up


def main(child: Child) -> None:
    """Run until stopped."""
    cv2.setNumThreads(child.cfg.worker_threads)  # one worker = one core; the pool scales out
    try:
        manifest = Manifest.read(child.cfg.model_dir)
    except (OSError, ValueError) as exc:
        child.fatal(str(exc))
    child.capacity = PREFETCH
    senders = ExecutorSenders(child)
    child.log.info("ready", input_size=manifest.input_size)
    while True:
        child.tick()
        if not child.control.poll(POLL_S * 1e3):
            continue
        frames = child.control.recv_multipart(copy=False)
        try:
            work = wire.decode_as(frames, wire.Dispatch)
        except wire.WireError as exc:
            child.log.warning("malformed message dropped", error=str(exc))
            child.count(errors=1)
            continue
        started = time.perf_counter()
        request = work.request
        try:
            # the size is known only once the header is read: the budget is what
            # --max-pixels allows
            with child.long_step("decode", child.cfg.max_pixels):
                rgb = decode_image(request.path, child.cfg.max_pixels)
                pixels, placement = letterbox(rgb, manifest.input_size)
        except ImageError as exc:
            child.send(error_result(request, STAGE, str(exc),
                                    wire.INCOMPLETE if exc.incomplete else None))
            child.count(errors=1)
        except Exception as exc:  # a decoder bug must not take the worker down
            child.log.exception("unexpected preprocess failure", id=request.id)
            child.send(error_result(request, STAGE,
                                    f"cannot read image: {type(exc).__name__}: {exc}"))
            child.count(errors=1)
        else:
            senders.send(work, wire.Image(request, placement, work.to, pixels))
            child.send(wire.Handed((request.id,), work.to))
            child.count(processed=1)
        child.count(busy_s=time.perf_counter() - started)


class ExecutorSenders:
    """One PUSH socket per executor address, made on first use (a restarted executor on
    ipc binds its predecessor's path, so the socket reconnects by itself)."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.sockets: collections.OrderedDict[str, zmq.Socket] = collections.OrderedDict()

    def send(self, work: wire.Dispatch, image: wire.Image) -> None:
        """Drops the image when the executor's queue is full: the front routes no more than
        an executor's room to it, so it is gone or stuck, and the front retries what it
        held when it declares it dead."""
        sock = self.sockets.get(work.address)
        if sock is None:
            sock = self.child.ctx.socket(zmq.PUSH)   # pixels -> executor's PULL
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, IMAGES_HWM)
            self.child.connect_keyed(sock)           # tcp: CurveZMQ with the worker key
            sock.connect(work.address)
            self.sockets[work.address] = sock
            while len(self.sockets) > MAX_EXECUTOR_SOCKETS:
                self.sockets.popitem(last=False)[1].close(0)
        self.sockets.move_to_end(work.address)
        try:
            sock.send_multipart(wire.encode(image), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.child.log.warning("executor not taking images; dropped (the front retries)",
                                   executor=work.to, id=work.request.id)
            self.child.count(errors=1)
