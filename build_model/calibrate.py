"""Non-degenerate weights for any PSPNet config, without a trained checkpoint.

Why: tests, demos and benchmarks need a model whose predictions look like a segmentation
(several classes per photo, spatially coherent), not the constant map that random weights
give. Recipe: random init -> BatchNorm running statistics measured on real photos (train
mode, momentum=None, i.e. the plain average) -> conv_seg set from the principal directions
of the decoder features (the input of conv_seg) on those photos, so each class is one signed,
whitened principal direction and class 0 wins where no direction is strong. The result is
saved in the official mmseg layout, `{"meta": ..., "state_dict": ...}`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pspnet.build_model.inputs import box_masks, letterboxed_batch, normalised_batch

LOGIT_SCALE = 2.0        # logits = scale x whitened projection: a few units, like a real net
BACKGROUND_LEVEL = 1.2   # class 0 wins where every |projection| is below this (whitened units)
RESIDUAL_GAIN = 0.3      # gamma of each residual branch's last BN, as in a trained ResNet
_log = logging.getLogger(__name__)


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions inside the block (restored after)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def calibrate_segmentor(
    segmentor: nn.Module,
    photos: Sequence[np.ndarray],
    *,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    device: str = "cpu",
) -> list[int]:
    """Calibrate BN statistics and conv_seg in place; return distinct classes per photo.

    `device` runs the forward passes there (R50 at 500x500: seconds on a GPU, minutes on
    a CPU); the PCA runs on the CPU either way, and the segmentor ends on the CPU.
    """
    from pspnet.build_model.mmseg_model import SegmentorCore

    dev = torch.device(device)
    images, boxes = letterboxed_batch(photos, input_size)
    x = normalised_batch(images, boxes, mean, std).to(dev)
    core = SegmentorCore(segmentor).to(dev)
    with strict_fp32():
        _damp_residual_branches(core)
        _calibrate_batchnorm(core, x)
        features = _conv_seg_input(core, x).cpu()
        valid = _valid_at(boxes, input_size, features.shape[2:])
        conv_seg = core.decode_head.conv_seg
        weight, bias = _principal_classifier(features, valid, conv_seg.out_channels, seed)
        with torch.no_grad():
            conv_seg.weight.copy_(weight.view_as(conv_seg.weight).to(dev))
            conv_seg.bias.copy_(bias.to(dev))
            labels = core(x).argmax(1).cpu().numpy()
    counts = [len(np.unique(lab[m])) for lab, m in zip(labels, valid.numpy(), strict=True)]
    _log.info("calibrated on %d photos at %dx%d on %s: %s distinct classes per photo",
              len(photos), *input_size, device, counts)
    segmentor.cpu().eval()
    return counts


def make_calibrated_checkpoint(
    config: str | Path,
    out_path: str | Path,
    *,
    input_size: int = 128,
    photos: Sequence[np.ndarray] | None = None,
    max_photos: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Build `config` with random weights, calibrate it, save an official-format checkpoint.

    `photos` default to the package's sample images; `max_photos` limits them (calibrating
    R50 at 500x500 costs seconds per photo). The auxiliary head is kept (random) so the file
    has the same keys as a real mmseg checkpoint.
    """
    from pspnet.build_model import mmseg_model
    from pspnet.build_model.samples import sample_images

    mmseg = mmseg_model.import_mmseg()
    cfg = mmseg_model.load_config(mmseg_model.resolve_config(config))
    mean, std = mmseg_model.normalisation(cfg)
    torch.manual_seed(seed)
    segmentor = mmseg_model.build_segmentor(cfg, keep_auxiliary=True)
    if photos is None:
        photos = [rgb for _, rgb in sample_images()]
    photos = list(photos)[:max_photos]
    size = (input_size, input_size)
    counts = calibrate_segmentor(segmentor, photos, input_size=size, mean=mean, std=std,
                                 seed=seed, device=device)
    meta = {
        "mmseg_version": mmseg.__version__,
        "config": str(config),
        "note": "random init + BN statistics and conv_seg calibrated on photos "
                "(pspnet.build_model.calibrate); not trained",
        "calibration": {"input_size": input_size, "photos": len(photos), "seed": seed,
                        "classes_per_photo": counts, "device": device},
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in segmentor.state_dict().items()}
    torch.save({"meta": meta, "state_dict": state}, str(out_path))
    return out_path


def _damp_residual_branches(core: nn.Module) -> None:
    """Scale down the last BN of every ResNet block (BasicBlock norm2, Bottleneck norm3).

    With unit gammas every block adds a unit-variance branch, so a random ResNet-50's
    residual stream grows with depth and float32 rounding grows with it (logit errors near
    5e-4 against float64); trained ResNets keep these gammas small. Other backbones: no-op.
    """
    with torch.no_grad():
        for module in core.modules():
            if hasattr(module, "downsample") and hasattr(module, "conv1"):
                last = getattr(module, "norm3", None) or getattr(module, "norm2", None)
                if isinstance(last, nn.modules.batchnorm._BatchNorm) and last.affine:
                    last.weight.fill_(RESIDUAL_GAIN)


def _calibrate_batchnorm(core: nn.Module, x: torch.Tensor) -> None:
    """Running stats := statistics of `x`'s activations, layer by layer (one batch)."""
    norms = [m for m in core.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    core.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        core(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    core.eval()


def _conv_seg_input(core: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured = []
    hook = core.decode_head.conv_seg.register_forward_pre_hook(
        lambda _module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            core(x)
    finally:
        hook.remove()
    return captured[0]


def _valid_at(boxes: np.ndarray, input_size, feature_size) -> torch.Tensor:
    """The boxes at the feature resolution (nearest), so padding does not steer the PCA."""
    masks = torch.from_numpy(box_masks(boxes, input_size)).float().unsqueeze(1)
    small = nn.functional.interpolate(masks, size=tuple(feature_size), mode="nearest")
    return small.squeeze(1) > 0.5


def _principal_classifier(
    features: torch.Tensor, valid: torch.Tensor, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """conv_seg weight (K x C) and bias (K): class 2j+1 / 2j+2 = +/- whitened component j."""
    channels = features.shape[1]
    pixels = features.permute(0, 2, 3, 1)[valid].double()       # P x C
    centre = pixels.mean(0)
    _, singular, directions = torch.linalg.svd(pixels - centre, full_matrices=False)
    spread = singular / math.sqrt(max(len(pixels) - 1, 1))
    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(num_classes, channels, dtype=torch.float64)
    bias = torch.zeros(num_classes, dtype=torch.float64)
    bias[0] = LOGIT_SCALE * BACKGROUND_LEVEL
    for k in range(1, num_classes):
        j, sign = (k - 1) // 2, 1.0 if (k - 1) % 2 == 0 else -1.0
        if j < len(spread) and spread[j] > 1e-6:
            w = directions[j] / spread[j]
        else:  # fewer informative directions than classes: a random one, unit scale
            w = torch.randn(channels, generator=generator, dtype=torch.float64)
            w = w / (w.norm() * (pixels - centre).matmul(w / w.norm()).std().clamp_min(1e-6))
        weight[k] = sign * LOGIT_SCALE * w
        bias[k] = -weight[k].dot(centre)
    return weight.float(), bias.float()
