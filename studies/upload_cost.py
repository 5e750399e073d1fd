"""Issue 26, part 3: what an upload costs the front against a path, on the same images,
in one run.

Why a study: the front is the control plane, and uploads bring the images' bytes to the
daemon's process (the client door), the preprocess worker's dispatch carries them on, and
the mask comes back through it. The claim to check is "the front's CPU per uploaded
image <= 2 x a path's". One `pspnet serve` runs for the whole study; passes of the same
images alternate between paths (the daemon reads the files and writes the masks under
its --out) and uploads (the client sends the bytes and gets each palette PNG back in its
answer, nothing written by the daemon), the order flipped each round (path, upload,
upload, path, ...), so the load others put on this shared host hits both.

What each figure is (per pass):
  front CPU ms/img  user + system CPU of the `pspnet serve` process (the front, the door,
                    all their threads; not the workers), from /proc/PID/stat before and
                    after the pass, over the pass's images
  img/s             the pass's images over its wall time (submit to the last answer)
  bytes/img         the daemon's own count of bytes from and to clients, and from and to
                    its workers (status: daemon.bytes_in/out, front.bytes_in/out)
  net ms/img        the same less what the front spends idle for as long (heartbeats,
                    its loop's polls: measured for --idle-s before the passes), so that a
                    pass slowed by others' load is not charged for the wait
Medians over the rounds; `ratio` = upload / path of the median front CPU per image (and
`net_ratio` of the net figures).

    nice -n 10 python -m studies.upload_cost --model demo-out/model \\
        --json bench/results/cpu-2core-upload.json

The default backend is `sim` (a simulated device of --img-s images/s): the host side
without the network's CPU, so that the front's share is not hidden behind a slow device
on 2 cores. `--backend ort` runs the model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pspnet.bench.machine import describe
from pspnet.build_model.samples import SAMPLE_DIR
from pspnet.core import wire
from pspnet.daemon.client import Client, DaemonUnavailable
from pspnet.daemon.uploads_client import Upload

GOAL_RATIO = 2.0
TICKS = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    sys.stderr.write(f"[upload-cost] {message}\n")
    sys.stderr.flush()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def images(source: Path | None, n: int, folder: Path) -> list[Path]:
    """`n` files with distinct names, cycling over the source's JPEGs (default: the
    bundled sample photos, VOC-like sizes)."""
    pool = sorted((source or SAMPLE_DIR).glob("*.jpg"))
    if not pool:
        raise SystemExit(f"no .jpg in {source or SAMPLE_DIR}")
    folder.mkdir(parents=True)
    return [Path(shutil.copy(pool[i % len(pool)], folder / f"{i:05d}_{pool[i % len(pool)].name}"))
            for i in range(n)]


def start_daemon(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, str]:
    endpoint = f"ipc://{work}/front"
    cmd = [sys.executable, "-m", "pspnet", "serve", "--model", str(args.model),
           "--backend", args.backend, "--out", str(work / "masks"), "--endpoint", endpoint,
           "--batch-size", str(args.batch_size), "--log-format", "json",
           *(["--backend-option", f"img_s={args.img_s}"] if args.backend == "sim" else []),
           *args.serve_args]
    log = open(work / "daemon.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pspnet serve exited {proc.returncode}: see {work}/daemon.log")
        try:
            with Client(endpoint) as client:
                status = client.status(timeout_s=1)
            if status.get("ready"):
                return proc, endpoint
        except DaemonUnavailable:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("pspnet serve not ready within 180 s")


def counted(status: dict[str, Any]) -> dict[str, int]:
    d, f = status["daemon"], status["front"]
    return {"clients_in": d["bytes_in"], "clients_out": d["bytes_out"],
            "workers_in": f["bytes_in"], "workers_out": f["bytes_out"]}


def idle_cpu_per_s(pid: int, seconds: float) -> float:
    """The front's CPU seconds per second with nothing to do."""
    cpu0, t0 = cpu_s(pid), time.perf_counter()
    time.sleep(seconds)
    return (cpu_s(pid) - cpu0) / (time.perf_counter() - t0)


def one_pass(mode: str, paths: list[Path], endpoint: str, pid: int,
             idle: float) -> dict[str, Any]:
    with Client(endpoint) as client:
        before_bytes = counted(client.status())
        cpu0, t0 = cpu_s(pid), time.perf_counter()
        upload = Upload(want=wire.WANT_PNG) if mode == "upload" else None
        answers = list(client.submit(paths, upload=upload))
        wall, cpu = time.perf_counter() - t0, cpu_s(pid) - cpu0
        after_bytes = counted(client.status())
    bad = [a for a in answers if a.status != wire.OK]
    if bad or len(answers) != len(paths):
        raise SystemExit(f"{mode} pass: {len(bad)} of {len(answers)} failed: {bad[:2]}")
    if mode == "upload" and not all(a.png for a in answers):
        raise SystemExit("upload pass: an answer without its mask")
    n = len(paths)
    return {"mode": mode, "images": n, "wall_s": round(wall, 3),
            "img_s": round(n / wall, 1), "front_cpu_ms_per_image": round(cpu * 1e3 / n, 3),
            "front_net_cpu_ms_per_image": round((cpu - idle * wall) * 1e3 / n, 3),
            "bytes_per_image": {k: round((after_bytes[k] - before_bytes[k]) / n)
                                for k in after_bytes}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m studies.upload_cost",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a `pspnet build` directory")
    ap.add_argument("--images", type=Path, default=None,
                    help="a folder of JPEGs (default: the bundled sample photos)")
    ap.add_argument("--n", type=int, default=300, help="images per pass")
    ap.add_argument("--rounds", type=int, default=3, help="path+upload pairs")
    ap.add_argument("--backend", default="sim")
    ap.add_argument("--img-s", type=int, default=150, help="the sim device's images/s")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--idle-s", type=float, default=5.0,
                    help="how long the idle front is measured")
    ap.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                    help="more `pspnet serve` flags (last)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="upload-cost-"))
    paths = images(args.images, args.n, work / "images")
    proc, endpoint = start_daemon(args, work)
    passes: list[dict[str, Any]] = []
    try:
        one_pass("path", paths[: min(32, len(paths))], endpoint, proc.pid, 0.0)  # warm-up
        idle = idle_cpu_per_s(proc.pid, args.idle_s)
        say(f"idle front: {idle * 1e3:.2f} ms CPU per s")
        for r in range(args.rounds):
            order = ("path", "upload") if r % 2 == 0 else ("upload", "path")
            for mode in order:
                result = one_pass(mode, paths, endpoint, proc.pid, idle)
                result["round"] = r
                passes.append(result)
                say(f"round {r} {mode:6s}: {result['img_s']} img/s, front "
                    f"{result['front_cpu_ms_per_image']} ms CPU/img "
                    f"({result['front_net_cpu_ms_per_image']} net of idle)")
    finally:
        proc.terminate()
        proc.wait(60)
    summary = {}
    for mode in ("path", "upload"):
        mine = [p for p in passes if p["mode"] == mode]
        summary[mode] = {
            "img_s": statistics.median(p["img_s"] for p in mine),
            "front_cpu_ms_per_image": statistics.median(p["front_cpu_ms_per_image"]
                                                        for p in mine),
            "front_net_cpu_ms_per_image": statistics.median(
                p["front_net_cpu_ms_per_image"] for p in mine),
            "bytes_per_image": mine[-1]["bytes_per_image"]}
    ratio = summary["upload"]["front_cpu_ms_per_image"] / \
        summary["path"]["front_cpu_ms_per_image"]
    net_ratio = summary["upload"]["front_net_cpu_ms_per_image"] / \
        summary["path"]["front_net_cpu_ms_per_image"]
    sizes = [p.stat().st_size for p in paths]
    doc = {"study": "upload_cost", "issue": 26,
           "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "machine": describe(f"cpu-{os.cpu_count()}core", args.backend, ("cpu",)),
           "settings": {"model": str(args.model), "backend": args.backend,
                        "img_s": args.img_s if args.backend == "sim" else None,
                        "batch_size": args.batch_size, "images_per_pass": args.n,
                        "rounds": args.rounds, "serve_args": args.serve_args,
                        "image_bytes_mean": round(statistics.mean(sizes)),
                        "load_average_at_end": os.getloadavg()},
           "passes": passes, "median": summary,
           "idle_front_cpu_ms_per_s": round(idle * 1e3, 3),
           "front_cpu_ratio_upload_over_path": round(ratio, 3),
           "front_net_cpu_ratio_upload_over_path": round(net_ratio, 3),
           "goal_ratio": GOAL_RATIO,
           "goal_met": ratio <= GOAL_RATIO}
    text = json.dumps(doc, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(json.dumps({"median": summary, "ratio": doc["front_cpu_ratio_upload_over_path"],
                      "net_ratio": doc["front_net_cpu_ratio_upload_over_path"],
                      "goal_met": doc["goal_met"]}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
