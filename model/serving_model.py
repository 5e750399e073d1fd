"""The graph every backend runs: uint8 letterboxed batch in, logits or labels out.

Shared by `pspnet build` (exported to ONNX around mmseg's network) and the torch backend
(wrapped around the exported core program), so both normalise and mask the padding the
same way. Imports torch only; never mmseg.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("logits", "labels")


class ServingModel(nn.Module):
    """Normalise on the device, zero the padding, run the network, optionally argmax.

    Inputs:
      image: uint8 N x H x W x 3, RGB, letterboxed and centre-padded (pad bytes: any value).
      box:   int32 N x 4, the valid region of each row as (top, left, height, width).
    The reference normalises first and pads with 0 afterwards; multiplying the normalised
    batch by the box mask gives exactly that, whatever the pad bytes hold.
    Output: float32 N x C x h x w logits, or uint8 N x H x W labels (bilinear upsample of
    the logits to H x W with the network's `align_corners`, then argmax), as `head` says.
    """

    def __init__(
        self,
        core: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        head: str,
        compute_dtype: torch.dtype = torch.float32,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {head!r}")
        self.core = core
        self.head = head
        self.compute_dtype = compute_dtype
        self.align_corners = bool(align_corners)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = image.shape
        x = image.permute(0, 3, 1, 2).to(torch.float32)
        x = (x - self.mean) / self.std
        x = x * valid_mask(box, h, w).unsqueeze(1).to(x.dtype)
        logits = self.core(x.to(self.compute_dtype)).to(torch.float32)
        if self.head == "logits":
            return logits
        up = F.interpolate(logits, size=(h, w), mode="bilinear",
                           align_corners=self.align_corners)
        return up.argmax(dim=1).to(torch.uint8)


def valid_mask(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boolean N x H x W mask, True inside each row's (top, left, height, width) box.

    In int32, the box's own type: int64 comparisons and adds are the kind of op Ascend's
    ATC may place on the AI CPU instead of the AI Core (docs/ascend.md); pixel indices fit.
    """
    box = box.to(torch.int32)
    top = box[:, 0].view(-1, 1, 1)
    left = box[:, 1].view(-1, 1, 1)
    rows = torch.arange(height, dtype=torch.int32, device=box.device).view(1, height, 1)
    cols = torch.arange(width, dtype=torch.int32, device=box.device).view(1, 1, width)
    inside_rows = (top <= rows) & (rows < top + box[:, 2].view(-1, 1, 1))
    inside_cols = (left <= cols) & (cols < left + box[:, 3].view(-1, 1, 1))
    return inside_rows & inside_cols
