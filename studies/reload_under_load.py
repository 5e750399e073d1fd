"""Live model reload under load (issue 26, must-shows 1 and 2): 1,000 requests from two
clients while the daemon's model is reloaded three times, A -> B -> A -> B, then a reload
to a broken model directory under a stream of its own.

A is the demo model (the shipped DeepLabV3-MobileNetV2 at 257x257, batch sizes 1 and 4,
as `pspnet demo` builds it); B is a second build of it at 225x225: another manifest, so
another version, and another input size, so every stage changes with it (`--b
same-size`: at 257x257 with batch sizes 1 and 2 instead, so a reload starts executors
only). The requests are the sample photos, linked under distinct names; each client sends
every other window of 16 as uploads (the bytes in, the palette PNG back in the answer) and
the rest as paths (`--paths-only`: all paths).

What it prints and writes (--json): errors, answers per model, answers without a model,
"late-old" answers (a request sent after a reload had returned, answered by the model that
reload replaced, with no later reload to explain it), each reload's load time, the peak
RSS of the daemon's process tree (front and every worker) before the first reload and
during the swaps; then the broken reload's exit status and reason and the stream's count
(lost = accepted and never answered).

  python -m studies.reload_under_load --work /tmp/reload-study \\
      --json bench/results/cpu-2core-reload.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pspnet.bench import machine
from pspnet.daemon.client import Answer, Client, DaemonUnavailable
from pspnet.daemon.uploads_client import Upload
from pspnet.model.manifest import model_version

SIZE_A, SIZE_B = 257, 225        # sides of 8k + 1 keep the network's padding exact
RSS_EVERY_S = 0.05
WINDOW = 16                      # requests per submit call, per client


def say(message: str) -> None:
    sys.stderr.write(f"[reload] {message}\n")
    sys.stderr.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m studies.reload_under_load",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="models, inputs, masks, log")
    p.add_argument("--requests", type=int, default=1000, help="in all, over two clients")
    p.add_argument("--broken-requests", type=int, default=200,
                   help="the stream during the broken reload")
    p.add_argument("--backend", default="ort")
    p.add_argument("--b", choices=("other-size", "same-size"), default="other-size",
                   help="model B: the demo at 225x225, or at 257x257 with batch sizes 1, 2")
    p.add_argument("--paths-only", action="store_true",
                   help="every request by path (default: every other window of each client "
                        "uploads its images' bytes and gets the PNG back)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


# ---- models and inputs ---------------------------------------------------------------


def build_models(work: Path, same_size: bool) -> tuple[Path, Path]:
    """The demo model (A) and a second build (B): at another input size, or at the same
    one with other batch sizes; reused."""
    from pspnet.build_model.export import build
    from pspnet.build_model.trained import CHECKPOINT, CONFIG

    out = []
    b = ("b", SIZE_A, (1, 2)) if same_size else ("b", SIZE_B, (1, 4))
    for name, side, sizes in (("a", SIZE_A, (1, 4)), b):
        folder = work / f"model-{name}-{side}-bs{'-'.join(map(str, sizes))}"
        if not (folder / "manifest.json").exists():
            say(f"building model {name.upper()} at {side}x{side}, batch sizes {sizes}")
            build(CONFIG, CHECKPOINT, folder, batch_sizes=sizes, input_size=side,
                  head="logits")
        out.append(folder)
    return out[0], out[1]


def broken_copy(model: Path, work: Path) -> Path:
    """The model with its ONNX files replaced by garbage: its manifest reads, it cannot load."""
    broken = work / "model-broken"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(model, broken)
    for onnx in broken.glob("*.onnx"):
        onnx.write_bytes(b"this is not an ONNX model" * 100)
    return broken


def inputs(work: Path, name: str, n: int) -> list[Path]:
    """`n` distinct paths (symbolic links to the sample photos): distinct mask names."""
    from pspnet.build_model.samples import SAMPLE_DIR

    photos = sorted(p for p in Path(SAMPLE_DIR).iterdir() if p.suffix == ".jpg")
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        link = folder / f"{name}-{i:05d}.jpg"
        link.symlink_to(photos[i % len(photos)])
        paths.append(link)
    return paths


# ---- the daemon ----------------------------------------------------------------------


class Daemon:
    def __init__(self, model: Path, work: Path, backend: str) -> None:
        self.endpoint = f"ipc://{work}/front"
        self.log_path = work / "daemon.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pspnet", "serve", "--model", str(model), "--backend",
             backend, "--out", str(work / "masks"), "--endpoint", self.endpoint,
             "--batch-size", "4", "--log-format", "json"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 180) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log_path}")
            try:
                with Client(self.endpoint) as client:
                    status = client.status(timeout_s=1)
                if status.get("ready"):
                    return status
            except DaemonUnavailable:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"daemon not ready: {self.log_path}")

    def status(self) -> dict:
        with Client(self.endpoint) as client:
            return client.status()

    def stop(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(120)
        self.log.close()
        return code


def tree_rss_kb(root: int) -> int:
    """VmRSS of `root` and every process below it, from /proc."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


class RssWatch(threading.Thread):
    """The daemon tree's RSS every RSS_EVERY_S: (monotonic time, kB) samples."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.done = pid, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic(), tree_rss_kb(self.pid)))
            time.sleep(RSS_EVERY_S)

    def peak_mb(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        kb = [k for t, k in self.samples if start <= t <= end]
        return round(max(kb) / 1024, 1) if kb else None


class Stream(threading.Thread):
    """One client's requests through the library client, WINDOW at a time (a stream: the
    next are sent as the last are answered, so requests keep being sent across each
    reload); each answer with its arrival and the time its request was sent (arrival
    less its latency)."""

    def __init__(self, endpoint: str, paths: list[Path], mixed: bool = False) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.paths, self.mixed = endpoint, paths, mixed
        self.answers: list[tuple[Answer, float, float]] = []   # answer, sent, arrived
        self.uploaded = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.endpoint) as client:
                for k, i in enumerate(range(0, len(self.paths), WINDOW)):
                    window = self.paths[i:i + WINDOW]
                    upload = Upload() if self.mixed and k % 2 else None  # bytes, PNG back
                    self.uploaded += len(window) if upload else 0
                    for answer in client.submit(window, upload=upload):
                        if upload and not answer.png:
                            raise RuntimeError(f"{answer.path}: an upload came back "
                                               "without its mask")
                        now = time.monotonic()
                        self.answers.append((answer, now - answer.latency_ms / 1e3, now))
        except BaseException as exc:   # reported in the results
            self.error = exc


def wait_answers(streams: list[Stream], count: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(len(s.answers) for s in streams) < count and any(s.is_alive() for s in streams):
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} answers after {timeout_s} s")
        time.sleep(0.05)


def wait_swap_done(daemon: Daemon, timeout_s: float = 300) -> float:
    """Until the replaced model's workers are gone; when that was seen."""
    deadline = time.monotonic() + timeout_s
    while daemon.status()["model"]["reload"] is not None:
        if time.monotonic() > deadline:
            raise TimeoutError("the replaced model's workers are still there")
        time.sleep(0.05)
    return time.monotonic()


# ---- the runs ------------------------------------------------------------------------


def under_load(daemon: Daemon, rss: RssWatch, models: dict[str, Path], work: Path,
               n: int, mixed: bool = True) -> dict[str, Any]:
    """Two clients, n requests, reloads A -> B -> A -> B spread over the stream; `mixed`:
    every other window of each client goes as uploads (bytes in, the PNG back)."""
    streams = [Stream(daemon.endpoint, inputs(work, f"in{c}", n // 2), mixed)
               for c in range(2)]
    started = time.monotonic()
    for s in streams:
        s.start()
    reloads = []
    with Client(daemon.endpoint) as client:
        for step, name in enumerate("BAB"):
            wait_answers(streams, (step + 1) * n // 5)
            asked = time.monotonic()
            body = client.reload(models[name])
            returned = time.monotonic()
            done = wait_swap_done(daemon)
            reloads.append({"to": name, "version": body["version"],
                            "previous": body["previous"], "load_s": body["load_s"],
                            "returned_s": round(returned - asked, 2),
                            "old_gone_s": round(done - returned, 2),
                            "asked": asked, "returned": returned, "done": done})
            say(f"reload {step + 1} -> {name} ({body['version']}): switched after "
                f"{returned - asked:.1f} s, old workers gone {done - returned:.1f} s later")
    for s in streams:
        s.join()
    took = time.monotonic() - started
    answers = [a for s in streams for a in s.answers]
    names = {model_version(folder): name for name, folder in models.items()}
    late = late_old(answers, reloads, model_version(models["A"]))
    after = sum(sent > reloads[0]["returned"] for _, sent, _ in answers)
    swaps = [(r["asked"], r["done"]) for r in reloads]
    arrivals = sorted(arrived for _, _, arrived in answers)
    in_swaps = [t for t in arrivals if any(a <= t <= b for a, b in swaps)]
    before = [t for t in arrivals if t < swaps[0][0]]
    return {
        "requests": n, "answers": len(answers), "uploads": sum(s.uploaded for s in streams),
        "errors": sum(a.status != "ok" for a, _, _ in answers),
        "client_errors": [repr(s.error) for s in streams if s.error],
        "per_model": dict(collections.Counter(names.get(a.model, a.model or "none")
                                              for a, _, _ in answers)),
        "unnamed": sum(not a.model for a, _, _ in answers),
        "late_old": late, "sent_after_first_reload": after,
        "seconds": round(took, 1), "images_per_s": round(len(answers) / took, 1),
        "images_per_s_before_first_reload": rate(before, started, swaps[0][0]),
        "images_per_s_during_swaps": round(len(in_swaps) / sum(b - a for a, b in swaps), 1),
        "longest_gap_s": {"before_first_reload": longest_gap(before),
                          "during_swaps": max(longest_gap([t for t in arrivals if a <= t <= b])
                                              for a, b in swaps)},
        "reloads": [{k: v for k, v in r.items() if k not in ("asked", "returned", "done")}
                    for r in reloads],
        "rss_mb": {"before_first_reload_peak": rss.peak_mb(0, swaps[0][0]),
                   "during_swaps_peak": max(rss.peak_mb(a, b) or 0 for a, b in swaps),
                   "after_last_swap_peak": rss.peak_mb(swaps[-1][1])},
    }


def rate(times: list[float], start: float, end: float) -> float | None:
    return round(len(times) / (end - start), 1) if end > start else None


def longest_gap(times: list[float]) -> float:
    """The longest wait between two answers: how long the daemon answered nothing."""
    return round(max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0), 3)


def late_old(answers: list[tuple[Answer, float, float]], reloads: list[dict], first: str,
             ) -> int:
    """Answers from a model a reload had replaced before their request was sent, unless
    a later reload switched back to it before the answer came (A -> B -> A)."""
    late = 0
    for answer, sent, arrived in answers:
        served = first
        for r in reloads:
            if r["returned"] <= sent:
                served = r["version"]
        later = {r["version"] for r in reloads if sent < r["returned"] <= arrived + 1.0}
        late += answer.model not in ({served} | later)
    return late


def broken(daemon: Daemon, model_b: Path, work: Path, n: int) -> dict[str, Any]:
    """A stream of n; meanwhile `pspnet reload` to a broken copy of B."""
    target = broken_copy(model_b, work)
    stream = Stream(daemon.endpoint, inputs(work, "in-broken", n))
    stream.start()
    wait_answers([stream], n // 10)
    asked = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pspnet", "reload", "--model", str(target),
                          "--endpoint", daemon.endpoint], capture_output=True, text=True,
                         timeout=600)
    failed_s = time.monotonic() - asked
    stream.join()
    answers = [a for a, _, _ in stream.answers]
    serving = daemon.status()["model"]["version"]
    say(f"broken reload: exit {run.returncode} after {failed_s:.1f} s: {run.stderr.strip()}")
    return {"exit_status": run.returncode, "stderr": run.stderr.strip(),
            "failed_after_s": round(failed_s, 2), "requests": n, "answers": len(answers),
            "lost": n - len(answers), "errors": sum(a.status != "ok" for a in answers),
            "models": sorted({a.model for a in answers}), "serving_after": serving,
            "client_error": repr(stream.error) if stream.error else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    model_a, model_b = build_models(work, args.b == "same-size")
    shutil.rmtree(work / "masks", ignore_errors=True)
    daemon = Daemon(model_a, work, args.backend)
    try:
        daemon.wait_ready()
        rss = RssWatch(daemon.proc.pid)
        rss.start()
        time.sleep(1.0)                               # a baseline before any load
        load = under_load(daemon, rss, {"A": model_a, "B": model_b}, work, args.requests,
                          mixed=not args.paths_only)
        broken_run = broken(daemon, model_b, work, args.broken_requests)
        rss.done.set()
        status = daemon.status()
    finally:
        code = daemon.stop() if daemon.proc.poll() is None else daemon.proc.returncode
    doc = {"study": "reload_under_load", "issue": 26,
           "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "machine": machine.describe(machine.default_name(args.backend, ("cpu",)),
                                       args.backend, ("cpu",)),
           "models": {"A": {"dir": str(model_a), "version": model_version(model_a),
                            "input": SIZE_A},
                      "B": {"dir": str(model_b), "version": model_version(model_b),
                            "input": SIZE_A if args.b == "same-size" else SIZE_B}},
           "b": args.b,
           "workers": {k: v["processes"] for k, v in status["stages"].items()},
           "under_load": load, "broken": broken_run, "daemon_exit": code,
           "note": ("paths only" if args.paths_only else "each client: every other window "
                    "of 16 as uploads (bytes in, PNG back), the rest as paths")}
    print(json.dumps({k: doc[k] for k in ("models", "workers", "under_load", "broken",
                                          "daemon_exit")}, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    ok = (load["errors"] == 0 and load["unnamed"] == 0 and load["late_old"] == 0
          and load["answers"] == args.requests and broken_run["exit_status"] != 0
          and broken_run["lost"] == 0 and broken_run["errors"] == 0 and code == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
