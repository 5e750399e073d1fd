"""Executor only: pre-staged batches straight through the backend, the device's ceiling.

Why: it is the number ais_bench reports for the seed (1000 x batch / mean execute ms: no
decode, no transfer, no postprocessing), so e2e / executor says how much of the device the
streaming pipeline actually delivers. Batches are letterboxed from the bench's own images
before timing and fed through the backend's two slots with upload, launch and collect, as
the executor process does.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pspnet.model.image_io import decode_image, letterbox
from pspnet.stages.backends import NUM_SLOTS, Backend, throughput

Batch = tuple[np.ndarray, np.ndarray]          # uint8 B x H x W x 3, int32 B x 4


def stage_batches(paths: Sequence[Path], input_size: tuple[int, int], batch: int,
                  count: int) -> list[Batch]:
    """Up to `count` full batches of letterboxed images (cycling the paths when short)."""
    count = max(1, min(count, -(-len(paths) // batch)))
    out: list[Batch] = []
    cursor = 0
    for _ in range(count):
        images = np.zeros((batch, *input_size, 3), np.uint8)
        boxes = np.zeros((batch, 4), np.int32)
        for row in range(batch):
            path = paths[cursor % len(paths)]
            cursor += 1
            try:
                _, place = letterbox(decode_image(path), input_size, out=images[row])
            except ValueError:          # an unreadable image: leave a filler row
                continue
            boxes[row] = place.box()
        out.append((images, boxes))
    return out


def run_batches(backend: Backend, batches: Sequence[Batch], n: int) -> float:
    """Push `n` batches (cycling `batches`), two slots launched at a time, as the executor
    does (a device with a queue holds the next batch while one runs); return wall seconds."""
    pending: collections.deque[int] = collections.deque()
    started = time.perf_counter()
    for k in range(n):
        slot = k % NUM_SLOTS
        if len(pending) == NUM_SLOTS:
            backend.collect(pending.popleft())
        backend.upload(slot, *batches[k % len(batches)])
        backend.launch(slot)
        pending.append(slot)
    while pending:
        backend.collect(pending.popleft())
    return time.perf_counter() - started


def measure(backend: Backend, batches: Sequence[Batch], n: int) -> dict[str, float]:
    """ais_bench's images/s over `n` timed batches, plus the wall-clock rate for reference."""
    del backend.execute_times_ms[:]
    wall = run_batches(backend, batches, n)
    times = list(backend.execute_times_ms)
    return {"img_s": throughput(backend.batch_size, times),
            "wall_img_s": n * backend.batch_size / wall if wall > 0 else 0.0,
            "execute_ms_mean": float(np.mean(times)) if times else 0.0,
            "batches": n}
