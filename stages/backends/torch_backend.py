"""torch backend: the exported core program wrapped in ServingModel, on CPU or CUDA.

`manifest.torch_program` is a `torch.export` program of the network alone (float32
N x 3 x H x W normalised in, logits out, any batch 1..64); ServingModel adds the uint8
normalisation, box mask and optional argmax, so the bytes on the wire and over PCIe stay
uint8. On CUDA every slot owns a pinned host buffer (its `host_buffers`, so the executor
assembles straight into it) and a device buffer: `upload` copies on a side stream and
records an event; `launch` queues, on the compute stream, a wait on that event, the
network and the copy of the outputs into fresh pinned memory, and returns; `collect`
waits for that copy. So the device runs batch k+1 right behind batch k while the host
collects and sends k. With `cuda_graphs=1` each slot's device buffers are the static
inputs of one captured graph. With `fused_conv=1` (or `auto`, when it times faster at open)
the program's conv + bias (+ residual add) + ReLU chains run as single cuDNN calls
(stages/backends/conv_fusion.py; BN is folded at build). Loading the program and choosing
the fused variant happen once, at open: stages/backends/torch_program.py.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pspnet.core.backend_rules import RULES, cuda_torch_fix
from pspnet.stages.backends.base import (
    NUM_SLOTS,
    BackendBase,
    BackendUnavailable,
    check_options,
    option_flag,
    option_int,
    parse_device,
)
from pspnet.stages.backends.torch_program import (
    FusedConv,
    capture_graphs,
    load_core,
    serving_model,
    time_model,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIONS = RULES["torch"].options        # pspnet.core.backend_rules: the CLI checks them
# The CPU path hands read-only numpy views (e.g. ZeroMQ frames) to torch.from_numpy; the
# serving graph never writes its inputs, so torch's warning about that is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                        category=UserWarning)
# torch 2.11's torch.export.load reads the .pt2's weights through torch.frombuffer over a
# read-only buffer and says so, twice per open (12 times in one device run's log); the
# weights are never written in place.
warnings.filterwarnings("ignore", message="The given buffer is not writable",
                        category=UserWarning)


class TorchBackend(BackendBase):
    """ServingModel(torch.export core) in inference mode, eager, compiled or graph-replayed."""

    name = "torch"

    def __init__(
        self,
        model_dir: Path,
        batch_size: int,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        options: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(model_dir, batch_size)
        options = dict(options or {})
        check_options(self.name, options, OPTIONS)
        kind, index = parse_device(device, ("cpu", "cuda"))
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.cuda_graphs = option_flag(options, "cuda_graphs")
        self.compiled = option_flag(options, "compile")
        fused = str(options.get("fused_conv", "0")).strip().lower()
        self.fused_conv = "auto" if fused == "auto" else option_flag(options, "fused_conv")
        self._fusion = FusedConv(self.fused_conv, fused)
        # what the fused-convolution path did at open (bench and the device script read it)
        self.fusion: dict[str, Any] = self._fusion.report
        if self.fused_conv is True and self.compiled:
            raise ValueError("fused_conv=1 and compile=1 do not combine: the cuDNN fused "
                             "ops have no fake-tensor kernels for torch.compile to trace "
                             "(inductor fuses bias, add and ReLU itself)")
        warmup = option_int(options, "warmup")
        if kind == "cuda":
            if not torch.cuda.is_available():
                why = cuda_torch_fix(torch.__version__, sys.executable) \
                    if torch.__version__.endswith("+cpu") else \
                    f"this torch ({torch.__version__}) sees no CUDA device"
                raise BackendUnavailable(f"device {device!r}: {why}")
            if index >= torch.cuda.device_count():
                raise BackendUnavailable(f"device {device!r}: only "
                                         f"{torch.cuda.device_count()} CUDA device(s)")
            self.device = torch.device("cuda", index)
        else:
            if self.cuda_graphs:
                raise ValueError("cuda_graphs=1 needs a CUDA device")
            if self.fused_conv is True:
                raise ValueError("fused_conv=1 needs a CUDA device (the fused ops are "
                                 "cuDNN's)")
            if precision == "fp16":
                raise ValueError("precision fp16 on CPU is not supported (slow or missing "
                                 "kernels); use fp32, or bf16 where the CPU has it")
            self.device = torch.device("cpu")
            threads = option_int(options, "threads")
            if threads:
                torch.set_num_threads(threads)
        self._cuda = self.device.type == "cuda"

        self._model = self._load_model()
        if self.compiled:
            if options.get("compile_cache"):
                # inductor reads this on every cache lookup; this process is the executor's
                cache = Path(options["compile_cache"]).expanduser().resolve()
                cache.mkdir(parents=True, exist_ok=True)
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
            self._model = torch.compile(self._model, mode=options.get("compile_mode") or None)
        if self._cuda:
            self._setup_cuda()
            self._model = self._fusion.choose(
                self._model, lambda model, runs: time_model(model, self._inputs[0],
                                                            self._compute_stream, runs))
        self._warm_up(warmup if warmup is not None else (2 if self._cuda else 1))
        if self.cuda_graphs:
            self._graphs, self._graph_out = capture_graphs(self._model, self._inputs,
                                                           self._compute_stream)

    # -- open time ---------------------------------------------------------------------

    def _load_model(self) -> torch.nn.Module:
        core = load_core(self.model_dir, self.manifest, self.batch_size, self.device,
                         self.dtype)
        self._fusion.prepare(core, self._serving, self._cuda, self.compiled)
        return self._serving(core)

    def _serving(self, core: torch.nn.Module) -> torch.nn.Module:
        return serving_model(core, self.manifest, self.device, self.dtype)

    def _setup_cuda(self) -> None:
        torch.backends.cudnn.benchmark = True       # static shapes: pick the fastest convs
        with torch.cuda.device(self.device):
            self._upload_stream = torch.cuda.Stream(self.device)
            self._compute_stream = torch.cuda.Stream(self.device)
            self._pinned = [
                (torch.empty(self.image_shape, dtype=torch.uint8, pin_memory=True),
                 torch.empty(self.box_shape, dtype=torch.int32, pin_memory=True))
                for _ in range(NUM_SLOTS)
            ]
            # numpy views of the pinned buffers: upload copies into them with np.copyto
            self._pinned_np = [(img.numpy(), box.numpy()) for img, box in self._pinned]
            self._inputs = [
                (torch.zeros(self.image_shape, dtype=torch.uint8, device=self.device),
                 torch.zeros(self.box_shape, dtype=torch.int32, device=self.device))
                for _ in range(NUM_SLOTS)
            ]
            full = torch.tensor([0, 0, *self.input_size], dtype=torch.int32)
            for _, box in self._inputs:
                box.copy_(full.expand(self.batch_size, 4))
            self._uploaded = [torch.cuda.Event() for _ in range(NUM_SLOTS)]
            self._consumed = [torch.cuda.Event() for _ in range(NUM_SLOTS)]
            self._downloaded = [torch.cuda.Event() for _ in range(NUM_SLOTS)]
            self._start = [torch.cuda.Event(enable_timing=True) for _ in range(NUM_SLOTS)]
            self._end = [torch.cuda.Event(enable_timing=True) for _ in range(NUM_SLOTS)]
            self._graphs: list[Any] = [None] * NUM_SLOTS
            self._graph_out: list[torch.Tensor | None] = [None] * NUM_SLOTS
            torch.cuda.synchronize(self.device)

    def _warm_up(self, runs: int) -> None:
        """Run the graph before the first batch: compiles, cudnn autotune, CPU bf16 check."""
        if self.compiled or self.dtype != torch.float32:
            runs = max(runs, 1)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                for _ in range(runs):
                    if self._cuda:
                        for slot in range(NUM_SLOTS):
                            with torch.cuda.stream(self._compute_stream):
                                self._model(*self._inputs[slot])
                        torch.cuda.synchronize(self.device)
                    else:
                        image = torch.zeros(self.image_shape, dtype=torch.uint8)
                        box = torch.tensor([[0, 0, *self.input_size]] * self.batch_size,
                                           dtype=torch.int32)
                        self._model(image, box)
        except Exception as error:
            if not self._cuda and self.dtype == torch.bfloat16:
                raise BackendUnavailable(f"bf16 on this CPU failed ({error}); use fp32") \
                    from error
            raise
        if self.compiled:
            self.compile_seconds = time.perf_counter() - started

    # -- the hot calls -----------------------------------------------------------------

    def host_buffers(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._cuda:
            return super().host_buffers(slot)
        self._check_open()
        self._check_slot(slot)
        return self._pinned_np[slot]

    def upload(self, slot: int, images: np.ndarray, boxes: np.ndarray) -> None:
        self._check_open()
        self._check_slot(slot)
        images, boxes = self._check_batch(images, boxes)
        if not self._cuda:
            # host backend: keep zero-copy views; the caller keeps the arrays unchanged
            self._put(slot, (torch.from_numpy(images), torch.from_numpy(boxes)))
            return
        with torch.cuda.device(self.device):
            pinned_image, pinned_box = self._pinned_np[slot]
            if images is not pinned_image or boxes is not pinned_box:
                # the previous copy out of this slot's pinned buffer must be done first
                self._uploaded[slot].synchronize()
                np.copyto(pinned_image, images)
                np.copyto(pinned_box, boxes)
            stream = self._upload_stream
            with torch.cuda.stream(stream):
                # and the last compute that read this slot's device buffer must be done
                stream.wait_event(self._consumed[slot])
                self._inputs[slot][0].copy_(self._pinned[slot][0], non_blocking=True)
                self._inputs[slot][1].copy_(self._pinned[slot][1], non_blocking=True)
                self._uploaded[slot].record(stream)
        self._put(slot, True)

    def launch(self, slot: int) -> None:
        if not self._cuda:
            super().launch(slot)             # collect runs it
            return
        self._take_to_launch(slot)
        stream = self._compute_stream
        with torch.cuda.device(self.device), torch.cuda.stream(stream), \
                torch.inference_mode():
            stream.wait_event(self._uploaded[slot])
            self._start[slot].record(stream)
            if self.cuda_graphs:
                self._graphs[slot].replay()
                out = self._graph_out[slot]
            else:
                out = self._model(*self._inputs[slot])
            self._end[slot].record(stream)
            self._consumed[slot].record(stream)
            # fresh pinned memory from torch's caching host allocator: the caller may hold
            # the array (ZeroMQ sends it without a copy) while later batches come back
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            self._downloaded[slot].record(stream)
        self._put_launched(slot, host)

    def collect(self, slot: int) -> np.ndarray:
        if not self._cuda:
            image, box = self._take(slot)  # type: ignore[misc]
            with torch.inference_mode():
                start = time.perf_counter()
                out = self._model(image, box)
                self.execute_times_ms.append((time.perf_counter() - start) * 1000.0)
            return out.numpy()      # a new tensor per run: the array is the caller's
        host: torch.Tensor = self._take_launched(slot)  # type: ignore[assignment]
        self._downloaded[slot].synchronize()
        self.execute_times_ms.append(self._start[slot].elapsed_time(self._end[slot]))
        return host.numpy()

    def close(self) -> None:
        if not self._closed:
            if self._cuda:
                torch.cuda.synchronize(self.device)
                self._graphs = [None] * NUM_SLOTS
                self._graph_out = [None] * NUM_SLOTS
                self._inputs = []
                self._pinned = []
                self._pinned_np = []
            self._model = None
        super().close()
