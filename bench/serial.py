"""Serial baseline: the seed's steps one after another, one batch at a time, one process.

Why: it is what the streaming daemon replaces. Decode -> letterbox -> infer -> postprocess
(labels at the original size, mask PNG unless --no-masks, mIoU areas when there is ground
truth), with the same backend object, batch size and postprocessing functions as the
pipeline's stages, so the only difference measured is the overlap the pipeline adds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pspnet.core.wire import Placement
from pspnet.model.image_io import ImageError, decode_image, letterbox
from pspnet.model.labels import (
    GroundTruthError,
    intersect_and_union,
    labels_from_labels,
    labels_from_logits,
    read_ground_truth,
)
from pspnet.model.manifest import Manifest
from pspnet.model.masks import mask_path, write_mask
from pspnet.model.metrics import IoUAccumulator
from pspnet.stages.backends import Backend


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for a block (the postprocess workers run 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SerialRunner:
    def __init__(self, backend: Backend, manifest: Manifest, out_dir: Path | None,
                 max_pixels: int, worker_threads: int = 1) -> None:
        self.backend = backend
        self.worker_threads = max(1, worker_threads)
        self.manifest = manifest
        self.out_dir = out_dir
        self.max_pixels = max_pixels
        self.batch = backend.batch_size
        self.images = np.zeros((self.batch, *manifest.input_size, 3), np.uint8)
        self.boxes = np.zeros((self.batch, 4), np.int32)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    def run(self, paths: Sequence[Path], truths: Sequence[Path | None],
            ) -> tuple[float, IoUAccumulator, int]:
        """(wall seconds, areas summed, errors) for every path, batch after batch."""
        metrics = IoUAccumulator(self.manifest.num_classes)
        errors = 0
        started = time.perf_counter()
        for first in range(0, len(paths), self.batch):
            chunk = range(first, min(first + self.batch, len(paths)))
            errors += self._batch([paths[i] for i in chunk], [truths[i] for i in chunk],
                                  metrics)
        return time.perf_counter() - started, metrics, errors

    def _batch(self, paths: list[Path], truths: list[Path | None],
               metrics: IoUAccumulator) -> int:
        self.boxes[:] = 0
        placed: list[tuple[int, Placement]] = []
        errors = 0
        for row, path in enumerate(paths):                      # 1. preprocess
            try:
                rgb = decode_image(path, self.max_pixels)
                _, place = letterbox(rgb, self.manifest.input_size, out=self.images[row])
            except ImageError:
                errors += 1
                continue
            self.boxes[row] = place.box()
            placed.append((row, place))
        if not placed:
            return errors
        self.backend.upload(0, self.images, self.boxes)          # 2. infer
        out = self.backend.execute(0)
        with torch_threads(self.worker_threads):                 # as a postprocess worker
            return errors + self._postprocess(out, placed, paths, truths, metrics)

    def _postprocess(self, out: np.ndarray, placed: list[tuple[int, Placement]],
                     paths: list[Path], truths: list[Path | None],
                     metrics: IoUAccumulator) -> int:
        errors = 0
        for row, place in placed:
            try:
                if self.backend.head == "logits":
                    labels = labels_from_logits(out[row], place, self.manifest.input_size,
                                                self.manifest.align_corners)
                else:
                    labels = labels_from_labels(out[row], place)
                if self.out_dir is not None:
                    write_mask(labels, mask_path(self.out_dir, str(paths[row])),
                               self.manifest.palette, source=paths[row])  # as postprocess
                if truths[row] is not None:
                    truth = read_ground_truth(truths[row], self.max_pixels)
                    metrics.add(intersect_and_union(labels, truth,
                                                    self.manifest.num_classes))
            except (GroundTruthError, OSError, ValueError):
                errors += 1
        return errors
