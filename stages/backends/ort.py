"""onnxruntime backend: the exported ONNX graph on CPU, CUDA, TensorRT or Ascend CANN.

Inputs go in through one IOBinding per slot: `upload` wraps the batch in OrtValues on the
execution provider's device (a real host-to-device copy on CUDA/CANN, a zero-copy view on
CPU), so `collect` only runs the graph and copies the output back to a fresh host array.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pspnet.core.backend_rules import RULES, RUN_SPIN, SPIN, THREADS
from pspnet.stages.backends.base import (
    NUM_SLOTS,
    BackendBase,
    BackendUnavailable,
    check_options,
    option_flag,
    option_int,
    parse_device,
)

# device kind -> (execution providers in priority order, OrtValue device type)
_PROVIDERS = {
    "cpu": (("CPUExecutionProvider",), "cpu"),
    "cuda": (("CUDAExecutionProvider", "CPUExecutionProvider"), "cuda"),
    "tensorrt": (("TensorrtExecutionProvider", "CUDAExecutionProvider",
                  "CPUExecutionProvider"), "cuda"),
    "cann": (("CANNExecutionProvider", "CPUExecutionProvider"), "cann"),
}
OPTIONS = RULES["ort"].options


class OrtBackend(BackendBase):
    """An onnxruntime InferenceSession on `manifest.models[batch_size].onnx`."""

    name = "ort"

    def __init__(
        self,
        model_dir: Path,
        batch_size: int,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        options: Mapping[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort

        super().__init__(model_dir, batch_size)
        options = dict(options or {})
        check_options(self.name, options, OPTIONS)
        self._ort = ort
        self.device = device
        kind, index = parse_device(device, tuple(_PROVIDERS))
        wanted, self._ortvalue_device = _PROVIDERS[kind]
        self._device_id = index
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BackendUnavailable(
                f"device {device!r} needs onnxruntime's {wanted[0]}, but this onnxruntime "
                f"({ort.__version__}) offers only {', '.join(available)}; install the "
                "matching build (onnxruntime-gpu, onnxruntime-cann) or pick another device"
            )
        RULES["ort"].check(device, precision, options)   # fp16 only on tensorrt, cann
        providers: list[Any] = []
        for provider in wanted:
            if provider == "CPUExecutionProvider":
                providers.append(provider)
            elif provider in available:
                providers.append((provider, _provider_options(provider, index, precision)))

        path = self.model_dir / self.model_file.onnx
        if not path.is_file():
            why = self.manifest.source.get("onnx")
            raise FileNotFoundError(f"{path}: ONNX model for batch size {batch_size} is "
                                    f"missing{f' ({why})' if why else ''}; rebuild the model "
                                    "directory with `pspnet build`")
        session_options = ort.SessionOptions()
        threads = option_int(options, THREADS)
        if threads:
            session_options.intra_op_num_threads = threads
        run_spin = option_flag(options, RUN_SPIN)
        if SPIN in options or run_spin:
            # idle pool threads spin by default: they burn the cores the workers need
            spin = "1" if option_flag(options, SPIN) else "0"
            session_options.add_session_config_entry("session.intra_op.allow_spinning",
                                                     "1" if run_spin else spin)
            session_options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if run_spin:
            # within a run the pool's threads spin between operators instead of parking on
            # a futex (after idle, each wake crosses a halted vCPU: studies/idle_penalty.py),
            # and they stop spinning as soon as the run ends
            session_options.add_session_config_entry("session.force_spinning_stop", "1")
        self._session = ort.InferenceSession(str(path), session_options, providers=providers)
        active = self._session.get_providers()
        if active[0] != wanted[0]:
            raise BackendUnavailable(f"onnxruntime did not enable {wanted[0]} for {device!r} "
                                     f"(active: {', '.join(active)}); see its log above")
        self._check_graph()
        self._bindings = [self._session.io_binding() for _ in range(NUM_SLOTS)]
        for binding in self._bindings:
            # bound to host memory: run() leaves a host copy of the output there
            binding.bind_output(self._output_name, "cpu")

    def _check_graph(self) -> None:
        """Fail at open time, not on the first batch, if the ONNX is not what we feed."""
        inputs = {i.name: i for i in self._session.get_inputs()}
        if set(inputs) != {"image", "box"}:
            raise ValueError(f"{self.model_file.onnx}: inputs {sorted(inputs)}, expected "
                             "image and box (a model made by `pspnet build`)")
        for name, shape, dtype in (("image", self.image_shape, "tensor(uint8)"),
                                   ("box", self.box_shape, "tensor(int32)")):
            arg = inputs[name]
            static = [d for d in arg.shape]
            if arg.type != dtype or len(static) != len(shape) or any(
                isinstance(d, int) and d != s for d, s in zip(static, shape, strict=True)
            ):
                raise ValueError(f"{self.model_file.onnx}: input {name} is {arg.type} "
                                 f"{static}, expected {dtype} {list(shape)}")
        outputs = self._session.get_outputs()
        if len(outputs) != 1:
            raise ValueError(f"{self.model_file.onnx}: {len(outputs)} outputs, expected 1")
        self._output_name = outputs[0].name

    def upload(self, slot: int, images: np.ndarray, boxes: np.ndarray) -> None:
        self._check_open()
        self._check_slot(slot)
        images, boxes = self._check_batch(images, boxes)
        make = self._ort.OrtValue.ortvalue_from_numpy
        image = make(images, self._ortvalue_device, self._device_id)
        box = make(boxes, self._ortvalue_device, self._device_id)
        binding = self._bindings[slot]
        binding.bind_ortvalue_input("image", image)
        binding.bind_ortvalue_input("box", box)
        # the OrtValues (and, on CPU, the arrays they view) must outlive the run
        self._put(slot, (image, box))

    def collect(self, slot: int) -> np.ndarray:
        values = self._take(slot)
        binding = self._bindings[slot]
        start = time.perf_counter()
        self._session.run_with_iobinding(binding)
        self.execute_times_ms.append((time.perf_counter() - start) * 1000.0)
        out = binding.copy_outputs_to_cpu()[0]
        binding.clear_binding_inputs()
        del values
        return out

    def close(self) -> None:
        if not self._closed:
            self._bindings = []
            self._session = None
        super().close()


def _provider_options(provider: str, device_id: int, precision: str) -> dict[str, Any]:
    options: dict[str, Any] = {"device_id": device_id}
    if provider == "TensorrtExecutionProvider" and precision == "fp16":
        options["trt_fp16_enable"] = True
    if provider == "CANNExecutionProvider":
        # must_keep_origin_dtype: fp32 stays fp32; force_fp16: what ATC does by default
        options["precision_mode"] = ("force_fp16" if precision == "fp16"
                                     else "must_keep_origin_dtype")
    return options
