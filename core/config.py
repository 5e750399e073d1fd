"""The small config object every process is started with, and where its sockets live.

Each setting is declared once, on its field (`setting`: default, flag and help); the
commands write the flags they need from these declarations (core.cli_args.add_flags).
Worker counts and executor threads left at None are planned from this host's CPUs and
the devices (core.plan) when the config is made.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pspnet.core.backend_rules import (
    AUTO,
    FALSE_WORDS,
    PRECISIONS,
    RULES,
    SCHED,
    SIMULATED,
    SPIN,
    THREADS,
    TRUE_WORDS,
    with_plan,
)
from pspnet.core.cli_args import (
    CollectPairs,
    base_port,
    device_list,
    host_address,
    key_value,
    log_format,
    non_negative_float,
    positive_float,
    positive_int,
    setting,
)
from pspnet.core.plan import Given, make_plan, this_machine
from pspnet.core.trust import Trust
from pspnet.core.wire import DEFAULT_MAX_PIXELS as DEFAULT_MAX_PIXELS

# DEFAULT_MAX_PIXELS: refuse larger images from the header, before decoding; core.wire holds
# the value, so that every placement on the wire meets the same bound.
# What counts as an image file wherever a folder is read (watch, bench, batch): the formats
# model.image_io decodes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
UNREAD_PHOTO_SUFFIXES = (".heic", ".heif", ".avif")   # phones' photos the daemon cannot read:
                                                      # named when a folder walk skips them
STOP_SIGNAL = signal.SIGUSR1           # the front's "stop now" to its own workers: they ignore
                                       # SIGTERM/SIGINT/SIGHUP sent to the whole group, and
                                       # SIGUSR1's default action ends the process at once
BACKEND_HELP = "; ".join(f"{r.name}: {r.summary}" for r in RULES.values())
PRECISION_HELP = ("compute precision, checked against the backend and devices before "
                  "anything starts: " + "; ".join(
                      f"{p} on " + ", ".join(
                          f"{r.name} {'/'.join(k for k, ps in r.devices.items() if p in ps)}"
                          for r in RULES.values()
                          if r.name != SIMULATED and any(p in ps for ps in r.devices.values()))
                      for p in PRECISIONS))


@dataclass(frozen=True)
class PipelineConfig:
    model_dir: Path = setting(flag="--model", type=Path, metavar="DIR", required=True,
                              help="a directory made by `pspnet build` (manifest.json + "
                                   "models)")
    backend: str = setting("ort", flag="--backend", choices=(AUTO, *RULES),
                           help=f"{AUTO} (the commands' default): read from the model "
                                "directory and this host: acl where an OM and aclruntime "
                                "are, torch on cuda:0 where CUDA and a torch program are, "
                                "else ort on cpu, else torch on cpu; " + BACKEND_HELP)
    devices: tuple[str, ...] = setting(
        ("cpu",), flag="--devices", type=device_list,
        help="comma list, one executor each: cpu, cuda:0, cuda:1 (torch/ort), tensorrt:0, "
             "cann:0 (ort), or npu:0,npu:1 (acl) (default: --backend auto's choice, else "
             "cpu)")
    precision: str = setting("fp32", flag="--precision", choices=(AUTO, *PRECISIONS),
                             help=f"{AUTO} (the commands' default): the artefact's own (an "
                                  "OM as ATC built it, else fp32); " + PRECISION_HELP)
    batch_size: int | None = setting(
        None, flag="--batch-size", type=positive_int,
        help="static batch size to run (default: 16 if built, else the largest)")
    max_wait_ms: float = setting(
        20.0, flag="--max-wait-ms", type=non_negative_float,
        help="while the device is busy, how long a partial batch waits for companions "
             "before it is queued behind the running one (an idle device never waits: it "
             "runs what is queued at once, at the smallest built batch size that holds it)")
    preprocess_workers: int | None = setting(
        None, flag="--preprocess-workers", type=positive_int, metavar="K",
        help="JPEG decode + letterbox processes (default: the plan's, from this host's "
             "CPUs and the devices; logged at start)")
    postprocess_workers: int | None = setting(
        None, flag="--postprocess-workers", type=positive_int, metavar="M",
        help="upsample/argmax/mask/mIoU processes (default: the plan's)")
    out_dir: Path | None = setting(
        None, flag="--out", type=Path, metavar="MASKDIR",
        help="write masks here as palette PNGs at each image's own path with .png added "
             "(/data/a/x.jpg -> MASKDIR/data/a/x.jpg.png), so a/x.jpg and b/x.jpg never "
             "share one and the same image again replaces its own (without --out no mask "
             "files are written; answers carry mask null)")
    write_masks: bool = setting(True, flag="--no-masks", action="store_false",
                                help="do not write masks (benches)")
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS, flag="--max-pixels", type=positive_int,
        help="refuse images with more pixels (read from the header, before decoding)")
    max_upload_bytes: int = setting(
        64 << 20, flag="--max-upload-bytes", type=positive_int, metavar="BYTES",
        help="the largest encoded image a client may send instead of a path (pspnet submit "
             "--upload); a larger one is answered with an error, never read whole")
    coalesce_ms: float = setting(
        5.0, flag="--coalesce-ms", type=non_negative_float, metavar="MS",
        help="control per batch: a worker sends what it finished in one note, at most this "
             "long after the first of it while work trickles in, at most 4 times this long "
             "while it streams (a batch's images finished back to back); an idle worker "
             "sends at once; 0: one note per image")
    max_inflight: int | None = setting(
        None, flag="--max-inflight", type=positive_int,
        help="requests inside the pipeline at once (bounds memory; default: four batches "
             "per executor, at least 64)")
    stall_timeout_s: float = 600.0             # no answer for this long: retry, then error
    heartbeat_s: float = 0.5                   # work loops report this often
    liveness_timeout_s: float = setting(
        5.0, flag="--liveness-timeout", type=positive_float, metavar="S",
        help="a worker whose work loop has not reported progress for S seconds (hung, "
             "stopped, a device call stuck past its allowance) is stopped and restarted, "
             "and what it held is retried once")
    start_timeout_s: float = 120.0             # first heartbeat (model load) within this
    generation: int = 0                        # which model the front started this with:
                                               # a live reload starts the next (daemon.reload)
    first_batch_check: bool = False            # executor: run one batch before its first
                                               # beat (a reload's model must pass it)
    run_dir: Path | None = None                # ipc sockets; None: private temp dir (0700)
    transport: str = setting("ipc", flag="--transport", choices=("ipc", "tcp"),
                             help="between the daemon's own processes")
    tcp_host: str = setting(
        "127.0.0.1", flag="--tcp-host", type=host_address, metavar="ADDR",
        help="with --transport tcp: the address the front's control port and the workers' "
             "data ports are bound on, and that this host's own workers connect to. The "
             "default admits this host only; give this host's address to let `pspnet "
             "worker --front ADDR --keys DIR` join from others (every tcp port speaks "
             "CurveZMQ and admits only the worker key: see --keys)")
    tcp_base_port: int = setting(
        5550, flag="--tcp-base-port", type=base_port,
        help="with --transport tcp: the front's control port (workers' data ports are "
             "chosen by the system and reported to the front)")
    keys_dir: Path | None = setting(
        None, flag="--keys", type=Path, metavar="DIR",
        help="CurveZMQ keys for every tcp socket (`pspnet keys DIR` writes them; serve "
             "writes those DIR lacks): serve reads server and worker keys, and the client "
             "key a tcp --endpoint admits; `pspnet worker` needs worker.key_secret and "
             "server.key copied from the daemon's DIR. Without it, serve --transport tcp "
             "makes keys in memory and only its own workers can join")
    worker_threads: int = 1                    # torch/cv2 threads per pre/post worker
    executor_threads: int | None = None        # intra-op threads; None: the plan's
                                               # (--backend-option threads=N sets it)
    executor_spin: bool | None = None          # idle ORT threads spin; None: the plan's
    backend_options: dict[str, str] = setting(
        flag="--backend-option", type=key_value, action=CollectPairs, metavar="KEY=VALUE",
        default_factory=dict,
        help="backend tuning, repeatable: threads=N, spin=0|1, sched=batch|normal "
             "(ort/torch: the plan sets them), cuda_graphs=1, compile=1, "
             "compile_cache=DIR (torch), img_s=N, "
             "sync=1 (sim; and fault=hang|thread_exit, fault_after=N, fault_flag=FILE to "
             "simulate a stuck or broken device in reliability tests)")
    log_level: str = setting("info", flag="--log-level",
                             choices=("debug", "info", "warning", "error"),
                             help="debug adds per-batch timings")
    log_json: bool | None = setting(
        None, flag="--log-format", type=log_format, metavar="{auto,json,console}",
        help="auto (default): console lines on a TTY, JSON lines otherwise")
    plan: dict[str, Any] = field(default_factory=dict)   # how core.plan chose; set here
    choice: str = ""                           # how backend and precision were chosen

    def __post_init__(self) -> None:
        """Plan what was left at None (flags set the rest), once: a child's copy and
        `replace` keep the values and the plan's record."""
        if AUTO in (self.backend, self.precision):
            raise ValueError("--backend/--precision auto is resolved from the model "
                             "directory before a config is made (model.artefacts.choose)")
        if self.plan and None not in (self.preprocess_workers, self.postprocess_workers,
                                      self.executor_threads, self.executor_spin):
            return
        options = self.backend_options
        threads = str(options.get(THREADS, "")).strip()
        spin = str(options.get(SPIN, "")).strip().lower()
        given = Given(self.preprocess_workers, self.postprocess_workers,
                      self.executor_threads if self.executor_threads is not None else
                      (int(threads) if threads.isdigit() else None),
                      self.executor_spin if self.executor_spin is not None else
                      (spin in TRUE_WORDS if spin and spin in TRUE_WORDS + FALSE_WORDS
                       else None),
                      str(options.get(SCHED, "")).strip().lower() or None)
        planned = make_plan(this_machine(), self.backend, tuple(self.devices), given,
                            precision=self.precision, choice=self.choice)
        for name, value in (("preprocess_workers", planned.preprocess_workers),
                            ("postprocess_workers", planned.postprocess_workers),
                            ("executor_threads", planned.executor_threads),
                            ("executor_spin", planned.spinning),
                            ("plan", planned.as_dict())):
            object.__setattr__(self, name, value)

    def executor_options(self) -> dict[str, str]:
        """The backend's options with the plan's threads and spinning, where this backend
        takes them (what --backend-option set wins)."""
        return with_plan(self.backend, self.backend_options, self.executor_threads,
                         self.executor_spin)

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
        for key in ("model_dir", "out_dir", "run_dir", "keys_dir"):
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


def start_document(cfg: PipelineConfig, addrs: Addresses, trust: Trust,
                   curve: dict[str, str] | None = None) -> str:
    """What the front writes to a worker's stdin (pspnet.stages.worker reads it): JSON, no
    pickle, nothing of the front's state but the secrets its tokens and identities are
    made with (core.trust) and, with
    tcp, the worker's CurveZMQ keys (a pipe: no file others could read; core.trust,
    core.keys)."""
    return json.dumps({"config": json.loads(cfg.to_json()), "front_pid": os.getpid(),
                       "secret": trust.secret.hex(),
                       "own": None if trust.own is None else trust.own.hex(), "curve": curve,
                       "control": addrs.control, "data_host": addrs.data_host,
                       "run_dir": None if addrs.run_dir is None else str(addrs.run_dir)})


def read_start_document(text: str,
                        ) -> tuple[PipelineConfig, Addresses, int, Trust, dict[str, str] | None]:
    """(config, addresses, the front's pid, the secrets, the CurveZMQ keys or None) from
    start_document's JSON."""
    doc = json.loads(text)
    cfg = PipelineConfig.from_json(json.dumps(doc["config"]))
    run_dir = doc["run_dir"]
    addrs = Addresses(doc["control"], doc["data_host"],
                      None if run_dir is None else Path(run_dir))
    own = doc["own"]
    trust = Trust(bytes.fromhex(doc["secret"]), None if own is None else bytes.fromhex(own))
    return cfg, addrs, int(doc["front_pid"]), trust, doc["curve"]


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


def outputs_problem(*outputs: tuple[str, Path | None, bool]) -> str | None:
    """'FLAG: why' for the first (flag, path, is a directory) that cannot take this run's
    output, found before any work; None when all can (a None path is not asked for)."""
    for flag, path, directory in outputs:
        problem = path is not None and output_problem(path, directory=directory)
        if problem:
            return f"{flag}: {problem}"
    return None
