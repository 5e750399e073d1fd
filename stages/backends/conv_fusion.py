"""conv + bias (+ residual add) + ReLU as one cuDNN call, in the torch program's graph.

Why: after each cuDNN convolution, eager PyTorch runs bias/BN, the residual add and ReLU as
separate passes over the feature map. With BatchNorm folded at build (`pspnet build`'s
default, manifest `rewrites.bn_fold`), the torch program's graph holds `conv2d(x, w, b)`
followed by `relu`, or by `add(., identity)` then `relu`: exactly what
`torch.cudnn_convolution_relu` and `torch.cudnn_convolution_add_relu` compute in one
kernel. `fuse_conv_relu` rewrites those chains in a `torch.fx.GraphModule` (the unlifted
`torch.export` program the torch backend runs).

A chain is fused only when nothing else reads its intermediate values (the conv output,
the sum), an in-place add writes the conv's own output, and `eligible` accepts the conv
(for cuDNN: channel counts that are multiples of 8). The replacement ops are parameters,
so the selection and the graph surgery are tested on the CPU with `reference_conv_relu` /
`reference_conv_add_relu` (what the cuDNN ops compute, written with plain ops).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten
_CONV = (aten.conv2d.default,)
_RELU = (aten.relu.default, aten.relu_.default)
_ADD = (aten.add.Tensor, aten.add_.Tensor)
CUDNN_ALIGN = 8          # channels per tensor-core vector; runtime fusion wants multiples


@dataclass
class FusionReport:
    """What `fuse_conv_relu` changed: counts, and the convs it left alone and why."""

    conv_relu: int = 0
    conv_add_relu: int = 0
    convs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        left = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return (f"{self.conv_relu} conv+ReLU and {self.conv_add_relu} conv+add+ReLU fused of "
                f"{self.convs} convolutions" + (f" (left: {left})" if left else ""))

    def as_dict(self) -> dict[str, Any]:
        return {"conv_relu": self.conv_relu, "conv_add_relu": self.conv_add_relu,
                "convs": self.convs, "skipped": dict(self.skipped)}


def reference_conv_relu(x, weight, bias, stride, padding, dilation, groups):
    """What aten.cudnn_convolution_relu computes."""
    return F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))


def reference_conv_add_relu(x, weight, z, alpha, bias, stride, padding, dilation, groups):
    """What aten.cudnn_convolution_add_relu computes: relu(conv(x) + bias + alpha * z)."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return F.relu(y + (z if alpha is None or alpha == 1 else alpha * z))


def cudnn_eligible(weight: torch.Tensor | None, groups: int) -> str | None:
    """Why cuDNN's runtime fusion should not get this conv (None: it may)."""
    if weight is None or weight.dim() != 4:
        return "weight not a 4-d parameter"
    if groups != 1:
        return "grouped"
    if weight.shape[0] % CUDNN_ALIGN or weight.shape[1] % CUDNN_ALIGN:
        return f"channels not multiples of {CUDNN_ALIGN}"
    return None


def fuse_conv_relu(
    gm: fx.GraphModule,
    *,
    conv_relu: Callable[..., Any] = aten.cudnn_convolution_relu.default,
    conv_add_relu: Callable[..., Any] = aten.cudnn_convolution_add_relu.default,
    eligible: Callable[[torch.Tensor | None, int], str | None] = cudnn_eligible,
) -> FusionReport:
    """Rewrite `gm` in place: conv -> ReLU and conv -> add -> ReLU chains become one op."""
    report = FusionReport()
    graph = gm.graph
    for conv in [n for n in graph.nodes if n.op == "call_function" and n.target in _CONV]:
        report.convs += 1
        x, weight, bias, stride, padding, dilation, groups = _conv_args(conv)
        why = eligible(_tensor(gm, weight), groups)
        chain = None if why else _chain(conv)
        if why or isinstance(chain, str):
            reason = why or chain
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
            continue
        add, other, relu = chain
        with graph.inserting_before(relu):
            if add is None:
                fused = graph.call_function(conv_relu, (x, weight, bias, stride, padding,
                                                        dilation, groups))
                report.conv_relu += 1
            else:
                fused = graph.call_function(conv_add_relu, (x, weight, other, 1.0, bias,
                                                            stride, padding, dilation, groups))
                report.conv_add_relu += 1
        fused.meta.update({k: v for k, v in relu.meta.items() if k == "val"})
        relu.replace_all_uses_with(fused)
        for node in (relu, add, conv):
            if node is not None:
                graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return report


def fused_copy(gm: fx.GraphModule, **kwargs: Any) -> tuple[fx.GraphModule, FusionReport]:
    """A second GraphModule over the same weights with the fused graph (`gm` unchanged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch's pytree spec deprecation
        copy_ = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    return copy_, fuse_conv_relu(copy_, **kwargs)


def _conv_args(node: fx.Node) -> tuple:
    """aten.conv2d's (input, weight, bias, stride, padding, dilation, groups), defaults
    filled in."""
    defaults = (None, None, None, [1, 1], [0, 0], [1, 1], 1)
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    args = list(node.args) + [node.kwargs.get(n, d) for n, d in
                              zip(names[len(node.args):], defaults[len(node.args):],
                                  strict=True)]
    return tuple(args)


def _chain(conv: fx.Node) -> tuple[fx.Node | None, fx.Node | None, fx.Node] | str:
    """(add or None, the add's other operand, relu) after `conv`, or why there is none."""
    users = list(conv.users)
    if len(users) != 1:
        return "output read more than once"
    user = users[0]
    if user.op == "call_function" and user.target in _RELU:
        return None, None, user
    if not (user.op == "call_function" and user.target in _ADD and len(user.args) == 2
            and user.kwargs.get("alpha", 1) == 1):
        return "not followed by ReLU or add"
    a, b = user.args
    other = b if a is conv else a
    if not isinstance(other, fx.Node) or other is conv:
        return "add of a non-tensor"
    if user.target == aten.add_.Tensor and a is not conv:
        return "in-place add into another tensor"
    if not _same_shape(conv, other):
        return "add broadcasts"
    after = list(user.users)
    if len(after) != 1 or after[0].op != "call_function" or after[0].target not in _RELU:
        return "add not followed by ReLU alone"
    return user, other, after[0]


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False                        # unknown shapes: do not risk a broadcast
    return [str(d) for d in va.shape] == [str(d) for d in vb.shape]


def _tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The weight a get_attr node names, or its traced value's shape holder."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        if isinstance(value, torch.Tensor):
            return value
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None
