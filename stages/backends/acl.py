"""Ascend backend: an ATC-built OM run through ais_bench's `aclruntime`, in a process of its own.

aclruntime's bindings hold the GIL through every execute and copy, so the session runs in
a child process (`acl_session`): the executor's threads keep filling the next slot,
beating the heartbeat and sending outputs while a batch executes. The slots' buffers are
shared memory: `host_buffers` are the arrays the session reads, so `upload` copies nothing
when given them, `launch` queues the slot behind the running batch (a queued device, like
CUDA), and `collect` waits on a socket (GIL released) and copies the output out.

Checks before anything is loaded, the same for every aclruntime release: the OM's path and
permissions as aclruntime since 2024-08 wants them (`check_model_path`), the log level
(1..4), and the precision the OM was built with (`pspnet build --om-precision`; ATC bakes
it in, so the backend cannot change it, only say it). `check` holds the checks that need
no model, for a caller that validates flags before starting workers.
"""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pspnet.core.backend_rules import RULES
from pspnet.model.manifest import OM_PRECISION_MODES
from pspnet.stages.backends.acl_session import (
    SessionError,
    SessionProcess,
    SlotMemory,
    exec_times_ms,
    lay_out,
)
from pspnet.stages.backends.base import (
    NUM_SLOTS,
    BackendBase,
    BackendUnavailable,
    check_options,
    option_int,
    parse_device,
)

__all__ = ["AclBackend", "check", "check_model_path", "exec_times_ms"]

MISSING_ACLRUNTIME = ("aclruntime not found: it ships with ais_bench on hosts with an Ascend "
                      "NPU and CANN; see docs/ascend.md")
OPTIONS = RULES["acl"].options         # pspnet.core.backend_rules: the CLI checks them
FEEDS = ("auto", "tensor")
LOG_LEVELS = range(1, 5)                     # aclruntime since 2024-02 throws outside 1..4
PATH_CHARS = re.compile(r"[A-Za-z0-9_./-]")  # what aclruntime since 2024-08 accepts
MAX_PATH_CHARS, MAX_NAME_CHARS, MAX_PATH_DEPTH = 4096, 255, 32   # its File.h, the same


def check(device: str, precision: str, options: Mapping[str, str]) -> int:
    """Validate the acl settings that need no model; the NPU's device id.
    ValueError with the fix in its message."""
    check_options("acl", options, OPTIONS)
    try:
        _, device_id = parse_device(device, ("npu",))
    except ValueError:
        raise ValueError(f"the acl backend runs on an Ascend NPU: device 'npu[:N]', not "
                         f"{device!r}") from None
    if precision not in OM_PRECISION_MODES:
        raise ValueError(f"the acl backend runs an OM built for fp16 or fp32 (pspnet build "
                         f"--om-precision), not {precision!r}")
    log_level = option_int(options, "log_level")
    if log_level is not None and log_level not in LOG_LEVELS:
        raise ValueError(f"option log_level={log_level}: aclruntime takes 1 (debug) to 4 "
                         "(error); its default is 2")
    if options.get("feed", "auto") not in FEEDS:
        raise ValueError(f"option feed={options['feed']!r}: {' or '.join(FEEDS)}")
    if options.get("acl_json_path"):
        check_model_path(Path(options["acl_json_path"]), ".json", "acl_json_path")
    return device_id


def check_model_path(path: Path, suffix: str, what: str = "the OM") -> Path:
    """Refuse, with the fix, a path aclruntime (2024-08 and later) would refuse saying only
    "please check model path"; return the path to give it. Its `CheckFileBeforeRead` checks
    the absolute path (the working directory joined to a relative one, '.' and '..' folded,
    links not followed): only [A-Za-z0-9_./-], at most 4,096 characters, names of at most
    255, at most 32 '/', a regular file that is no symbolic link, not group- or
    other-writable, readable by its owner, the suffix. The daemon hands it that absolute
    path, so the process's working directory cannot change the answer."""
    text = os.path.abspath(path)
    bad = "".join(sorted(set(PATH_CHARS.sub("", text))))
    if bad:
        raise ValueError(f"{what} {text!r}: aclruntime refuses paths with characters outside "
                         f"[A-Za-z0-9_./-] (here {bad!r}), in the whole absolute path; move "
                         "or rename the model directory")
    if (len(text) > MAX_PATH_CHARS or text.count("/") > MAX_PATH_DEPTH
            or any(len(name) > MAX_NAME_CHARS for name in text.split("/"))):
        raise ValueError(f"{what} {text}: aclruntime refuses a path over {MAX_PATH_CHARS} "
                         f"characters, a name over {MAX_NAME_CHARS} or more than "
                         f"{MAX_PATH_DEPTH} '/'; move the model directory higher up")
    if not text.endswith(suffix):
        raise ValueError(f"{what} {text}: aclruntime wants a {suffix} file")
    if os.path.islink(text):
        raise ValueError(f"{what} {text} is a symbolic link, which aclruntime refuses; put "
                         f"the file itself there: cp --remove-destination "
                         f"\"$(readlink -f {text})\" {text}")
    if not os.path.isfile(text):
        raise FileNotFoundError(f"{what} {text}: no such file")
    mode = stat.S_IMODE(os.stat(text).st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(f"{what} {text} is group- or other-writable ({mode:04o}), which "
                         f"aclruntime refuses: chmod 640 {text}")
    if not mode & stat.S_IRUSR or not os.access(text, os.R_OK):
        raise ValueError(f"{what} {text} is not readable by its owner or by this user "
                         f"({mode:04o}), which aclruntime refuses: chmod 640 {text}, as "
                         "the user who runs the daemon")
    return Path(text)


class AclBackend(BackendBase):
    """aclruntime.InferenceSession on `manifest.models[batch_size].om`, static batch, in a
    session process of its own."""

    name = "acl"

    def __init__(
        self,
        model_dir: Path,
        batch_size: int,
        *,
        device: str = "npu:0",
        precision: str = "fp16",
        options: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(model_dir, batch_size)
        options = dict(options or {})
        self.device_id = check(device, precision, options)
        self.device = device
        om = self.om_path()
        self.precision = self.manifest.om_compute_precision
        if precision != self.precision:
            raise ValueError(self._precision_problem(precision))
        om = check_model_path(om, ".om")
        if not _importable("aclruntime"):
            raise BackendUnavailable(MISSING_ACLRUNTIME)
        arrays = {"image": (self.image_shape, np.uint8), "box": (self.box_shape, np.int32),
                  "output": (self.output_shape, self.output_dtype)}
        self._memory = SlotMemory.create(lay_out(NUM_SLOTS, arrays))
        start = {"model": str(om), "device": self.device_id, "sys_path": list(sys.path),
                 "log_level": option_int(options, "log_level"),
                 "acl_json_path": os.path.abspath(options["acl_json_path"])
                 if options.get("acl_json_path") else None,     # as check_model_path did
                 "feed": options.get("feed", "auto")}
        try:
            self._session: SessionProcess | None = SessionProcess(start, self._memory)
        except SessionError as exc:
            self._memory.close()
            if exc.kind == "unavailable":
                raise BackendUnavailable(f"{MISSING_ACLRUNTIME} ({exc})") from None
            raise (ValueError if exc.kind == "value" else RuntimeError)(str(exc)) from None
        ready = self._session.ready
        self.runtime_features: dict[str, bool] = dict(ready["features"])
        self.context_binding: str = ready["context"]     # "set_context" or "to_device"
        self.feed: str = ready["feed"]                   # "BaseTensor" or "Tensor"
        try:
            self._check_model(ready["inputs"], ready["outputs"])
        except ValueError:
            self.close()
            raise

    def _precision_problem(self, asked: str) -> str:
        mode = OM_PRECISION_MODES[self.precision]
        how = (f"--precision_mode={mode}" if self.manifest.om_precision else
               f"no --precision_mode: ATC's default, {mode}")
        return (f"this OM computes in {self.precision} (its ATC script set {how}); pass "
                f"precision {self.precision}, or rebuild with `pspnet build --om-precision "
                f"{asked}` and rerun the ATC scripts")

    def om_path(self) -> Path:
        """The OM the manifest names, else the ATC script's output next to the ONNX."""
        name = self.model_file.om or str(Path(self.model_file.onnx).with_suffix(".om"))
        path = self.model_dir / name
        if not path.is_file() and not path.is_symlink():
            named = sorted(path.parent.glob(f"{path.stem}_*.om"))   # ATC's <os>_<arch> name
            if len(named) == 1:
                raise FileNotFoundError(
                    f"{path}: no such file, but ATC wrote {named[0].name} (CANN 7 and later "
                    f"may add the OS and CPU to the name): mv {named[0]} {path}")
            script = self.model_file.atc or f"pspnet_bs{self.batch_size}.atc.sh"
            raise FileNotFoundError(
                f"{path}: no Ascend OM for batch size {self.batch_size}; run "
                f"{self.model_dir / script} on a host with the CANN toolkit (ATC) to make it"
            )
        return path

    def _check_model(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        """Match the OM's descriptors to the manifest: names, static shapes, exact bytes."""
        names = [d["name"] for d in inputs]
        if sorted(names) != ["box", "image"]:
            raise ValueError(f"OM inputs {names}, expected image and box (build the OM from "
                             "the ONNX that `pspnet build` wrote)")
        expected = {"image": (self.image_shape, np.uint8), "box": (self.box_shape, np.int32)}
        for desc in inputs:
            shape, dtype = expected[desc["name"]]
            _check_desc(f"OM input {desc['name']}", desc, shape, dtype, self.batch_size)
        if len(outputs) != 1:
            raise ValueError(f"OM has {len(outputs)} outputs, expected 1 ({self.head})")
        _check_desc(f"OM output {outputs[0]['name']}", outputs[0], self.output_shape,
                    self.output_dtype, self.batch_size)

    def host_buffers(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """The slot's input arrays in the shared memory the session reads."""
        self._check_open()
        self._check_slot(slot)
        return self._memory.view(slot, "image"), self._memory.view(slot, "box")

    def upload(self, slot: int, images: np.ndarray, boxes: np.ndarray) -> None:
        """Into the slot's shared buffers (nothing to copy when given them); no aclruntime
        call here, so this never waits for a running batch."""
        self._check_open()
        self._check_slot(slot)
        images, boxes = self._check_batch(images, boxes)
        for array, name in ((images, "image"), (boxes, "box")):
            shared = self._memory.view(slot, name)
            if array is not shared:
                np.copyto(shared, array)
        self._put(slot, True)

    def launch(self, slot: int) -> None:
        """Queue the slot's batch in the session process, behind the one that runs."""
        self._take_to_launch(slot)
        assert self._session is not None
        self._session.run(slot)
        self._put_launched(slot, True)

    def collect(self, slot: int) -> np.ndarray:
        """Wait for the slot's batch (GIL released) and copy its output out of the slot."""
        self._take_launched(slot)
        assert self._session is not None
        try:
            result = self._session.result(slot)
        except SessionError as exc:
            raise RuntimeError(str(exc)) from None
        if "error" in result:
            raise RuntimeError(f"aclruntime: {result['error']}")
        self.execute_times_ms.extend(float(t) for t in result["times_ms"])
        return self._memory.view(slot, "output").copy()

    def close(self) -> None:
        if not self._closed:
            session, self._session = self._session, None
            if session is not None:
                session.close()
            self._memory.close()
        super().close()


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):   # a broken entry in sys.modules: let the child say
        return True


def _check_desc(what: str, desc: Mapping[str, Any], shape: tuple[int, ...], dtype: Any,
                batch_size: int) -> None:
    dims = [int(d) for d in desc["shape"]]
    if any(d < 0 for d in dims):
        raise ValueError(f"{what}: dynamic shape {dims}; the executor needs a static-batch "
                         f"OM (atc --input_shape with batch {batch_size})")
    need = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if dims != list(shape) or int(desc["realsize"]) != need:
        raise ValueError(f"{what}: {dims} ({desc['datatype']}, {desc['realsize']} bytes), "
                         f"expected {list(shape)} {np.dtype(dtype).name} ({need} bytes) for "
                         f"batch size {batch_size}; rebuild the OM with its "
                         f"pspnet_bs{batch_size}.atc.sh")
