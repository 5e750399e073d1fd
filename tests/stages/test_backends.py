"""The executor backends against eager ServingModel, on tiny models: ort, torch, acl stand-in.

Every backend must give the reference output per slot, also with upload + launch and
collect on two threads as the executor runs them, keep its timings, and fail with a
clear message when something is missing.
The acl backend runs against tests/fake_aclruntime, which enforces aclruntime's contract
(its own tests: test_acl.py).
CUDA tests run only where torch sees a GPU.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pspnet.model.manifest import Manifest
from pspnet.model.serving_model import ServingModel
from pspnet.stages.backends import (
    KINDS,
    NUM_SLOTS,
    SIMULATED,
    Backend,
    BackendUnavailable,
    open_backend,
    throughput,
)
from tests.kit import with_om
from tests.tiny_model import random_batch

BATCH = 4
SIZE = (64, 64)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# ---- helpers (the fixtures are in conftest.py) ------------------------------------------

def reference(model: ServingModel, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(images), torch.from_numpy(boxes)).numpy()


def open_kind(kind: str, model_dir: Path, tmp_path: Path, batch: int = BATCH,
              **kwargs) -> Backend:
    if kind == "acl":
        return open_backend("acl", with_om(model_dir, tmp_path), batch, device="npu:0",
                            **kwargs)
    return open_backend(kind, model_dir, batch, **kwargs)


def assert_matches(head: str, got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if head == "logits":
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    else:
        assert got.dtype == np.uint8
        assert np.mean(got == want) >= 0.999


# ---- every backend against the eager graph ---------------------------------------------

@pytest.mark.parametrize("head", ["logits", "labels"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_eager(kind, head, tiny_models, references, tmp_path, request):
    if kind == "acl":
        request.getfixturevalue("fake_acl")
    backend = open_kind(kind, tiny_models[head], tmp_path)
    assert isinstance(backend, Backend)
    assert (backend.name, backend.batch_size, backend.head, backend.input_size) == \
        (kind, BATCH, head, SIZE)
    kept = []
    for k in range(4):                      # both slots, each used twice
        images, boxes = random_batch(BATCH, SIZE, seed=k)
        backend.upload(k % NUM_SLOTS, images, boxes)
        kept.append((backend.execute(k % NUM_SLOTS), images, boxes))
    for out, images, boxes in kept:         # earlier outputs were not overwritten
        assert_matches(head, out, reference(references[head], images, boxes))
    assert len(backend.execute_times_ms) == 4
    assert all(t > 0 for t in backend.execute_times_ms)
    assert throughput(BATCH, backend.execute_times_ms) > 0
    backend.close()
    backend.close()                         # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        backend.upload(0, images, boxes)


def run_like_the_executor(backend: Backend, batches: list[tuple[np.ndarray, np.ndarray]],
                          ) -> dict[int, np.ndarray]:
    """The executor's pattern: assemble into the slot's host buffers, upload and launch on
    one thread; collect in order on another, and only then free the slot."""
    free = [threading.Semaphore(1) for _ in range(NUM_SLOTS)]
    ready: queue.Queue = queue.Queue()
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def assemble() -> None:
        try:
            for k, (images, boxes) in enumerate(batches):
                slot = k % NUM_SLOTS
                assert free[slot].acquire(timeout=60)
                host_images, host_boxes = backend.host_buffers(slot)
                np.copyto(host_images, images)       # reuse the slot's host buffers
                np.copyto(host_boxes, boxes)
                backend.upload(slot, host_images, host_boxes)
                backend.launch(slot)
                ready.put((k, slot))
        except BaseException as error:  # noqa: BLE001  (reported by the main thread)
            errors.append(error)
        ready.put(None)

    def run() -> None:
        try:
            while (item := ready.get(timeout=60)) is not None:
                k, slot = item
                results[k] = backend.collect(slot)
                backend.host_buffers(slot)[0].fill(0)    # refilled right away next
                free[slot].release()
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=assemble), threading.Thread(target=run)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == list(range(len(batches)))
    run_like_the_executor.assembler = threads[0].ident      # type: ignore[attr-defined]
    return results


@pytest.mark.parametrize("kind", KINDS)
def test_two_threads_interleaved(kind, tiny_models, references, tmp_path, request):
    """Every batch right, and every returned array still right after later batches ran."""
    if kind == "acl":
        fake = request.getfixturevalue("fake_acl")
    backend = open_kind(kind, tiny_models["logits"], tmp_path)
    batches = [random_batch(BATCH, SIZE, seed=100 + k) for k in range(8)]
    results = run_like_the_executor(backend, batches)
    if kind == "acl":               # every aclruntime call on one thread, not in this process
        calls = fake.events()
        assert {(e["pid"], e["thread"]) for e in calls} == \
            {(backend._session.proc.pid, calls[0]["thread"])}
    for k, (images, boxes) in enumerate(batches):
        assert_matches("logits", results[k], reference(references["logits"], images, boxes))
    for slot in range(NUM_SLOTS):                   # same arrays each time: made once
        assert backend.host_buffers(slot)[0] is backend.host_buffers(slot)[0]
    assert backend.host_buffers(0)[0] is not backend.host_buffers(1)[0]
    assert len(backend.execute_times_ms) == len(batches)
    backend.close()


@pytest.mark.parametrize("kind", [*KINDS, SIMULATED])
def test_launch_and_collect_out_of_turn(kind, tiny_models, tmp_path, request):
    if kind == "acl":
        request.getfixturevalue("fake_acl")
    backend = open_kind(kind, tiny_models["labels"], tmp_path)
    with pytest.raises(RuntimeError, match="no batch pending"):
        backend.collect(0)
    backend.upload(0, *random_batch(BATCH, SIZE, seed=1))
    backend.launch(0)
    assert backend.collect(0).shape == (BATCH, *SIZE)
    with pytest.raises(RuntimeError, match="no batch pending"):
        backend.collect(0)
    with pytest.raises(ValueError, match="slot must be"):
        backend.launch(NUM_SLOTS)
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.launch(0)


# ---- interface and argument errors --------------------------------------------------------

def test_unknown_kind_lists_kinds(tiny_models):
    with pytest.raises(ValueError, match="ort, torch, acl"):
        open_backend("tensorflow", tiny_models["logits"], BATCH)


@pytest.mark.parametrize("kind", ["ort", "torch"])
def test_bad_arguments(kind, tiny_models):
    with pytest.raises(ValueError, match="no model for batch size 3"):
        open_backend(kind, tiny_models["logits"], 3)
    with pytest.raises(ValueError, match="unknown .* option"):
        open_backend(kind, tiny_models["logits"], BATCH, options={"thread": "2"})
    with pytest.raises(ValueError, match="precision"):
        open_backend(kind, tiny_models["logits"], BATCH, precision="int8")
    with pytest.raises(ValueError, match="device"):
        open_backend(kind, tiny_models["logits"], BATCH, device="gpu0")


@pytest.mark.parametrize("kind", ["ort", "torch"])
def test_upload_checks_batch(kind, tiny_models):
    backend = open_backend(kind, tiny_models["logits"], BATCH)
    images, boxes = random_batch(BATCH - 1, SIZE, seed=0)
    with pytest.raises(ValueError, match="pad a partial batch"):
        backend.upload(0, images, boxes[:BATCH - 1])
    images, boxes = random_batch(BATCH, SIZE, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        backend.upload(0, images.astype(np.float32), boxes)
    with pytest.raises(ValueError, match="int32"):
        backend.upload(0, images, boxes.astype(np.int64))
    with pytest.raises(ValueError, match="slot"):
        backend.upload(NUM_SLOTS, images, boxes)
    with pytest.raises(RuntimeError, match="no batch pending"):
        backend.execute(1)
    backend.upload(1, images[:, ::-1], boxes)       # non-contiguous views are fine
    assert backend.execute(1).shape[0] == BATCH
    backend.close()


def test_missing_files(tiny_models, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        open_backend("ort", tmp_path / "nowhere", BATCH)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["logits"], broken)
    (broken / f"pspnet_bs{BATCH}.onnx").unlink()
    (broken / "pspnet_core.pt2").unlink()
    with pytest.raises(FileNotFoundError, match="ONNX model for batch size 4 is missing"):
        open_backend("ort", broken, BATCH)
    with pytest.raises(FileNotFoundError, match="torch program missing"):
        open_backend("torch", broken, BATCH)
    (broken / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        open_backend("ort", broken, BATCH)


# ---- ort ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cuda:0", "tensorrt:0", "cann:0"])
def test_ort_unavailable_provider(device, tiny_models):
    import onnxruntime

    provider = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
                "cann": "CANNExecutionProvider"}[device.split(":")[0]]
    if provider in onnxruntime.get_available_providers():
        pytest.skip(f"{provider} is available here")
    with pytest.raises(BackendUnavailable, match=f"{provider}.*CPUExecutionProvider"):
        open_backend("ort", tiny_models["logits"], BATCH, device=device)


def test_ort_threads_and_precision(tiny_models):
    backend = open_backend("ort", tiny_models["labels"], 1, options={"threads": "1"})
    assert backend.execute_times_ms == []
    backend.close()
    with pytest.raises(ValueError, match="fp16 on tensorrt and cann"):
        open_backend("ort", tiny_models["labels"], 1, precision="fp16")


@pytest.mark.parametrize("spin", ["0", "1"])
def test_ort_spinning_is_set_on_the_session(tiny_models, spin):
    """spin=0 (the plan's choice where processes share cores) reaches the session's
    intra-op and inter-op pools; without the option onnxruntime keeps its default."""
    backend = open_backend("ort", tiny_models["labels"], 1,
                           options={"threads": "2", "spin": spin})
    session_options = backend._session.get_session_options()
    assert session_options.intra_op_num_threads == 2
    for pool in ("intra_op", "inter_op"):
        assert session_options.get_session_config_entry(
            f"session.{pool}.allow_spinning") == spin
    backend.close()


def test_ort_run_spin_spins_within_a_run_only(tiny_models):
    """run_spin=1: the intra-op pool spins between operators and is told to stop when a run
    ends (session.force_spinning_stop), so idle threads sleep; the inter-op pool keeps
    spin's value. It answers as the sleeping session does."""
    spun = open_backend("ort", tiny_models["labels"], 1,
                        options={"threads": "2", "spin": "0", "run_spin": "1"})
    entry = spun._session.get_session_options().get_session_config_entry
    assert entry("session.intra_op.allow_spinning") == "1"
    assert entry("session.force_spinning_stop") == "1"
    assert entry("session.inter_op.allow_spinning") == "0"
    plain = open_backend("ort", tiny_models["labels"], 1, options={"threads": "2", "spin": "0"})
    images, boxes = plain.host_buffers(0)
    images[:] = np.arange(images.size, dtype=np.uint64).reshape(images.shape) % 251
    boxes[:] = (0, 0, images.shape[1], images.shape[2])         # top, left, height, width
    got = []
    for backend in (plain, spun):
        backend.upload(0, images, boxes)
        got.append(backend.execute(0))
        backend.close()
    np.testing.assert_array_equal(got[0], got[1])


# ---- torch -------------------------------------------------------------------------------

def test_torch_cpu_rejects_cuda_only_settings(tiny_models):
    with pytest.raises(ValueError, match="runs fp32/bf16 on cpu, not --precision fp16"):
        open_backend("torch", tiny_models["logits"], BATCH, precision="fp16")
    with pytest.raises(ValueError, match="cuda_graphs=1 needs a CUDA device"):
        open_backend("torch", tiny_models["logits"], BATCH, options={"cuda_graphs": "1"})
    if not CUDA:
        # a CPU build says how to install a CUDA one; a CUDA build without a GPU says so
        with pytest.raises(BackendUnavailable, match="is a CPU build: install a CUDA build "
                           "with|sees no CUDA device"):
            open_backend("torch", tiny_models["logits"], BATCH, device="cuda:0")


def test_torch_cpu_bf16(tiny_models, references):
    try:
        backend = open_backend("torch", tiny_models["labels"], BATCH, precision="bf16",
                               options={"threads": "1"})
    except BackendUnavailable as error:
        pytest.skip(str(error))
    images, boxes = random_batch(BATCH, SIZE, seed=7)
    backend.upload(0, images, boxes)
    out = backend.execute(0)
    want = reference(references["labels"], images, boxes)
    assert out.dtype == np.uint8 and out.shape == want.shape
    assert np.mean(out == want) >= 0.9              # bf16 flips near-ties only
    backend.close()


@pytest.mark.slow
def test_torch_cpu_compile(tiny_models, references, tmp_path, monkeypatch):
    pytest.importorskip("torch._inductor")
    # the backend sets it for its process; monkeypatch puts the old value back afterwards
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "not-this-one"))
    cache = tmp_path / "compile-cache"
    backend = open_backend("torch", tiny_models["logits"], 1,
                           options={"compile": "1", "compile_cache": str(cache)})
    assert backend.compile_seconds is not None and backend.compile_seconds > 0
    assert any(path.is_file() for path in cache.rglob("*"))     # the next start reuses it
    images, boxes = random_batch(1, SIZE, seed=3)
    backend.upload(0, images, boxes)
    assert_matches("logits", backend.execute(0), reference(references["logits"], images,
                                                           boxes))
    backend.close()


# ---- sim: the simulated device the host-side bench runs against --------------------------

@pytest.mark.parametrize("head", ["logits", "labels"])
@pytest.mark.parametrize("sync", ["0", "1"])
def test_sim_backend_keeps_a_device_s_timing(head, sync, tiny_models):
    """A batch costs batch/img_s of device time; queued (sync=0) launches run back to back
    behind each other, a synchronous one (sync=1) runs inside collect."""
    backend = open_backend(SIMULATED, tiny_models[head], BATCH,
                           options={"img_s": "100", "sync": sync})
    batch_s = BATCH / 100
    manifest = Manifest.read(tiny_models[head])
    batches = [random_batch(BATCH, SIZE, seed=k) for k in range(6)]
    started = time.perf_counter()
    results = run_like_the_executor(backend, batches)
    assert time.perf_counter() - started >= len(batches) * batch_s
    assert backend.execute_times_ms == [pytest.approx(batch_s * 1e3)] * len(batches)
    out = results[0]
    assert out.shape == backend.output_shape and out.dtype == backend.output_dtype
    labels = out[0] if head == "labels" else out[0].argmax(0)
    # every class as a band, as far as the width allows
    assert len(np.unique(labels)) == min(manifest.num_classes, labels.shape[1])

    backend.upload(0, *batches[0])
    backend.upload(1, *batches[1])
    launched = time.perf_counter()
    backend.launch(0)
    backend.launch(1)
    assert time.perf_counter() - launched < batch_s        # launch never waits
    backend.collect(0)
    backend.collect(1)
    assert time.perf_counter() - launched >= 2 * batch_s   # one device: one after the other

    # a second launch before the first is collected is refused, and its upload stays
    backend.upload(0, *batches[0])
    backend.launch(0)
    backend.upload(0, *batches[1])
    with pytest.raises(RuntimeError, match=r"launch\(0\) twice without collect\(0\)"):
        backend.launch(0)
    backend.collect(0)
    backend.launch(0)                       # the refused launch's upload, still pending
    backend.collect(0)
    with pytest.raises(RuntimeError, match="no batch pending"):
        backend.launch(0)
    with pytest.raises(ValueError, match="unknown sim backend option"):
        open_backend(SIMULATED, tiny_models[head], BATCH, options={"speed": "1"})
    backend.close()


@needs_cuda
@pytest.mark.parametrize("precision,options", [
    ("fp32", {}),
    ("fp32", {"cuda_graphs": "1"}),
    ("fp16", {}),
    ("bf16", {"cuda_graphs": "1"}),
    ("fp16", {"compile": "1"}),
    ("fp16", {"compile": "1", "cuda_graphs": "1"}),     # inductor's kernels, replayed
])
@pytest.mark.parametrize("head", ["logits", "labels"])
def test_torch_cuda(head, precision, options, tiny_models, references):
    backend = open_backend("torch", tiny_models[head], BATCH, device="cuda:0",
                           precision=precision, options=options)
    if options.get("compile") == "1":
        assert backend.compile_seconds is not None
    kept = []
    for k in range(6):
        images, boxes = random_batch(BATCH, SIZE, seed=200 + k)
        backend.upload(k % NUM_SLOTS, images, boxes)
        kept.append((backend.execute(k % NUM_SLOTS), images, boxes))
    for out, images, boxes in kept:
        want = reference(references[head], images, boxes)
        assert out.shape == want.shape
        if precision == "fp32":                     # TF32 convs: not bit-exact
            if head == "logits":
                np.testing.assert_allclose(out, want, rtol=1e-2, atol=1e-2)
            else:
                assert np.mean(out == want) >= 0.99
        elif head == "logits":
            np.testing.assert_allclose(out, want, rtol=5e-2, atol=5e-2)
        else:
            assert np.mean(out == want) >= 0.9
    assert len(backend.execute_times_ms) == 6 and all(t > 0 for t in backend.execute_times_ms)
    backend.close()


@needs_cuda
@pytest.mark.parametrize("options", [{}, {"cuda_graphs": "1"}])
def test_torch_cuda_two_threads(options, tiny_models, references):
    """Pinned host buffers filled in place, upload on a side stream and the next launch
    queued while the other slot computes: every batch stays right, and a collected array
    is not overwritten by later batches (ZeroMQ may still be sending it)."""
    backend = open_backend("torch", tiny_models["labels"], BATCH, device="cuda",
                           options=options)
    images, _ = backend.host_buffers(0)
    assert torch.from_numpy(images).is_pinned()
    batches = [random_batch(BATCH, SIZE, seed=300 + k) for k in range(16)]
    results = run_like_the_executor(backend, batches)
    for k, (images, boxes) in enumerate(batches):
        want = reference(references["labels"], images, boxes)
        assert np.mean(results[k] == want) >= 0.99
    backend.upload(0, *batches[0])
    backend.launch(0)
    backend.upload(0, *batches[1])
    with pytest.raises(RuntimeError, match="twice"):
        backend.launch(0)                   # refused before anything is queued
    assert np.mean(backend.collect(0) == results[0]) >= 0.99
    backend.launch(0)                       # the refused launch's upload is still there
    assert np.mean(backend.collect(0) == results[1]) >= 0.99
    backend.close()


def test_sim_backend_answers_as_a_labels_head_when_told(tiny_models):
    """head=labels on a logits model: label maps at the input size (what `pspnet bench
    --front-ceiling` uses to leave postprocess nothing but a crop)."""
    backend = open_backend(SIMULATED, tiny_models["logits"], BATCH,
                           options={"img_s": "100000", "head": "labels"})
    assert backend.head == "labels"
    backend.upload(0, *random_batch(BATCH, SIZE, seed=0))
    out = backend.execute(0)
    assert out.shape == (BATCH, *SIZE) and out.dtype == np.uint8
    with pytest.raises(ValueError, match="head=probs"):
        open_backend(SIMULATED, tiny_models["logits"], BATCH, options={"head": "probs"})


def test_sim_backends_on_one_device_share_its_time(tiny_models):
    """The executor opens one backend per batch size (backends.ladder): on one simulated
    device their batches run one after the other, not side by side (0.1 s each here)."""
    one = open_backend(SIMULATED, tiny_models["labels"], 1, options={"img_s": "10"})
    four = open_backend(SIMULATED, tiny_models["labels"], BATCH, options={"img_s": "40"})
    one.upload(0, *random_batch(1, SIZE, seed=0))
    four.upload(1, *random_batch(BATCH, SIZE, seed=1))
    launched = time.perf_counter()
    one.launch(0)
    four.launch(1)
    one.collect(0)
    four.collect(1)
    assert time.perf_counter() - launched >= 0.2
