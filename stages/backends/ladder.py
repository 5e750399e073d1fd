"""A ladder of static batch sizes of one model on one device, driven as one backend.

A static-batch graph runs a partial batch at its full cost (filler rows). So that a lone
image on an idle device costs one image, the executor opens the model at every built
batch size up to the one it runs (`pspnet build --batch-sizes 1,4`: both), and each
batch goes to the smallest that holds it: `upload(slot, images[:size], boxes[:size])`.
The assembling thread fills the largest size's host buffers; a smaller size's upload
copies the first rows from there (as it would from any host array). The batch-size-1
rung (below the top) serves lone images, so it may take other session options
(`lone_options`: onnxruntime threads that spin within a run, not between runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pspnet.core.backend_rules import lone_options
from pspnet.stages.backends.base import NUM_SLOTS, Backend


class Ladder:
    """Backends of one model at several static batch sizes, as one of the largest."""

    def __init__(self, backends: Mapping[int, Backend]) -> None:
        if not backends:
            raise ValueError("a ladder needs at least one backend")
        self.by_size = dict(sorted(backends.items()))
        self.sizes = list(self.by_size)
        top = self.by_size[self.sizes[-1]]
        self.name, self.head, self.input_size = top.name, top.head, top.input_size
        self.batch_size = top.batch_size
        self.execute_times_ms: list[float] = top.execute_times_ms
        for backend in self.by_size.values():      # one list: the executor trims it
            backend.execute_times_ms = self.execute_times_ms
        self.open_seconds = sum(b.open_seconds for b in self.by_size.values())
        compiles = [b.compile_seconds for b in self.by_size.values()
                    if b.compile_seconds is not None]
        self.compile_seconds = sum(compiles) if compiles else None
        self._running: list[Backend | None] = [None] * NUM_SLOTS   # who holds each slot

    def host_buffers(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        return self.by_size[self.batch_size].host_buffers(slot)

    def upload(self, slot: int, images: np.ndarray, boxes: np.ndarray) -> None:
        """`images` of one of the built sizes (a prefix of the host buffers)."""
        size = len(images)
        if size not in self.by_size:
            raise ValueError(f"batch of {size}: this ladder runs {self.sizes}")
        backend = self.by_size[size]
        backend.upload(slot, images, boxes)
        self._running[slot] = backend

    def launch(self, slot: int) -> None:
        self._holder(slot).launch(slot)

    def collect(self, slot: int) -> np.ndarray:
        backend = self._holder(slot)
        self._running[slot] = None
        return backend.collect(slot)

    def execute(self, slot: int) -> np.ndarray:
        self.launch(slot)
        return self.collect(slot)

    def close(self) -> None:
        for backend in self.by_size.values():
            backend.close()

    def _holder(self, slot: int) -> Backend:
        backend = self._running[slot]
        if backend is None:
            raise RuntimeError(f"slot {slot}: no batch pending (upload it first)")
        return backend


def open_ladder(kind: str, model_dir: Path, built: list[int], top: int, *, device: str,
                precision: str, options: Mapping[str, str]) -> Ladder:
    """The model opened at each built size up to `top` (the size the executor runs).
    Batch size 1 below the top runs a lone image on an idle executor: it gets
    `lone_options` (ort: threads that spin within a run, core.backend_rules)."""
    from pspnet.stages.backends import open_backend

    sizes = sorted(s for s in built if s <= top)
    return Ladder({s: open_backend(kind, model_dir, s, device=device, precision=precision,
                                   options=lone_options(kind, options)
                                   if s == 1 < top else options) for s in sizes})
