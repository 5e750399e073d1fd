"""`pspnet build` on the command line: help, one-line user errors, checkpoint safety."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from pspnet.build_model.checkpoint import read_checkpoint
from pspnet.build_model.cli import add_build_parser
from pspnet.cli import main
from tests.model_fixtures import tiny_checkpoint, tiny_config

ERROR = "pspnet build: error:"
HEAVY = ("mmseg", "mmengine", "mmcv", "onnx", "onnxsim", "onnxscript", "onnxruntime")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """pspnet.cli.main(["build", ...]) -> (exit status, stderr)."""
    try:
        rc = main(["build", *argv])
    except SystemExit as exc:      # argparse-level errors exit from inside parse_args
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny config + checkpoints: good, for another class count, needing full unpickling."""
    root = tmp_path_factory.mktemp("cli")
    good = tiny_checkpoint(root)
    ckpt = torch.load(str(good), map_location="cpu", weights_only=True)
    other = {k: v for k, v in ckpt["state_dict"].items()}
    for key in ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias"):
        other[key] = other[key][:19].clone()
    torch.save({"meta": ckpt["meta"], "state_dict": other}, root / "classes19.pth")
    # argparse.Namespace: an importable class that weights-only loading refuses
    torch.save({"meta": {"args": argparse.Namespace(lr=0.01)},
                "state_dict": ckpt["state_dict"]}, root / "pickled.pth")
    torch.save(ckpt["state_dict"], root / "bare.pth")
    return {"config": str(tiny_config(good.parent)), "good": str(good), "root": root,
            "classes19": str(root / "classes19.pth"), "pickled": str(root / "pickled.pth"),
            "bare": str(root / "bare.pth")}


def test_import_does_not_load_the_build_stack():
    code = ("import sys, pspnet.build_model.cli, pspnet.cli; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_help_explains_every_flag():
    subparsers = argparse.ArgumentParser(prog="pspnet").add_subparsers()
    add_build_parser(subparsers)
    build = subparsers.choices["build"]
    for action in build._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and "default" in action.help or "required" in action.help, \
            action.option_strings
        if action.nargs != 0 and not action.choices:  # valued flags show an example
            assert "e.g." in action.help, action.option_strings
    text = build.format_help()
    for flag in ("--config", "--checkpoint", "--batch-sizes", "--out", "--input-size",
                 "--head", "--verify", "--trust-checkpoint", "--soc-version", "--no-simplify",
                 "--no-onnx", "--atc-opset", "--om-precision"):
        assert flag in text
    assert "example:" in text


@pytest.mark.parametrize("case, extra", [
    ("missing checkpoint", ["--checkpoint", "/nonexistent/x.pth"]),
    ("unknown config", ["--config", "pspnet_no_such_config"]),
    ("missing config file", ["--config", "/nonexistent/cfg.py"]),
    ("batch size 0", ["--batch-sizes", "0,4"]),
    ("batch size 257", ["--batch-sizes", "1,257"]),
    ("batch size text", ["--batch-sizes", "1,four"]),
    ("batch size float", ["--batch-sizes", "1.5"]),
    ("input size small", ["--input-size", "16"]),
    ("input size text", ["--input-size", "big"]),
    ("head", ["--head", "softmax"]),
    ("atc opset 12", ["--atc-opset", "12"]),
    ("atc opset text", ["--atc-opset", "new"]),
    ("om precision", ["--om-precision", "bf16"]),
    ("missing argument", None),
    ("other class count", ["--checkpoint", "classes19"]),
    ("needs unpickling", ["--checkpoint", "pickled"]),
    ("checkpoint is a folder", ["--checkpoint", "{tmp}"]),
    ("checkpoint is not one", ["--checkpoint", "{tmp}/a-file"]),
    ("out is a file", ["--out", "{tmp}/a-file"]),
    ("out under a file", ["--out", "{tmp}/a-file/models"]),
    ("nothing to build", ["--no-onnx", "--no-torch-program"]),
])
def test_user_errors_are_one_line(weights, tmp_path, capsys, case, extra):
    argv = ["--config", weights["config"], "--checkpoint", weights["good"],
            "--out", str(tmp_path / "out")]
    (tmp_path / "a-file").write_text("neither a checkpoint nor a folder")
    if extra is None:
        argv = argv[:2]
    else:
        if extra[0] == "--checkpoint" and extra[1] in weights:
            extra = ["--checkpoint", weights[extra[1]]]
        argv += [e.format(tmp=tmp_path) for e in extra]
    rc, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(ERROR), err
    if case == "needs unpickling":
        assert "--trust-checkpoint" in lines[0]
    if case == "other class count":
        assert "19" in lines[0] and "21" in lines[0]
    if case.startswith("checkpoint is"):
        assert ("a directory" if "folder" in case else "not a PyTorch checkpoint") in lines[0]
    if case.startswith("out"):
        assert "--out:" in lines[0] and "a-file" in lines[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_trusted_checkpoint_builds_and_verifies(weights, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_cli(["--config", weights["config"], "--checkpoint", weights["pickled"],
                       "--trust-checkpoint", "--out", str(out), "--batch-sizes", "2",
                       "--input-size", "64x96", "--head", "labels", "--verify",
                       "--no-torch-program", "--om-precision", "fp32"], capsys)
    assert rc == 0, err
    for step in ("read checkpoint", "dropped 8 auxiliary-head tensors", "exporting",
                 "simplifying", "checking", "wrote", "pspnet_bs2.atc.sh", "label agreement",
                 "writing pspnet_bs2_opset13.onnx for ATC (opset 13)",
                 "ops on int64 tensors at run time (ATC may put them on the AI CPU): "
                 "ArgMax(", "pspnet_bs2_opset13.onnx: 9 images, label agreement"):
        assert step in err, step
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input_size"] == [64, 96] and manifest["head"] == "labels"
    assert manifest["torch_program"] is None
    assert (manifest["atc_opset"], manifest["om_precision"]) == (13, "fp32")
    assert "--precision_mode=must_keep_origin_dtype" in (out / "pspnet_bs2.atc.sh").read_text()
    assert (out / "pspnet_bs2.onnx").exists() and (out / "pspnet_bs2.atc.sh").exists()


def test_no_onnx_builds_a_torch_only_directory(weights, tmp_path, capsys):
    """--no-onnx: the torch program and the manifest in seconds, verified; ort says why
    it cannot open the directory, torch runs it."""
    from pspnet.stages.backends import open_backend
    from tests.tiny_model import random_batch

    out = tmp_path / "out"
    rc, err = run_cli(["--config", weights["config"], "--checkpoint", weights["good"],
                       "--out", str(out), "--batch-sizes", "1,2", "--input-size", "64",
                       "--no-onnx", "--verify"], capsys)
    assert rc == 0, err
    assert "ONNX export skipped" in err and "pspnet_core.pt2" in err
    assert "pspnet_bs" not in err and "simplifying" not in err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "pspnet_core.pt2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "--no-onnx" in manifest["source"]["onnx"] and manifest["torch_program"]
    with pytest.raises(FileNotFoundError, match="--no-onnx"):
        open_backend("ort", out, 2)
    with open_backend("torch", out, 2) as backend:
        images, boxes = random_batch(2, (64, 64), seed=0)
        backend.upload(0, images, boxes)
        assert backend.execute(0).shape[0] == 2
    rc, err = run_cli(["--config", weights["config"], "--checkpoint", weights["good"],
                       "--out", str(tmp_path / "none"), "--no-onnx", "--no-torch-program"],
                      capsys)
    assert rc == 2 and "nothing to build" in err


def test_bare_state_dict_is_accepted(weights):
    bare = read_checkpoint(weights["bare"])
    official = read_checkpoint(weights["good"])
    assert bare.meta == {} and official.meta["mmseg_version"]
    assert bare.state_dict.keys() == official.state_dict.keys()
