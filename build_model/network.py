"""Config + checkpoint -> the loaded inference network and what the manifest says about it.

The one place that turns user inputs into a ready mmseg model, shared by `build`, `--verify`
and the tests, so they all judge the same network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pspnet.build_model import checkpoint as ckpt
from pspnet.build_model import mmseg_model
from pspnet.build_model.errors import BuildError
from pspnet.model.manifest import VOC_CLASSES, voc_palette

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Network:
    segmentor: nn.Module          # the mmseg EncoderDecoder, eval, BN, no auxiliary head
    core: nn.Module               # backbone (+ neck) + decode head: normalised x -> logits
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    class_names: tuple[str, ...]
    source: dict[str, Any]        # for the manifest: config, checkpoint, sha256, versions
    align_corners: bool = False   # the decode head's: how its logits are resized
    palette: tuple[tuple[int, int, int], ...] = ()   # the masks' colours, one per class
    description: dict[str, Any] = field(default_factory=dict)  # manifest.network


def load_network(
    config: str | Path, checkpoint: str | Path, *, trust_checkpoint: bool = False
) -> Network:
    """Resolve and build the config, load the checkpoint into it (see checkpoint.py)."""
    ckpt.check_checkpoint_path(checkpoint)
    config_path = mmseg_model.resolve_config(config)
    mmseg = mmseg_model.import_mmseg()
    cfg = mmseg_model.load_config(config_path)
    mean, std = mmseg_model.normalisation(cfg)
    segmentor = mmseg_model.build_segmentor(cfg)
    problem = mmseg_model.unsupported(segmentor)
    if problem is not None:
        raise BuildError(problem)
    weights = ckpt.read_checkpoint(checkpoint, trust=trust_checkpoint)
    report = ckpt.load_into(segmentor, weights)
    segmentor.eval()
    count = mmseg_model.num_classes(segmentor)
    # Logged only now: a user error above is then the one line the CLI prints.
    _log.info("built %s (%d classes, %.2f M parameters without the auxiliary head)",
              config_path, count, sum(p.numel() for p in segmentor.parameters()) / 1e6)
    _log.info("%s", ckpt.describe(Path(checkpoint), weights))
    ckpt.log_report(report)
    note = mmseg_model.test_mode(cfg)
    if note is not None:
        _log.warning("%s", note)
    return Network(
        segmentor=segmentor, core=mmseg_model.SegmentorCore(segmentor), mean=mean, std=std,
        num_classes=count, class_names=_class_names(cfg, weights.meta, count),
        palette=_palette(cfg, count),
        source=_source(config, config_path, checkpoint, weights, report, mmseg.__version__),
        align_corners=bool(getattr(segmentor.decode_head, "align_corners", False)),
        description=describe_network(cfg, segmentor),
    )


def describe_network(cfg: Any, segmentor: nn.Module) -> dict[str, Any]:
    """manifest.network: what a reader needs to know which network this is."""
    backbone = str(cfg.model.backbone.type)
    head = str(cfg.model.decode_head.type)
    family = {"PSPHead": "PSPNet", "ASPPHead": "DeepLabV3",
              "DeepLabV3MobileHead": "DeepLabV3"}.get(head, head)
    return {
        "name": str(cfg.get("network_name") or f"{family} {backbone}"),
        "family": family, "backbone": backbone, "decode_head": head,
        "parameters": int(sum(p.numel() for p in segmentor.parameters())),
    }


def _class_names(cfg: Any, meta: dict[str, Any], count: int) -> tuple[str, ...]:
    """VOC names for 21 classes; else the config's dataset, the checkpoint's, or class_i."""
    if count == len(VOC_CLASSES):
        return VOC_CLASSES
    names = mmseg_model.config_class_names(cfg, count)
    if names is None:
        dataset_meta = meta.get("dataset_meta") or {}
        classes = dataset_meta.get("classes") or meta.get("CLASSES")
        if classes is not None and len(classes) == count:
            names = tuple(map(str, classes))
    return names or tuple(f"class_{i}" for i in range(count))


def _palette(cfg: Any, count: int) -> tuple[tuple[int, int, int], ...]:
    """VOC's colours for 21 classes (and where the dataset gives none); else the
    config's dataset's (Cityscapes, ADE20K...)."""
    if count != len(VOC_CLASSES):
        palette = mmseg_model.config_palette(cfg, count)
        if palette is not None:
            return palette
    return tuple(tuple(c) for c in voc_palette(count))


def _source(config, config_path, checkpoint, weights, report, mmseg_version) -> dict[str, Any]:
    import onnx
    import torch

    return {
        "config": str(config),
        "config_path": str(config_path),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": weights.sha256,
        "checkpoint_missing_keys": len(report.missing),
        "checkpoint_unexpected_keys": len(report.unexpected),
        "checkpoint_dropped_keys": len(report.dropped),
        "mmseg_version": mmseg_version,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
    }
