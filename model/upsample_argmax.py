"""Class ids at the photo's size from the network's logits, computed only where they change.

The labels are the argmax (first maximum wins) of the logits resized as mmseg resizes
them: bilinear to the model input (the network's align_corners), an exact crop of the
letterbox box, bilinear to the original size (half-pixel; only when the letterbox scaled).
Each step is linear and separable, and every weight is non-negative, so each output
pixel's logits are a convex combination of a small window of the network's logits (at most
2 x 2 input pixels per step, so at most 4 x 4 logits). Inside a region where one class
beats every other by a margin at every point of the window, the argmax is that class,
whatever the weights; only the pixels near a class boundary need their logits computed.
A 12 Mpx photo's mask then costs about as much as its boundary, not its 21 x 12 M logits.

The numbers (`dense_labels` computes them at every pixel; `boundary_labels` is proved to
give the same labels, see its docstring):

1. R = Ay . L per class: Ay (out_h x h) composes both row resizes (weights computed as
   torch computes them, in float32, multiplied out in float64 and rounded to float32), one
   float32 matrix product (torch, so the postprocess worker's thread setting holds).
2. R1 = w0 * R[:, :, a0] + w1 * R[:, :, a1]: the column resize to the input size, at the
   crop's columns (float32, in this order).
3. V = v0 * R1[:, :, b0] + v1 * R1[:, :, b1]: the column resize to the original width.
4. argmax over classes with a running strict ">" (the first maximum wins, as torch's).

They agree with today's torch `F.interpolate` path to float rounding (torch sums in
another order, and may fuse multiply-adds), so labels differ from it only at near-ties:
pixels whose two best logits are within about 2^-19 of the largest logit magnitude.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pspnet.core.wire import Placement

# Logits arrive read-only (a ZeroMQ frame, a Ray block) and go to torch.from_numpy for the
# row matmul, which only reads them; torch's warning about that (printed in every Ray
# postprocess task of `pspnet batch`) is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                        category=UserWarning)

UNDECIDED = 255                  # never a class id (at most 255 classes: ids 0..254)
MAX_LOGIT = 2.0 ** 100           # larger magnitudes mean a broken model (and would overflow)
MARGIN_REL = 2.0 ** -12          # margin = MARGIN_REL * max|logit| + MARGIN_ABS
MARGIN_ABS = 2.0 ** -100         # covers float32 underflow (< 2^-145 in all) and all-zero logits
RUN_CELLS = 8                    # most crop columns decided together by one window test
SPARSE_COST = 90                 # CPU of one (class, row, run) left undecided by step a,
                                 # in logits of the dense path (measured: ~0.7 us vs ~8 ns)
GROUP_ROWS = True                # steps a, b per row cell (output rows sharing crop rows)
ROW_GROUP_MIN = 4                # ... when out_h >= this x crop rows (measured: pays at 15 x,
                                 # a 4000 x 3000 photo; costs ~0.2 ms at 2 x, 500 x 375)
RUN_PIXELS = True                # step c on every pixel of an undecided run, no step b
PLAN_CACHE = 64                  # axis plans kept: one per (photo side, box) seen lately
COUNT_MIN_PIXELS = 1 << 20       # labels counted on their compact form from this size up
COUNT_COMPACT = 4                # ... when it has this many times fewer columns (48 Mpx: ~30
                                 # x); labels + counts 111 -> 70 ms at 48 Mpx, 33 -> 26 ms at
                                 # 12 Mpx; at 0.2 Mpx +-0.1 ms against calcHist (stop 34)

F32 = np.float32
BREAKS = np.int32                # running counts of breaks along a row of R (width + 1 at most)


# ---------------------------------------------------------------------------------------
# the weights: torch's bilinear, per axis


@lru_cache(maxsize=4 * PLAN_CACHE)
def linear_taps(n_in: int, n_out: int, align_corners: bool, start: int, count: int,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w0, w1) of outputs start..start+count-1 of a bilinear resize n_in -> n_out:
    out[k] = w0[k] * in[i0[k]] + w1[k] * in[i1[k]], weights in [0, 1].

    torch's arithmetic (aten UpSample.h, area_pixel_compute_source_index and
    guard_index_and_lambda) in float32: scale = in / out (align_corners: (in-1)/(out-1)),
    source = scale * (k + 0.5) - 0.5 clamped at 0 (one rounding, as torch's fused
    multiply-add; align_corners: scale * k),
    i0 = min(floor(source), in - 1), w1 = clamp(source - i0, 0, 1), w0 = 1 - w1,
    i1 = i0 + 1 except at the last input. Equal sizes copy (w0 = 1, w1 = 0), as torch does.
    """
    k = np.arange(start, start + count, dtype=np.int64)
    if n_in == n_out:
        taps = (k, k, np.ones(count, F32), np.zeros(count, F32))
    else:
        if align_corners:
            scale = F32(n_in - 1) / F32(n_out - 1) if n_out > 1 else F32(0)
            source = scale * k.astype(F32)
        else:
            # torch's CPU kernel is built with fused multiply-add: scale * (k + 0.5) - 0.5
            # rounded once, which float64 computes exactly before the one rounding here
            scale = F32(n_in) / F32(n_out)
            exact = np.float64(scale) * (k + 0.5) - 0.5
            source = np.maximum(exact.astype(F32), F32(0))
        i0 = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
        w1 = np.clip(source - i0.astype(F32), F32(0), F32(1)).astype(F32)
        taps = (i0, i0 + (i0 < n_in - 1), (F32(1) - w1).astype(F32), w1)
    for a in taps:
        a.flags.writeable = False            # cached: shared by every later call
    return taps


@dataclass(frozen=True)
class AxisResize:
    """One axis: low resolution (n_low) -> model input (n_in, stage 1) -> crop of
    n_crop at `offset` -> original size (n_out, stage 2)."""

    n_low: int
    n_in: int
    offset: int
    n_crop: int
    n_out: int
    align_corners: bool

    def stage1(self) -> tuple[np.ndarray, ...]:
        """Taps of the crop's indices into the low-resolution axis."""
        return linear_taps(self.n_low, self.n_in, self.align_corners, self.offset,
                           self.n_crop)

    def stage2(self) -> tuple[np.ndarray, ...]:
        """Taps of the output's indices into the crop (always half-pixel)."""
        return linear_taps(self.n_crop, self.n_out, False, 0, self.n_out)


@lru_cache(maxsize=PLAN_CACHE)
def row_matrix(axis: AxisResize) -> torch.Tensor:
    """Ay: n_out x n_low float32, both row resizes in one matrix (non-negative, at most
    4 non-zero entries per row, each row summing to 1 within 4 float32 ulps)."""
    a0, a1, w0, w1 = axis.stage1()
    b0, b1, v0, v1 = axis.stage2()
    s1 = np.zeros((axis.n_crop, axis.n_low))
    crop = np.arange(axis.n_crop)
    np.add.at(s1, (crop, a0), w0.astype(np.float64))
    np.add.at(s1, (crop, a1), w1.astype(np.float64))
    composed = v0[:, None].astype(np.float64) * s1[b0] + v1[:, None].astype(np.float64) * s1[b1]
    return torch.from_numpy(composed.astype(F32))


@dataclass(frozen=True)
class RowPlan:
    """The rows grouped as `ColumnPlan` groups columns: a row cell is the output rows that
    share their two crop rows q0, q1 (their logits interpolate R's crop-row values there).
    Step a tests each cell once on the crop rows' values instead of each output row."""

    a0: np.ndarray               # stage 1 alone: crop row -> low rows and weights
    a1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray
    q0: np.ndarray               # per row cell: its two crop rows
    q1: np.ndarray
    width: np.ndarray            # output rows per cell
    crop_only: bool              # no stage 2: the crop rows are the output rows (R itself)


@lru_cache(maxsize=PLAN_CACHE)
def row_plan(axis: AxisResize) -> RowPlan:
    a0, a1, w0, w1 = axis.stage1()
    b0, b1, _, _ = axis.stage2()
    start = np.flatnonzero(np.r_[True, b0[1:] != b0[:-1]])
    plan = RowPlan(a0=a0, a1=a1, w0=w0[:, None], w1=w1[:, None], q0=b0[start], q1=b1[start],
                   width=np.diff(np.r_[start, axis.n_out]),
                   crop_only=axis.n_crop == axis.n_out)
    for value in vars(plan).values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return plan


@dataclass(frozen=True)
class ColumnPlan:
    """The column resizes, and how output columns group for the window tests.

    A cell is the output columns that share their left crop column q0 (so their right one
    q1 too): they interpolate between the same two R1 values. A run is consecutive cells
    whose windows in R's columns (the union of the stage-1 taps of q0 and q1: `lo..hi`)
    are the same, at most RUN_CELLS of them. Tables are run x RUN_CELLS (short runs padded
    with their last cell, `valid` False there).
    """

    a0: np.ndarray               # stage 1: crop column -> R columns and weights
    a1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray
    b0: np.ndarray               # stage 2: output column -> crop columns and weights
    b1: np.ndarray
    v0: np.ndarray
    v1: np.ndarray
    cell_start: np.ndarray       # first output column of each cell
    cell_width: np.ndarray
    cell_v0: np.ndarray          # cell x widest cell: stage-2 weights of its columns
    cell_v1: np.ndarray          # (narrower cells padded with their last column's)
    cell_run: np.ndarray         # the run of each cell
    run_columns: np.ndarray      # run x RUN_CELLS x widest cell: output column of each
                                 # (slot, column), a narrow cell's padding repeating its last
    run_valid: np.ndarray        # run x RUN_CELLS x widest cell: a real cell (`valid`)
    run_distinct: np.ndarray     # run_valid, less a narrow cell's padding: each column once
    run_v0: np.ndarray           # run x RUN_CELLS x widest cell: stage-2 weights (cell_v0)
    run_v1: np.ndarray
    run_lo: np.ndarray           # window of each run in R's columns, inclusive
    run_hi: np.ndarray
    run_cells: np.ndarray        # cells in each run
    run_width: np.ndarray        # output columns of each run
    cells: np.ndarray            # run x RUN_CELLS: cell index
    valid: np.ndarray            # run x RUN_CELLS: a real cell (not padding)
    # the crop columns whose R1 values a run's cells need ("points"), run x points, with
    # their stage-1 taps; cell slot j interpolates points[first][j] and points[second][j]
    point_a0: np.ndarray
    point_a1: np.ndarray
    point_w0: np.ndarray
    point_w1: np.ndarray
    first: slice
    second: slice
    crop_only: bool              # no stage 2: output column x is crop column x
    # a one-cell run's two points alone (run x 2: first, second), for `_run_pixels`
    one_a0: np.ndarray
    one_a1: np.ndarray
    one_w0: np.ndarray
    one_w1: np.ndarray

    @property
    def slots(self) -> int:
        return self.cells.shape[1]


@lru_cache(maxsize=PLAN_CACHE)
def column_plan(axis: AxisResize) -> ColumnPlan:
    a0, a1, w0, w1 = axis.stage1()
    b0, b1, v0, v1 = axis.stage2()
    cell_start = np.flatnonzero(np.r_[True, b0[1:] != b0[:-1]])
    cell_width = np.diff(np.r_[cell_start, axis.n_out])
    q0, q1 = b0[cell_start], b1[cell_start]
    lo = np.minimum(a0[q0], a0[q1])
    hi = np.maximum(a1[q0], a1[q1])
    n_cells = len(cell_start)
    new_window = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]
    window = np.cumsum(new_window) - 1
    first_of_window = np.flatnonzero(new_window)[window]
    new_run = new_window | ((np.arange(n_cells) - first_of_window) % RUN_CELLS == 0)
    run_start = np.flatnonzero(new_run)
    run_cells = np.diff(np.r_[run_start, n_cells])
    slots = int(run_cells.max())
    j = np.arange(slots)
    cells = run_start[:, None] + np.minimum(j, run_cells[:, None] - 1)
    columns = cell_start[:, None] + np.minimum(np.arange(int(cell_width.max())),
                                               cell_width[:, None] - 1)
    valid = j < run_cells[:, None]
    left, right = q0[cells], q1[cells]
    after_last = right[np.arange(len(run_start)), run_cells - 1]
    if (left == right).all():               # no stage 2: each cell is one crop column
        points, first, second = left, slice(0, slots), slice(0, slots)
    elif (right[:, :-1] == left[:, 1:])[valid[:, 1:]].all():
        # upsampling: a cell's right column is the next cell's left one
        points = np.concatenate([left, after_last[:, None]], axis=1)
        beyond = np.arange(slots + 1) >= run_cells[:, None]
        points[beyond] = np.broadcast_to(after_last[:, None], points.shape)[beyond]
        first, second = slice(0, slots), slice(1, slots + 1)
    else:                                   # downscaling: two columns of their own
        points = np.concatenate([left, right], axis=1)
        first, second = slice(0, slots), slice(slots, 2 * slots)
    pair = [first.start, second.start]          # slot 0's two points
    plan = ColumnPlan(
        a0=a0, a1=a1, w0=w0, w1=w1, b0=b0, b1=b1, v0=v0, v1=v1,
        cell_start=cell_start, cell_width=cell_width,
        cell_v0=v0[columns], cell_v1=v1[columns],
        cell_run=np.repeat(np.arange(len(run_start)), run_cells),
        run_columns=columns[cells],
        run_valid=np.repeat(valid[:, :, None], columns.shape[1], axis=2),
        run_distinct=valid[:, :, None] & (np.arange(columns.shape[1])
                                          < cell_width[cells][:, :, None]),
        run_v0=v0[columns][cells], run_v1=v1[columns][cells],
        run_lo=lo[run_start], run_hi=hi[run_start], run_cells=run_cells,
        run_width=np.add.reduceat(cell_width, run_start),
        cells=cells, valid=valid, point_a0=a0[points], point_a1=a1[points],
        point_w0=w0[points], point_w1=w1[points], first=first, second=second,
        crop_only=axis.n_crop == axis.n_out,
        one_a0=a0[points[:, pair]], one_a1=a1[points[:, pair]],
        one_w0=w0[points[:, pair]], one_w1=w1[points[:, pair]])
    for value in vars(plan).values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return plan


# ---------------------------------------------------------------------------------------
# the numbers


def checked_logits(logits: np.ndarray) -> tuple[np.ndarray, float]:
    """float32 C x h x w (a copy only when the dtype differs) and max |logit|."""
    if logits.ndim != 3 or logits.dtype.kind != "f":
        raise ValueError(f"logits must be float C x h x w, got {logits.dtype} {logits.shape}")
    arr = np.ascontiguousarray(logits, dtype=F32)
    # max |logit| = max(max, -min), and a NaN or an infinity makes one of them non-finite:
    # two reductions, no |logits| temporary and no isfinite pass
    high, low = (float(arr.max()), float(arr.min())) if arr.size else (0.0, 0.0)
    if not (math.isfinite(high) and math.isfinite(low)):
        raise ValueError("logits contain NaN or infinity")
    peak = max(high, -low)
    if peak > MAX_LOGIT:
        raise ValueError(f"logits reach {peak:.3g} in magnitude (over 2^100): a broken model")
    return arr, peak


def axes(shape: tuple[int, ...], placement: Placement, input_size: tuple[int, int],
         align_corners: bool) -> tuple[AxisResize, AxisResize]:
    p = placement
    _, h, w = shape
    return (AxisResize(h, input_size[0], p.top, p.height, p.orig_h, align_corners),
            AxisResize(w, input_size[1], p.left, p.width, p.orig_w, align_corners))


def output_rows(logits: np.ndarray, rows: AxisResize) -> np.ndarray:
    """R: C x out_h x w, the logits resized along the rows (step 1). No inference_mode
    around it: neither tensor requires grad, so no graph is built, and entering the mode
    cost 15 of the 260 us (studies/postprocess_cost.py's inputs)."""
    return torch.matmul(row_matrix(rows), torch.from_numpy(logits)).numpy()


def dense_labels(logits: np.ndarray, placement: Placement, input_size: tuple[int, int],
                 align_corners: bool = False) -> np.ndarray:
    """Steps 1-4 at every pixel: the reference `boundary_labels` is proved equal to."""
    arr, _ = checked_logits(logits)
    rows, cols = axes(arr.shape, placement, input_size, align_corners)
    return _dense(output_rows(arr, rows), column_plan(cols))


def _dense(r: np.ndarray, plan: ColumnPlan) -> np.ndarray:
    """Steps 2-4 on R, one class at a time (its planes stay in cache, and a large photo
    never holds C planes at once). Without a stage 2 (the crop is the output) step 3
    multiplies by 1 and adds 0 * the same value: skipped, as it changes no value (at most
    a zero's sign, which no comparison sees)."""
    labels = np.zeros((r.shape[1], len(plan.b0)), np.uint8)
    better = np.empty(labels.shape, np.bool_)
    best = None
    for c in range(r.shape[0]):
        value = plan.w0 * r[c][:, plan.a0]
        value += plan.w1 * r[c][:, plan.a1]
        if not plan.crop_only:
            r1 = value
            value = plan.v0 * r1[:, plan.b0]
            value += plan.v1 * r1[:, plan.b1]
        if best is None:
            best = value
            continue
        np.greater(value, best, out=better)
        np.copyto(labels, c, where=better)
        np.maximum(best, value, out=best)
    return labels


def boundary_labels(logits: np.ndarray, placement: Placement, input_size: tuple[int, int],
                    align_corners: bool = False) -> np.ndarray:
    """`dense_labels`, exactly, with the logits computed only near class boundaries
    (`counted_boundary_labels` says how)."""
    return counted_boundary_labels(logits, placement, input_size, align_corners, False)[0]


def counted_boundary_labels(logits: np.ndarray, placement: Placement,
                            input_size: tuple[int, int], align_corners: bool = False,
                            count: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """`dense_labels`, exactly, with the logits computed only near class boundaries; with
    `count`, also the pixels of each label value (int64 256, as `labels.class_pixels`)
    where the labels were expanded from a compact form (`_compact_counts` says when),
    else None: counted on the compact form (each cell or run times its width), then
    corrected at the pixels step c wrote (their values before and after), so a 48 Mpx
    photo is not counted pixel by pixel.

    Decisions, coarse to fine, each on values the dense path computes too:
      a. per output row y and run (a few cells sharing one window lo..hi of R's columns):
         if one class k leads every other by the margin m at every R[:, y, lo..hi], the
         run is k; otherwise classes that cannot win are dropped (their largest value in
         the window is below the best smallest value of another class by more than m);
         a run left with one class is that class.
      b. per cell of the remaining runs, the same on the two R1 values it interpolates.
      c. the remaining cells' pixels: V for the remaining classes, argmax in class order.
    On a large photo (`ROW_GROUP_MIN`) a and b run first per row cell on the crop rows'
    values (`_grouped`), and per output row only where a cell stays open.

    Why it is exact. m = 2^-12 * M + 2^-100, M = max|logit| <= 2^100 (larger is refused).
    (i) Every value the dense path computes (R, R1, V) is within E = 2^-20 * M + 2^-145 of
    the real-number result X* of the same float32 weights: R sums at most 4 non-zero
    products (zero products add exactly, in any BLAS order or fused), R1 and V one more
    multiply-add each, so the standard bound gives at most ~10 u * M (u = 2^-24), the
    weights being non-negative with sums within 4u of 1 and every magnitude under 1.01 M;
    underflow adds at most 2^-150 per operation. (ii) A test passes when a computed
    difference exceeds m, itself computed with one rounding of at most u * (2M + m), so
    the real difference of X* exceeds m - 2^-22 * M - 2E > m / 2. (iii) V*(y, x) is a
    convex-like combination of the tested points (weights >= 0, summing to at least
    1 - 4u): V*_k - V*_c > (m / 2)(1 - 4u) > 2E, so the computed V_k > V_c: k is the
    dense path's strict maximum at every pixel of the region (the tie rule never matters),
    and a dropped class c is strictly below some other class there, so it is never the
    first maximum. (iv) Pixels computed in (c) use the dense path's float32 operations in
    its order, on the same R (one shared matrix product): the same numbers, the same
    first maximum over the classes left (the rest are strictly lower by (iii)).
    Where step a leaves so much undecided that the sparse steps would cost more than the
    dense ones (noise-like logits of an untrained network), `_dense` runs on the same R:
    the same labels by definition.
    """
    arr, peak = checked_logits(logits)
    rows, cols = axes(arr.shape, placement, input_size, align_corners)
    plan = column_plan(cols)
    margin = F32(MARGIN_REL * peak + MARGIN_ABS)
    r = output_rows(arr, rows)
    grouping = row_plan(rows)
    if GROUP_ROWS and not grouping.crop_only and rows.n_out >= ROW_GROUP_MIN * rows.n_crop:
        grouped = _grouped(arr, r, grouping, plan, margin)
        if grouped is None:
            return _dense(r, plan), None    # boundaries everywhere (noise): same numbers
        cell_labels, pixels = grouped
    else:                                   # every output row apart (the path before)
        top, clear = _leader(r, margin)
        run_labels = _decided_runs(top, clear, plan)
        uy, ur = np.nonzero(run_labels == UNDECIDED)
        pixels = None
        if len(uy):
            candidates = _candidates(r, uy, plan.run_lo[ur], plan.run_hi[ur], margin)
            left = candidates.sum(axis=0)
            if int(left.sum()) * SPARSE_COST > r.shape[0] * r.shape[1] * len(plan.b0):
                return _dense(r, plan), None    # boundaries everywhere (noise): same numbers
            alone = left == 1
            run_labels[uy[alone], ur[alone]] = candidates[:, alone].argmax(axis=0)
            several = ~alone
            uy, ur, candidates = uy[several], ur[several], candidates[:, several]
        if RUN_PIXELS or not len(uy):       # a run's cells share its label: one expansion
            labels = _expand(run_labels, plan.run_width)
            counts = _compact_counts(run_labels, plan.run_width) if count else None
            if len(uy):
                _run_pixels(r, plan, uy, ur, candidates, labels, counts)
            return labels, counts
        cell_labels = np.repeat(run_labels, plan.run_cells, axis=1)
        pixels = _decide_cells(r, plan, uy, ur, candidates, margin, cell_labels)
    labels = _expand(cell_labels, plan.cell_width)
    counts = _compact_counts(cell_labels, plan.cell_width) if count else None
    if pixels is not None:
        y, x0, width, values = pixels
        inside = np.arange(values.shape[1]) < width[:, None]
        where = (y * labels.shape[1] + x0)[:, None] + np.arange(values.shape[1])
        _write(labels, where[inside], values[inside], counts)
    return labels, counts


def _compact_counts(compact: np.ndarray, widths: np.ndarray) -> np.ndarray | None:
    """Pixels of each value (int64 256) of `_expand(compact, widths)`, from `compact`: one
    histogram per column (a bincount of column x 256 + value), times its width; None
    for labels under COUNT_MIN_PIXELS or a compact form not COUNT_COMPACT times narrower."""
    height, columns = compact.shape
    width = int(widths.sum())
    if height * width < COUNT_MIN_PIXELS or columns * COUNT_COMPACT > width:
        return None
    keys = compact + np.arange(0, columns * 256, 256, dtype=np.intp)
    per_column = np.bincount(keys.reshape(-1), minlength=columns * 256)
    return widths.astype(np.int64) @ per_column.reshape(columns, 256)


def _write(labels: np.ndarray, where: np.ndarray, values: np.ndarray,
           counts: np.ndarray | None) -> None:
    """labels.flat[where] = values, each position once; `counts` follows the change."""
    flat = labels.reshape(-1)
    if counts is not None:
        counts -= np.bincount(flat[where], minlength=256)
        counts += np.bincount(values, minlength=256)
    flat[where] = values


# ---------------------------------------------------------------------------------------
# the decisions


def _leader(r: np.ndarray, margin: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Per point of R (out_h x w): whether one class leads every other by more than
    `margin` (exactly one class above top - margin), and that class where it does
    (elsewhere the value means nothing: no decision reads it there).

    Whole-array passes, not a loop over classes (0.15 against 0.23 ms at 500 x 375): the
    count of classes above the threshold, and the sum of their ids, which is the leader's
    id where the count is 1 (uint8 sums may wrap only where the count is over 1)."""
    classes = r.shape[0]
    flat = r.reshape(classes, -1)
    threshold = flat.max(axis=0) - margin
    above = np.greater(flat, threshold).view(np.uint8)
    count = np.add.reduce(above, axis=0, dtype=np.uint8)
    above *= np.arange(classes, dtype=np.uint8)[:, None]
    leader = np.add.reduce(above, axis=0, dtype=np.uint8)
    return leader.reshape(r.shape[1:]), (count == 1).reshape(r.shape[1:])


def _grouped(arr: np.ndarray, r: np.ndarray, rows: RowPlan, plan: ColumnPlan,
             margin: np.float32,
             ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None] | None:
    """Steps a and b per row cell, on the crop rows' values (C x n_crop x w), then step b
    again and c per output row, only for the (row cell, run)s left open: out_h x cells
    labels and `_decide_cells`' pixels; None where the dense path costs less.

    Exact as steps a and b are: each output row's R is a convex combination of its cell's
    two crop rows' real values, so a point of the window of a (row, run) or a cell is
    replaced by two points (one in each crop row), each within E of its real value (the
    crop rows' float32 values carry fewer roundings than R's), and the proof's (ii)-(iii)
    hold over that larger set of points."""
    crop = np.take(arr, rows.a0, axis=1)    # C x n_crop x w, C-contiguous for _leader
    crop *= rows.w0
    other = np.take(arr, rows.a1, axis=1)
    other *= rows.w1
    crop += other
    top_c, clear_c = _leader(crop, margin)
    top = top_c[rows.q0]
    clear = clear_c[rows.q0] & clear_c[rows.q1] & (top == top_c[rows.q1])
    run_labels = _decided_runs(top, clear, plan)
    cy, ur = np.nonzero(run_labels == UNDECIDED)
    candidates = None
    if len(cy):
        lo, hi = plan.run_lo[ur], plan.run_hi[ur]
        candidates = _candidates(crop, rows.q0[cy], lo, hi, margin, rows.q1[cy])
        count = candidates.sum(axis=0)
        if (int((count * rows.width[cy]).sum()) * SPARSE_COST
                > r.shape[0] * r.shape[1] * len(plan.b0)):
            return None
        alone = count == 1
        run_labels[cy[alone], ur[alone]] = candidates[:, alone].argmax(axis=0)
        several = ~alone
        cy, ur, candidates = cy[several], ur[several], candidates[:, several]
    cell_rc = np.repeat(run_labels, plan.run_cells, axis=1)
    is_open = None
    if len(cy):
        is_open = _decided_cell_pairs(crop, plan, rows, cy, ur, candidates, margin, cell_rc)
    cell_labels = np.repeat(cell_rc, rows.width, axis=0)
    if is_open is None or not is_open.any():
        return cell_labels, None
    cy, ur, candidates = cy[is_open], ur[is_open], candidates[:, is_open]
    width = rows.width[cy]
    first_row = np.r_[0, np.cumsum(rows.width)[:-1]][cy]
    within = np.arange(len(width)).repeat(width)
    uy = first_row[within] + np.arange(len(within)) - np.repeat(np.cumsum(width) - width,
                                                                 width)
    pixels = _decide_cells(r, plan, uy, ur[within], candidates[:, within], margin,
                           cell_labels)
    return cell_labels, pixels


def _rank_passes(flat: np.ndarray, plane_size: int,
                 points: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                 run_of: np.ndarray, cls_of: np.ndarray, rank: np.ndarray, n_runs: int,
                 ) -> Iterator[tuple[np.ndarray, Any, np.ndarray, np.ndarray]]:
    """Per rank: the runs, their rows (a slice where the pass covers every run), their
    classes, and each run's points of that class interpolated from R's rows (`points`:
    the two points' flat indices in the class-0 plane and their weights)."""
    at_a0, at_a1, at_w0, at_w1 = points
    for k in range(int(rank.max()) + 1):
        pick = np.flatnonzero(rank == k)
        runs, cls = run_of[pick], cls_of[pick]
        rows: Any = slice(None) if len(runs) == n_runs else runs
        plane = (cls.astype(np.int64) * plane_size)[:, None]
        yield runs, rows, cls, (at_w0[rows] * flat[at_a0[rows] + plane]
                                + at_w1[rows] * flat[at_a1[rows] + plane])


def ranked_candidates(candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(run, class, rank) of each True in `candidates` (classes x runs), by run ascending;
    rank is the k-th class of its run, so a pass over one rank touches a run at most once
    and its updates need no scatter-add."""
    run_of, cls_of = np.nonzero(np.ascontiguousarray(candidates.T))
    firsts = np.flatnonzero(np.r_[True, run_of[1:] != run_of[:-1]])
    rank = np.arange(len(run_of)) - np.repeat(firsts, np.diff(np.r_[firsts, len(run_of)]))
    return run_of, cls_of, rank


def _decided_cell_pairs(crop: np.ndarray, plan: ColumnPlan, rows: RowPlan, cy: np.ndarray,
                        ur: np.ndarray, candidates: np.ndarray, margin: np.float32,
                        cell_rc: np.ndarray) -> np.ndarray:
    """Step b per (row cell, run): each cell's R1 values at its two points in both crop
    rows (four per class); cells left with one class are decided in `cell_rc` (row cells x
    cells). Returns, per (row cell, run), whether a cell is still open."""
    _, n_crop, width = crop.shape
    flat = crop.reshape(-1)
    slots = plan.slots
    floor = np.full((len(ur), slots), -np.inf, F32)
    bounds = []
    for row in (rows.q0[cy], rows.q1[cy]):
        base = (row * width)[:, None]
        bounds.append((plan.point_a0[ur] + base, plan.point_a1[ur] + base))
    at_w0, at_w1 = plan.point_w0[ur], plan.point_w1[ur]
    passes = []
    run_of, cls_of, rank = ranked_candidates(candidates)
    for k in range(int(rank.max()) + 1):
        pick = np.flatnonzero(rank == k)
        runs, cls = run_of[pick], cls_of[pick]
        sel = slice(None) if len(runs) == len(ur) else runs
        plane = (cls.astype(np.int64) * (n_crop * width))[:, None]
        low = high = None
        for at_a0, at_a1 in bounds:
            at = (at_w0[sel] * flat[at_a0[sel] + plane] + at_w1[sel] * flat[at_a1[sel] + plane])
            at0, at1 = at[:, plan.first], at[:, plan.second]
            lo_v, hi_v = np.minimum(at0, at1), np.maximum(at0, at1)
            low = lo_v if low is None else np.minimum(low, lo_v)
            high = hi_v if high is None else np.maximum(high, hi_v)
        floor[sel] = np.maximum(floor[sel], low)
        passes.append((sel, cls, high))
    left = np.zeros((len(ur), slots), np.uint8)
    last = np.zeros((len(ur), slots), np.uint8)
    for sel, cls, high in passes:
        keep = (floor[sel] - high) <= margin
        left[sel] += keep
        if isinstance(sel, slice):
            np.copyto(last, cls[:, None].astype(np.uint8), where=keep)
        else:
            last[sel] = np.where(keep, cls[:, None].astype(np.uint8), last[sel])
    valid = plan.valid[ur]
    i, j = np.nonzero((left == 1) & valid)
    cell_rc[cy[i], plan.cells[ur[i], j]] = last[i, j]
    return ((left >= 2) & valid).any(axis=1)


def _decided_runs(top: np.ndarray, clear: np.ndarray, plan: ColumnPlan) -> np.ndarray:
    """out_h x runs: the class of each (row, run) whose whole window has one clear
    leader, UNDECIDED elsewhere."""
    out_h, width = top.shape
    # one running count of breaks down each column of R's points (columns first: a run's
    # gathers take whole rows; 0.15 -> 0.10 ms at 500 x 375): point x breaks where it is
    # unclear or its leader is not the one at x - 1; a window lo..hi is decided when lo is
    # clear and none of lo + 1..hi breaks (lo's own leader change, with lo - 1 outside the
    # window, does not count)
    top_t, clear_t = np.ascontiguousarray(top.T), np.ascontiguousarray(clear.T)
    breaks = np.empty((width, out_h), BREAKS)
    np.logical_not(clear_t, out=breaks)
    breaks[1:] += top_t[1:] != top_t[:-1]
    np.cumsum(breaks, axis=0, out=breaks)
    lo, hi = plan.run_lo, plan.run_hi
    decided = breaks[hi] == breaks[lo]
    decided &= clear_t[lo]
    return np.ascontiguousarray(np.where(decided, top_t[lo], np.uint8(UNDECIDED)).T)


def _candidates(r: np.ndarray, uy: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                margin: np.float32, uy2: np.ndarray | None = None) -> np.ndarray:
    """C x runs: the classes that may still win somewhere in each (row, run); with `uy2`,
    the window spans two rows of r (a row cell's crop rows)."""
    planes = r.reshape(r.shape[0], -1)              # one flat index per point: np.take
    row = uy * r.shape[2]
    low = np.take(planes, row + lo, axis=1)
    high = low.copy()
    values = np.empty_like(low)
    for base in (row,) if uy2 is None else (row, uy2 * r.shape[2]):
        for t in range(0 if base is not row else 1, int((hi - lo).max()) + 1):
            np.take(planes, base + np.minimum(lo + t, hi), axis=1, out=values)
            np.minimum(low, values, out=low)
            np.maximum(high, values, out=high)
    return (low.max(axis=0) - high) <= margin


def _decide_cells(r: np.ndarray, plan: ColumnPlan, uy: np.ndarray, ur: np.ndarray,
                  candidates: np.ndarray, margin: np.float32, cell_labels: np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Steps b and c for the undecided (row, run)s: cells decided in `cell_labels`;
    returns the pixels of the rest (row, first column, width, labels) or None.

    Candidates are visited by rank (the k-th class of each run), so each pass touches each
    run at most once and updates need no scatter-add; every run here has two candidates
    or more, so the first two passes cover all runs in order (slices, not gathers)."""
    run_of, cls_of, rank = ranked_candidates(candidates)
    _, out_h, width = r.shape
    flat = r.reshape(-1)
    slots = plan.slots
    floor = np.full((len(ur), slots), -np.inf, F32)      # best smallest R1 of a class
    # each run's points in R's class-0 plane and their weights, gathered once for all passes
    row_base = (uy * width)[:, None]
    at_a0, at_a1 = plan.point_a0[ur] + row_base, plan.point_a1[ur] + row_base
    at_w0, at_w1 = plan.point_w0[ur], plan.point_w1[ur]
    passes = []
    for runs, rows, cls, at in _rank_passes(flat, out_h * width, (at_a0, at_a1, at_w0, at_w1),
                                            run_of, cls_of, rank, len(ur)):
        at0, at1 = at[:, plan.first], at[:, plan.second]
        floor[rows] = np.maximum(floor[rows], np.minimum(at0, at1))
        passes.append((runs, rows, cls, at0, at1))
    left = np.zeros((len(ur), slots), np.uint8)          # classes left per cell
    last = np.zeros((len(ur), slots), np.uint8)          # the last class left
    keeps = []
    for _, rows, cls, at0, at1 in passes:
        keep = (floor[rows] - np.maximum(at0, at1)) <= margin
        left[rows] += keep
        if isinstance(rows, slice):
            np.copyto(last, cls[:, None].astype(np.uint8), where=keep)
        else:
            last[rows] = np.where(keep, cls[:, None].astype(np.uint8), last[rows])
        keeps.append(keep)
    valid = plan.valid[ur]
    one = (left == 1) & valid
    i, j = np.nonzero(one)
    cell_labels[uy[i], plan.cells[ur[i], j]] = last[i, j]
    several = (left >= 2) & valid
    n_open = int(several.sum())
    if not n_open:
        return None
    open_id = np.full((len(ur), slots), -1, np.int64)
    open_id[several] = np.arange(n_open)
    oi, oj = np.nonzero(several)
    open_cell = plan.cells[ur[oi], oj]
    x0 = plan.cell_start[open_cell]
    cell_width = plan.cell_width[open_cell]
    weight0, weight1 = plan.cell_v0[open_cell], plan.cell_v1[open_cell]
    best = np.full(weight0.shape, -np.inf, F32)
    best_class = np.zeros(weight0.shape, np.uint8)
    for (runs, rows, cls, at0, at1), keep in zip(passes, keeps, strict=True):
        e, s = np.nonzero(keep & several[rows])
        if not len(e):
            continue
        ids = open_id[runs[e], s]
        value = weight0[ids] * at0[e, s][:, None] + weight1[ids] * at1[e, s][:, None]
        current = best[ids]
        better = value > current
        np.copyto(current, value, where=better)
        best[ids] = current
        current_class = best_class[ids]
        np.copyto(current_class, cls[e][:, None].astype(np.uint8), where=better)
        best_class[ids] = current_class
    return uy[oi], x0, cell_width, best_class


def _run_pixels(r: np.ndarray, plan: ColumnPlan, uy: np.ndarray, ur: np.ndarray,
                candidates: np.ndarray, labels: np.ndarray,
                counts: np.ndarray | None = None) -> None:
    """Step c straight after a, without b: every pixel of the undecided (row, run)s gets
    V of its run's remaining classes, first maximum in class order, written in `labels`.

    At the photo's own scale (cells one or two columns wide) a run's pixels are few, and
    computing them all costs less than the cell test's bookkeeping that would spare some
    (studies/postprocess_cost.py). A narrow cell's padding columns repeat its last column
    with the same numbers (the same label written twice); padding slots interpolate other
    points, so they are not written. Runs of one cell (half the runs when the photo is
    about twice the input, each between two runs of seven) go apart, through their one
    slot's tables: in the run tables they would fill one slot of RUN_CELLS (labels 1.86
    -> 1.79 ms on the bench's 48 logits, post31)."""
    one = np.take(plan.run_cells, ur) == 1
    if one.all() or not one.any():
        return _pixels(r, plan, uy, ur, candidates, labels, one.all(), counts)
    _pixels(r, plan, uy[one], ur[one], candidates[:, one], labels, True, counts)
    many = ~one
    _pixels(r, plan, uy[many], ur[many], candidates[:, many], labels, False, counts)


def _pixels(r: np.ndarray, plan: ColumnPlan, uy: np.ndarray, ur: np.ndarray,
            candidates: np.ndarray, labels: np.ndarray, one_cell: bool,
            counts: np.ndarray | None = None) -> None:
    """`_run_pixels` for some runs: with `one_cell`, runs of one cell, on slot 0 alone."""
    run_of, cls_of, rank = ranked_candidates(candidates)
    _, out_h, width = r.shape
    flat = r.reshape(-1)
    row_base = (uy * width)[:, None]
    if one_cell:
        slots, first, second = slice(0, 1), slice(0, 1), slice(1, 2)
        a0, a1, w0, w1 = plan.one_a0, plan.one_a1, plan.one_w0, plan.one_w1
    else:
        slots, first, second = slice(None), plan.first, plan.second
        a0, a1, w0, w1 = plan.point_a0, plan.point_a1, plan.point_w0, plan.point_w1
    at_a0 = np.take(a0, ur, axis=0) + row_base           # takes along one axis:
    at_a1 = np.take(a1, ur, axis=0) + row_base           # faster than fancy indexing
    at_w0, at_w1 = np.take(w0, ur, axis=0), np.take(w1, ur, axis=0)
    weight0 = np.take(plan.run_v0[:, slots], ur, axis=0)     # runs x slots x columns
    weight1 = np.take(plan.run_v1[:, slots], ur, axis=0)
    best = best_class = None
    for _, rows, cls, at in _rank_passes(flat, out_h * width, (at_a0, at_a1, at_w0, at_w1),
                                         run_of, cls_of, rank, len(ur)):
        value = weight0[rows] * at[:, first, None]
        value += weight1[rows] * at[:, second, None]
        label = cls.astype(np.uint8)[:, None, None]
        if best is None:                    # rank 0: every run, its smallest class
            best, best_class = value, np.broadcast_to(label, value.shape).copy()
            continue
        if isinstance(rows, slice):
            better = value > best
            np.copyto(best, value, where=better)
            np.copyto(best_class, label, where=better)
            continue
        current, current_class = best[rows], best_class[rows]
        better = value > current
        np.copyto(current, value, where=better)
        np.copyto(current_class, label, where=better)
        best[rows], best_class[rows] = current, current_class
    where = (uy * labels.shape[1])[:, None, None] + np.take(plan.run_columns[:, slots], ur,
                                                             axis=0)
    if counts is None:
        real = np.take(plan.run_valid[:, slots], ur, axis=0)
        labels.reshape(-1)[where[real]] = best_class[real]
        return
    distinct = np.take(plan.run_distinct[:, slots], ur, axis=0)    # padding: same label
    _write(labels, where[distinct], best_class[distinct], counts)


def _expand(cell_labels: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """out_h x cells -> out_h x out_w, each cell repeated over its columns. Rows equal to
    the row above (most rows of a large photo) are copied whole, not expanded again."""
    if len(widths) == widths.sum():
        return np.ascontiguousarray(cell_labels)
    new = np.ones(len(cell_labels), np.bool_)
    new[1:] = (cell_labels[1:] != cell_labels[:-1]).any(axis=1)
    wide = np.repeat(cell_labels[new], widths, axis=1)
    if new.all():
        return wide
    return np.take(wide, np.cumsum(new) - 1, axis=0)
