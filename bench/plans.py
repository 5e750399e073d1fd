"""`pspnet bench --plans`: the daemon's plan and its neighbours, tried on the user's model.

Why: the plan (pspnet.core.plan) is a rule from CPU counts and per-image costs measured
on one model; a network, photo size or head that costs otherwise may want another split
of the cores. Where the rule cannot decide, measure, as Triton's model analyzer does, but
on this machine in about a minute: the plan, then one worker more or less in each pool
and, for an executor on the host's cores, one executor thread more or less; --repeats
rounds of one short e2e pass per plan (median), same inputs and batch size.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from pspnet.bench.bench import BenchSettings, say
from pspnet.bench.e2e import E2ERunner, default_backlog
from pspnet.bench.inputs import BenchInputs
from pspnet.core.backend_rules import THREADS
from pspnet.core.config import PipelineConfig
from pspnet.core.plan import host_executors

MAX_NEIGHBOURS = 5


def neighbours(cfg: PipelineConfig) -> list[PipelineConfig]:
    """The plan's neighbours: a worker more or less in each pool, and executor threads
    up or down where the executor computes on the host; at most MAX_NEIGHBOURS."""
    pre, post, threads = cfg.preprocess_workers, cfg.postprocess_workers, cfg.executor_threads
    steps = [(pre + 1, post, threads), (pre, post + 1, threads)]
    if host_executors(cfg.backend, cfg.devices):
        steps += [(pre, post, threads + 1), (pre, post, threads - 1)]
    steps += [(pre - 1, post, threads), (pre, post - 1, threads)]
    # the tried thread count replaces one given as an option
    options = {k: v for k, v in cfg.backend_options.items() if k != THREADS}
    return [replace(cfg, preprocess_workers=p, postprocess_workers=q, executor_threads=t,
                    backend_options=options)
            for p, q, t in steps if min(p, q, t) >= 1][:MAX_NEIGHBOURS]


def label(cfg: PipelineConfig) -> str:
    return (f"{cfg.preprocess_workers} pre + {cfg.postprocess_workers} post, "
            f"threads {cfg.executor_threads}")


def flags(cfg: PipelineConfig) -> str:
    """The command-line flags that run this plan."""
    return (f"--preprocess-workers {cfg.preprocess_workers} --postprocess-workers "
            f"{cfg.postprocess_workers} --backend-option threads={cfg.executor_threads}")


def try_plans(settings: BenchSettings, inputs: BenchInputs) -> dict[str, Any]:
    """--repeats rounds; each round starts every plan in turn for --warmup batches and one
    timed e2e pass (so a load that drifts on a shared host falls on every plan alike, as
    the bench interleaves its modes). The document lists each plan's median images/s and
    names the best."""
    from pspnet.daemon.front import Front

    base = settings.cfg
    size = settings.batch_sizes[0]
    count = max(len(inputs.paths), settings.min_images)
    paths = list(itertools.islice(itertools.cycle(inputs.paths), count))
    truths = list(itertools.islice(itertools.cycle(inputs.truths), count))
    warm = min(count, settings.warmup * size)
    tried = [base, *neighbours(base)]
    passes: list[list[dict[str, Any]]] = [[] for _ in tried]
    with tempfile.TemporaryDirectory(prefix="pspnet-plans-") as tmp:
        for r, (k, plan) in itertools.product(range(settings.repeats), enumerate(tried)):
            cfg = replace(plan, batch_size=size, write_masks=settings.masks,
                          out_dir=Path(settings.mask_root or tmp) / f"plan-{k}"
                          if settings.masks else None)
            with Front(cfg) as pipe:
                e2e = E2ERunner(pipe, settings.backlog or default_backlog(
                    size, cfg.preprocess_workers, cfg.postprocess_workers))
                if warm:
                    e2e.run(paths[:warm], truths[:warm])
                passes[k].append(e2e.run(paths, truths))
            say(f"round {r + 1}/{settings.repeats}, plan {k + 1}/{len(tried)} "
                f"({label(cfg)}): {passes[k][-1]['img_s']:.1f} img/s")
    rows = []
    for k, (plan, runs) in enumerate(zip(tried, passes, strict=True)):
        rates = [p["img_s"] for p in runs]
        rows.append({"plan": label(plan), "default": k == 0, "flags": flags(plan),
                     "preprocess_workers": plan.preprocess_workers,
                     "postprocess_workers": plan.postprocess_workers,
                     "executor_threads": plan.executor_threads,
                     "e2e_img_s": statistics.median(rates), "repeats": rates,
                     "errors": sum(p["errors"] for p in runs)})
    default = rows[0]["e2e_img_s"]
    for row in rows:
        row["over_default"] = row["e2e_img_s"] / default if default else None
    best = max(rows, key=lambda r: r["e2e_img_s"])
    return {"plan": base.plan, "batch_size": size, "images_per_pass": count,
            "repeats": settings.repeats, "backend": base.backend, "devices": list(base.devices),
            "statistic": "median of repeats, plans interleaved round by round",
            "plans": rows, "best": best["plan"]}


def plans_table(doc: dict[str, Any]) -> str:
    """One row per plan, then the best beside the default and the flags that run it."""
    width = max(len(r["plan"]) for r in doc["plans"]) + len(" (default)")
    lines = [f"{'plan':<{width}}  e2e img/s  x default   (batch {doc['batch_size']}, "
             f"{doc['images_per_pass']} images, median of {doc['repeats']})"]
    for r in doc["plans"]:
        name = r["plan"] + (" (default)" if r["default"] else "")
        lines.append(f"{name:<{width}}  {r['e2e_img_s']:9.1f}  {r['over_default']:9.2f}")
    best = next(r for r in doc["plans"] if r["plan"] == doc["best"])
    if best["default"]:
        lines.append(f"best: the default ({best['plan']}); nothing to set")
    else:
        lines.append(f"best: {best['plan']}, {best['over_default']:.2f} x the default "
                     f"({doc['plans'][0]['plan']}); to run it: {best['flags']}")
    return "\n".join(lines)
