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
    for option in ("img_s=0", "speed=5"):
        code, last = exit_status(["bench", "--model", str(model), "--backend", "sim",
                                  "--synthetic", "4", "--batch-sizes", "4", "--repeats", "1",
                                  "--warmup", "0", "--backend-option", option], capsys)
        assert code == 1, last
        assert last.startswith("pspnet bench: error: cannot open the sim backend:"), last


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
        (["--model", str(tmp_path / "none")], "manifest"),
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
