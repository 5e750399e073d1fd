"""Issue 16's device measurements: executor-only img/s and fp16 label agreement per
configuration (model build x torch backend options x batch size), one process each.

Why one process per configuration: a compile that hangs or a cuDNN refusal then costs one
step (run.sh's `step` puts a timeout on each), not the others; and every configuration
starts from the same clean state (cuDNN autotune, inductor, allocator).

  stage      letterbox N images (the sample photos, then photo-like crops) into one
             uint8 N x H x W x 3 array + boxes: every configuration sees the same pixels
  reference  labels of the staged images from the torch backend in fp32 with TF32 off
             (strict fp32), plain build, no options: what every variant is judged against
  measure    open the torch backend exactly as the daemon would (`open_backend`, the
             given options), time executor-only passes (bench/executor_only.py, ais_bench's
             1000 x batch / mean execute ms), then run the staged images and compare labels
             with the reference over the valid (unpadded) pixels
  best       the fastest measured configuration whose name matches, as a shell line
             (for run.sh to bench it end to end)
  table      every measured configuration as one JSON document (+ a text table on stdout)

Run with PYTHONPATH holding the repository and the carried wheels (run.sh sets it).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np


def say(message: str) -> None:
    sys.stderr.write(f"[variants] {message}\n")
    sys.stderr.flush()


def stage(args: argparse.Namespace) -> dict[str, Any]:
    from pspnet.bench.inputs import synthetic
    from pspnet.build_model.samples import sample_images
    from pspnet.model.image_io import decode_image, letterbox

    size = (args.input_size, args.input_size)
    photos = [rgb for _, rgb in sample_images()][:args.images]
    with tempfile.TemporaryDirectory() as tmp:
        extra = args.images - len(photos)
        if extra > 0:
            photos += [decode_image(p) for p in synthetic(extra, Path(tmp), seed=1).paths]
    images = np.zeros((len(photos), *size, 3), np.uint8)
    boxes = np.zeros((len(photos), 4), np.int32)
    for i, rgb in enumerate(photos):
        _, place = letterbox(rgb, size, out=images[i])
        boxes[i] = place.box()
    np.savez(args.out, images=images, boxes=boxes)
    return {"staged": len(photos), "input_size": list(size), "out": str(args.out)}


def _staged(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    return data["images"], data["boxes"]


def _run_all(backend, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Every staged image through the backend in batches (the last one padded)."""
    n, batch = len(images), backend.batch_size
    outs = []
    for start in range(0, n, batch):
        index = np.arange(start, start + batch) % n
        backend.upload(0, np.ascontiguousarray(images[index]),
                       np.ascontiguousarray(boxes[index]))
        outs.append(backend.execute(0)[: min(batch, n - start)])
    return np.concatenate(outs)


def reference(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pspnet.stages.backends import open_backend

    torch.backends.cudnn.allow_tf32 = False          # strict fp32: the judge of the others
    torch.backends.cuda.matmul.allow_tf32 = False
    images, boxes = _staged(args.staged)
    started = time.perf_counter()
    with open_backend("torch", args.model, args.batch_size, device=args.device,
                      precision="fp32") as backend:
        if backend.head != "labels":
            raise SystemExit(f"{args.model}: the reference needs a labels-head model")
        labels = _run_all(backend, images, boxes)
    np.save(args.out, labels)
    return {"reference": str(args.out), "images": len(labels), "model": str(args.model),
            "seconds": round(time.perf_counter() - started, 1)}


def _valid(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import torch

    from pspnet.model.serving_model import valid_mask

    return valid_mask(torch.from_numpy(boxes), *shape).numpy()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pspnet.bench import executor_only
    from pspnet.model.manifest import Manifest
    from pspnet.stages.backends import open_backend

    options = dict(o.split("=", 1) for o in args.options.split(",") if o)
    images, boxes = _staged(args.staged)
    doc: dict[str, Any] = {
        "name": args.name, "model": str(args.model), "options": options,
        "precision": args.precision, "batch_size": args.batch_size, "device": args.device,
        "rewrites": Manifest.read(args.model).rewrites, "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        doc["card"] = torch.cuda.get_device_name(0)
    _write(args.json, {**doc, "status": "opening"})
    backend = open_backend("torch", args.model, args.batch_size, device=args.device,
                           precision=args.precision, options=options)
    doc.update(open_s=round(backend.open_seconds, 2), compile_s=backend.compile_seconds,
               fusion=getattr(backend, "fusion", None))
    say(f"{args.name} bs {args.batch_size}: open {backend.open_seconds:.1f} s, fusion "
        f"{doc['fusion']}")
    batches = []
    for start in range(0, max(len(images), args.batch_size), args.batch_size):
        index = np.arange(start, start + args.batch_size) % len(images)
        batches.append((np.ascontiguousarray(images[index]),
                        np.ascontiguousarray(boxes[index])))
    executor_only.run_batches(backend, batches, args.warmup)
    passes = [executor_only.measure(backend, batches, args.batches)
              for _ in range(args.repeats)]
    doc["executor_img_s"] = statistics.median(p["img_s"] for p in passes)
    doc["executor_wall_img_s"] = statistics.median(p["wall_img_s"] for p in passes)
    doc["passes"] = passes
    say(f"{args.name} bs {args.batch_size}: executor {doc['executor_img_s']:.1f} img/s "
        f"(wall {doc['executor_wall_img_s']:.1f})")
    if args.reference is not None and Path(args.reference).is_file():
        want = np.load(args.reference)
        got = _run_all(backend, images, boxes)
        valid = _valid(boxes, tuple(images.shape[1:3]))
        same = (got == want) & valid
        per_image = same.reshape(len(got), -1).sum(1) / valid.reshape(len(got), -1).sum(1)
        doc["agreement_vs_fp32_pct"] = 100.0 * float(same.sum() / valid.sum())
        doc["min_image_pct"] = 100.0 * float(per_image.min())
        doc["agreement_images"] = len(got)
        say(f"{args.name} bs {args.batch_size}: labels vs strict fp32 "
            f"{doc['agreement_vs_fp32_pct']:.3f} % (worst image {doc['min_image_pct']:.2f} %)")
    backend.close()
    doc["status"] = "ok"
    _write(args.json, doc)
    return {k: doc.get(k) for k in ("name", "batch_size", "executor_img_s",
                                    "agreement_vs_fp32_pct", "open_s", "compile_s")}


def load_all(folder: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return docs


def best(args: argparse.Namespace) -> None:
    """Print `NAME BATCH MODEL OPTIONS` of the fastest finished variant matching --match."""
    done = [d for d in load_all(args.dir) if d.get("status") == "ok"
            and re.search(args.match, d["name"]) and d.get("executor_img_s")]
    if not done:
        return
    top = max(done, key=lambda d: d["executor_img_s"])
    options = ",".join(f"{k}={v}" for k, v in top["options"].items()) or "-"
    print(f"{top['name']} {top['batch_size']} {top['model']} {options}")


def table(args: argparse.Namespace) -> dict[str, Any]:
    docs = load_all(args.dir)
    rows = []
    for d in docs:
        rows.append({k: d.get(k) for k in (
            "name", "batch_size", "status", "executor_img_s", "executor_wall_img_s",
            "agreement_vs_fp32_pct", "min_image_pct", "open_s", "compile_s", "precision",
            "options", "card")} | {"fused": (d.get("fusion") or {}).get("active"),
                                   "macs_per_image": (d.get("rewrites") or {}).get(
                                       "macs_per_image")})
    rows.sort(key=lambda r: (r["batch_size"] or 0, -(r["executor_img_s"] or 0)))
    doc = {"what": "executor-only img/s (1000 x batch / mean execute ms; median of the "
                   "passes) and labels agreement with strict fp32 on the staged photos, "
                   "per configuration; one process each (studies/device/variants.py)",
           "rows": rows, "configurations": docs}
    if args.json:
        _write(args.json, doc)
    for r in rows:
        img_s, agree = r["executor_img_s"], r["agreement_vs_fp32_pct"]
        print(f"  {r['name']:26s} bs {r['batch_size']:>3}  {r['status']:8s} "
              f"executor {'-' if img_s is None else f'{img_s:8.1f}'} img/s  "
              f"vs fp32 {'-' if agree is None else f'{agree:7.3f}'} %  "
              f"fused {r['fused']}  open {r['open_s']} s")
    return doc


def _write(path: Path | None, doc: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("--images", type=int, default=128)
    s.add_argument("--input-size", type=int, default=500)
    s.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("reference")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--staged", type=Path, required=True)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--device", default="cuda:0")
    r.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("measure")
    m.add_argument("--name", required=True)
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--options", default="", help="comma list of KEY=VALUE")
    m.add_argument("--batch-size", type=int, required=True)
    m.add_argument("--precision", default="fp16")
    m.add_argument("--device", default="cuda:0")
    m.add_argument("--staged", type=Path, required=True)
    m.add_argument("--reference", type=Path, default=None)
    m.add_argument("--warmup", type=int, default=3, help="untimed batches")
    m.add_argument("--batches", type=int, default=20, help="timed batches per pass")
    m.add_argument("--repeats", type=int, default=3, help="timed passes")
    m.add_argument("--json", type=Path, required=True)
    b = sub.add_parser("best")
    b.add_argument("--dir", type=Path, required=True)
    b.add_argument("--match", default=".")
    t = sub.add_parser("table")
    t.add_argument("--dir", type=Path, required=True)
    t.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        if args.cmd == "best":
            best(args)
            return 0
        if args.cmd == "table":
            table(args)
            return 0
        info = {"stage": stage, "reference": reference, "measure": measure}[args.cmd](args)
    except Exception as exc:
        if args.cmd == "measure":
            _write(args.json, {"name": args.name, "batch_size": args.batch_size,
                               "options": dict(o.split("=", 1) for o in
                                               args.options.split(",") if o),
                               "status": "failed",
                               "error": f"{type(exc).__name__}: {exc}"[:2000]})
        traceback.print_exc()
        return 1
    print(json.dumps({"variants": args.cmd, **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
