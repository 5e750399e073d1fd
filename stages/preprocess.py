"""Preprocess worker: image path (or an upload's bytes) -> letterboxed uint8 pixels,
straight to an executor.

The front hands it groups of requests (one message each), at most `ROOM` requests at a
time, each group naming the executor whose room the front has set aside for it; the pixels
go to that executor directly, one image at a time, and what it handed goes back to the
front in one small "handed" note per group, with the group's error answers. A bad image is
answered as an error here and goes no further. The note frees the worker's room at the
front; the request itself moves on when the executor takes its pixels, so a group's note
adds nothing to a request's latency (and a group of one, on an idle daemon, is one image).
"""

from __future__ import annotations

import collections
import dataclasses
import time

import cv2
import numpy as np
import zmq

from pspnet.core import wire
from pspnet.core.pipeline import Stage
from pspnet.model.image_io import (
    DecodeScratch,
    ImageError,
    decode_bytes,
    decode_image,
    letterbox,
)
from pspnet.model.manifest import Manifest
from pspnet.stages.child import POLL_S, Child, Notes, error_result

STAGE = Stage.PREPROCESS
ROOM = 64                    # requests a worker holds: a group working, the next waiting
                             # (a group of up to 32: one dispatch and one note per 32 images)
MAX_EXECUTOR_SOCKETS = 64    # executors (by address) kept connected; least recent closed
IMAGES_HWM = 1024            # images queued for one executor before a send gives up


def main(child: Child) -> None:
    """Run until stopped."""
    cv2.setNumThreads(child.cfg.worker_threads)  # one worker = one core; the pool scales out
    try:
        manifest = Manifest.read(child.cfg.model_dir)
    except (OSError, ValueError) as exc:
        child.fatal(str(exc))
    child.capacity = ROOM
    senders = ExecutorSenders(child)
    notes = Notes(child)
    scratch = DecodeScratch()                 # JPEGs decode here, photo after photo
    child.log.info("ready", input_size=manifest.input_size)
    while True:
        child.tick()
        if not child.control.poll(POLL_S * 1e3):
            scratch.release()                 # nothing to do: give a large photo's memory back
            continue
        frames = child.control.recv_multipart(copy=False)
        try:
            work = wire.decode_as(frames, wire.Dispatch)
        except wire.WireError as exc:
            child.log.warning("malformed message dropped", error=str(exc))
            child.count(errors=1)
            continue
        for request in work.requests:
            child.tick()                      # a group of large images takes a while
            prepare(child, manifest, senders, work, request, notes, scratch)
        notes.flush()                         # one note per group


def prepare(child: Child, manifest: Manifest, senders: ExecutorSenders, work: wire.Dispatch,
            request: wire.Request, notes: Notes, scratch: DecodeScratch | None = None) -> None:
    """One image: its pixels to the executor, or its error answered."""
    started = time.perf_counter()
    try:
        # the size is known only once the header is read: the budget is what
        # --max-pixels allows
        with child.long_step("decode", child.cfg.max_pixels):
            rgb = decode_request(request, child.cfg.max_pixels, scratch)
            pixels, placement = letterbox(rgb, manifest.input_size)    # out of the scratch
        request = dataclasses.replace(request, data=None)   # the bytes go no further
    except ImageError as exc:
        notes.result(error_result(request, STAGE, str(exc),
                                  wire.INCOMPLETE if exc.incomplete else None))
        child.count(errors=1)
    except Exception as exc:  # a decoder bug must not take the worker down
        child.log.exception("unexpected preprocess failure", id=request.id)
        notes.result(error_result(request, STAGE,
                                  f"cannot read image: {type(exc).__name__}: {exc}"))
        child.count(errors=1)
    else:
        senders.send(work, wire.Image(request, placement, work.to, pixels))
        notes.handed(request.id, work.to)
        child.count(processed=1)
    child.count(busy_s=time.perf_counter() - started)


def decode_request(request: wire.Request, max_pixels: int,
                   scratch: DecodeScratch | None = None) -> np.ndarray:
    """The request's image as RGB: its upload's bytes when it has one (a client that sent
    the image, not a path), else the file at its path."""
    if request.data is not None:
        return decode_bytes(bytes(request.data), max_pixels, scratch)
    return decode_image(request.path, max_pixels, scratch)


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
            try:
                sock.connect(work.address)
            except zmq.ZMQError as exc:              # (the front checks addresses first)
                sock.close(0)
                self.child.log.warning("cannot connect to the executor; image dropped (the "
                                       "front retries)", executor=work.to,
                                       address=work.address, error=str(exc))
                self.child.count(errors=1)
                return
            self.sockets[work.address] = sock
            while len(self.sockets) > MAX_EXECUTOR_SOCKETS:
                self.sockets.popitem(last=False)[1].close(0)
        self.sockets.move_to_end(work.address)
        try:
            sock.send_multipart(wire.encode(image), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.child.log.warning("executor not taking images; dropped (the front retries)",
                                   executor=work.to, id=image.request.id)
            self.child.count(errors=1)
