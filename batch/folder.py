"""`pspnet batch --images DIR`: every entry of the folder, each an image to segment or a
failed row with its reason.

Why every entry: a job that says nothing about a dangling link, a symbolic-link loop, a
FIFO or a folder named `x.jpg` lets the user believe the folder was done. So `listed` is
every entry directly in the folder, and each one that is not a readable, non-empty image
file under an image suffix is a failed row naming why; the report's counts then add up
(listed = segmented + failed). Nothing is decoded here: a corrupt image fails its row in
decode, as before.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from pspnet.batch.voc import VocItem, VocSplit
from pspnet.core.config import IMAGE_SUFFIXES


def from_folder(folder: Path) -> VocSplit:
    """Every entry directly in `folder`, sorted by name; no ground truth. Raises ValueError
    when the folder cannot be read or holds no image to segment."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory")
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise ValueError(f"{folder}: cannot list: {exc.strerror}") from None
    items: list[VocItem] = []
    failed: list[dict[str, str]] = []
    ids: set[str] = set()
    for name in names:
        path = folder / name
        why = not_an_image(path)
        if why is not None:
            failed.append({"id": name, "path": str(path), "reason": why})
            continue
        # the report's id: the stem, or the whole name where another image took the stem
        # (x.jpg and x.png: both are masked, mask_path keeps their masks apart)
        image_id = path.stem if path.stem not in ids else name
        ids.add(image_id)
        items.append(VocItem(image_id, path, None))
    if not items:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})"
                         + (f"; {len(failed)} other entries" if failed else ""))
    return VocSplit(folder, "", items, failed, len(names))


def not_an_image(path: Path) -> str | None:
    """Why this entry cannot be segmented, or None (a readable non-empty image file)."""
    try:
        st = path.stat()                             # follows links: what would be read
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        if exc.errno == errno.ENOENT and path.is_symlink():
            return "a broken symbolic link (its target does not exist)"
        return f"cannot stat: {exc.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a FIFO, socket or device)"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file (suffix {path.suffix or 'none'}; expected " \
               f"{', '.join(IMAGE_SUFFIXES)})"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return None
