"""The PASCAL VOC folder layout: which images a split lists and where their ground truths are.

Why its own module: eval and bench both read it, and a real VOC copy is often incomplete
(a partial download, a renamed file). Nothing here opens an image; what is missing is
recorded, not raised, so one absent file never stops a 1,449-image evaluation.

    ROOT/ImageSets/Segmentation/<split>.txt   one image id per line
    ROOT/JPEGImages/<id>.jpg                  the photo
    ROOT/SegmentationClass/<id>.png           palette PNG: pixel = class id, 255 = ignore
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

IMAGE_DIR = "JPEGImages"
TRUTH_DIR = "SegmentationClass"
SPLIT_DIR = Path("ImageSets") / "Segmentation"


class VocLayoutError(ValueError):
    """The folder is not a VOC root at all (no split file): a usage error, not a gap."""


@dataclass(frozen=True)
class VocItem:
    id: str
    image: Path
    truth: Path | None          # None: the ground truth file is missing


@dataclass
class VocSplit:
    root: Path
    split: str
    items: list[VocItem] = field(default_factory=list)        # images that exist
    missing: list[dict[str, str]] = field(default_factory=list)  # {id, path, reason}
    listed: int = 0                                              # unique ids in the file

    @property
    def images(self) -> list[Path]:
        return [item.image for item in self.items]

    @property
    def truths(self) -> list[Path | None]:
        return [item.truth for item in self.items]


def split_file(root: Path, split: str) -> Path:
    return Path(root) / SPLIT_DIR / f"{split}.txt"


def read_split(root: str | Path, split: str = "val") -> VocSplit:
    """The split's items whose image exists; missing images and ground truths are noted.

    An item with its image but no ground truth is kept (it is segmented, not scored) and
    also listed in `missing`. Ids are taken as written (blank lines and duplicates skipped),
    but an id that would leave the folder (`..`, a slash) is refused as missing.
    """
    root = Path(root)
    listing = split_file(root, split)
    if not listing.is_file():
        inner = [d for d in sorted(root.glob("*/")) if split_file(d, split).is_file()]
        hint = f"; {inner[0]} has it: pass --voc {inner[0]}" if inner else ""
        raise VocLayoutError(f"{listing}: no such split file; expected the VOC layout "
                             f"{IMAGE_DIR}/, {TRUTH_DIR}/, {SPLIT_DIR}/{split}.txt under "
                             f"{root}{hint}")
    out = VocSplit(root, split)
    seen: set[str] = set()
    for line in listing.read_text(encoding="utf-8", errors="replace").splitlines():
        image_id = line.strip().split()[0] if line.strip() else ""
        if not image_id or image_id in seen:
            continue
        seen.add(image_id)
        out.listed += 1
        if "/" in image_id or "\\" in image_id or image_id.startswith("."):
            out.missing.append({"id": image_id, "path": image_id,
                                "reason": "id is not a plain file name"})
            continue
        image = root / IMAGE_DIR / f"{image_id}.jpg"
        truth = root / TRUTH_DIR / f"{image_id}.png"
        if not image.is_file():
            out.missing.append({"id": image_id, "path": str(image), "reason": "image missing"})
            continue
        if not truth.is_file():
            out.missing.append({"id": image_id, "path": str(truth),
                                "reason": "ground truth missing (image segmented, not scored)"})
            truth = None
        out.items.append(VocItem(image_id, image, truth))
    return out
