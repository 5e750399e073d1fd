"""What a bench feeds: JPEG paths (and ground truths where there are some).

Why photo-like synthetic inputs rather than noise: JPEG decode time depends on content
(noise compresses badly and decodes slowly), and VOC-like sizes (longest side 500, varied
aspect) make the letterbox and the postprocess resize cost what they cost on VOC.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pspnet.core.config import IMAGE_SUFFIXES
from pspnet.core.files import name_problem

VOC_LONG_SIDE = 500
CEILING_LONG_SIDE = 32     # bench --front-ceiling: photos that cost the workers little
SYNTHETIC_CLASSES = 21


@dataclass(frozen=True)
class BenchInputs:
    paths: list[Path]
    truths: list[Path | None]
    kind: str                  # "images" | "voc" | "synthetic"
    note: str = ""

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "count": len(self.paths),
                "with_ground_truth": sum(t is not None for t in self.truths),
                "note": self.note}


def from_images_dir(folder: Path) -> BenchInputs:
    """Every image file directly in `folder`, sorted by name; no ground truth."""
    paths = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    unnamed = [p for p in paths if name_problem(p) is not None]
    if unnamed:
        raise ValueError(f"{name_problem(unnamed[0])} ({len(unnamed)} such in {folder})")
    if not paths:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return BenchInputs(paths, [None] * len(paths), "images", str(folder))


def from_voc(root: Path, split: str) -> BenchInputs:
    """The split's images that exist, with their ground truths (mIoU is then real)."""
    from pspnet.batch.voc import read_split

    voc = read_split(root, split)
    if not voc.items:
        raise ValueError(f"{root}: no image of {split}.txt exists")
    return BenchInputs(voc.images, voc.truths, "voc", f"{root} {split}")


def synthetic(count: int, folder: Path, seed: int = 0,
              long_side: int = VOC_LONG_SIDE) -> BenchInputs:
    """`count` JPEGs cut from the package's sample photos, longest side `long_side` (VOC's
    500 by default), with stand-in ground truths (coarse blocks with 255 borders) so the
    mIoU step costs what it costs; the mIoU itself means nothing."""
    import cv2

    from pspnet.build_model.samples import sample_images
    from pspnet.model.manifest import voc_palette
    from pspnet.model.masks import write_mask

    if count < 1:
        raise ValueError("--synthetic needs at least 1 image")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photos = sample_images()
    rng = np.random.default_rng(seed)
    palette = voc_palette()
    paths: list[Path] = []
    truths: list[Path | None] = []
    for i in range(count):
        name, rgb = photos[i % len(photos)]
        h, w = rgb.shape[:2]
        ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = rgb[top:top + ch, left:left + cw]
        scale = long_side / max(ch, cw)
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        path = folder / f"{i:05d}_{Path(name).stem}.jpg"
        cv2.imwrite(str(path), crop[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        truth = folder / f"{i:05d}_{Path(name).stem}_gt.png"
        write_mask(_blocks(crop.shape[:2], rng), truth, palette)
        paths.append(path)
        truths.append(truth)
    sizes = "VOC sizes" if long_side == VOC_LONG_SIDE else f"longest side {long_side}"
    return BenchInputs(paths, truths, "synthetic",
                       f"crops of build_model/sample_images at {sizes}; stand-in ground "
                       "truth (mIoU is meaningless, its cost is real)")


def _blocks(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    grid = rng.integers(0, SYNTHETIC_CLASSES, (4, 4)).astype(np.uint8)
    h, w = shape
    labels = grid[np.arange(h) * 4 // h][:, np.arange(w) * 4 // w]
    labels[np.arange(h) % max(1, h // 4) == 0] = 255
    return np.ascontiguousarray(labels)
