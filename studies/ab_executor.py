"""Executor-only A/B of two or more model directories, interleaved pass by pass, one run.

Why: `pspnet bench` measures one model directory, but a build option (e.g. `pspnet build
--no-psp-rewrite --no-bn-fold` against the default) is judged by its ratio, and on a
shared machine the load drifts between two runs. Here every backend is opened on every
model first; then each repeat runs one executor-only pass (bench/executor_only.py:
ais_bench's 1000 x batch / mean execute ms, the same staged batches for all) of every
(backend, model) in turn, the model order reversed on odd repeats (ABBA), so drift
falls on both sides. The headline ratio is the median of the repeats' ratios (each pair
of passes ran back to back, so others' load on a shared machine hits both alike); the
ratio of medians and of best passes are kept too, with every repeat.

  python -m studies.ab_executor --model before=/tmp/r50-plain --model after=/tmp/r50 \\
      --backends ort,torch --batch-size 1 --images 3 --repeats 5 \\
      --json bench/results/cpu-2core-psp-rewrite.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from pspnet.bench import executor_only, machine


def say(message: str) -> None:
    sys.stderr.write(f"[ab] {message}\n")
    sys.stderr.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m studies.ab_executor",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="a model directory and its name in the results; give two or more, "
                        "the first is the baseline of the ratios (e.g. before=models/plain)")
    p.add_argument("--backends", default="ort,torch", help="comma list (default: ort,torch)")
    p.add_argument("--batch-size", type=int, default=1, help="static batch size (default 1)")
    p.add_argument("--images", type=int, default=4,
                   help="images per timed pass, rounded up to whole batches (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes each (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches each (default 1)")
    p.add_argument("--device", default="cpu", help="backend device (default cpu)")
    p.add_argument("--precision", default="fp32", help="fp32 (default), fp16, bf16")
    p.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every backend, e.g. threads=2 (repeatable)")
    p.add_argument("--machine", default=None, help="machine name in the results "
                                                   "(default: e.g. cpu-2core)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    models = []
    for item in args.model:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            p.error(f"--model takes NAME=DIR, not {item!r}")
        models.append((name, Path(folder)))
    if len(models) < 2 or len({n for n, _ in models}) != len(models):
        p.error("give at least two --model NAME=DIR with distinct names")
    args.models = models
    args.backends = [b for b in args.backends.split(",") if b]
    args.options = dict(o.split("=", 1) for o in args.backend_option)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pspnet.bench.inputs import synthetic
    from pspnet.model.manifest import Manifest
    from pspnet.stages.backends import open_backend

    manifests = {name: Manifest.read(folder) for name, folder in args.models}
    sizes = {m.input_size for m in manifests.values()}
    if len(sizes) != 1:
        raise SystemExit(f"the models have different input sizes: {sorted(sizes)}")
    (input_size,) = sizes
    batches = -(-args.images // args.batch_size)
    with tempfile.TemporaryDirectory(prefix="pspnet-ab-") as tmp:
        inputs = synthetic(max(9, batches * args.batch_size), Path(tmp))
        staged = executor_only.stage_batches(inputs.paths, input_size, args.batch_size,
                                             batches)
    backends = {}
    for kind in args.backends:
        for name, folder in args.models:
            say(f"opening {kind} on {name} ({folder})")
            backend = open_backend(kind, folder, args.batch_size, device=args.device,
                                   precision=args.precision, options=args.options)
            executor_only.run_batches(backend, staged, max(1, args.warmup))
            backends[kind, name] = backend
    runs: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in backends}
    names = [name for name, _ in args.models]
    for repeat in range(args.repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for kind in args.backends:
            for name in order:
                figures = executor_only.measure(backends[kind, name], staged, batches)
                runs[kind, name].append(figures)
            say(f"repeat {repeat + 1}/{args.repeats} {kind}: " + ", ".join(
                f"{n} {runs[kind, n][-1]['img_s']:.3f}" for n in names) + " img/s")
    for backend in backends.values():
        backend.close()
    return document(args, manifests, runs, input_size, batches)


def document(args, manifests, runs, input_size, batches) -> dict[str, Any]:
    names = [name for name, _ in args.models]
    base = names[0]
    results, ratios = [], {}
    for kind in args.backends:
        for name in names:
            img_s = [r["img_s"] for r in runs[kind, name]]
            results.append({"backend": kind, "model": name, "img_s": statistics.median(img_s),
                            "img_s_repeats": img_s,
                            "execute_ms_mean": statistics.median(
                                r["execute_ms_mean"] for r in runs[kind, name])})
        med = {r["model"]: r["img_s"] for r in results if r["backend"] == kind}
        best = {n: max(r["img_s"] for r in runs[kind, n]) for n in names}
        ratios[kind] = {}
        for name in names[1:]:
            pairs = [a["img_s"] / b["img_s"] for a, b in
                     zip(runs[kind, name], runs[kind, base], strict=True)]
            ratios[kind][f"{name}/{base}"] = {
                "median_per_repeat": statistics.median(pairs),   # the headline: each pair
                "per_repeat": pairs,                             # ran back to back
                "of_medians": med[name] / med[base],
                "of_best": best[name] / best[base],
            }
    name = args.machine or machine.default_name(args.backends[0], (args.device,))
    return {
        **machine.describe(name, args.backends[0], (args.device,)),
        "what": "executor-only img/s (ais_bench: 1000 x batch / mean execute ms), models "
                "interleaved pass by pass (ABBA), medians of the repeats",
        "command": "python -m studies.ab_executor " + " ".join(sys.argv[1:]),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {"batch_size": args.batch_size, "batches_per_pass": batches,
                     "repeats": args.repeats, "warmup_batches": args.warmup,
                     "device": args.device, "precision": args.precision,
                     "backend_options": args.options, "input_size": list(input_size)},
        "models": {n: {"dir": str(folder), "rewrites": manifests[n].rewrites}
                   for n, folder in args.models},
        "results": results,
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run(args)
    for kind, by_model in doc["ratios"].items():
        for pair, ratio in by_model.items():
            print(f"{kind} {pair}: {ratio['median_per_repeat']:.3f} x (median of the "
                  f"repeats' ratios; best passes {ratio['of_best']:.3f} x, medians "
                  f"{ratio['of_medians']:.3f} x; per repeat " +
                  ", ".join(f"{r:.3f}" for r in ratio["per_repeat"]) + ")")
    for r in doc["results"]:
        print(f"{r['backend']:6s} {r['model']:10s} {r['img_s']:.3f} img/s "
              f"({r['execute_ms_mean']:.0f} ms per batch)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
