"""PSPNet's pyramid pooling survives export exactly: ONNX (as built) == eager PyTorch.

Adaptive average pooling at 63x63 (a 500x500 input through a D8 backbone) has bins that do
not divide the input; mmcv 1.x's export rewrite was wrong at pool scale 6 and mmdeploy's at
2 and 6 (docs: /work/shared/reference/seed-flow.md). These tests export through
`pspnet.build_model.onnx_export.export_onnx_batches` -- the function `pspnet build` uses, with
onnxsim -- and run the result in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pspnet.build_model.onnx_export import export_onnx_batches

POOL_SCALES = (1, 2, 3, 6)
SIZES = ((63, 63), (37, 50))      # the 500x500 feature map, and an odd non-square one
TOLERANCE = 1e-5


class Pyramid(nn.Module):
    """Every pool scale at both sizes: eight outputs, one export."""

    def __init__(self) -> None:
        super().__init__()
        self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in POOL_SCALES)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(pool(x) for x in (a, b) for pool in self.pools)


def _names() -> list[str]:
    return [f"pool{s}_{h}x{w}" for h, w in SIZES for s in POOL_SCALES]


def _inputs(batch: int, channels: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, channels, h, w, generator=gen) * 10 for h, w in SIZES)


@pytest.mark.parametrize("simplify", [True, False], ids=["onnxsim", "no-simplify"])
def test_adaptive_avg_pool_is_exact(tmp_path, simplify):
    batch_sizes = (1, 3) if simplify else (2,)
    paths = export_onnx_batches(
        Pyramid(), lambda n: _inputs(n), {n: tmp_path / f"pool_bs{n}.onnx" for n in batch_sizes},
        input_names=("a", "b"), output_names=_names(), simplify=simplify)
    for n, path in paths.items():
        inputs = _inputs(n, seed=n)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"a": inputs[0].numpy(), "b": inputs[1].numpy()})
        want = Pyramid()(*inputs)
        for name, g, w in zip(_names(), got, want, strict=True):
            diff = float(np.abs(g - w.numpy()).max())
            print(f"bs{n} {name}: max |diff| {diff:.2e}")
            assert g.shape == tuple(w.shape), name
            assert diff <= TOLERANCE, f"bs{n} {name}: max |diff| {diff:.2e}"


def test_mmseg_ppm_is_exact(tmp_path):
    """mmseg's own PPM module (pool -> 1x1 conv/BN/ReLU -> bilinear back) at 63x63."""
    from pspnet.build_model.mmseg_model import import_mmseg

    import_mmseg()
    from mmseg.models.decode_heads.psp_head import PPM

    torch.manual_seed(0)
    ppm = PPM(POOL_SCALES, in_channels=8, channels=4, conv_cfg=None,
              norm_cfg=dict(type="BN"), act_cfg=dict(type="ReLU"), align_corners=False).eval()
    with torch.no_grad():   # non-trivial BN statistics
        for m in ppm.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ppm = ppm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat(self.ppm(x), dim=1)

    x = torch.randn(1, 8, 63, 63) * 3
    path = export_onnx_batches(Wrapped().eval(), lambda n: (x[:n],), {1: tmp_path / "ppm.onnx"},
                               input_names=("x",), output_names=("y",))[1]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = Wrapped()(x).numpy()
    diff = float(np.abs(got - want).max())
    print(f"mmseg PPM 63x63: max |diff| {diff:.2e}")
    assert diff <= TOLERANCE


def test_the_old_rewrite_would_fail():
    """Guard the guard: mmcv 1.x's AvgPool rewrite (stride floor(63/s), kernel
    63-(s-1)*stride) is off at s=6, by far more than TOLERANCE, so the tests above can see
    that kind of error."""
    x = torch.randn(1, 3, 63, 63) * 10
    stride = 63 // 6
    old = F.avg_pool2d(x, kernel_size=63 - 5 * stride, stride=stride)
    assert float((old - F.adaptive_avg_pool2d(x, 6)).abs().max()) > 100 * TOLERANCE
