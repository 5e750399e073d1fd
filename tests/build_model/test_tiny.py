"""`pspnet build` on the tiny mmseg PSPNet: artifacts, manifest, parity with eager mmseg.

Built once per session (tests/conftest.py's `mmseg_models`, through tests.model_fixtures:
the build function the CLI calls), with calibrated weights; parity is judged on photos the
calibration never saw.
"""

from __future__ import annotations

import json
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pspnet.build_model.checkpoint import sha256_file
from pspnet.build_model.inputs import letterboxed_batch, normalised_batch
from pspnet.build_model.network import load_network
from pspnet.build_model.verify import LABEL_AGREEMENT, LOGIT_TOLERANCE, verify_model_dir
from pspnet.model.manifest import VOC_CLASSES, Manifest, voc_palette
from tests.model_fixtures import BATCH_SIZES, INPUT_SIZE, tiny_checkpoint
from tests.photos import sample_photos

HEADS = ("logits", "labels")


@pytest.fixture(scope="module")
def network(mmseg_models):
    source = Manifest.read(mmseg_models["logits"]).source
    return load_network(source["config"], source["checkpoint"])


@pytest.mark.parametrize("head", HEADS)
def test_manifest(mmseg_models, head):
    m = Manifest.read(mmseg_models[head])
    assert m.input_size == (INPUT_SIZE, INPUT_SIZE)
    assert m.head == head
    assert m.num_classes == 21 and m.class_names == VOC_CLASSES
    assert [list(c) for c in m.palette] == voc_palette(21)
    assert m.mean == (123.675, 116.28, 103.53) and m.std == (58.395, 57.12, 57.375)
    assert m.logits_size == (INPUT_SIZE // 8, INPUT_SIZE // 8)
    assert m.batch_sizes == list(BATCH_SIZES)
    assert m.opset == 18
    assert (m.atc_opset, m.om_precision, m.om_compute_precision) == (13, "fp16", "fp16")
    assert m.torch_program == "pspnet_core.pt2"
    for n in BATCH_SIZES:
        assert m.models[n].onnx == f"pspnet_bs{n}.onnx"
        assert m.models[n].atc_onnx == f"pspnet_bs{n}_opset13.onnx"
        assert m.models[n].atc == f"pspnet_bs{n}.atc.sh"
        assert m.models[n].om is None                     # no atc on this machine
    src = m.source
    assert src["checkpoint_sha256"] == sha256_file(src["checkpoint"])
    assert src["checkpoint_dropped_keys"] > 0               # the auxiliary head
    assert src["checkpoint_missing_keys"] == 0 and src["checkpoint_unexpected_keys"] == 0
    assert src["torch_program_batch"] == "dynamic"
    for key in ("config", "mmseg_version", "torch_version", "onnx_version"):
        assert src[key]
    raw = json.loads((mmseg_models[head] / "manifest.json").read_text())
    assert set(raw["models"]) == {str(n) for n in BATCH_SIZES}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize(("name", "opset"), [("pspnet_bs{n}.onnx", 18),
                                             ("pspnet_bs{n}_opset13.onnx", 13)])
def test_onnx_models_are_static_single_files(mmseg_models, head, name, opset):
    out_type = onnx.TensorProto.FLOAT if head == "logits" else onnx.TensorProto.UINT8
    for n in BATCH_SIZES:
        path = mmseg_models[head] / name.format(n=n)
        assert not path.with_name(path.name + ".data").exists()
        model = onnx.load(str(path))
        assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
        ins = {i.name: i.type.tensor_type for i in model.graph.input}
        assert [d.dim_value for d in ins["image"].shape.dim] == [n, INPUT_SIZE, INPUT_SIZE, 3]
        assert ins["image"].elem_type == onnx.TensorProto.UINT8
        assert [d.dim_value for d in ins["box"].shape.dim] == [n, 4]
        assert ins["box"].elem_type == onnx.TensorProto.INT32
        (out,) = model.graph.output
        assert out.name == head and out.type.tensor_type.elem_type == out_type
        dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
        assert dims == ([n, 21, 16, 16] if head == "logits" else [n, INPUT_SIZE, INPUT_SIZE])


def test_atc_scripts(mmseg_models):
    for n in BATCH_SIZES:
        script = mmseg_models["labels"] / f"pspnet_bs{n}.atc.sh"
        text = script.read_text()
        assert script.stat().st_mode & stat.S_IXUSR
        assert (f"atc --framework=5 --model=pspnet_bs{n}_opset13.onnx "
                f"--output=pspnet_bs{n} --input_format=ND "
                f'--input_shape="image:{n},{INPUT_SIZE},{INPUT_SIZE},3;box:{n},4" ') in text
        assert '--soc_version="${SOC}" --precision_mode=force_fp16 --log=error\n' in text
        assert f"\nchmod 0640 pspnet_bs{n}.om\n" in text
        assert f"# pspnet_bs{n}_opset13.onnx is ONNX opset 13" in text
        assert "# The OM computes in fp16: --precision_mode=force_fp16" in text
        assert 'SOC="${SOC:-Ascend310P3}"' in text
        assert "--input_fp16_nodes" not in text       # uint8 in: normalised on the device


@pytest.mark.parametrize("head", HEADS)
def test_parity_with_eager_mmseg(mmseg_models, network, head):
    photos = [rgb for _, rgb in sample_photos()]
    results = verify_model_dir(mmseg_models[head], network.segmentor, photos)
    for r in results:
        print(r.line())
        assert r.images == len(photos)
        assert r.label_agreement >= LABEL_AGREEMENT, r.line()
        if r.max_logit_diff is not None:
            assert r.max_logit_diff <= LOGIT_TOLERANCE, r.line()
    checked = {r.artifact for r in results}
    assert checked == {f"pspnet_bs{n}{suffix}.onnx" for n in BATCH_SIZES
                       for suffix in ("", "_opset13")} | {"pspnet_core.pt2"}


def test_predictions_are_not_degenerate(mmseg_models):
    photos = [rgb for _, rgb in sample_photos()]
    images, boxes = letterboxed_batch(photos, (INPUT_SIZE, INPUT_SIZE))
    session = ort.InferenceSession(str(mmseg_models["labels"] / "pspnet_bs1.onnx"),
                                   providers=["CPUExecutionProvider"])
    counts, used = [], set()
    for image, (top, left, h, w) in zip(images, boxes, strict=True):
        labels = session.run(None, {"image": image[None], "box": np.array([[top, left, h, w]],
                                                                            np.int32)})[0][0]
        valid = labels[top:top + h, left:left + w]
        counts.append(len(np.unique(valid)))
        used |= set(np.unique(valid).tolist())
    print("distinct classes per photo:", counts, "overall:", len(used))
    assert sum(c >= 5 for c in counts) >= 0.8 * len(counts)
    assert len(used) >= 15


def test_padding_bytes_are_ignored(mmseg_models):
    photos = [rgb for _, rgb in sample_photos()][:4]
    images, boxes = letterboxed_batch(photos, (INPUT_SIZE, INPUT_SIZE))
    noisy = images.copy()
    rng = np.random.default_rng(0)
    for i, (top, left, h, w) in enumerate(boxes):
        inside = noisy[i, top:top + h, left:left + w].copy()
        noisy[i] = rng.integers(0, 256, noisy[i].shape, dtype=np.uint8)
        noisy[i, top:top + h, left:left + w] = inside
    session = ort.InferenceSession(str(mmseg_models["logits"] / "pspnet_bs4.onnx"),
                                   providers=["CPUExecutionProvider"])
    clean = session.run(None, {"image": images, "box": boxes})[0]
    dirty = session.run(None, {"image": noisy, "box": boxes})[0]
    np.testing.assert_array_equal(clean, dirty)


def test_torch_program_has_dynamic_batch(mmseg_models, network):
    program = torch.export.load(str(mmseg_models["logits"] / "pspnet_core.pt2")).module()
    photos = [rgb for _, rgb in sample_photos()]
    images, boxes = letterboxed_batch(photos, (INPUT_SIZE, INPUT_SIZE))
    x = normalised_batch(images, boxes, network.mean, network.std)
    with torch.no_grad():
        for n in (1, 3, len(photos)):
            got, want = program(x[:n]), network.core(x[:n])
            assert got.shape == (n, 21, 16, 16)
            assert float((got - want).abs().max()) <= LOGIT_TOLERANCE
        assert program(x[:1].expand(64, -1, -1, -1)).shape == (64, 21, 16, 16)


def test_calibrated_checkpoint_is_official_format(mmseg_models):
    path = tiny_checkpoint(mmseg_models["logits"].parent)
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    assert set(ckpt) == {"meta", "state_dict"}
    state = ckpt["state_dict"]
    assert any(k.startswith("auxiliary_head.") for k in state)
    assert state["decode_head.conv_seg.weight"].shape == (21, 32, 1, 1)
    assert ckpt["meta"]["mmseg_version"] == "1.2.2"
    counts = ckpt["meta"]["calibration"]["classes_per_photo"]
    assert sum(c >= 5 for c in counts) >= 0.8 * len(counts)
