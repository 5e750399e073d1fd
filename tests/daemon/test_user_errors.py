"""Errors a new user meets, each one line that names the fix, with its exit status
(core/exits.py): a checkpoint or ONNX file given as --model, a model directory built for
another backend, CUDA asked of a CPU torch, a daemon that is not at the default endpoint,
a serve that cannot start. Before issue 24 these were a NotADirectoryError, "rebuild with
pspnet build", "sees no CUDA device", "is pspnet serve running?" and a 12th JSON log line.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pspnet.cli import main
from pspnet.core.exits import EXIT_CANNOT_START, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.kit import REPO


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """main(argv) -> (exit status, stderr's lines)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture()
def ort_only(tiny_models, tmp_path) -> Path:
    """A model directory built without a torch program (as `pspnet build` writes when
    torch cannot export): only the ONNX models."""
    model = shutil.copytree(tiny_models["labels"], tmp_path / "ort-only")
    for program in model.glob("*.pt2"):
        program.unlink()
    return model


@pytest.fixture()
def torch_only(tiny_models, tmp_path) -> Path:
    """A model directory whose ONNX files are gone: only the torch program."""
    model = shutil.copytree(tiny_models["labels"], tmp_path / "torch-only")
    for onnx in model.glob("*.onnx"):
        onnx.unlink()
    return model


@pytest.mark.parametrize("name, words", [
    ("deeplabv3_mnv2_voc.pth", "is a checkpoint, not a model directory: make one with "
     "`pspnet build --config CONFIG --checkpoint {path}"),
    ("model.onnx", "is an ONNX file, not a model directory: make one from the mmseg config "
     "and checkpoint with `pspnet build --config"),
])
@pytest.mark.parametrize("command", ["serve", "bench", "eval", "batch"])
def test_a_file_as_model_names_pspnet_build(tmp_path, capsys, name, words, command):
    path = tmp_path / name
    path.write_bytes(b"\x80\x02weights")
    extra = {"bench": ["--synthetic", "2"], "eval": ["--voc", str(tmp_path)],
             "batch": ["--images", str(tmp_path)]}.get(command, [])
    code, lines = run([command, "--model", str(path), *extra], capsys)
    assert code == EXIT_USAGE and len(lines) == 1, lines
    assert lines[0].startswith(f"pspnet {command}: error: --model {path} ")
    assert words.format(path=path) in lines[0], lines[0]


def test_a_model_built_for_another_backend_names_the_flag(torch_only, capsys):
    code, lines = run(["serve", "--model", str(torch_only), "--backend", "ort"], capsys)
    assert code == EXIT_USAGE and len(lines) == 1, lines
    assert lines[0] == (f"pspnet serve: error: {torch_only} holds no onnx for the ort backend "
                        "(it has torch program): use --backend torch (or --backend auto)")


def test_auto_picks_the_backend_the_model_directory_holds(torch_only, ort_only, tiny_models):
    """--backend auto (the default): ort where an ONNX model is, torch cpu where only a
    torch program is; --precision auto: fp32 for both; an explicit flag wins."""
    from pspnet.cli import build_parser
    from pspnet.daemon.commands import pipeline_config

    def chosen(*argv: str) -> tuple[str, tuple[str, ...], str]:
        cfg = pipeline_config(build_parser().parse_args(["serve", *argv]))
        return cfg.backend, cfg.devices, cfg.precision

    assert chosen("--model", str(ort_only)) == ("ort", ("cpu",), "fp32")
    assert chosen("--model", str(torch_only)) == ("torch", ("cpu",), "fp32")
    assert chosen("--model", str(tiny_models["labels"]), "--backend", "torch",
                  "--precision", "bf16") == ("torch", ("cpu",), "bf16")
    cfg = pipeline_config(build_parser().parse_args(["serve", "--model", str(torch_only)]))
    assert cfg.plan["choice"] == ("--backend auto: a torch program, no ONNX model or "
                                  "onnxruntime; --precision auto: fp32"), cfg.plan


@pytest.mark.skipif(not importlib.metadata.version("torch").endswith("+cpu"),
                    reason="needs a CPU build of torch")
def test_cuda_of_a_cpu_torch_gives_the_install_command(tiny_models, capsys):
    version = importlib.metadata.version("torch")
    code, lines = run(["serve", "--model", str(tiny_models["labels"]), "--backend", "torch",
                       "--devices", "cuda:0"], capsys)
    assert code == EXIT_USAGE and len(lines) == 1, lines
    assert lines[0] == (
        f"pspnet serve: error: --devices cuda:0: this torch ({version}) is a CPU build: "
        f"install a CUDA build with `{sys.executable} -m pip install --index-url "
        f"https://download.pytorch.org/whl/cu126 torch=={version.split('+')[0]}` "
        "(or, in the project's checkout, `PSPNET_TORCH=cu126 ./scripts/demo`, which "
        "reinstalls torch in its .venv)")
    assert "PSPNET_TORCH=cu" in (REPO / "scripts" / "venv.sh").read_text()
    assert "venv.sh" in (REPO / "scripts" / "demo").read_text()


@pytest.mark.parametrize("command", ["submit", "status"])
def test_no_daemon_names_endpoint_and_the_running_ones(tmp_path, monkeypatch, capsys,
                                                       command):
    """Nothing at the default endpoint: the line names --endpoint and PSPNET_ENDPOINT, and
    lists this user's running daemons from their run files (a daemon on tcp is not at the
    ipc path); a dead daemon's file is dropped, not listed."""
    from pspnet.daemon import endpoint

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("PSPNET_ENDPOINT", raising=False)
    argv = [command, *(["x.jpg"] if command == "submit" else [])]
    code, lines = run(argv, capsys)
    assert code == EXIT_UNAVAILABLE and len(lines) == 1, lines
    assert lines[0] == (
        f"pspnet {command}: error: no daemon at ipc://{tmp_path}/pspnet/front: "
        f"{tmp_path}/pspnet/front does not exist (a daemon elsewhere, e.g. on tcp: pass "
        "--endpoint tcp://HOST:PORT or set PSPNET_ENDPOINT; is `pspnet serve` running?)")

    record = endpoint.record_daemon("tcp://127.0.0.1:5999")      # as a serve here would
    dead = record.with_name("999999999.json")
    dead.write_text('{"pid": 999999999, "endpoint": "tcp://127.0.0.1:6000"}')
    code, lines = run(argv, capsys)
    assert code == EXIT_UNAVAILABLE and len(lines) == 1, lines
    assert lines[0].endswith(f"set PSPNET_ENDPOINT; running: tcp://127.0.0.1:5999 "
                             f"(pid {os.getpid()}))"), lines[0]
    assert not dead.exists()
    endpoint.forget_daemon(record)
    assert endpoint.running_daemons() == []


def test_a_reader_gone_from_the_pipe_ends_quietly(tmp_path):
    """`pspnet submit ... | head -1`: once the reader has closed the pipe, the command stops
    with 141 (as a tool killed by SIGPIPE) and no traceback. `keys` prints its JSON to
    stdout and needs no daemon; the pipe's read end is closed before it starts."""
    from pspnet.core.exits import EXIT_BROKEN_PIPE

    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run([sys.executable, "-m", "pspnet", "keys", str(tmp_path / "k")],
                             stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                             cwd=REPO)
    finally:
        os.close(write)
    assert out.returncode == EXIT_BROKEN_PIPE, out.stderr
    assert out.stderr == ""
    assert (tmp_path / "k" / "client.key").is_file()      # the work itself was done


def test_serve_that_cannot_start_says_why_on_stderr(tiny_models, tmp_path):
    """An executor that cannot open (a sim device of speed 0): exit 3, and besides the JSON
    log one plain `pspnet serve: error:` line with the reason."""
    out = subprocess.run(
        [sys.executable, "-m", "pspnet", "serve", "--model", str(tiny_models["labels"]),
         "--backend", "sim", "--backend-option", "img_s=0", "--endpoint",
         f"ipc://{tmp_path}/front", "--log-format", "json", "--preprocess-workers", "1",
         "--postprocess-workers", "1"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == EXIT_CANNOT_START, out.stderr[-3000:]
    plain = [line for line in out.stderr.splitlines() if not line.startswith("{")]
    assert len(plain) == 1 and plain[0].startswith("pspnet serve: error: "), plain
    assert "img_s" in plain[0], plain
