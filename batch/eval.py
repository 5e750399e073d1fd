"""`pspnet eval`: every image of a VOC split through the daemon's pipeline, mmseg's table out.

Why through the pipeline (and not a separate evaluation loop): the number it prints is then
the accuracy of exactly what the daemon serves, preprocessing and postprocessing included.
In-process it starts the same stage processes as `pspnet serve`; the areas come back with
each answer and are summed exactly (pspnet.model.labels). With `--endpoint` it feeds a running
daemon instead; that daemon keeps a running mIoU of everything it has seen (other clients
included), so this process scores the returned mask PNGs against the ground truth itself.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pspnet.batch.progress import Progress
from pspnet.batch.voc import VocSplit
from pspnet.core.config import PipelineConfig
from pspnet.model.labels import GroundTruthError, intersect_and_union, read_ground_truth
from pspnet.model.manifest import Manifest
from pspnet.model.masks import mask_path
from pspnet.model.metrics import IoUAccumulator


@dataclass
class EvalOutcome:
    metrics: IoUAccumulator
    failed: list[dict[str, str]] = field(default_factory=list)   # {id, path, reason}
    masks: dict[str, str] = field(default_factory=dict)          # image id -> mask file
    segmented: int = 0                                            # answered with a mask
    models: dict[str, int] = field(default_factory=dict)  # via a daemon: version -> masks
    elapsed_s: float = 0.0


def evaluate_in_process(cfg: PipelineConfig, split: VocSplit,
                        progress: Progress | None = None) -> EvalOutcome:
    """Start the pipeline, run the split through it, keep its exact area sums."""
    from pspnet.daemon.front import Front, requests_for

    manifest = Manifest.read(cfg.model_dir)
    outcome = EvalOutcome(IoUAccumulator(manifest.num_classes))
    with Front(cfg) as pipe:
        started = time.monotonic()
        if progress is not None:
            progress.restart()                 # the rate counts from here, not start-up
        for result in pipe.run(requests_for(split.images, split.truths)):
            item = split.items[int(result.id)]
            if result.status == "ok":
                outcome.segmented += 1
                if result.mask:
                    outcome.masks[item.id] = result.mask
            else:
                truth_failed = "ground truth" in (result.error or "")
                outcome.segmented += truth_failed     # the mask was made, as via --endpoint
                blame = item.truth if truth_failed else item.image
                outcome.failed.append({"id": item.id, "path": str(blame),
                                       "reason": f"{result.stage}: {result.error}"})
            if progress is not None:
                progress.update(failed=int(result.status != "ok"))
        outcome.elapsed_s = time.monotonic() - started
        outcome.metrics.merge(pipe.metrics)
    return outcome


def evaluate_endpoint(endpoint: str, split: VocSplit, manifest: Manifest,
                      out_dir: Path | None, progress: Progress | None = None) -> EvalOutcome:
    """Submit to a running daemon (which must write masks: `serve --out`), score here."""
    from pspnet.daemon.client import Client

    outcome = EvalOutcome(IoUAccumulator(manifest.num_classes))
    by_path = {str(item.image.absolute()): item for item in split.items}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with Client(endpoint) as client:
        for answer in client.submit(split.images):
            item = by_path[answer.path]
            if answer.model:           # a live reload midway: which model made how many
                outcome.models[answer.model] = outcome.models.get(answer.model, 0) + 1
            problem = _score_answer(answer, item, manifest, out_dir, outcome)
            if problem is not None:
                outcome.failed.append({"id": item.id, "path": problem[0],
                                       "reason": problem[1]})
            if progress is not None:
                progress.update(failed=int(problem is not None))
    outcome.elapsed_s = time.monotonic() - started
    return outcome


def _score_answer(answer: Any, item: Any, manifest: Manifest, out_dir: Path | None,
                  outcome: EvalOutcome) -> tuple[str, str] | None:
    """Add one answer's areas; (path, reason) when it cannot be scored."""
    if answer.status != "ok":
        return str(item.image), f"daemon: {answer.error}"
    if not answer.mask:
        return str(item.image), "the daemon wrote no mask (start it with `pspnet serve --out`)"
    mask_file = Path(answer.mask)
    try:
        if out_dir is not None:
            target = mask_path(out_dir, item.image)       # the daemon's own rule
            if target.resolve() != mask_file.resolve():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(mask_file, target)
            mask_file = target
        outcome.masks[item.id] = str(mask_file)
        outcome.segmented += 1
        if item.truth is None:
            return None                              # listed as missing already
        with Image.open(mask_file) as im:
            if im.mode not in ("P", "L"):
                return str(mask_file), f"mask is a {im.mode} image, expected class ids"
            pred = np.asarray(im, dtype=np.uint8)
        truth = read_ground_truth(item.truth)
        outcome.metrics.add(intersect_and_union(pred, truth, manifest.num_classes))
    except GroundTruthError as exc:
        return str(item.truth), str(exc)
    except (OSError, ValueError) as exc:
        return str(mask_file), f"cannot read or copy the mask: {exc}"
    return None


def report(outcome: EvalOutcome, split: VocSplit, manifest: Manifest,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document: mmseg's numbers (percent, unrounded) and what was left out."""
    summary = outcome.metrics.summary(manifest.class_names)
    images = len(split.items)
    return {
        "mIoU": summary["mIoU"], "aAcc": summary["aAcc"], "mAcc": summary["mAcc"],
        "per_class": summary["per_class"],
        "images": summary["images"],                   # scored
        "listed": split.listed,
        "segmented": outcome.segmented,
        "failed": sorted(split.missing + outcome.failed, key=lambda f: f["id"]),
        "root": str(split.root), "split": split.split,
        "elapsed_s": round(outcome.elapsed_s, 3),
        "images_per_s": round(images / outcome.elapsed_s, 2) if outcome.elapsed_s else None,
        **({"models": dict(outcome.models)} if outcome.models else {}),
        **(extra or {}),
    }


def print_report(outcome: EvalOutcome, doc: dict[str, Any], manifest: Manifest,
                 truths: int | None = None) -> None:
    """mmseg's table and summary line on stdout, then what could not be scored; with no
    ground truth at all (a folder of photos), what was written instead of a table of nan."""
    out = sys.stdout
    if truths == 0:                        # `truths`: images given with a ground truth
        print_written(doc)
        return
    out.write(outcome.metrics.table(manifest.class_names) + "\n")
    given = f"listed in {doc['split']}.txt" if doc["split"] else f"given ({doc['root']})"
    out.write(f"scored {doc['images']} of {doc['listed']} images {given}, "
              f"{doc['segmented']} segmented ({doc['images_per_s'] or 0:.1f} img/s)\n")
    if len(doc.get("models", {})) > 1:     # the daemon's model was reloaded midway
        out.write("masks per model version: " + ", ".join(
            f"{version} {n}" for version, n in doc["models"].items()) + "\n")
    if doc["failed"]:
        out.write(f"not scored ({len(doc['failed'])}):\n")
        for item in doc["failed"]:
            out.write(f"  {item['id']}: {item['reason']} [{item['path']}]\n")
    out.flush()


def print_written(doc: dict[str, Any]) -> None:
    """No ground truth: how many masks were written where, how fast, and what failed."""
    out = sys.stdout
    where = f" in {doc['masks']}" if doc.get("masks") else " (no --out: none written)"
    failed = doc["failed"]
    out.write(f"segmented {doc['segmented']} of {doc['listed']} images "
              f"({doc['images_per_s'] or 0:.1f} img/s), masks{where}; {len(failed)} failed; "
              "no ground truth given, so no mIoU\n")
    for item in failed:
        out.write(f"  {item['id']}: {item['reason']} [{item['path']}]\n")
    out.flush()


def write_pictures(outcome: EvalOutcome, split: VocSplit, manifest: Manifest,
                   doc: dict[str, Any], report_dir: Path, max_images: int) -> list[Path]:
    """`--report`: the overlay contact sheet of the first images with a mask, and the
    per-class IoU bar chart. Returns the files written."""
    from pspnet.batch.report import Row, contact_sheet, iou_bar_chart, top_classes_line
    from pspnet.model.image_io import ImageError, decode_image

    rows = []
    for item in split.items:
        mask = outcome.masks.get(item.id)
        if mask is None:
            continue
        try:
            photo = decode_image(item.image)
            with Image.open(mask) as im:
                labels = np.asarray(im, dtype=np.uint8)
        except (ImageError, OSError, ValueError):
            continue                              # listed as failed already, or gone since
        note = top_classes_line(labels, manifest.class_names)
        if item.truth is not None:
            try:
                truth = read_ground_truth(item.truth)
                scored = truth != 255
                if truth.shape == labels.shape and scored.any():
                    agree = 100.0 * float((labels == truth)[scored].mean())
                    note = f"{agree:.1f} % of pixels as the ground truth; {note}"
            except GroundTruthError:
                pass
        rows.append(Row(title=item.id, photo=photo, labels=labels, note=note))
        if len(rows) >= max_images:
            break
    written = []
    if rows:
        written.append(contact_sheet(
            rows, manifest.class_names, manifest.palette, report_dir / "overlays.png",
            title=f"{manifest.network_name}: {len(rows)} of {len(outcome.masks)} masks "
                  f"({split.split})"))
    written.append(iou_bar_chart(
        doc["per_class"], report_dir / "per-class-iou.png",
        title=f"{manifest.network_name}: mIoU {doc['mIoU']:.2f} on {doc['images']} images "
              f"({split.split})"))
    return written


def write_json(path: Path, doc: dict[str, Any]) -> None:
    from pspnet.core.logs import json_safe

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(doc), indent=2) + "\n")
