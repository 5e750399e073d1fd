"""Stand-in for ais_bench's `aclruntime`, strict about the contract the acl backend uses.

Tests put this directory first on sys.path (monkeypatch.syspath_prepend) so that
`import aclruntime` finds it. It follows /work/shared/reference/aclruntime.md and fails
where the real runtime fails: options are required, the `.om` must exist, inputs must be
`Tensor`s moved `to_device`, their byte size must match the model's exactly, outputs stay
on the device until `to_host()`, and `np.array` on a device tensor raises. Underneath it
runs the sibling `.onnx` (same stem as the `.om`) with onnxruntime on the CPU.

Knobs for tests: `EXEC_TIME_FORMAT` ("ms": older releases, a list of milliseconds;
"pairs": newer, (start, end) pairs), `DEVICE_COUNT`, and `to_device_threads` (the thread
ident of every `to_device` call, to check which thread did the copy).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime

EXEC_TIME_FORMAT = "ms"
DEVICE_COUNT = 1
to_device_threads: list[int] = []

_ORT_TYPES = {"tensor(uint8)": np.uint8, "tensor(int32)": np.int32,
              "tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64}


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
        self.log_level = 0
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
    """Tensor(ndarray) copies the buffer, as the real FromNumpy does."""

    def __init__(self, array: np.ndarray) -> None:
        view = memoryview(array)             # the buffer protocol, like the real binding
        if not view.c_contiguous:
            # the real binding reads info.ptr for size bytes, ignoring strides
            raise ValueError("fake aclruntime: a non-contiguous buffer would be copied "
                             "wrongly by the real aclruntime.Tensor")
        self._data = np.array(array, copy=True, order="C")
        self._device = -1

    def to_device(self, device_id: int) -> None:
        _check_device(device_id)
        to_device_threads.append(threading.get_ident())
        self._data = self._data.copy()       # a separate "device" buffer
        self._device = device_id

    def to_host(self) -> None:
        self._device = -1

    @property
    def shape(self) -> list[int]:
        return list(self._data.shape)

    @property
    def dtype(self) -> dtype:
        return dtype(self._data.dtype.name)

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    @property
    def device(self) -> int:
        return self._device

    @property
    def data_ptr(self) -> int:
        return int(self._data.ctypes.data)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self._device >= 0:
            raise RuntimeError("tensor is in npu. can't convert to numpy array")
        out = self._data if dtype is None else self._data.astype(dtype)
        return out.copy() if copy is not False else out

    def __repr__(self) -> str:
        where = f"npu:{self._device}" if self._device >= 0 else "host"
        return f"<Tensor {self.shape} {self._data.dtype.name} on {where}>"


class _Summary:
    def __init__(self, exec_time_list: list) -> None:
        self.exec_time_list = exec_time_list


class InferenceSession:
    def __init__(self, model_path: str, device_id: int, options: session_options) -> None:
        if not isinstance(options, session_options):
            raise TypeError("__init__(): incompatible constructor arguments: "
                            "(modelPath: str, deviceId: int, options: SessionOptions)")
        path = Path(model_path)
        if path.suffix != ".om" or not path.is_file():
            raise RuntimeError(f"aclmdlLoadFromFile failed: {model_path} is not an OM file")
        _check_device(device_id)
        onnx = path.with_suffix(".onnx")
        if not onnx.is_file():
            raise RuntimeError(f"fake aclruntime: no {onnx.name} beside {path.name} to run")
        self._device_id = device_id
        self._options = options
        self._ort = onnxruntime.InferenceSession(str(onnx),
                                                 providers=["CPUExecutionProvider"])
        self._inputs = [TensorDesc(i.name, i.shape, _ORT_TYPES[i.type])
                        for i in self._ort.get_inputs()]
        self._outputs = [TensorDesc(o.name, o.shape, _ORT_TYPES[o.type])
                         for o in self._ort.get_outputs()]
        self._times: list = []
        self._loaded = True

    def get_inputs(self) -> list[TensorDesc]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorDesc]:
        return list(self._outputs)

    def run(self, output_names: list[str], feeds) -> list[Tensor]:
        if not self._loaded:
            raise RuntimeError("session resources were freed")
        if isinstance(feeds, dict):
            feeds = [feeds[d.name] for d in self._inputs]
        if len(feeds) != len(self._inputs):
            raise RuntimeError(f"input count {len(feeds)} not match needsize "
                               f"{len(self._inputs)}")
        arrays = {}
        for index, (tensor, desc) in enumerate(zip(feeds, self._inputs, strict=True)):
            if not isinstance(tensor, Tensor):
                raise TypeError("run(): incompatible function arguments: feeds must be "
                                "aclruntime.Tensor")
            if tensor.device < 0:
                raise RuntimeError(f"input {index} is in host memory: call to_device() first")
            if tensor.device != self._device_id:
                raise RuntimeError(f"input {index} is on device {tensor.device}, the session "
                                   f"on {self._device_id}")
            if tensor.nbytes != desc.realsize:
                raise RuntimeError(f"input {index} in size {tensor.nbytes} needsize "
                                   f"{desc.realsize} not match")
            # the NPU reads raw bytes: reinterpret as the model's own type and shape
            arrays[desc.name] = tensor._data.reshape(-1).view(np.uint8) \
                .view(_np_dtype(desc)).reshape(desc.shape)
        known = [d.name for d in self._outputs]
        if not output_names or any(name not in known for name in output_names):
            raise RuntimeError(f"output names {output_names} not in model outputs {known}")
        start = time.perf_counter()
        results = self._ort.run(list(output_names), arrays)
        end = time.perf_counter()
        if EXEC_TIME_FORMAT == "pairs":
            self._times.append((start * 1000.0, end * 1000.0))
        else:
            self._times.append((end - start) * 1000.0)
        outputs = []
        for array in results:
            tensor = Tensor(np.ascontiguousarray(array))
            tensor._device = self._device_id     # output memory is allocated on the device
            outputs.append(tensor)
        return outputs

    def sumary(self) -> _Summary:
        return _Summary(list(self._times))

    def summary(self) -> _Summary:          # newer releases' spelling
        return _Summary(list(self._times))

    def reset_sumaryinfo(self) -> int:
        self._times.clear()
        return 0

    def free_resource(self) -> None:
        self._loaded = False

    def finalize(self) -> int:
        self._loaded = False
        return 0


def _np_dtype(desc: TensorDesc) -> np.dtype:
    return np.dtype(desc.datatype.name)
