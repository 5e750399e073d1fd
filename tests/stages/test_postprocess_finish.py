"""The postprocess worker's `finish` on a large photo: what it says was found is what its
mask holds, whether the labels were counted on the way or by `class_pixels`."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from pspnet.core import wire
from pspnet.model import upsample_argmax as ua
from pspnet.model.image_io import letterbox_size
from pspnet.model.labels import class_pixels
from pspnet.model.manifest import Manifest
from pspnet.stages.postprocess import finish, found_classes


def test_large_photo_found_classes_are_the_masks(trained_model, tmp_path, monkeypatch) -> None:
    manifest = Manifest.read(trained_model)
    size = manifest.input_size
    coarse = np.random.default_rng(3).standard_normal((manifest.num_classes, 6, 6)) * 8
    logits = np.stack([cv2.resize(c.astype(np.float32), (33, 33), interpolation=cv2.INTER_CUBIC)
                       for c in coarse])                 # regions and boundaries, as a net's
    scale, h, w = letterbox_size(1200, 1600, size)       # 1.9 Mpx: counted on the way
    placement = wire.Placement(1200, 1600, scale, (size[0] - h) // 2, (size[1] - w) // 2, h, w)
    results = {}
    for label, min_pixels in (("on the way", 0), ("by class_pixels", 1 << 40)):
        monkeypatch.setattr(ua, "COUNT_MIN_PIXELS", min_pixels)
        request = wire.Request(f"r-{min_pixels}", f"/photos/{min_pixels}.jpg",
                               want=wire.WANT_LABELS)
        result = finish(wire.Output(request, placement, "logits", logits), manifest,
                        tmp_path / "masks")
        assert result.status == wire.OK, (label, result.error)
        labels = result.payload
        with Image.open(result.mask) as im:
            assert np.array_equal(np.asarray(im), labels), label
        expected = found_classes(class_pixels(labels), manifest.class_names)
        assert result.found == expected and len(expected) >= 3, label
        results[label] = result.found
    assert results["on the way"] == results["by class_pixels"]


def test_a_photo_whose_real_path_is_not_utf8_is_answered_alone(trained_model, tmp_path):
    """/in/x.jpg where /in is a link to a folder named in Latin-1 ("caf\\xe9"): the mask's
    path (the image's real path mirrored) could not travel in an answer, and the worker
    died on encoding it, failing the images sent with it. Now that image alone is
    answered with the fix, and nothing is written for it."""
    import os

    manifest = Manifest.read(trained_model)
    latin = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    os.mkdir(latin)
    (tmp_path / "in").symlink_to(latin, target_is_directory=True)
    size = manifest.input_size
    placement = wire.Placement(40, 60, 1.0, 0, 0, 40, 60)
    labels = np.zeros(size, np.uint8)
    request = wire.Request("r", str(tmp_path / "in" / "x.jpg"))
    result = finish(wire.Output(request, placement, "labels", labels), manifest,
                    tmp_path / "masks")
    assert result.status == wire.ERROR and result.mask is None
    assert result.error == (f"the image's real path is not UTF-8: {tmp_path}/caf\\xe9/x.jpg; "
                            "rename the folder or file named in another encoding (for "
                            "Latin-1: convmv -f latin1 -t utf8 --notest -r DIR)")
    wire.encode(result)                                  # the answer travels
    assert not (tmp_path / "masks").exists() or not any((tmp_path / "masks").rglob("*.png"))
