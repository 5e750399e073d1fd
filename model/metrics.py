"""mIoU from per-image areas: mmseg 1.2.2's IoUMetric sums, metrics and table, numpy only.

Apart from model/labels.py (which makes the areas, with torch and cv2 at hand) so that the
front, which only sums what the postprocess workers send, imports neither.

The metrics are mmseg's (0/0 -> NaN, NaN-mean over classes). One knowing difference: mmseg
sums the per-image float32 histograms in float32, so a split total above 2**24 pixels
(VOC's background) is rounded; here the sums are exact int64 and the ratios float64 (the
two agree to ~1e-6 relative on VOC val).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class IoUAccumulator:
    """Sums per-image areas (int64, exact) and turns them into mmseg's metrics."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        self.num_classes = num_classes
        self.areas = np.zeros((4, num_classes), np.int64)
        self.images = 0

    def add(self, areas: np.ndarray) -> None:
        """Add one image's 4 x C areas (from `pspnet.model.labels.intersect_and_union`)."""
        areas = np.asarray(areas)
        if areas.shape != self.areas.shape or areas.dtype.kind not in "iu":
            raise ValueError(f"areas must be integer 4 x {self.num_classes}, got "
                             f"{areas.dtype} {areas.shape}")
        self.areas += areas
        self.images += 1

    def add_many(self, areas: Sequence[np.ndarray]) -> None:
        """Add several images' 4 x C areas at once (one sum: the front adds a message's)."""
        total = np.sum(areas, axis=0) if len(areas) > 1 else np.asarray(areas[0])
        if total.shape != self.areas.shape or total.dtype.kind not in "iu":
            raise ValueError(f"areas must be integer 4 x {self.num_classes}, got "
                             f"{total.dtype} {total.shape}")
        self.areas += total
        self.images += len(areas)

    def merge(self, other: IoUAccumulator) -> None:
        """Fold in another accumulator (e.g. one per postprocess worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge accumulators with different class counts")
        self.areas += other.areas
        self.images += other.images

    def per_class(self) -> tuple[np.ndarray, np.ndarray]:
        """(IoU, Acc) per class as fractions; NaN where the class is absent (0/0)."""
        inter, union, _, label = self.areas.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return inter / union, inter / label

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """aAcc, mIoU, mAcc in percent (unrounded) and per-class IoU/Acc (percent, NaN kept).

        NaN-means as mmseg: a class absent from both prediction and ground truth has no IoU
        and does not count; a class predicted but absent from the ground truth has IoU 0
        and no Acc. All-NaN (nothing scored) gives NaN, without a warning.
        """
        iou, acc = self.per_class()
        inter, _, _, label = self.areas
        total = int(label.sum())
        names = list(class_names) if class_names is not None else list(
            range(self.num_classes))
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        return {
            "aAcc": float(inter.sum() / total * 100) if total else float("nan"),
            "mIoU": _nanmean(iou) * 100,
            "mAcc": _nanmean(acc) * 100,
            "images": self.images,
            "per_class": [{"class": n, "IoU": float(i * 100), "Acc": float(a * 100)}
                          for n, i, a in zip(names, iou, acc, strict=True)],
        }

    def table(self, class_names: Sequence[str]) -> str:
        """mmseg's per-class table (Class | IoU | Acc, 2 decimals), then aAcc/mIoU/mAcc."""
        s = self.summary(class_names)
        rows = [[str(c["class"]), _fmt(c["IoU"]), _fmt(c["Acc"])] for c in s["per_class"]]
        lines = _pretty_table(["Class", "IoU", "Acc"], rows)
        return (f"per class results:\n{lines}\n"
                f"aAcc: {_fmt(s['aAcc'])}  mIoU: {_fmt(s['mIoU'])}  mAcc: {_fmt(s['mAcc'])}")


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _fmt(value: float) -> str:
    """A value as mmseg prints it: np.round(x, 2), shown with Python's repr (97.0, nan)."""
    return str(float(np.round(value, 2)))


def _pretty_table(header: list[str], rows: list[list[str]]) -> str:
    """PrettyTable's default layout (centred, one space of padding), without the package."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def centre(text: str, width: int) -> str:
        # PrettyTable centres with wcwidth.center, which splits odd padding like str.center.
        return " " + text.center(width) + " "

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [rule, "|" + "|".join(centre(h, w) for h, w in zip(header, widths, strict=True))
           + "|", rule]
    out += ["|" + "|".join(centre(c, w) for c, w in zip(r, widths, strict=True)) + "|"
            for r in rows]
    out.append(rule)
    return "\n".join(out)
