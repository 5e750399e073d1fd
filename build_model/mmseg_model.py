"""mmseg config -> inference network: resolve the config, build it, cut out the core.

The core is the real mmseg modules (backbone, neck if any, decode head) in eval mode, with
SyncBN reverted to BatchNorm and the auxiliary head dropped: it maps normalised float32
N x 3 x H x W to logits at the decoder's resolution (1/8 for D8 backbones), which is what
`EncoderDecoder._forward` gives before any resize. Imports mmseg lazily, through the shim.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pspnet.build_model.errors import BuildError

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


def import_mmseg() -> Any:
    """Import mmseg (installing the mmcv.ops shim when needed) and register its modules."""
    from pspnet.build_model import mmseg_shim
    mmseg_shim.install()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mmcv-lite warns about ops PSPNet does not use
        import mmseg
        import mmseg.models  # noqa: F401 - registers the model classes
        from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    return mmseg


def resolve_config(name_or_path: str | Path) -> Path:
    """An existing config file, or the name of a config shipped with mmseg or this package.

    Names are looked up (with or without `.py`) in mmseg's `.mim/configs` tree and in
    `build_model/configs`.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if len(path.parts) > 1 or path.exists():
        raise BuildError(f"config file not found: {path}")
    stem = path.name.removesuffix(".py")
    for root in (PACKAGE_CONFIGS, _mmseg_config_root()):
        if root is not None and root.is_dir():
            hits = sorted(p for p in root.rglob(f"{stem}.py") if "_base_" not in p.parts)
            if hits:
                return hits[0]
    raise BuildError(f"unknown config {str(name_or_path)!r}: not a file, nor a config name "
                     f"shipped with mmseg (e.g. pspnet_r50-d8_4xb4-20k_voc12aug-512x512)")


def _mmseg_config_root() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("mmseg")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / ".mim" / "configs"


def load_config(path: Path) -> Any:
    """mmengine Config from a file; a config that does not parse is the user's error."""
    from mmengine.config import Config

    try:
        return Config.fromfile(str(path))
    except Exception as exc:
        raise BuildError(f"cannot read config {path}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def build_segmentor(cfg: Any, *, keep_auxiliary: bool = False) -> nn.Module:
    """The EncoderDecoder the config describes, random weights, BN instead of SyncBN, eval.

    The auxiliary head is dropped unless `keep_auxiliary` (used only to write checkpoints in
    the official layout); no pretrained backbone is fetched.
    """
    import_mmseg()
    from mmengine.model import revert_sync_batchnorm
    from mmseg.registry import MODELS

    model_cfg = cfg.model.copy()
    model_cfg.pretrained = None
    if "init_cfg" in model_cfg.get("backbone", {}):
        model_cfg.backbone.init_cfg = None
    if not keep_auxiliary:
        model_cfg.auxiliary_head = None
    model_cfg.train_cfg = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes from mmseg's loss builders
        model = MODELS.build(model_cfg)
    return revert_sync_batchnorm(model).eval()


def normalisation(cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """RGB mean and std from the config's data_preprocessor."""
    pre = cfg.model.get("data_preprocessor") or cfg.get("data_preprocessor") or {}
    if "mean" not in pre or "std" not in pre:
        raise BuildError("the config's data_preprocessor has no mean/std")
    mean, std = tuple(map(float, pre["mean"])), tuple(map(float, pre["std"]))
    if len(mean) != 3 or len(std) != 3:
        raise BuildError(f"expected 3-channel mean/std, got {mean} / {std}")
    return mean, std


def num_classes(segmentor: nn.Module) -> int:
    return int(segmentor.decode_head.num_classes)


def unsupported(segmentor: nn.Module) -> str | None:
    """Why the daemon cannot serve this segmentor as built (backbone, neck, one decode
    head whose logits give a class per channel), in one line; None if it can."""
    head = segmentor.decode_head
    if isinstance(head, nn.ModuleList):
        names = " -> ".join(type(h).__name__ for h in head)
        return (f"{type(segmentor).__name__} with cascaded decode heads ({names}) is not "
                "supported: the daemon runs backbone (+ neck) + one decode head, as "
                "EncoderDecoder does (OCRNet and PointRend are cascades)")
    classes, channels = int(head.num_classes), int(getattr(head, "out_channels", 0) or 0)
    if channels and channels != classes:
        return (f"a decode head with out_channels={channels} for {classes} classes (a "
                "sigmoid head thresholded into two classes) is not supported: the daemon "
                "takes the argmax of one logit per class; train or convert the head with "
                f"out_channels={classes}")
    return None


def config_palette(cfg: Any, count: int) -> tuple[tuple[int, int, int], ...] | None:
    """The colours of the config's dataset (its metainfo or the dataset class), if one
    per class: the masks then look as that dataset's tools draw them."""
    for palette in _dataset_metainfo(cfg, "palette"):
        if len(palette) == count and all(
                len(c) == 3 and all(0 <= int(v) <= 255 for v in c) for c in palette):
            return tuple((int(c[0]), int(c[1]), int(c[2])) for c in palette)
    return None


def test_mode(cfg: Any) -> str | None:
    """A note when the config's test pipeline is not what the daemon runs (one whole
    letterboxed input per image): mmseg's 'slide' mode runs overlapping windows."""
    test_cfg = cfg.model.get("test_cfg") or {}
    if test_cfg.get("mode", "whole") == "slide":
        return (f"the config tests in 'slide' mode (crop {test_cfg.get('crop_size')}, stride "
                f"{test_cfg.get('stride')}); the daemon runs each image whole, letterboxed "
                "into --input-size, so its masks are those of whole-image inference")
    return None


def config_class_names(cfg: Any, count: int) -> tuple[str, ...] | None:
    """Class names from the config's dataset (metainfo or the dataset class), if any fit."""
    for classes in _dataset_metainfo(cfg, "classes"):
        if len(classes) == count:
            return tuple(map(str, classes))
    return None


def _dataset_metainfo(cfg: Any, key: str) -> Iterator[Any]:
    """`key` of each dataloader's dataset: its metainfo's, else its dataset class's."""
    from mmseg.registry import DATASETS

    for loader in ("test_dataloader", "val_dataloader", "train_dataloader"):
        dataset = (cfg.get(loader) or {}).get("dataset") or {}
        value = (dataset.get("metainfo") or {}).get(key)
        if value is None and dataset.get("type"):
            value = getattr(DATASETS.get(dataset["type"]), "METAINFO", {}).get(key)
        if value is not None:
            yield value


class SegmentorCore(nn.Module):
    """backbone (+ neck) + decode head: `EncoderDecoder._forward` as a plain module."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.backbone = segmentor.backbone
        self.neck = segmentor.neck if getattr(segmentor, "with_neck", False) else None
        self.decode_head = segmentor.decode_head
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if self.neck is not None:
            features = self.neck(features)
        return self.decode_head(features)
