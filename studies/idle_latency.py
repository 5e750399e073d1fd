"""Idle latency (issue 27): one photo sent to an idle daemon, against the serial loop.

Why: a lone image on an idle device should cost its own compute plus a few milliseconds,
not a wait for companions that are not coming. For each source tree given (old main, this
branch), a daemon from that tree is started with the defaults on the demo model
(`pspnet demo`'s: the trained DeepLabV3-MobileNetV2 at 257, batch sizes 1 and 4), and the
500 x 375 sample photo is submitted alone by that tree's own client (a subprocess: each
tree speaks its own wire version), one request after the other's answer, `--warm`
times to warm up and `--repeats` times measured; `latency_ms` is the client's (send to
answer). The serial loop (bench.serial: decode, letterbox, ort at batch 1, postprocess,
one process, the daemon plan's ort threads) runs the same photo in this process with the
daemon stopped, just before and just after each daemon (the host's load drifts); the
figure the issue bounds is median latency_ms minus the serial loop's median ms per image
(<= 5 ms). The loop is also run with the same 0.3 s of idle before each image as the
lone submissions have (an idle host wakes slowly: studies/idle_penalty.py), and the JSON
gives the latency over both.

    python -m studies.idle_latency --trees /tmp/oldmain /work/wt-batcher

Each daemon runs from its tree (cwd and PYTHONPATH = the tree); the model is built once
under --work with this tree's `pspnet demo` code. Figures on a shared host are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PHOTO = "astronaut_500x375.jpg"


def demo_model(work: Path) -> Path:
    """The demo's model, built here once (pspnet demo's own code and checks)."""
    from pspnet.build_model.trained import INPUT_SIZE
    from pspnet.demo import _model_is_current, build_demo_model

    model_dir = work / "model"
    if not _model_is_current(model_dir, INPUT_SIZE):
        build_demo_model(model_dir, INPUT_SIZE)
    return model_dir


# Run by the tree's own Python (cwd and PYTHONPATH = the tree): a client speaks its own
# daemon's wire version (an old tree's daemon refuses today's client: "wire version 3,
# this side speaks 2"), so the submissions come from the tree's client, not this one's.
LONE_SUBMISSIONS = """
import json, sys, time
try:
    from pspnet.daemon.client import Client
except ImportError:                     # trees before the one-namespace layout
    from daemon.client import Client

endpoint, photo, warm, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with Client(endpoint) as client:
    deadline = time.monotonic() + 180
    while True:                         # answers once serving: every worker up and beating
        try:
            client.status(timeout_s=2.0)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    out = []
    for i in range(warm + repeats):
        (answer,) = list(client.submit([photo], timeout_s=60))
        if answer.status != "ok":
            raise SystemExit(f"{answer.status}: {answer.error}")
        if i >= warm:
            out.append(answer.latency_ms)
        time.sleep(0.3)                 # idle again: no batch on the device
print(json.dumps(out))
"""


def daemon_latencies(tree: Path, model_dir: Path, photo: Path, work: Path, warm: int,
                     repeats: int, serve_args: tuple[str, ...] = ()) -> list[float]:
    """latency_ms of `repeats` lone submissions to a daemon started from `tree` with only
    `--model` and `--endpoint` (options every tree's serve has), sent by its own client."""
    run_dir = work / f"run-{os.getpid()}-{tree.name}"
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    endpoint = f"ipc://{run_dir}/front"
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("PYTHONSAFEPATH", None)
    log_path = work / f"daemon-{tree.name}.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "pspnet", "serve", "--model",
                                   str(model_dir), "--endpoint", endpoint, *serve_args],
                                  cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            done = subprocess.run([sys.executable, "-c", LONE_SUBMISSIONS, endpoint,
                                   str(photo), str(warm), str(repeats)], cwd=tree, env=env,
                                  capture_output=True, text=True, timeout=600)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: the lone submissions failed: {done.stderr.strip()[-600:]}"
                           f" (the daemon's log: {log_path})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def serial_ms(model_dir: Path, photo: Path, warm: int, repeats: int, gap_s: float = 0.0,
              options: dict[str, str] | None = None) -> list[float]:
    """The serial loop's ms per image at batch 1, one photo at a time; `gap_s`: idle
    between images, as the daemon's lone submissions have (caches and threads go cold:
    the figure the daemon could reach at best, shown beside the bound's back-to-back one)."""
    import cv2

    from pspnet.bench.serial import SerialRunner
    from pspnet.core.config import DEFAULT_MAX_PIXELS, PipelineConfig
    from pspnet.model.manifest import Manifest
    from pspnet.stages.backends import open_backend

    cv2.setNumThreads(1)                   # decodes as a preprocess worker does (as bench)
    options = PipelineConfig(model_dir=model_dir,                      # the plan's threads
                             backend_options=dict(options or {})).executor_options()
    backend = open_backend("ort", model_dir, 1, options=options)
    runner = SerialRunner(backend, Manifest.read(model_dir), None, DEFAULT_MAX_PIXELS)
    out = []
    for i in range(warm + repeats):
        wall, _, errors = runner.run([photo], [None])
        if errors:
            raise RuntimeError(f"serial loop failed on {photo}")
        if i >= warm:
            out.append(wall * 1e3)
        if gap_s:
            time.sleep(gap_s)
    backend.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", type=Path, nargs="+", default=[Path.cwd()],
                        help="source trees whose daemons to measure, in order")
    parser.add_argument("--work", type=Path, default=Path("/tmp/idle-latency"))
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for every daemon (repeat it; e.g. "
                             "--serve-arg=--coalesce-ms --serve-arg=0 to see what a knob "
                             "costs); only options every tree given has")
    parser.add_argument("--serial-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a backend option for the serial loop too (repeat it), as the "
                             "daemons' --serve-arg=--backend-option gives them")
    args = parser.parse_args(argv)
    from pspnet.build_model.samples import SAMPLE_DIR

    options = dict(kv.split("=", 1) for kv in args.serial_option)

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = demo_model(args.work)
    photo = SAMPLE_DIR / PHOTO
    figures: dict[str, object] = {"photo": PHOTO, "repeats": args.repeats,
                                  "serve_args": args.serve_arg, "serial_options": options,
                                  "loadavg_start": os.getloadavg()[0]}
    for tree in args.trees:
        serial = serial_ms(model_dir, photo, args.warm, args.repeats, options=options)
        gapped = serial_ms(model_dir, photo, args.warm, args.repeats, 0.3, options)
        got = daemon_latencies(tree.absolute(), model_dir, photo, args.work, args.warm,
                               args.repeats, tuple(args.serve_arg))
        serial += serial_ms(model_dir, photo, args.warm, args.repeats, options=options)
        gapped += serial_ms(model_dir, photo, args.warm, args.repeats, 0.3, options)
        median = statistics.median(got)
        row = {"latency_ms": [round(x, 1) for x in got], "median_ms": round(median, 1),
               "serial_ms_per_image": round(statistics.median(serial), 1),
               "serial_after_idle_ms": round(statistics.median(gapped), 1)}
        # the bound's figure (back to back), and the fair one: the loop after the same idle
        row["over_serial_ms"] = round(median - statistics.median(serial), 1)
        row["over_serial_after_idle_ms"] = round(median - statistics.median(gapped), 1)
        figures[str(tree)] = row
        print(f"{tree}: median latency {row['median_ms']} ms "
              f"({row['over_serial_ms']:+} ms over the serial loop's "
              f"{row['serial_ms_per_image']} ms per image back to back, "
              f"{row['over_serial_after_idle_ms']:+} over its {row['serial_after_idle_ms']} "
              f"ms after the same 0.3 s idle); all: {row['latency_ms']}", flush=True)
    figures["loadavg_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
