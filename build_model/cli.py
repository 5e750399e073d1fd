"""`pspnet build`: the command-line face of `pspnet.build_model.export.build`.

Imports nothing heavy at import time (the daemon imports this module to list its
subcommands and must start without mmseg, mmengine or onnx); the run function does.
User errors print ONE line, `pspnet build: error: ...`, and exit 2; a failed --verify
exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from pspnet.core.exits import EXIT_FAILED, EXIT_USAGE

PROG_ERROR = "pspnet build: error:"
MAX_BATCH = 256
BUILD_EXTRAS = ("mmseg", "mmengine", "mmcv", "onnx", "onnxsim", "onnxscript", "ftfy", "regex")

DESCRIPTION = """\
Turn an mmsegmentation PSPNet config + checkpoint into a model directory for the daemon:
one static ONNX model per batch size (pspnet_bs{N}.onnx, uint8 N x H x W x 3 `image` and
int32 N x 4 `box` in, `logits` or `labels` out; normalisation and padding mask inside the
graph), an Ascend ATC script per model (pspnet_bs{N}.atc.sh, run when `atc` is on PATH)
with the ONNX it reads (pspnet_bs{N}_opset13.onnx: the same graph at the opset CANN 6.0
accepts), the torch backend's program (pspnet_core.pt2, dynamic batch) and manifest.json."""

EPILOG = """\
example:
  pspnet build --config pspnet_r50-d8_4xb4-20k_voc12aug-512x512 \\
      --checkpoint pspnet_r50-d8_512x512_20k_voc12aug_20200617_101958-ed5dfbd9.pth \\
      --batch-sizes 1,4,8,16,32,64 --input-size 500 --out models/pspnet --verify"""


def add_build_parser(subparsers: Any) -> None:
    """Add the `build` subcommand to the `pspnet` parser (sets `run`)."""
    p = subparsers.add_parser(
        "build", help="mmseg config + checkpoint -> ONNX / ATC / torch model directory",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = _one_line_error  # type: ignore[method-assign]  # argparse's own errors too
    p.add_argument(
        "--config", required=True, metavar="CFG",
        help="mmseg config: a .py file, or the name of a config shipped with mmseg or this "
             "package (required; e.g. pspnet_r50-d8_4xb4-20k_voc12aug-512x512, or "
             "pspnet_r18-tiny for the small test model)")
    p.add_argument(
        "--checkpoint", required=True, metavar="PTH",
        help="mmseg checkpoint, {'meta', 'state_dict'} or a bare state_dict (required; e.g. "
             "pspnet_r50-d8_512x512_20k_voc12aug_20200617_101958-ed5dfbd9.pth)")
    p.add_argument(
        "--out", required=True, metavar="DIR",
        help="output directory, created if missing; files in it are overwritten (required; "
             "e.g. models/pspnet)")
    p.add_argument(
        "--batch-sizes", default="1,4,8,16,32,64", type=_batch_sizes, metavar="N,N,...",
        help="comma-separated static batch sizes, integers 1..256, one ONNX model each "
             "(default: 1,4,8,16,32,64; e.g. 1,16)")
    p.add_argument(
        "--input-size", default=(500, 500), type=_input_size, metavar="S|HxW",
        help="model input size in pixels: S for S x S, or HxW; images are letterboxed into "
             "it (default: 500, as the reference; e.g. 512 or 512x1024)")
    p.add_argument(
        "--head", default="logits", choices=("logits", "labels"),
        help="graph output: 'logits' = float32 N x C x h x w at the network's own "
             "resolution (1/8 for PSPNet; the daemon resizes them); 'labels' = uint8 "
             "N x H x W, bilinear upsample + argmax inside the graph, as the reference OM "
             "(default: logits)")
    p.add_argument(
        "--verify", action="store_true",
        help="after building, run onnxruntime (smallest batch size; the ONNX model and the "
             "ATC script's converted copy) and the torch program on the bundled sample "
             "photos and compare with mmseg's eager model; exit 1 if max |logit diff| > 1e-3 "
             "or label agreement < 99.9%% (default: off)")
    p.add_argument(
        "--verify-all", action="store_true",
        help="like --verify, but check every batch size (slow for large batches on a CPU; "
             "default: off)")
    p.add_argument(
        "--trust-checkpoint", action="store_true",
        help="allow a checkpoint that needs full unpickling, which can run arbitrary code; "
             "only for files from a source you trust (default: off, weights-only loading)")
    p.add_argument(
        "--soc-version", default="Ascend310P3", metavar="SOC",
        help="Ascend SoC written into the ATC scripts (override later with SOC=... when "
             "running them) (default: Ascend310P3; e.g. Ascend310)")
    p.add_argument(
        "--atc-opset", default=13, type=_atc_opset, metavar="N",
        help="ONNX opset of the models the ATC scripts read, 13..18: below 18 a converted "
             "copy pspnet_bs{N}_opset{K}.onnx is written next to the opset-18 one that "
             "onnxruntime runs; CANN 6.0 documents opsets 9-13, CANN 7/8 parse newer ones "
             "only op by op (default: 13; e.g. 18 to give ATC the exported files)")
    p.add_argument(
        "--om-precision", default="fp16", choices=("fp16", "fp32"),
        help="what the Ascend OM computes in, written into the ATC scripts as "
             "--precision_mode: fp16 = force_fp16 (ATC's default, as the seed ran; fastest "
             "on a 310P), fp32 = must_keep_origin_dtype; serve and bench with the same "
             "--precision (default: fp16)")
    p.add_argument(
        "--no-atc", action="store_true",
        help="only write the ATC scripts, even if `atc` is on PATH (default: run them when "
             "`atc` is found)")
    p.add_argument(
        "--no-simplify", action="store_true",
        help="skip onnxsim (then every batch size is exported separately, which is slower; "
             "default: simplify)")
    p.add_argument(
        "--no-torch-program", action="store_true",
        help="do not write pspnet_core.pt2 for the torch backend (default: write it)")
    p.add_argument(
        "--no-onnx", action="store_true",
        help="write only pspnet_core.pt2 and the manifest: a directory for the torch "
             "backend alone, built in seconds (no ONNX export, no onnxsim, no ATC "
             "scripts; --verify then checks the torch program only; default: ONNX too)")
    p.add_argument(
        "--no-psp-rewrite", action="store_true",
        help="keep mmseg's PSP bottleneck as it is: one 3x3 conv over the feature map and "
             "the upsampled pyramid. By default the pyramid's share of that conv is "
             "computed on the small pooled maps (Conv + MatMul, the same function: -21 %% "
             "of R50-D8's MACs at 500x500); PSPHead only (default: rewrite)")
    p.add_argument(
        "--no-bn-fold", action="store_true",
        help="keep BatchNorm as separate layers (default: fold each one into the "
             "convolution before it, in every artifact)")
    p.add_argument(
        "-q", "--quiet", action="store_true",
        help="only warnings and errors on stderr (default: progress lines too)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Build (and maybe verify); map user errors to one line and exit status 2."""
    from pspnet.build_model.errors import BuildError
    from pspnet.build_model.export import build
    from pspnet.build_model.verify import VerifyError
    from pspnet.core.config import outputs_problem

    if args.no_onnx and args.no_torch_program:
        print(f"{PROG_ERROR} nothing to build: --no-onnx and --no-torch-program together "
              "leave no model", file=sys.stderr)
        return EXIT_USAGE
    problem = outputs_problem(("--out", Path(args.out), True))
    if problem:                            # before the checkpoint and mmseg load
        print(f"{PROG_ERROR} {problem}", file=sys.stderr)
        return EXIT_USAGE
    logger = logging.getLogger("pspnet.build_model")
    saved = logger.level, logger.propagate
    handler = _log_to_stderr(logger, logging.WARNING if args.quiet else logging.INFO)
    try:
        build(args.config, args.checkpoint, args.out, args.batch_sizes, args.input_size,
              args.head, trust_checkpoint=args.trust_checkpoint,
              simplify=not args.no_simplify, soc_version=args.soc_version,
              run_atc=False if args.no_atc else None,
              torch_program=not args.no_torch_program, onnx=not args.no_onnx,
              verify=args.verify, verify_all=args.verify_all,
              psp_rewrite=not args.no_psp_rewrite, fold_bn=not args.no_bn_fold,
              atc_opset=args.atc_opset, om_precision=args.om_precision)
    except BuildError as exc:
        print(f"{PROG_ERROR} {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except VerifyError as exc:
        print(f"{PROG_ERROR} verification failed: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in BUILD_EXTRAS:
            raise
        print(f"{PROG_ERROR} {exc.name} is not installed; pspnet build needs the build "
              "extras: pip install 'pspnet-daemon[build]'", file=sys.stderr)
        return EXIT_USAGE
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    return 0


def _one_line_error(message: str) -> NoReturn:
    print(f"{PROG_ERROR} {_one_line(message)} (see pspnet build --help)", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(not 1 <= n <= MAX_BATCH for n in sizes):
        raise argparse.ArgumentTypeError(
            f"batch sizes must be comma-separated integers from 1 to {MAX_BATCH}, "
            f"not {text!r}")
    return sorted(set(sizes))


def _atc_opset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 13 <= value <= 18:
        raise argparse.ArgumentTypeError(
            f"--atc-opset must be an integer from 13 to 18 (CANN 6.0 documents up to 13), "
            f"not {text!r}")
    return value


def _input_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not all(32 <= v <= 4096 for v in values):
        raise argparse.ArgumentTypeError(
            f"input size must be S or HxW with integers from 32 to 4096, not {text!r}")
    return values[0], values[1]


def _log_to_stderr(logger: logging.Logger, level: int) -> logging.Handler:
    """Progress lines on stderr, prefixed like the errors; only for this run."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pspnet build: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler
