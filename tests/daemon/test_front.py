"""Issue 3: the stages as real processes over ZeroMQ, against an independent reference."""

from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image

from build_model.reference import Reference
from daemon.front import Front, PipelineError, requests_for
from stages import wire
from stages.config import Addresses, PipelineConfig
from stages.executor import Executor
from stages.manifest import Manifest, voc_palette
from tests.mmseg_metric import mmseg_iou

FAKE_ACL = Path(__file__).parents[1] / "fake_aclruntime"


def run_all(cfg: PipelineConfig, paths, anns=None):
    with Front(cfg) as pipe:
        results = list(pipe.run(requests_for(paths, anns)))
        status = pipe.status()
        summary = pipe.metrics.summary() if pipe.metrics.images else None
    return results, status, summary


def answered_once(results, n: int) -> dict[str, wire.Result]:
    counts = collections.Counter(r.id for r in results)
    assert sorted(counts, key=int) == [str(i) for i in range(n)]
    assert set(counts.values()) == {1}, "an id was answered twice"
    return {r.id: r for r in results}


@pytest.fixture(scope="module")
def voc(tmp_path_factory, photos, mmseg_models) -> dict:
    """Real photos with ground truth: the reference prediction, VOC-style 255 borders, and a
    relabelled block, so the mIoU is neither 100 nor trivial."""
    root = tmp_path_factory.mktemp("voc")
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    reference = Reference(mmseg_models["logits"])
    rng = np.random.default_rng(3)
    images, anns, expected = [], [], {}
    for name, rgb in photos:
        stem = Path(name).stem
        image = root / "JPEGImages" / f"{stem}.jpg"
        Image.fromarray(rgb).save(image, quality=95)
        decoded = np.asarray(Image.open(image).convert("RGB"))
        pred = {head: reference.predict(decoded, head) for head in ("logits", "labels")}
        truth = pred["logits"].copy()
        edges = np.zeros_like(truth, bool)
        edges[:-1] |= truth[:-1] != truth[1:]
        edges[:, :-1] |= truth[:, :-1] != truth[:, 1:]
        truth[edges] = 255
        h, w = truth.shape
        top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        truth[top:top + h // 4, left:left + w // 4] = int(rng.integers(0, 21))
        ann = root / "SegmentationClass" / f"{stem}.png"
        gt = Image.fromarray(truth, mode="P")
        gt.putpalette([c for rgb_ in voc_palette() for c in rgb_])
        gt.save(ann)
        images.append(image)
        anns.append(ann)
        expected[str(len(images) - 1)] = pred
    assert len({len(np.unique(p["logits"])) for p in expected.values()}) > 1
    assert min(len(np.unique(p["logits"])) for p in expected.values()) >= 3, \
        "degenerate test model: too few classes per image"
    return {"images": images, "anns": anns, "expected": expected}


CASES = [("ort", "logits"), ("ort", "labels"), ("torch", "logits"), ("acl", "logits")]


@pytest.mark.parametrize(("backend", "head"), CASES, ids=[f"{b}-{h}" for b, h in CASES])
def test_voc_through_real_processes(backend, head, voc, mmseg_models, tmp_path, monkeypatch):
    model_dir = mmseg_models[head]
    if backend == "acl":
        from tests.stages.test_backends import with_om

        # the workers are fresh interpreters: they find the stand-in through PYTHONPATH
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            [str(FAKE_ACL), *filter(None, [os.environ.get("PYTHONPATH")])]))
        model_dir = with_om(model_dir, tmp_path)
    devices = ("npu:0",) if backend == "acl" else ("cpu",)
    cfg = PipelineConfig(model_dir=model_dir, backend=backend, devices=devices, batch_size=4,
                         preprocess_workers=2, postprocess_workers=2, out_dir=tmp_path / "m",
                         log_json=True)
    results, status, summary = run_all(cfg, voc["images"], voc["anns"])
    by_id = answered_once(results, len(voc["images"]))
    agreement = []
    for rid, result in by_id.items():
        assert result.status == wire.OK, result.error
        mask = np.asarray(Image.open(result.mask))
        assert Image.open(result.mask).mode == "P"
        want = voc["expected"][rid][head]
        assert mask.shape == want.shape
        agreement.append((mask == want).mean())
    print(f"{backend}/{head}: pixel agreement with the reference "
          f"min {min(agreement):.5f} mean {np.mean(agreement):.5f}")
    assert min(agreement) >= 0.995
    masks = [Path(by_id[str(i)].mask) for i in range(len(voc["images"]))]
    theirs = mmseg_iou(masks, voc["anns"])
    exact = mmseg_iou(masks, voc["anns"], exact_sums=True)
    print(f"pipeline mIoU {summary['mIoU']:.7f} / mmseg IoUMetric {theirs['mIoU']:.7f} "
          f"(float64 sums {exact['mIoU']:.7f})")
    for key in ("mIoU", "aAcc", "mAcc"):   # percent; 1e-6 as mmseg's fractions
        assert summary[key] / 100 == pytest.approx(theirs[key] / 100, abs=1e-6)
        assert summary[key] == pytest.approx(exact[key], abs=1e-6)
    assert status["front"]["ok"] == len(voc["images"])
    assert 10 < summary["mIoU"] < 100


def test_partial_batch_no_filler_leaks(tiny_models, photo_files, tmp_path):
    cfg = PipelineConfig(model_dir=tiny_models["logits"], batch_size=16, max_wait_ms=50,
                         out_dir=tmp_path / "m", log_json=True)
    results, status, _ = run_all(cfg, photo_files[:17])
    by_id = answered_once(results, 17)
    assert all(r.status == wire.OK for r in by_id.values())
    assert len(list((tmp_path / "m").glob("*.png"))) == 17
    assert status["front"]["duplicates_dropped"] == 0


def test_bad_inputs_answered_others_succeed(tiny_models, photo_files, tmp_path):
    from tests.bad_images import EXPECT, write_corpus

    corpus = {k: v for k, v in write_corpus(tmp_path / "bad").items() if k in EXPECT}
    good = photo_files[:6]
    paths = [*good, *corpus.values()]
    cfg = PipelineConfig(model_dir=tiny_models["logits"], batch_size=4, max_wait_ms=20,
                         out_dir=tmp_path / "m", log_json=True)
    results, status, _ = run_all(cfg, paths)
    by_id = answered_once(results, len(paths))
    for i in range(len(good)):
        assert by_id[str(i)].status == wire.OK
    outcome = {kind: by_id[str(len(good) + i)] for i, kind in enumerate(corpus)}
    for kind, result in outcome.items():
        print(f"{kind:>20}: {result.status} {result.error or ''}")
    must_fail = {"missing", "directory", "empty", "truncated_jpeg", "corrupt_jpeg",
                 "random_bytes_jpg", "text_named_jpg", "huge_header_jpeg", "huge_header_png",
                 "truncated_png"}
    must_pass = {"good_jpeg", "png_named_jpg", "grayscale_jpeg", "cmyk_jpeg",
                 "progressive_jpeg", "tiny_1x1", "rgba_png", "palette_png", "gray16_png", "bmp"}
    assert must_fail | must_pass <= set(outcome)
    for kind in must_fail:
        assert outcome[kind].status == wire.ERROR and outcome[kind].error, kind
    for kind in must_pass:
        assert outcome[kind].status == wire.OK, (kind, outcome[kind].error)
    assert status["front"]["errors"] == sum(r.status == wire.ERROR for r in by_id.values())


def test_images_sharing_a_mask_name_do_not_overwrite_each_other(tiny_models, photo_files,
                                                                tmp_path):
    """a/x.jpg, b/x.jpg, a/x.png and "with space.jpg" / "with_space.jpg" each cut down to
    one mask name: the first image keeps it, the others are answered with an error naming
    it, and a/x.jpg submitted again replaces its own mask (two postprocess workers)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    names = ["a/x.jpg", "b/x.jpg", "a/x.png", "a/with space.jpg", "a/with_space.jpg"]
    for name, photo in zip(names, photo_files, strict=False):
        Image.open(photo).save(tmp_path / name)
    a, b, png, space, underscore = (str(tmp_path / n) for n in names)
    out = tmp_path / "m"
    cfg = PipelineConfig(model_dir=tiny_models["logits"], batch_size=4, max_wait_ms=20,
                         preprocess_workers=1, postprocess_workers=2, out_dir=out,
                         log_json=True)
    with Front(cfg) as pipe:
        first = {r.id: r for r in pipe.run([wire.Request("a", a), wire.Request("s", space)])}
        assert all(r.status == wire.OK for r in first.values()), first
        kept = {p.name: np.asarray(Image.open(p)) for p in out.glob("*.png")}
        later = {r.id: r for r in pipe.run([
            wire.Request("b", b), wire.Request("png", png), wire.Request("u", underscore),
            wire.Request("again", a)])}
    assert sorted(kept) == ["with_space.png", "x.png"]
    for rid, holder, mask in (("b", a, "x.png"), ("png", a, "x.png"),
                              ("u", space, "with_space.png")):
        assert later[rid].status == wire.ERROR, later[rid]
        assert later[rid].error == (f"mask name {mask} already holds the mask of {holder}; "
                                    "rename one of them")
    assert later["again"].status == wire.OK and later["again"].mask == str(out / "x.png")
    for name, pixels in kept.items():               # neither was overwritten
        assert np.array_equal(np.asarray(Image.open(out / name)), pixels)
    assert sorted(p.name for p in out.iterdir()) == ["with_space.png", "x.png"]


def test_a_mask_dir_that_cannot_be_created_stops_the_start(tiny_models, tmp_path, capfd):
    """--out naming a regular file: the postprocess worker reports a fatal start (one
    reason, no restart loop), as a model that cannot load does."""
    from stages.logs import configure_logging

    configure_logging("info", json=True)   # the front logs in this process: not at the
    blocker = tmp_path / "not-a-dir"       # level an earlier test's command left behind
    blocker.write_text("a file")
    cfg = PipelineConfig(model_dir=tiny_models["logits"], batch_size=4, preprocess_workers=1,
                         postprocess_workers=1, out_dir=blocker, log_json=True,
                         start_timeout_s=30)
    started = time.monotonic()
    with pytest.raises(PipelineError) as caught, Front(cfg):
        pass
    assert str(caught.value) == (f"postprocess-0 cannot start: mask directory (--out) "
                                 f"{blocker} exists and is not a directory")
    assert time.monotonic() - started < 25
    captured = capfd.readouterr()
    logs = captured.out + captured.err
    assert logs.count("child started") == 3 and "child died" not in logs, logs
    assert blocker.read_text() == "a file"


LEFT_OPEN = """
import sys
from pathlib import Path
from stages.config import PipelineConfig
from daemon.front import Front
from stages.logs import configure_logging
configure_logging("warning")
pipe = Front(PipelineConfig(model_dir=Path(sys.argv[1]), backend="sim", batch_size=4,
                            preprocess_workers=1, postprocess_workers=1))
pipe.start()
print(" ".join(str(s.proc.pid) for s in pipe.supervisor.slots), flush=True)
raise SystemExit(0)          # no close(): an exception would skip it the same way
"""


def test_a_process_that_exits_with_its_pipeline_open_does_not_hang(tiny_models):
    """Children ignore SIGTERM (a group signal must not kill them mid-drain), which is what
    multiprocessing sends daemon children at exit before joining them: without the
    pipeline's own exit hook the owner waited for ever (seen when a start-up failure
    skipped close)."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", LEFT_OPEN, str(tiny_models["labels"])],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    time.sleep(0.5)
    alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")
             and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]
    assert alive == [], f"children left: {alive}"


class SlowBackend:
    """Upload costs `transfer_s`, execute `compute_s`: what the executor must overlap."""

    name, head = "slow", "labels"

    def __init__(self, batch: int, size: tuple[int, int], transfer_s: float, compute_s: float):
        self.batch_size, self.input_size = batch, size
        self.transfer_s, self.compute_s = transfer_s, compute_s
        self.execute_times_ms: list[float] = []
        self.device: dict[int, np.ndarray] = {}
        self.filled: list[int] = []           # real rows per uploaded batch

    def host_buffers(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.zeros((self.batch_size, *self.input_size, 3), np.uint8),
                np.zeros((self.batch_size, 4), np.int32))

    def upload(self, slot: int, images: np.ndarray, boxes: np.ndarray) -> None:
        time.sleep(self.transfer_s)
        self.device[slot] = boxes.copy()
        self.filled.append(int((boxes[:, 2] > 0).sum()))

    def launch(self, slot: int) -> None:
        pass                                  # a synchronous runtime: collect runs it

    def collect(self, slot: int) -> np.ndarray:
        time.sleep(self.compute_s)
        return np.zeros((self.batch_size, *self.input_size), np.uint8)

    def execute(self, slot: int) -> np.ndarray:
        return self.collect(slot)

    def close(self) -> None:
        pass


class ExecutorAlone:
    """One Executor on a thread, its peers played by this test's sockets: the front (a
    ROUTER its notes, errors and heartbeats reach), a preprocess worker (a PUSH to its
    images socket) and a postprocess worker (a DEALER asking for its outputs)."""

    def __init__(self, model_dir: Path, tmp_path: Path, backend: object, max_wait_ms: float,
                 credits: int = 1000, **kwargs: object) -> None:
        from stages.child import Child

        cfg = PipelineConfig(model_dir=model_dir, max_wait_ms=max_wait_ms, log_json=True,
                             run_dir=tmp_path)
        addrs = Addresses.for_config(cfg, tmp_path)
        ctx = zmq.Context.instance()
        self.front = ctx.socket(zmq.ROUTER)     # executor's notes, errors, heartbeats -> test
        self.front.bind(addrs.control)
        child = Child("executor", 0, cfg, addrs, supervised=False)
        self.name = child.name
        executor = Executor(child, backend, **kwargs)  # type: ignore[arg-type]
        self.images = ctx.socket(zmq.PUSH)      # test (as preprocess) -> executor
        self.images.connect(child.inputs)
        self.outputs = ctx.socket(zmq.DEALER)   # executor -> test (as postprocess)
        self.outputs.setsockopt(zmq.IDENTITY, b"postprocess-0-1")
        self.outputs.connect(child.outputs)
        self.outputs.send_multipart(wire.encode(wire.Credit(credits)))
        self.notes: list[wire.Message] = []
        threading.Thread(target=executor.run, daemon=True).start()
        self.pixels = np.zeros((*Manifest.read(model_dir).input_size, 3), np.uint8)

    def send(self, i: int, to: str | None = None) -> None:
        place = wire.Placement(64, 64, 1.0, 0, 0, 64, 64)
        self.images.send_multipart(wire.encode(wire.Image(
            wire.Request(str(i), "/x"), place, to or self.name, self.pixels)))

    def output_ids(self, n: int) -> list[str]:
        return [wire.decode(self.outputs.recv_multipart()).request.id for _ in range(n)]

    def next_note(self, kind: type, timeout_s: float = 10) -> wire.Message:
        """The first note of this kind not yet taken (notes from the two threads of the
        executor travel on two sockets: they may arrive in either order)."""
        for i, message in enumerate(self.notes):
            if isinstance(message, kind):
                return self.notes.pop(i)
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.front.poll(max(0.0, deadline - time.monotonic()) * 1e3), kind
            message = wire.decode(self.front.recv_multipart()[1:])
            if isinstance(message, kind):
                return message
            self.notes.append(message)

    def errors(self, n: int) -> dict[str, str]:
        """The next `n` error answers (id -> message), skipping heartbeats and notes."""
        failed: dict[str, str] = {}
        while len(failed) < n:
            message = self.next_note(wire.Result)
            failed[message.id] = message.error or ""
        return failed

    def close(self) -> None:
        for sock in (self.images, self.outputs, self.front):
            sock.close(0)


def test_executor_overlaps_assembly_and_transfer_with_compute(tiny_models, tmp_path):
    """N batches take about N x compute, not N x (compute + transfer + assembly)."""
    manifest = Manifest.read(tiny_models["labels"])
    batch, n_batches, compute_s, transfer_s = 4, 8, 0.20, 0.12
    backend = SlowBackend(batch, manifest.input_size, transfer_s, compute_s)
    alone = ExecutorAlone(tiny_models["labels"], tmp_path, backend, max_wait_ms=1000)
    started = time.perf_counter()
    for i in range(n_batches * batch):       # all queued at once: assembly is never waiting
        alone.send(i)
    got = alone.output_ids(n_batches * batch)
    elapsed = time.perf_counter() - started
    serial = n_batches * (compute_s + transfer_s)
    overlapped = n_batches * compute_s + transfer_s
    print(f"{n_batches} batches: {elapsed:.2f} s; overlapped ideal {overlapped:.2f} s, "
          f"serial {serial:.2f} s")
    assert sorted(got, key=int) == [str(i) for i in range(n_batches * batch)]
    assert elapsed < overlapped + 0.5 * (serial - overlapped)
    alone.close()


class LaunchFailsOnce(SlowBackend):
    """The device refuses the second batch at launch (a CUDA error, say)."""

    launches = 0

    def launch(self, slot: int) -> None:
        self.launches += 1
        if self.launches == 2:
            raise RuntimeError("device refused the batch")


def test_a_batch_that_fails_to_launch_is_answered_and_the_executor_goes_on(tiny_models,
                                                                            tmp_path):
    manifest = Manifest.read(tiny_models["labels"])
    backend = LaunchFailsOnce(4, manifest.input_size, transfer_s=0.0, compute_s=0.05)
    alone = ExecutorAlone(tiny_models["labels"], tmp_path, backend, max_wait_ms=1000)
    for i in range(12):                      # three full batches; the second fails
        alone.send(i)
    done = set(alone.output_ids(8))
    failed = alone.errors(4)
    assert done == {str(i) for i in (0, 1, 2, 3, 8, 9, 10, 11)}
    assert set(failed) == {"4", "5", "6", "7"}
    assert all("inference failed: device refused the batch" in e for e in failed.values())
    alone.close()


class DeviceBroken(SlowBackend):
    """Every batch fails on collect, as after a CUDA error that poisons the context."""

    def collect(self, slot: int) -> np.ndarray:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_an_executor_whose_device_keeps_failing_gives_up_to_be_restarted(tiny_models,
                                                                          tmp_path):
    """Three failed batches in a row: every image answered with the error, then the
    executor gives up (in the daemon: exits, and the front restarts it)."""
    from stages.executor import FAILED_IN_A_ROW_BEFORE_RESTART

    manifest = Manifest.read(tiny_models["labels"])
    reasons: list[str] = []
    alone = ExecutorAlone(tiny_models["labels"], tmp_path,
                          DeviceBroken(4, manifest.input_size, 0.0, 0.0), max_wait_ms=1000,
                          give_up=reasons.append)
    n = 4 * FAILED_IN_A_ROW_BEFORE_RESTART
    for i in range(n):
        alone.send(i)
    failed = alone.errors(n)
    assert all("inference failed: CUDA error" in e for e in failed.values())
    deadline = time.monotonic() + 10
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(failed) == {str(i) for i in range(n)}
    assert len(reasons) == 1 and f"{FAILED_IN_A_ROW_BEFORE_RESTART} batches in a row" \
        in reasons[0] and "illegal memory access" in reasons[0]
    assert not alone.outputs.poll(100)          # nothing went downstream
    alone.close()


def test_executor_keeps_filling_while_the_device_is_busy(tiny_models, tmp_path):
    """Past max_wait a partial batch runs only if the device is idle: while a batch runs,
    the next one keeps filling (a partial batch would wait anyway, at full cost)."""
    manifest = Manifest.read(tiny_models["labels"])
    backend = SlowBackend(4, manifest.input_size, transfer_s=0.0, compute_s=0.4)
    alone = ExecutorAlone(tiny_models["labels"], tmp_path, backend, max_wait_ms=20)
    alone.send(0)                            # alone, device idle: runs after max_wait
    time.sleep(0.1)
    for i in range(1, 5):                    # trickle in while that batch runs
        alone.send(i)
        time.sleep(0.05)
    alone.send(5)                            # device idle again after the second batch
    got = alone.output_ids(6)
    assert sorted(got, key=int) == [str(i) for i in range(6)]
    assert backend.filled == [1, 4, 1], backend.filled
    alone.close()


def test_executor_takes_only_images_meant_for_this_life_and_says_what_it_took(tiny_models,
                                                                               tmp_path):
    """An image addressed to a previous life of this executor (left in a preprocess
    worker's queue when it was restarted: the front has retried it already) is dropped; the
    others are taken, and the front hears which, batch by batch."""
    manifest = Manifest.read(tiny_models["labels"])
    backend = SlowBackend(4, manifest.input_size, transfer_s=0.0, compute_s=0.0)
    alone = ExecutorAlone(tiny_models["labels"], tmp_path, backend, max_wait_ms=1000)
    alone.send(100, to="executor-0-1")            # stale: another pid
    for i in range(4):
        alone.send(i)
    assert sorted(alone.output_ids(4), key=int) == ["0", "1", "2", "3"]
    took = alone.next_note(wire.Took)
    handed = alone.next_note(wire.Handed)
    assert sorted(took.ids, key=int) == ["0", "1", "2", "3"]
    assert sorted(handed.ids, key=int) == ["0", "1", "2", "3"]
    assert handed.to == "postprocess-0-1"
    beat = alone.next_note(wire.Heartbeat, timeout_s=5)
    assert beat.inputs.startswith("ipc://") and beat.capacity == 8 and beat.batch == 4
    assert not alone.outputs.poll(300)           # the stale image never went out
    alone.close()
