"""Where a bench ran: machine name, CPUs, accelerator, library versions.

Why it is recorded with every result: an images/s figure means nothing without the card,
the core count and the runtime versions it was measured with.
"""

from __future__ import annotations

import os
import platform
import re
import socket
from importlib import metadata
from pathlib import Path
from typing import Any

from pspnet.core.plan import CGROUP, read_machine

PACKAGES = ("torch", "onnxruntime", "numpy", "opencv-python-headless", "pyzmq", "PyTurboJPEG")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def usable_cpus(cgroup: Path = CGROUP) -> float:
    """CPUs this process may use: the affinity mask, capped by a container's CPU quota
    (read as the daemon's plan reads them, pspnet.core.plan), e.g. 1.5 for a 1500m limit."""
    machine = read_machine(cgroup)
    if machine.quota is None:
        return float(machine.affinity)
    return min(float(machine.affinity), max(machine.quota, 0.01))


def accelerator(backend: str, devices: tuple[str, ...]) -> str:
    """A human name for what the executor runs on ("none (CPU)" when nothing else)."""
    kinds = {d.split(":")[0].lower() for d in devices}
    if backend == "sim":
        return "simulated device (no model)"
    if backend == "acl" or kinds & {"npu", "cann"}:
        return "Ascend NPU (aclruntime)"
    if kinds & {"cuda", "tensorrt"}:
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except Exception:  # a broken CUDA install must not stop the report
            pass
        return "CUDA device"
    return "none (CPU)"


def default_name(backend: str, devices: tuple[str, ...]) -> str:
    """`cpu-2core` on a CPU, e.g. `nvidia-h100-80gb-hbm3` on a GPU: the results' file name."""
    acc = accelerator(backend, devices)
    if acc.startswith("none"):
        return f"cpu-{cpu_count()}core"
    if backend == "sim":
        return f"cpu-{cpu_count()}core-sim"
    slug = re.sub(r"[^a-z0-9]+", "-", acc.lower()).strip("-")
    return slug + (f"-x{len(devices)}" if len(devices) > 1 else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def describe(name: str, backend: str, devices: tuple[str, ...]) -> dict[str, Any]:
    return {"machine": name, "hostname": socket.gethostname(), "cpu_count": cpu_count(),
            "usable_cpus": usable_cpus(),
            "cpu_model": cpu_model(), "accelerator": accelerator(backend, devices),
            "platform": platform.platform(), "versions": versions()}
