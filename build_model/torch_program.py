"""The torch backend's artifact: the core network as a `torch.export` program (`.pt2`).

Contract for the consumer: `torch.export.load(path).module()` maps float32 N x 3 x H x W
(normalised, padding zeroed) to float32 N x C x h x w logits. The batch dimension is
dynamic (1..max_batch) so one file serves every batch size; if torch cannot export it
with a dynamic batch, one program per batch size is written instead and the caller
records that in the manifest.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

DYNAMIC_NAME = "pspnet_core.pt2"
MIN_DYNAMIC_MAX = 64
_log = logging.getLogger(__name__)


def per_batch_name(batch_size: int) -> str:
    """File name of the fallback program for one static batch size."""
    return f"pspnet_core_bs{batch_size}.pt2"


def export_core_program(
    core: torch.nn.Module,
    out_dir: Path,
    *,
    input_size: tuple[int, int],
    batch_sizes: Sequence[int],
) -> dict[int, str]:
    """Save the core program(s) under `out_dir`; return {batch size: file name}.

    All batch sizes map to `pspnet_core.pt2` when the dynamic export works (max batch is
    at least 64, as the contract promises); otherwise each maps to its own program.
    """
    core = core.eval()
    height, width = input_size
    max_batch = max(MIN_DYNAMIC_MAX, *batch_sizes)
    example = torch.zeros(2, 3, height, width)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        program = _export(core, example, dynamic_shapes=({0: batch},))
    except Exception as exc:  # any failure means: fall back to static programs
        _log.warning("dynamic-batch torch.export failed (%s: %s); writing one program per "
                     "batch size", type(exc).__name__, str(exc).splitlines()[0][:200])
    else:
        _save(program, out_dir / DYNAMIC_NAME)
        return {n: DYNAMIC_NAME for n in batch_sizes}
    names = {}
    for n in batch_sizes:
        program = _export(core, torch.zeros(n, 3, height, width), dynamic_shapes=None)
        _save(program, out_dir / per_batch_name(n))
        names[n] = per_batch_name(n)
    return names


def _export(core, example, dynamic_shapes):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(core, (example,), dynamic_shapes=dynamic_shapes)


def _save(program, path: Path) -> None:
    _log.info("saving torch program %s", path.name)
    torch.export.save(program, str(path))
