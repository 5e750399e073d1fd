"""Issue 27's must-shows, old main against new, in one run (one study process).

Why one run: the figures compare two versions of the code on a shared 2-core host whose
load drifts by the minute; each measurement is made for the old tree and the new one
back to back (old, new, then the next measurement new, old: A/B/B/A), so the load hits
both alike. Each tree runs as a subprocess from its own source (cwd and PYTHONPATH = the
tree; the old one is a git worktree of `--old`, made here and removed at the end), with
options every tree has.

What is measured, per tree:
- front ceiling: `pspnet bench --front-ceiling N` (N simulated executors at 20,000 img/s
  each, labels head, no masks) on the demo network built with its labels head at 16,64:
  `front_main_ms_per_image` (the front's main-thread CPU per image, e2e pass) at batch 16
  and 64, N = 2 and 4, for each of `--ceiling-sides`: the same 96 synthetic photos at that
  longest side, given to both trees as a VOC-layout folder (`--voc`), so both read the
  same files whatever their bench's own --synthetic makes. 32 is what the new bench's
  --front-ceiling makes (the workers cost little, so the front is fed as fast as the host
  allows); 500 is VOC's size, where this 2-core host's workers cap the rate near 700
  img/s;
- e2e with the real demo model (`pspnet demo`'s trained DeepLabV3-MobileNetV2 at 257,
  ort, batch sizes 1 and 4): `e2e_img_s` and `latency_p50_ms` at batch 1 and 4;
- idle latency (studies.idle_latency): one photo to an idle daemon (defaults), median
  latency_ms of `--repeats`, minus the serial loop's ms per image at batch 1.

    python -m studies.issue27 --old 2d1f933 --json bench/results/cpu-2core-issue27.json

The models are built once with the OLD tree's code (a newer reader accepts an older
manifest; the reverse may refuse a field added since).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from studies import idle_latency
from studies.front_compare import (
    Tree,
    _loadavg,
    checkout,
    existing_tree,
    machine,
    remove_worktree,
    tree_env,
)

BUILD = """
import sys
from pathlib import Path
try:
    from pspnet.build_model.export import build
    from pspnet.build_model.trained import CHECKPOINT, CONFIG, INPUT_SIZE
except ImportError:
    from build_model.export import build
    from build_model.trained import CHECKPOINT, CONFIG, INPUT_SIZE
out, head, sizes = Path(sys.argv[1]), sys.argv[2], tuple(int(s) for s in sys.argv[3].split(","))
build(CONFIG, CHECKPOINT, out, batch_sizes=sizes, input_size=INPUT_SIZE, head=head,
      onnx=head == "logits", torch_program=head != "logits", run_atc=False)
"""


def say(message: str) -> None:
    sys.stderr.write(f"[issue27] {message}\n")
    sys.stderr.flush()


def build_model(tree: Tree, out: Path, head: str, sizes: str) -> Path:
    if (out / "manifest.json").is_file():
        return out
    done = subprocess.run([sys.executable, "-c", BUILD, str(out), head, sizes],
                          cwd=tree.path, env=tree_env(tree.path), capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"building {out.name} with the {tree.label} tree failed: "
                           f"{done.stderr.strip()[-600:]}")
    return out


def bench(tree: Tree, argv: list[str], out_json: Path) -> dict[str, Any]:
    """One `pspnet bench` of `tree`; its JSON document."""
    done = subprocess.run([sys.executable, *tree.entry, *argv, "--json", str(out_json)],
                          cwd=tree.path, env=tree_env(tree.path), capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{tree.label}: bench {' '.join(argv)} failed: "
                           f"{done.stderr.strip()[-800:]}")
    return json.loads(out_json.read_text())


def voc_photos(root: Path, side: int, count: int = 96) -> Path:
    """`count` synthetic photos of longest side `side` with their stand-in ground truths,
    laid out as VOC (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/val.txt)."""
    from pspnet.bench.inputs import synthetic

    listing = root / "ImageSets" / "Segmentation" / "val.txt"
    if listing.is_file():
        return root
    feed = synthetic(count, root / "made", long_side=side)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for photo, truth in zip(feed.paths, feed.truths, strict=True):
        assert truth is not None
        photo.rename(root / "JPEGImages" / photo.name)
        truth.rename(root / "SegmentationClass" / f"{photo.stem}.png")
    listing.write_text("".join(f"{p.stem}\n" for p in feed.paths))
    return root


def rows(doc: dict[str, Any], keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {str(r["batch_size"]): {k: r.get(k) for k in keys} for r in doc["results"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="2d1f933",
                        help="the old tree's revision (default: the commit before the "
                             "front-control merge, 3eaa033^1)")
    parser.add_argument("--new", type=Path, default=Path.cwd(), help="the new tree")
    parser.add_argument("--work", type=Path, default=Path("/tmp/issue27-study"))
    parser.add_argument("--executors", default="2,4")
    parser.add_argument("--ceiling-images", type=int, default=1024)
    parser.add_argument("--ceiling-sides", default="32,500",
                        help="the front ceiling's photos: longest sides to measure")
    parser.add_argument("--demo-images", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=8, help="idle latency: measured")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    repo = args.new.resolve()
    scratch = Path(tempfile.mkdtemp(prefix="trees-", dir=args.work))
    old = checkout(repo, args.old, "old", scratch)
    new = existing_tree(repo, "new")
    say(f"old {old.commit[:9]} ({old.path}), new {new.commit[:9]}"
        + (" + uncommitted changes" if new.dirty else ""))
    doc: dict[str, Any] = {
        "study": "studies/issue27.py", "created": datetime.datetime.now(
            datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(), "loadavg_start": _loadavg(),
        "trees": {"old": old.describe(), "new": new.describe()},
        "order": "each measurement old then new, the next new then old (A/B/B/A)",
        "ceiling": {}, "demo": {}, "idle": {}}
    try:
        labels = build_model(old, args.work / "demo-labels-16-64", "labels", "16,64")
        demo = build_model(old, args.work / "demo-logits-1-4", "logits", "1,4")
        flip = False

        def pair() -> tuple[Tree, ...]:
            nonlocal flip
            flip = not flip
            return (old, new) if flip else (new, old)

        for side in (int(x) for x in args.ceiling_sides.split(",")):
            voc = voc_photos(args.work / f"photos-{side}", side)
            for n in (int(x) for x in args.executors.split(",")):
                for tree in pair():
                    say(f"{tree.label}: front ceiling, {n} simulated executors, "
                        f"photos of longest side {side}")
                    got = bench(tree, ["--model", str(labels), "--front-ceiling", str(n),
                                       "--batch-sizes", "16,64", "--voc", str(voc),
                                       "--min-images", str(args.ceiling_images),
                                       "--baseline-images", "128", "--repeats", "1"],
                                scratch / f"ceiling-{tree.label}-{n}-{side}.json")
                    doc["ceiling"].setdefault(f"{n}exe side {side}", {})[tree.label] = rows(
                        got, ("front_main_ms_per_image", "front_ceiling_img_s", "e2e_img_s",
                              "images_per_batch", "latency_p50_ms"))
        for tree in pair():
            say(f"{tree.label}: e2e, the demo model at batch 1 and 4")
            got = bench(tree, ["--model", str(demo), "--batch-sizes", "1,4", "--synthetic",
                               "32", "--min-images", str(args.demo_images),
                               "--baseline-images", "32", "--repeats", "1"],
                        scratch / f"demo-{tree.label}.json")
            doc["demo"][tree.label] = rows(got, ("e2e_img_s", "e2e_steady_img_s",
                                                 "latency_p50_ms", "latency_p99_ms",
                                                 "serial_img_s", "front_main_ms_per_image"))
        from pspnet.build_model.samples import SAMPLE_DIR

        photo = SAMPLE_DIR / idle_latency.PHOTO
        for tree in pair():
            say(f"{tree.label}: idle latency")
            serial = idle_latency.serial_ms(demo, photo, 2, args.repeats)
            got = idle_latency.daemon_latencies(tree.path, demo, photo, args.work, 2,
                                                args.repeats)
            serial += idle_latency.serial_ms(demo, photo, 2, args.repeats)
            gapped = idle_latency.serial_ms(demo, photo, 2, args.repeats, gap_s=0.3)
            median, base = statistics.median(got), statistics.median(serial)
            doc["idle"][tree.label] = {
                "latency_ms": [round(x, 1) for x in got], "median_ms": round(median, 1),
                "serial_ms_per_image": round(base, 1),
                "over_serial_ms": round(median - base, 1),
                "serial_after_idle_ms": round(statistics.median(gapped), 1),
                "over_serial_after_idle_ms": round(median - statistics.median(gapped), 1)}
    finally:
        remove_worktree(repo, old)
    doc["loadavg_end"] = _loadavg()
    args.json.write_text(json.dumps(doc, indent=1))
    print(summary(doc))
    return 0


def summary(doc: dict[str, Any]) -> str:
    lines = ["front main-thread ms/image (ceiling img/s), old -> new:"]
    for cfg, by_tree in doc["ceiling"].items():
        for bs in by_tree["new"]:
            o, n = by_tree["old"][bs], by_tree["new"][bs]
            lines.append(f"  {cfg} bs{bs}: {_f(o['front_main_ms_per_image'], 3)} "
                         f"({_f(o['front_ceiling_img_s'], 0)}) -> "
                         f"{_f(n['front_main_ms_per_image'], 3)} "
                         f"({_f(n['front_ceiling_img_s'], 0)}); e2e {_f(o['e2e_img_s'])} -> "
                         f"{_f(n['e2e_img_s'])} img/s")
    lines.append("demo model (ort), old -> new:")
    for bs in doc["demo"].get("new", {}):
        o, n = doc["demo"]["old"][bs], doc["demo"]["new"][bs]
        lines.append(f"  bs{bs}: e2e {_f(o['e2e_img_s'])} -> {_f(n['e2e_img_s'])} img/s, "
                     f"p50 {_f(o['latency_p50_ms'])} -> {_f(n['latency_p50_ms'])} ms")
    for label, row in doc["idle"].items():
        lines.append(f"idle latency {label}: median {row['median_ms']} ms, serial "
                     f"{row['serial_ms_per_image']} ms, over serial {row['over_serial_ms']:+} ms"
                     f"; serial after the same 0.3 s idle {row['serial_after_idle_ms']} ms, "
                     f"over it {row['over_serial_after_idle_ms']:+} ms ({row['latency_ms']})")
    return "\n".join(lines)


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
