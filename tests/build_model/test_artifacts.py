"""`write_artifacts` without mmseg: ATC runs, fallbacks, argument checks (toy networks)."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from pspnet.build_model.artifacts import write_artifacts
from pspnet.build_model.errors import BuildError
from pspnet.model.manifest import VOC_CLASSES, Manifest, voc_palette

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
FAKE_ATC = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls.txt"
for arg in "$@"; do case "$arg" in --output=*) touch "${arg#--output=}SUFFIX.om";; esac; done
"""
# CANN 7's and 8's ATC documents its file as --output's name or that name with
# _<os>_<arch> added (the `--output` page of the ATC guide)
ATC_SUFFIXES = ("", "_linux_x86_64")


class ToyCore(nn.Module):
    """Normalised N x 3 x H x W -> N x 21 x H/8 x W/8, with a pyramid pool like PSPNet."""

    def __init__(self, batch_sensitive: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.head = nn.Conv2d(16, 21, 1)
        self.batch_sensitive = batch_sensitive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        p = nn.functional.interpolate(self.pool(f), size=f.shape[2:], mode="bilinear",
                                      align_corners=False)
        out = self.head(torch.cat([f, p], 1))
        if self.batch_sensitive and x.shape[0] == 2:   # Python branch on the batch size
            out = out * 2
        return out


def _write(core, out_dir, **overrides):
    kwargs = dict(input_size=64, batch_sizes=(1, 2), head="logits", mean=MEAN, std=STD,
                  num_classes=21, class_names=VOC_CLASSES, palette=voc_palette(21),
                  source={"note": "toy"})
    kwargs.update(overrides)
    return write_artifacts(core, out_dir, **kwargs)


@pytest.mark.parametrize("suffix", ATC_SUFFIXES)
def test_atc_runs_when_on_path(tmp_path, monkeypatch, suffix):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    atc = bin_dir / "atc"
    atc.write_text(FAKE_ATC.replace("SUFFIX", suffix))
    atc.chmod(atc.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "pspnet_bs2_linux_aarch64.om").write_bytes(b"stale")   # an older run's
    manifest = _write(ToyCore(), out, soc_version="Ascend310", torch_program=False)
    assert {n: m.om for n, m in manifest.models.items()} == {1: "pspnet_bs1.om",
                                                             2: "pspnet_bs2.om"}
    calls = (bin_dir / "calls.txt").read_text().splitlines()
    assert len(calls) == 2
    assert ("--framework=5 --model=pspnet_bs2_opset13.onnx --output=pspnet_bs2 "
            "--input_format=ND --input_shape=image:2,64,64,3;box:2,4 --soc_version=Ascend310 "
            "--precision_mode=force_fp16 --log=error") in calls
    assert Manifest.read(tmp_path / "out").models[2].om == "pspnet_bs2.om"
    # aclruntime refuses a group- or other-writable OM: the script leaves it at 0640
    assert stat.S_IMODE((tmp_path / "out" / "pspnet_bs2.om").stat().st_mode) == 0o640
    # whatever ATC called it, the OM is where the daemon looks, and it is this run's
    assert sorted(p.name for p in out.glob("*.om")) == ["pspnet_bs1.om", "pspnet_bs2.om"]
    assert (out / "pspnet_bs2.om").read_bytes() == b""


@pytest.mark.parametrize(("atc_opset", "om_precision", "model", "mode"), [
    (18, "fp32", "pspnet_bs{n}.onnx", "must_keep_origin_dtype"),
    (13, "fp32", "pspnet_bs{n}_opset13.onnx", "must_keep_origin_dtype"),
    (16, "fp16", "pspnet_bs{n}_opset16.onnx", "force_fp16"),
])
def test_atc_opset_and_precision(tmp_path, atc_opset, om_precision, model, mode):
    """The ATC script reads the ONNX at the opset asked for (the exported one itself at
    18) and says the precision; the manifest records both; the copy computes the same."""
    out = tmp_path / "out"
    manifest = _write(ToyCore(), out, run_atc=False, torch_program=False,
                      atc_opset=atc_opset, om_precision=om_precision)
    assert (manifest.atc_opset, manifest.om_precision) == (atc_opset, om_precision)
    assert Manifest.read(out).om_compute_precision == om_precision
    for n, files in manifest.models.items():
        name = model.format(n=n)
        assert files.atc_onnx == (None if atc_opset == 18 else name)
        text = (out / files.atc).read_text()
        assert f"--model={name} " in text and f"--precision_mode={mode} " in text
        assert f"# {name} is ONNX opset {atc_opset}" in text
        images = np.random.default_rng(n).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        boxes = np.array([[0, 0, 64, 64]] * n, dtype=np.int32)
        want, got = (ort.InferenceSession(str(out / f), providers=["CPUExecutionProvider"])
                     .run(None, {"image": images, "box": boxes})[0]
                     for f in (files.onnx, name))
        np.testing.assert_array_equal(got, want)


def test_batch_dependent_network_falls_back_to_static_exports(tmp_path, caplog):
    core = ToyCore(batch_sensitive=True).eval()
    with caplog.at_level(logging.WARNING, logger="build_model"):
        manifest = _write(core, tmp_path / "out", run_atc=False)
    assert "symbolic-batch ONNX export failed" in caplog.text
    assert "dynamic-batch torch.export failed" in caplog.text
    assert manifest.torch_program is None
    assert manifest.source["torch_program_batch"] == "static"
    programs = manifest.source["torch_programs"]
    assert programs == {"1": "pspnet_core_bs1.pt2", "2": "pspnet_core_bs2.pt2"}
    x = torch.randn(2, 3, 64, 64)
    for n in (1, 2):
        program = torch.export.load(str(tmp_path / "out" / programs[str(n)])).module()
        torch.testing.assert_close(program(x[:n]), core(x[:n]))
    # the ONNX models were exported per batch size too, and keep the batch-specific branch
    images = np.zeros((2, 64, 64, 3), np.uint8)
    boxes = np.array([[0, 0, 64, 64]] * 2, np.int32)
    one = ort.InferenceSession(str(tmp_path / "out" / "pspnet_bs1.onnx")).run(
        None, {"image": images[:1], "box": boxes[:1]})[0]
    two = ort.InferenceSession(str(tmp_path / "out" / "pspnet_bs2.onnx")).run(
        None, {"image": images, "box": boxes})[0]
    np.testing.assert_allclose(two[0], 2 * one[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, words", [
    ({"batch_sizes": (0, 4)}, "batch sizes"),
    ({"batch_sizes": (1, 300)}, "batch sizes"),
    ({"batch_sizes": ()}, "batch sizes"),
    ({"atc_opset": 12}, "ATC opset must be an integer from 13 to 18"),
    ({"atc_opset": 19}, "ATC opset must be an integer from 13 to 18"),
    ({"om_precision": "bf16"}, "OM precision must be one of fp16, fp32"),
    ({"input_size": 8}, "input size"),
    ({"head": "probabilities"}, "head"),
    ({"num_classes": 19, "class_names": VOC_CLASSES[:19]}, "expected 1 x 19"),
    ({"class_names": VOC_CLASSES[:5]}, "names"),
])
def test_bad_arguments(tmp_path, overrides, words):
    with pytest.raises(BuildError, match=words):
        _write(ToyCore(), tmp_path / "out", run_atc=False, **overrides)
    assert not (tmp_path / "out" / "manifest.json").exists()
