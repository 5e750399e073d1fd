"""Postprocess cost, before and after issue 21: labels from logits, and the mask PNG.

Why a study and not a test: CPU milliseconds depend on the machine and on whoever shares
it; the tests prove the labels equal, this measures what they cost. Every image's before
and after run back to back (repeats interleaved, the best of each kept), so load drift on
a shared machine hits both alike.

  python -m studies.postprocess_cost labels --model /tmp/demo-out/model \\
      [--model /tmp/pspnet500] [--json FILE]
  python -m studies.postprocess_cost png --model /tmp/demo-out/model
  python -m studies.postprocess_cost big-jpegs /tmp/big6     # six 4000 x 3000 JPEGs
  python -m studies.postprocess_cost big-jpegs /tmp/big48 --size 8000x6000  # 48 Mpx
  python -m studies.postprocess_cost worker --model /tmp/demo-out/model [--json FILE]

`labels`: CPU ms per image of today's torch path (F.interpolate, crop, F.interpolate,
per-class running argmax) and of `labels_from_logits` now, on the sample photos (and the
bird) at their own size, and on six 4000 x 3000 photos (sample photos enlarged); near-tie
pixels (top-2 resized logits within 1e-4) and labels that differ from today's. Each model
directory gives its real logits (onnxruntime, batch 1); `smooth63` adds the first model's
logits resized to 63 x 63 under a 500 x 500 input: PSPNet's shape with align_corners=False
and a trained network's smoothness (the calibrated test PSPNet's logits are noise-like).
`png`: the mask PNG at several zlib settings on real masks, ms and bytes.
`worker`: the postprocess worker's whole CPU per image, step by step, on the bench's own
synthetic inputs (`pspnet bench --synthetic 48`: VOC-sized crops with stand-in ground
truths) and the model's real logits: the Output frames received from a socket and
decoded, labels, the mask PNG (encode and the atomic file write apart), the class counts,
the ground truth read, the IoU areas, the answer encoded; and `finish` as a whole.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pspnet.core import wire
from pspnet.core.wire import Placement
from pspnet.model.image_io import letterbox, letterbox_size
from pspnet.model.labels import labels_from_logits
from pspnet.model.manifest import Manifest

BIG = (3000, 4000)               # (H, W) of the large photos
NEAR_TIE = 1e-4
PNG_SETTINGS = {                 # name -> PIL save options
    "level 6 (PIL default)": {"compress_level": 6},
    "level 1": {"compress_level": 1},
    "level 1, Z_RLE": {"compress_level": 1, "compress_type": 3},
    "level 0 (stored)": {"compress_level": 0},
}


def say(message: str) -> None:
    sys.stderr.write(f"[postprocess-cost] {message}\n")
    sys.stderr.flush()


def labels_before(logits: np.ndarray, p: Placement, input_size: tuple[int, int],
                  align_corners: bool) -> np.ndarray:
    """model/labels.py's labels_from_logits before issue 21 (torch resizes, one class
    plane at a time, running argmax in numpy)."""
    with torch.inference_mode():
        x = torch.from_numpy(np.array(logits, np.float32)).unsqueeze(0)
        if x.shape[2:] != tuple(input_size):
            x = F.interpolate(x, size=input_size, mode="bilinear", align_corners=align_corners)
        crop = x[0, :, p.top:p.top + p.height, p.left:p.left + p.width]
        resize = (p.height, p.width) != (p.orig_h, p.orig_w)

        def plane(k: int) -> np.ndarray:
            if not resize:
                return crop[k].numpy()
            return F.interpolate(crop[k][None, None], size=(p.orig_h, p.orig_w),
                                 mode="bilinear", align_corners=False)[0, 0].numpy()

        best = plane(0).copy()
        labels = np.zeros((p.orig_h, p.orig_w), np.uint8)
        better = np.empty((p.orig_h, p.orig_w), np.bool_)
        for k in range(1, logits.shape[0]):
            value = plane(k)
            np.greater(value, best, out=better)
            np.copyto(labels, k, where=better)
            np.maximum(best, value, out=best)
    return labels


def near_tie_mask(logits: np.ndarray, p: Placement, input_size: tuple[int, int],
                  align_corners: bool) -> np.ndarray:
    """Pixels whose two best logits, resized as today, are within NEAR_TIE (one class
    plane at a time: 21 x 12 Mpx at once would be 1 GB)."""
    with torch.inference_mode():
        x = torch.from_numpy(np.array(logits, np.float32))[None]
        if x.shape[2:] != tuple(input_size):
            x = F.interpolate(x, size=input_size, mode="bilinear", align_corners=align_corners)
        crop = x[0, :, p.top:p.top + p.height, p.left:p.left + p.width]
        first = second = None
        for plane in crop:
            if (p.height, p.width) != (p.orig_h, p.orig_w):
                plane = F.interpolate(plane[None, None], size=(p.orig_h, p.orig_w),
                                      mode="bilinear", align_corners=False)[0, 0]
            if first is None:
                first, second = plane.clone(), torch.full_like(plane, -torch.inf)
                continue
            second = torch.maximum(second, torch.minimum(first, plane))
            first = torch.maximum(first, plane)
    assert first is not None and second is not None
    return ((first - second) < NEAR_TIE).numpy()


def photos(big: bool, size: tuple[int, int] = BIG) -> list[tuple[str, np.ndarray]]:
    """The sample photos and the bird; `big`: six of them resized to `size` (H, W)."""
    from pspnet.build_model import trained
    from pspnet.build_model.samples import sample_images

    shots = [*sample_images(), ("bird.png", trained.bird()[0])]
    if not big:
        return shots
    return [(f"{Path(name).stem}_{size[1]}x{size[0]}",
             cv2.resize(rgb, size[::-1], interpolation=cv2.INTER_CUBIC))
            for name, rgb in shots[:6]]


def model_logits(model: Path, shots: list[tuple[str, np.ndarray]],
                 ) -> list[tuple[str, np.ndarray, Placement]]:
    from pspnet.stages.backends import open_backend

    manifest = Manifest.read(model)
    batch = min(manifest.batch_sizes)        # one photo a batch, in its first row
    images = np.zeros((batch, *manifest.input_size, 3), np.uint8)
    boxes = np.zeros((batch, 4), np.int32)
    out = []
    with open_backend("ort", model, batch) as backend:
        for name, rgb in shots:
            _, place = letterbox(rgb, manifest.input_size, out=images[0])
            boxes[0] = place.box()
            backend.upload(0, images, boxes)
            out.append((name, np.array(backend.execute(0)[0], np.float32), place))
    return out


def smooth63(items: list[tuple[str, np.ndarray, Placement]],
             ) -> list[tuple[str, np.ndarray, Placement]]:
    """The items' logits resized to 63 x 63, placed as under a 500 x 500 input."""
    out = []
    for name, logits, place in items:
        resized = np.stack([cv2.resize(c, (63, 63), interpolation=cv2.INTER_LINEAR)
                            for c in logits])
        scale, nh, nw = letterbox_size(place.orig_h, place.orig_w, (500, 500))
        out.append((name, resized, Placement(place.orig_h, place.orig_w, scale,
                                             (500 - nh) // 2, (500 - nw) // 2, nh, nw)))
    return out


def cpu_ms(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    started = time.process_time()
    fn(*args, **kwargs)
    return (time.process_time() - started) * 1e3


def encode_png(mask: np.ndarray, palette: list[int], buf: io.BytesIO,
               options: dict[str, int]) -> None:
    """As model.masks.write_mask encodes a mask, with these zlib options."""
    im = Image.fromarray(mask)
    im.putpalette(palette)
    im.save(buf, format="PNG", **options)


def measure(items: list[tuple[str, np.ndarray, Placement]], input_size: tuple[int, int],
            align_corners: bool, repeats: int) -> dict[str, Any]:
    rows = []
    for name, logits, place in items:
        before = after = float("inf")
        for _ in range(repeats):             # interleaved, the best of each
            args = (logits, place, input_size, align_corners)
            before = min(before, cpu_ms(labels_before, *args))
            after = min(after, cpu_ms(labels_from_logits, *args))
        old = labels_before(logits, place, input_size, align_corners)
        new = labels_from_logits(logits, place, input_size, align_corners)
        ties = near_tie_mask(logits, place, input_size, align_corners)
        differ = old != new
        rows.append({"photo": name, "size": [place.orig_h, place.orig_w],
                     "before_ms": round(before, 2), "after_ms": round(after, 2),
                     "near_tie_pixels": int(ties.sum()), "differ": int(differ.sum()),
                     "differ_outside_near_ties": int((differ & ~ties).sum())})
        say(f"{name}: {before:.1f} -> {after:.2f} ms")
    return {"photos": rows,
            "before_ms_mean": round(float(np.mean([r["before_ms"] for r in rows])), 2),
            "after_ms_mean": round(float(np.mean([r["after_ms"] for r in rows])), 2),
            "near_tie_pixels": sum(r["near_tie_pixels"] for r in rows),
            "differ": sum(r["differ"] for r in rows),
            "differ_outside_near_ties": sum(r["differ_outside_near_ties"] for r in rows)}


def run_labels(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)                 # as a postprocess worker
    doc: dict[str, Any] = {}
    for index, model in enumerate(args.model):
        manifest = Manifest.read(model)
        for big in (False, True):
            key = f"{model.name}{' 4000x3000' if big else ''}"
            say(f"{key}: logits of the photos")
            items = model_logits(model, photos(big))
            sets = [(key, items, manifest.input_size, manifest.align_corners)]
            if index == 0:
                sets.append((f"smooth63{' 4000x3000' if big else ''}", smooth63(items),
                             (500, 500), False))
            for name, batch, size, corners in sets:
                doc[name] = {"align_corners": corners, "input_size": list(size),
                             "logits": list(batch[0][1].shape),
                             **measure(batch, size, corners, args.repeats)}
    return doc


def run_png(args: argparse.Namespace) -> dict[str, Any]:
    manifest = Manifest.read(args.model[0])
    palette = [v for colour in manifest.palette for v in colour]
    doc: dict[str, Any] = {}
    for big in (False, True):
        masks = [labels_from_logits(logits, place, manifest.input_size, manifest.align_corners)
                 for _, logits, place in model_logits(args.model[0], photos(big))]
        results = {}
        for setting, options in PNG_SETTINGS.items():
            ms, size = [], 0
            for mask in masks:
                best = float("inf")
                for _ in range(args.repeats):
                    buf = io.BytesIO()
                    best = min(best, cpu_ms(encode_png, mask, palette, buf, options))
                ms.append(best)
                size += len(buf.getvalue())
            results[setting] = {"ms_per_mask": round(float(np.mean(ms)), 2),
                                "bytes_per_mask": size // len(masks)}
            say(f"{'4000x3000' if big else 'sample'} {setting}: {np.mean(ms):.2f} ms, "
                f"{size // len(masks)} bytes")
        doc["4000x3000" if big else "sample photos"] = {"masks": len(masks), **results}
    return doc


def synthetic_items(model: Path, count: int, folder: Path,
                    ) -> list[tuple[wire.Request, np.ndarray, Placement]]:
    """The bench's synthetic inputs (same generator, same seed) with the model's logits."""
    from pspnet.bench.inputs import synthetic
    from pspnet.model.image_io import decode_image

    inputs = synthetic(count, folder)
    shots = [(str(p), decode_image(p)) for p in inputs.paths]
    logits = model_logits(model, shots)
    return [(wire.Request(f"r{i}", path, str(truth), token="t" * 16), lg, place)
            for i, ((path, lg, place), truth)
            in enumerate(zip(logits, inputs.truths, strict=True))]


def worker_steps(items: list[tuple[wire.Request, np.ndarray, Placement]], manifest: Manifest,
                 out_dir: Path, repeats: int) -> dict[str, Any]:
    """CPU ms per image of each step of the postprocess worker's `finish` and around it,
    the best of `repeats` passes over the images for each step (interleaved: pass k of
    every step runs before pass k + 1 of any), and `finish` whole."""
    import zmq

    from pspnet.model.labels import (
        class_pixels,
        intersect_and_union,
        pixels_and_areas,
        read_ground_truth,
    )
    from pspnet.model.masks import mask_target, png_bytes, store_mask
    from pspnet.stages.postprocess import finish, found_classes

    palette = manifest.palette
    flat_palette = [v for colour in palette for v in colour]
    outputs = [wire.Output(req, place, "logits", lg) for req, lg, place in items]
    frames = [wire.encode(o) for o in outputs]
    labels = [labels_from_logits(lg, place, manifest.input_size, manifest.align_corners)
              for _, lg, place in items]
    truths = [read_ground_truth(req.ann, expected=lab.shape)
              for (req, _, _), lab in zip(items, labels, strict=True)]
    results = [finish(o, manifest, out_dir) for o in outputs]
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)                  # outputs in <- push (this process)
    push = ctx.socket(zmq.PUSH)                  # outputs out -> pull
    for sock in (pull, push):
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    endpoint = f"ipc://{out_dir}/study.sock"
    pull.bind(endpoint)
    push.connect(endpoint)

    def receive() -> None:                       # the worker's side of the socket only
        for f in frames:
            push.send_multipart(f, copy=False)
        time.sleep(0.05)
        started = time.process_time()
        for _ in frames:
            pull.recv_multipart(copy=False)
        receive.ms = (time.process_time() - started) * 1e3   # type: ignore[attr-defined]

    received = []

    def decode() -> None:
        for f in frames:
            received.append(wire.decode_as([zmq.Frame(bytes(x)) for x in f], wire.Output))

    def png(options: dict[str, int]) -> Callable[[], None]:
        def run() -> None:
            for lab in labels:
                encode_png(lab, flat_palette, io.BytesIO(), options)
        return run

    def write() -> None:                         # as finish writes a mask
        for (req, _, _), lab in zip(items, labels, strict=True):
            target, source = mask_target(out_dir, req.path)
            store_mask(png_bytes(lab, palette, source), target, source)

    steps: dict[str, Callable[[], None]] = {
        "labels": lambda: [labels_from_logits(lg, place, manifest.input_size,
                                              manifest.align_corners)
                           for _, lg, place in items],
        "mask PNG encode (as write_mask)": png({"compress_level": 1, "compress_type": 3}),
        "mask write (mask_target + store_mask: encode, temp file, link)": write,
        "class counts and IoU areas (pixels_and_areas, one pass)": lambda: [
            found_classes(pixels_and_areas(lab, t, manifest.num_classes)[0],
                          manifest.class_names)
            for lab, t in zip(labels, truths, strict=True)],
        "class counts alone (class_pixels: no ground truth)": lambda: [
            class_pixels(lab) for lab in labels],
        "ground truth read": lambda: [read_ground_truth(req.ann, expected=lab.shape)
                                      for (req, _, _), lab in zip(items, labels,
                                                                  strict=True)],
        "IoU areas alone (intersect_and_union)": lambda: [
            intersect_and_union(lab, t, manifest.num_classes)
            for lab, t in zip(labels, truths, strict=True)],
        "answer encode (wire.Result)": lambda: [wire.encode(r) for r in results],
        "output decode (wire)": decode,
        "finish (labels, mask, counts, truth, areas)": lambda: [
            finish(o, manifest, out_dir) for o in outputs],
    }
    best = {name: float("inf") for name in [*steps, "output receive (zmq, ipc)"]}
    for _ in range(repeats):
        for name, fn in steps.items():
            received.clear()
            best[name] = min(best[name], cpu_ms(fn) / len(items))
        receive()
        best["output receive (zmq, ipc)"] = min(best["output receive (zmq, ipc)"],
                                                receive.ms / len(items))  # type: ignore
    pull.close(0)
    push.close(0)
    sizes = [len(encode_bytes(lab, flat_palette)) for lab in labels]
    parts = [n for n in best if not n.startswith(("finish", "class counts alone",
                                                  "IoU areas alone", "mask PNG encode"))]
    doc = {name: round(ms, 3) for name, ms in best.items()}
    doc["sum of the worker's steps (finish's parts + receive, decode, answer)"] = round(
        sum(best[n] for n in parts), 3)
    doc["mask bytes per image"] = int(np.mean(sizes))
    doc["images"] = len(items)
    return doc


def encode_bytes(mask: np.ndarray, palette: list[int]) -> bytes:
    buf = io.BytesIO()
    encode_png(mask, palette, buf, {"compress_level": 1, "compress_type": 3})
    return buf.getvalue()


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    torch.set_num_threads(1)                 # as a postprocess worker
    cv2.setNumThreads(1)
    manifest = Manifest.read(args.model[0])
    with tempfile.TemporaryDirectory(prefix="pp-cost-") as tmp:
        items = synthetic_items(args.model[0], args.images, Path(tmp) / "inputs")
        say(f"{len(items)} synthetic images and their logits ready")
        doc = worker_steps(items, manifest, Path(tmp) / "masks", args.repeats)
    for name, value in doc.items():
        say(f"{name}: {value}")
    return {"model": str(args.model[0]), "cpu_ms_per_image": doc}


def big_jpegs(folder: Path, size: tuple[int, int] = BIG) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in photos(big=True, size=size):
        Image.fromarray(rgb).save(folder / f"{name}.jpg", quality=90)
        say(f"wrote {folder / name}.jpg")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.postprocess_cost",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("labels", "png", "big-jpegs", "worker"))
    p.add_argument("folder", nargs="?", type=Path, help="big-jpegs: where to write them")
    p.add_argument("--model", action="append", type=Path, default=[], metavar="DIR",
                   help="a model directory with a logits head (repeatable)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=48, help="worker: synthetic images")
    p.add_argument("--json", type=Path, default=None, metavar="FILE")
    p.add_argument("--size", default="4000x3000", metavar="WxH",
                   help="big-jpegs: the photos' size (a 48 Mpx phone: 8000x6000)")
    args = p.parse_args(argv)
    if args.what == "big-jpegs":
        if args.folder is None:
            p.error("big-jpegs needs a folder")
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            p.error(f"--size {args.size!r}: give WIDTHxHEIGHT, e.g. 8000x6000")
        big_jpegs(args.folder, (height, width))
        return 0
    if not args.model:
        p.error(f"{args.what} needs --model DIR")
    run = {"labels": run_labels, "png": run_png, "worker": run_worker}[args.what]
    doc = run(args)
    text = json.dumps(doc, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
