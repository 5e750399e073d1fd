"""fp16 (and bf16) against fp32: do the torch backend's labels agree, and what does it cost in mIoU?

Why: the GPU fast path runs the network in fp16; the daemon's answers must stay those of the
fp32 model. One reference judges every precision: the model directory's own mmseg network
(config + checkpoint named in its manifest), eager, fp32 with TF32 off, on inputs
normalised and zero-padded by pspnet.build_model.inputs (numpy, independent of ServingModel).
Then the torch backend, exactly as the daemon opens it (`open_backend`, same options, e.g.
cuda_graphs=1), is run at each precision on the same letterboxed batches, and its output
goes through the postprocess workers' own functions (pspnet.model.labels) to labels at the
original image size. For each precision and head:

  agreement_pct      share of original-size pixels whose label equals the reference's
  min_image_pct      the worst image's agreement
  mIoU_vs_reference  mmseg's mIoU with the reference labels as ground truth (100 = same)
  mIoU_drop          mIoU_vs_reference of the backend's fp32 minus this precision's
  max/mean |logit diff| (logits head) against the reference logits
  vs_fp32_backend    agreement with the backend's own fp32 output, same head

meets_agreement_target: vs_fp32_backend_pct >= --target (99.5%) for fp16/bf16,
agreement_pct for logits/fp32: the precision's own effect. labels/fp32 gets none (null): its
agreement with the reference measures the labels head (argmax at the input size, then a
nearest resize of labels instead of a bilinear resize of logits), not a precision.
meets_miou_target: mIoU_drop <= --miou-target (0.1 points), fp16/bf16 only. The issue's
two targets are judged apart, so neither reads as the other.

Inputs: the package's sample photos plus photo-like crops of them at VOC sizes
(pspnet.bench.inputs.synthetic), decoded with the daemon's decoder. The weights are calibrated,
not trained (pspnet.build_model.calibrate): their logit margins are smaller than a trained
network's, so the agreement here is, if anything, a pessimistic figure; the reference's
margin quantiles are reported to judge that.

JSON to --json; a short summary on stdout. Exit 0 when every precision ran (whatever the
figures), 1 if one failed to run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

TARGET_PCT = 99.5


def say(message: str) -> None:
    sys.stderr.write(f"[agreement] {message}\n")
    sys.stderr.flush()


def load_photos(count: int, tmp: Path) -> tuple[list[str], list[np.ndarray]]:
    """The sample photos, then crops of them (JPEG round trip, the daemon's decoder)."""
    from pspnet.bench.inputs import synthetic
    from pspnet.build_model.samples import sample_images
    from pspnet.model.image_io import decode_image

    names, photos = [], []
    for name, rgb in sample_images()[:count]:
        names.append(name)
        photos.append(rgb)
    extra = count - len(photos)
    if extra > 0:
        feed = synthetic(extra, tmp, seed=1)
        for path in feed.paths:
            names.append(path.name)
            photos.append(decode_image(path))
    return names, photos


def letterboxed(photos, input_size):
    from pspnet.model.image_io import letterbox

    images = np.zeros((len(photos), *input_size, 3), np.uint8)
    places = []
    for i, rgb in enumerate(photos):
        _, place = letterbox(rgb, input_size, out=images[i])
        places.append(place)
    boxes = np.asarray([p.box() for p in places], np.int32)
    return images, boxes, places


def reference_logits(model_dir: Path, manifest, images, boxes, device: str,
                     chunk: int) -> tuple[np.ndarray, dict]:
    """mmseg's core on the device, fp32, TF32 off; float32 N x C x h x w on the host."""
    import torch

    from pspnet.build_model.calibrate import strict_fp32
    from pspnet.build_model.inputs import normalised_batch
    from pspnet.build_model.network import load_network

    source = manifest.source
    network = load_network(source["config"], source["checkpoint"])
    core = network.core.to(device).eval()
    out = []
    started = time.perf_counter()
    with strict_fp32(), torch.inference_mode():
        for s in range(0, len(images), chunk):
            x = normalised_batch(images[s:s + chunk], boxes[s:s + chunk], manifest.mean,
                                 manifest.std).to(device)
            out.append(core(x).float().cpu().numpy())
    logits = np.concatenate(out)
    del core, network
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]).ravel()
    info = {"config": source.get("config"), "checkpoint": source.get("checkpoint"),
            "device": device, "tf32": False, "seconds": round(time.perf_counter() - started, 2),
            "logit_margin_quantiles": {q: float(np.quantile(margin, float(q)))
                                       for q in ("0.001", "0.01", "0.05", "0.5")},
            "logit_abs_max": float(np.abs(logits).max())}
    return logits, info


def run_backend(model_dir: Path, batch_size: int, device: str, precision: str, options,
                images, boxes) -> tuple[np.ndarray, dict]:
    """Every image through the torch backend (last batch padded by repeating rows)."""
    from pspnet.stages.backends import open_backend

    started = time.perf_counter()
    backend = open_backend("torch", model_dir, batch_size, device=device,
                           precision=precision, options=options)
    opened = time.perf_counter() - started
    outputs = []
    try:
        for s in range(0, len(images), batch_size):
            index = np.arange(s, s + batch_size) % len(images)
            backend.upload(0, np.ascontiguousarray(images[index]),
                           np.ascontiguousarray(boxes[index]))
            out = backend.execute(0)
            outputs.append(np.array(out[: min(batch_size, len(images) - s)]))
        times = list(backend.execute_times_ms)
    finally:
        backend.close()
    return np.concatenate(outputs), {"open_s": round(opened, 2),
                                     "execute_ms_mean": float(np.mean(times)) if times else None}


def to_labels(head: str, outputs, places, input_size) -> list[np.ndarray]:
    from pspnet.model.labels import labels_from_labels, labels_from_logits

    if head == "labels":
        return [labels_from_labels(o, p) for o, p in zip(outputs, places, strict=True)]
    return [labels_from_logits(o, p, input_size) for o, p in zip(outputs, places, strict=True)]


def compare(labels, truth, num_classes) -> dict:
    from pspnet.model.labels import intersect_and_union
    from pspnet.model.metrics import IoUAccumulator

    same = total = 0
    worst = 100.0
    acc = IoUAccumulator(num_classes)
    for a, b in zip(labels, truth, strict=True):
        eq = int(np.count_nonzero(a == b))
        same += eq
        total += a.size
        worst = min(worst, 100.0 * eq / a.size)
        acc.add(intersect_and_union(a, b, num_classes))
    miou = acc.summary()["mIoU"]
    return {"agreement_pct": 100.0 * same / total, "min_image_pct": worst,
            "mIoU_vs_reference": None if math.isnan(miou) else miou, "pixels": total}


def finish(doc: dict, target: float, path: Path | None, miou_target: float = 0.1) -> None:
    """Derived fields (mIoU drop, target) and the JSON file; called after every precision,
    so a run cut short still leaves what it measured."""
    for key, row in doc["results"].items():
        head = key.split("/")[0]
        base = doc["results"].get(f"{head}/fp32")
        if base and row.get("mIoU_vs_reference") is not None \
                and base.get("mIoU_vs_reference") is not None:
            row["mIoU_drop"] = base["mIoU_vs_reference"] - row["mIoU_vs_reference"]
        # the precision's own effect: against the backend's fp32 of the same head (the
        # labels head also differs from the reference by its nearest resize of labels)
        if "vs_fp32_backend_pct" in row:
            row["meets_agreement_target"] = row["vs_fp32_backend_pct"] >= target
        elif head == "logits":
            row["meets_agreement_target"] = row["agreement_pct"] >= target
        else:               # labels/fp32: the head's own effect, no precision to judge
            row["meets_agreement_target"] = None
        row["meets_miou_target"] = (row["mIoU_drop"] <= miou_target
                                    if key.split("/")[1] != "fp32"
                                    and row.get("mIoU_drop") is not None else None)
    doc["summary"] = {k: {"agreement_pct": round(r["agreement_pct"], 4),
                          "vs_fp32_backend_pct": None if r.get("vs_fp32_backend_pct") is None
                          else round(r["vs_fp32_backend_pct"], 4),
                          "mIoU_vs_reference": r["mIoU_vs_reference"],
                          "mIoU_drop": r.get("mIoU_drop"),
                          "mIoU_vs_fp32_backend": r.get("mIoU_vs_fp32_backend"),
                          "max_abs_logit_diff": r.get("max_abs_logit_diff"),
                          "meets_agreement_target": r["meets_agreement_target"],
                          "meets_miou_target": r["meets_miou_target"]}
                      for k, r in doc["results"].items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True,
                   help="model directory (logits head), from make_model.py or pspnet build")
    p.add_argument("--labels-model", type=Path, default=None,
                   help="the same model with the labels head (argmax on the device), if "
                        "that is what the bench runs")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--precisions", default="fp32,fp16,bf16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=64,
                   help="sample photos first, then crops of them up to this count")
    p.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--chunk", type=int, default=8, help="reference batch")
    p.add_argument("--target", type=float, default=TARGET_PCT,
                   help="label agreement target, percent")
    p.add_argument("--miou-target", type=float, default=0.1,
                   help="largest mIoU drop against fp32, points")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from pspnet.model.manifest import Manifest

    options = dict(o.split("=", 1) for o in args.backend_option)
    manifest = Manifest.read(args.model)
    size = tuple(manifest.input_size)
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if "fp32" in precisions:                         # the backend's own fp32 first
        precisions.remove("fp32")
        precisions.insert(0, "fp32")
    doc: dict = {"model": str(args.model), "labels_model": str(args.labels_model or ""),
                 "device": args.device, "batch_size": args.batch_size,
                 "backend_options": options, "target_pct": args.target,
                 "miou_target_points": args.miou_target,
                 "torch": torch.__version__,
                 "accelerator": torch.cuda.get_device_name(0)
                 if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu",
                 "backend_fp32_tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                                       "matmul": torch.backends.cuda.matmul.allow_tf32},
                 "results": {}, "errors": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="agreement-") as tmp:
        names, photos = load_photos(args.images, Path(tmp))
    images, boxes, places = letterboxed(photos, size)
    doc["inputs"] = {"count": len(photos), "sample_photos": sum(not n[0].isdigit()
                                                                for n in names),
                     "input_size": list(size)}
    say(f"{len(photos)} images letterboxed to {size[0]}x{size[1]}; reference on {args.device}")
    ref_logits, doc["reference"] = reference_logits(args.model, manifest, images, boxes,
                                                    args.device, args.chunk)
    ref_labels = to_labels("logits", ref_logits, places, size)
    heads = [("logits", args.model)]
    if args.labels_model is not None:
        heads.append(("labels", args.labels_model))
    fp32_labels: dict[str, list[np.ndarray]] = {}
    finish(doc, args.target, args.json, args.miou_target)
    for head, model_dir in heads:
        for precision in precisions:
            key = f"{head}/{precision}"
            try:
                out, info = run_backend(model_dir, args.batch_size, args.device, precision,
                                        options, images, boxes)
                labels = to_labels(head, out, places, size)
                row = {**info, **compare(labels, ref_labels, manifest.num_classes)}
                if head == "logits":
                    diff = np.abs(out.astype(np.float32) - ref_logits)
                    row["max_abs_logit_diff"] = float(diff.max())
                    row["mean_abs_logit_diff"] = float(diff.mean())
                if precision == "fp32":
                    fp32_labels[head] = labels
                elif head in fp32_labels:
                    vs = compare(labels, fp32_labels[head], manifest.num_classes)
                    row["vs_fp32_backend_pct"] = vs["agreement_pct"]
                    row["mIoU_vs_fp32_backend"] = vs["mIoU_vs_reference"]
                doc["results"][key] = row
                say(f"{key}: agreement {row['agreement_pct']:.3f}% (worst image "
                    f"{row['min_image_pct']:.2f}%), mIoU vs reference "
                    f"{row['mIoU_vs_reference']:.2f}"
                    + (f", max |logit diff| {row['max_abs_logit_diff']:.3g}"
                       if "max_abs_logit_diff" in row else ""))
            except Exception as exc:  # noqa: BLE001 - record and go on to the next one
                failed = True
                doc["errors"][key] = f"{type(exc).__name__}: {exc}"
                say(f"{key}: FAILED {type(exc).__name__}: {exc}")
                traceback.print_exc()
            finish(doc, args.target, args.json, args.miou_target)
    finish(doc, args.target, args.json, args.miou_target)
    print(json.dumps({"agreement": doc["summary"], "errors": doc["errors"]}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
