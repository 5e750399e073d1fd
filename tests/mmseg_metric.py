"""mmseg 1.2.2's own IoUMetric on mask files: the yardstick the pipeline's mIoU must meet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pspnet.model.labels import read_ground_truth


def mmseg_iou(masks: list[Path], truths: list[Path], exact_sums: bool = False) -> dict:
    """Unrounded, in percent (IoUMetric.compute_metrics would round to 0.01).

    mmseg sums the per-image areas in float32; `exact_sums` sums its areas in float64.
    """
    from pspnet.build_model.mmseg_shim import install

    install()
    import torch
    from mmseg.evaluation.metrics import IoUMetric

    areas = []
    for mask, truth in zip(masks, truths, strict=True):
        pred = torch.from_numpy(np.asarray(Image.open(mask)).astype(np.int64))
        label = torch.from_numpy(read_ground_truth(truth).astype(np.int64))
        areas.append(IoUMetric.intersect_and_union(pred, label, 21, 255))
    if exact_sums:
        areas = [[t.double() for t in a] for a in areas]
    totals = [sum(a[k] for a in areas) for k in range(4)]
    m = IoUMetric.total_area_to_metrics(*totals, ["mIoU"])
    return {"aAcc": float(m["aAcc"]) * 100, "mIoU": float(np.nanmean(m["IoU"])) * 100,
            "mAcc": float(np.nanmean(m["Acc"])) * 100, "IoU": np.asarray(m["IoU"]) * 100}
