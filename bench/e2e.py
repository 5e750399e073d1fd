"""End to end: JPEG paths into a running front and its workers, masks and mIoU areas out.

Why a bounded backlog: with every request submitted at once, the per-image latency would
be the queueing time of the whole run. Keeping about three batches plus each worker's
share in flight saturates every stage while the latency stays what a steady client sees.
Why settle after a run: children report `busy_s` and `cpu_s` once a second, so the
counters are read after one more heartbeat, when they include the whole run. The settle
wait adds a little idle CPU (heartbeats, polling) to each stage's CPU per image.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pspnet.bench import threads
from pspnet.core import wire
from pspnet.core.status import Status
from pspnet.daemon.front import Front
from pspnet.model.metrics import IoUAccumulator

STEADY_TRIM = 0.15             # steady rate: answers 15%..85% of a pass


def default_backlog(batch: int, preprocess_workers: int, postprocess_workers: int) -> int:
    return 3 * batch + 2 * (preprocess_workers + postprocess_workers)


def settle(pipe: Front) -> Status:
    """Wait one heartbeat (plus a margin) so every child's counters are current."""
    until = time.monotonic() + pipe.cfg.heartbeat_s * 1.3 + 0.1
    while time.monotonic() < until:
        pipe.poll(50)
    return pipe.status()


def busy_seconds(status: Status) -> dict[str, tuple[float, int]]:
    return {s: (float(stage.busy_s), stage.processes) for s, stage in status.stages.items()}


def cpu_seconds(status: Status) -> dict[str, float]:
    """CPU time each stage's processes (all their threads) and the front have used."""
    out = {s: float(stage.cpu_s) for s, stage in status.stages.items()}
    out["front"] = float(status.front.cpu_s)
    return out


def batch_rows(status: Status) -> tuple[int, int, int]:
    """(images, batches, filler rows) the executors have run so far."""
    stage = status.stages.get("executor")
    if stage is None:
        return 0, 0, 0
    return int(stage.processed), int(stage.batches), int(stage.filler)


def front_bytes(status: Status) -> int:
    """Bytes the front has received and sent on its control socket (heartbeats included)."""
    return status.front.bytes_in + status.front.bytes_out


def steady_rate(answered: Sequence[float], trim: float = STEADY_TRIM) -> float | None:
    """Images/s once the pipeline is full: the slope of answers against time over the
    middle of a pass. A pass also pays for filling the pipeline (the first batch cannot
    start before it is decoded, and the first one after idle may run partial) and for
    draining it; a daemon that runs for hours pays that once. Answers come in bursts of
    one batch, so the slope is a least-squares fit, not two points."""
    n = len(answered)
    lo, hi = int(n * trim), int(n * (1 - trim))
    if hi - lo < 8:
        return None
    times = np.asarray(answered[lo:hi]) - answered[lo]
    if times[-1] <= 0:
        return None
    slope, _ = np.polyfit(times, np.arange(lo, hi, dtype=np.float64), 1)
    return float(slope)


class E2ERunner:
    """Timed passes through one started Front (started once per batch size: start-up
    costs seconds). Keeps the last counter snapshot, so each pass settles only once."""

    def __init__(self, pipe: Front, backlog: int) -> None:
        self.pipe = pipe
        self.backlog = backlog
        self.passes = 0
        self._busy = busy_seconds(settle(pipe))

    def run(self, paths: Sequence[Path], truths: Sequence[Path | None]) -> dict[str, Any]:
        """One timed pass over `paths`; ids are unique per pass, so passes never collide."""
        pipe = self.pipe
        self.passes += 1
        requests = [wire.Request(f"{self.passes}-{i}", str(p), None if t is None else str(t))
                    for i, (p, t) in enumerate(zip(paths, truths, strict=True))]
        before_areas, before_images = pipe.metrics.areas.copy(), pipe.metrics.images
        submitted: dict[str, float] = {}

        def stamped() -> Iterator[wire.Request]:
            for request in requests:      # Front.run pulls one right before submitting
                submitted[request.id] = time.perf_counter()
                yield request

        # read at the start of this pass: between passes the bench runs its other modes
        # in this process (the front's), which must not count as the front's work
        status = pipe.status()
        cpu_before = cpu_seconds(status)
        bytes_before = front_bytes(status)
        rows_before = batch_rows(status)
        pids = threads.pipeline_pids(status)
        cpu_threads = threads.snapshot(pids)
        latencies: list[float] = []
        answered: list[float] = []
        errors = 0
        started = time.perf_counter()
        for result in pipe.run(stamped(), backlog=self.backlog):
            answered.append(time.perf_counter())
            latencies.append((answered[-1] - submitted[result.id]) * 1e3)
            errors += result.status != wire.OK
        wall = time.perf_counter() - started
        front_cpu = time.process_time()
        cpu_threads_after = threads.snapshot(pids)
        busiest = threads.busiest(cpu_threads, cpu_threads_after, len(requests))
        front_main = threads.front_main_ms(cpu_threads, cpu_threads_after, len(requests))
        status = settle(pipe)
        before, self._busy = self._busy, busy_seconds(status)
        cpu_after = cpu_seconds(status) | {"front": front_cpu}
        moved = front_bytes(status) - bytes_before
        images, batches, filler = (a - b for a, b in zip(batch_rows(status), rows_before,
                                                          strict=True))
        # what the host pays per image, per stage: cores needed = rate x this / 1000
        cpu_ms = {s: (used - cpu_before.get(s, 0.0)) * 1e3 / len(requests)
                  for s, used in cpu_after.items()} if requests else {}
        metrics = IoUAccumulator(pipe.metrics.num_classes)
        metrics.areas = pipe.metrics.areas - before_areas
        metrics.images = pipe.metrics.images - before_images
        spent = {s: busy_s - before.get(s, (0.0, 0))[0]
                 for s, (busy_s, _) in self._busy.items()}
        busy = {s: spent[s] / (wall * max(1, self._busy[s][1])) for s in spent}
        # the executor's own rate inside the pipeline: below executor-only means its
        # batches ran slower there (cores shared with the other stages), not that it starved
        executing = spent.get("executor", 0.0)
        return {"img_s": len(requests) / wall, "wall_s": wall, "errors": errors,
                "steady_img_s": steady_rate(answered),
                "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
                "latency_p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
                "busy": busy, "cpu_ms_per_image": cpu_ms, "busiest_threads": busiest,
                "front_main_ms_per_image": front_main,
                # how full the batches ran: the batcher's work under this load
                "images_per_batch": images / batches if batches else None,
                "batch_fill": images / (images + filler) if images + filler else None,
                "front_bytes_per_image": moved / len(requests) if requests else None,
                "executor_in_e2e_img_s": (len(requests) - errors) / executing
                if executing > 0 else None,
                "mIoU": metrics.summary()["mIoU"] if metrics.images else None}
