"""The build's rewrites change how the network computes, never what: BN folding and the
exact PSP bottleneck rewrite, unit by unit and through `pspnet build` on the tiny model.

The R50-D8 figures (exactness at 500x500, MACs) are in tests/build_model/test_r50.py (slow).
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from pspnet.build_model.bn_fold import find_conv_bn_pairs, fold_batchnorm
from pspnet.build_model.mmseg_model import import_mmseg
from pspnet.build_model.network import load_network
from pspnet.build_model.psp_rewrite import ExactPSPHead, psp_head_problem, rewrite_psp_head
from pspnet.build_model.rewrites import count_macs, rewrite_core
from pspnet.build_model.samples import sample_images
from pspnet.build_model.verify import verify_model_dir
from pspnet.model.manifest import Manifest
from tests.model_fixtures import BATCH_SIZES, INPUT_SIZE, tiny_checkpoint, tiny_config
from tests.photos import sample_photos

EXACT_LOGITS = 1e-4            # the bar for the rewritten artifacts in fp32


# ---- the PSP bottleneck rewrite on mmseg's own PSPHead --------------------------------

def psp_head(align_corners: bool = False, channels: int = 8, seed: int = 0) -> nn.Module:
    """A small mmseg PSPHead (in 16, branches 8 channels, 5 classes) with random BN stats."""
    import_mmseg()
    from mmseg.registry import MODELS

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # mmseg's deprecation notes (build_loss)
        head = MODELS.build(dict(type="PSPHead", in_channels=16, channels=channels,
                                 in_index=0, pool_scales=(1, 2, 3, 6), num_classes=5,
                                 dropout_ratio=0.1, norm_cfg=dict(type="BN"),
                                 align_corners=align_corners))
    randomise_batchnorm(head, seed)
    return head.eval()


def randomise_batchnorm(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)


@pytest.mark.filterwarnings("ignore:When align_corners=True")     # mmseg's resize
@pytest.mark.parametrize("size", [(63, 63), (17, 30), (5, 4)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_exact_psp_head_is_the_same_function(size, align_corners):
    """float64: equal to rounding (the identity is exact); float32: to 1e-5 relative."""
    head = psp_head(align_corners)
    x = torch.randn(2, 16, *size, generator=torch.Generator().manual_seed(1)) * 3
    exact = ExactPSPHead(head, size).eval()
    with torch.no_grad():
        want, got = head([x]), exact([x])
        head64 = copy.deepcopy(head).double()        # tap matrix made in float64 too
        want64, got64 = head64([x.double()]), ExactPSPHead(head64, size)([x.double()])
    scale = float(want.abs().max())
    print(f"{size} align_corners={align_corners}: fp32 {float((got - want).abs().max()):.2e}, "
          f"fp64 {float((got64 - want64).abs().max()):.2e} (max |logit| {scale:.1f})")
    assert got.shape == want.shape
    assert float((got64 - want64).abs().max()) <= 1e-12 * max(1.0, scale)
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, scale)


def test_exact_psp_head_general_conv_and_other_sizes():
    """A 5x5 dilated bottleneck (any same-size conv), and a feature size other than the
    one it was built for (the tap matrix is then made on the fly)."""
    head = psp_head()
    old = head.bottleneck.conv
    head.bottleneck.conv = nn.Conv2d(old.in_channels, old.out_channels, 5, padding=4,
                                     dilation=2, bias=False)
    assert psp_head_problem(head) is None
    exact = ExactPSPHead(head, (12, 12)).eval()
    with torch.no_grad():
        for size in ((12, 12), (9, 14)):
            x = torch.randn(1, 16, *size, generator=torch.Generator().manual_seed(2))
            assert torch.allclose(exact([x]), head([x]), atol=1e-5, rtol=1e-5), size


def test_psp_head_problems_are_named():
    import_mmseg()
    from mmseg.registry import MODELS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fcn = MODELS.build(dict(type="FCNHead", in_channels=16, channels=8, num_classes=5))
    assert "FCNHead" in psp_head_problem(fcn)
    head = psp_head()
    head.bottleneck.conv.padding = (0, 0)
    assert "changes the feature size" in psp_head_problem(head)
    core = nn.Module()
    core.decode_head = fcn
    record = rewrite_psp_head(core, (8, 8))
    assert record == {"applied": False, "why": psp_head_problem(fcn)}
    assert core.decode_head is fcn


# ---- BatchNorm folding -----------------------------------------------------------------

class Branchy(nn.Module):
    """Convs whose BN may fold, and three that may not (output read twice, conv called
    twice, BN after a ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.a_bn = nn.BatchNorm2d(8)
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c_bn = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 1)
        self.shared_bn = nn.BatchNorm2d(8)
        self.after_relu_bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(torch.relu(self.a_bn(self.a(x))))
        c = self.c(x)
        x = self.c_bn(c) + c                       # c is read twice: no fold
        x = self.shared_bn(self.shared(self.shared(x)))
        return self.after_relu_bn(torch.relu(x))


def test_fold_batchnorm_follows_the_data_flow():
    net = Branchy().eval()
    randomise_batchnorm(net, seed=3)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    pairs = find_conv_bn_pairs(net, x)
    assert [(p.conv, p.norm) for p in pairs] == [("a", "a_bn"), ("b.0", "b.1")]
    with torch.no_grad():
        want = net(x)
        folded = fold_batchnorm(net, x)
        got = net(x)
    assert folded == pairs
    assert isinstance(net.a_bn, nn.Identity) and isinstance(net.b[1], nn.Identity)
    assert net.b[0].bias is not None                         # a bias made for the fold
    for kept in (net.c_bn, net.shared_bn, net.after_relu_bn):
        assert isinstance(kept, nn.BatchNorm2d)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


class Untraceable(nn.Module):
    """A Python branch on a tensor's value: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return -y if float(y.mean()) > 1e9 else y


def test_a_network_export_cannot_trace_keeps_its_batchnorm():
    net = Untraceable().eval()
    core, record = rewrite_core(net, (16, 16))
    assert record["bn_fold"]["applied"] is False
    assert "torch.export could not trace" in record["bn_fold"]["why"]
    assert record["psp_bottleneck"] == {"applied": False,
                                        "why": "the network has no decode head"}
    assert isinstance(core.bn, nn.BatchNorm2d)
    assert record["self_check"]["max_abs_logit_diff"] == 0.0


def test_rewrite_core_leaves_the_original_alone_and_counts_macs(weights):
    network = load_network(*weights)
    before = {k: v.clone() for k, v in network.core.state_dict().items()}
    core, record = rewrite_core(network.core, (INPUT_SIZE, INPUT_SIZE))
    assert core is not network.core
    after = network.core.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert record["bn_fold"] == {"applied": True, "folded": 27}     # every BN of the net
    assert record["psp_bottleneck"]["applied"] and \
        record["psp_bottleneck"]["feature_size"] == [16, 16]
    macs = record["macs_per_image"]
    x = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    assert macs["network"] == count_macs(network.core, x)[0]
    assert macs["built"] == count_macs(core, x)[0] < macs["network"]
    assert record["self_check"]["max_abs_logit_diff"] <= EXACT_LOGITS
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in core.modules())
    plain, none = rewrite_core(network.core, (INPUT_SIZE, INPUT_SIZE), psp_rewrite=False,
                               fold_bn=False)
    assert plain is network.core
    assert none["bn_fold"]["applied"] is False and none["psp_bottleneck"]["applied"] is False
    assert none["macs_per_image"] == {"network": macs["network"], "built": macs["network"]}


# ---- through `pspnet build`: every artifact, against mmseg's eager model ---------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("rewrite")


@pytest.fixture(scope="module")
def weights(root):
    """(tiny config, calibrated checkpoint), shared with the other build tests."""
    checkpoint = tiny_checkpoint(root)
    return tiny_config(checkpoint.parent), checkpoint


@pytest.fixture(scope="module")
def built(root, weights, mmseg_models):
    """The default build (rewrites on: the session's model) and one with
    --no-psp-rewrite --no-bn-fold."""
    from pspnet.build_model.export import build

    rewritten = mmseg_models["logits"]
    plain = root / "plain"
    build(*weights, plain, batch_sizes=BATCH_SIZES, input_size=INPUT_SIZE, head="logits",
          run_atc=False, psp_rewrite=False, fold_bn=False)
    return {"rewritten": rewritten, "plain": plain, "network": load_network(*weights)}


def test_rewritten_artifacts_match_eager_mmseg_exactly(built):
    """Max |logit diff| <= 1e-4 (fp32) and every label the same, ONNX (and the ATC's
    opset-13 copies) and torch program, on the package's sample photos and on the tests'
    own."""
    photos = [rgb for _, rgb in sample_images()] + [rgb for _, rgb in sample_photos()]
    results = verify_model_dir(built["rewritten"], built["network"].segmentor, photos,
                               tie_tolerance=EXACT_LOGITS)
    assert {r.artifact for r in results} == {"pspnet_bs1.onnx", "pspnet_bs4.onnx",
                                             "pspnet_bs1_opset13.onnx",
                                             "pspnet_bs4_opset13.onnx", "pspnet_core.pt2"}
    for r in results:
        print("FIGURE", r.line())
        assert r.images == len(photos)
        assert r.max_logit_diff <= EXACT_LOGITS, r.line()
        assert r.decided_agreement == 1.0, r.line()
        assert r.label_agreement == 1.0, r.line()      # no float32 tie flipped here either


def test_manifest_and_artifacts_record_the_rewrites(built):
    rewritten, plain = Manifest.read(built["rewritten"]), Manifest.read(built["plain"])
    assert rewritten.rewrites["bn_fold"] == {"applied": True, "folded": 27}
    psp = rewritten.rewrites["psp_bottleneck"]
    assert psp["applied"] and psp["scales"] == [[1, 1], [2, 2], [3, 3], [6, 6]]
    assert psp["tap_matrix"] == [9 * (1 + 4 + 9 + 36), 16 * 16]
    assert plain.rewrites["bn_fold"]["why"] == "pspnet build --no-bn-fold"
    assert plain.rewrites["psp_bottleneck"]["why"] == "pspnet build --no-psp-rewrite"
    macs = rewritten.rewrites["macs_per_image"]
    assert plain.rewrites["macs_per_image"] == {"network": macs["network"],
                                                "built": macs["network"]}
    assert macs["built"] < macs["network"]
    raw = json.loads((built["rewritten"] / "manifest.json").read_text())
    assert raw["rewrites"]["psp_bottleneck"]["applied"] is True
    script = (built["rewritten"] / "pspnet_bs1.atc.sh").read_text()
    assert "exact PSP bottleneck rewrite" in script and "folded into 27" in script
    plain_script = (built["plain"] / "pspnet_bs1.atc.sh").read_text()
    assert "rewrite" not in plain_script and "folded" not in plain_script
    assert "GMAC per image." in plain_script


def test_the_graphs_carry_the_rewrites(built):
    """The torch program has no BatchNorm left and the MatMuls of the rewrite; the plain
    build keeps the upsample + concat. Same in the ONNX models."""
    def aten_ops(model_dir):
        program = torch.export.load(str(model_dir / "pspnet_core.pt2"))
        return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}

    def onnx_ops(model_dir):
        return {n.op_type for n in onnx.load(str(model_dir / "pspnet_bs1.onnx")).graph.node}

    new, old = aten_ops(built["rewritten"]), aten_ops(built["plain"])
    assert not any("batch_norm" in op for op in new) and any("batch_norm" in op for op in old)
    assert "aten.matmul.default" in new and "aten.cat.default" in new
    assert "aten.upsample_bilinear2d.vec" in old and "aten.matmul.default" not in old
    assert "MatMul" in onnx_ops(built["rewritten"]) and "MatMul" not in onnx_ops(built["plain"])


def test_plain_build_matches_too(built):
    """The switches off give mmseg's graph as before (the baseline of the CPU bench)."""
    photos = [rgb for _, rgb in sample_photos()][:3]
    for r in verify_model_dir(built["plain"], built["network"].segmentor, photos,
                              batch_sizes=(1,), tie_tolerance=EXACT_LOGITS):
        assert r.max_logit_diff <= EXACT_LOGITS and r.decided_agreement == 1.0, r.line()


def test_onnx_and_program_agree_between_builds(built):
    """Rewritten vs plain on random uint8 input: the same logits to float32 noise."""
    import onnxruntime as ort

    from tests.tiny_model import random_batch

    images, boxes = random_batch(4, (INPUT_SIZE, INPUT_SIZE), seed=5)
    outs = []
    for key in ("rewritten", "plain"):
        session = ort.InferenceSession(str(built[key] / "pspnet_bs4.onnx"),
                                       providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {"image": images, "box": boxes})[0])
    assert float(np.abs(outs[0] - outs[1]).max()) <= EXACT_LOGITS
