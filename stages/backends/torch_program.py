"""The torch backend's model, made once at open: the exported program on its device and
precision, wrapped in ServingModel, and (`fused_conv`) the fused-convolution variant
prepared and chosen. Apart from torch_backend.py, which keeps the calls made per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pspnet.model.manifest import Manifest
from pspnet.model.serving_model import ServingModel
from pspnet.stages.backends.base import BackendUnavailable
from pspnet.stages.backends.conv_fusion import fused_copy

FUSION_TIMED_RUNS = 5          # fused_conv=auto: timed batches per variant at open

_log = logging.getLogger(__name__)


def load_core(model_dir: Path, manifest: Manifest, batch_size: int, device: torch.device,
              dtype: torch.dtype) -> torch.nn.Module:
    """The network alone (float32 N x 3 x H x W in, logits out), on `device` in `dtype`."""
    # one dynamic-batch program, or (when torch could not export that) one per size
    program = manifest.torch_program or \
        manifest.source.get("torch_programs", {}).get(str(batch_size))
    if not program:
        raise FileNotFoundError(f"{model_dir}: the manifest names no torch program; "
                                "rebuild the model directory with `pspnet build`")
    path = model_dir / program
    if not path.is_file():
        raise FileNotFoundError(f"{path}: torch program missing; rebuild the model "
                                "directory with `pspnet build`")
    exported = torch.export.load(str(path))
    cuda = device.type == "cuda"
    if cuda:
        exported = _move_program(exported, device)
    # The unflattened module shares parameters with `exported`; nothing else uses it.
    # Never call .eval()/.train() on it: torch.export modules reject them (and the
    # behaviour is already baked in at export time).
    core = exported.module().to(device)   # a no-op once the pass has moved it
    if dtype != torch.float32:
        core = core.to(dtype)
    if cuda and dtype != torch.float32:
        # the NHWC uint8 input permuted to NCHW is already channels_last-strided
        core = core.to(memory_format=torch.channels_last)
    return core


def serving_model(core: torch.nn.Module, manifest: Manifest, device: torch.device,
                  dtype: torch.dtype) -> torch.nn.Module:
    """`core` behind the uint8 normalisation, box mask and head ServingModel adds."""
    model = ServingModel(core, manifest.mean, manifest.std, manifest.head,
                         compute_dtype=dtype, align_corners=manifest.align_corners).to(device)
    model.requires_grad_(False)
    return model


class FusedConv:
    """fused_conv=0, 1 or auto: the fused graph is prepared at load (`prepare`) and kept
    or not once the device buffers exist (`choose`). `report` says what happened (the
    backend's `fusion`, read by the bench and the device script)."""

    def __init__(self, setting: bool | str, option: str) -> None:
        self.setting = setting                  # False, True or "auto"
        self.report: dict[str, Any] = {"fused_conv": option or "0", "active": False}
        self.candidate: torch.nn.Module | None = None

    def prepare(self, core: torch.nn.Module, serving: Callable[[torch.nn.Module],
                torch.nn.Module], cuda: bool, compiled: bool) -> None:
        if not self.setting:
            return
        if not cuda or compiled:
            self.report["why"] = ("compile=1: inductor fuses instead" if compiled
                                  else "CPU: the fused ops are cuDNN's")
            return
        fused_core, report = fused_copy(core)
        self.report.update(report.as_dict())
        _log.info("fused_conv=%s: %s", self.report["fused_conv"], report.line())
        if report.conv_relu + report.conv_add_relu == 0:
            self.report["why"] = "no conv + ReLU chain in the graph (BN not folded?)"
        else:
            self.candidate = serving(fused_core)

    def choose(self, plain: torch.nn.Module,
               time_model: Callable[[torch.nn.Module, int], float]) -> torch.nn.Module:
        """fused_conv=1: the fused graph (cuDNN refusing it is an error); auto: the faster
        of the two by `time_model(model, runs)` (a refusal keeps the plain one)."""
        fused, self.candidate = self.candidate, None
        if fused is None:
            return plain
        candidates = {"plain": plain, "fused": fused}
        runs = FUSION_TIMED_RUNS if self.setting == "auto" else 1
        ms: dict[str, float] = {}
        for name, model in candidates.items():
            if self.setting is True and name == "plain":
                continue
            try:
                ms[name] = time_model(model, runs)
            except RuntimeError as error:
                if name == "plain" or self.setting is True:
                    raise BackendUnavailable(f"fused_conv={self.report['fused_conv']}: the "
                                             f"fused graph failed ({first_line(error)}); "
                                             "use fused_conv=0") from error
                self.report["why"] = f"fused graph failed: {first_line(error)}"
        best = min(ms, key=ms.get)
        self.report.update(active=best == "fused",
                           ms_per_batch={k: round(v, 3) for k, v in ms.items()})
        _log.info("fused_conv=%s: %s (%s ms per batch)", self.report["fused_conv"],
                  best, ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
        return candidates[best]


def time_model(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
               stream: torch.cuda.Stream, runs: int) -> float:
    """Mean ms per batch on `inputs` (device buffers), after two untimed runs."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.device(stream.device), torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            model(*inputs)
        start.record(stream)
        for _ in range(runs):
            model(*inputs)
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / runs


def capture_graphs(model: torch.nn.Module, inputs: list[tuple[torch.Tensor, ...]],
                   stream: torch.cuda.Stream) -> tuple[list[Any], list[torch.Tensor]]:
    """One CUDA graph per slot, capturing the slot's device buffers (`inputs[slot]`) as
    static inputs: (graphs, the output each writes)."""
    device = stream.device
    graphs, outs = [], []
    with torch.cuda.device(device), torch.inference_mode():
        side = torch.cuda.Stream(device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):         # warm-up off the default stream
            for slot_inputs in inputs:
                for _ in range(3):
                    model(*slot_inputs)
        torch.cuda.synchronize(device)
        for slot_inputs in inputs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs.append(model(*slot_inputs))
            graphs.append(graph)
        torch.cuda.synchronize(device)
    return graphs, outs


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _move_program(exported: Any, device: torch.device) -> Any:
    """Move an ExportedProgram's weights and device constants (not just the module)."""
    try:
        from torch.export.passes import move_to_device_pass
    except ImportError:     # older torch: module-level .to() in load_core instead
        return exported
    return move_to_device_pass(exported, device)
