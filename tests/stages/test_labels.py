"""pspnet.model.labels: logits/labels -> masks, mask files, ground truth, mmseg-exact IoU."""

from __future__ import annotations

import importlib
import io
import os
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pspnet.core.wire import Placement
from pspnet.model import labels as labels_mod
from pspnet.model import masks as masks_mod
from pspnet.model.image_io import letterbox_size
from pspnet.model.labels import (
    GroundTruthError,
    class_pixels,
    intersect_and_union,
    labels_from_labels,
    labels_from_logits,
    pixels_and_areas,
    read_ground_truth,
)
from pspnet.model.manifest import VOC_CLASSES, voc_palette
from pspnet.model.masks import MAX_NAME_BYTES, mask_path, write_mask
from pspnet.model.metrics import IoUAccumulator
from tests.bad_images import GT_EXPECT, write_corpus


def placement_for(h: int, w: int, size: tuple[int, int] = (500, 500)) -> Placement:
    scale, nh, nw = letterbox_size(h, w, size)
    return Placement(h, w, scale, (size[0] - nh) // 2, (size[1] - nw) // 2, nh, nw)


# ---------------------------------------------------------------------------------------
# logits -> labels


def reference_labels(logits: np.ndarray, p: Placement, size: tuple[int, int]) -> np.ndarray:
    """The specification, written the obvious way (whole-tensor interpolate and argmax)."""
    x = torch.from_numpy(logits.astype(np.float32))[None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    x = x[:, :, p.top:p.top + p.height, p.left:p.left + p.width]
    if (p.height, p.width) != (p.orig_h, p.orig_w):
        x = F.interpolate(x, size=(p.orig_h, p.orig_w), mode="bilinear", align_corners=False)
    return x.argmax(1)[0].numpy().astype(np.uint8)


@pytest.mark.parametrize(("h", "w"), [(375, 500), (500, 375), (333, 500), (427, 640),
                                      (1, 1), (10, 1000), (120, 90), (501, 499)])
def test_logits_match_reference(h: int, w: int) -> None:
    rng = np.random.default_rng(h * 7919 + w)
    logits = rng.standard_normal((21, 63, 63)).astype(np.float32)
    p = placement_for(h, w)
    got = labels_from_logits(logits, p, (500, 500))
    assert got.shape == (h, w) and got.dtype == np.uint8
    assert np.array_equal(got, reference_labels(logits, p, (500, 500)))


def test_logits_float16_and_readonly() -> None:
    logits = np.random.default_rng(1).standard_normal((5, 17, 13)).astype(np.float16)
    logits.flags.writeable = False  # as a frame straight off the wire
    p = placement_for(30, 40, (64, 64))
    assert np.array_equal(labels_from_logits(logits, p, (64, 64)),
                          reference_labels(logits, p, (64, 64)))


def test_logits_quadrants_hand_checked() -> None:
    """2 x 2 one-hot logits upsampled to 4 x 4: each pixel takes its nearest cell."""
    logits = np.zeros((4, 2, 2), np.float32)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        logits[k, r, c] = 1.0
    p = Placement(4, 4, 1.0, 0, 0, 4, 4)
    want = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], np.uint8)
    assert np.array_equal(labels_from_logits(logits, p, (4, 4)), want)


def test_logits_exact_crop_with_odd_padding() -> None:
    """500 x 375 in 500 x 500: top 62, bottom 63. The crop must be rows 62..436 exactly;
    the reference's `500 - pad_top` end would take row 437 too."""
    logits = np.zeros((3, 500, 500), np.float32)
    logits[1, 62] = 5.0        # first valid row
    logits[2, 437] = 5.0       # first padding row below the box
    p = placement_for(375, 500)
    assert p.box() == (62, 0, 375, 500)
    got = labels_from_logits(logits, p, (500, 500))
    assert got.shape == (375, 500)
    assert (got[0] == 1).all() and not (got[1:] == 1).any()
    assert not (got == 2).any()
    # Odd padding on the left/right: 375 wide -> left 62, right 63.
    logits = np.zeros((3, 500, 500), np.float32)
    logits[1, :, 62] = 5.0
    logits[2, :, 437] = 5.0
    got = labels_from_logits(logits, placement_for(500, 375), (500, 500))
    assert (got[:, 0] == 1).all() and not (got == 2).any()


def test_logits_tie_takes_first_class() -> None:
    logits = np.ones((4, 8, 8), np.float32)
    logits[2:] = 2.0
    assert (labels_from_logits(logits, Placement(8, 8, 1.0, 0, 0, 8, 8), (8, 8)) == 2).all()


def test_logits_refusals() -> None:
    p = Placement(8, 8, 1.0, 0, 0, 8, 8)
    with pytest.raises(ValueError, match="do not fit a uint8"):
        labels_from_logits(np.zeros((256, 2, 2), np.float32), p, (8, 8))
    bad = np.zeros((3, 2, 2), np.float32)
    bad[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        labels_from_logits(bad, p, (8, 8))
    with pytest.raises(ValueError, match="does not fit"):
        labels_from_logits(np.zeros((3, 2, 2), np.float32),
                           Placement(8, 8, 1.0, 4, 0, 8, 8), (8, 8))
    with pytest.raises(ValueError, match="float C x h x w"):
        labels_from_logits(np.zeros((3, 2, 2), np.int32), p, (8, 8))


# ---------------------------------------------------------------------------------------
# labels -> labels


@pytest.mark.parametrize(("h", "w"), [(375, 500), (333, 500), (427, 640), (1, 1),
                                      (10, 1000), (1000, 750)])
def test_labels_crop_and_nearest(h: int, w: int) -> None:
    full = np.random.default_rng(h + w).integers(0, 21, (500, 500), np.uint8)
    p = placement_for(h, w)
    got = labels_from_labels(full, p)
    crop = full[p.top:p.top + p.height, p.left:p.left + p.width]
    want = crop if crop.shape == (h, w) else cv2.resize(
        np.ascontiguousarray(crop), (w, h), interpolation=cv2.INTER_NEAREST)
    assert got.shape == (h, w) and np.array_equal(got, want)


def test_labels_nearest_hand_checked() -> None:
    full = np.full((6, 6), 9, np.uint8)
    full[1:5, 2:4] = [[1, 2], [3, 4], [5, 6], [7, 8]]  # box top 1, left 2, 4 x 2
    got = labels_from_labels(full, Placement(8, 4, 0.5, 1, 2, 4, 2))
    assert np.array_equal(got, np.repeat(np.repeat(full[1:5, 2:4], 2, axis=0), 2, axis=1))


# ---------------------------------------------------------------------------------------
# mask files


def test_write_and_read_mask_round_trip(tmp_path: Path) -> None:
    labels = np.random.default_rng(3).integers(0, 21, (37, 53), np.uint8)
    path = tmp_path / "sub" / "dir" / "x.png"
    write_mask(labels, path, voc_palette(21))
    with Image.open(path) as im:
        assert im.mode == "P" and im.format == "PNG"
        assert im.getpalette()[:63] == [v for c in voc_palette(21) for v in c]
        assert np.array_equal(np.asarray(im), labels)
    assert np.array_equal(read_ground_truth(path), labels)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp left behind


def test_write_mask_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = np.zeros((4, 4), np.uint8)
    target = tmp_path / "m.png"
    write_mask(np.ones((4, 4), np.uint8), target, voc_palette(21))
    seen: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        src, dst = Path(src), Path(dst)
        seen.append((src, dst))
        assert src.parent == dst.parent and src.name.startswith(".")
        assert src.stat().st_size > 0               # complete before it is renamed in
        assert (read_ground_truth(dst) == 1).all()  # the old mask is intact meanwhile
        real_replace(src, dst)

    monkeypatch.setattr(masks_mod.os, "replace", spy)
    write_mask(labels, target, voc_palette(21))
    assert len(seen) == 1 and not seen[0][0].exists()
    assert (read_ground_truth(target) == 0).all()

    def fail(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(masks_mod.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_mask(labels, tmp_path / "n.png", voc_palette(21))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]


def test_write_mask_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_mask(np.zeros((4, 4), np.int32), tmp_path / "a.png", voc_palette(21))
    with pytest.raises(ValueError, match="palette"):
        write_mask(np.zeros((4, 4), np.uint8), tmp_path / "a.png", [[0, 0, 300]])


@pytest.mark.parametrize("name", [
    "/data/VOC2012/JPEGImages/2007_000033.jpg", "../../etc/passwd", "C:\\images\\cat.JPG",
    ".hidden.jpg", "weird name;rm -rf $HOME.jpg", "café.jpg", "a/./b/../x.jpg",
])
def test_mask_path_mirrors_the_real_path(tmp_path: Path, name: str) -> None:
    """Below --out, the image's real path, its whole name and `.png`: nothing cut away."""
    real = Path(os.path.realpath(name))
    path = mask_path(tmp_path, name)
    assert path == tmp_path.resolve().joinpath(*real.parts[1:-1], real.name + ".png")


def test_mask_path_cuts_a_long_name_and_keeps_it_apart(tmp_path: Path) -> None:
    first, second = mask_path(tmp_path, "/p/" + "x" * 250 + "a.jpg"), \
        mask_path(tmp_path, "/p/" + "x" * 250 + "b.jpg")
    assert first != second and first.parent == second.parent == tmp_path.resolve() / "p"
    assert len(first.name.encode()) <= MAX_NAME_BYTES + len(".png")
    assert first.name.startswith("x" * 150) and first.suffix == ".png"


@pytest.mark.parametrize("char", ["é", "日", "🙂"])
def test_a_long_name_is_cut_between_characters(tmp_path: Path, char: str) -> None:
    """100 x "é" is 200 bytes: cut at byte 183 it ended inside a character, and the mask
    path could not be sent in an answer (the postprocess worker died, its batch failed).
    Every cut keeps whole characters, for 2-, 3- and 4-byte ones at each offset."""
    for pad in range(4):
        name = "a" * pad + char * (MAX_NAME_BYTES // len(char.encode()) + 1) + ".jpg"
        path = mask_path(tmp_path, "/p/" + name)
        path.name.encode("utf-8")                  # whole characters only: no surrogate
        assert len(path.name.encode()) <= MAX_NAME_BYTES + len(".png")
        stem = path.name.rsplit("~", 1)[0]
        assert name.startswith(stem) and len(stem.encode()) >= MAX_NAME_BYTES - 17 - 3


@pytest.mark.parametrize("name", ["", "/", "a\x00b.jpg"])
def test_mask_path_refuses(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        mask_path(tmp_path, name)


def test_mask_path_refuses_a_link_on_the_way_out(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="leaves the output directory"):
        mask_path(tmp_path / "out", "/data/cat.jpg")


def test_mask_path_refuses_symlink(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.png").write_bytes(b"")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cat.jpg.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(ValueError, match="symbolic link"):
        mask_path(tmp_path / "out", "/cat.jpg")


# ---------------------------------------------------------------------------------------
# ground truth


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("bad_images"))


@pytest.mark.parametrize("kind", sorted(GT_EXPECT))
def test_ground_truth_corpus(corpus: dict[str, Path], kind: str) -> None:
    good_shape = (300, 451)                   # good_jpeg's size
    pred = np.zeros(good_shape, np.uint8)
    expected = GT_EXPECT[kind]
    if expected is None:
        gt = read_ground_truth(corpus[kind])
        assert gt.shape == good_shape and gt.dtype == np.uint8 and (gt[:2] == 255).all()
        intersect_and_union(pred, gt, 21)
        return
    with pytest.raises(GroundTruthError) as info:
        intersect_and_union(pred, read_ground_truth(corpus[kind]), 21)
    assert expected in str(info.value) and "\n" not in str(info.value)


def _pngs(tmp_path: Path) -> dict[str, Path]:
    """Ground truths the plain-PNG path reads itself and ones it leaves to Pillow."""
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 21, (37, 52), np.uint8)
    ids[5:20] = 3
    out = {}

    def save(name: str, data: bytes) -> None:
        out[name] = tmp_path / f"{name}.png"
        out[name].write_bytes(data)

    write_mask(ids, tmp_path / "mask.png", voc_palette(21))
    out["mask (palette, unfiltered)"] = tmp_path / "mask.png"
    for mode in ("L", "P"):
        buf = io.BytesIO()
        Image.fromarray(ids).convert(mode).save(buf, format="PNG", optimize=True)
        save(f"pillow {mode} optimize", buf.getvalue())
    save("cv2 gray (filtered rows)", cv2.imencode(".png", ids)[1].tobytes())
    save("cv2 16-bit", cv2.imencode(".png", ids.astype(np.uint16) * 300)[1].tobytes())
    buf = io.BytesIO()
    Image.fromarray(ids > 5).save(buf, format="PNG")
    save("1-bit", buf.getvalue())
    good = out["mask (palette, unfiltered)"].read_bytes()
    at = good.index(b"IDAT")
    save("bad IDAT CRC", good[:at + 4] + bytes([good[at + 4] ^ 1]) + good[at + 5:])
    save("truncated", good[:len(good) - 30])
    save("no IEND", good[:good.index(b"IEND") - 4])
    at = good.index(b"IDAT") - 4                            # 5,000 empty tEXt chunks first
    empty = b"\0\0\0\0tEXt" + zlib.crc32(b"tEXt").to_bytes(4, "big")
    save("many chunks", good[:at] + empty * 5000 + good[at:])
    at = good.index(b"PLTE") - 4                            # palette indices, no palette
    save("no PLTE", good[:at] + good[at + 12 + int.from_bytes(good[at:at + 4], "big"):])
    at = good.index(b"IDAT") - 4                            # the zlib stream's own damage,
    size = int.from_bytes(good[at:at + 4], "big")           # every chunk CRC right
    stream = good[at + 8:at + 8 + size]

    def idat(body: bytes) -> bytes:
        crc = zlib.crc32(body, zlib.crc32(b"IDAT")).to_bytes(4, "big")
        return (good[:at] + len(body).to_bytes(4, "big") + b"IDAT" + body + crc
                + good[at + 12 + size:])

    save("bad zlib header", idat(bytes([stream[0], stream[1] ^ 1]) + stream[2:]))
    save("preset dictionary", idat(bytes([0x78, 0xBB]) + stream[2:]))
    save("wrong Adler-32", idat(stream[:-1] + bytes([stream[-1] ^ 1])))
    save("no Adler-32", idat(stream[:-4]))
    save("raw deflate", idat(stream[2:-4]))
    return out


def test_ground_truth_plain_png_path_reads_what_pillow_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path returns Pillow's pixels or steps aside; the errors stay Pillow's."""
    files = _pngs(tmp_path)

    def read(path: Path) -> np.ndarray | str:
        try:
            return read_ground_truth(path)
        except GroundTruthError as exc:
            return str(exc)

    fast = {name: read(path) for name, path in files.items()}
    taken = [name for name, path in files.items()
             if labels_mod._plain_png_pixels(path.read_bytes(), 37, 52) is not None]
    monkeypatch.setattr(labels_mod, "_plain_png_pixels", lambda *args: None)
    for name, path in files.items():
        pillow = read(path)
        if isinstance(pillow, str):
            assert isinstance(fast[name], str) and fast[name] == pillow, name
        else:
            assert isinstance(fast[name], np.ndarray) and np.array_equal(fast[name], pillow)
    assert "mask (palette, unfiltered)" in taken
    assert not {"bad IDAT CRC", "truncated", "cv2 16-bit", "1-bit", "many chunks",
                "bad zlib header", "preset dictionary", "wrong Adler-32", "no Adler-32",
                "raw deflate",
                } & set(taken)


def test_ground_truth_grayscale_taken_as_is(tmp_path: Path) -> None:
    ids = np.random.default_rng(5).integers(0, 256, (20, 30), np.uint8)
    Image.fromarray(ids).save(tmp_path / "gt.png")
    assert np.array_equal(read_ground_truth(tmp_path / "gt.png"), ids)
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(GroundTruthError, match="not an image"):
        read_ground_truth(tmp_path / "junk.png")


# ---------------------------------------------------------------------------------------
# IoU: against mmseg 1.2.2's IoUMetric


def mmseg_iou_metric() -> Any:
    """mmseg's IoUMetric, through the shim when present, else its module directly."""
    try:
        from pspnet.build_model import mmseg_shim
        mmseg_shim.install()
        from mmseg.evaluation.metrics import IoUMetric

        return IoUMetric
    except Exception:  # the shim is somebody else's work in progress
        pass
    try:
        return importlib.import_module("mmseg.evaluation.metrics.iou_metric").IoUMetric
    except Exception as e:
        pytest.skip(f"mmseg IoUMetric not importable: {e}")


def random_maps(rng: np.random.Generator, shape: tuple[int, int], num_classes: int,
                dtype: Any = np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """Prediction and label with ignore pixels and out-of-range values on both sides."""
    hi = min(num_classes + 5, 255)
    pred = rng.integers(0, hi, shape).astype(dtype)
    label = pred.copy()
    flip = rng.random(shape) < 0.4
    label[flip] = rng.integers(0, hi, int(flip.sum()))
    label[rng.random(shape) < 0.1] = 255
    return pred, label


CASES = [(21, 255, np.uint8), (2, 255, np.uint8), (150, 255, np.uint8), (21, 0, np.uint8),
         (21, 255, np.int64), (19, -1, np.int64), (255, 255, np.uint8)]


@pytest.mark.parametrize(("num_classes", "ignore", "dtype"), CASES)
def test_areas_and_metrics_match_mmseg(num_classes: int, ignore: int, dtype: Any) -> None:
    IoUMetric = mmseg_iou_metric()
    rng = np.random.default_rng(num_classes * 31 + ignore + 7)
    acc = IoUAccumulator(num_classes)
    theirs = []
    for shape in [(37, 53), (60, 41), (1, 1), (128, 96)]:
        pred, label = random_maps(rng, shape, num_classes, dtype)
        if dtype == np.int64:
            pred[0, 0], label[-1, -1] = -3, -1  # negative values: outside histc's range
        ours = intersect_and_union(pred, label, num_classes, ignore)
        ref = IoUMetric.intersect_and_union(torch.from_numpy(pred).long(),
                                            torch.from_numpy(label).long(),
                                            num_classes, ignore)
        assert ours.dtype == np.int64 and ours.shape == (4, num_classes)
        assert np.array_equal(ours, torch.stack(ref).numpy().astype(np.int64))
        acc.add(ours)
        theirs.append(ref)
    totals = [sum(t[i] for t in theirs) for i in range(4)]  # as compute_metrics sums them
    ref_metrics = IoUMetric.total_area_to_metrics(*totals, metrics=["mIoU"])
    summary = acc.summary()
    assert summary["images"] == 4
    assert abs(summary["aAcc"] / 100 - float(ref_metrics["aAcc"])) <= 1e-6
    for ours_key, ref_key in (("mIoU", "IoU"), ("mAcc", "Acc")):
        ref_value = float(np.nanmean(ref_metrics[ref_key]))
        assert abs(summary[ours_key] / 100 - ref_value) <= 1e-6
        per_class = np.array([c[ref_key] for c in summary["per_class"]]) / 100
        assert np.array_equal(np.isnan(per_class), np.isnan(ref_metrics[ref_key]))
        np.testing.assert_allclose(per_class, ref_metrics[ref_key], rtol=0, atol=1e-6)


def test_compute_metrics_rounded_like_mmseg() -> None:
    """Through IoUMetric.compute_metrics itself (what mmseg logs, 2 decimals)."""
    IoUMetric = mmseg_iou_metric()
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": VOC_CLASSES}
    rng = np.random.default_rng(11)
    acc = IoUAccumulator(21)
    results = []
    for _ in range(3):
        pred, label = random_maps(rng, (50, 70), 21)
        acc.add(intersect_and_union(pred, label, 21))
        results.append(IoUMetric.intersect_and_union(
            torch.from_numpy(pred).long(), torch.from_numpy(label).long(), 21, 255))
    ref = metric.compute_metrics(results)
    summary = acc.summary(VOC_CLASSES)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert abs(summary[key] - float(ref[key])) <= 0.005 + 1e-9


def test_absent_classes_are_nan_and_skipped() -> None:
    acc = IoUAccumulator(4)
    pred = np.array([[0, 0, 2, 2]], np.uint8)   # class 2 predicted, never in the label
    label = np.array([[0, 1, 1, 255]], np.uint8)  # class 3 nowhere
    acc.add(intersect_and_union(pred, label, 4))
    s = acc.summary()
    iou = [c["IoU"] for c in s["per_class"]]
    accs = [c["Acc"] for c in s["per_class"]]
    assert iou[:3] == [50.0, 0.0, 0.0] and np.isnan(iou[3])
    assert accs[:2] == [100.0, 0.0] and np.isnan(accs[2]) and np.isnan(accs[3])
    assert s["mIoU"] == pytest.approx(50 / 3) and s["mAcc"] == pytest.approx(50.0)
    assert s["aAcc"] == pytest.approx(100 / 3)
    empty = IoUAccumulator(4).summary()
    assert np.isnan(empty["aAcc"]) and np.isnan(empty["mIoU"]) and empty["images"] == 0


def test_shape_mismatch_is_a_ground_truth_error() -> None:
    with pytest.raises(GroundTruthError, match="ground truth is 3x4 but the prediction is 4x3"):
        intersect_and_union(np.zeros((4, 3), np.uint8), np.zeros((3, 4), np.uint8), 21)
    with pytest.raises(TypeError):
        intersect_and_union(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8), 21)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 256), st.integers(-2, 260), st.integers(0, 2**31 - 1))
def test_fast_path_equals_generic_path(num_classes: int, ignore: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 256, (23, 17), np.uint8)
    label = rng.integers(0, 256, (23, 17), np.uint8)
    same = rng.random(label.shape) < 0.5
    label[same] = pred[same]
    fast = intersect_and_union(pred, label, num_classes, ignore)
    slow = intersect_and_union(pred.astype(np.int64), label.astype(np.int64), num_classes,
                               ignore)
    assert np.array_equal(fast, slow)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 256), st.integers(-2, 260), st.integers(0, 2**31 - 1),
       st.integers(1, 40), st.sampled_from([1, 2, 21, 200, 256]))
def test_pixels_and_areas_is_the_count_and_the_areas(num_classes: int, ignore: int,
                                                     seed: int, band: int,
                                                     pred_top: int) -> None:
    """One 2-D histogram gives what class_pixels and the generic areas give apart, also
    when it is counted in bands of rows (as a large map is), and whether the predictions
    stay below the classes (a model's labels; its prediction axis then stops there) or
    not."""
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, pred_top, (23, 17), np.uint8)
    label = rng.integers(0, 256, (23, 17), np.uint8)
    same = rng.random(label.shape) < 0.5
    label[same] = pred[same]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(labels_mod, "HIST_BAND_PIXELS", band * 17)
        counts, areas = pixels_and_areas(pred, label, num_classes, ignore)
    assert np.array_equal(counts, np.bincount(pred.ravel(), minlength=256))
    assert np.array_equal(counts, class_pixels(pred))
    slow = intersect_and_union(pred.astype(np.int64), label.astype(np.int64), num_classes,
                               ignore)
    assert np.array_equal(areas, slow)
    with pytest.raises(ValueError, match="uint8"):      # class_pixels: uint8 maps only
        pixels_and_areas(pred.astype(np.int64), label, num_classes, ignore)


@pytest.mark.parametrize("band_bytes", [1, 3 * 30, 1 << 18])
def test_mask_png_is_what_pillow_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       band_bytes: int) -> None:
    """The hand-written PNG: Pillow reads it as a palette image with the labels, the
    palette and the recorded source; the source survives non-ASCII names; compressed a
    row, three rows or the whole map at a time."""
    monkeypatch.setattr(masks_mod, "PNG_BAND_BYTES", band_bytes)
    labels = np.random.default_rng(5).integers(0, 21, (41, 29), np.uint8)
    labels[:, :10] = 7                                      # runs, as masks have
    source = tmp_path / "bild-ü.jpg"
    source.write_bytes(b"x")
    target = tmp_path / "m.png"
    write_mask(labels, target, voc_palette(21), source=source)
    with Image.open(target) as im:
        im.load()
        assert im.mode == "P" and im.format == "PNG" and im.size == (29, 41)
        assert im.getpalette()[:63] == [v for c in voc_palette(21) for v in c]
        assert np.array_equal(np.asarray(im), labels)
    assert masks_mod.recorded_source(target) == masks_mod.mask_source(source)
    assert np.array_equal(read_ground_truth(target), labels)


def test_accumulator_merge_and_validation() -> None:
    rng = np.random.default_rng(2)
    areas = [intersect_and_union(*random_maps(rng, (20, 20), 21), 21) for _ in range(6)]
    whole, a, b = IoUAccumulator(21), IoUAccumulator(21), IoUAccumulator(21)
    for i, x in enumerate(areas):
        whole.add(x)
        (a if i % 2 else b).add(x)
    a.merge(b)
    assert a.images == whole.images == 6 and np.array_equal(a.areas, whole.areas)
    with pytest.raises(ValueError):
        a.add(np.zeros((4, 20), np.int64))
    with pytest.raises(ValueError):
        a.merge(IoUAccumulator(20))


def test_table_layout_matches_prettytable() -> None:
    rng = np.random.default_rng(4)
    acc = IoUAccumulator(21)
    pred, label = random_maps(rng, (40, 40), 21)
    label[label == 20] = 0  # make class 20 absent from the ground truth: Acc nan
    pred[pred == 20] = 1
    acc.add(intersect_and_union(pred, label, 21))
    text = acc.table(VOC_CLASSES)
    s = acc.summary(VOC_CLASSES)
    prettytable = pytest.importorskip("prettytable")
    table = prettytable.PrettyTable()
    table.add_column("Class", list(VOC_CLASSES))
    table.add_column("IoU", [np.round(c["IoU"], 2) for c in s["per_class"]])
    table.add_column("Acc", [np.round(c["Acc"], 2) for c in s["per_class"]])
    assert text.startswith("per class results:\n" + table.get_string() + "\n")
    assert "|  tvmonitor  |  nan  |  nan  |" in text
    assert text.splitlines()[-1].startswith("aAcc: ")
