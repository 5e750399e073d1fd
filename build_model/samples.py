"""The sample photos shipped in `build_model/sample_images/`, decoded to RGB uint8.

Why shipped: `--verify` and the calibration of test weights need real photos (random noise
gives degenerate features) on machines without scikit-image or a dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_DIR = Path(__file__).parent / "sample_images"


def sample_images() -> list[tuple[str, np.ndarray]]:
    """(file name, H x W x 3 RGB uint8) for every JPEG in the package, sorted by name."""
    import cv2

    photos = []
    for path in sorted(SAMPLE_DIR.glob("*.jpg")):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise OSError(f"cannot decode {path}")
        photos.append((path.name, np.ascontiguousarray(bgr[:, :, ::-1])))
    return photos
