"""Preprocess worker: image path -> letterboxed uint8 pixels for the executor.

Asks the front for work with credits (READY), so a slow or dead worker never hoards
requests; a bad image is answered as an error here and goes no further.
"""

from __future__ import annotations

import os
import time

import cv2
import zmq

from stages import wire
from stages.child import Child, error_result
from stages.config import Addresses, PipelineConfig
from stages.image_io import ImageError, decode_image, letterbox
from stages.manifest import Manifest

STAGE = "preprocess"
PREFETCH = 2                 # requests a worker holds: one working, one waiting
POLL_MS = 500


def worker_identity(index: int) -> bytes:
    """ROUTER identity: the index tells the front whose credits these are, the pid which life."""
    return f"{STAGE}-{index}-{os.getpid()}".encode()


def main(cfg: PipelineConfig, addrs: Addresses, index: int, supervised: bool = True,
         ) -> None:
    """Run until killed. `supervised`: started by the front, so exit when it is gone."""
    child = Child(STAGE, index, cfg, addrs.results, watch_parent=supervised)
    cv2.setNumThreads(1)                        # one worker = one core; the pool scales out
    try:
        manifest = Manifest.read(cfg.model_dir)
    except (OSError, ValueError) as exc:
        child.fatal(str(exc))
    size = manifest.input_size

    dealer = child.ctx.socket(zmq.DEALER)       # requests in, credits out <-> front ROUTER
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, worker_identity(index))
    dealer.connect(addrs.prep)
    images = child.ctx.socket(zmq.PUSH)         # letterboxed pixels -> executors (via front)
    images.setsockopt(zmq.LINGER, -1)
    images.connect(addrs.images_in)
    results = child.ctx.socket(zmq.PUSH)        # refused images -> front
    results.setsockopt(zmq.LINGER, -1)
    results.connect(addrs.results)

    child.start_heartbeat()
    dealer.send_multipart(wire.encode(wire.Ready(index, PREFETCH)))
    child.log.info("ready", input_size=size)
    while True:
        if not dealer.poll(POLL_MS):
            continue
        frames = dealer.recv_multipart(copy=False)
        try:
            request = wire.decode_as(frames, wire.Request)
        except wire.WireError as exc:
            child.log.warning("malformed message dropped", error=str(exc))
            child.count(errors=1)
            dealer.send_multipart(wire.encode(wire.Ready(index, 1)))
            continue
        started = time.perf_counter()
        try:
            rgb = decode_image(request.path, cfg.max_pixels)
            pixels, placement = letterbox(rgb, size)
        except ImageError as exc:
            results.send_multipart(wire.encode(error_result(request, STAGE, str(exc))))
            child.count(errors=1)
        except Exception as exc:  # a decoder bug must not take the worker down
            child.log.exception("unexpected preprocess failure", id=request.id)
            results.send_multipart(wire.encode(
                error_result(request, STAGE, f"cannot read image: {type(exc).__name__}: {exc}")))
            child.count(errors=1)
        else:
            images.send_multipart(wire.encode(wire.Image(request, placement, pixels)),
                                  copy=False)
            child.count(processed=1)
        child.count(busy_s=time.perf_counter() - started)
        dealer.send_multipart(wire.encode(wire.Ready(index, 1, (request.id,))))
