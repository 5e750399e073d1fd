"""Model inputs from photos, the reference way: letterbox, normalise, zero the padding.

Used by calibration and by `--verify`. The normalisation here is written in numpy on
purpose, independently of `ServingModel`, so verification compares the exported graph
against a second implementation of the reference preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pspnet.model.image_io import letterbox


def letterboxed_batch(
    photos: Sequence[np.ndarray], input_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x 3 letterboxed images and int32 N x 4 boxes (top, left, h, w)."""
    images, boxes = [], []
    for rgb in photos:
        padded, placement = letterbox(rgb, input_size)
        images.append(padded)
        boxes.append(placement.box())
    return np.stack(images), np.asarray(boxes, dtype=np.int32)


def normalised_batch(
    images: np.ndarray, boxes: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """float32 N x 3 x H x W: (x - mean) / std inside each box, 0 in the padding."""
    x = (images.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    out = np.zeros_like(x)
    for i, (top, left, height, width) in enumerate(boxes):
        out[i, top:top + height, left:left + width] = x[i, top:top + height, left:left + width]
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


def box_masks(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool N x H x W, True inside each box."""
    masks = np.zeros((len(boxes), *size), dtype=bool)
    for i, (top, left, height, width) in enumerate(boxes):
        masks[i, top:top + height, left:left + width] = True
    return masks
