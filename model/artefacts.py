"""What a model directory holds, what this host can run it with, and so which backend
`--backend auto` picks (the rules themselves are data in core/backend_rules.py).

Why here and light: serve, eval, bench and worker decide before anything starts, and the
daemon imports no torch; so runtimes are looked up by name (importlib), and CUDA is asked
of torch in a short child process only on a host with an NVIDIA driver.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pspnet.core.backend_rules import (
    ACLRUNTIME,
    AUTO,
    CUDA,
    OM,
    ONNX,
    ORT_INSTALLED,
    RULES,
    TORCH_INSTALLED,
    TORCH_PROGRAM,
    artefact_problem,
    auto_backend,
    auto_precision,
    check_backend,
    cuda_torch_fix,
)
from pspnet.model.manifest import MANIFEST_NAME, Manifest

NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")   # absent: no CUDA device, no probe
CUDA_PROBE_S = 60.0
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".pkl", ".bin", ".safetensors")
BUILD_HINT = ("pspnet build --config CONFIG --checkpoint CHECKPOINT.pth --out models/NAME`, "
              "then `--model models/NAME")


def model_dir_problem(path: Path) -> str | None:
    """Why `path` is not a model directory, naming the command that makes one."""
    path = Path(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in CHECKPOINT_SUFFIXES:
            return (f"--model {path} is a checkpoint, not a model directory: make one with "
                    f"`{BUILD_HINT.replace('CHECKPOINT.pth', str(path))}`")
        if suffix == ".onnx":
            return (f"--model {path} is an ONNX file, not a model directory: make one from "
                    f"the mmseg config and checkpoint with `{BUILD_HINT}`")
        if path.name == MANIFEST_NAME:
            return f"--model {path} is the manifest; give its folder: --model {path.parent}"
        return f"--model {path} is a file, not a model directory: make one with `{BUILD_HINT}`"
    if not path.exists():
        return f"--model {path}: no such model directory; make one with `{BUILD_HINT}`"
    if not (path / MANIFEST_NAME).is_file():
        return (f"--model {path}: no {MANIFEST_NAME} in it, not a model directory; make one "
                f"with `{BUILD_HINT}`")
    return None


def artefacts(model_dir: Path, manifest: Manifest) -> frozenset[str]:
    """ONNX, TORCH_PROGRAM, OM: what the directory holds for every batch size it lists."""
    files = manifest.models.values()
    have = set()
    if files and all((model_dir / f.onnx).is_file() for f in files):
        have.add(ONNX)
    if files and all(f.om and (model_dir / f.om).is_file() for f in files):
        have.add(OM)
    programs = [manifest.torch_program] if manifest.torch_program else \
        list(manifest.source.get("torch_programs", {}).values())
    if programs and all((model_dir / p).is_file() for p in programs):
        have.add(TORCH_PROGRAM)
    return frozenset(have)


def torch_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_available() -> bool:
    """torch sees a CUDA device (asked in a child: this process stays free of torch)."""
    if not NVIDIA_DRIVER.exists() or torch_version() is None:
        return False
    try:
        probe = subprocess.run([sys.executable, "-c", "import sys, torch; "
                                "sys.exit(0 if torch.cuda.is_available() else 1)"],
                               capture_output=True, timeout=CUDA_PROBE_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def host_facts(model_facts: frozenset[str]) -> frozenset[str]:
    """The runtimes this host has (CUDA probed only where a torch program could use it)."""
    have = {name for name, module in ((ORT_INSTALLED, "onnxruntime"),
                                      (TORCH_INSTALLED, "torch"), (ACLRUNTIME, "aclruntime"))
            if importlib.util.find_spec(module) is not None}
    if TORCH_PROGRAM in model_facts and TORCH_INSTALLED in have and cuda_available():
        have.add(CUDA)
    return frozenset(have)


@dataclass(frozen=True)
class Choice:
    backend: str
    devices: tuple[str, ...]
    precision: str
    why: str                       # one phrase for the log and `status`


def choose(model_dir: Path, backend: str, devices: tuple[str, ...] | None,
           precision: str) -> Choice:
    """Resolve `auto` (backend, precision) and no --devices from the model directory and
    this host; ValueError (one line, naming the fix) when nothing fits or an explicit
    backend has no artefact here. Explicit flags are kept as given."""
    problem = model_dir_problem(model_dir)
    if problem:
        raise ValueError(problem)
    manifest = Manifest.read(model_dir)
    have = artefacts(Path(model_dir), manifest)
    why = f"--backend {backend}"
    if backend == AUTO:
        kind = devices[0].strip().lower().partition(":")[0] if devices else None
        facts = have | host_facts(have)
        row = auto_backend(facts, kind)
        if row is None:
            on = f" runs on --devices {','.join(devices)}" if devices else " this host has"
            raise ValueError(f"--backend auto: no backend{on} for {model_dir} (it holds "
                             f"{', '.join(sorted(have)) or 'no model files'}; this host has "
                             f"{', '.join(sorted(facts - have)) or 'no runtime'}); pass "
                             f"--backend and --devices, or rebuild with `pspnet build`")
        backend, why = row.backend, f"--backend auto: {row.why}"
        devices = devices or (row.device,)
    elif backend in RULES:
        precision_now = auto_precision(backend, manifest.om_compute_precision) \
            if precision == AUTO else precision
        check_backend(backend, devices or ("cpu",), precision_now, {})   # devices first
        problem = artefact_problem(backend, have, str(model_dir))
        if problem:
            raise ValueError(problem)
    devices = devices or ("cpu",)
    if precision == AUTO:
        precision = auto_precision(backend, manifest.om_compute_precision)
        why += f"; --precision auto: {precision}" + \
            (" (as the OM was built)" if backend == "acl" else "")
    return Choice(backend, tuple(devices), precision, why)


def cuda_problem(backend: str, devices: tuple[str, ...]) -> str | None:
    """CUDA asked of a CPU build of torch: the exact command that installs a CUDA one."""
    version = torch_version()
    wants_cuda = backend == "torch" and any(d.strip().lower().startswith("cuda")
                                            for d in devices)
    if wants_cuda and version is not None and version.endswith("+cpu"):
        return f"--devices {','.join(devices)}: {cuda_torch_fix(version, sys.executable)}"
    return None
