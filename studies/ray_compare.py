"""The Ray job (`pspnet batch`) against the daemon's pipeline on the same inputs, one run.

    python -m studies.ray_compare --model DIR --synthetic 96 --repeats 3 \\
        --json bench/results/ray-vs-daemon-cpu-2core.json

Why one run, passes interleaved (daemon, Ray, daemon, Ray...): the load of a shared host
drifts; side by side, pass by pass, the ratio stays honest. Both stay up between passes
(the front with its workers, the Ray instance), each idling while the other runs, and
their start-up is timed apart: the front's start (workers up, model open) and ray.init
(the Ray instance; the job's executor actors start inside each pass, as in every
`pspnet batch` run). The daemon side is `pspnet bench`'s e2e mode (pspnet.bench.e2e), the Ray side
is `pspnet batch`'s pipeline (pspnet.batch.ray_batch); both write masks and score stand-in
ground truths, and each pass checks that both give the same mIoU.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pspnet.batch import ray_batch
from pspnet.batch.eval import EvalOutcome, write_json
from pspnet.batch.voc import VocItem
from pspnet.bench import inputs as sources
from pspnet.bench import machine
from pspnet.bench.e2e import E2ERunner, default_backlog, steady_rate
from pspnet.core.config import PipelineConfig
from pspnet.core.logs import configure_logging
from pspnet.daemon.front import Front
from pspnet.model.manifest import Manifest, pick_batch_size
from pspnet.model.metrics import IoUAccumulator


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m studies.ray_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, metavar="DIR")
    p.add_argument("--synthetic", type=int, default=96, metavar="N",
                   help="photo-like JPEGs with stand-in ground truths (pspnet.bench.inputs)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="passes of each")
    p.add_argument("--threads", type=int, default=1,
                   help="ORT threads of the executor, both sides")
    p.add_argument("--ray-cpus", type=lambda t: [int(n) for n in t.split(",")],
                   default=[2, 4], metavar="LIST",
                   help="logical CPUs of the local Ray instance, one Ray engine each: Ray "
                        "runs a task only where its CPUs are free, so with 2 on 2 cores "
                        "the actor and one task run at a time; 4 lets decode and "
                        "postprocess overlap the actor")
    p.add_argument("--machine", default="cpu-2core")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def say(message: str) -> None:
    sys.stderr.write(f"[ray_compare] {message}\n")
    sys.stderr.flush()


def ray_pass(job: ray_batch.BatchJob, items: list[VocItem], input_size: tuple[int, int],
             num_classes: int) -> dict[str, Any]:
    """One `pspnet batch` pipeline over `items`, timed from the first row asked for."""
    outcome = EvalOutcome(IoUAccumulator(num_classes))
    answered: list[float] = []
    errors = 0
    started = time.perf_counter()
    for row in ray_batch.finished_rows(ray_batch.pipeline(job, items, input_size)):
        answered.append(time.perf_counter())
        errors += ray_batch.account(outcome, items[int(row["index"])], row)
    wall = time.perf_counter() - started
    return {"img_s": len(items) / wall, "wall_s": wall, "errors": errors,
            "steady_img_s": steady_rate(answered),
            "first_result_s": answered[0] - started if answered else None,
            "mIoU": outcome.metrics.summary()["mIoU"] if outcome.metrics.images else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("warning")
    manifest = Manifest.read(args.model)
    batch = pick_batch_size(manifest, args.batch_size)
    options = {"threads": str(args.threads)}
    tmp = Path(tempfile.mkdtemp(prefix="pspnet-ray-compare-"))
    try:
        feed = sources.synthetic(args.synthetic, tmp / "inputs")
        items = [VocItem(p.stem, p, t) for p, t in zip(feed.paths, feed.truths, strict=True)]
        cfg = PipelineConfig(model_dir=args.model, batch_size=batch, preprocess_workers=1,
                             postprocess_workers=1, out_dir=tmp / "daemon-masks",
                             backend_options=options, log_level="warning")
        job = ray_batch.BatchJob(model_dir=args.model.absolute(), batch_size=batch,
                                 backend_options=options, out_dir=tmp / "ray-masks",
                                 executors=1)
        doc = compare(args, cfg, job, feed, items, manifest)
        doc["masks_identical"] = _same_masks(tmp / "daemon-masks", tmp / "ray-masks")
    finally:
        ray_batch.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(doc))
    if args.json is not None:
        write_json(args.json, doc)
    return 0


def compare(args: argparse.Namespace, cfg: PipelineConfig, job: ray_batch.BatchJob,
            feed: sources.BenchInputs, items: list[VocItem], manifest: Manifest,
            ) -> dict[str, Any]:
    input_size = tuple(manifest.input_size)
    started = time.perf_counter()
    pipe = Front(cfg)
    pipe.start()
    front_start_s = time.perf_counter() - started
    engines = {f"ray-{n}cpu": replace(job, num_cpus=n) for n in args.ray_cpus}
    passes: dict[str, list[dict[str, Any]]] = {"daemon": [], **{e: [] for e in engines}}
    resources: dict[str, Any] = {}
    try:
        runner = E2ERunner(pipe, default_backlog(job.batch_size, 1, 1))
        say(f"front started in {front_start_s:.1f} s; {len(items)} images, batch "
            f"{job.batch_size}, {args.repeats} passes of each of daemon, {', '.join(engines)}")
        for r in range(args.repeats):
            passes["daemon"].append(runner.run(feed.paths, feed.truths))
            for name, ray_job in engines.items():
                started = time.perf_counter()
                resources[name] = ray_batch.connect(ray_job)
                ray_init_s = time.perf_counter() - started
                try:
                    passes[name].append(ray_pass(ray_job, items, input_size,
                                                 manifest.num_classes))
                finally:
                    ray_batch.shutdown()
                passes[name][-1]["ray_init_s"] = ray_init_s
            say(f"pass {r + 1}: " + ", ".join(f"{name} {p[-1]['img_s']:.1f} img/s"
                                               for name, p in passes.items()))
    finally:
        pipe.close()
    return {
        "machine": args.machine, **machine.describe(args.machine, "ort", ("cpu",)),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m studies.ray_compare " + " ".join(sys.argv[1:]),
        "model": {"dir": str(args.model), "name": manifest.source.get("config"),
                  "input_size": list(manifest.input_size), "head": manifest.head},
        "settings": {"batch_size": job.batch_size, "images": len(items),
                     "repeats": args.repeats, "ort_threads": args.threads,
                     "daemon": "1 preprocess + 1 executor + 1 postprocess process, started "
                               "once (front_start_s), passes through pspnet.bench.e2e",
                     "ray": "a local Ray instance per pass (ray_init_s, not in the pass) "
                            "with N logical CPUs: decode tasks (1 CPU each), 1 executor "
                            "actor (1 CPU, started inside each pass), postprocess tasks "
                            "(1 CPU each)",
                     "masks": True, "ground_truth": "stand-in (pspnet.bench.inputs.synthetic)"},
        "inputs": feed.describe(), "ray_resources": resources,
        "front_start_s": front_start_s,
        "engines": {name: {"passes": p, **_medians(p)} for name, p in passes.items()},
        "same_miou": all(len({p[r]["mIoU"] for p in passes.values()}) == 1
                         for r in range(args.repeats)),
    }


def _medians(passes: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("img_s", "steady_img_s", "wall_s", "first_result_s", "ray_init_s"):
        values = [p[key] for p in passes if p.get(key) is not None]
        out[f"median_{key}"] = statistics.median(values) if values else None
    return out


def _same_masks(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.png"))
    return bool(names) and names == sorted(p.name for p in b.glob("*.png")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def table(doc: dict[str, Any]) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    settings, engines = doc["settings"], doc["engines"]
    daemon = engines["daemon"]["median_img_s"]
    lines = [f"{settings['images']} images, batch {settings['batch_size']}, medians of "
             f"{settings['repeats']} passes (the front started once in "
             f"{doc['front_start_s']:.1f} s)",
             "engine     pass img/s  steady img/s  pass s  first result s  start s  "
             "pass / daemon"]
    for name, e in engines.items():
        start = doc["front_start_s"] if name == "daemon" else e["median_ray_init_s"]
        lines.append(f"{name:<10} {fmt(e['median_img_s']):>10}  "
                     f"{fmt(e['median_steady_img_s']):>12}  {fmt(e['median_wall_s']):>6}  "
                     f"{fmt(e['median_first_result_s']):>14}  {fmt(start):>7}  "
                     f"{e['median_img_s'] / daemon:>13.2f}")
    lines.append(f"same mIoU every pass: {doc['same_miou']}, masks byte-identical: "
                 f"{doc.get('masks_identical')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
