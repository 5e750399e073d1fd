"""Executor backends: one small interface over onnxruntime, torch and Ascend aclruntime.

The executor drives a backend from two threads over NUM_SLOTS batch slots. The assembling
thread fills a slot's `host_buffers` (pinned memory where a device copies from it), then
calls `upload(slot, ...)` and `launch(slot)`; the runner thread calls `collect(slot)` in
launch order and gets a fresh host array back. A device with a queue (CUDA) starts the
batch in `launch`, behind the one that is running, so it never waits for the host to
collect, send and relaunch; so does the acl backend, in its session process (aclruntime
holds the GIL through a batch); a synchronous runtime (onnxruntime) runs it in
`collect`. `execute` is launch + collect, for callers with one batch at a time. The
interface lives in `base` (which the backend modules import); `open_backend` imports only
the backend module it opens, so `open_backend('ort', ...)` never pulls in torch and
nothing pulls in aclruntime until an `acl` backend is opened (in its session process).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from pspnet.core.backend_rules import PRECISIONS, RULES, SIMULATED
from pspnet.stages.backends.base import (
    KINDS,
    NUM_SLOTS,
    Backend,
    BackendBase,
    BackendUnavailable,
    throughput,
)


def open_backend(
    kind: str,
    model_dir: Path,
    batch_size: int,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    options: Mapping[str, str] | None = None,
) -> Backend:
    """Open the backend `kind` for the static batch size `batch_size` of `model_dir`.

    Backend modules are imported here, lazily, so a host without torch CUDA or aclruntime
    can still open the others. What each backend takes is checked first against the
    table the CLI checks too (pspnet.core.backend_rules).
    """
    model_dir = Path(model_dir)
    options = dict(options or {})
    if kind in RULES:                      # device, precision, option names: core's table
        RULES[kind].check(device, precision, options)
    cls: type[BackendBase]
    if kind == "ort":
        from pspnet.stages.backends.ort import OrtBackend as cls
    elif kind == "torch":
        from pspnet.stages.backends.torch_backend import TorchBackend as cls
    elif kind == "acl":
        from pspnet.stages.backends.acl import AclBackend as cls
    elif kind == SIMULATED:
        from pspnet.stages.backends.sim import SimBackend as cls
    else:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(KINDS)} "
                         f"(or {SIMULATED}: a simulated device)")
    started = time.perf_counter()
    backend = cls(model_dir, batch_size, device=device, precision=precision, options=options)
    backend.open_seconds = time.perf_counter() - started
    return backend


__all__ = [
    "KINDS",
    "NUM_SLOTS",
    "PRECISIONS",
    "SIMULATED",
    "Backend",
    "BackendBase",
    "BackendUnavailable",
    "open_backend",
    "throughput",
]
