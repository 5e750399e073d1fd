"""Issue 17: `pspnet serve --metrics-port`: a Prometheus scrape after 50 images says what
happened (requests by outcome, latency, queue depth, batch fill, busy fraction per stage,
restarts, images/s), in the exposition format Prometheus itself parses."""

from __future__ import annotations

import math
import socket
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from pspnet.core.status import DaemonStatus, FrontStatus, StageStatus, Status
from pspnet.daemon.client import Client
from pspnet.daemon.exporter import WINDOW_S, Snapshots, StatusCollector
from tests.kit import Daemon

SCRAPE_WAIT_S = 10.0          # liveness bound: heartbeats and snapshots come every 0.5 s


def scrape(url: str) -> tuple[str, dict[tuple[str, tuple], float]]:
    """The page, and {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def metrics_url(daemon: Daemon) -> str:
    (serving,) = [e for e in daemon.events() if e.get("event") == "serving"]
    return serving["metrics"]


def test_metrics_after_50_images(tiny_models, photo_files, tmp_path):
    daemon = Daemon(tiny_models["logits"], tmp_path / "masks", tmp_path, "--batch-size", "4",
                    "--preprocess-workers", "1", "--postprocess-workers", "1",
                    "--metrics-port", "0")
    try:
        daemon.wait_ready()
        url = metrics_url(daemon)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(photo_files[0].read_bytes()[:300])
        paths = [*photo_files[:48], broken, tmp_path / "missing.jpg"]
        with Client(daemon.endpoint) as client:
            answers = list(client.submit(paths))
        assert sum(a.status == "ok" for a in answers) == 48
        # answers are counted at once; each worker's own counters come with its next
        # heartbeat (every 0.5 s, each worker on its own clock): scrape until every stage
        # has reported them all
        deadline = time.monotonic() + SCRAPE_WAIT_S
        while True:
            text, m = scrape(url)
            reported = [m.get(("pspnet_stage_processed_total", (("stage", stage),)))
                        for stage in ("preprocess", "executor", "postprocess")]
            if reported == [48, 48, 48] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        assert daemon.stop() == 0, daemon.logs()
    print("scrape after 50 images (excerpt):")
    print("\n".join(line for line in text.splitlines()
                    if not line.startswith("#") and "bucket" not in line
                    or 'le="0.1"' in line or 'le="+Inf"' in line))

    def value(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    assert value("pspnet_requests_total", outcome="ok") == 48
    assert value("pspnet_requests_total", outcome="error") == 2
    assert value("pspnet_requests_total", outcome="refused") == 0
    assert value("pspnet_requests_accepted_total") == 50
    # the latency histogram: one observation per answer, buckets cumulative
    assert value("pspnet_request_latency_seconds_count", outcome="ok") == 48
    assert value("pspnet_request_latency_seconds_count", outcome="error") == 2
    assert value("pspnet_request_latency_seconds_bucket", outcome="ok", le="+Inf") == 48
    assert 0 < value("pspnet_request_latency_seconds_sum", outcome="ok") < 48 * 60
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in m.items()
                     if k[0] == "pspnet_request_latency_seconds_bucket"
                     and dict(k[1])["outcome"] == "ok")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    # everything answered: nothing waits anywhere
    for state in ("queued", "preprocess", "to-executor", "executor", "to-postprocess"):
        assert value("pspnet_queue_depth", state=state) == 0
    assert value("pspnet_stage_processed_total", stage="preprocess") == 48
    assert value("pspnet_stage_errors_total", stage="preprocess") == 2
    assert value("pspnet_stage_processed_total", stage="executor") == 48
    assert value("pspnet_stage_processed_total", stage="postprocess") == 48
    # at most 4 a batch: 48 images in at least 12 batches; each ran at the smallest built
    # size that held it (1 or 4), so a batch has at most 2 rows of filler (2 images at 4)
    batches = value("pspnet_executor_batches_total")
    filler = value("pspnet_executor_filler_rows_total")
    assert batches >= 12 and 0 <= filler <= 2 * batches
    fill = value("pspnet_batch_fill_ratio")
    assert math.isnan(fill) or 0 < fill <= 1        # exact values: test_fill_ratio_...
    # nothing was lost or retried; the library client was never told `busy`
    assert value("pspnet_requests_retried_total") == 0
    assert value("pspnet_busy_replies_total") == 0
    for stage in ("preprocess", "executor", "postprocess"):
        assert value("pspnet_worker_restarts_total", stage=stage) == 0
        assert value("pspnet_workers_alive", stage=stage) == 1
        ratio = value("pspnet_stage_busy_ratio", stage=stage)
        assert math.isnan(ratio) or 0 <= ratio <= 1.05
        assert value("pspnet_stage_busy_seconds_total", stage=stage) > 0
    assert value("pspnet_images_per_second") > 0


def test_metrics_port_in_use_is_refused_before_any_worker(tiny_models, tmp_path):
    """Like a taken endpoint: one line, exit status 2, nothing started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(tiny_models["logits"], tmp_path / "masks", tmp_path,
                        "--metrics-port", str(port))
        assert daemon.proc.wait(60) == 2
    logs = daemon.logs()
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in logs
    assert "starting" not in logs


def status_with(processed: int, filler: int, retried: int = 0, busy: int = 0) -> Status:
    stages = {"preprocess": StageStatus(processes=1),
              "executor": StageStatus(processes=1, processed=processed, filler=filler),
              "postprocess": StageStatus(processes=1)}
    return Status(stages=stages, front=FrontStatus(retried=retried),
                  daemon=DaemonStatus(pid=1, endpoint="ipc:///x", busy_replies=busy))


def collected(snapshots: Snapshots) -> dict[str, float]:
    return {s.name: s.value for family in StatusCollector(snapshots).collect()
            for s in family.samples if not s.labels}


def test_fill_ratio_retries_and_busy_replies_are_exact():
    """The window's two ends: 30 images and 6 filler rows ran between them, so the fill is
    30 / 36 exactly, whatever ran before the window (10 images, 2 filler rows) or is still
    to come; the counters are the status document's figures, as they are."""
    snapshots = Snapshots()
    snapshots.add(0.0, status_with(processed=10, filler=2))
    snapshots.add(WINDOW_S / 2, status_with(processed=40, filler=8, retried=3, busy=5))
    m = collected(snapshots)
    assert m["pspnet_batch_fill_ratio"] == 30 / 36
    assert m["pspnet_requests_retried_total"] == 3
    assert m["pspnet_busy_replies_total"] == 5
    # a window with no batch: NaN, not a stale ratio
    snapshots.add(WINDOW_S * 3, status_with(processed=40, filler=8))
    snapshots.add(WINDOW_S * 4, status_with(processed=40, filler=8))
    assert math.isnan(collected(snapshots)["pspnet_batch_fill_ratio"])
