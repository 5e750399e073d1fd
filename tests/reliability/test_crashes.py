"""Issue 7.2: kill -9 every kind of stage process during a 1,000-image stream.

One clean run and one run in which preprocess-0, preprocess-1, executor-0, postprocess-0
and postprocess-1 are killed in turn (each once the previous victim's replacement is up,
with requests in flight in every stage). A raw wire client counts every result frame, so a
duplicate sent by the daemon would be seen here even though the library client drops them;
the library client streams alongside from the start, through a kill of each stage, and
gets each of its answers once too.

The front is the supervisor itself, not a separate process: killing it is killing the
daemon. Its workers follow it (the kernel ends them), even when its log went to a pipe
nobody reads any more (here). tests/reliability/test_shutdown.py has the rest: watch-mode
kill -9 and restart; a client whose daemon dies gets error answers, or its requests
resubmitted to a restarted daemon.
"""

from __future__ import annotations

import collections
import math
import time

import numpy as np
import pytest

from pspnet.core import wire
from pspnet.model.labels import intersect_and_union, read_ground_truth
from pspnet.model.metrics import IoUAccumulator
from tests.kit import (
    RawClient,
    Submitter,
    ground_truths,
    kill9,
    linked_stream,
    mask_pixels,
    wait_dead,
)

N = 1000
VICTIMS = [("preprocess", 0), ("executor", 0), ("postprocess", 0), ("preprocess", 1),
           ("postprocess", 1)]          # each stage's first kill early: the library streams
FIRST_KILL, KILL_EVERY, AHEAD = 150, 170, 60   # kill k when ~FIRST_KILL + k*KILL_EVERY answered
ARGS = ("--batch-size", "16", "--max-inflight", "64", "--max-queue", "256",
        "--preprocess-workers", "2", "--postprocess-workers", "2")   # two of each to kill
LIBRARY_N = 2000       # the library client's images, submitted as the crash run starts


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


def test_kill_9_each_stage_process_during_1000_images(tiny_models, stream, photo_files,
                                                       tmp_path, daemons):
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
    library = linked_stream(photo_files, tmp_path / "library", LIBRARY_N, prefix="lib")
    try:
        executors_before = set(daemon.wait_ready()["stages"]["executor"]["pids"])
        client = RawClient(daemon.endpoint)
        lib = Submitter(daemon.endpoint, library)
        lib.start()
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
                    kills.append((stage, index, pid, client.answered, inflight,
                                  len(lib.answers)))
            assert time.monotonic() < deadline, (
                f"{client.answered}/{N} answered, kills {kills}\n{daemon.logs()}")
        client.pump(500)                                 # a late duplicate would show here
        lib.join(120)
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
    assert front["ok"] + front["errors"] == N + LIBRARY_N
    assert front["queued"] == front["inflight"] == 0
    assert front["restarts"] == len(VICTIMS)
    assert not executors_before & set(status["stages"]["executor"]["pids"]), \
        "the executor was not replaced"
    ok = sorted((rid for rid, r in client.results.items() if r.status == wire.OK),
                key=lambda r: int(r[1:]))
    failed = {rid: r.error for rid, r in client.results.items() if r.status != wire.OK}
    assert all(r.stage == "front" and "retry" in (r.error or "")
               for r in client.results.values() if r.status != wire.OK), failed
    assert len(ok) >= 0.9 * N, failed

    # the library client, through the same kills: each of its requests answered once, ok
    # (a valid mask) or given up after a retry
    assert lib.error is None and not lib.is_alive(), lib.error
    lib_counts = collections.Counter(a.id for a in lib.answers)
    assert len(lib_counts) == LIBRARY_N and set(lib_counts.values()) == {1}
    for k in (0, 1, 2):                  # the first kill of each stage: while it streamed
        assert kills[k][5] < LIBRARY_N, f"the library client was done before {kills[k][:2]}: " \
            f"{kills}"
    lib_failed = [a.error for a in lib.answers if a.status != "ok"]
    assert all("retry" in (e or "") for e in lib_failed), lib_failed
    for a in lib.answers:
        if a.status == "ok":
            mask_pixels(a.mask)

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
    print(f"  library client alongside: {LIBRARY_N} requests, each answered once, "
          f"{LIBRARY_N - len(lib_failed)} ok, {len(lib_failed)} errors")
    for stage, index, pid, answered, inflight, lib_answered in kills:
        print(f"  killed {stage}-{index} (pid {pid}) after {answered} answers "
              f"(library client {lib_answered}/{LIBRARY_N}), {inflight} in flight")
    print(f"  mIoU crash run {status['metrics']['mIoU']:.6f} = clean run on the same "
          f"{len(ok)} images {clean_on_ok:.6f} (clean, all {N}: {clean_all:.6f}); "
          f"clean run {clean_s:.1f} s, crash run {crash_s:.1f} s")


def test_children_exit_when_the_front_dies_with_its_stderr_pipe(tiny_models, tmp_path,
                                                                 daemons):
    """kill -9 of the front while its log goes to a pipe nobody reads any more (`serve | tee`
    killed together, a test harness gone): the children's "front gone" log line fails with
    a broken pipe; they must exit anyway, not live on as orphans."""
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, "--batch-size", "4",
                     "--preprocess-workers", "1", "--postprocess-workers", "1",
                     log_to_pipe=True)
    children = [pid for s in daemon.wait_ready()["stages"].values() for pid in s["pids"]]
    daemon.proc.stdout.close()                       # nobody reads the log any more
    kill9(daemon.proc.pid)
    daemon.proc.wait(10)
    assert wait_dead(children) == [], "children outlived the front"
