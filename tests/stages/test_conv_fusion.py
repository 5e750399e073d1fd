"""The torch backend's fused-convolution path (`fused_conv`): which chains it fuses, and
that the rewritten graph computes what the program did.

The cuDNN ops run only on CUDA; here the graph surgery runs with reference ops (plain
conv + add + ReLU, what the cuDNN ops compute), on small blocks and on the tiny mmseg
PSPNet's torch program as `pspnet build` writes it (BN folded, PSP rewrite). The CUDA
cases skip without a device, like tests/stages/test_backends.py's; the device script runs them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pspnet.stages.backends import NUM_SLOTS, open_backend
from pspnet.stages.backends.conv_fusion import (
    cudnn_eligible,
    fuse_conv_relu,
    fused_copy,
    reference_conv_add_relu,
    reference_conv_relu,
)
from tests.tiny_model import random_batch

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
REFERENCE = {"conv_relu": reference_conv_relu, "conv_add_relu": reference_conv_add_relu}
SIZE = 64
BATCH = 4


def program_module(module: nn.Module, x: torch.Tensor, tmp_path) -> torch.fx.GraphModule:
    """`module` as the torch backend gets it: torch.export (dynamic batch), saved, loaded,
    unlifted."""
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(module.eval(), (x,), dynamic_shapes=({0: batch},))
    path = tmp_path / "program.pt2"
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


class Blocks(nn.Module):
    """Chains that fuse (conv+ReLU, conv+add+ReLU both ways round) and ones that must not."""

    def __init__(self) -> None:
        super().__init__()
        c = 16
        self.stem = nn.Conv2d(3, c, 3, padding=1)                   # 3 channels: not aligned
        self.a = nn.Conv2d(c, c, 3, padding=1)                      # -> relu_: fuse
        self.b = nn.Conv2d(c, c, 1)                                 # -> add_(b, x) -> relu
        self.down = nn.Conv2d(c, c, 1, bias=False)                  # the add's operand: no
        self.d = nn.Conv2d(c, c, 3, padding=1)                      # -> add(x, d) -> relu
        self.twice = nn.Conv2d(c, c, 1)                             # read twice: no
        self.bias_add = nn.Conv2d(c, c, 1)                          # add broadcasts: no
        self.grouped = nn.Conv2d(c, c, 3, padding=1, groups=2)      # grouped: no
        self.into = nn.Conv2d(c, c, 1)                              # add_(other, conv): no
        self.offset = nn.Parameter(torch.randn(1, c, 1, 1))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.relu(self.a(x))
        y = self.b(x)
        y += self.down(x)
        x = self.relu(y)
        x = torch.relu(x + self.d(x))
        t = self.twice(x)
        x = torch.relu(t) + t
        x = torch.relu(self.bias_add(x) + self.offset)
        x = torch.relu(self.grouped(x))
        other = x * 0.5
        other += self.into(x)
        return torch.relu(other)


def test_fuses_exactly_the_safe_chains(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    gm = program_module(Blocks(), x, tmp_path)
    want = gm(x)
    fused, report = fused_copy(gm, **REFERENCE)
    print(report.line())
    assert (report.conv_relu, report.conv_add_relu, report.convs) == (1, 2, 9)
    assert report.skipped == {
        "channels not multiples of 8": 1, "grouped": 1, "output read more than once": 1,
        "add broadcasts": 1, "in-place add into another tensor": 1,
        "not followed by ReLU or add": 1,               # down: the fused add's operand
    }
    targets = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert targets.count(reference_conv_relu) == 1
    assert targets.count(reference_conv_add_relu) == 2
    for batch in (2, 5):                                  # the batch stays dynamic
        xb = torch.randn(batch, 3, 12, 12)
        torch.testing.assert_close(fused(xb), gm(xb), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
    assert not any(n.target in REFERENCE.values() for n in gm.graph.nodes)   # gm unchanged


def test_cudnn_eligibility():
    assert cudnn_eligible(torch.empty(16, 8, 3, 3), 1) is None
    assert cudnn_eligible(torch.empty(16, 3, 3, 3), 1) == "channels not multiples of 8"
    assert cudnn_eligible(torch.empty(12, 8, 1, 1), 1) == "channels not multiples of 8"
    assert cudnn_eligible(torch.empty(16, 8, 3, 3), 2) == "grouped"
    assert cudnn_eligible(None, 1) == "weight not a 4-d parameter"


def test_reference_ops_are_what_the_graph_did():
    """The reference semantics: relu(conv(x) + bias + alpha z), alpha 1 in the rewrite."""
    torch.manual_seed(1)
    x, w, b, z = (torch.randn(2, 8, 6, 6), torch.randn(8, 8, 3, 3), torch.randn(8),
                  torch.randn(2, 8, 6, 6))
    conv = torch.nn.functional.conv2d(x, w, b, 1, 1)
    args = ([1, 1], [1, 1], [1, 1], 1)
    torch.testing.assert_close(reference_conv_relu(x, w, b, *args), torch.relu(conv))
    torch.testing.assert_close(reference_conv_add_relu(x, w, z, 1.0, b, *args),
                               torch.relu(conv + z))
    torch.testing.assert_close(reference_conv_add_relu(x, w, z, 2.0, None, *args),
                               torch.relu(conv - b.view(1, -1, 1, 1) + 2 * z))


@pytest.fixture(scope="module")
def psp_dir(tmp_path_factory):
    """The tiny mmseg PSPNet as `pspnet build` writes it for the torch backend (BN folded,
    PSP rewrite; --no-onnx, so it builds where onnxsim is missing, e.g. the GPU host)."""
    from tests.model_fixtures import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("fusion"), head="labels",
                          batch_sizes=(BATCH,), input_size=SIZE, onnx=False)


def test_fusion_on_the_built_pspnet(psp_dir):
    """Every BasicBlock's second conv + residual + ReLU, every aligned conv + ReLU, and the
    rewritten PSP bottleneck's conv + pyramid sum + ReLU."""
    program = torch.export.load(str(psp_dir / "pspnet_core.pt2")).module()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    want = program(x)
    report = fuse_conv_relu(program, **REFERENCE)
    print(report.line())
    # ResNet-18 (stem 16): 3 stem convs (the first has 3 input channels), 8 blocks of
    # conv+ReLU and conv+add+ReLU, 3 downsample convs (the adds' other operand), 4 pyramid
    # convs + ReLU, the bottleneck's conv + pyramid sum + ReLU, the classifier
    assert report.convs == 3 + 16 + 3 + 4 + 1 + 1
    assert report.conv_add_relu == 8 + 1
    assert report.conv_relu == 2 + 8 + 4
    torch.testing.assert_close(program(x), want, rtol=1e-5, atol=1e-5)


def test_cpu_backend_options(psp_dir):
    with pytest.raises(ValueError, match="fused_conv=1 needs a CUDA device"):
        open_backend("torch", psp_dir, BATCH, options={"fused_conv": "1"})
    with pytest.raises(ValueError, match="expected 0/1"):
        open_backend("torch", psp_dir, BATCH, options={"fused_conv": "maybe"})
    with pytest.raises(ValueError, match="do not combine"):
        open_backend("torch", psp_dir, BATCH, options={"fused_conv": "1", "compile": "1"})
    images, boxes = random_batch(BATCH, (SIZE, SIZE), seed=3)
    outs = []
    for options in ({}, {"fused_conv": "auto"}, {"fused_conv": "0"}):
        with open_backend("torch", psp_dir, BATCH, options=options) as backend:
            assert backend.fusion["active"] is False
            if options.get("fused_conv") == "auto":
                assert backend.fusion["why"].startswith("CPU")
            backend.upload(0, images, boxes)
            outs.append(backend.execute(0))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


@needs_cuda
@pytest.mark.parametrize("precision,options", [
    ("fp16", {"fused_conv": "1"}),
    ("fp16", {"fused_conv": "1", "cuda_graphs": "1"}),
    ("bf16", {"fused_conv": "1", "cuda_graphs": "1"}),
    ("fp16", {"fused_conv": "auto", "cuda_graphs": "1"}),
    ("fp32", {"fused_conv": "auto"}),
])
def test_cuda_fused_matches_plain(psp_dir, precision, options):
    """The cuDNN fused graph against the same backend without it (labels head)."""
    batches = [random_batch(BATCH, (SIZE, SIZE), seed=400 + k) for k in range(4)]

    def run(opts):
        with open_backend("torch", psp_dir, BATCH, device="cuda:0", precision=precision,
                          options=opts) as backend:
            outs = []
            for k, (images, boxes) in enumerate(batches):
                backend.upload(k % NUM_SLOTS, images, boxes)
                outs.append(backend.execute(k % NUM_SLOTS))
            return outs, copy.deepcopy(backend.fusion)

    plain, _ = run({k: v for k, v in options.items() if k != "fused_conv"})
    fused, fusion = run(options)
    print(precision, options, fusion)
    assert fusion["conv_add_relu"] == 9 and fusion["conv_relu"] == 14
    if options["fused_conv"] == "1":
        assert fusion["active"] is True
    for a, b in zip(plain, fused, strict=True):
        assert np.mean(a == b) >= 0.99             # as test_backends.py's CUDA cases
