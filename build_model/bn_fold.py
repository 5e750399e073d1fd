"""Fold inference BatchNorm into the convolution that feeds it, in place.

Why: in eval mode BN is a per-channel affine map, so `bn(conv(x))` is one convolution with
scaled weights and a bias. Every artifact then skips a full read and write of each
feature map, and the torch backend's CUDA path can hand conv + bias (+ add) + ReLU to one
cuDNN call (`stages/backends/conv_fusion.py`).

Which pairs fold is read from the data flow, not guessed from module names:
`torch.export` traces the network once and a pair folds only when the BN's input is a
convolution's output that nothing else reads, and each module is called exactly once.
The graph's parameter names (`graph_signature.inputs_to_parameters`) map the ops back to
the modules, which are then edited: the conv gets the folded weight and bias, the BN
becomes `nn.Identity`. Only the copy handed in is changed.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_log = logging.getLogger(__name__)

_CONV_OPS = ("aten.conv2d.default", "aten.convolution.default")
_BN_OPS = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")


@dataclass(frozen=True)
class FoldedPair:
    conv: str        # module path of the convolution
    norm: str        # module path of the BatchNorm it absorbed


def find_conv_bn_pairs(core: nn.Module, example: torch.Tensor) -> list[FoldedPair]:
    """The (conv, BN) module pairs of `core` that can be folded, in graph order."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(core, (example,))
    params = program.graph_signature.inputs_to_parameters
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]

    def owner(node: torch.fx.Node) -> str | None:
        """The module whose weight is the op's second argument (None: not a parameter)."""
        weight = node.args[1] if len(node.args) > 1 else None
        name = params.get(getattr(weight, "name", None))
        return name.rsplit(".", 1)[0] if name and name.endswith(".weight") else None

    calls = Counter(owner(n) for n in nodes if str(n.target) in _CONV_OPS + _BN_OPS)
    pairs = []
    for node in nodes:
        if str(node.target) not in _BN_OPS:
            continue
        source = node.args[0]
        norm, conv = owner(node), owner(source) if isinstance(source, torch.fx.Node) else None
        if (norm is None or conv is None or str(source.target) not in _CONV_OPS
                or len(source.users) != 1 or calls[norm] != 1 or calls[conv] != 1):
            continue
        if _is_transposed(source):
            continue
        pairs.append(FoldedPair(conv=conv, norm=norm))
    return pairs


def fold_batchnorm(core: nn.Module, example: torch.Tensor) -> list[FoldedPair]:
    """Fold every foldable BN of `core` (eval mode) into its conv; return the pairs."""
    core.eval()
    pairs = find_conv_bn_pairs(core, example)
    for pair in pairs:
        conv = core.get_submodule(pair.conv)
        norm = core.get_submodule(pair.norm)
        # mmengine's revert_sync_batchnorm leaves its own _BatchNormXd, not BatchNorm2d
        if not (isinstance(conv, nn.Conv2d) and isinstance(norm, _BatchNorm)
                and norm.track_running_stats and norm.running_var is not None):
            raise TypeError(f"{pair.conv} -> {pair.norm}: expected Conv2d -> BatchNorm "
                            f"with running statistics, got {type(conv).__name__} -> "
                            f"{type(norm).__name__}")
        fold_into(conv, norm)
        parent_name, _, attr = pair.norm.rpartition(".")
        setattr(core.get_submodule(parent_name) if parent_name else core, attr, nn.Identity())
    _log.info("folded %d BatchNorm layers into their convolutions", len(pairs))
    return pairs


def fold_into(conv: nn.Conv2d, norm: _BatchNorm) -> None:
    """conv <- bn o conv (float64 arithmetic, stored in the conv's dtype)."""
    with torch.no_grad():
        weight = conv.weight.double()
        scale = norm.running_var.double().add(norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        shift = -norm.running_mean.double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
        conv.weight.copy_(weight * scale.view(-1, 1, 1, 1))
        folded_bias = (bias * scale + shift).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(folded_bias, requires_grad=conv.weight.requires_grad)
    else:
        with torch.no_grad():
            conv.bias.copy_(folded_bias)


def _is_transposed(node: torch.fx.Node) -> bool:
    """aten.convolution carries `transposed` as its 7th argument; conv2d never is."""
    return str(node.target) == "aten.convolution.default" and bool(node.args[6])
