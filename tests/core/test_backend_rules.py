"""The backend table (pspnet.core.backend_rules): what each backend takes, known without
importing a runtime, and the same rule wherever it is checked (the CLI before anything
starts, open_backend in the executor)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pspnet.core.backend_rules import BACKENDS, RULES, check_backend, lone_options, with_plan
from tests.kit import REPO


@pytest.mark.parametrize("backend, devices, precision, options, words", [
    ("ort", ("cpu",), "fp16", {}, "it runs fp16 on tensorrt and cann"),
    ("ort", ("cpu", "cuda:1"), "bf16", {}, "the torch backend runs bf16 on cpu and cuda"),
    ("torch", ("cpu",), "fp16", {}, "runs fp32/bf16 on cpu, not --precision fp16"),
    ("torch", ("cuda:0",), "fp32", {"fused_conv": "1", "compile": "1"}, "do not combine"),
    ("torch", ("cpu",), "fp32", {"cuda_graphs": "yes"}, "needs a CUDA device"),
    ("acl", ("npu:0",), "bf16", {}, "pspnet build --om-precision"),
    ("acl", ("cuda:0",), "fp32", {}, "runs on npu[:N]"),
    ("sim", ("cpu",), "fp32", {"threads": "1"}, "unknown sim backend option(s) threads"),
    ("ort", ("cuda:x",), "fp32", {}, "the index after ':' must be a number"),
    ("ort", ("cpu",), "fp32", {"sched": "fifo"}, "sched=fifo: choose batch or normal"),
])
def test_refusals_name_the_fix(backend, devices, precision, options, words):
    with pytest.raises(ValueError, match="") as caught:
        check_backend(backend, devices, precision, options)
    assert words in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("backend, devices, precision, options", [
    ("ort", ("cpu",), "fp32", {"threads": "2", "spin": "0"}),
    ("ort", ("cpu",), "fp32", {"sched": "normal"}),
    ("torch", ("cpu",), "fp32", {"sched": "batch"}),
    ("ort", ("tensorrt:0", "cann:1"), "fp16", {}),
    ("torch", ("cuda:0", "cuda:1"), "bf16", {"compile": "1", "cuda_graphs": "1"}),
    ("torch", ("cpu",), "bf16", {"fused_conv": "auto"}),
    ("acl", ("npu:0",), "fp16", {"feed": "tensor", "log_level": "3"}),
    ("sim", ("sim",), "fp16", {"img_s": "400"}),
])
def test_what_each_backend_takes(backend, devices, precision, options):
    check_backend(backend, devices, precision, options)


def test_the_table_is_known_without_a_runtime():
    """The daemon's CLI reads the table; importing it pulls in neither torch nor
    onnxruntime (nor the stages)."""
    code = ("import sys; import pspnet.core.backend_rules, pspnet.daemon.commands; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'pspnet.stages') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    assert BACKENDS == ("ort", "torch", "acl")


def test_open_backend_checks_the_same_table(tiny_models):
    from pspnet.stages.backends import open_backend

    with pytest.raises(ValueError) as from_cli:
        check_backend("ort", ("cpu",), "fp16", {})
    with pytest.raises(ValueError) as from_stage:
        open_backend("ort", tiny_models["labels"], 1, precision="fp16")
    assert str(from_stage.value) == str(from_cli.value)
    from pspnet.stages.backends import ort, sim, torch_backend

    assert ort.OPTIONS is RULES["ort"].options and sim.OPTIONS is RULES["sim"].options
    assert torch_backend.OPTIONS is RULES["torch"].options


def test_the_plan_reaches_only_backends_that_take_it():
    assert with_plan("ort", {}, 2, False) == {"threads": "2", "spin": "0"}
    assert with_plan("ort", {"spin": "1"}, 2, False) == {"spin": "1", "threads": "2"}
    # run_spin is the user's to set: the plan leaves it off
    assert with_plan("ort", {"run_spin": "1"}, 2, False) == {"run_spin": "1", "threads": "2",
                                                             "spin": "0"}
    assert with_plan("torch", {}, 2, False) == {"threads": "2"}
    assert with_plan("acl", {}, 2, False) == {} and with_plan("sim", {}, 2, True) == {}


def test_a_lone_images_session_spins_within_a_run_where_the_plan_sleeps():
    """lone_options: ort's run_spin on the batch-size-1 session where the plan turned
    spinning off; the user's run_spin wins; spin=1 or one thread: nothing to add."""
    assert lone_options("ort", {"threads": "2", "spin": "0"}) == {
        "threads": "2", "spin": "0", "run_spin": "1"}
    assert lone_options("ort", {"threads": "2", "spin": "0", "run_spin": "0"})[
        "run_spin"] == "0"
    assert "run_spin" not in lone_options("ort", {"threads": "2", "spin": "1"})
    assert "run_spin" not in lone_options("ort", {"threads": "1", "spin": "0"})
    assert lone_options("torch", {"threads": "2"}) == {"threads": "2"}
    assert lone_options("sim", {"img_s": "50"}) == {"img_s": "50"}


def test_auto_picks_by_what_the_model_directory_and_host_have():
    """--backend auto's rows, in order: acl (an OM and aclruntime), torch on cuda:0 (a
    torch program and CUDA), ort on cpu, torch on cpu; --devices narrows to backends
    that run there; --precision auto is the OM's as built, else fp32."""
    from pspnet.core.backend_rules import (
        ACLRUNTIME,
        CUDA,
        OM,
        ONNX,
        ORT_INSTALLED,
        TORCH_INSTALLED,
        TORCH_PROGRAM,
        auto_backend,
        auto_precision,
    )

    everything = {ONNX, TORCH_PROGRAM, OM, ORT_INSTALLED, TORCH_INSTALLED, ACLRUNTIME, CUDA}

    def pick(facts, kind=None):
        row = auto_backend(frozenset(facts), kind)
        return None if row is None else (row.backend, row.device)

    assert pick(everything) == ("acl", "npu:0")
    assert pick(everything - {ACLRUNTIME}) == ("torch", "cuda:0")
    assert pick(everything - {ACLRUNTIME, CUDA}) == ("ort", "cpu")
    assert pick({TORCH_PROGRAM, TORCH_INSTALLED, ORT_INSTALLED}) == ("torch", "cpu")
    assert pick({ONNX, TORCH_INSTALLED}) is None                # no onnxruntime, no program
    assert pick(everything, "cpu") == ("ort", "cpu")
    assert pick({TORCH_PROGRAM, TORCH_INSTALLED}, "cuda") == ("torch", "cuda:0")
    assert auto_precision("acl", "fp16") == "fp16" and auto_precision("acl", "fp32") == "fp32"
    assert auto_precision("ort", "fp16") == auto_precision("torch", "fp16") == "fp32"
