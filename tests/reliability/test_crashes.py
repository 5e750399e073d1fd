"""Issue 7.2: kill -9 every kind of stage process during a 1,000-image stream.

One clean run and one run in which preprocess-0, preprocess-1, executor-0, postprocess-0
and postprocess-1 are killed in turn (each once the previous victim's replacement is up,
with requests in flight in every stage). A raw wire client counts every result frame, so a
duplicate sent by the daemon would be seen here even though the library client drops them.

The front is the supervisor itself, not a separate process: killing it is killing the
daemon (tests/reliability/test_shutdown.py: watch-mode kill -9 and restart; a client
whose daemon dies gets error answers, or its requests resubmitted to a restarted daemon).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from stages import wire
from stages.labels import intersect_and_union, read_ground_truth
from stages.metrics import IoUAccumulator
from tests.kit import RawClient, ground_truths, kill9, linked_stream, mask_pixels

N = 1000
VICTIMS = [("preprocess", 0), ("preprocess", 1), ("executor", 0), ("postprocess", 0),
           ("postprocess", 1)]
FIRST_KILL, KILL_EVERY, AHEAD = 150, 170, 60   # kill k when ~FIRST_KILL + k*KILL_EVERY answered
ARGS = ("--batch-size", "16", "--max-inflight", "64", "--max-queue", "256")


@pytest.fixture(scope="module")
def stream(photo_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash_stream")
    gts = ground_truths(photo_files, root / "gt")
    images = linked_stream(photo_files, root / "images", N)
    anns = [gts[photo_files[i % len(photo_files)]] for i in range(N)]
    return [wire.Request(f"r{i}", str(p), str(a))
            for i, (p, a) in enumerate(zip(images, anns, strict=True))]


def miou(results: dict[str, wire.Result], requests: dict[str, wire.Request],
         ids: list[str]) -> float:
    acc = IoUAccumulator(21)
    for rid in ids:
        mask = mask_pixels(results[rid].mask)
        acc.add(intersect_and_union(mask, read_ground_truth(requests[rid].ann), 21))
    return acc.summary()["mIoU"]


def test_kill_9_each_stage_process_during_1000_images(tiny_models, stream, tmp_path,
                                                       daemons):
    requests = {r.id: r for r in stream}
    # --- the clean run ------------------------------------------------------------------
    started = time.monotonic()
    clean_daemon = daemons(tiny_models["logits"], tmp_path / "clean", tmp_path, *ARGS)
    try:
        clean_daemon.wait_ready()
        clean = RawClient(clean_daemon.endpoint)
        clean.offer(stream)
        clean.run_until(lambda c: c.answered == N, timeout_s=300)
        clean_status = clean_daemon.status()
        clean.close()
    finally:
        assert clean_daemon.stop() == 0, clean_daemon.logs()
    clean_s = time.monotonic() - started
    assert all(r.status == wire.OK for r in clean.results.values())
    assert set(clean.result_count.values()) == {1}

    # --- the crash run ------------------------------------------------------------------
    started = time.monotonic()
    daemon = daemons(tiny_models["logits"], tmp_path / "crash", tmp_path, *ARGS)
    kills = []
    try:
        daemon.wait_ready()
        client = RawClient(daemon.endpoint)
        released, deadline, last_check = 0, time.monotonic() + 300, 0.0
        while client.answered < N:
            k = len(kills)
            target = N if k == len(VICTIMS) else min(N, FIRST_KILL + k * KILL_EVERY + AHEAD)
            if released < target:
                client.offer(stream[released:target])
                released = target
            client.step(20)
            due = k < len(VICTIMS) and client.answered >= FIRST_KILL + k * KILL_EVERY - 30
            if due and time.monotonic() - last_check > 0.2:
                last_check = time.monotonic()
                status = daemon.status()
                if all(s["alive"] == s["processes"] for s in status["stages"].values()):
                    stage, index = VICTIMS[k]
                    pid = status["stages"][stage]["pids"][index]
                    inflight = status["front"]["inflight"]
                    kill9(pid)
                    kills.append((stage, index, pid, client.answered, inflight))
            assert time.monotonic() < deadline, (
                f"{client.answered}/{N} answered, kills {kills}\n{daemon.logs()}")
        client.pump(500)                                 # a late duplicate would show here
        status = daemon.wait_all_alive()
        client.close()
    finally:
        assert daemon.stop() == 0, daemon.logs()
    crash_s = time.monotonic() - started

    # every request id answered exactly once, on the wire
    assert len(kills) == len(VICTIMS), kills
    assert set(client.result_count) == set(requests)
    assert set(client.result_count.values()) == {1}, "a request was answered twice"
    assert not client.error_replies
    front = status["front"]
    assert front["ok"] + front["errors"] == N and front["queued"] == front["inflight"] == 0
    assert front["restarts"] == len(VICTIMS)
    ok = sorted((rid for rid, r in client.results.items() if r.status == wire.OK),
                key=lambda r: int(r[1:]))
    failed = {rid: r.error for rid, r in client.results.items() if r.status != wire.OK}
    assert all(r.stage == "front" and "retry" in (r.error or "")
               for r in client.results.values() if r.status != wire.OK), failed
    assert len(ok) >= 0.9 * N, failed

    # masks complete, valid, and the same as the clean run's
    for rid in ok:
        np.testing.assert_array_equal(mask_pixels(client.results[rid].mask),
                                      mask_pixels(clean.results[rid].mask), err_msg=rid)

    # the daemon's running mIoU equals the clean run's on the images that succeeded
    clean_all = miou(clean.results, requests, sorted(requests))
    assert clean_status["metrics"]["mIoU"] == pytest.approx(clean_all, abs=1e-9)
    clean_on_ok = miou(clean.results, requests, ok)
    assert status["metrics"]["images"] == len(ok)
    assert status["metrics"]["mIoU"] == pytest.approx(clean_on_ok, abs=1e-9)
    assert not math.isnan(clean_on_ok) and clean_on_ok > 0

    print(f"\nFIGURE crashes: {len(kills)} kill -9 during {N} requests, "
          f"{len(client.result_count)} ids answered, 0 lost, "
          f"{sum(c - 1 for c in client.result_count.values())} duplicated on the wire; "
          f"{len(ok)} ok, {len(failed)} errors; retried {front['retried']}, "
          f"duplicates dropped at the front {front['duplicates_dropped']}")
    for stage, index, pid, answered, inflight in kills:
        print(f"  killed {stage}-{index} (pid {pid}) after {answered} answers, "
              f"{inflight} in flight")
    print(f"  mIoU crash run {status['metrics']['mIoU']:.6f} = clean run on the same "
          f"{len(ok)} images {clean_on_ok:.6f} (clean, all {N}: {clean_all:.6f}); "
          f"clean run {clean_s:.1f} s, crash run {crash_s:.1f} s")
