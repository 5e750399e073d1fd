"""Issue 5: `pspnet bench` writes the figures, JSON and plot it promises (speed is never
asserted: it depends on the machine and on whoever else shares it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pspnet.bench import executor_only
from pspnet.cli import main
from pspnet.model.manifest import Manifest
from pspnet.stages.backends import open_backend

TOP_KEYS = {"machine", "hostname", "cpu_count", "accelerator", "backend", "precision",
            "versions", "model", "settings", "inputs", "results", "best", "created", "plan"}
ROW_KEYS = {"batch_size", "e2e_img_s", "executor_img_s", "serial_img_s", "e2e_over_executor",
            "e2e_over_serial", "latency_p50_ms", "latency_p99_ms", "busy_fraction",
            "repeats", "errors", "mIoU", "e2e_steady_img_s", "steady_over_executor",
            "cpu_ms_per_image", "busiest_threads", "usable_cpus", "host_cpu_ms_per_image",
            "host_limit_img_s", "bound_img_s", "bound_by", "e2e_over_bound"}


def test_bench_synthetic_on_the_tiny_model(tiny_models, tmp_path, capsys):
    model = tiny_models["logits"]
    report, picture = tmp_path / "cpu.json", tmp_path / "cpu.png"
    code = main(["bench", "--model", str(model), "--synthetic", "8",
                 "--batch-sizes", "1,4", "--repeats", "1", "--warmup", "1",
                 "--preprocess-workers", "1", "--postprocess-workers", "1",
                 "--machine", "test-box", "--json", str(report), "--plot", str(picture)])
    out, err = capsys.readouterr()
    print(out)
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header[:3] == ["batch", "e2e", "img/s"] and "e2e/serial" in header
    assert {"limit", "e2e/bound"} <= set(header) and "host limit:" in out
    doc = json.loads(report.read_text())
    assert TOP_KEYS <= set(doc)
    assert doc["machine"] == "test-box" and doc["cpu_count"] >= 1
    # the daemon's plan for this host, with what the flags set named
    assert doc["plan"]["set_by_flags"] == ["preprocess_workers", "postprocess_workers"]
    assert doc["plan"]["executor_threads"] >= 1 and "why" in doc["plan"]
    assert {"python", "numpy", "torch", "onnxruntime"} <= set(doc["versions"])
    assert [r["batch_size"] for r in doc["results"]] == [1, 4]
    for row in doc["results"]:
        assert ROW_KEYS <= set(row)
        assert row["errors"] == {"e2e": 0, "serial": 0}
        assert {len(v) for v in row["repeats"].values()} == {1}
        assert all(row[k] > 0 for k in ("e2e_img_s", "executor_img_s", "serial_img_s"))
        assert set(row["busy_fraction"]) == {"preprocess", "executor", "postprocess"}
        cpu = row["cpu_ms_per_image"]
        assert set(cpu) == {"preprocess", "executor", "postprocess", "front"}
        assert cpu["preprocess"] > 0 and cpu["front"] > 0      # decoding is never free
        # the host's limit: usable CPUs over the CPU every process spends per image
        assert row["host_cpu_ms_per_image"] == pytest.approx(sum(cpu.values()))
        assert row["host_limit_img_s"] == pytest.approx(
            row["usable_cpus"] * 1000 / row["host_cpu_ms_per_image"])
        bound = min(row["executor_img_s"], row["host_limit_img_s"])
        assert row["e2e_over_bound"] == pytest.approx(row["e2e_img_s"] / bound)
        assert row["bound_by"] == ("device" if bound == row["executor_img_s"] else "host")
        if Path("/proc/self/task").is_dir():
            busiest = row["busiest_threads"]
            assert busiest and {t["process"] for t in busiest} <= {
                "front", "preprocess-0", "executor-0", "postprocess-0"}
            assert busiest == sorted(busiest, key=lambda t: -t["ms_per_image"])
        # same backend, same postprocessing: the pipeline and the serial loop agree
        assert row["mIoU"]["e2e"] == pytest.approx(row["mIoU"]["serial"], abs=1e-9)
    assert doc["best"]["batch_size"] in (1, 4)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_batch_size_that_was_not_built(tiny_models, capsys):
    code = main(["bench", "--model", str(tiny_models["logits"]), "--synthetic", "2",
                 "--batch-sizes", "1,3"])
    assert code == 2
    assert "3" in capsys.readouterr().err


def test_synthetic_photos_take_the_longest_side_asked(tmp_path):
    """VOC's 500 by default; --front-ceiling asks for 32 (and ground truths to match)."""
    import cv2

    from pspnet.bench.inputs import synthetic

    for side in (500, 32):
        feed = synthetic(4, tmp_path / str(side), long_side=side)
        for photo, truth in zip(feed.paths, feed.truths, strict=True):
            shape = cv2.imread(str(photo)).shape[:2]
            assert max(shape) == side
            assert cv2.imread(str(truth), cv2.IMREAD_UNCHANGED).shape[:2] == shape


def test_executor_only_alternates_the_two_slots(tiny_models, tmp_path):
    """ais_bench's figure from execute times; every batch executed once, slots reused."""
    from pspnet.bench.inputs import synthetic

    model = tiny_models["labels"]
    feed = synthetic(3, tmp_path)
    manifest = Manifest.read(model)
    batches = executor_only.stage_batches(feed.paths, manifest.input_size, 4, count=4)
    assert len(batches) == 1                     # 3 images: one full batch, cycled
    images, boxes = batches[0]
    assert images.shape == (4, *manifest.input_size, 3)
    assert (boxes[:, 2:] > 0).all() and (boxes[3] == boxes[0]).all()
    with open_backend("ort", model, 4) as backend:
        figures = executor_only.measure(backend, batches, 5)
        assert len(backend.execute_times_ms) == 5
    assert figures["batches"] == 5
    expected = 1000 * 4 / np.mean(backend.execute_times_ms)
    assert figures["img_s"] == pytest.approx(expected)


def test_steady_rate_is_the_slope_without_fill_and_drain():
    """Bursts of one batch every 0.1 s (160 img/s once full), after a 0.5 s fill and
    with a slow tail: the steady rate is 160, the whole pass's rate is lower."""
    from pspnet.bench.e2e import steady_rate

    batch, period = 16, 0.1
    answered = [0.5 + k * period + i * 1e-4 for k in range(30) for i in range(batch)]
    answered[-batch:] = [t + 0.3 for t in answered[-batch:]]       # a slow last batch
    assert steady_rate(answered) == pytest.approx(batch / period, rel=0.02)
    assert len(answered) / answered[-1] < 0.85 * batch / period
    assert steady_rate(answered[:5]) is None                         # too few to fit
    assert steady_rate([1.0] * 100) is None                          # no time passed


def test_bench_against_the_simulated_device(tiny_models, tmp_path, capsys):
    """The host side against a device of known speed: the executor-only figure is that
    speed exactly (it is the device's own timing), and the run is labelled simulated."""
    model = tiny_models["labels"]
    report = tmp_path / "sim.json"
    code = main(["bench", "--model", str(model), "--synthetic", "8", "--min-images", "24",
                 "--baseline-images", "12", "--batch-sizes", "4", "--repeats", "1",
                 "--warmup", "1",
                 "--backend", "sim", "--backend-option", "img_s=400",
                 "--preprocess-workers", "1", "--postprocess-workers", "1", "--no-masks",
                 "--json", str(report)])
    out, err = capsys.readouterr()
    print(out)
    assert code == 0, err
    doc = json.loads(report.read_text())
    assert doc["backend"] == "sim" and doc["accelerator"].startswith("simulated")
    assert doc["machine"].endswith("-sim")
    [row] = doc["results"]
    assert row["executor_img_s"] == pytest.approx(400.0)
    assert row["errors"] == {"e2e": 0, "serial": 0} and row["e2e_img_s"] > 0
    # the e2e pass is long, the baselines short: 24 images against 12 (3 batches of 4)
    assert row["images_per_pass"] == 24 and row["baseline_images_per_pass"] == 12
    assert [r["images"] for r in row["repeats"]["serial"]] == [12]
    assert [r["batches"] for r in row["repeats"]["executor"]] == [3]
    # start-up cost is part of the record; only torch.compile has a compile share
    assert row["backend_open_s"] >= 0 and row["compile_s"] is None
    assert "batch 4: sim backend open in" in err


def test_bench_refuses_bad_counts_before_any_work(tiny_models, capsys):
    model = tiny_models["labels"]
    for flags in (["--repeats", "0"], ["--min-images", "-1"], ["--baseline-images", "-5"]):
        try:
            code = main(["bench", "--model", str(model), "--synthetic", "8",
                         "--backend", "sim", *flags])
        except SystemExit as exc:            # argparse refuses it while parsing
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, flags
        assert flags[0] in err and "pspnet bench" in err
        assert "opening" not in err          # refused before a backend or pipeline started


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_busiest_threads_names_the_thread_that_burns_cpu():
    import os
    import threading
    import time

    from pspnet.bench import threads
    pids = {"me": os.getpid()}
    before = threads.snapshot(pids)
    assert ("me", os.getpid()) in before and before[("me", os.getpid())][0] == "main"

    burnt, leave = threading.Event(), threading.Event()

    def burn() -> None:
        until = time.thread_time() + 0.3
        while time.thread_time() < until:
            pass
        burnt.set()
        leave.wait(30)                  # alive until measured: /proc forgets dead threads

    worker = threading.Thread(target=burn)
    worker.start()
    assert burnt.wait(30)
    after = threads.snapshot(pids)
    leave.set()
    worker.join()
    rows = threads.busiest(before, after, images=100)
    assert rows[0]["process"] == "me" and rows[0]["thread"] != "main"
    assert rows[0]["ms_per_image"] >= 2.5              # 0.3 s of CPU over 100 images
    assert rows[0]["max_img_s"] == pytest.approx(1000 / rows[0]["ms_per_image"], rel=1e-3)
    assert threads.busiest(before, before, images=0) == []


def test_bench_plans_tries_the_plan_and_its_neighbours(tiny_models, tmp_path, capsys):
    """--plans: the plan and its neighbours, one short pass each, the best printed beside
    the default with the flags that run it (figures are not asserted: shared machine)."""
    report = tmp_path / "plans.json"
    code = main(["bench", "--model", str(tiny_models["labels"]), "--synthetic", "4",
                 "--plans", "--repeats", "1", "--warmup", "0", "--batch-sizes", "4",
                 "--json", str(report)])
    out, err = capsys.readouterr()
    print(out)
    assert code == 0, err
    doc = json.loads(report.read_text())
    rows = doc["plans"]
    default = rows[0]
    assert default["default"] and default["over_default"] == 1.0
    assert default["preprocess_workers"] == doc["plan"]["preprocess_workers"]
    tried = {(r["preprocess_workers"], r["postprocess_workers"], r["executor_threads"])
             for r in rows}
    assert len(tried) == len(rows) >= 3                  # distinct neighbours
    pre, post = default["preprocess_workers"], default["postprocess_workers"]
    assert (pre + 1, post, default["executor_threads"]) in tried
    assert all(r["errors"] == 0 and r["e2e_img_s"] > 0 for r in rows)
    assert "(default)" in out and out.strip().splitlines()[-1].startswith("best: ")


def test_plan_neighbours(tmp_path):
    from pspnet.bench.plans import neighbours
    from pspnet.core.config import PipelineConfig

    cfg = PipelineConfig(model_dir=tmp_path, preprocess_workers=1, postprocess_workers=2,
                         executor_threads=1, backend_options={"threads": "1"})
    got = [(c.preprocess_workers, c.postprocess_workers, c.executor_threads)
           for c in neighbours(cfg)]
    assert got == [(2, 2, 1), (1, 3, 1), (1, 2, 2), (1, 1, 1)]
    assert all("threads" not in c.backend_options for c in neighbours(cfg))
    sim = PipelineConfig(model_dir=tmp_path, backend="sim", preprocess_workers=1,
                         postprocess_workers=1)
    assert [(c.preprocess_workers, c.postprocess_workers) for c in neighbours(sim)] == \
        [(2, 1), (1, 2)]                                # a device's threads are not tried


def _fake_runs(e2e: float, executor: float, cpu_ms: dict[str, float]) -> dict:
    stages = ("preprocess", "executor", "postprocess")
    return {"e2e": [{"img_s": e2e, "busy": dict.fromkeys(stages, 0.5),
                     "cpu_ms_per_image": cpu_ms, "errors": 0}],
            "executor": [{"img_s": executor}], "serial": [{"img_s": e2e / 2, "errors": 0}]}


@pytest.mark.parametrize(("executor", "bound_by", "bound"), [(500.0, "host", 200.0),
                                                             (100.0, "device", 100.0)])
def test_the_limit_is_the_device_or_the_host(executor, bound_by, bound):
    """2 CPUs and 10 ms of CPU per image in all: the host allows 200 img/s. Against a
    500 img/s device the host bounds e2e; against a 100 img/s one the device does."""
    from pspnet.bench.bench import summarise

    cpu = {"preprocess": 2.0, "executor": 3.0, "postprocess": 4.5, "front": 0.5}
    row = summarise(4, 64, _fake_runs(80.0, executor, cpu), usable_cpus=2.0)
    assert row["host_cpu_ms_per_image"] == pytest.approx(10.0)
    assert row["host_limit_img_s"] == pytest.approx(200.0)
    assert row["bound_by"] == bound_by and row["bound_img_s"] == pytest.approx(bound)
    assert row["e2e_over_bound"] == pytest.approx(80.0 / bound)
    assert row["e2e_over_executor"] == pytest.approx(80.0 / executor)


def test_usable_cpus_honours_a_container_quota(tmp_path):
    from pspnet.bench.machine import cpu_count, usable_cpus

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(tmp_path) == cpu_count()
    cpu_max.write_text("50000 100000\n")                   # a 500m Kubernetes limit
    assert usable_cpus(tmp_path) == pytest.approx(min(0.5, cpu_count()))
    cpu_max.write_text(f"{400000 * cpu_count()} 100000\n")  # a quota above the affinity
    assert usable_cpus(tmp_path) == cpu_count()
    assert usable_cpus(tmp_path / "absent") == cpu_count()


def test_front_ceiling_drives_simulated_executors_with_the_labels_head(tiny_models, tmp_path,
                                                                      capsys):
    """--front-ceiling 2: two simulated executors answering as a labels head does, even for
    a logits model, no masks; the front's main-thread ms per image and its ceiling are
    printed beside e2e and kept in the JSON."""
    report = tmp_path / "ceiling.json"
    code = main(["bench", "--model", str(tiny_models["logits"]), "--front-ceiling", "2",
                 "--synthetic", "8", "--min-images", "32", "--baseline-images", "8",
                 "--batch-sizes", "4", "--repeats", "1", "--warmup", "1",
                 "--preprocess-workers", "1", "--postprocess-workers", "1",
                 "--json", str(report)])
    out, err = capsys.readouterr()
    print(out)
    assert code == 0, err
    doc = json.loads(report.read_text())
    assert doc["backend"] == "sim" and doc["devices"] == ["sim", "sim"]
    assert doc["settings"]["backend_options"] == {"img_s": "20000", "head": "labels"}
    assert doc["settings"]["masks"] is False
    assert "longest side 32" in doc["inputs"]["note"]       # the workers cost little
    [row] = doc["results"]
    assert row["errors"] == {"e2e": 0, "serial": 0}
    if Path("/proc/self/task").is_dir():
        ms = row["front_main_ms_per_image"]
        assert ms > 0 and row["front_ceiling_img_s"] == pytest.approx(1000 / ms)
        assert "front ceiling: 1000 / " in out
    assert "front ceiling" in out.splitlines()[0]
    assert "the front busy" in out
    assert 0 < row["batch_fill"] <= 1 and 1 <= row["images_per_batch"] <= 4


def test_front_main_ms_is_the_front_main_thread_only():
    from pspnet.bench import threads

    before = {("front", 10): ("main", 1.0), ("front", 11): ("ZMQbg/IO/0", 1.0),
              ("executor-0", 20): ("main", 1.0)}
    after = {("front", 10): ("main", 1.5), ("front", 11): ("ZMQbg/IO/0", 3.0),
             ("executor-0", 20): ("main", 9.0)}
    assert threads.front_main_ms(before, after, images=100) == pytest.approx(5.0)
    assert threads.front_main_ms(before, after, images=0) is None
    assert threads.front_main_ms({}, {}, images=10) is None


def test_batch_rows_reads_the_executors_counters():
    from types import SimpleNamespace

    from pspnet.bench.e2e import batch_rows
    from pspnet.core.status import StageStatus

    status = SimpleNamespace(stages={"executor": StageStatus(processed=10, batches=3,
                                                             filler=2)})
    assert batch_rows(status) == (10, 3, 2)                 # type: ignore[arg-type]
    assert batch_rows(SimpleNamespace(stages={})) == (0, 0, 0)  # type: ignore[arg-type]
