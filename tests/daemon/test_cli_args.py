"""Bad arguments to serve, submit, status, eval and bench: refused up front, in one line;
and the help of serve, submit and status, which must teach every flag.

Each of these once ran: zero workers or a zero queue stalled the daemon for good, a
negative backlog hung the bench, an unwritable --json lost a finished run, an existing
file as --out made postprocess crash-loop. Every case here must exit 2 before any child
process, backend or pipeline starts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pspnet.cli import main
from pspnet.daemon.commands import add_daemon_parsers
from tests.kit import REPO
from tests.voc_folder import make_voc_folder


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["labels"]                 # batch sizes 1, 4, 16


def exit_status(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) -> (exit status, last line of stderr); argparse errors raise SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


PIPELINE_FLAGS = [
    (["--preprocess-workers", "0"], "--preprocess-workers"),
    (["--postprocess-workers", "-1"], "--postprocess-workers"),
    (["--max-inflight", "0"], "--max-inflight"),
    (["--max-inflight", "-2"], "--max-inflight"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-wait-ms", "-5"], "--max-wait-ms"),
    (["--max-wait-ms", "nan"], "--max-wait-ms"),
    (["--max-pixels", "0"], "--max-pixels"),
    (["--devices", ","], "--devices"),
    (["--backend-option", "threads"], "--backend-option"),
    (["--backend-option", "=1"], "--backend-option"),
    (["--tcp-base-port", "65536"], "--tcp-base-port"),
]


@pytest.mark.parametrize("command", ["serve", "eval", "bench"])
@pytest.mark.parametrize("flags, named", PIPELINE_FLAGS)
def test_shared_pipeline_flags_are_checked_by_every_command(model, tmp_path, capsys, command,
                                                             flags, named):
    source = {"serve": [], "eval": ["--voc", str(tmp_path)],
              "bench": ["--synthetic", "4"]}[command]
    code, last = exit_status([command, "--model", str(model), *source, *flags], capsys)
    assert code == 2, last
    assert last.startswith(f"pspnet {command}: error:") and named in last, last


@pytest.mark.parametrize("argv, named", [
    (["serve", "--max-queue", "0"], "--max-queue"),
    (["serve", "--drain-timeout", "-1"], "--drain-timeout"),
    (["serve", "--transport", "tcp", "--tcp-host", "0.0.0.0"], "--tcp-host"),
    (["serve", "--transport", "tcp", "--tcp-host", "myhost"], "--tcp-host"),
    (["serve", "--tcp-host", "10.0.0.5"], "--tcp-host needs --transport tcp"),
    (["serve", "--transport", "tcp", "--endpoint", "tcp://127.0.0.1:5550"],
     "--endpoint's port 5550 is the internal control port"),
    (["bench", "--synthetic", "4", "--backlog", "-1"], "--backlog"),
    (["bench", "--synthetic", "4", "--backlog", "0"], "--backlog"),
    (["bench", "--synthetic", "0"], "--synthetic"),
    (["bench", "--synthetic", "4", "--repeats", "0"], "--repeats"),
    (["bench", "--synthetic", "4", "--warmup", "-1"], "--warmup"),
    (["bench", "--synthetic", "4", "--min-images", "-1"], "--min-images"),
    (["bench", "--synthetic", "4", "--baseline-images", "-5"], "--baseline-images"),
])
def test_command_flags_out_of_range(model, capsys, argv, named):
    code, last = exit_status([argv[0], "--model", str(model), *argv[1:]], capsys)
    assert code == 2 and named in last, last


@pytest.mark.parametrize("argv, named", [
    (["submit", "--timeout", "0", "/x.jpg"], "--timeout"),
    (["worker", "executor", "--front", "h", "--model", "m", "--index", "-1"], "--index"),
])
def test_client_and_worker_flags_out_of_range(capsys, argv, named):
    code, last = exit_status(argv, capsys)
    assert code == 2 and named in last, last


def test_outputs_that_cannot_be_written_are_refused_before_any_work(model, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    voc = make_voc_folder(tmp_path / "voc")
    watch = tmp_path / "incoming"
    watch.mkdir()
    cases = [
        (["serve", "--out", str(a_file)], "--out"),
        (["serve", "--out", str(a_file / "masks")], "--out"),
        (["serve", "--metrics-json", str(tmp_path)], "--metrics-json"),
        (["serve", "--metrics-json", str(a_file / "m.json")], "--metrics-json"),
        (["serve", "--watch", str(watch), "--out", str(watch)], "same folder"),
        (["eval", "--voc", str(voc.root), "--json", str(a_file / "x.json")], "--json"),
        (["eval", "--voc", str(voc.root), "--out", str(a_file)], "--out"),
        (["bench", "--synthetic", "4", "--json", str(a_file / "x.json")], "--json"),
        (["bench", "--synthetic", "4", "--plot", str(tmp_path)], "--plot"),
    ]
    for argv, named in cases:
        code, last = exit_status([argv[0], "--model", str(model), "--backend", "sim",
                                  *argv[1:]], capsys)
        assert code == 2, (argv, last)
        assert last.startswith(f"pspnet {argv[0]}: error:") and named in last, (argv, last)
        assert "opening" not in last
    assert not list(tmp_path.glob("pspnet-*")) and a_file.read_text() == "not a folder"


def test_eval_refuses_a_batch_size_the_model_was_not_built_with(model, tmp_path, capsys):
    voc = make_voc_folder(tmp_path / "voc")
    code, last = exit_status(["eval", "--voc", str(voc.root), "--model", str(model),
                              "--backend", "sim", "--batch-size", "3"], capsys)
    assert code == 2 and "no model for batch size 3; this directory has 1, 4, 16" in last, last


def test_bench_names_a_backend_that_will_not_open_in_one_line(model, capsys):
    """A bad value is found when the backend opens (exit 1); an option the backend does not
    know is a usage error found before anything starts (exit 2)."""
    for option, code_wanted, words in (
            ("img_s=0", 1, "pspnet bench: error: cannot open the sim backend:"),
            ("speed=5", 2, "pspnet bench: error: unknown sim backend option(s) speed")):
        code, last = exit_status(["bench", "--model", str(model), "--backend", "sim",
                                  "--synthetic", "4", "--batch-sizes", "4", "--repeats", "1",
                                  "--warmup", "0", "--backend-option", option], capsys)
        assert code == code_wanted, last
        assert last.startswith(words), last


def test_a_broken_manifest_is_named_in_the_error(model, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "manifest.json").write_text("{'format': 1,")
    code, last = exit_status(["serve", "--model", str(broken)], capsys)
    assert code == 2 and str(broken / "manifest.json") in last and "JSON" in last, last
    doc = json.loads((model / "manifest.json").read_text())
    del doc["models"]
    (broken / "manifest.json").write_text(json.dumps(doc))
    code, last = exit_status(["serve", "--model", str(broken)], capsys)
    assert code == 2 and "malformed manifest" in last and "models" in last, last


def test_serve_refuses_bad_arguments_in_one_line(tiny_models, tmp_path):
    """`pspnet serve` as a process: one line on stderr and exit 2 for a model directory
    without a manifest (named before an exposed endpoint is) and for a batch size the
    model was not built with."""
    cases = [
        (["--model", str(tmp_path / "none")], "no such model directory"),
        (["--model", str(tmp_path), "--endpoint", "tcp://0.0.0.0:5999"], "manifest"),
        (["--model", str(tiny_models["logits"]), "--batch-size", "8"],
         "no model for batch size 8"),
    ]
    for extra, words in cases:
        out = subprocess.run([sys.executable, "-m", "pspnet", "serve", *extra],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 2, out.stderr
        assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("command", ["serve", "submit", "status"])
def test_help_explains_every_flag(command):
    """Every flag has a help text that says something, and `pspnet COMMAND --help` prints
    them; serve's teaches --liveness-timeout and its default (5 s)."""
    sub = argparse.ArgumentParser().add_subparsers()
    add_daemon_parsers(sub)
    parser = sub.choices[command]
    for action in parser._actions:
        assert action.help and len(action.help) > 10, (command, action.option_strings)
    out = subprocess.run([sys.executable, "-m", "pspnet", command, "--help"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0 and "--endpoint" in out.stdout, out.stderr
    if command == "serve":
        text = " ".join(out.stdout.split())
        assert "--liveness-timeout S" in text, "no --liveness-timeout in serve --help"
        after = text[text.rindex("--liveness-timeout S"):][:600]  # the option, not the usage
        assert "default: 5" in after, after


# ---- backend rules, checked before anything starts ---------------------------------------

BACKEND_REFUSALS = [
    (["--precision", "fp16"], "the ort backend runs fp32 on cpu, not --precision fp16"),
    (["--backend", "torch", "--precision", "fp16"], "fp16 on cuda"),
    (["--backend", "acl"], "the acl backend runs on npu[:N]"),
    (["--backend", "torch", "--backend-option", "cuda_graphs=1"],
     "cuda_graphs=1 needs a CUDA device"),
    (["--backend-option", "bogus=1"], "unknown ort backend option(s) bogus"),
]


@pytest.mark.parametrize("command", ["serve", "eval", "bench", "worker", "batch"])
@pytest.mark.parametrize("flags, words", BACKEND_REFUSALS)
def test_what_a_backend_cannot_run_is_refused_by_every_command(model, tmp_path, capsys,
                                                               command, flags, words):
    """One table (pspnet.core.backend_rules) says which devices, precisions and options
    each backend takes; every command that runs a backend checks it first: one line, exit
    2, nothing opened or started."""
    if command == "batch" and "--devices" in flags:
        pytest.skip("batch takes --device")
    argv = {"serve": ["serve"], "eval": ["eval", "--voc", str(tmp_path)],
            "bench": ["bench", "--synthetic", "4"],
            "worker": ["worker", "executor", "--front", "127.0.0.1"],
            "batch": ["batch", "--images", str(tmp_path)]}[command]
    code, last = exit_status([*argv, "--model", str(model), *flags], capsys)
    assert code == 2, last
    assert last.startswith(f"pspnet {command}: error:") and words in last, last
    assert not list(tmp_path.glob("pspnet-*"))


def test_serve_refuses_a_precision_its_backend_lacks_before_any_worker(model, tmp_path):
    """`pspnet serve --backend ort --precision fp16` as a process: one line, exit 2, within
    2 s, and no run directory (the front makes it before its first worker). Before, it
    bound the endpoint, started five workers, loaded the model, then exited 3."""
    import os
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pspnet", "serve", "--model", str(model),
                          "--backend", "ort", "--precision", "fp16", "--endpoint",
                          f"ipc://{tmp_path}/front"],
                         capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "TMPDIR": str(tmp)})
    took = time.monotonic() - started
    lines = out.stderr.strip().splitlines()
    print(f"\nFIGURE serve --backend ort --precision fp16: exit {out.returncode} in "
          f"{took:.2f} s: {lines}")
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("pspnet serve: error: the ort backend runs fp32 on cpu, not "
                               "--precision fp16; it runs fp16 on tensorrt and cann"), lines
    assert not list(tmp.glob("pspnet-*")) and not (tmp_path / "front").exists()
    assert took < 2.0, f"took {took:.2f} s"


# ---- one declaration per setting -----------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    from pspnet.cli import build_parser

    return build_parser().parse_args(argv)


def test_flags_take_their_defaults_and_help_from_the_config_fields(model):
    """Each flag's default is its field's (a config from no flags equals the dataclass's
    own defaults, once --backend/--precision auto chose ort fp32 on cpu: this host has
    onnxruntime and no GPU), and a flag's help text is written once, on its field."""
    import dataclasses

    from pspnet.core.cli_args import FLAG
    from pspnet.core.config import PipelineConfig
    from pspnet.daemon.commands import pipeline_config
    from pspnet.daemon.serve_config import ServeConfig

    for command in ("serve", "eval", "bench", "worker"):
        extra = {"serve": [], "eval": ["--voc", "v"], "bench": ["--synthetic", "4"],
                 "worker": ["executor", "--front", "h"]}[command]
        argv = [command, *extra, "--model", str(model)]
        args = parse(argv)
        quiet = "warning" if command in ("eval", "bench") else "info"   # set_defaults
        cfg = pipeline_config(args)
        assert cfg.choice.startswith("--backend auto: an ONNX model"), cfg.choice
        assert cfg == PipelineConfig(model_dir=model, log_level=quiet,
                                     choice=cfg.choice), command
    args = parse(["serve", "--model", str(model)])
    serve = ServeConfig(PipelineConfig(model), endpoint="e")
    for spec in dataclasses.fields(ServeConfig):
        if FLAG in spec.metadata and spec.name != "endpoint":   # None: the default's
            assert getattr(args, spec.name) == getattr(serve, spec.name), spec.name
    args = parse(["serve", "--model", str(model), "--backend-option", "threads=2",
                  "--backend-option", "spin=1", "--allow-root", "/a", "--allow-root", "/b",
                  "--no-masks", "--log-format", "json", "--devices", "cpu,cpu"])
    cfg = pipeline_config(args)
    assert cfg.backend_options == {"threads": "2", "spin": "1"} and cfg.log_json is True
    assert cfg.write_masks is False and cfg.devices == ("cpu", "cpu")
    assert args.allow_roots == (Path("/a"), Path("/b"))
    assert cfg.executor_threads == 2 and cfg.executor_spin is True


def test_worker_counts_from_flags_override_the_plan(model):
    from pspnet.daemon.commands import pipeline_config

    cfg = pipeline_config(parse(["serve", "--model", str(model),
                                 "--preprocess-workers", "3"]))
    assert cfg.preprocess_workers == 3 and cfg.plan["set_by_flags"] == ["preprocess_workers"]
    assert cfg.postprocess_workers == cfg.plan["postprocess_workers"]


def test_a_command_words_a_shared_flag_its_own_way():
    """bench hides --batch-size (--batch-sizes replaces it) and says what --out and
    --no-masks mean there; batch takes only the pipeline flags it uses."""
    bench = subprocess.run([sys.executable, "-m", "pspnet", "bench", "--help"],
                           capture_output=True, text=True, timeout=60, cwd=REPO).stdout
    text = " ".join(bench.split())
    assert "--batch-size " not in text and "--batch-sizes LIST" in text
    assert "MASKDIR/e2e-bsN/" in text and "write no masks in e2e and serial" in text
    assert "--plans" in text
    batch = " ".join(subprocess.run([sys.executable, "-m", "pspnet", "batch", "--help"],
                                    capture_output=True, text=True, timeout=60,
                                    cwd=REPO).stdout.split())
    assert "at the same path on every node" in batch and "--executor-cpus N" in batch
    assert "--preprocess-workers" not in batch and "--liveness-timeout" not in batch
