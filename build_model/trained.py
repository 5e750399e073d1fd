"""The trained network shipped in the package, and the photo it is judged on.

DeepLabV3 on MobileNetV2 (width 0.5, output stride 8), Pascal VOC 2012, 21 classes:
Google's TFLite weights converted by `pspnet.build_model.tflite_convert` into an mmseg checkpoint
for the config in build_model/configs. Provenance, licences and the conversion check are
in build_model/trained/deeplabv3-mnv2-voc/. The bird photo and its reference label map
(Coral's test data for this very model) give a real accuracy figure on a fresh clone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PACKAGE = Path(__file__).parent
TRAINED_DIR = PACKAGE / "trained" / "deeplabv3-mnv2-voc"
CONFIG = PACKAGE / "configs" / "deeplabv3_mnv2-w0.5-d8_voc-257x257.py"
CHECKPOINT = TRAINED_DIR / "deeplabv3_mnv2_voc.pth"
INPUT_SIZE = 257            # the TFLite's; sides of 8k + 1 keep TF's SAME padding exact
BIRD_PHOTO = TRAINED_DIR / "bird.png"
BIRD_REFERENCE = TRAINED_DIR / "bird_reference.png"


def bird() -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 RGB uint8 photo, H x W uint8 VOC class ids) of the reference bird."""
    from PIL import Image

    with Image.open(BIRD_PHOTO) as photo, Image.open(BIRD_REFERENCE) as reference:
        return (np.asarray(photo.convert("RGB"), np.uint8).copy(),
                np.asarray(reference, np.uint8).copy())
