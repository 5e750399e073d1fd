"""Ascend backend: an ATC-built OM run through ais_bench's `aclruntime` extension.

`aclruntime` exists only on hosts with an Ascend NPU and CANN, so it is imported when this
backend is opened, never at module import. The calls follow
/work/shared/reference/aclruntime.md: `Tensor(ndarray)` copies the batch into runtime
memory and `to_device` moves it to the NPU in `upload` (on the assembling thread),
`session.run` returns device tensors that `collect` brings back with `to_host()`. Method
names changed between releases, so optional ones are probed with hasattr, as ais_bench
itself does. The OM takes the same uint8 NHWC image + int32 box as the ONNX and needs the
exact byte size: partial batches must be padded by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pspnet.stages.backends.base import (
    BackendBase,
    BackendUnavailable,
    check_options,
    option_flag,
    option_int,
    parse_device,
)

MISSING_ACLRUNTIME = ("aclruntime not found: it ships with ais_bench on hosts with an Ascend "
                      "NPU and CANN; see README")
OPTIONS = {
    "log_level": "aclruntime session log level (1 = debug)",
    "acl_json_path": "acl.json for profiling/dump",
    "h2d": "upload (default): to_device on the assembling thread; execute: in collect, on "
           "the runner thread, in case this runtime's ACL context is per thread",
    "finalize": "1: call the runtime's finalize() on close (ends ACL for the process)",
}


class AclBackend(BackendBase):
    """aclruntime.InferenceSession on `manifest.models[batch_size].om`, static batch."""

    name = "acl"

    def __init__(
        self,
        model_dir: Path,
        batch_size: int,
        *,
        device: str = "npu:0",
        precision: str = "fp32",
        options: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(model_dir, batch_size)
        options = dict(options or {})
        check_options(self.name, options, OPTIONS)
        try:
            _, self.device_id = parse_device(device, ("npu",))
        except ValueError:
            raise ValueError(f"the acl backend runs on an Ascend NPU: device 'npu[:N]', not "
                             f"{device!r}") from None
        self.device = device
        if precision != "fp32":
            raise ValueError("the acl backend runs the OM as ATC built it (its precision is "
                             "set by atc --precision_mode); pass precision fp32")
        h2d = options.get("h2d", "upload")
        if h2d not in ("upload", "execute"):
            raise ValueError(f"option h2d={h2d!r}: upload or execute")
        self._h2d_on_upload = h2d == "upload"
        self._finalize = option_flag(options, "finalize")
        try:
            import aclruntime
        except ImportError as error:
            raise BackendUnavailable(MISSING_ACLRUNTIME) from error
        self._acl = aclruntime

        om = self.om_path()
        session_options = aclruntime.session_options()
        log_level = option_int(options, "log_level")
        if log_level is not None:
            session_options.log_level = log_level
        if options.get("acl_json_path"):
            session_options.acl_json_path = str(options["acl_json_path"])
        self._session = aclruntime.InferenceSession(str(om), self.device_id, session_options)
        self._input_order, self._output_name = self._check_model()
        if hasattr(self._session, "reset_sumaryinfo"):
            self._session.reset_sumaryinfo()
        self._times_seen = 0

    def om_path(self) -> Path:
        """The OM the manifest names, else the ATC script's output next to the ONNX."""
        name = self.model_file.om or str(Path(self.model_file.onnx).with_suffix(".om"))
        path = self.model_dir / name
        if not path.is_file():
            script = self.model_file.atc or f"pspnet_bs{self.batch_size}.atc.sh"
            raise FileNotFoundError(
                f"{path}: no Ascend OM for batch size {self.batch_size}; run "
                f"{self.model_dir / script} on a host with the CANN toolkit (ATC) to make it"
            )
        return path

    def _check_model(self) -> tuple[list[str], str]:
        """Match the OM's descriptors to the manifest: names, static shapes, exact bytes."""
        inputs = list(self._session.get_inputs())
        names = [d.name for d in inputs]
        if sorted(names) != ["box", "image"]:
            raise ValueError(f"OM inputs {names}, expected image and box (build the OM from "
                             "the ONNX that `pspnet build` wrote)")
        expected = {"image": (self.image_shape, np.uint8), "box": (self.box_shape, np.int32)}
        for desc in inputs:
            shape, dtype = expected[desc.name]
            _check_desc(f"OM input {desc.name}", desc, shape, dtype, self.batch_size)
        outputs = list(self._session.get_outputs())
        if len(outputs) != 1:
            raise ValueError(f"OM has {len(outputs)} outputs, expected 1 ({self.head})")
        _check_desc(f"OM output {outputs[0].name}", outputs[0], self.output_shape,
                    self.output_dtype, self.batch_size)
        return names, outputs[0].name

    def upload(self, slot: int, images: np.ndarray, boxes: np.ndarray) -> None:
        self._check_open()
        self._check_slot(slot)
        images, boxes = self._check_batch(images, boxes)
        arrays = {"image": images, "box": boxes}
        # Tensor(ndarray) copies the buffer, so the caller's arrays are free after this
        tensors = [self._acl.Tensor(arrays[name]) for name in self._input_order]
        if self._h2d_on_upload:
            for tensor in tensors:
                tensor.to_device(self.device_id)
        self._put(slot, tensors)

    def collect(self, slot: int) -> np.ndarray:
        tensors: list[Any] = self._take(slot)  # type: ignore[assignment]
        if not self._h2d_on_upload:
            for tensor in tensors:
                tensor.to_device(self.device_id)
        outputs = self._session.run([self._output_name], tensors)
        self._collect_times()
        result = outputs[0]
        result.to_host()                     # outputs live on the device until this
        host = np.array(result)              # a copy: the runtime buffer dies with `result`
        if host.dtype != self.output_dtype or host.shape != self.output_shape:
            host = host.reshape(-1).view(np.uint8).view(self.output_dtype) \
                .reshape(self.output_shape)
        return host

    def _collect_times(self) -> None:
        """Append this run's execute time(s) from the runtime's own summary, then clear it."""
        summary = getattr(self._session, "sumary", None) or getattr(self._session, "summary",
                                                                    None)
        if summary is None:
            return
        times = list(summary().exec_time_list)
        self.execute_times_ms.extend(exec_times_ms(times[self._times_seen:]))
        if hasattr(self._session, "reset_sumaryinfo"):
            self._session.reset_sumaryinfo()
            self._times_seen = 0
        else:
            self._times_seen = len(times)

    def close(self) -> None:
        if not self._closed:
            session, self._session = self._session, None
            self._slots = [None] * len(self._slots)
            if session is not None and hasattr(session, "free_resource"):
                session.free_resource()
            if session is not None and self._finalize and hasattr(session, "finalize"):
                session.finalize()
        super().close()


def exec_times_ms(entries: Sequence[Any]) -> list[float]:
    """aclruntime's exec_time_list in ms: older releases give ms, newer (start, end) pairs."""
    out = []
    for entry in entries:
        if isinstance(entry, (tuple, list)):
            start, end = entry
            out.append(float(end) - float(start))
        else:
            out.append(float(entry))
    return out


def _check_desc(what: str, desc: Any, shape: tuple[int, ...], dtype: Any,
                batch_size: int) -> None:
    dims = [int(d) for d in desc.shape]
    if any(d < 0 for d in dims):
        raise ValueError(f"{what}: dynamic shape {dims}; the executor needs a static-batch "
                         f"OM (atc --input_shape with batch {batch_size})")
    need = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if dims != list(shape) or int(desc.realsize) != need:
        raise ValueError(f"{what}: {dims} ({desc.datatype}, {desc.realsize} bytes), expected "
                         f"{list(shape)} {np.dtype(dtype).name} ({need} bytes) for batch size "
                         f"{batch_size}; rebuild the OM with its pspnet_bs{batch_size}.atc.sh")
