"""sim backend: a simulated device, to measure the host side where there is no accelerator.

It runs no network and its outputs are a fixed pattern, not predictions (so its mIoU
means nothing). What it keeps is the timing contract of a device: a batch takes
1000 x batch / `img_s` ms of device time, during which the host's cores are free. By
default it is a device with a queue, like CUDA: `launch` queues the batch behind the ones
already queued and `collect` sleeps until it is done. With `sync=1` it is a synchronous
runtime instead, like onnxruntime or aclruntime: the batch runs inside `collect`. So
`pspnet bench --backend sim` shows how much of a device of a given speed this host's
decode pool, executor loop and postprocess pool deliver, and what launching ahead gains.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pspnet.core.backend_rules import RULES, SIMULATED
from pspnet.stages.backends.base import (
    BackendBase,
    check_options,
    option_flag,
    option_int,
    parse_device,
)

OPTIONS = RULES[SIMULATED].options      # pspnet.core.backend_rules: the CLI checks them
FAULTS = ("hang", "thread_exit")
DEFAULT_IMG_S = 1000


@dataclass
class SimDevice:
    """One simulated device of this process, however many backends run on it (the
    executor opens one per batch size it runs: backends.ladder)."""

    free_at: float = 0.0        # when its queue is empty again (perf_counter)
    collected: int = 0          # batches collected: fault_after counts these


DEVICES: dict[str, SimDevice] = collections.defaultdict(SimDevice)


class SimBackend(BackendBase):
    """A device that takes a fixed time per batch and answers with a fixed pattern."""

    name = "sim"

    def __init__(
        self,
        model_dir: Path,
        batch_size: int,
        *,
        device: str = "sim",
        precision: str = "fp32",
        options: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(model_dir, batch_size)
        options = dict(options or {})
        check_options(self.name, options, OPTIONS)
        parse_device(device, ("sim", "cpu"))
        self.device = DEVICES[device]
        img_s = option_int(options, "img_s")
        if img_s == 0:
            raise ValueError("option img_s=0: the simulated device needs a speed >= 1 "
                             "image/s")
        img_s = img_s or DEFAULT_IMG_S
        self.batch_s = self.batch_size / img_s
        self.sync = option_flag(options, "sync")
        self.fault = options.get("fault")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"option fault={self.fault}: choose one of {', '.join(FAULTS)}")
        self.fault_after = option_int(options, "fault_after") or 1
        self.fault_flag = options.get("fault_flag")
        head = options.get("head", self.head)
        if head not in ("logits", "labels"):
            raise ValueError(f"option head={head}: choose logits or labels")
        self.head = head                        # output_shape and the pattern follow it
        self._output = np.broadcast_to(self._pattern(), self.output_shape)

    def _fault_fires(self) -> bool:
        if self.fault is None:
            return False
        if self.fault_flag is None:
            return True
        try:
            os.close(os.open(self.fault_flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return False                        # an earlier life had the fault
        return True

    def _pattern(self) -> np.ndarray:
        """Vertical bands of every class: masks that compress and score like real ones."""
        classes = self.manifest.num_classes
        h, w = (self.input_size if self.head == "labels" else self.manifest.logits_size)
        bands = (np.arange(w) * classes // w).astype(np.uint8)
        labels = np.broadcast_to(bands, (h, w))
        if self.head == "labels":
            return np.ascontiguousarray(labels)
        return (labels[None] == np.arange(classes)[:, None, None]).astype(np.float32)

    def upload(self, slot: int, images: np.ndarray, boxes: np.ndarray) -> None:
        self._check_open()
        self._check_slot(slot)
        self._check_batch(images, boxes)
        self._put(slot, True)

    def launch(self, slot: int) -> None:
        self._take_to_launch(slot)
        if self.sync:
            self._put_launched(slot, 0.0)       # collect runs it
            return
        start = max(time.perf_counter(), self.device.free_at)
        self.device.free_at = done_at = start + self.batch_s
        self._put_launched(slot, done_at)

    def collect(self, slot: int) -> np.ndarray:
        done_at: float = self._take_launched(slot)  # type: ignore[assignment]
        self.device.collected += 1
        if self.device.collected == self.fault_after and self._fault_fires():
            if self.fault == "hang":
                threading.Event().wait()        # never returns
            raise SystemExit("simulated fault: the collecting thread ends")
        if self.sync:
            time.sleep(self.batch_s)
        else:
            time.sleep(max(0.0, done_at - time.perf_counter()))
        self.execute_times_ms.append(self.batch_s * 1000.0)
        return self._output          # read-only and never written: safe to hold and send
