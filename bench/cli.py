"""`pspnet eval`, `pspnet bench` and `pspnet batch`: arguments and what each runs.

Why here and not in daemon/: these commands measure the daemon (accuracy, speed) rather
than being part of it; `pspnet.cli` registers them. The shared flags (model, backend,
workers...) come from `daemon.commands.add_pipeline_args`, so eval and bench run exactly
the configuration `pspnet serve` would.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from daemon.commands import add_pipeline_args, usage_error
from stages.backends.base import KINDS, PRECISIONS, SIMULATED
from stages.cli_args import (
    HelpFormatter,
    key_value,
    non_negative_int,
    outputs_problem,
    positive_float,
    positive_int,
)
from stages.exits import EXIT_FAILED, EXIT_UNAVAILABLE

DEFAULT_BATCH_SIZES = "1,4,8,16,32,64"
REPORT_IMAGES = 24            # rows of eval --report's contact sheet

EVAL_EPILOG = """\
output: mmseg's per-class table (IoU, Acc; 2 decimals), then aAcc, mIoU, mAcc, then every
image that could not be scored (missing/unreadable image or ground truth) with the reason.
Exit status: 0 when at least one image was scored, 1 when none was, 2 on usage errors,
4 when --endpoint does not answer.

examples:
  pspnet eval --voc VOCdevkit/VOC2012 --model models/r50 --batch-size 16 --json voc.json
  pspnet eval --voc VOCdevkit/VOC2012 --model models/r50 --endpoint ipc:///run/pspnet/front
      (a running `pspnet serve --out MASKS ...`; --model is read for the class names)"""

BENCH_EPILOG = """\
modes, measured for each batch size in the same run, repeat by repeat:
  e2e       JPEG paths in -> masks and running mIoU out, through the real stage processes
            (one front per batch size); latency p50/p99 is submit -> answer per image
  executor  pre-staged batches straight through the backend (upload/execute over two
            slots): ais_bench's 1000 x batch / mean execute ms, the device's ceiling here
  serial    decode -> letterbox -> infer -> postprocess, one batch at a time in this
            process, as the seed's steps run (same backend, batch size, postprocessing)
Figures are medians of --repeats; warm-up batches are not timed. `busy pre/exe/post` is
each stage's busy time over the e2e wall time, per process.

examples:
  pspnet bench --model models/r50 --backend torch --devices cuda:0 --precision fp16 \\
      --batch-sizes 1,4,8,16,32,64 --synthetic 256 --preprocess-workers 8 \\
      --json bench/results/nvidia-h100.json --plot bench/results/nvidia-h100.png
  pspnet bench --model models/small --batch-sizes 1,4,8 --synthetic 48 \\
      --preprocess-workers 1 --postprocess-workers 1 --backend-option threads=1 \\
      --json bench/results/cpu-2core.json --plot bench/results/cpu-2core.png
  pspnet bench --model models/small --backend sim --backend-option img_s=400 \\
      --batch-sizes 16,32,64 --synthetic 96 --min-images 1280 --no-masks
      (the host side alone, against a simulated 400 img/s device)"""


BATCH_EPILOG = """\
output: `pspnet eval`'s table (NaN without ground truths), how many images were scored
and segmented, every image that failed with the reason (a bad image fails its row, never
the job); --json: `pspnet eval`'s document (mIoU, aAcc, mAcc, per_class, images, failed).
Exit status: 0 when at least one image was segmented, 1 when none was or the job failed,
2 on usage errors, 4 when `--address auto` finds no cluster (an address that does not
answer is waited for, as Ray does). Needs Ray Data: pip install 'pspnet-daemon[ray]'.

On a cluster every node must see the model directory, the images and --out at the same
paths (shared storage), and have this package installed (deploy/rayjob.yaml).

examples:
  pspnet batch --images photos/ --model models/r50 --out masks/
  pspnet batch --voc VOCdevkit/VOC2012 --model models/r50 --json voc.json
  pspnet batch --list million.txt --model models/r50-labels --backend torch \\
      --device cuda --executors 8 --precision fp16 --address auto --out /shared/masks"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval", formatter_class=_Formatter,
        help="mIoU of a VOC split through the daemon's pipeline (mmseg's table)",
        description="Run every image of a VOC split (JPEGImages/, SegmentationClass/, "
                    "ImageSets/Segmentation/<split>.txt) through the daemon's pipeline, "
                    "started here, or through a running daemon with --endpoint, and print "
                    "mmseg's IoUMetric table. A progress line (images/s, ETA) goes to "
                    "stderr.",
        epilog=EVAL_EPILOG)
    ev.add_argument("--voc", type=Path, required=True, metavar="ROOT",
                    help="the VOC root (the folder holding JPEGImages/ and friends)")
    ev.add_argument("--split", default="val",
                    help="which ImageSets/Segmentation/<split>.txt to evaluate")
    add_pipeline_args(ev)
    ev.add_argument("--json", type=Path, default=None, metavar="FILE",
                    help="also write the results as JSON: mIoU, aAcc, mAcc (percent, "
                         "unrounded), per_class, images (scored), failed")
    ev.add_argument("--report", type=Path, default=None, metavar="DIR",
                    help="also draw pictures into DIR: overlays.png (the first "
                         f"{REPORT_IMAGES} images of the split with a mask: each photo "
                         "beside its mask blended on it, with a class legend) and "
                         "per-class-iou.png (a bar chart); the masks go to DIR/masks "
                         "unless --out names another folder")
    ev.add_argument("--endpoint", default=None, metavar="URL",
                    help="use the running daemon at URL (ipc://PATH or tcp://HOST:PORT) "
                         "instead of starting the pipeline here; it must write masks "
                         "(`serve --out`); they are scored here and copied to --out")
    ev.set_defaults(run=run_eval, log_level="warning")

    bench = sub.add_parser(
        "bench", formatter_class=_Formatter,
        help="images/s per batch size: end to end vs executor only vs serial",
        description="Measure, for each batch size, the streaming pipeline end to end, "
                    "the executor alone and the serial baseline; print a table, and write "
                    "JSON and a plot for bench/results/.",
        epilog=BENCH_EPILOG)
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, metavar="DIR",
                        help="every image file in DIR (no ground truth)")
    source.add_argument("--voc", type=Path, metavar="ROOT",
                        help="a VOC root: the --split images with their ground truths")
    source.add_argument("--synthetic", type=positive_int, metavar="N",
                        help="N photo-like JPEGs (crops of the sample photos, longest side "
                             "500) with stand-in ground truths, in a temporary folder")
    bench.add_argument("--split", default="val", help="with --voc: which split")
    bench.add_argument("--batch-sizes", default=None, metavar="LIST",
                       help="comma list of static batch sizes to measure, e.g. "
                            f"{DEFAULT_BATCH_SIZES} (default: every size the model "
                            "directory was built with)")
    bench.add_argument("--repeats", type=positive_int, default=3,
                       help="timed passes per mode and batch size; figures are medians")
    bench.add_argument("--warmup", type=non_negative_int, default=2, metavar="BATCHES",
                       help="untimed batches through each mode before timing")
    bench.add_argument("--min-images", type=non_negative_int, default=0, metavar="N",
                       help="a pass runs at least N images, cycling the inputs (default: "
                            "each input once)")
    bench.add_argument("--baseline-images", type=non_negative_int, default=0, metavar="N",
                       help="executor-only and serial passes run N images (cycling). e2e "
                            "fills and drains the pipeline once per pass, so a long "
                            "--min-images pass makes its figure the daemon's rate; the "
                            "baselines need no such length, and serial is slow (default: "
                            "as many as the e2e pass)")
    bench.add_argument("--backlog", type=positive_int, default=None, metavar="K",
                       help="e2e: requests kept submitted but unanswered (default: 3 x "
                            "batch + 2 per worker: every stage busy, bounded queueing)")
    bench.add_argument("--machine", default=None, metavar="NAME",
                       help="name of this machine in the results (default: e.g. cpu-2core, "
                            "or the GPU's name)")
    bench.add_argument("--json", type=Path, default=None, metavar="FILE",
                       help="write every figure, every repeat, versions and settings here")
    bench.add_argument("--plot", type=Path, default=None, metavar="FILE",
                       help="write a PNG of images/s against batch size, three modes")
    add_pipeline_args(bench)
    for action in bench._actions:          # shared flags that mean a little more here
        if action.dest == "batch_size":    # --batch-sizes replaces it (still honoured)
            action.help = argparse.SUPPRESS
        elif action.dest == "out":
            action.help = ("keep the masks under MASKDIR/e2e-bsN/ and MASKDIR/serial-bsN/ "
                           "(default: a temporary folder, removed afterwards)")
        elif action.dest == "no_masks":
            action.help = "write no masks in e2e and serial (measures the rest)"
    bench.set_defaults(run=run_bench, log_level="warning")
    add_batch_parser(sub)


def add_batch_parser(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser(
        "batch", formatter_class=_Formatter,
        help="a folder, a listing or a VOC split through a Ray Data job (one machine or a "
             "Ray cluster)",
        description="Segment many images with Ray Data: decode + letterbox as CPU tasks, "
                    "executor actors holding one backend each (one GPU each with --device "
                    "cuda), postprocess tasks writing the masks and IoU areas. The same "
                    "masks and result JSON as `pspnet eval`. Starts a local Ray instance "
                    "unless --address (or RAY_ADDRESS) names a cluster. A progress line "
                    "(images/s, ETA) goes to stderr.",
        epilog=BATCH_EPILOG)
    source = batch.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, metavar="DIR",
                        help="every image file directly in DIR (no ground truth)")
    source.add_argument("--list", type=Path, metavar="FILE", dest="listing",
                        help="one image path per line, optionally a tab and its ground "
                             "truth; relative paths start at FILE's folder")
    source.add_argument("--voc", type=Path, metavar="ROOT",
                        help="a VOC root: the --split images with their ground truths")
    batch.add_argument("--split", default="val", help="with --voc: which split")
    batch.add_argument("--model", type=Path, required=True, metavar="DIR",
                       help="a directory made by `pspnet build`, at the same path on every "
                            "node")
    batch.add_argument("--backend", choices=(*KINDS, SIMULATED), default="ort",
                       help="as for `pspnet serve`")
    batch.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="cuda: each executor actor asks Ray for one GPU")
    batch.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="torch backend compute precision")
    batch.add_argument("--batch-size", type=positive_int, default=None,
                       help="static batch size to run (default: 16 if built, else the "
                            "largest)")
    batch.add_argument("--executors", type=positive_int, default=None, metavar="N",
                       help="executor actors, at most (Ray starts one and adds more while "
                            "they are the bottleneck; default: the cluster's GPUs with "
                            "--device cuda, else 1)")
    batch.add_argument("--executor-cpus", type=positive_float, default=1.0, metavar="N",
                       help="CPUs each executor actor reserves")
    batch.add_argument("--backend-option", type=key_value, action="append", default=[],
                       metavar="KEY=VALUE", help="backend tuning, as for `pspnet serve`")
    batch.add_argument("--out", type=Path, default=None, metavar="MASKDIR",
                       help="write masks here (palette PNGs named after each image's stem, "
                            "as `pspnet serve --out`); without it none are written")
    batch.add_argument("--max-pixels", type=positive_int, default=50_000_000,
                       help="refuse images with more pixels (read from the header)")
    batch.add_argument("--json", type=Path, default=None, metavar="FILE",
                       help="also write the results as JSON (`pspnet eval`'s document)")
    batch.add_argument("--address", default=None, metavar="ADDR",
                       help="join the Ray cluster at ADDR (auto, HOST:PORT, ray://HOST:"
                            "10001); default: RAY_ADDRESS if set, else a local Ray instance")
    batch.add_argument("--num-cpus", type=positive_int, default=None, metavar="N",
                       help="CPUs of the local Ray instance (default: all of this machine)")
    batch.set_defaults(run=run_batch)


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the epilog's examples keep their line breaks."""


# ---- eval ------------------------------------------------------------------------------

def run_eval(args: argparse.Namespace) -> int:
    from bench.eval import (
        evaluate_endpoint,
        evaluate_in_process,
        print_report,
        report,
        write_json,
    )
    from bench.progress import Progress
    from bench.voc import VocLayoutError, read_split
    from daemon.commands import pipeline_config
    from stages.logs import configure_logging
    from stages.manifest import Manifest, pick_batch_size

    if args.report is not None:
        if args.no_masks:
            return usage_error("eval", "--report draws the masks: drop --no-masks")
        if args.out is None:
            args.out = args.report / "masks"
    cfg = pipeline_config(args)
    configure_logging(cfg.log_level, cfg.log_json)
    try:
        manifest = Manifest.read(args.model)
        batch = None if args.endpoint else pick_batch_size(manifest, args.batch_size)
        split = read_split(args.voc, args.split)
    except (OSError, ValueError, VocLayoutError) as exc:
        return usage_error("eval", str(exc))
    problem = outputs_problem(("--json", args.json, False), ("--out", args.out, True),
                              ("--report", args.report, True))
    if problem:                            # found now, not after the whole split
        return usage_error("eval", problem)
    if not split.items:
        what = (f"{args.split}.txt lists no images" if not split.listed else
                f"none of the {split.listed} images of {args.split}.txt exists under "
                f"{args.voc}")
        return usage_error("eval", what)
    progress = Progress(len(split.items), label="eval ")
    if args.endpoint:
        from daemon.client import DaemonUnavailable

        try:
            outcome = evaluate_endpoint(args.endpoint, split, manifest,
                                        None if args.no_masks else args.out, progress)
        except DaemonUnavailable as exc:
            sys.stderr.write(f"pspnet eval: error: {exc}\n")
            return EXIT_UNAVAILABLE
    else:
        from daemon.front import PipelineError

        try:
            outcome = evaluate_in_process(cfg, split, progress)
        except PipelineError as exc:
            sys.stderr.write(f"pspnet eval: error: {exc}\n")
            return EXIT_FAILED
    progress.close()
    doc = report(outcome, split, manifest, {
        "model": str(args.model), "backend": None if args.endpoint else args.backend,
        "batch_size": batch,
        "endpoint": args.endpoint, "masks": str(args.out) if args.out else None})
    print_report(outcome, doc, manifest)
    if args.json is not None:
        write_json(args.json, doc)
    if args.report is not None:
        from bench.eval import write_pictures

        for path in write_pictures(outcome, split, manifest, doc, args.report,
                                   REPORT_IMAGES):
            print(f"report: {path}")
    return 0 if doc["images"] else EXIT_FAILED


# ---- batch (Ray Data) ------------------------------------------------------------------

def run_batch(args: argparse.Namespace) -> int:
    from bench.eval import print_report, report, write_json
    from bench.progress import Progress
    from bench.voc import VocLayoutError, read_split
    from stages.manifest import Manifest, pick_batch_size

    try:
        from bench import ray_batch
    except ImportError as exc:             # ray is an optional extra
        return usage_error("batch", f"needs Ray Data ({exc}): pip install "
                                    "'pspnet-daemon[ray]'")
    try:
        manifest = Manifest.read(args.model)
        batch = pick_batch_size(manifest, args.batch_size)
        if args.images is not None:
            split = ray_batch.from_folder(args.images)
        elif args.listing is not None:
            split = ray_batch.from_listing(args.listing)
        else:
            split = read_split(args.voc, args.split)
    except (OSError, ValueError, VocLayoutError) as exc:
        return usage_error("batch", str(exc))
    if not split.items:
        return usage_error("batch", f"none of the {split.listed} images of "
                                    f"{args.split}.txt exists under {args.voc}")
    problem = outputs_problem(("--json", args.json, False), ("--out", args.out, True))
    if problem:                            # found now, not after the whole job
        return usage_error("batch", problem)
    job = ray_batch.BatchJob(
        model_dir=args.model.absolute(), batch_size=batch, backend=args.backend,
        device=args.device, precision=args.precision,
        backend_options=dict(args.backend_option),
        out_dir=None if args.out is None else args.out.absolute(),
        max_pixels=args.max_pixels, executors=args.executors or 0,
        executor_cpus=args.executor_cpus, address=args.address, num_cpus=args.num_cpus)
    progress = Progress(len(split.items), label="batch ")
    try:
        outcome, timings = ray_batch.run(job, split, manifest.num_classes,
                                         tuple(manifest.input_size), progress)
    except ConnectionError as exc:
        sys.stderr.write(f"pspnet batch: error: no Ray cluster at {args.address}: {exc}\n")
        return EXIT_UNAVAILABLE
    except ray_batch.JobFailed as exc:
        sys.stderr.write(f"pspnet batch: error: {exc}\n")
        return EXIT_FAILED
    finally:
        ray_batch.shutdown()
    progress.close()
    doc = report(outcome, split, manifest, {
        "model": str(args.model), "backend": args.backend, "batch_size": batch,
        "masks": str(args.out) if args.out else None, "engine": "ray", **timings})
    print_report(outcome, doc, manifest)
    if args.json is not None:
        write_json(args.json, doc)
    return 0 if outcome.segmented else EXIT_FAILED


# ---- bench -----------------------------------------------------------------------------

def run_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import cv2

    from bench import inputs as sources
    from bench.bench import BackendOpenError, BenchSettings, run_bench, table
    from bench.eval import write_json
    from bench.plot import plot
    from daemon.commands import pipeline_config
    from daemon.front import PipelineError
    from stages.logs import configure_logging
    from stages.manifest import Manifest

    cfg = pipeline_config(args)
    configure_logging(cfg.log_level, cfg.log_json)
    try:
        manifest = Manifest.read(args.model)
        sizes = _batch_sizes(args, sorted(manifest.models))
        for size in sizes:
            manifest.model_file(size)
    except (OSError, ValueError) as exc:
        return usage_error("bench", str(exc))
    problem = outputs_problem(("--json", args.json, False), ("--plot", args.plot, False),
                              ("--out", None if args.no_masks else args.out, True))
    if problem:                            # found now, not after the whole run
        return usage_error("bench", problem)
    cv2.setNumThreads(1)                   # the serial baseline decodes as a worker does
    tmp = Path(tempfile.mkdtemp(prefix="pspnet-bench-inputs-"))
    try:
        try:
            if args.images is not None:
                feed = sources.from_images_dir(args.images)
            elif args.voc is not None:
                feed = sources.from_voc(args.voc, args.split)
            else:
                feed = sources.synthetic(args.synthetic, tmp)
        except (OSError, ValueError) as exc:
            return usage_error("bench", str(exc))
        settings = BenchSettings(
            cfg=replace(cfg, batch_size=None), batch_sizes=tuple(sizes),
            repeats=args.repeats, warmup=args.warmup, masks=not args.no_masks,
            mask_root=args.out, backlog=args.backlog, min_images=args.min_images,
            baseline_images=args.baseline_images, machine=args.machine or "")
        try:
            doc = run_bench(settings, feed)
        except (PipelineError, BackendOpenError) as exc:
            sys.stderr.write(f"pspnet bench: error: {exc}\n")
            return EXIT_FAILED
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(doc))
    if args.json is not None:
        write_json(args.json, doc)
    if args.plot is not None:
        plot(doc, args.plot)
    return 0


def _batch_sizes(args: argparse.Namespace, built: list[int]) -> list[int]:
    text = args.batch_sizes or (str(args.batch_size) if args.batch_size else None)
    if text is None:
        return built
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes wants a comma list of integers, not {text!r}") \
            from None
    if not sizes or min(sizes) < 1:
        raise ValueError("--batch-sizes needs positive integers")
    return sizes
