"""The reference prediction the pipeline must reproduce, written independently of stages/.

Used by the tests and by `pspnet demo` (as its stand-in ground truth).

mmseg's own network on the letterboxed input -> bilinear to the input size (with the
network's align_corners, manifest.align_corners) -> exact crop of
the valid box -> bilinear to the original size -> argmax (the `logits` head's definition);
for the `labels` head: argmax at the input size -> exact crop -> nearest to the original.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pspnet.model.image_io import letterbox
from pspnet.model.manifest import Manifest


class Reference:
    def __init__(self, model_dir: Path) -> None:
        from pspnet.build_model.network import load_network

        self.manifest = Manifest.read(model_dir)
        source = self.manifest.source
        self.network = load_network(source["config"], source["checkpoint"])

    @torch.inference_mode()
    def predict(self, rgb: np.ndarray, head: str = "logits") -> np.ndarray:
        size = self.manifest.input_size
        padded, place = letterbox(rgb, size)
        x = (padded.astype(np.float32) - np.float32(self.manifest.mean)) \
            / np.float32(self.manifest.std)
        canvas = np.zeros_like(x)
        box = (slice(place.top, place.top + place.height),
               slice(place.left, place.left + place.width))
        canvas[box] = x[box]
        logits = self.network.core(torch.from_numpy(canvas.transpose(2, 0, 1))[None])
        up = F.interpolate(logits, size=size, mode="bilinear",
                           align_corners=self.manifest.align_corners)
        crop = up[:, :, box[0], box[1]]
        orig = (place.orig_h, place.orig_w)
        if head == "labels":
            labels = crop.argmax(1, keepdim=True).float()
            return F.interpolate(labels, size=orig, mode="nearest")[0, 0].byte().numpy()
        if crop.shape[2:] != orig:
            crop = F.interpolate(crop, size=orig, mode="bilinear", align_corners=False)
        return crop.argmax(1)[0].byte().numpy()
