"""What each executor backend takes (devices, precisions, options), as data.

Why here, below the daemon and the stages: the CLI checks a command line against these
rules before it binds an endpoint or starts a process (one line, exit 2), and the daemon
must not import pspnet.stages (nor torch) to know that `ort` runs fp32 only; the backends
in pspnet.stages.backends read the same table when they open, so a rule is written once.
Adding a backend: its module in stages/backends/, one row here, one branch in
`open_backend`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

PRECISIONS = ("fp32", "fp16", "bf16")
SIMULATED = "sim"            # no model: a device of a given speed, for measuring the host
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
THREADS, SPIN = "threads", "spin"     # the options the CPU plan sets (core.plan)
SCHED = "sched"                       # the executor process's scheduling class (core.plan)
SCHED_CLASSES = ("batch", "normal")
RUN_SPIN = "run_spin"                 # ort: pool threads spin within a run, sleep after it
AUTO = "auto"                # --backend/--precision: chosen from the model directory
# What a model directory holds (model.artefacts reads them) and what this host has
ONNX, TORCH_PROGRAM, OM = "onnx", "torch program", "om"
ORT_INSTALLED, TORCH_INSTALLED, ACLRUNTIME, CUDA = "onnxruntime", "torch", "aclruntime", "cuda"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu126"   # as the Dockerfile's CUDA build


@dataclass(frozen=True)
class BackendRules:
    """One backend: the device kinds it runs on with the precisions each takes, the
    options it knows, and options that may be on only on some device kinds."""

    name: str
    summary: str                                  # one phrase for --backend's help
    devices: Mapping[str, tuple[str, ...]]        # device kind -> precisions there
    options: Mapping[str, str]                    # option -> what it does
    device_only: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    exclusive: tuple[tuple[str, str], ...] = ()   # options that may not both be on
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # option -> values
    precision_note: str = ""                      # said when a precision is refused
    artefact: str | None = None                   # what of a model directory it runs

    def check(self, device: str, precision: str, options: Mapping[str, str]) -> None:
        """ValueError (one line, naming the fix) if this backend cannot run `precision`
        on `device` with these options. Light: imports no runtime, opens nothing."""
        try:
            kind, _ = parse_device(device, tuple(self.devices))
        except ValueError:
            if str(device).strip().lower().partition(":")[0] in self.devices:
                raise                      # a known kind, a bad index: parse_device says
            raise ValueError(f"the {self.name} backend runs on "
                             f"{' or '.join(k + '[:N]' for k in self.devices)} "
                             f"({self.summary}), not device {device!r}") from None
        takes = self.devices[kind]
        if precision not in takes:
            raise ValueError(f"the {self.name} backend runs {'/'.join(takes)} on {kind}, "
                             f"not --precision {precision}"
                             + (f" ({self.precision_note})" if self.precision_note else "")
                             + f"; {self.where_runs(precision)}")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"unknown {self.name} backend option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(self.options)}")
        for key, values in self.choices.items():
            if key in options and str(options[key]).strip().lower() not in values:
                raise ValueError(f"{self.name} backend option {key}={options[key]}: "
                                 f"choose {' or '.join(values)}")
        for a, b in self.exclusive:
            if is_on(options, a) and is_on(options, b):
                raise ValueError(f"options {a}=1 and {b}=1 do not combine on the "
                                 f"{self.name} backend")
        for key, kinds in self.device_only.items():
            if is_on(options, key) and kind not in kinds:
                raise ValueError(f"option {key}={options[key]} needs a "
                                 f"{' or '.join(k.upper() for k in kinds)} device, "
                                 f"not {device}")

    def takes(self, option: str) -> bool:
        return option in self.options

    def where_runs(self, precision: str) -> str:
        """Where `precision` does run: this backend first, then the others."""
        def kinds(rules: BackendRules) -> str:
            return " and ".join(k for k, p in rules.devices.items() if precision in p)

        others = [f"the {r.name} backend runs {precision} on {kinds(r)}"
                  for r in RULES.values() if r.name not in (self.name, SIMULATED)
                  and kinds(r)]
        mine = [f"it runs {precision} on {kinds(self)}"] if kinds(self) else []
        return "; ".join(mine + others) or f"no backend runs {precision}"


RULES: dict[str, BackendRules] = {
    "ort": BackendRules(
        "ort", "ONNX Runtime",
        devices={"cpu": ("fp32",), "cuda": ("fp32",), "tensorrt": ("fp32", "fp16"),
                 "cann": ("fp32", "fp16")},
        options={THREADS: "intra-op threads of the session (default: the plan's)",
                 SPIN: "1: idle intra/inter-op threads spin, as onnxruntime does by "
                       "default; 0: they sleep (the plan's choice where processes share "
                       "cores)",
                 RUN_SPIN: "1: intra-op threads spin while a batch runs and sleep as soon "
                           "as it ends: no wake-up per operator, no CPU burnt while idle; "
                           "default on the batch-size-1 session where the plan has spinning "
                           "off (a lone image on an idle executor); 0: as spin says",
                 SCHED: "batch: the executor process runs as Linux SCHED_BATCH, so its "
                        "threads do not preempt the workers when they wake (the plan's "
                        "choice where they share cores); normal: as any process"},
        choices={SCHED: SCHED_CLASSES}, artefact=ONNX),
    "torch": BackendRules(
        "torch", "PyTorch (CPU or CUDA)",
        devices={"cpu": ("fp32", "bf16"), "cuda": PRECISIONS},
        options={
            THREADS: "torch.set_num_threads on CPU (process-wide; default: the plan's)",
            SCHED: "batch: the executor process runs as Linux SCHED_BATCH, so its threads "
                   "do not preempt the workers when they wake (the plan's choice where "
                   "they share cores); normal: as any process",
            "compile": "1: torch.compile the serving model (compile time in compile_seconds)",
            "compile_mode": "torch.compile mode (default, reduce-overhead, max-autotune...)",
            "compile_cache": "directory for torch.compile's on-disk caches (default: "
                             "torch's own, /tmp/torchinductor_<user>, gone after a reboot); "
                             "a restart that finds them compiles in seconds",
            "cuda_graphs": "1: capture one CUDA graph per slot and replay it (CUDA only)",
            "warmup": "warm-up runs per slot at open time (default 2 on CUDA, 1 on CPU)",
            "fused_conv": "1: each conv + bias (+ residual add) + ReLU as one cuDNN call "
                          "(CUDA, eager or cuda_graphs; BN folded at build); auto: time "
                          "both at open and keep the faster; 0 (default): off",
        },
        device_only={"cuda_graphs": ("cuda",), "fused_conv": ("cuda",)},
        exclusive=(("fused_conv", "compile"),), choices={SCHED: SCHED_CLASSES},
        artefact=TORCH_PROGRAM),
    # Ascend: stages/backends/acl.py adds what needs more than names (log_level's range,
    # feed's values, aclruntime's path rules for acl_json_path)
    "acl": BackendRules(
        "acl", "Ascend NPU: aclruntime + OM, unverified on real hardware",
        devices={"npu": ("fp16", "fp32")},
        precision_note="the OM runs as ATC built it: pspnet build --om-precision",
        artefact=OM,
        options={
            "log_level": "aclruntime session log level, 1 (debug) to 4; default: the "
                         "runtime's, 2",
            "acl_json_path": "acl.json for profiling/dump (same path rules as the OM)",
            "feed": "auto (default): inputs as BaseTensor pointers into the shared slots "
                    "where the release has it (one host-to-device copy, inside run), else "
                    "Tensor + to_device; tensor: always Tensor + to_device",
        }),
    SIMULATED: BackendRules(
        SIMULATED, "no model, a simulated device of --backend-option img_s=N speed, to "
                   "measure the host side (its masks are a fixed pattern)",
        devices={"sim": PRECISIONS, "cpu": PRECISIONS},
        options={
            "img_s": "the simulated device's speed in images/s (default 1000)",
            "sync": "1: a synchronous runtime (the batch runs in collect), not a device "
                    "queue",
            "fault": "for reliability tests: hang (a collect that never returns: a stuck "
                     "device call) or thread_exit (the collecting thread ends, as if a "
                     "native crash killed it)",
            "fault_after": "the fault fires at this batch (default 1)",
            "fault_flag": "a file: the fault fires only in the process that first creates "
                          "it, so the restarted executor runs clean",
            "head": "labels: answer as a labels-head model does (a label map at the input "
                    "size: postprocess only crops and resizes it) whatever the model's head; "
                    "for measuring the host side at its cheapest (pspnet bench "
                    "--front-ceiling)",
        }),
}
BACKENDS = tuple(k for k in RULES if k != SIMULATED)     # the real executor backends
HOST_DEVICES = ("cpu",)      # device kinds whose executor computes on the host's cores


def check_backend(backend: str, devices: tuple[str, ...], precision: str,
                  options: Mapping[str, str]) -> None:
    """`RULES[backend].check` for every device: ValueError naming the first problem."""
    if backend not in RULES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(RULES)}")
    for device in devices:
        RULES[backend].check(device, precision, options)


def parse_device(device: str, kinds: tuple[str, ...]) -> tuple[str, int]:
    """'cuda:1' -> ('cuda', 1); 'cpu' -> ('cpu', 0); kind must be one of `kinds`."""
    kind, _, index = str(device).strip().lower().partition(":")
    if kind not in kinds:
        raise ValueError(f"device {device!r}: expected one of "
                         f"{', '.join(k + '[:N]' for k in kinds)}")
    if not index:
        return kind, 0
    if not index.isdigit():
        raise ValueError(f"device {device!r}: the index after ':' must be a number")
    return kind, int(index)


def is_on(options: Mapping[str, str], key: str) -> bool:
    return str(options.get(key, "0")).strip().lower() in TRUE_WORDS


def with_plan(backend: str, options: Mapping[str, str], threads: int | None,
              spinning: bool | None) -> dict[str, str]:
    """`options` plus the plan's thread count and spinning, where this backend takes
    them; what the user set wins. ort's `run_spin` is set only for a lone image's session
    (`lone_options`)."""
    out = dict(options)
    rules = RULES.get(backend)
    if rules is None:
        return out
    if threads and rules.takes(THREADS):
        out.setdefault(THREADS, str(threads))
    if spinning is not None and rules.takes(SPIN):
        out.setdefault(SPIN, "1" if spinning else "0")
    return out


def lone_options(backend: str, options: Mapping[str, str]) -> dict[str, str]:
    """The options of the session that runs one image alone (a ladder's batch-size-1
    rung): ort's `run_spin` on where the plan left the pool's threads sleeping, so a lone
    image on an idle executor does not wait for a thread wake-up per operator (the demo:
    29.9 -> 24.9 ms idle latency, docs/performance.md "Idle latency, round 3"). Only
    there: in a full batch under load the spinning doubled the executor's CPU per image.
    What the user set wins; one thread has no pool to spin."""
    out = dict(options)
    rules = RULES.get(backend)
    if (rules is not None and rules.takes(RUN_SPIN) and out.get(SPIN) == "0"
            and out.get(THREADS) != "1"):
        out.setdefault(RUN_SPIN, "1")
    return out


# ---- --backend auto: the first row whose needs are all met --------------------------------

@dataclass(frozen=True)
class AutoRow:
    backend: str
    device: str
    needs: tuple[str, ...]        # facts: artefacts of the model directory, this host's
    why: str


AUTO_ROWS = (
    AutoRow("acl", "npu:0", (OM, ACLRUNTIME), "an Ascend OM and aclruntime"),
    AutoRow("torch", "cuda:0", (TORCH_PROGRAM, CUDA), "a torch program and a CUDA device"),
    AutoRow("ort", "cpu", (ONNX, ORT_INSTALLED), "an ONNX model and onnxruntime, no GPU"),
    AutoRow("torch", "cpu", (TORCH_PROGRAM, TORCH_INSTALLED), "a torch program, no ONNX "
            "model or onnxruntime"),
)


def auto_backend(facts: set[str] | frozenset[str], device_kind: str | None = None,
                 ) -> AutoRow | None:
    """The first AUTO_ROWS row whose needs are in `facts`. With `device_kind` (--devices
    given): the first row on that kind whose artefact and runtime are here (the device
    itself is the user's word: the backend says if it is missing), else any backend that
    runs on that kind and whose artefact is here."""
    if device_kind is None:
        return next((row for row in AUTO_ROWS if set(row.needs) <= facts), None)
    for row in AUTO_ROWS:
        if row.device.partition(":")[0] == device_kind and set(row.needs) - {CUDA} <= facts:
            return row
    for rules in RULES.values():
        if device_kind in rules.devices and rules.artefact in facts:
            return AutoRow(rules.name, device_kind, (rules.artefact,),
                           f"a {rules.artefact} and --devices {device_kind}")
    return None


def auto_precision(backend: str, om_precision: str) -> str:
    """--precision auto: what the artefact computes in (an OM as ATC built it), else fp32."""
    return om_precision if backend == "acl" else "fp32"


def artefact_problem(backend: str, artefacts: set[str] | frozenset[str],
                     model_dir: str) -> str | None:
    """Why `backend` cannot run this model directory, naming the backend that can."""
    need = RULES[backend].artefact if backend in RULES else None
    if need is None or need in artefacts:
        return None
    others = [r.name for r in RULES.values() if r.artefact in artefacts]
    has = ", ".join(sorted(artefacts)) or "no model files"
    fix = (f"use --backend {' or --backend '.join(others)} (or --backend auto)" if others
           else "rebuild it with `pspnet build`")
    return f"{model_dir} holds no {need} for the {backend} backend (it has {has}): {fix}"


def cuda_torch_fix(version: str, python: str = "python") -> str:
    """How to get a CUDA build in place of this CPU torch: the exact command."""
    base = version.split("+", 1)[0]
    return (f"this torch ({version}) is a CPU build: install a CUDA build with "
            f"`{python} -m pip install --index-url {TORCH_CUDA_INDEX} torch=={base}` "
            "(or, in the project's checkout, `PSPNET_TORCH=cu126 ./scripts/demo`, which "
            "reinstalls torch in its .venv)")
