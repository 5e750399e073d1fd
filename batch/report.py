"""Pictures of masks for people: an overlay contact sheet and a per-class IoU bar chart.

Why: a mIoU figure says how much, not what; a person sees at a glance whether the
astronaut came out as a person. `pspnet demo` and `pspnet eval --report` write both.
Each row of the sheet: the photo, the photo with its mask blended on it (class colours
from the manifest's palette; background left as the photo), and a legend of the classes
in that mask with their share of the image (every class the mask holds, however small:
the sheet outlines each region, so each outline has its name).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pspnet.model.labels import class_pixels

BLEND_ALPHA = 0.6               # mask colour over the photo
EDGE_RGB = (255, 255, 255)      # outline of every region: VOC's darker colours (cat is
                                # 64, 0, 0) barely show over a photo without it
MIN_LINE_PCT = 0.1              # top_classes_line leaves out classes below this share
ROW_HEIGHT_IN = 2.6
SHEET_DPI = 100                 # 1,200 px wide
LEGEND_FONT = 10                # up to LEGEND_ROWS classes; smaller type past that, then
LEGEND_ROWS = 8                 # two columns: every class of a mask is in its legend


@dataclass(frozen=True)
class Row:
    title: str
    photo: np.ndarray            # H x W x 3 uint8 RGB
    labels: np.ndarray           # H x W uint8 class ids (255 = ignore)
    note: str = ""               # a line under the title (e.g. agreement with a reference)


def class_shares(labels: np.ndarray, num_classes: int) -> list[tuple[int, float]]:
    """(class id, percent of the pixels), largest first; ignore (255) not counted."""
    counts = class_pixels(labels)[:num_classes]      # the count the daemon's answers carry
    total = counts.sum()
    if not total:
        return []
    order = np.argsort(-counts, kind="stable")
    return [(int(k), 100.0 * counts[k] / total) for k in order if counts[k]]


def top_classes_line(labels: np.ndarray, class_names: Sequence[str], count: int = 3) -> str:
    """'person 47.2 %, background 52.8 %': the largest objects of a mask (at most `count`
    classes other than class 0), then the background (class 0)."""
    return ", ".join(f"{class_names[k]} {pct:.1f} %" for k, pct in
                     objects_first(labels, len(class_names), count, MIN_LINE_PCT))


def objects_first(labels: np.ndarray, num_classes: int, count: int,
                  min_pct: float) -> list[tuple[int, float]]:
    """The largest `count` classes other than 0 with at least `min_pct` of the pixels,
    then class 0 (background) if present."""
    shares = [(k, pct) for k, pct in class_shares(labels, num_classes) if pct >= min_pct]
    return [s for s in shares if s[0] != 0][:count] + [s for s in shares if s[0] == 0]


def legend_entries(labels: np.ndarray, class_names: Sequence[str],
                   ) -> list[tuple[int, str]]:
    """(class id, 'name  share') for every class in the mask: objects largest first, then
    the background; a share under 0.05 % reads '<0.1 %', not '0.0 %'."""
    shares = objects_first(labels, len(class_names), len(class_names), 0.0)
    return [(k, f"{class_names[k]}  " + (f"{pct:.1f} %" if pct >= 0.05 else "<0.1 %")
             + ("  (not painted)" if k == 0 else "")) for k, pct in shares]


def blend(photo: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]],
          alpha: float = BLEND_ALPHA) -> np.ndarray:
    """The photo with each non-background class painted over it at `alpha`."""
    if photo.shape[:2] != labels.shape:
        raise ValueError(f"photo {photo.shape[:2]} and mask {labels.shape} differ in size")
    colours = np.zeros((256, 3), np.float32)
    colours[:len(palette)] = np.asarray(palette, np.float32)[:256]
    painted = (labels > 0) & (labels < 255)
    out = photo.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * colours[labels[painted]]
    out[edges(labels)] = EDGE_RGB
    return out.round().clip(0, 255).astype(np.uint8)


def edges(labels: np.ndarray) -> np.ndarray:
    """Boolean H x W: pixels whose label differs from a neighbour's (2 px wide lines)."""
    edge = np.zeros(labels.shape, bool)
    vertical = labels[1:, :] != labels[:-1, :]
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def contact_sheet(rows: Sequence[Row], class_names: Sequence[str],
                  palette: Sequence[Sequence[int]], path: Path, title: str = "") -> Path:
    """One PNG: per row the photo, the blended mask and its legend."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("no images for the contact sheet")
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, ROW_HEIGHT_IN * len(rows) + 0.6),
                             gridspec_kw={"width_ratios": [1, 1, 0.75]}, squeeze=False)
    for (photo_ax, mask_ax, legend_ax), row in zip(axes, rows, strict=True):
        photo_ax.imshow(row.photo)
        photo_ax.set_title(row.title, fontsize=9, loc="left")
        mask_ax.imshow(blend(row.photo, row.labels, palette))
        mask_ax.set_title(row.note or "mask over the photo", fontsize=9, loc="left")
        entries = legend_entries(row.labels, class_names)
        handles = [Patch(facecolor=np.asarray(palette[k]) / 255.0, edgecolor="black",
                         label=text) for k, text in entries]
        many = len(handles) > LEGEND_ROWS
        legend_ax.legend(handles=handles, loc="center left", frameon=False,
                         fontsize=LEGEND_FONT - 2 * many, ncol=1 + (len(handles) > 2 *
                                                                   LEGEND_ROWS))
        for ax in (photo_ax, mask_ax, legend_ax):
            ax.set_axis_off()
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=12)
        top = 1.0 - 0.45 / fig.get_figheight()          # room for the title
    fig.tight_layout(rect=(0, 0, 1, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=SHEET_DPI)
    plt.close(fig)
    return path


def iou_bar_chart(per_class: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Horizontal bars of IoU per class (percent); classes without an IoU are marked."""
    plt = _pyplot()
    names = [str(c["class"]) for c in per_class]
    values = [c.get("IoU") for c in per_class]
    known = [v is not None and not math.isnan(v) for v in values]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2), dpi=100)
    y = np.arange(len(names))
    ax.barh(y, [v if ok else 0.0 for v, ok in zip(values, known, strict=True)],
            color="tab:blue")
    for i, (v, ok) in enumerate(zip(values, known, strict=True)):
        ax.text((v if ok else 0.0) + 1, i, f"{v:.1f}" if ok else "not in the images",
                va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("IoU (%)")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
