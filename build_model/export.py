"""`pspnet build` as a function: mmseg config + checkpoint -> model directory.

`build` is what the CLI, the demo and the pipeline tests call; `write_artifacts` (re-exported
here) is the mmseg-free lower level it ends in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pspnet.build_model.artifacts import DEFAULT_SOC, write_artifacts
from pspnet.build_model.network import load_network
from pspnet.build_model.onnx_opset import ATC_OPSET
from pspnet.model.manifest import OM_DEFAULT_PRECISION, Manifest

__all__ = ["DEFAULT_BATCH_SIZES", "build", "write_artifacts"]
DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32, 64)
_log = logging.getLogger(__name__)


def build(
    config: str | Path,
    checkpoint: str | Path,
    out_dir: str | Path,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    input_size: int | tuple[int, int] = 500,
    head: str = "logits",
    *,
    trust_checkpoint: bool = False,
    simplify: bool = True,
    soc_version: str = DEFAULT_SOC,
    run_atc: bool | None = None,
    torch_program: bool = True,
    onnx: bool = True,
    verify: bool = False,
    verify_all: bool = False,
    psp_rewrite: bool = True,
    fold_bn: bool = True,
    atc_opset: int = ATC_OPSET,
    om_precision: str = OM_DEFAULT_PRECISION,
) -> Manifest:
    """Load the network, write every artifact and the manifest; optionally verify them.

    `psp_rewrite` and `fold_bn` (pspnet.build_model.rewrites) change how the network computes,
    not what: every artifact gets them, and `verify` compares with mmseg's own model.
    `atc_opset` and `om_precision`: the ATC scripts' ONNX opset and the OMs' precision
    (pspnet.build_model.artifacts.write_artifacts).
    Raises BuildError for bad inputs and VerifyError (pspnet.build_model.verify) when `verify`
    finds the exported models off by more than the tolerance.
    """
    from pspnet.build_model.artifacts import (
        check_atc_choices,
        normalise_batch_sizes,
        normalise_input_size,
    )
    from pspnet.build_model.rewrites import rewrite_core

    sizes = normalise_batch_sizes(batch_sizes)        # fail fast, before loading anything
    size = normalise_input_size(input_size)
    check_atc_choices(atc_opset, om_precision)
    network = load_network(config, checkpoint, trust_checkpoint=trust_checkpoint)
    core, rewrites = rewrite_core(network.core, size, psp_rewrite=psp_rewrite,
                                  fold_bn=fold_bn)
    manifest = write_artifacts(
        core, Path(out_dir), input_size=size, batch_sizes=sizes, head=head, rewrites=rewrites,
        mean=network.mean, std=network.std, num_classes=network.num_classes,
        class_names=network.class_names, palette=network.palette,
        source=network.source, simplify=simplify, soc_version=soc_version,
        run_atc=run_atc, torch_program=torch_program, onnx=onnx,
        align_corners=network.align_corners, network=network.description,
        atc_opset=atc_opset, om_precision=om_precision,
    )
    if verify or verify_all:
        from pspnet.build_model.verify import check, verify_model_dir

        report = verify_model_dir(Path(out_dir), network.segmentor,
                                  batch_sizes=(None if verify_all else sizes[:1]) if onnx
                                  else ())
        check(report)
    return manifest
