"""The backend interface and what every backend module shares: the `Backend` protocol,
`BackendBase` (slots, checks, timing) and the option and device parsers.

Apart from the package's `open_backend`, which imports the backend modules, so that they
can import this without an import circle.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from pspnet.core.backend_rules import BACKENDS, FALSE_WORDS, TRUE_WORDS
from pspnet.core.backend_rules import parse_device as parse_device  # for the backends

if TYPE_CHECKING:
    from pspnet.model.manifest import Manifest, ModelFile

NUM_SLOTS = 2
KINDS = BACKENDS           # named once, in core.config (the CLI reads them there)


class BackendUnavailable(RuntimeError):
    """The runtime, device or provider a backend needs is not present on this host."""


@runtime_checkable
class Backend(Protocol):
    name: str                       # "ort" | "torch" | "acl"
    batch_size: int                 # the static batch size this backend runs
    head: str                       # "logits" | "labels" (from the manifest)
    input_size: tuple[int, int]     # (H, W) of the uint8 NHWC input
    execute_times_ms: list[float]   # pure compute time of each execute, for the bench
    open_seconds: float             # what opening took (load, compile, warm-up): set by
                                    # open_backend; a daemon start pays it before batch one
    compile_seconds: float | None   # torch.compile's share of it; None: no compile

    def host_buffers(self, slot: int) -> tuple[np.ndarray, np.ndarray]: ...
    def upload(self, slot: int, images: np.ndarray, boxes: np.ndarray) -> None: ...
    def launch(self, slot: int) -> None: ...
    def collect(self, slot: int) -> np.ndarray: ...
    def execute(self, slot: int) -> np.ndarray: ...
    def close(self) -> None: ...


def throughput(batch_size: int, execute_times_ms: list[float]) -> float:
    """ais_bench-style images/s: 1000 * batch / mean execute ms (transfers excluded)."""
    if not execute_times_ms:
        return 0.0
    return 1000.0 * batch_size / statistics.fmean(execute_times_ms)


# ---- shared by the backend modules -------------------------------------------------------

class BackendBase:
    """Slot bookkeeping, argument checks and timing that every backend shares.

    Subclasses set `name`, fill `_slots[slot]` in `upload` and take it in `collect` (a
    synchronous runtime) or in `launch` (a device with a queue); `execute_times_ms` grows
    by one entry per batch (clear it from the caller for long runs:
    `del backend.execute_times_ms[:]`).
    """

    name = "base"

    def __init__(self, model_dir: Path, batch_size: int) -> None:
        from pspnet.model.manifest import Manifest

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"{self.model_dir}: no such model directory; make it "
                                    "with `pspnet build`")
        self.manifest: Manifest = Manifest.read(self.model_dir)
        self.model_file: ModelFile = self.manifest.model_file(batch_size)
        self.batch_size = int(batch_size)
        self.head = self.manifest.head
        self.input_size = (int(self.manifest.input_size[0]), int(self.manifest.input_size[1]))
        self.execute_times_ms: list[float] = []
        self.open_seconds = 0.0                  # open_backend sets it
        self.compile_seconds: float | None = None
        self._slots: list[object | None] = [None] * NUM_SLOTS      # uploaded, not launched
        self._launched: list[object | None] = [None] * NUM_SLOTS   # launched, not collected
        self._host: list[tuple[np.ndarray, np.ndarray]] = []
        self._closed = False

    # -- shapes the graph takes and gives, for checks at open time and on upload
    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, *self.input_size, 3)

    @property
    def box_shape(self) -> tuple[int, int]:
        return (self.batch_size, 4)

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.head == "labels":
            return (self.batch_size, *self.input_size)
        return (self.batch_size, self.manifest.num_classes, *self.manifest.logits_size)

    @property
    def output_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.head == "labels" else np.float32)

    def host_buffers(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """The (images, boxes) arrays to assemble batch `slot` in; `upload` of these very
        arrays copies nothing it need not. Plain memory here, made on first use."""
        self._check_slot(slot)
        if not self._host:
            self._host = [(np.zeros(self.image_shape, np.uint8),
                           np.zeros(self.box_shape, np.int32)) for _ in range(NUM_SLOTS)]
        return self._host[slot]

    def launch(self, slot: int) -> None:
        """Start the uploaded batch. A synchronous runtime has nothing to start: `collect`
        runs it."""
        self._check_open()
        self._check_slot(slot)

    def collect(self, slot: int) -> np.ndarray:
        """The launched batch's outputs as a host array the caller may keep (fresh, or
        never written again); waits for the batch, or runs it."""
        raise NotImplementedError

    def execute(self, slot: int) -> np.ndarray:
        """One batch start to finish: launch, then collect."""
        self.launch(slot)
        return self.collect(slot)

    def throughput(self) -> float:
        return throughput(self.batch_size, self.execute_times_ms)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} backend is closed")

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < NUM_SLOTS:
            raise ValueError(f"slot must be in 0..{NUM_SLOTS - 1}, not {slot}")

    def _check_batch(self, images: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray,
                                                                          np.ndarray]:
        """The arrays as C-contiguous uint8 / int32 of the static shapes, or ValueError.

        A static-batch model cannot take a partial batch: the caller pads it (and drops
        the padding rows' outputs).
        """
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(f"images must be a uint8 ndarray, got "
                             f"{getattr(images, 'dtype', type(images).__name__)}")
        if not isinstance(boxes, np.ndarray) or boxes.dtype != np.int32:
            raise ValueError(f"boxes must be an int32 ndarray, got "
                             f"{getattr(boxes, 'dtype', type(boxes).__name__)}")
        if images.shape != self.image_shape:
            raise ValueError(f"images shape {images.shape}, this {self.name} backend takes "
                             f"{self.image_shape} (pad a partial batch to {self.batch_size})")
        if boxes.shape != self.box_shape:
            raise ValueError(f"boxes shape {boxes.shape}, this {self.name} backend takes "
                             f"{self.box_shape}")
        return np.ascontiguousarray(images), np.ascontiguousarray(boxes)

    def _put(self, slot: int, state: object) -> None:
        self._slots[slot] = state

    def _take(self, slot: int) -> object:
        return self._pop(self._slots, slot, "upload")

    def _take_to_launch(self, slot: int) -> object:
        """The uploaded batch, for a backend whose launch queues it: refused, with the
        upload left pending, while the slot's last launch is not yet collected."""
        self._check_open()
        self._check_slot(slot)
        if self._launched[slot] is not None:
            raise RuntimeError(f"launch({slot}) twice without collect({slot})")
        return self._take(slot)

    def _put_launched(self, slot: int, state: object) -> None:
        """For a backend whose launch returns before the batch is done: what collect needs.
        Its launch took the batch with `_take_to_launch`, which refuses a second launch."""
        self._launched[slot] = state

    def _take_launched(self, slot: int) -> object:
        return self._pop(self._launched, slot, "launch")

    def _pop(self, states: list[object | None], slot: int, step: str) -> object:
        """Take the slot's state out of `states`; refused when `step` has not filled it."""
        self._check_open()
        self._check_slot(slot)
        state = states[slot]
        if state is None:
            raise RuntimeError(f"slot {slot}: no batch pending ({step} it first)")
        states[slot] = None
        return state

    def close(self) -> None:
        self._slots = [None] * NUM_SLOTS
        self._launched = [None] * NUM_SLOTS
        self._host = []
        self._closed = True

    def __enter__(self) -> BackendBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_options(kind: str, options: Mapping[str, str], allowed: Mapping[str, str]) -> None:
    """Reject option keys this backend does not know, so a typo is not silently ignored."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in allowed.items())
        raise ValueError(f"unknown {kind} backend option(s) {', '.join(unknown)}; "
                         f"known: {known}")


def option_flag(options: Mapping[str, str], key: str) -> bool:
    value = str(options.get(key, "0")).strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError(f"option {key}={value!r}: expected 0/1")


def option_int(options: Mapping[str, str], key: str) -> int | None:
    if key not in options:
        return None
    try:
        value = int(options[key])
    except (TypeError, ValueError):
        raise ValueError(f"option {key}={options[key]!r}: expected an integer") from None
    if value < 0:
        raise ValueError(f"option {key}={value}: must be >= 0")
    return value

