"""pspnet.model.upsample_argmax: the boundary-only labels equal the dense computation at
every pixel, and today's torch resize (F.interpolate, crop, F.interpolate, argmax) except
at float near-ties (issue 21)."""

from __future__ import annotations

import zlib

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pspnet.core.wire import Placement
from pspnet.model import upsample_argmax as ua
from pspnet.model.image_io import letterbox_size
from pspnet.model.labels import class_pixels, labels_from_logits
from pspnet.model.manifest import Manifest

NEAR_TIE = 1e-4          # top-2 resized logits closer than this: a label either way is fair


def placement_for(h: int, w: int, size: tuple[int, int]) -> Placement:
    scale, nh, nw = letterbox_size(h, w, size)
    return Placement(h, w, scale, (size[0] - nh) // 2, (size[1] - nw) // 2, nh, nw)


def torch_resized(logits: np.ndarray, p: Placement, size: tuple[int, int],
                  align_corners: bool) -> torch.Tensor:
    """Today's numbers: C x orig_h x orig_w, the whole tensor the obvious way."""
    x = torch.from_numpy(np.array(logits, np.float32))[None]
    if x.shape[2:] != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    x = x[:, :, p.top:p.top + p.height, p.left:p.left + p.width]
    if (p.height, p.width) != (p.orig_h, p.orig_w):
        x = F.interpolate(x, size=(p.orig_h, p.orig_w), mode="bilinear", align_corners=False)
    return x[0]


def near_ties(resized: torch.Tensor) -> np.ndarray:
    top2 = resized.topk(2, dim=0).values if resized.shape[0] > 1 else None
    if top2 is None:
        return np.zeros(resized.shape[1:], np.bool_)
    return ((top2[0] - top2[1]) < NEAR_TIE).numpy()


def smooth_logits(rng: np.random.Generator, classes: int, h: int, w: int,
                  blob: int = 6) -> np.ndarray:
    """Logits with regions and boundaries like a network's: coarse noise, upsampled."""
    coarse = rng.standard_normal((classes, blob, blob)).astype(np.float32) * 8
    return np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_CUBIC) for c in coarse])


# ---------------------------------------------------------------------------------------
# the weights


@pytest.mark.parametrize(("n_in", "n_out"), [(33, 257), (63, 500), (257, 192), (192, 3000),
                                             (500, 80), (7, 7), (1, 5), (5, 1), (2, 3)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_taps_are_torch_weights(n_in: int, n_out: int, align_corners: bool) -> None:
    """Each tap table, as a matrix, is torch's resize of the identity (to float rounding:
    a torch built without fused multiply-add rounds the source index twice)."""
    i0, i1, w0, w1 = ua.linear_taps(n_in, n_out, align_corners, 0, n_out)
    ours = np.zeros((n_out, n_in))
    np.add.at(ours, (np.arange(n_out), i0), w0)
    np.add.at(ours, (np.arange(n_out), i1), w1)
    eye = torch.eye(n_in)[None, :, :, None]                     # 1 x n_in(C) x n_in x 1
    theirs = F.interpolate(eye, size=(n_out, 1), mode="bilinear",
                           align_corners=align_corners)[0, :, :, 0].numpy().T
    assert np.allclose(ours, theirs, atol=1e-6)
    assert (w0 >= 0).all() and (w1 >= 0).all()
    assert np.abs(w0.astype(np.float64) + w1 - 1).max() <= 2 ** -23


# ---------------------------------------------------------------------------------------
# boundary == dense, exactly


CASES = [  # (logits h, w, input side, photo h, w): demo, PSPNet, down-scaling, odd shapes
    (33, 33, 257, 375, 500), (33, 33, 257, 500, 375), (63, 63, 500, 375, 500),
    (63, 63, 500, 333, 500), (33, 33, 257, 100, 80), (33, 33, 257, 1, 1),
    (33, 33, 257, 10, 1000), (63, 63, 500, 1200, 900), (64, 64, 64, 50, 64),
    (17, 13, 64, 30, 40), (1, 1, 8, 5, 7), (33, 33, 257, 257, 257)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("kind", ["smooth", "noise", "near-ties"])
def test_boundary_equals_dense(case, align_corners: bool, kind: str, monkeypatch) -> None:
    lh, lw, side, h, w = case
    rng = np.random.default_rng(zlib.crc32(repr((case, align_corners, kind)).encode()))
    if kind == "noise":              # boundaries everywhere
        logits = rng.standard_normal((21, lh, lw)).astype(np.float32)
    else:
        logits = smooth_logits(rng, 21, lh, lw)
    if kind == "near-ties":          # two classes apart by a few ulps at every point
        logits[3] = logits[0] + rng.integers(-2, 3, (lh, lw)) * np.spacing(np.abs(logits[0]))
    p = placement_for(h, w, (side, side))
    dense = ua.dense_labels(logits, p, (side, side), align_corners)
    assert dense.shape == (h, w) and dense.dtype == np.uint8
    # the sparse path even where it would hand over to the dense one (noise)
    monkeypatch.setattr(ua, "SPARSE_COST", 0)
    sparse = ua.boundary_labels(logits, p, (side, side), align_corners)
    assert np.array_equal(sparse, dense)
    monkeypatch.undo()
    assert np.array_equal(ua.boundary_labels(logits, p, (side, side), align_corners), dense)
    differ = dense != torch_resized(logits, p, (side, side), align_corners).argmax(0).numpy()
    assert not (differ & ~near_ties(torch_resized(logits, p, (side, side), align_corners))).any()


GROUPING_CASES = [*CASES, (33, 33, 257, 477, 211), (33, 33, 257, 424, 641),
                  (33, 33, 257, 901, 1203), (33, 33, 257, 97, 3)]


def case_logits(rng: np.random.Generator, kind: str, lh: int, lw: int) -> np.ndarray:
    """21 classes of smooth, noise or near-tie logits (class 3 within 2 ulps of class 0)."""
    if kind == "noise":
        return rng.standard_normal((21, lh, lw)).astype(np.float32)
    logits = smooth_logits(rng, 21, lh, lw)
    if kind == "near-ties":
        logits[3] = logits[0] + rng.integers(-2, 3, (lh, lw)) * np.spacing(np.abs(logits[0]))
    return logits


@pytest.mark.parametrize("case", GROUPING_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("kind", ["smooth", "noise", "near-ties"])
def test_row_cells_equal_the_per_row_test(case, align_corners: bool, kind: str,
                                          monkeypatch) -> None:
    """Steps a and b per row cell (on the crop rows) give the labels of the per-row path,
    bit for bit, on the sparse path (SPARSE_COST 0: no hand-over to the dense one)."""
    lh, lw, side, h, w = case
    rng = np.random.default_rng(zlib.crc32(repr(("rows", case, align_corners, kind)).encode()))
    logits = case_logits(rng, kind, lh, lw)
    p = placement_for(h, w, (side, side))
    monkeypatch.setattr(ua, "SPARSE_COST", 0)
    monkeypatch.setattr(ua, "GROUP_ROWS", False)
    old = ua.boundary_labels(logits, p, (side, side), align_corners)
    monkeypatch.setattr(ua, "GROUP_ROWS", True)
    monkeypatch.setattr(ua, "ROW_GROUP_MIN", 0)         # at every size, not only large ones
    new = ua.boundary_labels(logits, p, (side, side), align_corners)
    assert np.array_equal(new, old)


@pytest.mark.parametrize("case", GROUPING_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("kind", ["smooth", "noise", "near-ties"])
def test_run_pixels_equal_the_cell_test(case, align_corners: bool, kind: str,
                                        monkeypatch) -> None:
    """Step c on every pixel of an undecided run (RUN_PIXELS) and the cell test before it
    give the dense path's labels, bit for bit, on the per-row sparse path."""
    lh, lw, side, h, w = case
    rng = np.random.default_rng(zlib.crc32(repr(("pixels", case, align_corners, kind)).encode()))
    logits = case_logits(rng, kind, lh, lw)
    p = placement_for(h, w, (side, side))
    dense = ua.dense_labels(logits, p, (side, side), align_corners)
    monkeypatch.setattr(ua, "SPARSE_COST", 0)
    monkeypatch.setattr(ua, "GROUP_ROWS", False)
    for run_pixels in (False, True):
        monkeypatch.setattr(ua, "RUN_PIXELS", run_pixels)
        assert np.array_equal(ua.boundary_labels(logits, p, (side, side), align_corners),
                              dense), run_pixels


def test_row_plan_covers_every_row() -> None:
    axis = ua.AxisResize(33, 257, 32, 193, 375, False)
    plan = ua.row_plan(axis)
    assert ua.row_plan(ua.AxisResize(33, 257, 32, 193, 375, False)) is plan
    assert plan.width.sum() == 375 and (plan.width >= 1).all()
    assert len(plan.q0) <= 193 and (plan.q1 >= plan.q0).all()
    assert len(plan.a0) == 193 and not plan.a0.flags.writeable


def test_ties_go_to_the_first_class() -> None:
    p = placement_for(40, 60, (64, 64))
    flat = np.zeros((5, 9, 9), np.float32)
    assert (ua.boundary_labels(flat, p, (64, 64)) == 0).all()
    pair = np.full((5, 9, 9), -3.0, np.float32)
    pair[2] = pair[4] = 1.5                       # classes 2 and 4 tie everywhere
    assert (ua.boundary_labels(pair, p, (64, 64)) == 2).all()


def test_one_class_and_tiny_or_huge_logits() -> None:
    p = placement_for(30, 20, (16, 16))
    rng = np.random.default_rng(5)
    assert (ua.boundary_labels(rng.standard_normal((1, 4, 4)), p, (16, 16)) == 0).all()
    for scale in (1e-30, 1e-42, 1e25):            # subnormal and large magnitudes
        logits = (smooth_logits(rng, 6, 5, 5, blob=3) * scale).astype(np.float32)
        assert np.array_equal(ua.boundary_labels(logits, p, (16, 16)),
                              ua.dense_labels(logits, p, (16, 16)))


@pytest.mark.parametrize(("value", "message"), [(np.nan, "NaN"), (np.inf, "NaN or infinity"),
                                                (3e30, "broken model")])
def test_broken_logits_are_refused(value: float, message: str) -> None:
    logits = np.zeros((3, 4, 4), np.float32)
    logits[1, 2, 2] = value
    with pytest.raises(ValueError, match=message):
        labels_from_logits(logits, placement_for(8, 8, (8, 8)), (8, 8))


def test_plans_are_cached_and_read_only() -> None:
    axis = ua.AxisResize(33, 257, 32, 192, 375, True)
    plan = ua.column_plan(axis)
    assert ua.column_plan(ua.AxisResize(33, 257, 32, 192, 375, True)) is plan
    assert not plan.a0.flags.writeable and not plan.point_a0.flags.writeable
    # every output column in exactly one cell, every cell in one run of at most RUN_CELLS
    assert plan.cell_width.sum() == 375 and (plan.cell_width >= 1).all()
    assert plan.valid.sum() == len(plan.cell_start) and plan.slots <= ua.RUN_CELLS


# ---------------------------------------------------------------------------------------
# trained logits (the shipped DeepLabV3-MobileNetV2, align_corners=True)


@pytest.fixture(scope="module")
def trained_logits(trained_model) -> list[tuple[str, np.ndarray, Placement]]:
    """Real logits of the sample photos and the bird, and of three of them enlarged to a
    2000-pixel long side (a big photo's placement: stage 2 upsamples ~8x)."""
    from pspnet.build_model import trained
    from pspnet.build_model.samples import sample_images
    from studies.postprocess_cost import model_logits

    shots = [*sample_images(), ("bird", trained.bird()[0])]
    for name, rgb in list(shots[:3]):
        h, w = rgb.shape[:2]
        s = 2000 / max(h, w)
        shots.append((f"big-{name}", cv2.resize(rgb, (round(w * s), round(h * s)),
                                                interpolation=cv2.INTER_CUBIC)))
    return model_logits(trained_model, shots)


def test_trained_logits_boundary_dense_and_torch(trained_model, trained_logits) -> None:
    """0 pixels differ from the dense computation; against today's torch path only near
    ties differ, and they are counted."""
    manifest = Manifest.read(trained_model)
    assert manifest.align_corners
    size = manifest.input_size
    pixels = ties = differ = 0
    for name, logits, place in trained_logits:
        labels = labels_from_logits(logits, place, size, manifest.align_corners)
        assert np.array_equal(labels, ua.dense_labels(logits, place, size, True)), name
        resized = torch_resized(logits, place, size, True)
        tie = near_ties(resized)
        moved = labels != resized.argmax(0).numpy()
        assert not (moved & ~tie).any(), name
        pixels += labels.size
        ties += int(tie.sum())
        differ += int(moved.sum())
    print(f"FIGURE trained logits, {len(trained_logits)} photos, {pixels} pixels: "
          f"{ties} near-tie pixels (top-2 within {NEAR_TIE}), {differ} labels differ from "
          "torch's, 0 elsewhere")


def test_trained_logits_row_cells_equal_the_per_row_test(trained_model, trained_logits,
                                                         monkeypatch) -> None:
    """The row grouping on real logits (align_corners=True, sample photos and enlarged
    ones): the same labels as step a per output row, on the sparse path."""
    size = Manifest.read(trained_model).input_size
    monkeypatch.setattr(ua, "SPARSE_COST", 0)
    for name, logits, place in trained_logits:
        monkeypatch.setattr(ua, "GROUP_ROWS", False)
        old = ua.boundary_labels(logits, place, size, True)
        monkeypatch.setattr(ua, "GROUP_ROWS", True)
        monkeypatch.setattr(ua, "ROW_GROUP_MIN", 0)         # at every size, not only large ones
        assert np.array_equal(ua.boundary_labels(logits, place, size, True), old), name


# class counts taken on the way (a large photo is not counted pixel by pixel)


def counted_paths(monkeypatch):
    """Every sparse path in turn, counting wherever a compact form exists."""
    monkeypatch.setattr(ua, "SPARSE_COST", 0)
    monkeypatch.setattr(ua, "COUNT_MIN_PIXELS", 0)
    monkeypatch.setattr(ua, "COUNT_COMPACT", 1)
    for group_rows, run_pixels in ((True, True), (False, True), (False, False)):
        monkeypatch.setattr(ua, "GROUP_ROWS", group_rows)
        monkeypatch.setattr(ua, "ROW_GROUP_MIN", 0 if group_rows else 4)
        monkeypatch.setattr(ua, "RUN_PIXELS", run_pixels)
        yield f"group_rows={group_rows} run_pixels={run_pixels}"


@pytest.mark.parametrize("case", GROUPING_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("kind", ["smooth", "noise", "near-ties"])
def test_counts_on_the_way_equal_class_pixels(case, align_corners: bool, kind: str,
                                              monkeypatch) -> None:
    """The counts from the compact form, corrected where step c wrote pixels, are
    `class_pixels` of the labels, on every sparse path; the labels are unchanged."""
    lh, lw, side, h, w = case
    rng = np.random.default_rng(zlib.crc32(repr(("counts", case, align_corners, kind)).encode()))
    logits = case_logits(rng, kind, lh, lw)
    p = placement_for(h, w, (side, side))
    dense = ua.dense_labels(logits, p, (side, side), align_corners)
    for path in counted_paths(monkeypatch):
        labels, counts = ua.counted_boundary_labels(logits, p, (side, side), align_corners)
        assert np.array_equal(labels, dense), path
        assert counts is not None and counts.dtype == np.int64 and counts.shape == (256,)
        assert np.array_equal(counts, class_pixels(labels)), path


def test_trained_logits_counts_on_the_way(trained_model, trained_logits, monkeypatch) -> None:
    """Real logits (sample photos, enlarged ones): the counts taken on the way are
    `class_pixels` of the labels, on every sparse path, and several classes are found."""
    size = Manifest.read(trained_model).input_size
    classes = set()
    for path in counted_paths(monkeypatch):
        for name, logits, place in trained_logits:
            labels, counts = ua.counted_boundary_labels(logits, place, size, True)
            assert counts is not None, (name, path)
            assert np.array_equal(counts, class_pixels(labels)), (name, path)
            classes |= set(np.flatnonzero(counts).tolist())
    assert len(classes) >= 4


def test_counts_on_the_way_only_for_large_photos() -> None:
    """By default the labels are counted on the way from COUNT_MIN_PIXELS up (calcHist
    costs as little below it), and `labels_from_logits` never counts."""
    rng = np.random.default_rng(7)
    logits = smooth_logits(rng, 21, 33, 33)
    small = placement_for(375, 500, (257, 257))
    assert ua.counted_boundary_labels(logits, small, (257, 257))[1] is None
    large = placement_for(1200, 1600, (257, 257))
    labels, counts = ua.counted_boundary_labels(logits, large, (257, 257))
    assert labels.size >= ua.COUNT_MIN_PIXELS
    assert counts is not None and np.array_equal(counts, class_pixels(labels))
    assert ua.counted_boundary_labels(logits, large, (257, 257), count=False)[1] is None
    assert np.array_equal(labels_from_logits(logits, large, (257, 257)), labels)


def test_read_only_logits_are_labelled_without_a_warning() -> None:
    """Ray and ZeroMQ hand the postprocess read-only logits; torch warns once per process
    about such an array, so a fresh interpreter shows whether the warning reaches stderr
    (it did in every `pspnet batch` run)."""
    import subprocess
    import sys

    code = """
import numpy as np
from pspnet.core.wire import Placement
from pspnet.model import upsample_argmax as ua
logits = np.random.default_rng(1).standard_normal((5, 9, 9)).astype(np.float32)
logits.flags.writeable = False
p = Placement(orig_h=100, orig_w=100, scale=0.64, top=0, left=0, height=64, width=64)
print(int(ua.dense_labels(logits, p, (64, 64)).max()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().isdigit()
    assert "not writable" not in done.stderr and done.stderr.strip() == ""
