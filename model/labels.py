"""Model outputs -> label masks -> mask files and mIoU areas: the postprocess workers' job.

Pure functions; the ZeroMQ loop lives elsewhere.

* `labels_from_logits` undoes the letterbox on logits: bilinear upsample to the padded
  input, exact crop of the valid box (the reference's crop end `500 - pad_top` took one
  row/column too many when the padding was odd), bilinear resize to the original size when
  the letterbox scaled, argmax; computed near class boundaries only
  (`pspnet.model.upsample_argmax`). Resizing logits before argmax is mmseg's own choice
  and the more accurate one; the reference resized labels (nearest), which
  `labels_from_labels` does for executors that already return labels.
* `intersect_and_union` reproduces mmseg 1.2.2's IoUMetric per-image areas (torch.histc
  semantics: labels equal to `ignore_index` dropped, values outside [0, C-1] not
  counted); `pspnet.model.metrics.IoUAccumulator` sums them into mmseg's metrics.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from zlib_ng import zlib_ng

from pspnet.core.wire import Placement
from pspnet.model.image_io import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    max_file_bytes,
    pillow_pixel_limit,
    read_file,
)
from pspnet.model.upsample_argmax import counted_boundary_labels

MAX_LABEL_CLASSES = 255          # ids 0..254 fit uint8 and stay clear of 255 = ignore
GT_FORMATS = ("PNG", "BMP", "TIFF", "GIF", "PPM")


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be scored against; one-line message for the user."""


# ---------------------------------------------------------------------------------------
# model output -> labels at the original size


def _check_box(placement: Placement, input_h: int, input_w: int) -> None:
    p = placement
    if not (0 <= p.top and 0 <= p.left and p.height >= 1 and p.width >= 1
            and p.top + p.height <= input_h and p.left + p.width <= input_w
            and p.orig_h >= 1 and p.orig_w >= 1):
        raise ValueError(f"placement box {p.box()} does not fit the {input_h}x{input_w} input")


def labels_from_logits(
    logits: np.ndarray, placement: Placement, input_size: tuple[int, int],
    align_corners: bool = False,
) -> np.ndarray:
    """C x h x w logits -> orig_h x orig_w uint8 class ids (argmax, first maximum wins).

    `align_corners` is the network's (manifest.align_corners) and applies to the resize
    of its logits to the input size, as in mmseg; the resize of the crop to the original
    size is the daemon's letterbox undone, always half-pixel (align_corners=False).

    The labels of `F.interpolate` to `input_size`, crop of the box, `F.interpolate` to the
    original size (only when the letterbox scaled), `argmax(0)`, up to float rounding
    (they may differ where the two best resized logits are within ~2^-19 of the largest
    logit magnitude), computed by `upsample_argmax.boundary_labels`: only pixels near a
    class boundary get their logits computed, so the cost follows the boundary, not the
    photo (a 12 Mpx photo never needs its 21 x 12 M logits). NaN or infinite logits are
    refused: they mean a broken model, and argmax would hide it.
    """
    return counted_labels_from_logits(logits, placement, input_size, align_corners, False)[0]


def counted_labels_from_logits(
    logits: np.ndarray, placement: Placement, input_size: tuple[int, int],
    align_corners: bool = False, count: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """`labels_from_logits`, and `class_pixels` of the labels where they were counted on
    the way, from their compact form (a large photo: 48 Mpx, labels and counts 111 -> 70
    ms); None where they were not: `class_pixels` counts them then, or a ground truth's
    `pixels_and_areas` does, so nothing is counted twice."""
    if logits.ndim != 3 or logits.dtype.kind != "f":
        raise ValueError(f"logits must be float C x h x w, got {logits.dtype} {logits.shape}")
    num_classes = logits.shape[0]
    if not 1 <= num_classes <= MAX_LABEL_CLASSES:
        raise ValueError(f"{num_classes} classes do not fit a uint8 label map "
                         f"(at most {MAX_LABEL_CLASSES})")
    _check_box(placement, *input_size)
    return counted_boundary_labels(logits, placement, input_size, align_corners, count)


def labels_from_labels(labels: np.ndarray, placement: Placement) -> np.ndarray:
    """S x S uint8 labels from the executor -> orig_h x orig_w: exact crop, nearest resize.

    Nearest is cv2.INTER_NEAREST (source index floor(dst * src / dst_size)), as the
    reference's postprocess and mmseg's label resizing use.
    """
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be uint8 H x W, got {labels.dtype} {labels.shape}")
    _check_box(placement, *labels.shape)
    p = placement
    crop = labels[p.top:p.top + p.height, p.left:p.left + p.width]
    if (p.height, p.width) == (p.orig_h, p.orig_w):
        return np.ascontiguousarray(crop)
    return cv2.resize(np.ascontiguousarray(crop), (p.orig_w, p.orig_h),
                      interpolation=cv2.INTER_NEAREST)


def read_ground_truth(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                      expected: tuple[int, ...] | None = None) -> np.ndarray:
    """H x W uint8 class ids from a ground-truth image, as mmseg reads it ('unchanged').

    A palette PNG gives its indices (VOC's SegmentationClass), a grayscale image its
    values; an RGB(A) image is a colour rendering, not class ids, and is refused. The size
    is checked from the header, before any decoding: over `max_pixels`, or not the
    `expected` (H, W) of the prediction, it is refused without decoding a pixel.
    """
    try:
        data = read_file(path, max_file_bytes(max_pixels))
    except ImageError as e:
        raise GroundTruthError(f"ground truth: {e}") from None
    labels = _plain_png_at_size(data, max_pixels, expected)
    if labels is not None:
        return labels
    try:
        with pillow_pixel_limit(max_pixels), \
                Image.open(io.BytesIO(data), formats=GT_FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise GroundTruthError(
                    f"ground truth: image is {im.width}x{im.height}, over the "
                    f"{max_pixels / 1e6:.1f} Mpx limit")
            if expected is not None and (im.height, im.width) != tuple(expected):
                raise GroundTruthError(
                    f"ground truth is {im.height}x{im.width} but the prediction is "
                    f"{expected[0]}x{expected[1]}: ground truth of the wrong size")
            if im.mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LA", "PA"):
                raise GroundTruthError(
                    f"ground truth is a {im.mode} image; expected a palette (mode P) "
                    "or grayscale PNG whose pixel values are class ids")
            if im.mode not in ("P", "L"):
                raise GroundTruthError(f"ground truth has unsupported mode {im.mode}; "
                                       "expected a palette or 8-bit grayscale PNG")
            labels = _plain_png_pixels(data, im.height, im.width) \
                if im.format == "PNG" else None
            if labels is None:
                im.load()
                labels = np.array(im, dtype=np.uint8)
    except GroundTruthError:
        raise
    except UnidentifiedImageError:
        raise GroundTruthError("ground truth: not an image (unrecognised format)") from None
    except Image.DecompressionBombError:
        raise GroundTruthError(f"ground truth: image is over the {max_pixels / 1e6:.1f} Mpx "
                               "limit") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise GroundTruthError(f"ground truth: truncated or corrupt image: {e}") from None
    return labels


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLAIN_PNG_CHUNKS = 4096          # more chunks than this: not a plain PNG (bounds the loop)


def _plain_png_at_size(data: bytes, max_pixels: int, expected: tuple[int, ...] | None,
                       ) -> np.ndarray | None:
    """`_plain_png_pixels` of a PNG whose header (IHDR, read here without Pillow) gives a
    size within `max_pixels` and equal to `expected`: what the Pillow path returns for
    it, without opening it with Pillow first (its open cost ~0.1 ms of the worker's
    0.35 ms ground-truth read, studies/postprocess_cost.py). None for anything else: that
    goes through Pillow, which checks and reports as before."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if not 0 < width * height <= max_pixels or (
            expected is not None and (height, width) != tuple(expected)):
        return None
    return _plain_png_pixels(data, height, width)


def _plain_png_pixels(data: bytes, height: int, width: int) -> np.ndarray | None:
    """The pixel values of a plain PNG: 8-bit grayscale or palette indices, not interlaced,
    no row filtered (as masks and most ground truths are written); None for any other PNG,
    which Pillow then decodes. Pillow's decode and copies cost 0.35 ms of the 0.40 ms of
    a 500 x 375 ground truth (studies/postprocess_cost.py worker); one inflate (zlib-ng's:
    0.104 -> 0.025 ms against CPython's zlib on a level-6 500 x 375 map), bounded by the
    size the header gives, costs a fraction. Any damage (a chunk's CRC, a stream
    too long, too short or corrupt) -> None, so Pillow reports it as it always has."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, idat, header = len(PNG_SIGNATURE), [], None
    for _ in range(PLAIN_PNG_CHUNKS):
        if pos + 12 > len(data):
            return None
        size = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + size
        if end > len(data):
            return None
        body = data[pos + 8:end - 4]
        if zlib_ng.crc32(body, zlib_ng.crc32(kind)) != int.from_bytes(data[end - 4:end], "big"):
            return None
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos = end
    else:
        return None                              # a file of many tiny chunks: Pillow's
    if header is None or len(header) != 13 or not idat:
        return None
    w, h = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, _, _, interlace = header[8:13]
    if (h, w) != (height, width) or depth != 8 or colour not in (0, 3) or interlace:
        return None
    expected = h * (w + 1)                       # a filter byte, then the row
    inflate = zlib_ng.decompressobj()
    try:
        rows = inflate.decompress(b"".join(idat), expected + 1)
    except zlib_ng.error:
        return None
    if len(rows) != expected or not inflate.eof or inflate.unconsumed_tail:
        return None
    pixels = np.frombuffer(rows, np.uint8).reshape(h, w + 1)
    if pixels[:, 0].any():                       # a filtered row: Pillow undoes filters
        return None
    return np.ascontiguousarray(pixels[:, 1:])


# ---------------------------------------------------------------------------------------
# what a mask holds

HIST_BAND_PIXELS = 1 << 20           # calcHist counts in float32: exact below 2**24 a bin
HIST_PHASES = 8                      # consecutive pixels counted in this many apart bins


def class_pixels(labels: np.ndarray) -> np.ndarray:
    """int64 256: pixels of each value in a uint8 label map, exactly. cv2.calcHist rather
    than np.bincount: 10 ms against 57 ms on a 4000 x 3000 map (bincount widens every pixel
    to int64 first); counted as `histogram` counts."""
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be uint8 H x W, got {labels.dtype} {labels.shape}")
    return histogram([labels], [256])


def histogram(maps: Sequence[np.ndarray], bins: Sequence[int]) -> np.ndarray:
    """int64 bins[0] x bins[1] ...: pixels of each tuple of values of uint8 maps of one 2-D
    shape (values of map i from bins[i] up are not counted), exactly.

    A label map is long runs of one value, so a plain histogram adds 1 to the same bin
    pixel after pixel, each add waiting for the one before (cv2.calcHist of one 500 x 424
    mask: 0.34 ms, of noise 0.08). One more map, of phases (pixel index mod HIST_PHASES),
    spreads each run over that many bins, summed after: `class_pixels` 0.34 -> 0.13 ms,
    `pixels_and_areas` 0.34 -> 0.25 on the bench's 48 masks, both together 46 -> 21 ms at
    4000 x 3000 (post31, interleaved with the one-bin code). Counted a band of rows at a
    time, so every float32 bin stays exact."""
    height, width = maps[0].shape
    rows = max(1, HIST_BAND_PIXELS // max(1, width))
    dims = len(maps)
    sizes = [*bins, HIST_PHASES]
    ranges = [v for size in sizes for v in (0, size)]
    counts = np.zeros(bins, np.int64)
    for top in range(0, height, rows):
        bands = [np.ascontiguousarray(m[top:top + rows]) for m in maps]
        hist = cv2.calcHist([*bands, _phases(bands[0].shape)], list(range(dims + 1)), None,
                            sizes, ranges)
        # the phases summed by cv2.reduce (numpy's sum over a last axis of 8 cost 92 us for
        # 256 x 21 x 8 bins, this 13; numpy's matrix-vector product, 6 us alone, woke
        # OpenBLAS's threads, which then spun beside the worker): integers below 2**20 in
        # all, so float32 adds them exactly in any order
        phased = hist.reshape(-1, HIST_PHASES)
        counts += cv2.reduce(phased, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32F).reshape(
            bins).astype(np.int64)
    return counts


def _phases(shape: tuple[int, ...]) -> np.ndarray:
    """A band's map of phases: a view of one read-only pattern, made once."""
    pixels = shape[0] * shape[1]
    pattern = _PHASES[0] if _PHASES else None
    if pattern is None or pattern.size < pixels:    # the local one is long enough, even
        pattern = (np.arange(max(pixels, HIST_BAND_PIXELS)) % HIST_PHASES).astype(np.uint8)
        pattern.flags.writeable = False              # if another thread swaps the cache
        _PHASES[:] = [pattern]
    return pattern[:pixels].reshape(shape)


_PHASES: list[np.ndarray] = []       # one read-only pattern, grown to the largest band


# ---------------------------------------------------------------------------------------
# mIoU


def intersect_and_union(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """int64 4 x C: area_intersect, area_union, area_pred_label, area_label for one image.

    Exactly mmseg 1.2.2's `IoUMetric.intersect_and_union` (see the module docstring).
    uint8 maps (the usual case) take one 2-D histogram over (label, pred) pairs.
    """
    _check_pair(pred, label, num_classes)
    if _byte_maps(pred, label, num_classes):
        return _areas(confusion(pred, label), num_classes, ignore_index)
    lab = label.astype(np.int64, copy=False).ravel()
    prd = pred.astype(np.int64, copy=False).ravel()
    keep = lab != ignore_index
    lab, prd = lab[keep], prd[keep]

    def hist(v: np.ndarray) -> np.ndarray:
        return np.bincount(v[(v >= 0) & (v < num_classes)], minlength=num_classes)

    return _stack(hist(prd[prd == lab]), hist(prd), hist(lab), num_classes)


def pixels_and_areas(pred: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """(`class_pixels(pred)`, `intersect_and_union(pred, label, ...)`) from one pass over
    the two maps: the postprocess worker needs both for an image with ground truth, and
    one 2-D histogram costs less than a count and a histogram apart (0.42 ms against
    0.34 + 0.57 ms at 500 x 375, studies/postprocess_cost.py worker). Its prediction axis
    stops at the largest prediction (21 bins, not 256, for a 21-class model: every table
    after the count is 12 times smaller)."""
    _check_pair(pred, label, num_classes)
    if not _byte_maps(pred, label, num_classes):
        return class_pixels(pred), intersect_and_union(pred, label, num_classes, ignore_index)
    top = int(pred.max()) + 1 if pred.size else 1       # every prediction is below `top`
    conf = confusion(pred, label, top)
    counts = np.zeros(256, np.int64)
    counts[:top] = conf.sum(axis=0)
    return counts, _areas(conf, num_classes, ignore_index)


def confusion(pred: np.ndarray, label: np.ndarray, pred_bins: int = 256) -> np.ndarray:
    """int64 256 x pred_bins: pixels with ground truth i and prediction j at [i, j], of two
    uint8 maps of one shape (predictions from `pred_bins` up are not counted)."""
    return histogram([label, pred], [256, pred_bins])


def _check_pair(pred: np.ndarray, label: np.ndarray, num_classes: int) -> None:
    if pred.shape != label.shape:
        raise GroundTruthError(
            f"ground truth is {'x'.join(map(str, label.shape))} but the prediction is "
            f"{'x'.join(map(str, pred.shape))}: ground truth of the wrong size")
    if pred.dtype.kind not in "iub" or label.dtype.kind not in "iub":
        raise TypeError(f"label maps must be integer arrays, got {pred.dtype} and "
                        f"{label.dtype}")
    if num_classes < 1:
        raise ValueError("num_classes must be at least 1")


def _byte_maps(pred: np.ndarray, label: np.ndarray, num_classes: int) -> bool:
    return (pred.dtype == np.uint8 and label.dtype == np.uint8 and pred.ndim == 2
            and num_classes <= 256)


def _areas(conf: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """The 4 x C areas from a 256 x P (label, pred) confusion (not modified) that holds
    every pixel (no prediction from P up)."""
    c = num_classes
    k = min(c, conf.shape[1])
    if 0 <= ignore_index <= 255:
        conf = conf.copy()
        conf[ignore_index, :] = 0
    area_intersect = np.zeros(c, np.int64)
    area_pred = np.zeros(c, np.int64)
    area_intersect[:k] = np.diagonal(conf)[:k]
    area_pred[:k] = conf[:, :k].sum(axis=0)
    return _stack(area_intersect, area_pred, conf[:c, :].sum(axis=1), c)


def _stack(area_intersect: np.ndarray, area_pred: np.ndarray, area_label: np.ndarray,
           num_classes: int) -> np.ndarray:
    out = np.empty((4, num_classes), np.int64)
    out[0] = area_intersect
    out[2] = area_pred
    out[3] = area_label
    out[1] = out[2] + out[3] - out[0]
    return out
