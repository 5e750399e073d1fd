"""The front in this process (pspnet.daemon.front.Front, as bench and eval use it), its workers as
real processes over ZeroMQ: VOC photos against an independent reference, partial batches,
mask names, a worker that cannot start, an owner that exits with the pipeline open.

The executor alone (its peers played by the test) is in tests/stages/test_executor.py."""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pspnet.build_model.reference import Reference
from pspnet.core import wire
from pspnet.core.config import PipelineConfig
from pspnet.daemon.answers import deliver_turn
from pspnet.daemon.front import Front, PipelineError, requests_for
from pspnet.daemon.roster import Roster
from pspnet.model.manifest import voc_palette
from pspnet.model.masks import mask_path, recorded_source
from tests.kit import FAKE_ACL, mask_pixels, with_om
from tests.mmseg_metric import mmseg_iou


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
        mask = mask_pixels(result.mask)
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
    assert status.front.ok == len(voc["images"])
    assert 10 < summary["mIoU"] < 100


def test_partial_batch_no_filler_leaks(tiny_models, photo_files, tmp_path):
    cfg = PipelineConfig(model_dir=tiny_models["logits"], batch_size=16, max_wait_ms=50,
                         out_dir=tmp_path / "m", log_json=True)
    results, status, _ = run_all(cfg, photo_files[:17])
    by_id = answered_once(results, 17)
    assert all(r.status == wire.OK for r in by_id.values())
    assert len(list((tmp_path / "m").rglob("*.png"))) == 17
    assert status.front.duplicates_dropped == 0


def test_a_forged_answer_inside_results_is_dropped_and_the_others_delivered(tiny_models):
    """A postprocess worker's Results carry several answers: each is checked alone (token,
    holder), so one without its request's token is counted and dropped while the others of
    the same message are delivered; its request stays pending until its own answer."""
    front = Front(PipelineConfig(model_dir=tiny_models["labels"]))
    front.roster = Roster(None, lambda worker, frames: True, 1, front.log)   # not started
    for i in range(3):
        assert front.submit(wire.Request(f"c{i}", f"/p/{i}.jpg"), origin="me")
    group = front.ledger.next_group(3)
    rids = [e.rid for e in group]
    front.ledger.dispatched(group, "preprocess-0-1", "executor-0-2")
    front.ledger.took("executor-0-2", rids)
    front.ledger.handed("executor-0-2", rids, "postprocess-0-3")
    trust = front.gate.trust

    def answer(rid: str, executor: str) -> wire.Result:
        return wire.Result(rid, 0, wire.OK, "/p.jpg", mask=f"/m/{rid}.png",
                           stage="postprocess", token=trust.token(rid, 0, executor),
                           size=(4, 5), found=((0, "background", 20),))

    sender = wire.WorkerId.parse("postprocess-0-3")
    results = wire.Results((answer(rids[0], "executor-0-2"), answer(rids[1], "executor-0-9"),
                            answer(rids[2], "executor-0-2")))
    front._handle(sender, True, wire.encode(results))
    taken = front.take_answers()
    assert sorted(r.id for r, _ in taken) == ["c0", "c2"]
    assert all(r.status == wire.OK and r.size == (4, 5) for r, _ in taken)
    assert front.totals["forged_dropped"] == 1 and front.pending == 1
    front._handle(sender, True, wire.encode(answer(rids[1], "executor-0-2")))
    assert [r.id for r, _ in front.take_answers()] == ["c1"] and front.pending == 0


def columns_front(tiny_models, n: int = 4):
    """A front (not started) with `n` requests handed to postprocess-0-3 by executor-0-2,
    and an ok answer maker for them."""
    front = Front(PipelineConfig(model_dir=tiny_models["labels"]))
    front.roster = Roster(None, lambda worker, frames: True, 1, front.log)   # not started
    for i in range(n):
        assert front.submit(wire.Request(f"c{i}", f"/p/{i}.jpg"), origin="me")
    group = front.ledger.next_group(n)
    rids = [e.rid for e in group]
    front.ledger.dispatched(group, "preprocess-0-1", "executor-0-2")
    front.ledger.took("executor-0-2", rids)
    front.ledger.handed("executor-0-2", rids, "postprocess-0-3")
    trust = front.gate.trust
    classes = front.metrics.areas.shape[-1]

    def answer(rid: str, attempt: int = 0, width: int = classes) -> wire.Result:
        return wire.Result(rid, attempt, wire.OK, "/p.jpg", mask=f"/m/{rid}.png",
                           stage="postprocess", token=trust.token(rid, attempt, "executor-0-2"),
                           areas=np.ones((4, width), np.int64), size=(4, 5),
                           found=((0, "background", 20),))
    return front, rids, answer


def test_answers_in_columns_are_admitted_by_the_ledger_rule_alone(tiny_models):
    """Issue 27: a Results' ok answers come in columns and are admitted in bulk, by the same
    rule as one answer: only from the worker holding the request, with its token and
    attempt; the first answer wins; a forged one is dropped, its request still pending."""
    front, rids, answer = columns_front(tiny_models)
    holder, stranger = (wire.WorkerId.parse(w) for w in ("postprocess-0-3", "postprocess-0-7"))
    front._handle(stranger, True, wire.encode(wire.Results((answer(rids[0]),
                                                            answer(rids[1])))))
    assert front.take_answers() == [] and front.totals["forged_dropped"] == 2
    assert front.pending == 4                       # nothing answered by a non-holder
    before = front.metrics.areas.sum()
    front._handle(holder, True, wire.encode(wire.Results(
        (answer(rids[0]), answer(rids[0]), answer(rids[1], attempt=1), answer(rids[2]),
         wire.Result(rids[3], 0, wire.ERROR, "/p.jpg", error="bad", stage="postprocess",
                     token=front.gate.trust.token(rids[3], 0, "executor-0-2"))))))
    taken = {r.id: r for r, _ in front.take_answers()}
    # rids[1]'s answer names attempt 1, which was never dispatched: its token cannot match
    assert sorted(taken) == ["c0", "c2", "c3"] and taken["c3"].status == wire.ERROR
    assert taken["c0"].status == wire.OK and taken["c0"].found == ((0, "background", 20),)
    assert taken["c0"].mask == f"/m/{rids[0]}.png" and taken["c0"].size == (4, 5)
    assert front.totals["duplicates_dropped"] == 1 and front.totals["forged_dropped"] == 3
    assert front.metrics.areas.sum() - before == 2 * front.metrics.areas.size   # c0, c2
    front._handle(holder, True, wire.encode(wire.Results((answer(rids[0]),
                                                          answer(rids[1])))))
    assert [r.id for r, _ in front.take_answers()] == ["c1"] and front.pending == 0
    assert front.totals["duplicates_dropped"] == 2     # c0 again: answered already


def test_answers_in_columns_whose_areas_do_not_fit_the_model_are_errors(tiny_models):
    front, rids, answer = columns_front(tiny_models, 2)
    holder = wire.WorkerId.parse("postprocess-0-3")
    width = front.metrics.areas.shape[-1] + 1
    front._handle(holder, True, wire.encode(wire.Results((answer(rids[0], width=width),
                                                          answer(rids[1], width=width)))))
    taken = [r for r, _ in front.take_answers()]
    assert sorted(r.id for r in taken) == ["c0", "c1"] and front.pending == 0
    assert all(r.status == wire.ERROR and "classes" in (r.error or "") for r in taken)
    assert front.metrics.images == 0


def test_a_clients_answers_leave_in_columns_and_come_back_whole(tiny_models):
    """The daemon's answers to a client: a block of ok answers in columns as it came
    (ids, attempts and paths the ledger's, tokens none), a message per block."""
    front, rids, answer = columns_front(tiny_models, 3)
    for e in front.ledger.entries.values():
        e.origin = b"client"
    holder = wire.WorkerId.parse("postprocess-0-3")
    front._handle(holder, True, wire.encode(wire.Results(tuple(answer(r) for r in rids))))
    sent: list[wire.Message] = []
    deliver_turn(front.take_messages(), lambda client, msg: sent.append(msg),
                 lambda result, origin: None)
    (msg,) = sent
    assert isinstance(msg, wire.Results) and msg.ok is not None and msg.results == ()
    back = wire.decode([bytes(f) for f in wire.encode(msg)])
    got = {r.id: r for r in back.each()}
    assert sorted(got) == ["c0", "c1", "c2"]
    assert all(r.token == "" and r.path == f"/p/{r.id[1]}.jpg" and r.size == (4, 5)
               for r in got.values())


def test_an_idle_daemon_runs_a_lone_image_at_once_at_the_smallest_size(tiny_models,
                                                                      photo_files):
    """Work-conserving: one image sent to an idle pipeline runs at once, in a batch of the
    smallest built size (the tiny model has 1, 4 and 16), however long --max-wait-ms is.
    Before: it waited the whole max_wait (30 s here) for companions, then ran padded to
    16 rows (15 filler)."""
    cfg = PipelineConfig(model_dir=tiny_models["logits"], batch_size=16, max_wait_ms=30_000,
                         preprocess_workers=1, postprocess_workers=1, write_masks=False,
                         log_json=True)
    with Front(cfg) as front:
        results = list(front.run(requests_for([str(photo_files[0])])))
        deadline = time.monotonic() + 5
        counters: dict[str, float] = {}
        while time.monotonic() < deadline:        # the counts come with a heartbeat
            front.poll(50)
            (executor,) = front.roster.workers.of("executor")
            counters = executor.counters
            if counters.get("processed") == 1:
                break
    answered_once(results, 1)
    assert results[0].status == wire.OK
    assert (counters.get("processed"), counters.get("batches"), counters.get("filler")) \
        == (1, 1, 0), counters


def test_postprocess_workers_share_the_outputs_of_a_slow_device(tiny_models, photo_files):
    """Two executors on a device slower than one postprocess worker: both postprocess
    workers get a fair share (a batch's outputs are finished in parallel). Before: the
    first worker to start was granted all the room and the executors, choosing by most
    credit, sent it every output while the other idled (bench: 1 of 2 busy)."""
    cfg = PipelineConfig(model_dir=tiny_models["logits"], backend="sim",
                         backend_options={"img_s": "40"}, devices=("cpu", "cpu"),
                         batch_size=16, preprocess_workers=1, postprocess_workers=2,
                         write_masks=False, log_json=True)
    paths = [str(p) for p in photo_files[:40]] * 4
    with Front(cfg) as front:
        results = list(front.run(requests_for(paths)))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:        # the last counts come with a heartbeat
            front.poll(50)
            shares = [w.counters.get("processed", 0)
                      for w in front.roster.workers.of("postprocess")]
            if sum(shares) == len(paths):
                break
        with pytest.raises(PipelineError, match="started already"):
            front.start()                         # not a second set of workers
    answered_once(results, len(paths))
    print(f"\nFIGURE postprocess shares, 2 executors at 40 img/s each: {sorted(shares)}")
    assert sum(shares) == len(paths) and min(shares) >= 0.35 * len(paths), shares


def test_images_named_alike_each_get_their_own_mask(tiny_models, photo_files, tmp_path):
    """Issue 24: a/x.jpg, b/x.jpg, a/x.png, "with space.jpg" and "with_space.jpg" each get
    a mask of their own where mask_path puts it (the answer says where), and a/x.jpg
    submitted again replaces its own mask (two postprocess workers)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    names = ["a/x.jpg", "b/x.jpg", "a/x.png", "a/with space.jpg", "a/with_space.jpg"]
    for name, photo in zip(names, photo_files, strict=False):
        Image.open(photo).save(tmp_path / name)
    paths = [str(tmp_path / n) for n in names]
    out = tmp_path / "m"
    cfg = PipelineConfig(model_dir=tiny_models["logits"], batch_size=4, max_wait_ms=20,
                         preprocess_workers=1, postprocess_workers=2, out_dir=out,
                         log_json=True)
    with Front(cfg) as pipe:
        first = {r.id: r for r in pipe.run([wire.Request(n, p)
                                            for n, p in zip(names, paths, strict=True)])}
        before = os.stat(first["a/x.jpg"].mask).st_mtime_ns
        (again,) = pipe.run([wire.Request("again", paths[0])])
    assert all(r.status == wire.OK for r in first.values()), first
    masks = [first[n].mask for n in names]
    assert masks == [str(mask_path(out, p)) for p in paths] and len(set(masks)) == 5
    assert sorted(str(p) for p in out.rglob("*.png")) == sorted(masks)
    assert again.status == wire.OK and again.mask == masks[0]
    assert os.stat(masks[0]).st_mtime_ns >= before
    assert recorded_source(Path(masks[0])) == paths[0]


def test_a_mask_dir_that_cannot_be_created_stops_the_start(tiny_models, tmp_path, capfd):
    """--out naming a regular file: the postprocess worker reports a fatal start (one
    reason, no restart loop), as a model that cannot load does."""
    from pspnet.core.logs import configure_logging

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
from pspnet.core.config import PipelineConfig
from pspnet.daemon.front import Front
from pspnet.core.logs import configure_logging
configure_logging("warning")
pipe = Front(PipelineConfig(model_dir=Path(sys.argv[1]), backend="sim", batch_size=4,
                            preprocess_workers=1, postprocess_workers=1))
pipe.start()
print(" ".join(str(s.proc.pid) for s in pipe.supervisor.slots), flush=True)
raise SystemExit(0)          # no close(): an exception would skip it the same way
"""


def test_a_process_that_exits_with_its_pipeline_open_does_not_hang(tiny_models):
    """An owner that exits with its Front started and never closed (a start-up failure that
    skipped close): it must exit at once, and its workers must not outlive it (the kernel
    ends them: PR_SET_PDEATHSIG). Workers ignore SIGTERM (a group signal must not kill them
    mid-drain); when they were multiprocessing children, whose exit joins them after a
    SIGTERM, such an owner waited for ever."""
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


def test_front_run_dispatches_what_it_submitted_before_it_waits():
    """Front.run (bench, eval, batch) submits between turns; what it submitted goes out
    before the turn's wait for workers, not after the next message (on an idle pipeline
    that wait was the poll's whole timeout: 50 ms on a lone image's path)."""
    from pspnet.daemon.front import stream

    class Recorder:
        def __init__(self) -> None:
            self.events: list[str] = []
            self.ledger = self
            self.pending = 0

        def submit(self, request: wire.Request) -> None:
            self.events.append("submit")
            self.pending += 1

        def dispatch(self) -> None:
            self.events.append("dispatch")

        def poll(self, timeout_ms: float) -> list[tuple[wire.Result, object]]:
            return Front.poll(self, timeout_ms)       # the real turn, on this recorder

        def wait(self, timeout_ms: float) -> list[object]:
            self.events.append("wait")
            self.pending = 0
            return []

        def supervise(self, starting: bool = False) -> None:
            self.events.append("supervise")

        def take_answers(self) -> list[tuple[wire.Result, object]]:
            return [(wire.Result("0", 0, wire.OK), None)]

    front = Recorder()
    front._poller = type("Poller", (), {"poll": lambda _, t: front.wait(t)})()
    assert [r.id for r in stream(front, [wire.Request("0", "/x.jpg")], 4)] == ["0"]
    assert front.events[:3] == ["submit", "dispatch", "wait"]


def test_an_executors_took_riding_in_its_handed_note_is_moved_first(tiny_models):
    """An executor's one message per slice (Handed.took): the ids it took and has not
    handed on leave its room first, then the handed ones move to postprocess; a stranger's
    "took" ids in such a note move nothing."""
    front = Front(PipelineConfig(model_dir=tiny_models["labels"]))
    front.roster = Roster(None, lambda worker, frames: True, 1, front.log)   # not started
    front.roster.workers.by_name["postprocess-0-3"] = None   # type: ignore[assignment]
    for i in range(4):
        assert front.submit(wire.Request(f"c{i}", f"/p/{i}.jpg"), origin="me")
    group = front.ledger.next_group(4)
    rids = [e.rid for e in group]
    front.ledger.dispatched(group, "preprocess-0-1", "executor-0-2")
    front.ledger.handed("preprocess-0-1", rids, "executor-0-2")
    assert front.ledger.load["executor-0-2"] == 4
    stranger = wire.WorkerId.parse("executor-1-9")
    front._handle(stranger, True, wire.encode(wire.Handed((), "postprocess-0-3",
                                                          took=tuple(rids))))
    assert front.ledger.load["executor-0-2"] == 4
    executor = wire.WorkerId.parse("executor-0-2")
    front._handle(executor, True, wire.encode(wire.Handed(tuple(rids[:2]), "postprocess-0-3",
                                                          took=tuple(rids[2:]))))
    assert "executor-0-2" not in front.ledger.load
    assert [front.ledger.entries[r].state for r in rids] == [
        "to-postprocess", "to-postprocess", "executor", "executor"]
