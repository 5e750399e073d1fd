"""The device run's model, made on the device: calibrated checkpoint and head switch.

Why here: the R50 model (~190 MB) is over what a device call may carry, so it is made
there, inside the one timed call. run.sh builds the model directory with `pspnet build
--no-onnx` (the torch backend needs no ONNX, and exporting R50 once per batch size costs a
minute or more); the checkpoint and the head switch have no CLI of their own.

  checkpoint  random init + pspnet.build_model.calibrate's recipe (BN statistics and conv_seg from
              the sample photos) in the official {"meta", "state_dict"} layout. On CUDA the
              calibration's forward passes run on the GPU (R50 at 500x500 on 10 photos: a
              few seconds instead of minutes on the CPU); anything failing there falls back
              to `make_calibrated_checkpoint` on the CPU (at --fallback-size).
  head        copy a model directory's manifest with another head (logits <-> labels): the
              torch program is the network alone and the head is applied by ServingModel,
              so the .pt2 is shared (hard link, else copy).

Run with PYTHONPATH holding the repository and the carried wheels (run.sh sets it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("make_model")


def make_checkpoint(config: str, out: Path, *, input_size: int, device: str, seed: int,
                    fallback_size: int, fallback_photos: int | None) -> dict:
    """Write the calibrated checkpoint; return what was done (for the log and summary)."""
    from pspnet.build_model.calibrate import make_calibrated_checkpoint

    started = time.perf_counter()
    where, max_photos = "cpu", None
    if device.startswith("cuda"):
        try:
            make_calibrated_checkpoint(config, out, input_size=input_size, seed=seed,
                                       device=device)
            where = device
        except Exception as exc:  # noqa: BLE001 - any failure: the CPU recipe still works
            log.warning("GPU calibration failed (%s: %s); falling back to the CPU at %d",
                        type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "",
                        fallback_size)
            input_size, max_photos = fallback_size, fallback_photos
    if where == "cpu":
        make_calibrated_checkpoint(config, out, input_size=input_size, max_photos=max_photos,
                                   seed=seed)
    meta = _read_meta(out)
    return {"where": where, "input_size": input_size,
            "classes_per_photo": meta.get("calibration", {}).get("classes_per_photo"),
            "seconds": round(time.perf_counter() - started, 2)}


def _read_meta(path: Path) -> dict:
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True).get("meta", {})
    except Exception:  # noqa: BLE001 - only for the summary
        return {}


def other_head(src: Path, dst: Path, head: str) -> dict:
    """dst = src with the manifest's head replaced; the torch program(s) linked, not rebuilt."""
    from pspnet.model.manifest import Manifest

    manifest = Manifest.read(src)
    dst.mkdir(parents=True, exist_ok=True)
    programs = {manifest.torch_program} | set(
        (manifest.source.get("torch_programs") or {}).values())
    for name in sorted(p for p in programs if p):
        target = dst / name
        target.unlink(missing_ok=True)
        try:
            os.link(src / name, target)
        except OSError:
            shutil.copy2(src / name, target)
    source = {**manifest.source, "head_switched_from": manifest.head}
    dataclasses.replace(manifest, head=head, source=source).write(dst)
    return {"out": str(dst), "head": head, "from": str(src)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("checkpoint", help="calibrated checkpoint, official layout")
    c.add_argument("--config", required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--input-size", type=int, default=500)
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--fallback-size", type=int, default=256,
                   help="CPU calibration size if the GPU path fails")
    c.add_argument("--fallback-photos", type=int, default=4)
    h = sub.add_parser("head", help="same model directory with another head")
    h.add_argument("--src", type=Path, required=True)
    h.add_argument("--out", type=Path, required=True)
    h.add_argument("--head", required=True, choices=("logits", "labels"))
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.cmd == "checkpoint":
        info = make_checkpoint(args.config, args.out, input_size=args.input_size,
                               device=args.device, seed=args.seed,
                               fallback_size=args.fallback_size,
                               fallback_photos=args.fallback_photos)
    else:
        info = other_head(args.src, args.out, args.head)
    print(json.dumps({"make_model": args.cmd, **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
