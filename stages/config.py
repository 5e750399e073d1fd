"""The small config object every process is started with, and where its sockets live."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_MAX_PIXELS = 50_000_000        # refuse larger images from the header, before decoding


@dataclass(frozen=True)
class PipelineConfig:
    model_dir: Path
    backend: str = "ort"                       # ort | torch | acl
    devices: tuple[str, ...] = ("cpu",)        # one executor per entry ("cpu", "cuda:0", "0")
    precision: str = "fp32"                    # fp32 | fp16 | bf16 (torch backend)
    batch_size: int | None = None              # None: 16 if built, else the largest built
    max_wait_ms: float = 20.0                  # run a partial batch after this long
    preprocess_workers: int = 2
    postprocess_workers: int = 2
    out_dir: Path | None = None                # masks go here; None: no masks
    write_masks: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_inflight: int | None = None            # dispatched, unanswered; None: 4 batches per
                                               # executor, at least 64
    stall_timeout_s: float = 600.0             # no answer for this long: retry, then error
    heartbeat_s: float = 1.0                   # children report this often
    heartbeat_timeout_s: float = 30.0          # silent this long: killed and restarted
    start_timeout_s: float = 120.0             # first heartbeat (model load) within this
    run_dir: Path | None = None                # ipc sockets; None: private temp dir (0700)
    transport: str = "ipc"                     # ipc | tcp
    tcp_host: str = "127.0.0.1"
    tcp_base_port: int = 5550                  # tcp: ports base .. base+5
    worker_threads: int = 1                    # torch/ORT threads per pre/post worker
    executor_threads: int = 0                  # 0: library default
    backend_options: dict[str, str] = field(default_factory=dict)
    log_level: str = "info"
    log_json: bool | None = None               # None: JSON unless stderr is a TTY

    @property
    def tcp_port_range(self) -> range:
        """The internal tcp ports (--transport tcp)."""
        return range(self.tcp_base_port, self.tcp_base_port + len(fields(Addresses)))

    @property
    def tcp_ports(self) -> str:
        """'FIRST-LAST' of the internal tcp ports, for messages."""
        return f"{self.tcp_port_range[0]}-{self.tcp_port_range[-1]}"

    def resolved_run_dir(self) -> Path:
        if self.run_dir is not None:
            return Path(self.run_dir)
        return Path(tempfile.mkdtemp(prefix="pspnet-"))


@dataclass(frozen=True)
class Addresses:
    """Every endpoint the front binds; children only connect."""

    prep: str          # ROUTER (front) <- DEALER (preprocess): requests out, credits in
    images_in: str     # PULL (front streamer) <- PUSH (preprocess)
    images_out: str    # PUSH (front streamer) -> PULL (executors)
    outputs_in: str    # PULL (front streamer) <- PUSH (executors)
    outputs_out: str   # PUSH (front streamer) -> PULL (postprocess)
    results: str       # PULL (front) <- PUSH (every child): answers, progress, heartbeats

    @classmethod
    def for_config(cls, cfg: PipelineConfig, run_dir: Path) -> Addresses:
        names = ("prep", "images_in", "images_out", "outputs_in", "outputs_out", "results")
        if cfg.transport == "ipc":
            return cls(*(f"ipc://{run_dir}/{name}" for name in names))
        if cfg.transport == "tcp":
            return cls(*(f"tcp://{cfg.tcp_host}:{cfg.tcp_base_port + i}"
                         for i in range(len(names))))
        raise ValueError(f"transport must be ipc or tcp, not {cfg.transport!r}")


def private_dir(path: Path) -> Path:
    """Create (or tighten) a directory only this user can enter: it holds the ipc sockets."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def output_problem(path: Path, *, directory: bool) -> str | None:
    """Why `path` cannot take a run's output (None: it can): the directory, or the file's
    parent, is created as the run would, and a file is created in it and removed.

    For a check before any work: a run that fails only at its end loses what it did.
    """
    folder = path if directory else path.parent
    if not directory and path.is_dir():
        return f"{path} is a directory"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"{folder} exists and is not a directory"
    except OSError as exc:
        return f"cannot create {folder}: {exc.strerror or exc}"
    try:                                   # os.access would not do: root passes it
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pspnet-probe-"):
            pass
    except OSError as exc:
        return f"cannot write in {folder}: {exc.strerror or exc}"
    return None
