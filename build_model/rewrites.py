"""The same network with less work: BN folding and the PSP rewrite, checked and counted.

`rewrite_core` returns a rewritten deep copy of the core (the original, shared with the
mmseg segmentor that `--verify` compares against, is left alone) and the record that
goes into manifest.json's `rewrites`: what was folded or rewritten, the MACs per image
before and after (counted by torch's FlopCounterMode at the build's input size), and a
self-check: both networks on one random input, max |logit difference|. A rewrite that
changes the output beyond float32 noise is a bug, and the build stops rather than ship it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pspnet.build_model.bn_fold import fold_batchnorm
from pspnet.build_model.errors import BuildError
from pspnet.build_model.psp_rewrite import rewrite_psp_head

# |rewritten - original| on the self-check, relative to max(1, max |logit|); float32 sums
# in another order differ by ~1e-6 relative, a wrong rewrite by O(1)
SELF_CHECK_TOLERANCE = 1e-4
_log = logging.getLogger(__name__)


def count_macs(core: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Multiply-accumulates of one forward (FlopCounterMode's FLOPs / 2), and its output."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = core(x)
    return counter.get_total_flops() // 2, out


def rewrite_core(
    core: nn.Module,
    input_size: tuple[int, int],
    *,
    psp_rewrite: bool = True,
    fold_bn: bool = True,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """(network to export, manifest record); `core` itself is not modified."""
    core = core.eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, *input_size, generator=generator)
    before, reference = count_macs(core, x)
    record: dict[str, Any] = {
        "bn_fold": {"applied": False, "why": "pspnet build --no-bn-fold"},
        "psp_bottleneck": {"applied": False, "why": "pspnet build --no-psp-rewrite"},
    }
    if not (psp_rewrite or fold_bn):
        record["macs_per_image"] = {"network": before, "built": before}
        _log.info("%.2f GMAC per image at %dx%d; no rewrites asked for", before / 1e9,
                  *input_size)
        return core, record
    new = copy.deepcopy(core).eval()
    if fold_bn:
        try:
            pairs = fold_batchnorm(new, x)
        except Exception as exc:  # noqa: BLE001 - an untraceable network keeps its BN
            why = f"torch.export could not trace the network: {type(exc).__name__}"
            _log.warning("BatchNorm not folded (%s: %s)", why, str(exc).splitlines()[0][:200]
                         if str(exc) else "")
            record["bn_fold"] = {"applied": False, "why": why}
        else:
            record["bn_fold"] = {"applied": bool(pairs), "folded": len(pairs)}
    if psp_rewrite:
        feature_size = (int(reference.shape[-2]), int(reference.shape[-1]))
        record["psp_bottleneck"] = rewrite_psp_head(new, feature_size)
    new.requires_grad_(False)
    after, out = count_macs(new, x)
    scale = max(1.0, float(reference.abs().max()))
    diff = float((out - reference).abs().max())
    record["macs_per_image"] = {"network": before, "built": after}
    record["self_check"] = {"input": f"random normal 1x3x{input_size[0]}x{input_size[1]}",
                            "max_abs_logit_diff": diff, "max_abs_logit": scale}
    _log.info("%.2f GMAC per image at %dx%d before the rewrites, %.2f after (%.1f %% less); "
              "self-check max |logit diff| %.2e (max |logit| %.1f)", before / 1e9,
              *input_size, after / 1e9, 100 * (1 - after / before) if before else 0.0,
              diff, scale)
    if not diff <= SELF_CHECK_TOLERANCE * scale:
        raise BuildError(f"the rewritten network differs from the original by {diff:.3g} "
                         f"(max |logit| {scale:.3g}); build with --no-psp-rewrite "
                         "--no-bn-fold and report this network")
    return new, record
