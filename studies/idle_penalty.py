"""Where a lone image's idle penalty goes: the serial loop after idle, part by part.

Why: a lone photo on an idle daemon took 28.4 ms where the serial loop back to back takes
14.8, yet the same serial loop with 0.3 s of sleep before each image took 27.8: the
penalty is paid by the loop too, so it is either the host (a halted vCPU, cold caches, a
slow clock) or onnxruntime's parked thread pool. This study runs, in one process, trials
of "one image, a gap, one timed image" on the demo model (the 500 x 375 photo, batch 1)
over
  gap:      none (back to back), 0.3 s time.sleep, 0.3 s busy-wait in this thread, and
            0.3 s busy-wait here and in a helper process (both vCPUs kept awake);
  session:  intra-op threads 1 or 2 (the plan's on 2 CPUs), spinning 0 (the plan's), 1,
            or within a run only (run_spin=1: allow_spinning + force_spinning_stop),
every condition visited once per round, rounds repeated (the host's load drifts). Each
timed image is split into decode + letterbox, ort run and postprocess (wall), with the
run's CPU time (this process, all threads: CPU that grows is slower work, cold caches or
a slow clock; wall that grows alone is waiting) and the main thread's time runnable but
not running (/proc/thread-self/schedstat: other processes had the CPU). The machine is shared:
each trial records the CPU other processes used from the gap's start to its end
(/proc/stat), and the summary gives medians over all trials and over the quiet ones
(others under `--quiet-share` of the VM's CPUs), and the minimum of each part: what a
trial costs when nothing else held the CPUs.

    python -m studies.idle_penalty --model /tmp/idle28/model --rounds 30 --json out.json

If busy-wait gaps are as fast as back to back and sleep gaps slow whatever the session's
threads and spinning, the penalty is the VM's idle state, not the software. What it
showed (docs/performance.md, "Idle latency, round 3"): neither; on a quiet host the
plan's session pays about 1 ms after idle, and the large penalty is run-queue wait.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

PHOTO = "astronaut_500x375.jpg"
GAPS = ("none", "sleep", "busy", "busy2")
PARTS = ("decode", "run", "run_cpu", "post", "total", "runq_wait")
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def busy_wait(seconds: float) -> None:
    """Keep this CPU awake for `seconds` (no syscall that could idle it)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def spinner(conn: Connection) -> None:
    """The helper process: busy-waits as long as told, answers its CPU ms; None ends it."""
    while (seconds := conn.recv()) is not None:
        cpu = time.process_time()
        busy_wait(seconds)
        conn.send((time.process_time() - cpu) * 1e3)


def busy_ms() -> float:
    """CPU ms every process of this VM has used (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) * TICK_MS


def runq_wait_ms() -> float:
    """ms this (main) thread has spent runnable but not running."""
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1]) / 1e6


class Loop:
    """The serial loop's steps for one photo at batch 1, timed part by part."""

    def __init__(self, model_dir: Path, photo: Path, threads: int, spin: str) -> None:
        from pspnet.core.config import DEFAULT_MAX_PIXELS
        from pspnet.model.manifest import Manifest
        from pspnet.stages.backends import open_backend

        spins = {"0": {"spin": "0"}, "1": {"spin": "1"}, "run": {"spin": "0", "run_spin": "1"}}
        self.backend = open_backend("ort", model_dir, 1,
                                    options={"threads": str(threads)} | spins[spin])
        self.manifest = Manifest.read(model_dir)
        self.photo, self.max_pixels = photo, DEFAULT_MAX_PIXELS
        self.images = np.zeros((1, *self.manifest.input_size, 3), np.uint8)
        self.boxes = np.zeros((1, 4), np.int32)

    def once(self) -> dict[str, float]:
        from pspnet.model.image_io import decode_image, letterbox
        from pspnet.model.labels import labels_from_logits

        waited = runq_wait_ms()
        t0 = time.perf_counter()
        rgb = decode_image(self.photo, self.max_pixels)
        _, place = letterbox(rgb, self.manifest.input_size, out=self.images[0])
        self.boxes[0] = place.box()
        t1, c1 = time.perf_counter(), time.process_time()
        self.backend.upload(0, self.images, self.boxes)
        out = self.backend.execute(0)
        t2, c2 = time.perf_counter(), time.process_time()
        labels_from_logits(out[0], place, self.manifest.input_size,
                           self.manifest.align_corners)
        t3 = time.perf_counter()
        return {"decode": (t1 - t0) * 1e3, "run": (t2 - t1) * 1e3,
                "run_cpu": (c2 - c1) * 1e3, "post": (t3 - t2) * 1e3,
                "total": (t3 - t0) * 1e3, "runq_wait": runq_wait_ms() - waited}


def trial(loop: Loop, kind: str, gap_s: float, helper: Connection) -> dict[str, float]:
    """One image, the gap, the timed image; with the CPU others used meanwhile."""
    loop.once()                                # the image before: the pool has just run
    busy, cpu = busy_ms(), time.process_time()
    helper_ms = 0.0
    if kind == "sleep":
        time.sleep(gap_s)
    elif kind == "busy":
        busy_wait(gap_s)
    elif kind == "busy2":
        helper.send(gap_s)
        busy_wait(gap_s)
        helper_ms = helper.recv()
    got = loop.once()
    got["others_ms"] = (busy_ms() - busy - (time.process_time() - cpu) * 1e3 - helper_ms)
    return got


def summary(trials: list[dict[str, float]], parts: tuple[str, ...]) -> dict[str, Any]:
    return {"n": len(trials)} | {p: round(statistics.median(t[p] for t in trials), 2)
                                 for p in parts} if trials else {"n": 0}


def measure(model_dir: Path, photo: Path, rounds: int, gap_s: float,
            sessions: tuple[tuple[int, str], ...], quiet_share: float,
            ) -> dict[str, Any]:
    """{condition: {all: medians, quiet: medians, total_all: [...]}}."""
    import cv2
    import torch

    ours, theirs = multiprocessing.get_context("fork").Pipe()
    helper = multiprocessing.get_context("fork").Process(target=spinner, args=(theirs,))
    helper.start()                             # forked before any session opens
    cv2.setNumThreads(1)                       # as a preprocess worker
    torch.set_num_threads(1)                   # as a postprocess worker
    loops = {(t, s): Loop(model_dir, photo, t, s) for t, s in sessions}
    for loop in loops.values():                # first runs: allocations, not idle
        for _ in range(3):
            loop.once()
    conditions = list(itertools.product(loops, GAPS))
    samples: dict[str, list[dict[str, float]]] = {}
    for r in range(rounds):
        for (t, s), kind in (conditions if r % 2 == 0 else conditions[::-1]):
            samples.setdefault(f"threads={t} spin={s} gap={kind}", []).append(
                trial(loops[(t, s)], kind, gap_s, ours))
    for loop in loops.values():
        loop.backend.close()
    ours.send(None)
    helper.join()
    capacity_ms = (len(os.sched_getaffinity(0))) * (gap_s * 1e3)
    out = {}
    for name, got in samples.items():
        quiet = [t for t in got if t["others_ms"] <= quiet_share * capacity_ms]
        out[name] = {"all": summary(got, (*PARTS, "others_ms")),
                     "quiet": summary(quiet, PARTS),
                     "min": {p: round(min(t[p] for t in got), 2) for p in PARTS},
                     "trials": [{p: round(v, 2) for p, v in t.items()} for t in got]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/idle28/model"),
                        help="the demo model (pspnet demo's build, batch size 1 in it)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--gap-s", type=float, default=0.3)
    parser.add_argument("--sessions", default="1:0,2:0,2:1,2:run",
                        help="THREADS:SPIN, comma-separated; SPIN 0: idle pool threads "
                             "sleep (the plan's), 1: they spin, run: they spin within a run "
                             "only (the ort backend's run_spin option)")
    parser.add_argument("--quiet-share", type=float, default=0.1,
                        help="a trial is quiet if other processes used at most this share "
                             "of the VM's CPUs over its gap and image")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from pspnet.build_model.samples import SAMPLE_DIR

    got = measure(args.model, SAMPLE_DIR / PHOTO, args.rounds, args.gap_s,
                  tuple((int(t), spin) for t, spin in
                        (x.split(":") for x in args.sessions.split(","))), args.quiet_share)
    for which in ("all", "quiet", "min"):
        print(f"{which + ' trials':30} {'n':>3} " + " ".join(f"{p:>9}" for p in PARTS)
              + "  (median ms)")
        for name, row in got.items():
            cells = " ".join(f"{row[which].get(p, float('nan')):9.2f}" for p in PARTS)
            print(f"{name:30} {row[which].get('n', len(row['trials'])):3d} {cells}")
    if args.json:
        args.json.write_text(json.dumps({"study": "studies/idle_penalty.py",
                                         "rounds": args.rounds, "gap_s": args.gap_s,
                                         "quiet_share": args.quiet_share,
                                         "conditions": got}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
