"""The small config object every process is started with, and where its sockets live."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

BACKENDS = ("ort", "torch", "acl")     # the executor backends (stages/backends/)
SIMULATED = "sim"                      # no model: a device of a given speed, for measuring
                                       # the host side
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_MAX_PIXELS = 50_000_000        # refuse larger images from the header, before decoding
# What counts as an image file wherever a folder is read (watch, bench, batch): the formats
# model.image_io decodes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
STOP_SIGNAL = signal.SIGUSR1           # the front's "stop now" to its own workers: they ignore
                                       # SIGTERM/SIGINT/SIGHUP sent to the whole group, and
                                       # SIGUSR1's default action ends the process at once


@dataclass(frozen=True)
class PipelineConfig:
    model_dir: Path
    backend: str = "ort"                       # ort | torch | acl | sim
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
    heartbeat_s: float = 0.5                   # work loops report this often
    liveness_timeout_s: float = 5.0            # a work loop silent this long: stopped,
                                               # restarted, what it held retried
    start_timeout_s: float = 120.0             # first heartbeat (model load) within this
    run_dir: Path | None = None                # ipc sockets; None: private temp dir (0700)
    transport: str = "ipc"                     # ipc | tcp
    tcp_host: str = "127.0.0.1"
    tcp_base_port: int = 5550                  # tcp: the front's control port
    worker_threads: int = 1                    # torch/ORT threads per pre/post worker
    executor_threads: int = 0                  # 0: library default
    backend_options: dict[str, str] = field(default_factory=dict)
    log_level: str = "info"
    log_json: bool | None = None               # None: JSON unless stderr is a TTY

    @property
    def tcp_port_range(self) -> range:
        """The front's fixed tcp port (--transport tcp); workers' data ports are ephemeral."""
        return range(self.tcp_base_port, self.tcp_base_port + 1)

    @property
    def tcp_ports(self) -> str:
        """The fixed internal tcp port, for messages."""
        return str(self.tcp_base_port)

    def resolved_run_dir(self) -> Path:
        if self.run_dir is not None:
            return Path(self.run_dir)
        return Path(tempfile.mkdtemp(prefix="pspnet-"))

    def to_json(self) -> str:
        """For a child's start: plain JSON (no pickle), read back by from_json."""
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps(doc, default=str)

    @classmethod
    def from_json(cls, text: str) -> PipelineConfig:
        doc = json.loads(text)
        for key in ("model_dir", "out_dir", "run_dir"):
            if doc.get(key) is not None:
                doc[key] = Path(doc[key])
        doc["devices"] = tuple(doc["devices"])
        return cls(**doc)


@dataclass(frozen=True)
class Addresses:
    """Where the front listens (it binds; workers connect), and where a worker binds the
    sockets it receives data on (executors only: images in, outputs out)."""

    control: str       # ROUTER (front) <-> DEALER (every worker): work, notes, answers, beats
    data_host: str     # tcp: the address workers bind their data sockets on
    run_dir: Path | None   # ipc: the folder of every socket file

    @classmethod
    def for_config(cls, cfg: PipelineConfig, run_dir: Path | None) -> Addresses:
        if cfg.transport == "ipc":
            if run_dir is None:
                raise ValueError("ipc transport needs a run directory")
            return cls(f"ipc://{run_dir}/control", "", run_dir)
        if cfg.transport == "tcp":
            return cls(f"tcp://{cfg.tcp_host}:{cfg.tcp_base_port}", cfg.tcp_host, None)
        raise ValueError(f"transport must be ipc or tcp, not {cfg.transport!r}")

    def data(self, stage: str, index: int, kind: str) -> str:
        """Where worker stage-index binds its `kind` socket: a fixed ipc path (a restarted
        worker takes its predecessor's, so peers reconnect by themselves), or an ephemeral
        tcp port on data_host (the worker reports the one it got in its heartbeat)."""
        if self.run_dir is not None:
            return f"ipc://{self.run_dir}/{stage[:4]}{index}-{kind}"   # short: sun_path
        return f"tcp://{self.data_host}:*"


def start_document(cfg: PipelineConfig, addrs: Addresses) -> str:
    """What the front writes to a worker's stdin (pspnet.stages.worker reads it): JSON, no pickle,
    and nothing of the front's state."""
    return json.dumps({"config": json.loads(cfg.to_json()), "front_pid": os.getpid(),
                       "control": addrs.control, "data_host": addrs.data_host,
                       "run_dir": None if addrs.run_dir is None else str(addrs.run_dir)})


def read_start_document(text: str) -> tuple[PipelineConfig, Addresses, int]:
    """(config, addresses, the front's pid) from start_document's JSON."""
    doc = json.loads(text)
    cfg = PipelineConfig.from_json(json.dumps(doc["config"]))
    run_dir = doc["run_dir"]
    addrs = Addresses(doc["control"], doc["data_host"],
                      None if run_dir is None else Path(run_dir))
    return cfg, addrs, int(doc["front_pid"])


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
