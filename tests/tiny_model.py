"""Tiny model directories for backend tests: the real export path, a network of 3 convs.

Built through `pspnet.build_model.export.write_artifacts` (the same code `pspnet build` ends in),
so the tests exercise the real manifest, ONNX and torch program, in a second or two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pspnet.model.manifest import VOC_CLASSES, voc_palette

NUM_CLASSES = len(VOC_CLASSES)
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def tiny_core(seed: int = 0, num_classes: int = NUM_CLASSES) -> nn.Module:
    """Normalised N x 3 x H x W -> logits N x C x H/4 x W/4, weights that vary the argmax."""
    generator = torch.Generator().manual_seed(seed)
    core = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, num_classes, 1),
    )
    with torch.no_grad():
        for module in core:
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * (2.0 / fan_in) ** 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(8, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(8, generator=generator) + 0.5)
    return core.eval()


def make_tiny_model_dir(
    tmp: Path,
    head: str = "logits",
    batch_sizes: tuple[int, ...] = (1, 2, 4),
    input_size: tuple[int, int] = (64, 64),
    seed: int = 0,
) -> Path:
    """Write a model directory (manifest, pspnet_bs{N}.onnx, pspnet_core.pt2) under `tmp`."""
    from pspnet.build_model.export import write_artifacts

    out = Path(tmp) / f"tiny_{head}_{input_size[0]}x{input_size[1]}"
    write_artifacts(
        tiny_core(seed), out, input_size=tuple(input_size), batch_sizes=tuple(batch_sizes),
        head=head, mean=MEAN, std=STD, num_classes=NUM_CLASSES, class_names=VOC_CLASSES,
        palette=voc_palette(NUM_CLASSES), source={"note": "tests/tiny_model.py", "seed": seed},
        run_atc=False, simplify=_have_onnxsim(),
    )
    return out


def _have_onnxsim() -> bool:
    """onnxsim is a build extra; where it is missing (the GPU host) skip simplification."""
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        return False
    return True


def random_batch(
    batch_size: int, input_size: tuple[int, int], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 NHWC images and int32 (top, left, height, width) boxes of varied sizes."""
    rng = np.random.default_rng(seed)
    height, width = input_size
    images = rng.integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8)
    boxes = np.empty((batch_size, 4), dtype=np.int32)
    for row in range(batch_size):      # test data only: the backends never loop per image
        h = int(rng.integers(height // 4, height + 1))
        w = int(rng.integers(width // 4, width + 1))
        boxes[row] = ((height - h) // 2, (width - w) // 2, h, w)
    boxes[0] = (0, 0, height, width)
    return images, boxes
