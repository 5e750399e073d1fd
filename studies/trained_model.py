"""On trained weights: fp16 against fp32, and the daemon's letterbox against a plain resize.

Why: calibrated weights have tiny logit margins, so the GPU path's fp16 bound (mIoU
within 0.1 points of fp32) could not be judged on them; the shipped DeepLabV3-MobileNetV2
is trained. And it was trained on plain resizes (the TFLite takes the whole photo resized
to 257x257), while the daemon letterboxes: how much does that change on the bird photo,
whose reference label map came with it?

    python -m studies.trained_model --model MODEL_DIR --json bench/results/FILE.json

MODEL_DIR: `pspnet build` of the shipped config and checkpoint (the demo's demo-out/model).
Every photo (the bundled samples and the bird) is letterboxed by the daemon's own function,
run through ServingModel around the model directory's torch program (what the torch
backend runs) in fp32 and in fp16 (the whole network in half precision, torch on this
CPU; a GPU's fp16 kernels round differently, but the storage precision is the same), and
turned into labels at the photo's size by the postprocess workers' function. Figures:
fp16's pixel agreement with fp32, mIoU of fp16 against fp32 (100 = the same labels; its
shortfall is the README's 'mIoU drop' on a stand-in truth), and on the bird, mIoU and pixel
agreement against its reference map at each precision. The letterbox comparison runs the
bird in fp32 both ways (letterboxed; resized whole, then the labels resized back with
nearest, as the TFLite is used).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MIOU_TARGET_POINTS = 0.1


def say(message: str) -> None:
    sys.stderr.write(f"[trained] {message}\n")
    sys.stderr.flush()


def photos() -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """The bundled sample photos, then the bird; and the bird's reference map."""
    from pspnet.build_model.samples import sample_images
    from pspnet.build_model.trained import BIRD_PHOTO, bird

    photo, reference = bird()
    return [*sample_images(), (BIRD_PHOTO.name, photo)], reference


def serving(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from pspnet.model.manifest import Manifest
    from pspnet.model.serving_model import ServingModel

    manifest = Manifest.read(model_dir)
    core = torch.export.load(str(model_dir / manifest.torch_program)).module()
    if dtype != torch.float32:
        core = core.to(dtype)
    return ServingModel(core, manifest.mean, manifest.std, "logits", compute_dtype=dtype,
                        align_corners=manifest.align_corners)


def letterboxed_labels(model: torch.nn.Module, manifest: Any, rgb: np.ndarray,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(labels at the photo's size, the network's logits): the daemon's path."""
    from pspnet.model.image_io import letterbox
    from pspnet.model.labels import labels_from_logits

    padded, place = letterbox(rgb, manifest.input_size)
    with torch.inference_mode():
        logits = model(torch.from_numpy(padded)[None],
                       torch.tensor([place.box()], dtype=torch.int32))[0].numpy()
    return labels_from_logits(logits, place, manifest.input_size,
                              manifest.align_corners), logits


def resized_labels(model: torch.nn.Module, manifest: Any, rgb: np.ndarray) -> np.ndarray:
    """The TFLite's way: the whole photo resized to the input size (no padding), logits
    resized to it with align_corners, argmax, labels resized back with nearest."""
    import cv2

    h, w = manifest.input_size
    small = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    with torch.inference_mode():
        logits = model(torch.from_numpy(small)[None],
                       torch.tensor([[0, 0, h, w]], dtype=torch.int32))
        up = F.interpolate(logits, size=(h, w), mode="bilinear",
                           align_corners=manifest.align_corners)
    labels = up.argmax(1)[0].to(torch.uint8).numpy()
    return cv2.resize(labels, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)


def scores(pred: list[np.ndarray], truth: list[np.ndarray], num_classes: int) -> dict:
    """Pixel agreement (percent, 255 ignored) and mmseg's mIoU of `pred` against `truth`."""
    from pspnet.model.labels import intersect_and_union
    from pspnet.model.metrics import IoUAccumulator

    metrics = IoUAccumulator(num_classes)
    same = total = 0
    for p, t in zip(pred, truth, strict=True):
        scored = t != 255
        same += int((p == t)[scored].sum())
        total += int(scored.sum())
        metrics.add(intersect_and_union(p, t, num_classes))
    summary = metrics.summary()
    present = metrics.areas[1] > 0               # union: in either map
    per_class = {int(k): {"IoU": summary["per_class"][k]["IoU"],
                          "truth_pixels": int(metrics.areas[3][k]),
                          "pred_pixels": int(metrics.areas[2][k])}
                 for k in np.flatnonzero(present)}
    return {"agreement_pct": 100.0 * same / total, "mIoU": summary["mIoU"],
            "pixels": total, "per_class": per_class}


def margins(logits: list[np.ndarray]) -> dict[str, float]:
    """Quantiles of the top-2 logit margin at the network's resolution (fp32)."""
    values = np.concatenate([np.diff(np.sort(x, axis=0)[-2:], axis=0).ravel()
                             for x in logits])
    return {q: float(np.quantile(values, float(q))) for q in ("0.001", "0.01", "0.5")}


def measure(model_dir: Path) -> dict[str, Any]:
    from pspnet.model.manifest import Manifest

    manifest = Manifest.read(model_dir)
    classes = manifest.num_classes
    shots, reference = photos()
    names = [name for name, _ in shots]
    labels: dict[str, list[np.ndarray]] = {}
    logits32 = []
    seconds = {}
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        model = serving(model_dir, dtype)
        started = time.perf_counter()
        labels[precision] = []
        for _, rgb in shots:
            lab, logits = letterboxed_labels(model, manifest, rgb)
            labels[precision].append(lab)
            if precision == "fp32":
                logits32.append(logits)
        seconds[precision] = round(time.perf_counter() - started, 1)
        say(f"{precision}: {len(shots)} photos in {seconds[precision]} s")
    per_photo = {name: scores([b], [a], classes)["agreement_pct"]
                 for name, a, b in zip(names, labels["fp32"], labels["fp16"], strict=True)}
    vs_fp32 = scores(labels["fp16"], labels["fp32"], classes)
    bird = {p: scores([labels[p][-1]], [reference], classes) for p in ("fp32", "fp16")}
    resized = scores([resized_labels(serving(model_dir, torch.float32), manifest,
                                     shots[-1][1])], [reference], classes)
    fp16 = {
        "agreement_with_fp32_pct": vs_fp32["agreement_pct"],
        "worst_photo_agreement_pct": min(per_photo.values()),
        "mIoU_vs_fp32": vs_fp32["mIoU"],
        "mIoU_drop_vs_fp32_points": 100.0 - vs_fp32["mIoU"],
        "per_class_vs_fp32": {manifest.class_names[k]: v
                              for k, v in vs_fp32["per_class"].items()},
        "bird_mIoU_vs_reference": {p: bird[p]["mIoU"] for p in bird},
        "bird_agreement_with_reference_pct": {p: bird[p]["agreement_pct"] for p in bird},
        "bird_mIoU_difference_points": bird["fp32"]["mIoU"] - bird["fp16"]["mIoU"],
        "per_photo_agreement_pct": per_photo,
    }
    # against a real reference (the bird) and against the stand-in truth (fp32's labels:
    # every flip counts against fp16, and a class of a few pixels weighs as much as one
    # of a million in the mean)
    fp16["within_target"] = {
        "bird_vs_its_reference": abs(fp16["bird_mIoU_difference_points"])
        <= MIOU_TARGET_POINTS,
        "all_photos_vs_fp32_labels": fp16["mIoU_drop_vs_fp32_points"] <= MIOU_TARGET_POINTS,
    }
    return {
        "model": str(model_dir), "network": manifest.network_name,
        "input_size": list(manifest.input_size), "photos": names,
        "torch": torch.__version__, "device": "cpu", "seconds": seconds,
        "fp32_logit_margin_quantiles": margins(logits32),
        "fp16": fp16, "miou_target_points": MIOU_TARGET_POINTS,
        "bird_vs_reference_fp32": {
            "letterboxed (the daemon)": bird["fp32"],
            "resized whole (the TFLite's use)": resized,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, metavar="DIR",
                   help="a pspnet build of the shipped DeepLabV3 config (with its torch "
                        "program), e.g. demo-out/model")
    p.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = p.parse_args(argv)
    doc = measure(args.model)
    text = json.dumps(doc, indent=1)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
