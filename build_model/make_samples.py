"""Regenerate `build_model/sample_images/` from photos bundled with scikit-image/matplotlib.

Why a script: the JPEGs in the package are derived data; this says exactly how. They are
small real photos at VOC-like sizes, used by `pspnet build --verify` and to calibrate test
weights. Run: `python -m pspnet.build_model.make_samples` (needs scikit-image and matplotlib).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

OUT = Path(__file__).parent / "sample_images"
QUALITY = 88
MAX_BYTES = 60_000


def _crop(rgb: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    return rgb[top:top + height, left:left + width]


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


def sources() -> dict[str, np.ndarray]:
    """File name -> RGB uint8 image (width x height in the name)."""
    import matplotlib
    import skimage.data as data

    hopper = cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    hopper = cv2.cvtColor(hopper, cv2.COLOR_BGR2RGB)
    motorcycle = data.stereo_motorcycle()[0]
    return {
        "astronaut_500x375.jpg": _resize(_crop(data.astronaut(), 64, 0, 384, 512), 500, 375),
        "chelsea_451x300.jpg": data.chelsea(),
        "coffee_500x333.jpg": _resize(data.coffee(), 500, 333),
        "rocket_640x427.jpg": data.rocket(),
        "motorcycle_375x500.jpg": _crop(motorcycle, 0, 183, 500, 375),
        "retina_333x500.jpg": _resize(_crop(data.retina(), 0, 235, 1411, 940), 333, 500),
        "hubble_500x436.jpg": _resize(data.hubble_deep_field(), 500, 436),
        "immunohistochemistry_400x400.jpg": _resize(data.immunohistochemistry(), 400, 400),
        "grace_hopper_300x451.jpg": _resize(_crop(hopper, 0, 56, 600, 400), 300, 451),
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, rgb in sources().items():
        height, width = rgb.shape[:2]
        assert name.endswith(f"_{width}x{height}.jpg"), (name, rgb.shape)
        for quality in range(QUALITY, 40, -6):
            ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and len(encoded) < MAX_BYTES:
                break
        (OUT / name).write_bytes(encoded.tobytes())
        print(f"{name}: {width}x{height}, quality {quality}, {len(encoded)} bytes")


if __name__ == "__main__":
    main()
