"""`pspnet eval` and `pspnet batch`: arguments and what each runs.

Product commands over a fixed set of images, above the daemon: eval runs a VOC split
through the daemon's pipeline (started here, or a running daemon), batch runs the same
stage functions on Ray Data. The shared flags (model, backend, workers...) come from
`pspnet.daemon.commands.add_pipeline_args`, so eval runs exactly what `pspnet serve` would.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pspnet.batch.job import BatchJob
from pspnet.core.backend_rules import AUTO, SPIN, THREADS, check_backend, with_plan
from pspnet.core.cli_args import HelpFormatter, add_flags, flag_names, from_args
from pspnet.core.config import PipelineConfig, outputs_problem
from pspnet.core.exits import EXIT_FAILED, EXIT_UNAVAILABLE
from pspnet.daemon.commands import (
    add_pipeline_args,
    backend_problem,
    pipeline_config,
    usage_error,
)

REPORT_IMAGES = 24            # rows of eval --report's contact sheet
# what `pspnet batch` takes of the pipeline's flags (Ray places the processes)
BATCH_PIPELINE_FLAGS = ("model_dir", "backend", "precision", "batch_size", "backend_options",
                        "out_dir", "max_pixels")

EVAL_EPILOG = """\
output: mmseg's per-class table (IoU, Acc; 2 decimals), then aAcc, mIoU, mAcc, then every
image that could not be scored (missing/unreadable image or ground truth) with the reason.
Exit status: 0 when at least one image was scored, 1 when none was, 2 on usage errors,
4 when --endpoint does not answer.

examples:
  pspnet eval --voc VOCdevkit/VOC2012 --model models/r50 --batch-size 16 --json voc.json
  pspnet eval --voc VOCdevkit/VOC2012 --model models/r50 --endpoint ipc:///run/pspnet/front
      (a running `pspnet serve --out MASKS ...`; --model is read for the class names)"""


BATCH_EPILOG = """\
output: with ground truths, `pspnet eval`'s table, how many images were scored and
segmented; without (--images, a --list of images alone), one line: masks written, where,
img/s, failures; then every image that failed with the reason (a bad image fails its row,
never the job); --json: `pspnet eval`'s document (mIoU, aAcc, mAcc, per_class, images,
segmented, failed). Ray's own lines: one `E ... core_worker.cc ... max_restarts > 0` line
per job comes from Ray Data's actors and is harmless.
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
    add_flags(batch, PipelineConfig, BATCH_PIPELINE_FLAGS, help={
        "model_dir": "a directory made by `pspnet build`, at the same path on every node",
        "out_dir": "write masks here (palette PNGs at each image's own path with .png "
                   "added, as `pspnet serve --out`); without it none are written"})
    add_flags(batch, BatchJob, [n for n in flag_names(BatchJob)
                                if n not in BATCH_PIPELINE_FLAGS])
    batch.add_argument("--json", type=Path, default=None, metavar="FILE",
                       help="also write the results as JSON (`pspnet eval`'s document)")
    batch.set_defaults(run=run_batch, backend=AUTO, precision=AUTO)   # as serve: chosen


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the epilog's examples keep their line breaks."""


# ---- eval ------------------------------------------------------------------------------

def run_eval(args: argparse.Namespace) -> int:
    from pspnet.batch.eval import (
        evaluate_endpoint,
        evaluate_in_process,
        print_report,
        report,
        write_json,
    )
    from pspnet.batch.progress import Progress
    from pspnet.batch.voc import VocLayoutError, read_split
    from pspnet.core.logs import configure_logging
    from pspnet.core.plan import describe
    from pspnet.model.manifest import Manifest, pick_batch_size

    if args.report is not None:
        if not args.write_masks:
            return usage_error("eval", "--report draws the masks: drop --no-masks")
        if args.out_dir is None:
            args.out_dir = args.report / "masks"
    cfg = pipeline_config(args)
    problem = None if args.endpoint else backend_problem(cfg)
    if problem:
        return usage_error("eval", problem)
    configure_logging(cfg.log_level, cfg.log_json)
    try:
        manifest = Manifest.read(cfg.model_dir)
        batch = None if args.endpoint else pick_batch_size(manifest, cfg.batch_size)
        split = read_split(args.voc, args.split)
    except (OSError, ValueError, VocLayoutError) as exc:
        return usage_error("eval", str(exc))
    problem = outputs_problem(("--json", args.json, False), ("--out", cfg.out_dir, True),
                              ("--report", args.report, True))
    if problem:                            # found now, not after the whole split
        return usage_error("eval", problem)
    if not split.items:
        what = (f"{args.split}.txt lists no images" if not split.listed else
                f"none of the {split.listed} images of {args.split}.txt exists under "
                f"{args.voc}")
        return usage_error("eval", what)
    if not args.endpoint:
        sys.stderr.write(f"[eval] plan: {describe(cfg.plan)}\n")
    progress = Progress(len(split.items), label="eval ")
    if args.endpoint:
        from pspnet.daemon.client import DaemonUnavailable

        try:
            outcome = evaluate_endpoint(args.endpoint, split, manifest,
                                        cfg.out_dir if cfg.write_masks else None, progress)
        except DaemonUnavailable as exc:
            sys.stderr.write(f"pspnet eval: error: {exc}\n")
            return EXIT_UNAVAILABLE
    else:
        from pspnet.daemon.front import PipelineError

        try:
            outcome = evaluate_in_process(cfg, split, progress)
        except PipelineError as exc:
            sys.stderr.write(f"pspnet eval: error: {exc}\n")
            return EXIT_FAILED
    progress.close()
    doc = report(outcome, split, manifest, {
        "model": str(cfg.model_dir), "backend": None if args.endpoint else cfg.backend,
        "batch_size": batch, "plan": None if args.endpoint else cfg.plan,
        "endpoint": args.endpoint, "masks": str(cfg.out_dir) if cfg.out_dir else None})
    print_report(outcome, doc, manifest)
    if args.json is not None:
        write_json(args.json, doc)
    if args.report is not None:
        from pspnet.batch.eval import write_pictures

        for path in write_pictures(outcome, split, manifest, doc, args.report,
                                   REPORT_IMAGES):
            print(f"report: {path}")
    return 0 if doc["images"] else EXIT_FAILED


# ---- batch (Ray Data) ------------------------------------------------------------------

def run_batch(args: argparse.Namespace) -> int:
    from pspnet.batch.eval import print_report, report, write_json
    from pspnet.batch.folder import from_folder
    from pspnet.batch.progress import Progress
    from pspnet.batch.voc import VocLayoutError, read_split
    from pspnet.model.manifest import Manifest, pick_batch_size

    try:
        import ray  # noqa: F401  (imported where used; missing, it is one line here)

        from pspnet.batch import ray_batch
    except ImportError as exc:             # ray is an optional extra
        return usage_error("batch", f"needs Ray Data, the `ray` extra ({exc}): pip install "
                                    "'pspnet-daemon[ray]'")
    # the executor actors' threads: the CPUs each reserves; Ray runs a decode or
    # postprocess task per CPU it has left, so no thread need spin
    from pspnet.model.artefacts import choose, model_dir_problem

    problem = model_dir_problem(args.model_dir)   # a checkpoint given: say pspnet build
    if problem:
        return usage_error("batch", problem)
    if AUTO in (args.backend, args.precision):     # from the model directory, as serve
        try:
            chosen = choose(args.model_dir, args.backend,
                            ("cuda:0" if args.device == "cuda" else "cpu",), args.precision)
        except (OSError, ValueError) as exc:
            return usage_error("batch", str(exc))
        args.backend, args.precision = chosen.backend, chosen.precision
    threads = max(1, int(args.executor_cpus))
    options = with_plan(args.backend, args.backend_options, threads, spinning=False)
    try:
        check_backend(args.backend, ("cuda" if args.device == "cuda" else "cpu",),
                      args.precision, args.backend_options)
    except ValueError as exc:
        return usage_error("batch", str(exc))
    try:
        manifest = Manifest.read(args.model_dir)
        batch = pick_batch_size(manifest, args.batch_size)
        if args.images is not None:
            split = from_folder(args.images)
        elif args.listing is not None:
            split = ray_batch.from_listing(args.listing)
        else:
            split = read_split(args.voc, args.split)
    except (OSError, ValueError, VocLayoutError) as exc:
        return usage_error("batch", str(exc))
    if not split.items:
        return usage_error("batch", f"none of the {split.listed} images of "
                                    f"{args.split}.txt exists under {args.voc}")
    problem = outputs_problem(("--json", args.json, False), ("--out", args.out_dir, True))
    if problem:                            # found now, not after the whole job
        return usage_error("batch", problem)
    job = from_args(BatchJob, args, model_dir=args.model_dir.absolute(), batch_size=batch,
                    backend_options=options,
                    out_dir=None if args.out_dir is None else args.out_dir.absolute())
    planned = {k: options[k] for k in (THREADS, SPIN) if k in options}
    sys.stderr.write(f"[batch] plan: each executor actor reserves {job.executor_cpus:g} CPU(s) "
                     f"(--executor-cpus), backend options {planned or 'as given'}; Ray runs "
                     "one decode or postprocess task per CPU left\n")
    progress = Progress(len(split.items), label="batch ")
    try:
        outcome, timings = ray_batch.run(job, split, manifest.num_classes,
                                         tuple(manifest.input_size), progress)
    except ConnectionError as exc:
        auth = "" if os.environ.get(ray_batch.AUTH_MODE) else f" ({ray_batch.AUTH_HINT})"
        sys.stderr.write(f"pspnet batch: error: no Ray cluster at {args.address}: "
                         f"{str(exc).strip()}{auth}\n")
        return EXIT_UNAVAILABLE
    except ray_batch.JobFailed as exc:
        sys.stderr.write(f"pspnet batch: error: {exc}\n")
        return EXIT_FAILED
    finally:
        ray_batch.shutdown()
    progress.close()
    doc = report(outcome, split, manifest, {
        "model": str(job.model_dir), "backend": job.backend, "batch_size": batch,
        "masks": str(job.out_dir) if job.out_dir else None, "engine": "ray",
        "plan": {"executor_cpus": job.executor_cpus, **planned}, **timings})
    print_report(outcome, doc, manifest,
                 truths=sum(item.truth is not None for item in split.items))
    if args.json is not None:
        write_json(args.json, doc)
    return 0 if outcome.segmented else EXIT_FAILED
