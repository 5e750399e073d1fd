"""Write a small VOC-layout folder: real photos, palette ground truths, a split file.

Why ground truth from a model's own prediction: with `predict` = the mmseg reference, the
mIoU printed by `pspnet eval` measures how faithfully the daemon reproduces mmseg; VOC-like
255 borders and a few relabelled blocks keep it away from a trivial 100. The default
`predict` is a colour quantiser, enough for plumbing tests with any model.

    ROOT/JPEGImages/<id>.jpg  ROOT/SegmentationClass/<id>.png  ROOT/ImageSets/Segmentation/val.txt
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pspnet.model.manifest import voc_palette

Predict = Callable[[np.ndarray], np.ndarray]      # RGB uint8 H x W x 3 -> uint8 H x W


@dataclass
class VocFolder:
    root: Path
    split: str
    ids: list[str]                                # as listed in the split file
    images: dict[str, Path] = field(default_factory=dict)       # ids whose image exists
    truths: dict[str, Path] = field(default_factory=dict)       # ids whose GT file exists
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)
    missing_truths: list[str] = field(default_factory=list)
    broken_truths: list[str] = field(default_factory=list)      # file there, unreadable

    @property
    def scorable(self) -> list[str]:
        """Ids with an image and a readable ground truth, in split order."""
        return [i for i in self.ids if i in self.images and i in self.truths
                and i not in self.broken_truths]


def colour_classes(rgb: np.ndarray) -> np.ndarray:
    """A cheap stand-in segmentation: 1 + a 3-bit colour code, dark pixels background."""
    bits = (rgb > 127).astype(np.uint8)
    labels = 1 + bits[..., 0] + 2 * bits[..., 1] + 4 * bits[..., 2]
    labels[rgb.max(axis=2) < 48] = 0
    return labels.astype(np.uint8)


def make_voc_folder(
    root: Path,
    predict: Predict | None = None,
    photos: Sequence[tuple[str, np.ndarray]] | None = None,
    split: str = "val",
    missing_image: bool = False,
    missing_truth: bool = False,
    broken_truth: bool = False,
    seed: int = 3,
) -> VocFolder:
    """Write the folder; the optional flags add one problem each, listed in the split."""
    from pspnet.model.image_io import decode_image

    if photos is None:
        from pspnet.build_model.samples import sample_images

        photos = sample_images()
    predict = predict or colour_classes
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = [c for colour in voc_palette() for c in colour]
    out = VocFolder(root, split, [])
    for k, (name, rgb) in enumerate(photos):
        image_id = f"2007_{k:06d}_{Path(name).stem}"
        out.ids.append(image_id)
        image = root / "JPEGImages" / f"{image_id}.jpg"
        Image.fromarray(np.ascontiguousarray(rgb)).save(image, quality=95)
        out.images[image_id] = image
        pred = predict(decode_image(image))          # what the pipeline will decode
        out.predictions[image_id] = pred
        truth = root / "SegmentationClass" / f"{image_id}.png"
        gt = Image.fromarray(_perturb(pred, rng), mode="P")
        gt.putpalette(palette)
        gt.save(truth)
        out.truths[image_id] = truth
    if missing_image:
        out.ids.append("2007_999990_no_image")
        out.missing_images.append("2007_999990_no_image")
    if missing_truth:
        victim = out.ids[0]
        out.truths.pop(victim).unlink()
        out.missing_truths.append(victim)
    if broken_truth:
        victim = out.ids[1]
        out.truths[victim].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        out.broken_truths.append(victim)
    (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(out.ids) + "\n")
    return out


def _perturb(pred: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """VOC-like ground truth: 255 on class boundaries, one block relabelled."""
    truth = pred.copy()
    edges = np.zeros(truth.shape, bool)
    edges[:-1] |= truth[:-1] != truth[1:]
    edges[:, :-1] |= truth[:, :-1] != truth[:, 1:]
    truth[edges] = 255
    h, w = truth.shape
    top, left = int(rng.integers(0, max(1, h // 2))), int(rng.integers(0, max(1, w // 2)))
    truth[top:top + max(1, h // 4), left:left + max(1, w // 4)] = int(rng.integers(0, 21))
    return truth
