"""Issue 5: `pspnet bench` writes the figures, JSON and plot it promises (speed is never
asserted: it depends on the machine and on whoever else shares it)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import executor_only
from daemon.cli import main
from stages.backends import open_backend
from stages.manifest import Manifest

TOP_KEYS = {"machine", "hostname", "cpu_count", "accelerator", "backend", "precision",
            "versions", "model", "settings", "inputs", "results", "best", "created"}
ROW_KEYS = {"batch_size", "e2e_img_s", "executor_img_s", "serial_img_s", "e2e_over_executor",
            "e2e_over_serial", "latency_p50_ms", "latency_p99_ms", "busy_fraction",
            "repeats", "errors", "mIoU"}


def test_bench_synthetic_on_the_tiny_model(tmp_path, capsys):
    from tests.tiny_model import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path, batch_sizes=(1, 2))
    report, picture = tmp_path / "cpu.json", tmp_path / "cpu.png"
    code = main(["bench", "--model", str(model), "--synthetic", "8",
                 "--batch-sizes", "1,2", "--repeats", "1", "--warmup", "1",
                 "--preprocess-workers", "1", "--postprocess-workers", "1",
                 "--machine", "test-box", "--json", str(report), "--plot", str(picture)])
    out, err = capsys.readouterr()
    print(out)
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header[:3] == ["batch", "e2e", "img/s"] and "e2e/serial" in header
    doc = json.loads(report.read_text())
    assert TOP_KEYS <= set(doc)
    assert doc["machine"] == "test-box" and doc["cpu_count"] >= 1
    assert {"python", "numpy", "torch", "onnxruntime"} <= set(doc["versions"])
    assert [r["batch_size"] for r in doc["results"]] == [1, 2]
    for row in doc["results"]:
        assert ROW_KEYS <= set(row)
        assert row["errors"] == {"e2e": 0, "serial": 0}
        assert {len(v) for v in row["repeats"].values()} == {1}
        assert all(row[k] > 0 for k in ("e2e_img_s", "executor_img_s", "serial_img_s"))
        assert set(row["busy_fraction"]) == {"preprocess", "executor", "postprocess"}
        # same backend, same postprocessing: the pipeline and the serial loop agree
        assert row["mIoU"]["e2e"] == pytest.approx(row["mIoU"]["serial"], abs=1e-9)
    assert doc["best"]["batch_size"] in (1, 2)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_batch_size_that_was_not_built(tiny_models, capsys):
    code = main(["bench", "--model", str(tiny_models["logits"]), "--synthetic", "2",
                 "--batch-sizes", "1,3"])
    assert code == 2
    assert "3" in capsys.readouterr().err


def test_executor_only_alternates_the_two_slots(tiny_models, tmp_path):
    """ais_bench's figure from execute times; every batch executed once, slots reused."""
    from bench.inputs import synthetic

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
