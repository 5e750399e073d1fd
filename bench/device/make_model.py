"""The device run's model, made on the device: calibrated checkpoint, then torch-only artifacts.

Why here and not `pspnet build` alone: the R50 model (~190 MB) is over what a device call may
carry, so it is made there, inside the one timed call; and `pspnet build` exports one ONNX
model per batch size, which costs a minute or more for R50 and is not needed by the torch
backend. Everything below goes through the build package's own functions, so the checkpoint
and the model directory are what `pspnet build` would make, minus the ONNX files.

  checkpoint  random init + build_model.calibrate's recipe (BN statistics and conv_seg from
              the sample photos) in the official {"meta", "state_dict"} layout. On CUDA the
              calibration's forward passes run on the GPU (R50 at 500x500 on 10 photos: a
              few seconds instead of minutes on the CPU); anything failing there falls back
              to `make_calibrated_checkpoint` on the CPU (at --fallback-size).
  artifacts   config + checkpoint -> manifest.json + pspnet_core.pt2 through
              build_model.artifacts.write_artifacts with the ONNX export step skipped (the
              manifest still names pspnet_bs{N}.onnx; those files are absent, so only the
              torch backend can open the directory). Used when `pspnet build` has no flag to
              skip ONNX.
  head        copy a model directory's manifest with another head (logits <-> labels): the
              torch program is the network alone and the head is applied by ServingModel,
              so the .pt2 is shared (hard link, else copy).

Run with PYTHONPATH holding the repository and the carried wheels (run.sh sets it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("make_model")


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for matmuls and cuDNN convolutions inside the block (restored after)."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_checkpoint(config: str, out: Path, *, input_size: int, device: str, seed: int,
                    fallback_size: int, fallback_photos: int | None) -> dict:
    """Write the calibrated checkpoint; return what was done (for the log and summary)."""
    started = time.perf_counter()
    if device.startswith("cuda"):
        try:
            counts = _calibrate_on_gpu(config, out, input_size=input_size, device=device,
                                       seed=seed)
            return {"where": device, "input_size": input_size, "classes_per_photo": counts,
                    "seconds": round(time.perf_counter() - started, 2)}
        except Exception as exc:  # noqa: BLE001 - any failure: the CPU recipe still works
            log.warning("GPU calibration failed (%s: %s); falling back to the CPU at %d",
                        type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "",
                        fallback_size)
            input_size, max_photos = fallback_size, fallback_photos
    else:
        max_photos = None
    from build_model.calibrate import make_calibrated_checkpoint

    make_calibrated_checkpoint(config, out, input_size=input_size, max_photos=max_photos,
                               seed=seed)
    meta = _read_meta(out)
    return {"where": "cpu", "input_size": input_size,
            "classes_per_photo": meta.get("calibration", {}).get("classes_per_photo"),
            "seconds": round(time.perf_counter() - started, 2)}


def _calibrate_on_gpu(config: str, out: Path, *, input_size: int, device: str,
                      seed: int) -> list[int]:
    """build_model.calibrate.make_calibrated_checkpoint, with the forward passes on CUDA.

    Same steps, same helpers, same file layout; only where the tensors live differs (the
    PCA of the decoder features still runs on the CPU in float64, as there).
    """
    import numpy as np
    import torch

    from build_model import calibrate as cal
    from build_model import mmseg_model
    from build_model.inputs import letterboxed_batch, normalised_batch
    from build_model.samples import sample_images

    dev = torch.device(device)
    mmseg = mmseg_model.import_mmseg()
    cfg = mmseg_model.load_config(mmseg_model.resolve_config(config))
    mean, std = mmseg_model.normalisation(cfg)
    torch.manual_seed(seed)
    segmentor = mmseg_model.build_segmentor(cfg, keep_auxiliary=True)
    photos = [rgb for _, rgb in sample_images()]
    size = (input_size, input_size)
    images, boxes = letterboxed_batch(photos, size)
    x = normalised_batch(images, boxes, mean, std).to(dev)
    core = mmseg_model.SegmentorCore(segmentor).to(dev)
    with strict_fp32():
        cal._damp_residual_branches(core)
        cal._calibrate_batchnorm(core, x)
        features = cal._conv_seg_input(core, x).cpu()
        valid = cal._valid_at(boxes, size, features.shape[2:])
        conv_seg = core.decode_head.conv_seg
        weight, bias = cal._principal_classifier(features, valid, conv_seg.out_channels, seed)
        with torch.no_grad():
            conv_seg.weight.copy_(weight.view_as(conv_seg.weight).to(dev))
            conv_seg.bias.copy_(bias.to(dev))
            labels = core(x).argmax(1).cpu().numpy()
    counts = [int(len(np.unique(lab[m]))) for lab, m in zip(labels, valid.numpy(), strict=True)]
    log.info("calibrated on %d photos at %dx%d on %s: %s distinct classes per photo",
             len(photos), *size, device, counts)
    segmentor = segmentor.cpu().eval()
    meta = {
        "mmseg_version": mmseg.__version__,
        "config": str(config),
        "note": "random init + BN statistics and conv_seg calibrated on photos "
                "(build_model.calibrate, forward passes on the GPU); not trained",
        "calibration": {"input_size": input_size, "photos": len(photos), "seed": seed,
                        "classes_per_photo": counts, "device": device},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in segmentor.state_dict().items()}
    torch.save({"meta": meta, "state_dict": state}, str(out))
    del core, x, features
    torch.cuda.empty_cache()
    return counts


def _read_meta(path: Path) -> dict:
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True).get("meta", {})
    except Exception:  # noqa: BLE001 - only for the summary
        return {}


def make_artifacts(config: str, checkpoint: Path, out: Path, *, batch_sizes: list[int],
                   input_size: int, head: str) -> dict:
    """manifest.json + pspnet_core.pt2 via write_artifacts, the ONNX export step skipped."""
    from build_model import artifacts
    from build_model.network import load_network
    from stages.manifest import voc_palette

    started = time.perf_counter()
    network = load_network(config, checkpoint)

    def skip_onnx(module, example_inputs, paths, **kwargs):
        log.info("ONNX export skipped (device run: the torch backend reads only the .pt2)")
        return {n: Path(p) for n, p in paths.items()}

    saved = artifacts.export_onnx_batches
    artifacts.export_onnx_batches = skip_onnx
    try:
        manifest = artifacts.write_artifacts(
            network.core, out, input_size=input_size, batch_sizes=batch_sizes, head=head,
            mean=network.mean, std=network.std, num_classes=network.num_classes,
            class_names=network.class_names, palette=voc_palette(network.num_classes),
            source={**network.source,
                    "onnx": "not exported (bench/device/make_model.py: torch backend only)"},
            run_atc=False, torch_program=True)
    finally:
        artifacts.export_onnx_batches = saved
    if not manifest.torch_program:      # the backend reads the per-size fallback programs
        log.warning("no dynamic-batch torch program; per batch size: %s",
                    manifest.source.get("torch_programs"))
    return {"out": str(out), "torch_program": manifest.torch_program,
            "batch_sizes": manifest.batch_sizes, "head": manifest.head,
            "logits_size": list(manifest.logits_size),
            "seconds": round(time.perf_counter() - started, 2)}


def other_head(src: Path, dst: Path, head: str) -> dict:
    """dst = src with the manifest's head replaced; the torch program(s) linked, not rebuilt."""
    from stages.manifest import Manifest

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
    a = sub.add_parser("artifacts", help="manifest + torch program, no ONNX")
    a.add_argument("--config", required=True)
    a.add_argument("--checkpoint", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--batch-sizes", default="1,4,8,16,32,64")
    a.add_argument("--input-size", type=int, default=500)
    a.add_argument("--head", default="logits", choices=("logits", "labels"))
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
    elif args.cmd == "artifacts":
        sizes = sorted({int(s) for s in args.batch_sizes.split(",") if s.strip()})
        info = make_artifacts(args.config, args.checkpoint, args.out, batch_sizes=sizes,
                              input_size=args.input_size, head=args.head)
    else:
        info = other_head(args.src, args.out, args.head)
    print(json.dumps({"make_model": args.cmd, **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
