"""Decode one image file and letterbox it into the model input: the preprocess workers' job.

Pure functions; the ZeroMQ loop lives elsewhere. Errors are `ImageError` with a one-line
message meant for the user (the caller reports it together with the path).

Decoding
  * JPEG (recognised by its FF D8 FF magic, whatever the file is called) goes through
    PyTurboJPEG with TJFLAG_STOPONWARNING, and any libjpeg warning is an error: a truncated
    or corrupt JPEG is refused instead of coming back grey-filled (which is what cv2.imread,
    the reference's reader, does silently). The price: a JPEG with a harmless libjpeg
    warning (e.g. "extraneous bytes before marker") is refused too. The header is read
    first and the pixel limit is enforced before a single pixel is decoded.
  * CMYK/YCCK JPEGs (turbojpeg cannot convert them to RGB) and every other format go through
    Pillow, restricted to a few raster formats (never EPS and friends, which would run
    external programs). The pixel limit is checked on the header before `load()`, and
    Pillow's own decompression-bomb limit is set to the same value.
  * EXIF orientation is applied, as cv2.imread (the reference's reader) and mmcv.imread
    apply it (checked for JPEG, PNG, WebP and TIFF against cv2 5.1): a phone photo
    taken upright is stored sideways with a tag saying so, and its mask comes out upright,
    the way the photo is shown, and the same as the reference's. The tag is read only where
    the file has EXIF data (a JPEG's APP1 segment; Pillow for other formats), so a photo
    without it costs nothing more. VOC images carry no tag.

Letterbox: the reference step exactly (scale = min(W/w, H/h), floor sizes, cv2 INTER_LINEAR,
centre padding), with sizes computed in integers: the reference's int(w * (500 / w)) gives
499 for w = 499 (a float just under 500); here the scale-setting side is exactly 500.

Measured here (`python -m pspnet.model.image_io`: one core, cv2 single-threaded, Debian
libturbojpeg 2.1.5, coffee photo resized to 500x375, quality 90, 4:2:0, bytes in memory,
best of 5 x 200): decode + letterbox into a preallocated 500x500 buffer took 0.91 ms on
the idle host, i.e. about 1,100 images/s per core (decode alone 0.89 ms; letterboxing a
500x375 image is a copy). With other jobs on the 2 cores it read 1.1-1.4 ms (720-900/s).
A 640x427 image (resized to 500x333) took 1.37 ms idle, about 730 images/s per core.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from turbojpeg import TJCS_CMYK, TJCS_YCCK, TJFLAG_STOPONWARNING, TJPF_RGB, TurboJPEG

from pspnet.core.config import DEFAULT_MAX_PIXELS
from pspnet.core.files import FileReadError, read_regular_file
from pspnet.core.wire import MAX_PHOTO_SIDE, Placement

JPEG_MAGIC = b"\xff\xd8\xff"
EOI = b"\xff\xd9"                 # a JPEG's last marker
EOF_WARNING = "Premature end of JPEG file"   # libjpeg's, for data that end early
# libjpeg's for stray bytes it skipped to reach the closing EOI marker (0xd9): some
# cameras pad there; every scan before the EOI was read whole
PADDED_EOI = re.compile(r"Corrupt JPEG data: \d+ extraneous bytes before marker 0xd9")
EXIF_HEADER = b"Exif\x00\x00"    # an APP1 segment's start: where a JPEG keeps its EXIF tags
APP1, SOS = 0xE1, 0xDA           # markers: the EXIF segment's; the first scan's (headers end)
ORIENTATION = 0x0112            # EXIF's orientation tag: 1 as stored ... 8
# orientation -> the cv2 steps that show the stored pixels upright (as ImageOps.exif_transpose)
UPRIGHT = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: lambda a: cv2.transpose(a),
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.transpose(cv2.flip(a, -1)),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
# Formats Pillow may open for us; others (EPS, PDF...) are refused as unrecognised.
PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
HEIF_BRANDS = {b: "HEIC" for b in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx")} | {
    b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}   # ftyp major brands
# where the limit is raised: the command that decodes (a client's submit has no such flag)
LIMIT_FLAG = "(--max-pixels of pspnet serve, eval, bench or batch)"

_turbo: Any = None  # one TurboJPEG per process, created on first use


class ImageError(ValueError):
    """An input image that cannot be used; the message is a one-liner for the user.
    `incomplete`: it looked unfinished (empty, truncated), so the file may still change."""

    def __init__(self, message: str, incomplete: bool = False) -> None:
        super().__init__(message)
        self.incomplete = incomplete


def _turbojpeg() -> Any:
    global _turbo
    if _turbo is None:
        _turbo = TurboJPEG()  # loads libturbojpeg
    return _turbo


def max_file_bytes(max_pixels: int) -> int:
    """Largest file worth reading for `max_pixels` (an uncompressed 16-bit RGBA image)."""
    return 8 * max_pixels + (1 << 20)


def read_file(path: str | Path, max_bytes: int) -> bytes:
    """The whole file in one read, with one-line errors for the usual ways it goes wrong
    (core.files: a FIFO or a device named like an image cannot hang or flood a worker)."""
    try:
        return read_regular_file(path, max_bytes)
    except FileReadError as e:
        raise ImageError(str(e), incomplete=e.incomplete) from None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max(width, height) > MAX_PHOTO_SIDE:       # the wire's bound on a photo's sides
        raise ImageError(f"image is {width}x{height}: a side over {MAX_PHOTO_SIDE:,} "
                         "pixels, which the daemon does not take; crop or split it")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height / 1e6:.1f} Mpx, over the "
            f"{max_pixels / 1e6:.1f} Mpx limit {LIMIT_FLAG}")


class DecodeScratch:
    """Memory a worker decodes its JPEGs into, kept from one photo to the next.

    Why: a new array for a large photo is fresh pages from the kernel, faulted in and
    zeroed: 20 of the 101 ms of a 48 Mpx decode (27.4 -> 23.1 ms at 12 Mpx; the same
    pixels). What it costs: the largest photo's RGB stays held until `release`, which a
    worker calls when it has nothing to do. An array decoded here is valid until the
    next decode into the same scratch."""

    def __init__(self) -> None:
        self._buffer = np.empty(0, np.uint8)

    def take(self, height: int, width: int) -> np.ndarray:
        """A C-contiguous height x width x 3 uint8 view, grown when it is too small."""
        size = height * width * 3
        if self._buffer.size < size:
            self._buffer = np.empty(0, np.uint8)             # the old one goes first
            self._buffer = np.empty(size, np.uint8)
        return self._buffer[:size].reshape(height, width, 3)

    def release(self) -> None:
        self._buffer = np.empty(0, np.uint8)

    @property
    def held_bytes(self) -> int:
        return int(self._buffer.size)


def decode_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                 scratch: DecodeScratch | None = None) -> np.ndarray:
    """Read and decode one image file to H x W x 3 uint8 RGB (C-contiguous).

    The format is taken from the content, never from the name; see the module docstring.
    A JPEG is decoded into `scratch` when one is given (valid until its next decode).
    """
    data = read_file(path, max_file_bytes(max_pixels))
    return decode_bytes(data, max_pixels, scratch)


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 scratch: DecodeScratch | None = None) -> np.ndarray:
    """`decode_image` for bytes already in memory."""
    if data[:3] == JPEG_MAGIC:
        rgb = _decode_jpeg(data, max_pixels, scratch)
        if rgb is not None:
            if not _has_exif(data):
                return rgb
            return upright(rgb, _jpeg_orientation(data, max_pixels))
    return _decode_pillow(data, max_pixels)


def _has_exif(data: bytes) -> bool:
    """Whether a JPEG's header segments hold an EXIF APP1: an editor may write a large ICC
    profile or XMP block first, and cv2 and Pillow find the EXIF after it too (a fixed
    window of 128 KB did not, and a portrait came back sideways)."""
    return any(data[i + 1] == APP1 and data[i + 4:i + 4 + len(EXIF_HEADER)] == EXIF_HEADER
               for i in _header_segments(data))


def _header_segments(data: bytes) -> Iterator[int]:
    """The offset of each marker of a JPEG from its first segment to its first scan's
    (SOS, the last one given), walked by the segments' lengths, 0xFF fill bytes skipped:
    the headers read without decoding."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        if data[i + 1] == 0xFF:               # a fill byte before the marker
            i += 1
            continue
        yield i
        if data[i + 1] == SOS:
            return
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")


def upright(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels as shown: `rgb` turned as EXIF `orientation` (1-8) says."""
    turn = UPRIGHT.get(orientation)
    return rgb if turn is None else np.ascontiguousarray(turn(rgb))


def _jpeg_orientation(data: bytes, max_pixels: int) -> int:
    """The EXIF orientation of a JPEG already decoded (Pillow reads the headers only)."""
    try:
        with pillow_pixel_limit(max_pixels), \
                Image.open(io.BytesIO(data), formats=("JPEG", "MPO")) as im:
            return _orientation(im)
    except Exception:             # a broken header here must not lose a decoded photo
        return 1


def _orientation(im: Image.Image) -> int:
    """1 where the tag is missing or unreadable: the pixels are then used as stored."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = im.getexif().get(ORIENTATION, 1)
    except Exception:             # a broken EXIF block must not lose the photo
        return 1
    return value if isinstance(value, int) else 1


def _decode_jpeg(data: bytes, max_pixels: int,
                 scratch: DecodeScratch | None = None) -> np.ndarray | None:
    """TurboJPEG decode; None for colour spaces it cannot turn into RGB (CMYK, YCCK)."""
    tj = _turbojpeg()
    # PyTurboJPEG reports libjpeg warnings (truncation, corrupt data) with warnings.warn
    # and returns the half-decoded image; record them and refuse the image instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            width, height, _, colorspace = tj.decode_header(data)
        except OSError as e:
            raise ImageError(f"truncated or corrupt JPEG: {e}", incomplete=True) from None
        if caught:
            raise ImageError(f"truncated or corrupt JPEG: {caught[0].message}",
                             incomplete=True)
        _check_pixels(width, height, max_pixels)
        if colorspace in (TJCS_CMYK, TJCS_YCCK):
            return None
        dst = None if scratch is None else scratch.take(height, width)
        try:
            rgb = tj.decode(data, pixel_format=TJPF_RGB, flags=TJFLAG_STOPONWARNING, dst=dst)
        except OSError as e:
            raise ImageError(f"truncated or corrupt JPEG: {e}", incomplete=True) from None
    if caught and str(caught[0].message) == EOF_WARNING and _one_scan(data):
        rgb = _decode_without_eoi(tj, data, dst)
        if rgb is not None:
            return rgb
    if caught and PADDED_EOI.fullmatch(str(caught[0].message)) and _one_scan(data):
        return _decode_padded(tj, data, dst)
    if caught:
        raise ImageError(f"truncated or corrupt JPEG: {caught[0].message}",
                             incomplete=True)
    return rgb


def _decode_without_eoi(tj: Any, data: bytes, dst: np.ndarray | None) -> np.ndarray | None:
    """A JPEG whose data end where its one scan ends, without the closing EOI marker
    (some encoders, and files cut after the last byte of pixels): every pixel is there,
    as cv2 and browsers show it. With the marker put back, libjpeg decodes it without a
    warning only if the scan is complete: a file cut inside it still warns ("premature
    end of data segment") and stays refused. None then."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rgb = tj.decode(data + EOI, pixel_format=TJPF_RGB, flags=TJFLAG_STOPONWARNING,
                            dst=dst)
        except OSError:
            return None
    return None if caught else rgb


def _decode_padded(tj: Any, data: bytes, dst: np.ndarray | None) -> np.ndarray:
    """A JPEG with stray bytes between its scan and its EOI marker, as some cameras write
    it: libjpeg warns only on reaching the marker, after the whole of its one scan (the
    caller checked that it was the first warning), and cv2 and Pillow show it. Decoded
    again without stopping at that warning: every pixel, as cv2 gives them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return tj.decode(data, pixel_format=TJPF_RGB, dst=dst)
        except OSError as e:
            raise ImageError(f"truncated or corrupt JPEG: {e}", incomplete=True) from None


def _one_scan(data: bytes) -> bool:
    """Whether a JPEG's pixels are all in its first scan: a sequential frame (SOF0 or SOF1,
    where each component is in exactly one scan) whose first scan holds every component.
    A progressive file cut between two scans, or a sequential one between two
    non-interleaved scans, would decode without a warning from its first scans alone.
    Reads the markers up to the first scan."""
    components = 0
    for i in _header_segments(data):
        marker = data[i + 1]
        if marker in (0xC0, 0xC1) and i + 9 < len(data):
            components = data[i + 9]                    # Nf
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return False                                # progressive, lossless...
        elif marker == SOS:
            return 0 < components == (data[i + 4] if i + 4 < len(data) else -1)   # Ns
    return False


@contextlib.contextmanager
def pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit tied to ours, for the duration of one open.

    Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that, inside open(); ours
    is checked right after open (before load), so Pillow only ever refuses what we would.
    The global is restored afterwards so other Pillow users in the process are unaffected.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _decode_pillow(data: bytes, max_pixels: int) -> np.ndarray:
    fmt = "image"
    try:
        with pillow_pixel_limit(max_pixels), \
                Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as im:
            fmt = im.format or fmt
            _check_pixels(im.width, im.height, max_pixels)
            im.load()
            return upright(_to_rgb(im), _orientation(im))
    except UnidentifiedImageError:
        brand = data[8:12] if data[4:8] == b"ftyp" else b""        # ISO media: HEIF, AVIF
        if brand in HEIF_BRANDS:
            raise ImageError(f"a {HEIF_BRANDS[brand]} photo, which is not read: convert it to "
                             "JPEG first (e.g. heif-convert IMG.HEIC IMG.jpg)") from None
        raise ImageError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        m = _BOMB_PIXELS.search(str(e))
        size = f"{int(m.group(1)) / 1e6:.1f} Mpx" if m else "too large"
        raise ImageError(f"image is {size}, over the {max_pixels / 1e6:.1f} Mpx limit "
                         f"{LIMIT_FLAG}") from None
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
            KeyError, MemoryError) as e:
        raise ImageError(f"truncated or corrupt {fmt}: {e}", incomplete=True) from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> H x W x 3 uint8 RGB, as cv2.imread(IMREAD_COLOR) would give it.

    Alpha is dropped (not composited), palettes are expanded, 16-bit samples keep their
    high byte (cv2 shifts by 8 as well), CMYK is converted by Pillow (which already undid
    Adobe's inverted CMYK when it decoded the JPEG). Float samples (a 32-bit float TIFF,
    which cv2 cannot read) are taken as 0..1 when none is above 1, else as 0..255:
    Pillow's own conversion clipped 0..1 to black."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        if mode == "I":
            a = np.clip(a, 0, 65535)
        gray = (a.astype(np.uint32) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":                    # float samples: [0, 1] where none is above 1
        a = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        if a.size and float(a.max()) <= 1.0:
            a = a * 255.0
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ("P", "PA"):
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    rgb = np.asarray(im)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"cannot convert {mode} image to RGB")
    return np.ascontiguousarray(rgb)


def letterbox_size(h: int, w: int, size: tuple[int, int]) -> tuple[float, int, int]:
    """(scale, new_h, new_w) of the reference letterbox, in exact integer arithmetic.

    scale = min(W/w, H/h); the side that sets the scale gets exactly its target and the
    other side floor(side * scale) computed as an integer quotient, at least 1 pixel.
    """
    target_h, target_w = size
    if h < 1 or w < 1 or target_h < 1 or target_w < 1:
        raise ValueError(f"bad letterbox sizes: image {h}x{w}, target {target_h}x{target_w}")
    if target_w * h <= target_h * w:  # W/w <= H/h: width sets the scale
        return target_w / w, max(1, h * target_w // w), target_w
    return target_h / h, target_h, max(1, w * target_h // h)


def letterbox(
    rgb: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None
) -> tuple[np.ndarray, Placement]:
    """Resize to fit `size` (H, W) keeping the aspect ratio, and centre it on zero padding.

    Writes into `out` (H x W x 3 uint8, reused across images) when given: only the padding
    is cleared and the resize writes straight into the box, so the hot loop allocates
    nothing. The pad value is irrelevant to the model (the graph masks it with the box)
    but is kept at 0 so outputs are deterministic.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected H x W x 3 uint8, got {rgb.dtype} {rgb.shape}")
    target_h, target_w = size
    h, w = rgb.shape[:2]
    scale, new_h, new_w = letterbox_size(h, w, size)
    if out is None:
        out = np.empty((target_h, target_w, 3), np.uint8)
    elif out.shape != (target_h, target_w, 3) or out.dtype != np.uint8:
        raise ValueError(f"out must be {target_h} x {target_w} x 3 uint8, "
                         f"got {out.dtype} {out.shape}")
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    bottom, right = top + new_h, left + new_w
    out[:top] = 0
    out[bottom:] = 0
    out[top:bottom, :left] = 0
    out[top:bottom, right:] = 0
    box = out[top:bottom, left:right]
    if (new_h, new_w) == (h, w):
        box[...] = rgb
    else:
        res = cv2.resize(rgb, (new_w, new_h), dst=box, interpolation=cv2.INTER_LINEAR)
        if res is not box and not np.shares_memory(res, box):  # cv2 declined the view
            box[...] = res
    return out, Placement(orig_h=h, orig_w=w, scale=scale, top=top, left=left,
                          height=new_h, width=new_w)


def _bench() -> None:  # pragma: no cover - the figure quoted in the module docstring
    import time

    import skimage.data

    photo = skimage.data.coffee()  # 400 x 600
    cases = {"500x375": cv2.resize(photo, (500, 375), interpolation=cv2.INTER_AREA),
             "640x427": skimage.data.rocket()}
    out = np.empty((500, 500, 3), np.uint8)
    for name, rgb in cases.items():
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        for label, fn in (("decode", lambda d=data: decode_bytes(d)),
                          ("decode+letterbox",
                           lambda d=data: letterbox(decode_bytes(d), (500, 500), out))):
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(200):
                    fn()
                best = min(best, (time.perf_counter() - t) / 200)
            print(f"{name} {label}: {best * 1e3:.3f} ms, {1 / best:.0f} images/s per core")


if __name__ == "__main__":  # pragma: no cover
    cv2.setNumThreads(1)
    _bench()
