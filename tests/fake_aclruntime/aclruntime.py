"""Stand-in for ais_bench's `aclruntime`, as strict as the real module where the acl backend
depends on it (/work/shared/reference/aclruntime.md, read from aclruntime's pybind11 source).

Tests put this directory first on sys.path so that `import aclruntime` finds it; the acl
backend's session process (a fresh interpreter) gets the parent's sys.path, and reads the
knobs below from its environment. Underneath, it runs the sibling `.onnx` (same stem as the
`.om`) with onnxruntime on the CPU, in fp32.

What it enforces, as the real module does:
- The GIL: every binding call holds one lock (`_BINDINGS`), and `run` spends
  FAKE_ACLRUNTIME_EXECUTE_MS inside a C call that keeps the GIL (ctypes.PyDLL), as
  aclmdlExecute does under bindings without `gil_scoped_release`: no other Python thread of
  the process runs meanwhile.
- ACL's current context is per thread: the session's constructor and `Tensor.to_device`
  bind it on the calling thread; `set_context()` (2024-05+) too; `run` binds it itself only
  in wheels built after September 2023. On the 2023 release, `run` on a thread without one
  fails, as every batch of an executor whose runner thread only ever calls `run` would.
- Inputs: `Tensor`s moved `to_device`, or `BaseTensor(pointer, nbytes)` (copied to the
  device inside `run`), exact byte sizes; outputs stay on the device until `to_host()`, and
  `np.array` of a device tensor is a 0-d object array (the binding's buffer error is
  swallowed by numpy). A Tensor's properties are `type`, `device`, `dtype` and `shape` only.
- Since 2024: `session_options().log_level` outside 1..4 throws; model paths are
  refused with "please check model path" when their absolute form (a relative path joined
  to the working directory) has a character outside [A-Za-z0-9_./-], is over 4,096
  characters, has a name over 255 or more than 32 '/', or when the file is not a regular
  one, is a symbolic link, is group- or other-writable, is not readable by its owner, or
  has another suffix than `.om`.

Knobs (environment): FAKE_ACLRUNTIME_RELEASE "2023" (a 2023-06 wheel: no set_context,
free_resource or log-level/path checks; run binds no context; times in ms), "2025" (the
default: all of those; times as (start, end) pairs) or "newest" (as 2025, with the summary
methods of the binding's newest public source, PyInferenceSession.cpp: `sumary` and
`summary`, and `reset_summaryinfo` where older wheels had `reset_sumaryinfo`);
FAKE_ACLRUNTIME_NO_BASETENSOR=1 (a wheel older than BaseTensor); FAKE_ACLRUNTIME_EXECUTE_MS
(device time per run, GIL held); FAKE_ACLRUNTIME_DEVICES (device count, default 1);
FAKE_ACLRUNTIME_TRACE (a file to which every binding call appends a JSON line: op, pid,
thread, start, end on CLOCK_MONOTONIC).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime

RELEASE = os.environ.get("FAKE_ACLRUNTIME_RELEASE", "2025")
if RELEASE not in ("2023", "2025", "newest"):
    raise ImportError(f"FAKE_ACLRUNTIME_RELEASE={RELEASE!r}: 2023, 2025 or newest")
NEW = RELEASE != "2023"
NEWEST = RELEASE == "newest"
EXECUTE_MS = float(os.environ.get("FAKE_ACLRUNTIME_EXECUTE_MS", "0"))
DEVICE_COUNT = int(os.environ.get("FAKE_ACLRUNTIME_DEVICES", "1"))
TRACE = os.environ.get("FAKE_ACLRUNTIME_TRACE")
PATH_CHARS = re.compile(r"[A-Za-z0-9_./-]+")
MEMORY_HOST, MEMORY_DEVICE = 0, 1          # what `Tensor.type` reports here

_BINDINGS = threading.RLock()               # one binding call at a time: the GIL
_HOLD_GIL = ctypes.PyDLL(None)              # PyDLL: calls keep the GIL, like the bindings
_context = threading.local()                # ACL's current context, per thread
_ORT_TYPES = {"tensor(uint8)": np.uint8, "tensor(int32)": np.int32,
              "tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64}


def _trace(op: str, start: float, **fields) -> None:
    if TRACE:
        line = json.dumps({"op": op, "pid": os.getpid(), "thread": threading.get_ident(),
                           "start": start, "end": time.monotonic(), **fields})
        with open(TRACE, "a") as f:
            f.write(line + "\n")


def _bind_context(device_id: int) -> None:
    _context.device = device_id


def _require_context(device_id: int, what: str) -> None:
    if getattr(_context, "device", None) != device_id:
        raise RuntimeError(f"{what} failed: no current ACL context on this thread "
                           f"(fake aclruntime {RELEASE}: this wheel binds it only in the "
                           "session's constructor and Tensor.to_device)")


class dtype:  # noqa: N801  (the real module's enum is named `dtype`)
    """The datatype enum of the descriptors, printed like the real one."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<dtype.{self.name}>"

    __str__ = __repr__


class session_options:  # noqa: N801
    def __init__(self) -> None:
        self.loop = 1
        self.log_level = 2
        self.acl_json_path = ""


class TensorDesc:
    def __init__(self, name: str, shape: list[int], np_dtype: type) -> None:
        self.name = name
        self.shape = list(shape)
        self.datatype = dtype(np.dtype(np_dtype).name)
        self.format = 2                      # ACL_FORMAT_ND
        self.realsize = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        self.size = self.realsize


def _check_device(device_id: int) -> None:
    if not isinstance(device_id, int) or not 0 <= device_id < DEVICE_COUNT:
        raise RuntimeError(f"aclrtSetDevice failed: device {device_id!r} is not available "
                           f"({DEVICE_COUNT} device(s))")


class Tensor:
    """Tensor(ndarray) copies the buffer into (pinned) host memory, as FromNumpy does."""

    def __init__(self, array: np.ndarray) -> None:
        with _BINDINGS:
            view = memoryview(array)         # the buffer protocol, like the real binding
            if not view.c_contiguous:
                # the real binding reads info.ptr for size bytes, ignoring strides
                raise ValueError("fake aclruntime: a non-contiguous buffer would be copied "
                                 "wrongly by the real aclruntime.Tensor")
            self._data = np.array(array, copy=True, order="C")
            self._device = -1

    def to_device(self, device_id: int) -> None:
        with _BINDINGS:
            start = time.monotonic()
            _check_device(device_id)
            _bind_context(device_id)         # TensorContext::SetContext on this thread
            self._data = self._data.copy()   # a separate "device" buffer
            self._device = device_id
            _trace("to_device", start, nbytes=int(self._data.nbytes))

    def to_host(self) -> None:
        with _BINDINGS:
            self._data = self._data.copy()   # a new pinned host buffer
            self._device = -1

    @property
    def type(self) -> int:
        return MEMORY_DEVICE if self._device >= 0 else MEMORY_HOST

    @property
    def device(self) -> int:
        return self._device

    @property
    def dtype(self) -> dtype:
        return dtype(self._data.dtype.name)

    @property
    def shape(self) -> list[int]:
        return list(self._data.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self._device >= 0:
            # the binding raises "tensor is in npu"; numpy swallows buffer errors and
            # wraps the object instead
            wrapped = np.empty((), dtype=object)
            wrapped[()] = self
            return wrapped
        out = self._data if dtype is None else self._data.astype(dtype)
        return out.copy() if copy else out

    def __repr__(self) -> str:
        where = f"npu:{self._device}" if self._device >= 0 else "host"
        return f"<Tensor {self.shape} {self._data.dtype.name} on {where}>"


if os.environ.get("FAKE_ACLRUNTIME_NO_BASETENSOR") != "1":
    class BaseTensor:
        """BaseTensor(pointer, nbytes): host memory the caller owns; `run` copies it."""

        def __init__(self, buf: int, size: int) -> None:
            self.buf = int(buf)
            self.size = int(size)


class _Summary:
    def __init__(self, exec_time_list: list) -> None:
        self.exec_time_list = exec_time_list


def _check_model_path(path: str, suffix: str) -> None:
    """2024-08+: the wheel's own path check (File::CheckFileBeforeRead), and its one
    message. It checks the absolute path: the working directory joined to a relative one,
    '.' and '..' folded, links not followed (File::GetAbsPath)."""
    full = os.path.abspath(path)
    mode = os.lstat(full).st_mode if os.path.lexists(full) else 0
    regular = os.path.isfile(full)
    if (not regular or len(full) > 4096 or any(len(n) > 255 for n in full.split("/"))
            or not PATH_CHARS.fullmatch(full) or full.count("/") > 32
            or stat.S_ISLNK(mode) or os.stat(full).st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            or not os.access(full, os.R_OK) or not os.stat(full).st_mode & stat.S_IRUSR
            or not full.endswith(suffix)):
        raise RuntimeError("please check model path")


class InferenceSession:
    def __init__(self, model_path: str, device_id: int, options: session_options) -> None:
        with _BINDINGS:
            start = time.monotonic()
            if not isinstance(options, session_options):
                raise TypeError("__init__(): incompatible constructor arguments: "
                                "(modelPath: str, deviceId: int, options: SessionOptions)")
            if NEW:
                if not 1 <= int(options.log_level) <= 4:
                    raise RuntimeError(f"log_level {options.log_level} is invalid: 1..4")
                _check_model_path(model_path, ".om")
                if options.acl_json_path:
                    _check_model_path(options.acl_json_path, ".json")
            path = Path(model_path)
            if path.suffix != ".om" or not path.is_file():
                raise RuntimeError(f"aclmdlLoadFromFile failed: {model_path} is not an OM file")
            _check_device(device_id)
            onnx = path.with_suffix(".onnx")
            if not onnx.is_file():
                raise RuntimeError(f"fake aclruntime: no {onnx.name} beside {path.name} to run")
            _bind_context(device_id)             # Init: SetContext on the calling thread
            self._device_id = device_id
            self._options = options
            ort_options = onnxruntime.SessionOptions()
            ort_options.intra_op_num_threads = 1
            self._ort = onnxruntime.InferenceSession(str(onnx), ort_options,
                                                     providers=["CPUExecutionProvider"])
            self._inputs = [TensorDesc(i.name, i.shape, _ORT_TYPES[i.type])
                            for i in self._ort.get_inputs()]
            self._outputs = [TensorDesc(o.name, o.shape, _ORT_TYPES[o.type])
                             for o in self._ort.get_outputs()]
            self._times: list = []
            self._loaded = True
            _trace("session", start, model=model_path, log_level=int(options.log_level),
                   device=device_id)

    def get_inputs(self) -> list[TensorDesc]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorDesc]:
        return list(self._outputs)

    if NEW:
        def set_context(self) -> None:
            with _BINDINGS:
                start = time.monotonic()
                _bind_context(self._device_id)
                _trace("set_context", start)

    def run(self, output_names: list[str], feeds) -> list[Tensor]:
        with _BINDINGS:
            start = time.monotonic()
            if not self._loaded:
                raise RuntimeError("session resources were freed")
            if NEW:
                _bind_context(self._device_id)
            else:
                _require_context(self._device_id, "aclmdlExecute")
            if isinstance(feeds, dict):
                feeds = [feeds[d.name] for d in self._inputs]
            if len(feeds) != len(self._inputs):
                raise RuntimeError(f"input count {len(feeds)} not match needsize "
                                   f"{len(self._inputs)}")
            arrays = {desc.name: self._device_bytes(index, feed, desc).view(_np_dtype(desc))
                      .reshape(desc.shape)
                      for index, (feed, desc) in enumerate(zip(feeds, self._inputs,
                                                               strict=True))}
            known = [d.name for d in self._outputs]
            if not output_names or any(name not in known for name in output_names):
                raise RuntimeError(f"output names {output_names} not in model outputs {known}")
            execute_start = time.perf_counter()
            results = self._ort.run(list(output_names), arrays)
            if EXECUTE_MS > 0:
                _HOLD_GIL.usleep(int(EXECUTE_MS * 1000))
            execute_end = time.perf_counter()
            if NEW:
                self._times.append((execute_start * 1000.0, execute_end * 1000.0))
            else:
                self._times.append((execute_end - execute_start) * 1000.0)
            outputs = []
            for array in results:
                tensor = Tensor(np.ascontiguousarray(array))
                tensor._device = self._device_id     # output memory is allocated on the device
                outputs.append(tensor)
            _trace("run", start, feeds=type(feeds[0]).__name__)
            return outputs

    def _device_bytes(self, index: int, feed, desc: TensorDesc) -> np.ndarray:
        """The input's bytes as the NPU would read them; the real checks on the way."""
        base = globals().get("BaseTensor")
        if base is not None and isinstance(feed, base):
            if feed.size != desc.realsize:
                raise RuntimeError(f"input {index} in size {feed.size} needsize "
                                   f"{desc.realsize} not match")
            # CopyMemory2DeviceMemory: a device buffer and a copy, inside run
            return np.frombuffer(ctypes.string_at(feed.buf, feed.size), np.uint8)
        if not isinstance(feed, Tensor):
            raise TypeError("run(): incompatible function arguments: feeds must be "
                            "aclruntime.Tensor or aclruntime.BaseTensor")
        if feed.device < 0:
            raise RuntimeError(f"input {index} is in host memory: call to_device() first")
        if feed.device != self._device_id:
            raise RuntimeError(f"input {index} is on device {feed.device}, the session "
                               f"on {self._device_id}")
        if feed._data.nbytes != desc.realsize:
            raise RuntimeError(f"input {index} in size {feed._data.nbytes} needsize "
                               f"{desc.realsize} not match")
        return feed._data.reshape(-1).view(np.uint8)

    def sumary(self) -> _Summary:
        return _Summary(list(self._times))

    def _reset(self) -> int:
        _trace("reset_summary", time.monotonic())
        self._times.clear()
        return 0

    if NEWEST:                      # the binding's newest source: one reset, spelled right
        summary = sumary
        reset_summaryinfo = _reset
    else:
        reset_sumaryinfo = _reset

    if NEW:
        def free_resource(self) -> None:
            _trace("free_resource", time.monotonic())
            self._loaded = False

        @staticmethod
        def finalize() -> int:
            _trace("finalize", time.monotonic())
            return 0
    else:
        def finalize(self) -> int:
            _trace("finalize", time.monotonic())
            self._loaded = False
            return 0


def _np_dtype(desc: TensorDesc) -> np.dtype:
    return np.dtype(desc.datatype.name)
