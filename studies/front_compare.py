"""Old front against new front (issue 14): the same `pspnet bench --backend sim` runs on two
source trees, interleaved config by config, with the bytes through the front measured from
outside.

Why a harness: the claim "the front no longer carries pixels and costs less CPU" compares
two versions of the code. Each tree runs its own bench as a subprocess (cwd and PYTHONPATH
= the tree, `python -m pspnet bench` where the tree has it, else `python -m daemon.cli
bench`), with the same arguments, on the same machine, old and new alternating so that
other engineers' load on this shared host hits both.

What each column is (per config: executors x batch size):
  front CPU ms/img  the bench JSON's `cpu_ms_per_image.front`: CPU time of the bench
                    process (the front: dispatch, streamers, answers, all its threads) over
                    each e2e pass / its images, median of the repeats.
  front bytes/img   bytes in + out of the TCP sockets the bench process owns (--transport
                    tcp), from `ss -tinHe` sampled every --sample-ms: each socket's largest
                    bytes_received + bytes_acked, summed over every socket seen in the run,
                    divided by the images that went through e2e passes (warm-up + repeats,
                    from the bench JSON). A byte the front forwards is counted once in and
                    once out, so on the streamer front this is about 2 x (input + output);
                    `rx` and `tx` are also kept apart. A `front_bytes_per_image` field in the
                    bench JSON (a front that counts its own) is recorded as a cross-check.
  e2e/executor      `e2e_over_executor`: whole-pass e2e img/s over executor-only img/s. The
                    bench opens executor-only on the first device, so with 2 executors it is
                    one simulated device's rate and the ratio can reach 2.
  e2e, steady       `e2e_img_s`, `e2e_steady_img_s` (img/s).

Accuracy of the bytes: a socket's counters are read each --sample-ms (100 ms; ~3 % of a
core for `ss`, the same for both trees), so what a socket carries after its last sample
and before it closes is lost. The bench closes its pipeline only after a settle wait and
the executor-only and serial passes, so that is the last gap's heartbeats (well under
1 B per image). What is counted beyond the e2e images' own traffic: ZMQ handshakes,
heartbeats over the whole run (start-up, executor-only and serial passes included) and
every control message. bytes_acked of a socket that connected counts its SYN (+1 B).
Checked on today's code (logits head, 500 x 500: input 750,000 B, output 21 x 63 x 63
float32 = 333,396 B), 8 runs: the image stream carried 750,240 B per image and the output
stream 333,648 B (payload + message headers) in every run, to the byte; rx per image =
payload + 1.41-1.42 KB, tx = payload + 672 B (requests, credits, answers with their
4 x 21 int64 areas, progress, heartbeats). Only the heartbeat share varies with the run's
length (875-885 B per image on the answers socket).

Why img_s=40 by default (per simulated device; 2 executors run two of them): on this
2-core VM with the logits head, postprocessing costs 15-19 ms of CPU per image (bilinear
21 x 63 x 63 -> 500 x 500, then argmax) and the whole pipeline ~20-25 ms, so the host
gives ~80-100 img/s at most, less while others work on it. Measured at batch 16 (one
short run per tree, load average 3.3-4.7 from other engineers): img_s=25: steady/executor
0.98-0.99 with one executor, 1.65 (of 2) with two; 40: 1.00 and 1.49-1.67; 60: 0.98-1.06
and 1.19-1.58. At 40 one executor is device-bound (the front's cost shows only in its
CPU figure) and two executors ask 80 img/s, more than the host gives, so the front's
1.2-1.5 ms of CPU per image competes with the stages and a cheaper front can raise
e2e/executor there. At 60 the two-executor figures follow the others' load more than
anything (the same code gave 1.19 and 1.58); at 25 a batch of 64 takes 2.6 s and the full
set gets long. The full set at 40 (1 and 2 executors x batch 16 and 64, defaults) took
12 minutes. With --head labels (postprocess ~1.3 ms per image) the host goes ~5 x
further: about img_s=200-250 would play the same part (an estimate, not measured).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pspnet.daemon.commands import HelpFormatter

DEFAULT_IMG_S = 40
DEFAULT_TCP_BASE_PORT = 27150
TCP_PORTS_CHECKED = 16              # ports from the base that must be free before a run
VOC_INPUT_SIZE = 500
SIM_BATCH_SIZES = (16, 64)
NUM_CLASSES = 21
RUN_TIMEOUT_S = 1800.0
STOP_GRACE_S = 15.0
GOAL_FRONT_BYTES_PER_IMAGE = 2048   # issue 14: < 2 KB per image through the new front
NOISE_TOLERANCE = 0.05              # "not lower", "flat": within 5 % (one run on a shared host)


def say(message: str) -> None:
    sys.stderr.write(f"[front-compare] {message}\n")
    sys.stderr.flush()


class HarnessError(RuntimeError):
    """A tree, revision, port or bench run that cannot be used; the message says which."""


# ---- the trees ---------------------------------------------------------------------------

@dataclass
class Tree:
    label: str                   # "old" | "new"
    path: Path
    commit: str
    requested: str               # the revision or directory as given
    dirty: bool = False          # a --new-tree with uncommitted changes
    worktree: bool = False       # made here (removed at the end)
    entry: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"requested": self.requested, "commit": self.commit, "dirty": self.dirty,
                "path": None if self.worktree else str(self.path),
                "entry": " ".join(["python", *self.entry])}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise HarnessError(f"git {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def bench_entry(tree: Path) -> list[str]:
    """`-m pspnet bench` where the tree has the pspnet package (or module), else today's
    `-m daemon.cli bench`."""
    if (tree / "pspnet" / "__main__.py").is_file() or (tree / "pspnet.py").is_file():
        return ["-m", "pspnet", "bench"]
    if (tree / "daemon" / "cli.py").is_file():
        return ["-m", "daemon.cli", "bench"]
    raise HarnessError(f"{tree}: neither pspnet/__main__.py nor daemon/cli.py: not a "
                       "pspnet-daemon tree")


def checkout(repo: Path, rev: str, label: str, parent: Path) -> Tree:
    commit = git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
    path = parent / label
    git(repo, "worktree", "add", "--detach", "--quiet", str(path), commit)
    return Tree(label, path, commit, rev, worktree=True, entry=bench_entry(path))


def existing_tree(path: Path, label: str) -> Tree:
    path = path.resolve()
    commit = git(path, "rev-parse", "HEAD")
    dirty = bool(git(path, "status", "--porcelain", "--untracked-files=no"))
    return Tree(label, path, commit, str(path), dirty=dirty, entry=bench_entry(path))


def remove_worktree(repo: Path, tree: Tree) -> None:
    if tree.worktree:
        with contextlib.suppress(HarnessError):
            git(repo, "worktree", "remove", "--force", str(tree.path))


def tree_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.pop("PYTHONSAFEPATH", None)                # -m must put cwd (the tree) first
    return env


def check_imports(python: str, tree: Tree) -> None:
    """The tree's own code must be what runs, not an installed copy of another checkout."""
    code = ("try:\n import pspnet.daemon, pspnet.stages as s\n"
            "except ImportError:\n import daemon, stages as s\nprint(s.__file__)")
    done = subprocess.run([python, "-c", code], cwd=tree.path, env=tree_env(tree.path),
                          capture_output=True, text=True)
    where = Path(done.stdout.strip()).resolve() if done.returncode == 0 else None
    if where is None or tree.path.resolve() not in where.parents:
        raise HarnessError(f"{tree.label} tree {tree.path}: its packages do not import from "
                           f"it ({done.stdout.strip() or done.stderr.strip()[-300:]})")


# ---- the simulated device's model directory --------------------------------------------

# Run by the OLD tree's Python: newer readers accept older manifests, not the reverse (a
# field added later, e.g. `rewrites`, would make the old bench refuse the directory).
BUILD_SIM_MODEL = """
import sys
from pathlib import Path

import torch
from torch import nn

try:                                    # the one-namespace layout (issue 25)
    from pspnet.build_model.artifacts import write_artifacts
    from pspnet.model.manifest import VOC_CLASSES, voc_palette
except ImportError:                     # trees before it
    from build_model.artifacts import write_artifacts
    from stages.manifest import VOC_CLASSES, voc_palette

out, head, size, classes = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
batch_sizes = [int(b) for b in sys.argv[5].split(",")]
torch.manual_seed(0)
core = nn.Sequential(
    nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
    nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
    nn.Conv2d(8, classes, 3, stride=2, padding=1),
).eval()
write_artifacts(core, out, input_size=size, batch_sizes=batch_sizes, head=head,
                mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                num_classes=classes, class_names=VOC_CLASSES, palette=voc_palette(classes),
                simplify=False, run_atc=False, torch_program=False,
                source={"note": "studies/front_compare.py: a stride-8 stand-in for the sim "
                                "backend (it reads only this manifest)"})
"""


def build_sim_model(python: str, tree: Tree, out: Path, head: str) -> Path:
    """A real model directory (build_model's export path, a 3-conv network) at 500 x 500,
    stride 8 like PSPNet R50 (logits 21 x 63 x 63), batch sizes 16 and 64, written by
    `tree`'s code. The sim backend reads only its manifest; the network just makes the
    manifest honest. ~4 s."""
    done = subprocess.run(
        [python, "-c", BUILD_SIM_MODEL, str(out), head, str(VOC_INPUT_SIZE), str(NUM_CLASSES),
         ",".join(map(str, SIM_BATCH_SIZES))],
        cwd=tree.path, env=tree_env(tree.path), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise HarnessError(f"building the model with the {tree.label} tree failed: "
                           f"{done.stderr.strip()[-500:]}")
    return out


def payload_per_image(model: Path) -> dict[str, int]:
    """What one image's pixels and outputs weigh on the wire (the model's input and
    output tensors; headers and control not included)."""
    doc = json.loads((model / "manifest.json").read_text())
    h, w = doc["input_size"]
    if doc["head"] == "labels":
        output = h * w                                   # uint8 labels at the input size
    else:
        lh, lw = doc["logits_size"]
        output = doc["num_classes"] * lh * lw * 4        # float32 logits
    return {"input": h * w * 3, "output": output, "total": h * w * 3 + output}


# ---- bytes through the front, from outside --------------------------------------------

_INO = re.compile(r"\bino:(\d+)")
_COUNTER = re.compile(r"\b(bytes_acked|bytes_received|bytes_sent):(\d+)")
_ADDR = re.compile(r"^\S+\s+\d+\s+\d+\s+(\S+)\s+(\S+)")


def parse_ss(text: str) -> dict[int, dict[str, Any]]:
    """`ss -tinHe` output -> {inode: {local, peer, bytes_acked, bytes_received,
    bytes_sent}}. A socket is its first line plus the indented lines that follow."""
    records: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line[0].isspace() and records:
            records[-1].append(line)
        else:
            records.append([line])
    out: dict[int, dict[str, Any]] = {}
    for lines in records:
        text_of = " ".join(lines)
        ino = _INO.search(lines[0])
        if ino is None or ino.group(1) == "0":
            continue
        addr = _ADDR.match(lines[0])
        entry: dict[str, Any] = {"local": addr.group(1) if addr else "",
                                 "peer": addr.group(2) if addr else "",
                                 "bytes_acked": 0, "bytes_received": 0, "bytes_sent": 0}
        for name, value in _COUNTER.findall(text_of):
            entry[name] = int(value)
        out[int(ino.group(1))] = entry
    return out


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open (/proc/PID/fd -> socket:[N])."""
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


class FrontBytes:
    """Samples, every `interval_s`, the TCP sockets one process owns; keeps each socket's
    largest counters (they only grow while it lives), so closed sockets still count."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.sockets: dict[int, dict[str, Any]] = {}
        self.samples = 0
        self.gaps_s: list[float] = []
        self.ss_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="front-bytes", daemon=True)

    def __enter__(self) -> FrontBytes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = None
        while not self._stop.is_set():
            now = time.monotonic()
            if last is not None:
                self.gaps_s.append(now - last)
            last = now
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        owned = socket_inodes(self.pid)
        if not owned:
            return
        before = os.times()
        done = subprocess.run(["ss", "-tinHe"], capture_output=True, text=True)
        after = os.times()
        self.ss_cpu_s += (after.children_user - before.children_user
                          + after.children_system - before.children_system)
        self.samples += 1
        for ino, entry in parse_ss(done.stdout).items():
            if ino not in owned:
                continue
            kept = self.sockets.setdefault(ino, entry)
            for key in ("bytes_acked", "bytes_received", "bytes_sent"):
                kept[key] = max(kept[key], entry[key])

    def totals(self) -> dict[str, Any]:
        rx = sum(s["bytes_received"] for s in self.sockets.values())
        tx = sum(s["bytes_acked"] for s in self.sockets.values())
        by_port: dict[str, dict[str, int]] = {}
        for s in self.sockets.values():       # the front's bound ports: one row each
            port = s["local"].rsplit(":", 1)[-1]
            row = by_port.setdefault(port, {"sockets": 0, "rx": 0, "tx": 0})
            row["sockets"] += 1
            row["rx"] += s["bytes_received"]
            row["tx"] += s["bytes_acked"]
        gaps = sorted(self.gaps_s)
        return {"rx": rx, "tx": tx, "total": rx + tx, "sockets": len(self.sockets),
                "by_local_port": dict(sorted(by_port.items())), "samples": self.samples,
                "sample_gap_ms": {"median": round(statistics.median(gaps) * 1e3, 1),
                                  "max": round(gaps[-1] * 1e3, 1)} if gaps else None,
                "ss_cpu_s": round(self.ss_cpu_s, 3)}


# ---- one bench run ---------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    executors: int
    batch: int

    @property
    def name(self) -> str:
        return f"{self.executors}exe-bs{self.batch}"


def bench_args(args: argparse.Namespace, cfg: Config, model: Path, out_json: Path,
               ) -> list[str]:
    """The bench's arguments: identical for both trees."""
    argv = ["--model", str(model), "--backend", "sim",
            "--backend-option", f"img_s={args.img_s}",
            "--devices", ",".join(["cpu"] * cfg.executors), "--batch-sizes", str(cfg.batch),
            "--synthetic", str(args.synthetic), "--min-images", str(args.min_images),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--preprocess-workers", str(args.preprocess_workers),
            "--postprocess-workers", str(args.postprocess_workers),
            "--no-masks", "--transport", "tcp", "--tcp-base-port", str(args.tcp_base_port),
            "--json", str(out_json)]
    if args.baseline_images:
        argv += ["--baseline-images", str(args.baseline_images)]
    return argv + list(args.bench_arg)


def ports_free(base: int, count: int = TCP_PORTS_CHECKED) -> str | None:
    """None when 127.0.0.1:base..base+count-1 can be bound; else which one cannot."""
    for port in range(base, base + count):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                return f"port {port}: {exc.strerror}"
    return None


def e2e_images(doc: dict[str, Any]) -> int:
    """Images the run sent through e2e passes: per batch size, the warm-up (warmup x batch,
    at most one pass) and every repeat. A bench that counts them itself wins."""
    total = 0
    settings = doc["settings"]
    for row in doc["results"]:
        if row.get("e2e_images") is not None:
            total += int(row["e2e_images"])
            continue
        per_pass = int(row["images_per_pass"])
        warm = min(per_pass, int(settings["warmup_batches"]) * int(row["batch_size"]))
        total += warm + int(settings["repeats"]) * per_pass
    return total


def run_once(args: argparse.Namespace, tree: Tree, cfg: Config, model: Path, work: Path,
             round_no: int) -> dict[str, Any]:
    out_json = work / f"{cfg.name}-{tree.label}-r{round_no}.json"
    log = work / f"{cfg.name}-{tree.label}-r{round_no}.log"
    problem = ports_free(args.tcp_base_port)
    if problem:
        raise HarnessError(f"the bench's tcp ports are taken ({problem}); choose another "
                           "--tcp-base-port")
    argv = [args.python, *tree.entry, *bench_args(args, cfg, model, out_json)]
    load_before = _loadavg()
    started = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, cwd=tree.path, env=tree_env(tree.path),
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            with FrontBytes(proc.pid, args.sample_ms / 1e3) as sampler:
                code = proc.wait(timeout=args.run_timeout_s)
        except BaseException:
            proc.send_signal(signal.SIGINT)    # the bench closes its pipeline on Ctrl-C
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()                    # its children exit when their parent dies
                proc.wait()
            raise
    wall = time.monotonic() - started
    if code != 0 or not out_json.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        raise HarnessError(f"{tree.label} bench ({cfg.name}) exited {code}:\n  "
                           + "\n  ".join(tail))
    doc = json.loads(out_json.read_text())
    row = doc["results"][0]
    images = e2e_images(doc)
    wire = sampler.totals()
    reported = row.get("front_bytes_per_image", doc.get("front_bytes_per_image"))
    return {
        "front_cpu_ms_per_image": row["cpu_ms_per_image"]["front"],
        "front_bytes_per_image": wire["total"] / images,
        "front_rx_bytes_per_image": wire["rx"] / images,
        "front_tx_bytes_per_image": wire["tx"] / images,
        "front_bytes_per_image_reported": reported,
        "e2e_over_executor": row["e2e_over_executor"],
        "steady_over_executor": row.get("steady_over_executor"),
        "e2e_img_s": row["e2e_img_s"], "e2e_steady_img_s": row.get("e2e_steady_img_s"),
        "executor_img_s": row["executor_img_s"],
        "cpu_ms_per_image": row["cpu_ms_per_image"],
        "busy_fraction": row.get("busy_fraction"),
        "errors": row.get("errors"),
        "e2e_images": images, "front_bytes": wire,
        "loadavg": {"before": load_before, "after": _loadavg(),
                    "bench": doc.get("loadavg")},
        "wall_s": round(wall, 1), "round": round_no,
    }


# ---- the comparison -------------------------------------------------------------------

FIGURES = ("front_cpu_ms_per_image", "front_bytes_per_image", "front_rx_bytes_per_image",
           "front_tx_bytes_per_image", "front_bytes_per_image_reported",
           "e2e_over_executor", "steady_over_executor", "e2e_img_s", "e2e_steady_img_s",
           "executor_img_s")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds (one round: the run's own figures), and every run."""
    out: dict[str, Any] = {}
    for key in FIGURES:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["runs"] = runs
    return out


def ratios(old: dict[str, Any], new: dict[str, Any]) -> dict[str, float | None]:
    return {key: (new[key] / old[key] if old.get(key) and new.get(key) is not None else None)
            for key in ("front_cpu_ms_per_image", "front_bytes_per_image",
                        "e2e_over_executor", "e2e_steady_img_s")}


def goals(configs: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """Issue 14's four goals, judged on the new tree's figures against the old's."""
    def fig(c: dict[str, Any], side: str, key: str) -> float:
        return c[side][key]

    bytes_ok = all(fig(c, "new", "front_bytes_per_image") < GOAL_FRONT_BYTES_PER_IMAGE
                   for c in configs)
    cpu_lower = all(fig(c, "new", "front_cpu_ms_per_image")
                    < fig(c, "old", "front_cpu_ms_per_image") for c in configs)
    flat: dict[str, float] = {}
    for c2 in (c for c in configs if c["executors"] == 2):
        c1 = next((c for c in configs if c["executors"] == 1
                   and c["batch_size"] == c2["batch_size"]), None)
        if c1 is not None:
            flat[f"bs{c2['batch_size']}"] = (fig(c2, "new", "front_cpu_ms_per_image")
                                             / fig(c1, "new", "front_cpu_ms_per_image"))
    not_lower = {c["config"]: fig(c, "new", "e2e_over_executor")
                 / fig(c, "old", "e2e_over_executor") for c in configs}
    return {
        "tolerance": tolerance,
        "front_bytes_below_2KB": bytes_ok,
        "front_cpu_lower_everywhere": cpu_lower,
        "front_cpu_2exe_over_1exe_new": flat,
        # flat means it does not grow with executors (the old front relayed every pixel,
        # so its cost grew with them); falling is fine: fixed per-turn costs spread thinner
        "front_cpu_flat_1_to_2_executors": (all(v <= 1 + tolerance for v in flat.values())
                                            if flat else None),
        "e2e_over_executor_new_over_old": not_lower,
        "e2e_over_executor_not_lower": all(v >= 1 - tolerance for v in not_lower.values()),
    }


def table(doc: dict[str, Any]) -> str:
    header = ["exe", "batch", "front CPU ms/img", "new/old", "front KB/img", "new/old",
              "e2e/executor", "steady/exec", "e2e img/s", "steady img/s", "load"]
    rows = []
    for c in doc["configs"]:
        old, new, r = c["old"], c["new"], c["ratios"]
        load = [run["loadavg"]["before"][0] for run in old["runs"] + new["runs"]
                if run["loadavg"]["before"]]
        rows.append([
            str(c["executors"]), str(c["batch_size"]),
            f"{_f(old['front_cpu_ms_per_image'], 2)} -> {_f(new['front_cpu_ms_per_image'], 2)}",
            _f(r["front_cpu_ms_per_image"], 2),
            f"{_kb(old['front_bytes_per_image'])} -> {_kb(new['front_bytes_per_image'])}",
            _f(r["front_bytes_per_image"], 4),
            f"{_f(old['e2e_over_executor'], 2)} -> {_f(new['e2e_over_executor'], 2)}",
            f"{_f(old['steady_over_executor'], 2)} -> {_f(new['steady_over_executor'], 2)}",
            f"{_f(old['e2e_img_s'])} -> {_f(new['e2e_img_s'])}",
            f"{_f(old['e2e_steady_img_s'])} -> {_f(new['e2e_steady_img_s'])}",
            f"{min(load):.1f}-{max(load):.1f}" if load else "-"])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    pay = doc["expected_payload_bytes_per_image"]
    lines.append(f"(old -> new; pixel payload per image: input {pay['input']} B + output "
                 f"{pay['output']} B = {pay['total'] / 1024:.1f} KB each way; load: 1-min "
                 "load average before each run)")
    own = [(c["config"], c["old"]["front_bytes_per_image_reported"],
            c["new"]["front_bytes_per_image_reported"]) for c in doc["configs"]]
    if any(o is not None or n is not None for _, o, n in own):
        lines.append("the front's own byte count (bench JSON front_bytes_per_image): " + ", ".join(
            f"{name} {_f(o, 0)} -> {_f(n, 0)} B" for name, o, n in own))
    g = doc["goals"]
    lines.append(
        f"goals: front bytes < 2 KB: {g['front_bytes_below_2KB']}; front CPU lower: "
        f"{g['front_cpu_lower_everywhere']}; not growing 1 -> 2 executors (new, +"
        f"{g['tolerance']:.0%}): {g['front_cpu_flat_1_to_2_executors']} "
        + ", ".join(f"{k} {v:.2f}" for k, v in g["front_cpu_2exe_over_1exe_new"].items())
        + f"; e2e/executor not lower (-{g['tolerance']:.0%}): "
        f"{g['e2e_over_executor_not_lower']}")
    return "\n".join(lines)


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _kb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024:.{1 if value >= 10240 else 2}f}"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    from pspnet.bench.machine import cpu_count, cpu_model

    return {"hostname": socket.gethostname(), "cpu_model": cpu_model(),
            "cpu_count": cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


@contextlib.contextmanager
def trees(args: argparse.Namespace, repo: Path, parent: Path) -> Iterator[tuple[Tree, Tree]]:
    made: list[Tree] = []
    try:
        old = checkout(repo, args.old, "old", parent)
        made.append(old)
        if args.new_tree is not None:
            new = existing_tree(args.new_tree, "new")
        else:
            new = checkout(repo, args.new or "HEAD", "new", parent)
            made.append(new)
        yield old, new
    finally:
        for tree in made:
            remove_worktree(repo, tree)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    repo = Path(git(args.repo, "rev-parse", "--show-toplevel"))
    configs = [Config(e, b) for e in args.executors for b in args.batch_sizes]
    keep = args.keep_runs
    with tempfile.TemporaryDirectory(prefix="front-compare-") as tmp:
        work = keep or Path(tmp) / "runs"
        work.mkdir(parents=True, exist_ok=True)
        with trees(args, repo, Path(tmp)) as (old, new):
            for tree in (old, new):
                check_imports(args.python, tree)
                say(f"{tree.label}: {tree.commit[:12]}{' (dirty)' if tree.dirty else ''} "
                    f"at {tree.path}, runs `python {' '.join(tree.entry)}`")
            if args.model is None:
                say(f"building a {args.head} model directory at {VOC_INPUT_SIZE}x"
                    f"{VOC_INPUT_SIZE}, batch sizes {','.join(map(str, SIM_BATCH_SIZES))}")
                model = build_sim_model(args.python, old, Path(tmp) / "model", args.head)
            else:
                model = args.model.resolve()
            runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
            load_start = _loadavg()
            for cfg in configs:
                for round_no in range(1, args.rounds + 1):
                    for tree in (old, new):
                        say(f"{cfg.name} round {round_no}: {tree.label} ...")
                        run = run_once(args, tree, cfg, model, work, round_no)
                        runs.setdefault((cfg.name, tree.label), []).append(run)
                        say(f"{cfg.name} {tree.label}: front "
                            f"{run['front_cpu_ms_per_image']:.2f} ms/img, "
                            f"{run['front_bytes_per_image'] / 1024:.1f} KB/img, e2e/executor "
                            f"{run['e2e_over_executor']:.2f} ({run['wall_s']:.0f} s)")
            rows = []
            for cfg in configs:
                o, n = (summarise(runs[(cfg.name, side)]) for side in ("old", "new"))
                rows.append({"config": cfg.name, "executors": cfg.executors,
                             "batch_size": cfg.batch, "old": o, "new": n,
                             "ratios": ratios(o, n)})
            doc = {
                "harness": "studies.front_compare",
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "command": ["python", "-m", "studies.front_compare", *sys.argv[1:]],
                "machine": {**machine(),
                            "loadavg": {"start": load_start, "end": _loadavg(),
                                        "note": "1/5/15-min load averages of the shared "
                                                "host; each run keeps its own too"}},
                "revisions": {"old": old.describe(), "new": new.describe()},
                "settings": {
                    "backend": "sim", "img_s_per_device": args.img_s, "head": args.head,
                    "model": None if args.model is None else str(args.model),
                    "executors": args.executors, "batch_sizes": args.batch_sizes,
                    "synthetic": args.synthetic, "min_images": args.min_images,
                    "repeats": args.repeats, "warmup_batches": args.warmup,
                    "baseline_images": args.baseline_images,
                    "preprocess_workers": args.preprocess_workers,
                    "postprocess_workers": args.postprocess_workers,
                    "transport": "tcp", "tcp_base_port": args.tcp_base_port,
                    "sample_ms": args.sample_ms, "rounds": args.rounds,
                    "order": "per config: old then new, each round",
                    "bench_args_example": bench_args(args, configs[0], Path("MODEL"),
                                                     Path("OUT.json")),
                    "nice": os.nice(0)},
                "expected_payload_bytes_per_image": payload_per_image(model),
                "configs": rows,
                "goals": goals(rows, args.tolerance),
                "wall_s": round(time.monotonic() - started, 1),
            }
    return doc


# ---- command line ----------------------------------------------------------------------

EPILOG = """\
columns (per config: executors x batch; old -> new, medians over --rounds):
  front CPU ms/img  CPU of the bench process (the front) per e2e image (bench JSON
                    cpu_ms_per_image.front)
  front KB/img      bytes in + out of the bench process's TCP sockets (ss, sampled) per
                    e2e image; the streamer front forwards pixels, so ~2 x (input + output)
  e2e/executor      e2e img/s over executor-only img/s (one device's: can reach 2 with 2
                    executors); steady/exec likewise for the steady rate
  load              1-min load average before each run (others share this host)

examples:
  nice -n 10 python -m studies.front_compare --old main~3 --new-tree . \\
      --json bench/results/front-compare-cpu-2core.json
  nice -n 10 python -m studies.front_compare --old HEAD --new-tree . --executors 1 \\
      --batch-sizes 16 --min-images 256 --repeats 1 --json /tmp/smoke.json"""


def comma_ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma list of integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"positive integers, not {text!r}")
    return values


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m studies.front_compare",
        formatter_class=_Formatter,
        description="Run `pspnet bench --backend sim` from two source trees (git revisions "
                    "checked out into temporary worktrees, or a directory), alternating "
                    "old and new config by config, and compare the front's CPU per image, "
                    "the bytes per image through the front's TCP sockets, and e2e/executor "
                    "(issue 14).",
        epilog=EPILOG)
    p.add_argument("--old", required=True, metavar="REV", help="the baseline revision")
    new = p.add_mutually_exclusive_group()
    new.add_argument("--new", metavar="REV",
                     help="the revision to compare (default: HEAD, without --new-tree)")
    new.add_argument("--new-tree", type=Path, metavar="DIR",
                     help="a checkout to compare as it is, uncommitted changes included")
    p.add_argument("--repo", type=Path, default=Path("."), metavar="DIR",
                   help="the git repository the revisions are in")
    p.add_argument("--model", type=Path, default=None, metavar="DIR",
                   help="a model directory with batch sizes 16 and 64 (default: build a "
                        "500x500 stand-in in a temporary folder, ~4 s)")
    p.add_argument("--head", choices=("logits", "labels"), default="logits",
                   help="the built model's head (without --model)")
    p.add_argument("--img-s", type=positive, default=DEFAULT_IMG_S, metavar="N",
                   help="speed of each simulated device, images/s (see the module "
                        "docstring for why the default)")
    p.add_argument("--executors", type=comma_ints, default="1,2", metavar="LIST",
                   help="executor counts (--devices cpu, cpu,cpu ...)")
    p.add_argument("--batch-sizes", type=comma_ints, default=",".join(map(str, SIM_BATCH_SIZES)),
                   metavar="LIST", help="one bench run per batch size and executor count")
    p.add_argument("--synthetic", type=positive, default=48, metavar="N",
                   help="synthetic images (cycled up to --min-images)")
    p.add_argument("--min-images", type=positive, default=512, metavar="N",
                   help="images per e2e pass")
    p.add_argument("--repeats", type=positive, default=3,
                   help="timed passes per run (the bench's medians)")
    p.add_argument("--warmup", type=int, default=1, metavar="BATCHES",
                   help="untimed batches per mode first")
    p.add_argument("--baseline-images", type=int, default=64, metavar="N",
                   help="images per executor-only and serial pass (0: as many as e2e; "
                        "serial is slow and not compared here)")
    p.add_argument("--preprocess-workers", type=positive, default=1, metavar="K",
                   help="decode processes per bench (one decodes ~700 img/s here)")
    p.add_argument("--postprocess-workers", type=positive, default=2, metavar="M",
                   help="postprocess processes per bench (logits: ~13 ms of CPU per image)")
    p.add_argument("--tcp-base-port", type=positive, default=DEFAULT_TCP_BASE_PORT,
                   metavar="P", help="the bench's internal tcp ports start here (checked "
                                     "free before each run)")
    p.add_argument("--bench-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for both benches, repeatable "
                        "(e.g. --bench-arg=--max-wait-ms --bench-arg=10)")
    p.add_argument("--rounds", type=positive, default=1,
                   help="old/new pairs per config; figures are medians over rounds")
    p.add_argument("--sample-ms", type=positive, default=100,
                   help="how often the front's socket counters are read")
    p.add_argument("--tolerance", type=float, default=NOISE_TOLERANCE,
                   help="noise allowed by the 'flat' and 'not lower' goal checks")
    p.add_argument("--python", default=sys.executable, metavar="EXE",
                   help="the interpreter both benches run with")
    p.add_argument("--run-timeout-s", type=float, default=RUN_TIMEOUT_S,
                   help="give up on one bench run after this long")
    p.add_argument("--keep-runs", type=Path, default=None, metavar="DIR",
                   help="keep every bench JSON and log here (default: temporary)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="write settings, machine, revisions and every figure here")
    return p


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag (unless its help says it); the epilog keeps its breaks."""


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if shutil.which("ss") is None:
        sys.stderr.write("front_compare: error: `ss` (iproute2) is needed to read the front's "
                         "socket counters\n")
        return 2
    if args.model is not None and not (args.model / "manifest.json").is_file():
        sys.stderr.write(f"front_compare: error: {args.model}: no manifest.json\n")
        return 2
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    try:
        doc = compare(args)
    except HarnessError as exc:
        sys.stderr.write(f"front_compare: error: {exc}\n")
        return 1
    print(table(doc))
    say(f"done in {doc['wall_s']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
