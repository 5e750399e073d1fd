"""Real photos for tests, straight from scikit-image and matplotlib (not the package JPEGs).

Why a second set: the package's sample images calibrate the test weights, so parity and
"non-degenerate" checks should also run on photos the calibration never saw, at awkward
sizes (odd, portrait, wide, tiny) that exercise the letterbox and the padding mask.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np


def sample_photos() -> list[tuple[str, np.ndarray]]:
    """(name, H x W x 3 RGB uint8, read-only) photos, crops and resizes; same every call."""
    return list(_photos())


@cache
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    import matplotlib
    import skimage.data as data

    hopper = cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    hopper = cv2.cvtColor(hopper, cv2.COLOR_BGR2RGB)
    coffee, rocket = data.coffee(), data.rocket()
    photos = {
        "astronaut": data.astronaut(),                                    # 512 x 512
        "chelsea": data.chelsea(),                                        # 300 x 451
        "coffee_portrait": coffee[:, 150:417],                            # 400 x 267
        "rocket": rocket,                                                 # 427 x 640
        "motorcycle_small": _resize(data.stereo_motorcycle()[0], 247, 167),
        "ihc_odd": data.immunohistochemistry()[7:340, 11:512],            # 333 x 501
        "hubble_wide": data.hubble_deep_field()[300:420],                 # 120 x 1000
        "retina_tiny": _resize(data.retina(), 97, 97),
        "grace_hopper": hopper,                                           # 600 x 512
        "rocket_crop_tall": rocket[:, 260:380],                           # 427 x 120
    }
    out = []
    for name, rgb in photos.items():
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        rgb.setflags(write=False)
        out.append((name, rgb))
    return tuple(out)


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


def huge_jpeg(path: Path, side: int = 7000, worst: bool = False) -> Path:
    """A `side` x `side` JPEG (49 Mpx by default: under the default --max-pixels) from a
    real photo scaled up, with grain so the decoder has entropy to work through: seconds
    to decode, resize and store, as a camera's panorama would be. `worst`: noise, saved
    progressive, the slowest kind to decode (3 s on a quiet core here, 0.5 s otherwise)."""
    rng = np.random.default_rng(0)
    if worst:
        bgr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        params = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    else:
        rgb = cv2.resize(sample_photos()[0][1], (side, side), interpolation=cv2.INTER_LINEAR)
        grain = rng.integers(0, 24, (side, side, 1), dtype=np.uint8)
        bgr = cv2.cvtColor(cv2.add(rgb, np.repeat(grain, 3, axis=2)), cv2.COLOR_RGB2BGR)
        params = [cv2.IMWRITE_JPEG_QUALITY, 90]
    if not cv2.imwrite(str(path), bgr, params):
        raise OSError(f"cannot write {path}")
    return path
