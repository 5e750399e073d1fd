"""pspnet.model.image_io: decoding (real photos, bad inputs) and the reference letterbox."""

from __future__ import annotations

import io
import os
import re
import threading
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pspnet.core import files
from pspnet.core.wire import Placement
from pspnet.model import image_io
from pspnet.model.image_io import (
    DecodeScratch,
    ImageError,
    decode_bytes,
    decode_image,
    letterbox,
    letterbox_size,
)
from tests.bad_images import EXPECT, HUGE_SIDE, patch_jpeg_size, write_corpus

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("bad_images"))


def _jpeg(rgb: np.ndarray | Image.Image, **save: object) -> bytes:
    im = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    buf = io.BytesIO()
    im.save(buf, "JPEG", **{"quality": 90, **save})
    return buf.getvalue()


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# ---------------------------------------------------------------------------------------
# decoding real photos


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0
def test_jpeg_matches_opencv_and_pillow(tmp_path: Path, name: str, subsampling: int) -> None:
    photo = getattr(skimage.data, name)()
    data = _jpeg(photo, subsampling=subsampling)
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(data)
    rgb = decode_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == photo.shape and rgb.flags.c_contiguous
    # The reference reads with OpenCV (BGR); same libjpeg-turbo decoder, same pixels.
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert _max_diff(rgb, bgr[:, :, ::-1]) <= 1
    assert _max_diff(rgb, _pillow_rgb(data)) <= 2
    assert np.abs(rgb.astype(int) - photo).mean() < 3  # and it is the photo


def test_grayscale_jpeg(tmp_path: Path) -> None:
    gray = skimage.data.camera()
    data = _jpeg(gray)
    rgb = decode_bytes(data)
    assert rgb.shape == gray.shape + (3,)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert _max_diff(rgb[..., 0], np.asarray(Image.open(io.BytesIO(data)))) <= 1


def test_progressive_jpeg() -> None:
    photo = skimage.data.coffee()
    data = _jpeg(photo, progressive=True)
    assert _max_diff(decode_bytes(data), _pillow_rgb(data)) <= 2


def test_cmyk_jpeg_is_not_inverted() -> None:
    photo = skimage.data.chelsea()
    data = _jpeg(Image.fromarray(photo).convert("CMYK"))
    rgb = decode_bytes(data)
    assert rgb.shape == photo.shape
    # Pillow writes Adobe-style CMYK; an inverted decode would be ~128 levels off.
    assert np.abs(rgb.astype(int) - photo).mean() < 4


def test_png_bmp_rgba_palette_16bit(corpus: dict[str, Path]) -> None:
    photo = skimage.data.chelsea()
    for kind in ("png_named_jpg", "bmp", "rgba_png"):
        assert np.array_equal(decode_image(corpus[kind]), photo), kind
    pal = decode_image(corpus["palette_png"])
    assert np.array_equal(pal, np.asarray(Image.open(corpus["palette_png"]).convert("RGB")))
    gray16 = decode_image(corpus["gray16_png"])  # high byte kept, as cv2 does
    assert np.array_equal(gray16, np.repeat(photo[..., 1:2], 3, axis=2))


def test_more_modes() -> None:
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    la = Image.merge("LA", [Image.fromarray(ramp), Image.fromarray(255 - ramp)])
    one_bit = Image.fromarray(ramp).convert("1")
    pa = Image.fromarray(255 - ramp)
    pa.putpalette([255 - i // 3 for i in range(768)])  # P, index i -> grey 255 - i
    pa.info["transparency"] = 0
    for im, want in ((la, ramp), (one_bit, np.asarray(one_bit.convert("L"))), (pa, ramp)):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        rgb = decode_bytes(buf.getvalue())
        assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
        assert _max_diff(rgb[..., 0], want.astype(np.uint8)) <= 1, im.mode


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied_as_cv2_imread_does(fmt: str) -> None:
    """The reference reads with cv2.imread, which shows a phone photo upright: each of the
    eight orientations gives cv2's pixels (shape exactly; values within JPEG's rounding)."""
    photo = skimage.data.chelsea()[:120, :170]      # not square: a turn changes the shape
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, fmt, exif=exif.tobytes(),
                                    **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
        data = buf.getvalue()
        want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        got = decode_bytes(data)
        assert got.shape == want.shape, (fmt, orientation)
        assert got.flags.c_contiguous
        assert _max_diff(got, want) <= 2, (fmt, orientation)
        if orientation in (5, 6, 7, 8):
            assert got.shape == (photo.shape[1], photo.shape[0], 3)


def test_exif_after_a_large_icc_profile_still_turns_the_photo() -> None:
    """An editor's JPEG: 240 KB of ICC profile segments, then the EXIF (orientation 6).
    cv2 shows it upright; a search of the first 128 KB for the EXIF missed it."""
    photo = skimage.data.chelsea()[:120, :170]
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=95, icc_profile=bytes(240_000))
    data = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes()
    assert payload.startswith(b"Exif\x00\x00")
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    tables = data.index(b"\xff\xdb")                 # after every APPn segment
    data = data[:tables] + app1 + data[tables:]
    assert data.index(b"Exif\x00\x00") > 1 << 17
    want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert want.shape == (170, 120, 3)                 # cv2 turns it
    got = decode_bytes(data)
    assert got.shape == want.shape and _max_diff(got, want) <= 2


def test_a_broken_exif_block_leaves_the_pixels_as_stored() -> None:
    photo = skimage.data.chelsea()
    data = _jpeg(Image.fromarray(photo), exif=b"Exif\x00\x00MM\x00*garbage")
    assert np.array_equal(decode_bytes(data), decode_bytes(_jpeg(Image.fromarray(photo))))


def test_decode_into_a_scratch_gives_the_same_pixels() -> None:
    """A worker's scratch, photo after photo (larger, smaller, turned by EXIF, not a JPEG,
    a corrupt JPEG): the pixels decoded without it; a JPEG's land in it, which grows to
    the largest photo and is given back by `release`."""
    photo = skimage.data.chelsea()
    turned = Image.Exif()
    turned[0x0112] = 6
    inputs = [_jpeg(photo), _jpeg(photo[:100, :150]), _jpeg(cv2.resize(photo, (903, 601))),
              _jpeg(photo[:50, :70]), _jpeg(Image.fromarray(photo), exif=turned.tobytes()),
              _png(photo[:90, :120]), _jpeg(photo[:80, :60])]
    scratch = DecodeScratch()
    for i, data in enumerate(inputs):
        got = decode_bytes(data, scratch=scratch)
        assert np.array_equal(got, decode_bytes(data)), i
        assert got.flags.c_contiguous
        lands = data[:3] == b"\xff\xd8\xff" and i != 4      # a turned photo is a copy
        assert np.shares_memory(got, scratch.take(1, 1)) == lands, i
    assert scratch.held_bytes == 601 * 903 * 3
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_bytes(inputs[0][:len(inputs[0]) // 2], scratch=scratch)
    scratch.release()
    assert scratch.held_bytes == 0
    assert np.array_equal(decode_bytes(inputs[0], scratch=scratch), decode_bytes(inputs[0]))


# ---------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("kind", sorted(EXPECT))
def test_corpus(corpus: dict[str, Path], kind: str) -> None:
    expected = EXPECT[kind]
    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("root ignores chmod 000; see test_permission_denied_simulated")
    if expected is None:
        rgb = decode_image(corpus[kind])
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        assert rgb.flags.c_contiguous
        canvas, place = letterbox(rgb, (500, 500))
        assert canvas.shape == (500, 500, 3) and place.orig_h == rgb.shape[0]
    else:
        with pytest.raises(ImageError, match=re.escape(expected)) as info:
            decode_image(corpus[kind])
        assert "\n" not in str(info.value)


def test_permission_denied_simulated(corpus: dict[str, Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Root reads mode-000 files, so the error path is exercised by refusing the open."""
    def refuse(*_: object, **__: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.os, "open", refuse)
    with pytest.raises(ImageError, match="^permission denied$"):
        decode_image(corpus["unreadable"])


def test_huge_header_refused_before_decoding(corpus: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    tj = image_io._turbojpeg()

    def no_decode(*_: object, **__: object) -> None:
        raise AssertionError("decoded a file whose header is over the limit")

    monkeypatch.setattr(tj, "decode", no_decode)
    monkeypatch.setattr(Image.Image, "load", no_decode)
    with pytest.raises(ImageError) as info:
        decode_image(corpus["huge_header_jpeg"])
    assert str(info.value) == (f"image is {HUGE_SIDE}x{HUGE_SIDE} = 400.0 Mpx, over the "
                               "50.0 Mpx limit (--max-pixels of pspnet serve, eval, bench "
                               "or batch)")
    with pytest.raises(ImageError, match="over the 50.0 Mpx limit"):
        decode_image(corpus["huge_header_png"])
    # Between the limit and Pillow's 2x "bomb" threshold the check is ours, also pre-load.
    with pytest.raises(ImageError, match="over the 0.1 Mpx limit"):
        decode_image(corpus["png_named_jpg"], max_pixels=300 * 451 - 1)


def test_max_pixels_is_inclusive(corpus: dict[str, Path]) -> None:
    assert decode_image(corpus["good_jpeg"], max_pixels=300 * 451).shape == (300, 451, 3)
    with pytest.raises(ImageError, match=r"451x300 = 0.1 Mpx"):
        decode_image(corpus["good_jpeg"], max_pixels=300 * 451 - 1)
    cmyk_small = patch_jpeg_size(corpus["cmyk_jpeg"].read_bytes(), 20000, 20000)
    with pytest.raises(ImageError, match="400.0 Mpx"):  # CMYK: header check before Pillow
        decode_bytes(cmyk_small)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(result, fifo), daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert isinstance(result[0], ImageError) and "not a regular file" in str(result[0])


def _capture(result: list[BaseException], path: Path) -> None:
    try:
        decode_image(path)
    except BaseException as e:  # handed back to the test
        result.append(e)


def test_oversized_file_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(b"\xff\xd8\xff" + b"\0" * 5000)
    with pytest.raises(ImageError, match="MB limit"):
        image_io.read_file(path, max_bytes=4096)


# ---------------------------------------------------------------------------------------
# letterbox


def seed_letterbox(bgr: np.ndarray, target: int = 500) -> tuple[np.ndarray, tuple[int, ...]]:
    """The reference step, literally: float scale, int() sizes, cv2 bilinear, centre pad."""
    h, w = bgr.shape[:2]
    scale = min(target / w, target / h)
    nw, nh = int(w * scale), int(h * scale)
    img = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = (target - nh) // 2, (target - nw) // 2
    out = np.zeros((target, target, 3), np.uint8)
    out[top:top + nh, left:left + nw] = img
    return out, (top, left, nh, nw)


SIZES = [(375, 500), (500, 375), (500, 333), (427, 640), (1, 1), (10, 1000), (1000, 10),
         (500, 500), (281, 500), (333, 498), (1024, 768), (37, 53)]


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_letterbox_matches_seed(h: int, w: int) -> None:
    rng = np.random.default_rng(h * 10007 + w)
    photo = cv2.resize(skimage.data.astronaut(), (w, h), interpolation=cv2.INTER_AREA)
    noise = rng.integers(0, 256, (h, w, 3), np.uint8)
    for rgb in (photo, noise):
        want, (top, left, nh, nw) = seed_letterbox(np.ascontiguousarray(rgb[:, :, ::-1]))
        want = want[:, :, ::-1]
        got, place = letterbox(rgb, (500, 500))
        assert (place.top, place.left, place.height, place.width) == (top, left, nh, nw)
        assert (place.orig_h, place.orig_w) == (h, w)
        assert place.scale == pytest.approx(min(500 / w, 500 / h))
        assert np.array_equal(got, want)


def test_letterbox_reuses_out_and_clears_padding() -> None:
    out = np.full((500, 500, 3), 77, np.uint8)
    rgb = skimage.data.rocket()  # 427 x 640 -> 333 x 500, top 83, bottom pad 84
    canvas, place = letterbox(rgb, (500, 500), out=out)
    assert canvas is out
    assert place == Placement(427, 640, 500 / 640, 83, 0, 333, 500)
    assert not out[:83].any() and not out[416:].any()
    assert np.array_equal(out, seed_letterbox(np.ascontiguousarray(rgb[:, :, ::-1]))[0][:, :, ::-1])
    small = np.full((100, 50, 3), 9, np.uint8)   # then a narrow image into the same buffer
    letterbox(small, (500, 500), out=out)
    assert not out[:, :125].any() and not out[:, 375:].any() and (out[:, 125:375] == 9).all()
    with pytest.raises(ValueError, match="out must be"):
        letterbox(rgb, (500, 500), out=np.empty((500, 400, 3), np.uint8))


def test_letterbox_no_op_when_already_target_size() -> None:
    rgb = cv2.resize(skimage.data.coffee(), (500, 375))
    canvas, place = letterbox(rgb, (500, 500))
    assert place == Placement(375, 500, 1.0, 62, 0, 375, 500)
    assert np.array_equal(canvas[62:437], rgb)
    square = np.random.default_rng(0).integers(0, 256, (500, 500, 3), np.uint8)
    canvas, place = letterbox(square, (500, 500))
    assert np.array_equal(canvas, square) and place.box() == (0, 0, 500, 500)


def test_letterbox_non_square_target() -> None:
    rgb = np.zeros((100, 100, 3), np.uint8)
    canvas, place = letterbox(rgb, (256, 512))
    assert canvas.shape == (256, 512, 3)
    assert place.box() == (0, 128, 256, 256)


@pytest.mark.parametrize(("h", "w"), [(375, 500), (500, 375), (3, 1500), (1500, 3)])
def test_letterbox_sizes_exact(h: int, w: int) -> None:
    scale, nh, nw = letterbox_size(h, w, (500, 500))
    assert max(nh, nw) == 500
    assert (nh, nw) == (max(1, int(Fraction(h * 500, max(h, w)))),
                        max(1, int(Fraction(w * 500, max(h, w)))))
    assert scale == min(500 / w, 500 / h)


def test_letterbox_size_float_trap() -> None:
    """w * (T / w) can land just under T in floats; the seed's int() then lost a pixel."""
    traps = [w for w in range(1, 2000) if int(w * (500 / w)) != 500]
    assert 499 in traps
    for w in traps:
        assert letterbox_size(w // 2 + 1, w, (500, 500))[2] == 500
    rgb = np.random.default_rng(0).integers(0, 256, (333, 499, 3), np.uint8)
    assert seed_letterbox(rgb)[1] == (83, 0, 333, 499)       # the seed: one column short
    assert letterbox(rgb, (500, 500))[1].box() == (83, 0, 333, 500)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 1000), st.integers(1, 1000))
def test_letterbox_size_is_exact_floor(h: int, w: int, th: int, tw: int) -> None:
    scale, nh, nw = letterbox_size(h, w, (th, tw))
    s = min(Fraction(tw, w), Fraction(th, h))
    assert nh == max(1, int(h * s)) and nw == max(1, int(w * s))
    assert nh <= th and nw <= tw and (nh == th or nw == tw)


@pytest.mark.parametrize(("first", "limit", "expect"), [
    (100_001, 100_002, 100_000),      # the size fstat gave: the whole file
    (11, 200_000, 100_000),           # grown since fstat: read on to the end
    (11, 50_001, 50_001),             # grown past the limit: limit bytes, read_file refuses
])
def test_read_all_reads_to_the_end_or_the_limit(tmp_path: Path, first: int, limit: int,
                                                expect: int) -> None:
    data = os.urandom(100_000)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert files._read_all(fd, first, limit) == data[:expect]
    finally:
        os.close(fd)


def test_a_jpeg_without_its_last_marker_decodes_when_its_one_scan_is_whole(
        corpus: dict[str, Path]) -> None:
    """Some encoders, and files cut after their last byte of pixels, lack the closing EOI:
    cv2 and browsers show them, and so does the daemon, with the same pixels as the whole
    file. A file cut inside its scan, or a progressive one (it could be cut between two
    scans), is still refused as truncated (and incomplete: watch mode waits for more)."""
    whole = decode_image(corpus["good_jpeg"])
    assert np.array_equal(decode_image(corpus["jpeg_without_eoi"]), whole)
    with pytest.raises(ImageError, match="truncated or corrupt JPEG") as info:
        decode_image(corpus["jpeg_cut_before_eoi"])
    assert info.value.incomplete
    progressive = corpus["progressive_jpeg"].read_bytes()
    assert progressive.endswith(b"\xff\xd9")
    with pytest.raises(ImageError, match="truncated or corrupt JPEG"):
        decode_bytes(progressive[:-2])


@pytest.mark.parametrize("pad", [b"\x00" * 4, b"\x12\x34\x56\x78", b"\x00" * 100],
                         ids=["zeros", "junk", "100-zeros"])
def test_a_jpeg_padded_before_its_last_marker_decodes_as_cv2_shows_it(
        corpus: dict[str, Path], pad: bytes) -> None:
    """Some cameras write stray bytes between the scan and the EOI; libjpeg warns ("N
    extraneous bytes before marker 0xd9") and cv2 and Pillow show every pixel. A
    sequential file decodes to cv2's pixels; a progressive one stays refused (junk and
    an EOI after a cut between two scans would read the same)."""
    whole = corpus["good_jpeg"].read_bytes()
    padded = whole[:-2] + pad + whole[-2:]
    want = cv2.imdecode(np.frombuffer(padded, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert np.array_equal(decode_bytes(padded), want)
    assert np.array_equal(want, decode_bytes(whole))
    progressive = corpus["progressive_jpeg"].read_bytes()
    if pad == b"\x00" * 100:                  # short pads are taken as scan bits: no warning
        with pytest.raises(ImageError, match="extraneous bytes before marker 0xd9"):
            decode_bytes(progressive[:-2] + pad + progressive[-2:])


def test_a_float_tiff_is_read_as_0_to_1_or_0_to_255() -> None:
    """A 32-bit float TIFF (cv2 cannot read one) came out black: Pillow's conversion
    clipped its 0..1 samples to 0 and 1. Now 0..1 is scaled, as 8-bit grey; larger
    values are taken as 0..255."""
    ramp = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    for scale, top in ((1.0, 255), (200.0, 200)):
        buf = io.BytesIO()
        Image.fromarray(ramp * scale, mode="F").save(buf, "TIFF")
        rgb = decode_bytes(buf.getvalue())
        assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
        assert (int(rgb.min()), int(rgb.max())) == (0, top)
        assert np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize(("brand", "name"), [(b"heic", "HEIC"), (b"mif1", "HEIF"),
                                             (b"avif", "AVIF")])
def test_a_heic_photo_is_named_with_the_fix(brand: bytes, name: str) -> None:
    """An iPhone's HEIC (or an AVIF) is not read; the answer says what it is and what to
    do, not only 'unrecognised format'."""
    data = b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1heic" + bytes(64)
    with pytest.raises(ImageError, match=f"a {name} photo, which is not read: convert it "
                                         "to JPEG first"):
        decode_bytes(data)
    with pytest.raises(ImageError, match=r"not an image \(unrecognised format\)"):
        decode_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))     # an MP4 stays unnamed
