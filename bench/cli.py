"""`pspnet bench`: arguments and what it runs.

Why here and not in daemon/: it measures the daemon rather than being part of it;
`pspnet.cli` registers it. The shared flags (model, backend,
workers...) come from `pspnet.daemon.commands.add_pipeline_args`, so bench runs exactly
the configuration `pspnet serve` would, planned the same way from this host's CPUs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from pspnet.core.cli_args import HelpFormatter, non_negative_int, positive_int
from pspnet.core.config import outputs_problem
from pspnet.core.exits import EXIT_FAILED
from pspnet.daemon.commands import (
    add_pipeline_args,
    backend_problem,
    pipeline_config,
    usage_error,
)

DEFAULT_BATCH_SIZES = "1,4,8,16,32,64"
CEILING_IMG_S = "20000"          # --front-ceiling: each simulated device, images/s

BENCH_EPILOG = """\
modes, measured for each batch size in the same run, repeat by repeat:
  e2e       JPEG paths in -> masks and running mIoU out, through the real stage processes
            (one front per batch size); latency p50/p99 is submit -> answer per image
  executor  pre-staged batches straight through the backend (upload/execute over two
            slots): ais_bench's 1000 x batch / mean execute ms, the device's ceiling here
  serial    decode -> letterbox -> infer -> postprocess, one batch at a time in this
            process, as the seed's steps run (same backend, batch size, postprocessing)
Figures are medians of --repeats; warm-up batches are not timed. `busy pre/exe/post` is
each stage's busy time over the e2e wall time, per process. `front ceiling` is 1000 / the
front's main-thread CPU ms per image: the rate one front cannot pass, whatever the devices.
Worker counts and executor threads are the daemon's plan for this host unless flags set
them (the plan is printed).
--plans instead tries the plan and its neighbours (a worker more or less in each pool,
executor threads up and down), one short e2e pass each, and prints the best beside it.

examples:
  pspnet bench --model models/r50 --backend torch --devices cuda:0 --precision fp16 \\
      --batch-sizes 1,4,8,16,32,64 --synthetic 256 --preprocess-workers 8 \\
      --json bench/results/nvidia-h100.json --plot bench/results/nvidia-h100.png
  pspnet bench --model models/small --batch-sizes 1,4,8 --synthetic 48 \\
      --json bench/results/cpu-2core.json --plot bench/results/cpu-2core.png
  pspnet bench --model models/small --synthetic 48 --plans --repeats 1
      (which worker counts and threads suit this model on this host, in about a minute)
  pspnet bench --model models/small --backend sim --backend-option img_s=400 \\
      --batch-sizes 16,32,64 --synthetic 96 --min-images 1280 --no-masks
      (the host side alone, against a simulated 400 img/s device)
  pspnet bench --model models/small --front-ceiling 4 --batch-sizes 16,64 --synthetic 96 \\
      --min-images 2048
      (the front alone: 4 simulated 20,000 img/s executors, labels head, no masks,
      96 photos of longest side 32)"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
                             "500, or 32 with --front-ceiling) with stand-in ground truths, "
                             "in a temporary folder")
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
    bench.add_argument("--plans", action="store_true",
                       help="instead of the three modes: try the daemon's plan for this "
                            "host and its neighbours (a worker more or less in each pool, "
                            "executor threads up and down) at one batch size, --repeats "
                            "short e2e passes each, and print the best beside the plan")
    bench.add_argument("--front-ceiling", type=positive_int, default=None, metavar="N",
                       help="measure the front: N simulated executors (--backend sim, each "
                            f"img_s={CEILING_IMG_S} unless --backend-option sets it, labels "
                            "head: no logits resize), no masks, and --synthetic photos of "
                            "longest side 32, so the workers cost little and the front is "
                            "fed as fast as this host allows (its work per image does not "
                            "depend on a photo's size, and costs more per image the emptier "
                            "the front is); the front ceiling column is the figure")
    # shared flags that mean a little more here; --batch-sizes replaces --batch-size
    add_pipeline_args(bench, hidden=("batch_size",), help={
        "out_dir": "keep the masks under MASKDIR/e2e-bsN/ and MASKDIR/serial-bsN/ "
                   "(default: a temporary folder, removed afterwards)",
        "write_masks": "write no masks in e2e and serial (measures the rest)"})
    bench.set_defaults(run=run_bench, log_level="warning")


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the epilog's examples keep their line breaks."""


# ---- bench -----------------------------------------------------------------------------

def run_bench(args: argparse.Namespace) -> int:
    import cv2

    from pspnet.batch.eval import write_json
    from pspnet.bench import inputs as sources
    from pspnet.bench.bench import BackendOpenError, BenchSettings, run_bench, say, table
    from pspnet.bench.plot import plot
    from pspnet.core.logs import configure_logging
    from pspnet.core.plan import describe
    from pspnet.daemon.front import PipelineError
    from pspnet.model.manifest import Manifest, pick_batch_size

    cfg = pipeline_config(args, batch_size=None, **_ceiling_settings(args))
    problem = backend_problem(cfg)
    if problem:
        return usage_error("bench", problem)
    if args.plans and args.plot is not None:
        return usage_error("bench", "--plot draws the three modes; drop it with --plans")
    configure_logging(cfg.log_level, cfg.log_json)
    try:
        manifest = Manifest.read(cfg.model_dir)
        sizes = _batch_sizes(args, sorted(manifest.models))
        if args.plans:                     # one size: the one serve would run
            sizes = sizes if args.batch_sizes or args.batch_size else \
                [pick_batch_size(manifest, None)]
            sizes = sizes[:1]
        for size in sizes:
            manifest.model_file(size)
    except (OSError, ValueError) as exc:
        return usage_error("bench", str(exc))
    out = cfg.out_dir if cfg.write_masks else None
    problem = outputs_problem(("--json", args.json, False), ("--plot", args.plot, False),
                              ("--out", out, True))
    if problem:                            # found now, not after the whole run
        return usage_error("bench", problem)
    cv2.setNumThreads(1)                   # the serial baseline decodes as a worker does
    say(f"plan: {describe(cfg.plan)}")
    tmp = Path(tempfile.mkdtemp(prefix="pspnet-bench-inputs-"))
    try:
        try:
            if args.images is not None:
                feed = sources.from_images_dir(args.images)
            elif args.voc is not None:
                feed = sources.from_voc(args.voc, args.split)
            else:
                side = sources.CEILING_LONG_SIDE if args.front_ceiling else \
                    sources.VOC_LONG_SIDE
                feed = sources.synthetic(args.synthetic, tmp, long_side=side)
        except (OSError, ValueError) as exc:
            return usage_error("bench", str(exc))
        settings = BenchSettings(
            cfg=cfg, batch_sizes=tuple(sizes), repeats=args.repeats, warmup=args.warmup,
            masks=cfg.write_masks, mask_root=cfg.out_dir, backlog=args.backlog,
            min_images=args.min_images, baseline_images=args.baseline_images,
            machine=args.machine or "")
        try:
            if args.plans:
                from pspnet.bench.plans import plans_table, try_plans

                doc = try_plans(settings, feed)
            else:
                doc = run_bench(settings, feed)
        except (PipelineError, BackendOpenError) as exc:
            sys.stderr.write(f"pspnet bench: error: {exc}\n")
            return EXIT_FAILED
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(plans_table(doc) if args.plans else table(doc))
    if args.json is not None:
        write_json(args.json, doc)
    if args.plot is not None:
        plot(doc, args.plot)
    return 0


def _ceiling_settings(args: argparse.Namespace) -> dict[str, object]:
    """With --front-ceiling N: the pipeline settings that leave the front as the limit
    (backend and devices set in `args`, where the backend choice reads them)."""
    if args.front_ceiling is None:
        return {}
    args.backend, args.devices = "sim", ("sim",) * args.front_ceiling
    options = {"img_s": CEILING_IMG_S, "head": "labels", **(args.backend_options or {})}
    return {"backend_options": options, "write_masks": False}


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
