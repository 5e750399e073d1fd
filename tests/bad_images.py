"""The bad-input corpus: awkward and broken image / ground-truth files, written on demand.

`write_corpus(folder)` returns {kind: path} for the kinds of both `EXPECT` (images) and
`GT_EXPECT` (ground truths: feed those to read_ground_truth, not to the decoder).
`EXPECT[kind]` is None for inputs that must decode, else a plain substring (not a regex) of
the `ImageError` message; `GT_EXPECT` likewise for `GroundTruthError`. Reused by the
integration and reliability suites, so kinds are only ever added. Everything is made from
scikit-image's bundled photos, in well under a second.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

# kind -> None (decodes to RGB) or a substring of the error message.
EXPECT: dict[str, str | None] = {
    "good_jpeg": None,
    "missing": "no such file",
    "directory": "is a directory",
    "empty": "empty file (0 bytes)",
    "truncated_jpeg": "truncated or corrupt JPEG",
    "corrupt_jpeg": "truncated or corrupt JPEG",
    "random_bytes_jpg": "not an image (unrecognised format)",
    "text_named_jpg": "not an image (unrecognised format)",
    "png_named_jpg": None,
    "grayscale_jpeg": None,
    "cmyk_jpeg": None,
    "progressive_jpeg": None,
    "tiny_1x1": None,
    "huge_header_jpeg": "over the",           # "... = 400.0 Mpx, over the 50.0 Mpx limit"
    "huge_header_png": "over the",
    "bmp": None,
    "rgba_png": None,
    "palette_png": None,
    "gray16_png": None,
    "truncated_png": "truncated or corrupt PNG",
    "wide_png": "a side over 1,048,576 pixels",   # 2 Mpx in a row: under --max-pixels
    "jpeg_without_eoi": None,                     # every pixel there, the last marker not
    "jpeg_cut_before_eoi": "truncated or corrupt JPEG",   # 4 bytes of pixels missing too
    "unreadable": "permission denied",       # not when running as root: root reads anything
}

# Ground truths, read with pspnet.model.labels.read_ground_truth; the size refers to good_jpeg.
GT_EXPECT: dict[str, str | None] = {
    "gt_good": None,
    "gt_wrong_size": "wrong size",            # raised when scored against good_jpeg's mask
    "gt_rgb": "expected a palette",
    "gt_missing": "no such file",
}

HUGE_SIDE = 20000


def _photo() -> np.ndarray:
    import skimage.data

    return skimage.data.chelsea()  # 300 x 451 x 3, a real photo


def _jpeg(rgb_or_image: np.ndarray | Image.Image, **save: object) -> bytes:
    im = rgb_or_image if isinstance(rgb_or_image, Image.Image) else Image.fromarray(
        rgb_or_image)
    buf = io.BytesIO()
    im.save(buf, "JPEG", **{"quality": 90, **save})
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def patch_jpeg_size(data: bytes, height: int, width: int) -> bytes:
    """Rewrite the frame header (SOF0..SOF2) to claim another size; the pixels stay small.

    A file like this is cheap to make and would need gigabytes to decode, so refusing it
    proves the pixel limit is applied to the header, before decoding.
    """
    out = bytearray(data)
    i = 2
    while i + 9 < len(out):
        if out[i] != 0xFF:
            raise ValueError("not a JPEG marker stream")
        marker = out[i + 1]
        length = int.from_bytes(out[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            out[i + 5:i + 7] = height.to_bytes(2, "big")
            out[i + 7:i + 9] = width.to_bytes(2, "big")
            return bytes(out)
        i += 2 + length
    raise ValueError("no SOF marker found")


def patch_png_size(data: bytes, height: int, width: int) -> bytes:
    """Rewrite the IHDR size (and its CRC) of a PNG."""
    import zlib

    out = bytearray(data)
    assert out[12:16] == b"IHDR"
    out[16:20] = width.to_bytes(4, "big")
    out[20:24] = height.to_bytes(4, "big")
    out[29:33] = zlib.crc32(bytes(out[12:29])).to_bytes(4, "big")
    return bytes(out)


def palette_ground_truth(height: int, width: int, num_classes: int = 21) -> Image.Image:
    """A VOC-style palette PNG image: blocks of class ids with a 255 border."""
    from pspnet.model.manifest import voc_palette

    ids = (np.add.outer(np.arange(height) // 16, np.arange(width) // 16) % num_classes)
    ids = ids.astype(np.uint8)
    ids[:2] = 255
    im = Image.fromarray(ids)
    im.putpalette([v for c in voc_palette(256) for v in c])
    return im


def write_corpus(folder: Path) -> dict[str, Path]:
    """Write every kind of EXPECT and GT_EXPECT into `folder`; return {kind: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photo = _photo()
    h, w = photo.shape[:2]
    good = _jpeg(photo)
    rng = np.random.default_rng(1234)
    files: dict[str, bytes] = {
        "good_jpeg.jpg": good,
        "empty.jpg": b"",
        "truncated_jpeg.jpg": good[: len(good) // 2],
        "corrupt_jpeg.jpg": good[:400] + rng.integers(0, 256, 4000, np.uint8).tobytes(),
        "random_bytes_jpg.jpg": rng.integers(0, 256, 5000, np.uint8).tobytes(),
        "text_named_jpg.jpg": b"this is not an image\n" * 10,
        "png_named_jpg.jpg": _png(Image.fromarray(photo)),
        "grayscale_jpeg.jpg": _jpeg(Image.fromarray(photo).convert("L")),
        "cmyk_jpeg.jpg": _jpeg(Image.fromarray(photo).convert("CMYK")),
        "progressive_jpeg.jpg": _jpeg(photo, progressive=True),
        "tiny_1x1.jpg": _jpeg(photo[:1, :1]),
        "huge_header_jpeg.jpg": patch_jpeg_size(_jpeg(photo[:16, :16]), HUGE_SIDE, HUGE_SIDE),
        "huge_header_png.png": patch_png_size(_png(Image.fromarray(photo[:16, :16])),
                                              HUGE_SIDE, HUGE_SIDE),
        "rgba_png.png": _png(Image.fromarray(photo).convert("RGBA")),
        "palette_png.png": _png(Image.fromarray(photo).convert("P")),
        "gray16_png.png": _png(Image.frombytes(
            "I;16", (w, h), (photo[..., 1].astype("<u2") * 257).tobytes())),
        "unreadable.jpg": good,
        "gt_good.png": _png(palette_ground_truth(h, w)),
        "gt_wrong_size.png": _png(palette_ground_truth(h - 1, w + 3)),
        "gt_rgb.png": _png(palette_ground_truth(h, w).convert("RGB")),
    }
    bmp = io.BytesIO()
    Image.fromarray(photo).save(bmp, "BMP")
    files["bmp.bmp"] = bmp.getvalue()
    png = files["png_named_jpg.jpg"]
    files["truncated_png.png"] = png[: len(png) // 2]
    files["wide_png.png"] = _png(Image.new("L", (2_000_000, 1), 128))   # 2 KB, decodable
    files["jpeg_without_eoi.jpg"] = good[:-2]
    files["jpeg_cut_before_eoi.jpg"] = good[:-6]
    paths: dict[str, Path] = {}
    for name, data in files.items():
        path = folder / name
        if path.exists():
            path.chmod(0o644)
        path.write_bytes(data)
        paths[name.rsplit(".", 1)[0]] = path
    (folder / "directory.jpg").mkdir(exist_ok=True)
    paths["directory"] = folder / "directory.jpg"
    paths["missing"] = folder / "missing.jpg"
    paths["gt_missing"] = folder / "gt_missing.png"
    os.chmod(paths["unreadable"], 0)
    assert set(paths) == set(EXPECT) | set(GT_EXPECT), set(paths) ^ (set(EXPECT) | set(GT_EXPECT))
    return paths
