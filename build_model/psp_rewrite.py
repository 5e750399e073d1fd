"""The exact PSP-bottleneck rewrite: the pyramid branches' share of the 3x3 conv, small.

mmseg's PSPHead concatenates the feature map x with bilinear upsamplings of its pooled
branches p_i (1x1, 2x2, 3x3, 6x6) and runs one 3x3 conv over all of it: for R50-D8 at
500x500 that conv (4096 -> 512 channels at 63x63) is 43 % of the network's MACs, and half
of its input channels are the upsampled branches. Upsampling and convolution are both
linear, so

    conv(concat(x, up(p_1), ..)) = conv_x(x) + sum_i A_i . (W_i p_i)

where W_i p_i applies each of the conv's taps to the small map (9 x Cout x Cb x s^2 MACs)
and A_i (H*W x 9 s^2) holds the shifted, zero-padded bilinear weights. A_i comes from
`F.interpolate` itself (the upsampling of an identity basis), so it holds exactly the
weights mmseg's `resize` uses. The result is the same function in real arithmetic; in
float32 only the order of the sums changes. It is plain Conv + MatMul: ONNX, ATC and
torch run it as they are.

`ExactPSPHead` replaces the head in a copy of the network (`rewrite_psp_head`); it reuses
the head's own pooling branches, norm, activation and classifier modules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_log = logging.getLogger(__name__)


def tap_matrix(
    pooled_sizes: Sequence[tuple[int, int]],
    feature_size: tuple[int, int],
    kernel: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    align_corners: bool,
) -> torch.Tensor:
    """float64 K x (H*W): row (branch, tap, a, b) = where pooled pixel (a, b) of that branch
    lands, bilinearly upsampled and shifted to that conv tap (zero outside the map)."""
    height, width = feature_size
    rows = []
    for sh, sw in pooled_sizes:
        basis = torch.eye(sh * sw, dtype=torch.float64).view(sh * sw, 1, sh, sw)
        up = F.interpolate(basis, size=(height, width), mode="bilinear",
                           align_corners=align_corners)[:, 0]
        up = F.pad(up, (padding[1], padding[1], padding[0], padding[0]))
        for ky in range(kernel[0]):
            for kx in range(kernel[1]):
                y0, x0 = ky * dilation[0], kx * dilation[1]
                rows.append(up[:, y0:y0 + height, x0:x0 + width].reshape(sh * sw, -1))
    return torch.cat(rows, 0)


class ExactPSPHead(nn.Module):
    """PSPHead.forward with the bottleneck's branch channels computed on the pooled maps.

    Same inputs and outputs as the PSPHead it is made from (a list of backbone features ->
    logits); at a feature size other than the one it was built for it makes the matching
    tap matrix on the fly (the build's artifacts are static, so that never happens there).
    """

    def __init__(self, head: nn.Module, feature_size: tuple[int, int]) -> None:
        super().__init__()
        bottleneck = head.bottleneck
        conv = bottleneck.conv
        scales = len(head.psp_modules)
        self.in_index = int(head.in_index)
        self.feature_size = (int(feature_size[0]), int(feature_size[1]))
        self.out_channels = int(conv.out_channels)
        self.branch_channels = int(head.channels)
        self.x_channels = int(conv.in_channels) - scales * self.branch_channels
        self.kernel = tuple(conv.kernel_size)
        self.padding = tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.align_corners = bool(head.psp_modules.align_corners)
        self.pooled_sizes = [_pair(stage[0].output_size) for stage in head.psp_modules]
        self.pyramid = nn.ModuleList(head.psp_modules)       # pool + 1x1 ConvModule each
        self.norm = bottleneck.norm if bottleneck.with_norm else nn.Identity()
        self.act = bottleneck.activate if bottleneck.with_activation else nn.Identity()
        self.dropout = head.dropout if head.dropout is not None else nn.Identity()
        self.conv_seg = head.conv_seg
        weight = conv.weight.detach()
        self.weight_x = nn.Parameter(weight[:, :self.x_channels].clone(), requires_grad=False)
        self.bias = (None if conv.bias is None
                     else nn.Parameter(conv.bias.detach().clone(), requires_grad=False))
        taps = self.kernel[0] * self.kernel[1]
        branches = []
        for i in range(scales):
            start = self.x_channels + i * self.branch_channels
            part = weight[:, start:start + self.branch_channels]      # Cout x Cb x kh x kw
            # row o * taps + t, so W p reshapes to Cout x (taps * s^2) without a permute
            branches.append(nn.Parameter(
                part.permute(0, 2, 3, 1).reshape(self.out_channels * taps,
                                                 self.branch_channels).contiguous(),
                requires_grad=False))
        self.branch_weights = nn.ParameterList(branches)
        self.register_buffer("taps", self._tap_matrix(self.feature_size).to(weight.dtype))

    def _tap_matrix(self, size: tuple[int, int]) -> torch.Tensor:
        return tap_matrix(self.pooled_sizes, size, self.kernel, self.padding, self.dilation,
                          self.align_corners)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = inputs[self.in_index]
        n, _, height, width = x.shape
        y = F.conv2d(x, self.weight_x, self.bias, 1, self.padding, self.dilation)
        parts = []
        for stage, weight in zip(self.pyramid, self.branch_weights, strict=True):
            pooled = stage(x)                                   # N x Cb x s x s
            q = torch.matmul(weight, pooled.flatten(2))         # N x (Cout*taps) x s^2
            parts.append(q.reshape(n, self.out_channels, -1))   # N x Cout x (taps*s^2)
        if (height, width) == self.feature_size:
            taps = self.taps
        else:
            taps = self._tap_matrix((height, width)).to(device=x.device, dtype=x.dtype)
        z = torch.matmul(torch.cat(parts, 2), taps)             # N x Cout x H*W
        y = y + z.reshape(n, self.out_channels, height, width)
        return self.conv_seg(self.dropout(self.act(self.norm(y))))


def psp_head_problem(head: nn.Module) -> str | None:
    """Why `head` cannot take the rewrite (None: it can): only mmseg's own PSPHead with
    a stride-1, same-size bottleneck conv and the default conv -> norm -> act order."""
    from mmseg.models.decode_heads.psp_head import PSPHead

    if type(head) is not PSPHead:
        return f"the decode head is {type(head).__name__}, not PSPHead"
    if head.input_transform is not None:
        return f"input_transform={head.input_transform!r} (only a single input is handled)"
    for stage in head.psp_modules:
        if not (isinstance(stage, nn.Sequential) and len(stage) == 2
                and isinstance(stage[0], nn.AdaptiveAvgPool2d)):
            return "a pyramid branch is not AdaptiveAvgPool2d + ConvModule"
        size = stage[0].output_size
        if not isinstance(size, int) and any(v is None for v in size):
            return f"a pyramid branch pools to {size!r} (a None size)"
    bottleneck = head.bottleneck
    conv = getattr(bottleneck, "conv", None)
    if tuple(getattr(bottleneck, "order", ())) != ("conv", "norm", "act") or \
            getattr(bottleneck, "with_explicit_padding", False):
        return "the bottleneck is not a plain conv -> norm -> act ConvModule"
    if type(conv) not in (nn.Conv2d,) and not _is_mmcv_conv(conv):
        return f"the bottleneck conv is {type(conv).__name__}"
    if conv.groups != 1 or tuple(conv.stride) != (1, 1) or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str):
        return "the bottleneck conv is grouped, strided or not zero-padded"
    for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation, strict=True):
        if 2 * p != d * (k - 1):
            return "the bottleneck conv changes the feature size"
    if conv.in_channels - len(head.psp_modules) * head.channels <= 0:
        return "the bottleneck's input channels do not match the pyramid"
    return None


def rewrite_psp_head(core: nn.Module, feature_size: tuple[int, int]) -> dict[str, Any]:
    """Replace `core.decode_head` by its ExactPSPHead when it qualifies; say what was done."""
    head = getattr(core, "decode_head", None)
    problem = "the network has no decode head" if head is None else psp_head_problem(head)
    if problem:
        _log.info("PSP bottleneck rewrite not applied: %s", problem)
        return {"applied": False, "why": problem}
    exact = ExactPSPHead(head, feature_size).eval()
    core.decode_head = exact
    taps = tuple(exact.taps.shape)
    moved = len(exact.pooled_sizes) * exact.branch_channels
    _log.info("PSP bottleneck rewrite: %d of the bottleneck conv's %d input channels now "
              "computed on the pooled maps (tap matrix %d x %d)", moved,
              moved + exact.x_channels, *taps)
    return {"applied": True, "scales": [list(s) for s in exact.pooled_sizes],
            "feature_size": list(exact.feature_size), "tap_matrix": list(taps),
            "branch_channels": moved, "x_channels": exact.x_channels}


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _is_mmcv_conv(conv: nn.Module) -> bool:
    """mmcv's Conv2d wrapper only adds empty-tensor handling around nn.Conv2d.forward."""
    return isinstance(conv, nn.Conv2d) and type(conv).__module__.startswith("mmcv.")
