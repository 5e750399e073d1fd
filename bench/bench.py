"""`pspnet bench`: end to end vs executor only vs serial, per batch size, in one run.

Why all three in one run, interleaved repeat by repeat: on a shared machine the load
drifts; measuring the three modes side by side in each repeat keeps their ratios honest.
The front (its workers) and the backend are opened once per batch size (start-up costs seconds and
is not what is measured); warm-up batches run through each mode first and are not timed;
each figure is the median of the repeats, and every repeat is kept in the JSON.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pspnet.bench import executor_only, machine
from pspnet.bench.e2e import E2ERunner, default_backlog
from pspnet.bench.inputs import BenchInputs
from pspnet.bench.serial import SerialRunner
from pspnet.core.config import PipelineConfig
from pspnet.core.pipeline import STAGES
from pspnet.model.manifest import Manifest


@dataclass(frozen=True)
class BenchSettings:
    cfg: PipelineConfig               # batch_size and out_dir are set per batch size
    batch_sizes: tuple[int, ...]
    repeats: int = 3
    warmup: int = 2                   # untimed batches per mode and batch size
    masks: bool = True
    mask_root: Path | None = None     # None: a temporary folder, removed afterwards
    backlog: int | None = None        # None: default_backlog(...)
    min_images: int = 0               # a pass runs at least this many (cycling the inputs)
    baseline_images: int = 0          # executor-only and serial passes; 0: as many as e2e
    machine: str = ""


class BackendOpenError(RuntimeError):
    """The backend would not open (bad option, missing artifact or device): a user error."""


def say(message: str) -> None:
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


def run_bench(settings: BenchSettings, inputs: BenchInputs) -> dict[str, Any]:
    """Every batch size, every mode; the JSON document (figures in images/s and ms)."""
    cfg = settings.cfg
    manifest = Manifest.read(cfg.model_dir)
    for size in settings.batch_sizes:
        manifest.model_file(size)     # fail before any work if a size was not built
    load_start = _loadavg()
    with tempfile.TemporaryDirectory(prefix="pspnet-bench-") as tmp:
        root = settings.mask_root or Path(tmp)
        rows = [bench_batch_size(settings, inputs, manifest, size, root)
                for size in settings.batch_sizes]
    name = settings.machine or machine.default_name(cfg.backend, cfg.devices)
    doc: dict[str, Any] = {
        **machine.describe(name, cfg.backend, cfg.devices),
        "backend": cfg.backend, "precision": cfg.precision, "devices": list(cfg.devices),
        "model": model_info(cfg.model_dir, manifest),
        "plan": cfg.plan,                  # how worker counts and threads were chosen
        "settings": {"batch_sizes": list(settings.batch_sizes), "repeats": settings.repeats,
                     "warmup_batches": settings.warmup, "masks": settings.masks,
                     "preprocess_workers": cfg.preprocess_workers,
                     "postprocess_workers": cfg.postprocess_workers,
                     "max_wait_ms": cfg.max_wait_ms,
                     "backend_options": dict(cfg.backend_options),
                     "statistic": "median of repeats"},
        "inputs": inputs.describe(),
        "loadavg": {"start": load_start, "end": _loadavg(),
                    "note": "1/5/15-min load averages: others' work on a shared host "
                            "slows e2e (all cores) more than executor or serial (one)"},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "results": rows,
    }
    best = max(rows, key=lambda r: r["e2e_img_s"])
    doc["best"] = {"batch_size": best["batch_size"], "e2e_img_s": best["e2e_img_s"],
                   "e2e_over_executor": best["e2e_over_executor"],
                   "e2e_steady_img_s": best["e2e_steady_img_s"],
                   "steady_over_executor": best["steady_over_executor"],
                   "e2e_over_serial": best["e2e_over_serial"],
                   "host_limit_img_s": best["host_limit_img_s"],
                   "bound_by": best["bound_by"], "e2e_over_bound": best["e2e_over_bound"],
                   "meets_0.9x_executor": best["e2e_over_executor"] >= 0.9,
                   "meets_1.5x_serial": best["e2e_over_serial"] >= 1.5}
    return doc


def bench_batch_size(settings: BenchSettings, inputs: BenchInputs, manifest: Manifest,
                     size: int, mask_root: Path) -> dict[str, Any]:
    from pspnet.daemon.front import Front
    from pspnet.stages.backends import BackendUnavailable, open_backend

    base = settings.cfg
    count = max(len(inputs.paths), settings.min_images)
    paths, truths = _cycled(inputs.paths, count), _cycled(inputs.truths, count)
    # e2e pays for filling and draining the pipeline once per pass, so a long pass is what
    # makes its figure the daemon's rate; the baselines have no pipeline to fill, and
    # serial is slow, so they may run fewer images
    base_count = settings.baseline_images or count
    base_paths = _cycled(inputs.paths, base_count)
    base_truths = _cycled(inputs.truths, base_count)
    warm = min(count, settings.warmup * size)
    n_batches = max(3, math.ceil(base_count / size))
    cfg = replace(base, batch_size=size, write_masks=settings.masks,
                  out_dir=mask_root / f"e2e-bs{size}" if settings.masks else None)
    options = base.executor_options()      # the executor's: the plan's threads, spinning
    say(f"batch {size}: opening the {base.backend} backend and starting the pipeline")
    try:
        backend = open_backend(base.backend, base.model_dir, size, device=base.devices[0],
                               precision=base.precision, options=options)
    except (BackendUnavailable, OSError, ValueError) as exc:
        raise BackendOpenError(f"cannot open the {base.backend} backend: {exc}") from exc
    # what a daemon start costs before its first batch (the executor pays it again, from
    # the compile cache if one is set)
    start_up = {"backend_open_s": backend.open_seconds, "compile_s": backend.compile_seconds}
    say(f"batch {size}: {base.backend} backend open in {start_up['backend_open_s']:.2f} s"
        + (f" (torch.compile {start_up['compile_s']:.2f} s of it)"
           if start_up["compile_s"] is not None else ""))
    try:
        serial = SerialRunner(backend, manifest,
                              mask_root / f"serial-bs{size}" if settings.masks else None,
                              base.max_pixels, worker_threads=base.worker_threads)
        batches = executor_only.stage_batches(paths, manifest.input_size, size, count=4)
        backlog = settings.backlog or default_backlog(size, base.preprocess_workers,
                                                      base.postprocess_workers)
        with Front(cfg) as pipe:
            e2e = E2ERunner(pipe, backlog)
            if warm:
                say(f"batch {size}: warm-up ({settings.warmup} batches per mode)")
                e2e.run(paths[:warm], truths[:warm])
                executor_only.run_batches(backend, batches, max(1, settings.warmup))
                serial.run(paths[:warm], truths[:warm])
            runs: dict[str, list[dict[str, Any]]] = {"e2e": [], "executor": [], "serial": []}
            for r in range(settings.repeats):
                rep = {"e2e": e2e.run(paths, truths),
                       "executor": executor_only.measure(backend, batches, n_batches),
                       "serial": _serial_figures(serial, base_paths, base_truths)}
                for mode, figures in rep.items():
                    runs[mode].append(figures)
                say(f"batch {size}: repeat {r + 1}/{settings.repeats}: " + ", ".join(
                    f"{mode} {figures['img_s']:.1f}" for mode, figures in rep.items())
                    + " img/s")
    finally:
        backend.close()
    return {**summarise(size, count, runs, base_count, machine.usable_cpus()), **start_up}


def _cycled(items: list[Any], count: int) -> list[Any]:
    """The first `count` items of `items` repeated end to end."""
    return list(itertools.islice(itertools.cycle(items), count))


def _serial_figures(serial: SerialRunner, paths: list[Path], truths: list[Path | None],
                    ) -> dict[str, Any]:
    wall, metrics, errors = serial.run(paths, truths)
    return {"img_s": len(paths) / wall, "wall_s": wall, "images": len(paths), "errors": errors,
            "mIoU": metrics.summary()["mIoU"] if metrics.images else None}


def summarise(size: int, count: int, runs: dict[str, list[dict[str, Any]]],
              baseline_count: int | None = None, usable_cpus: float | None = None,
              ) -> dict[str, Any]:
    """Medians of the repeats, their ratios, and every repeat as measured.

    The host's limit: the pipeline cannot beat usable CPUs / CPU seconds per image summed
    over every process (pre, executor, post, front), however its work is spread. e2e is
    also given as a fraction of min(executor only, host limit), and which of the two is
    lower (`bound_by`: "device" or "host"), so a low e2e/executor says whether the device
    was starved by a pipeline that could do better or the host has no more to give."""
    def med(mode: str, key: str) -> float | None:
        values = [r[key] for r in runs[mode] if r.get(key) is not None]
        return statistics.median(values) if values else None

    e2e, ex, ser = med("e2e", "img_s"), med("executor", "img_s"), med("serial", "img_s")
    steady = med("e2e", "steady_img_s")
    front_main = med("e2e", "front_main_ms_per_image")
    busy = {s: statistics.median(r["busy"].get(s, 0.0) for r in runs["e2e"]) for s in STAGES}
    cpu = {s: statistics.median(r["cpu_ms_per_image"].get(s, 0.0) for r in runs["e2e"])
           for s in (*STAGES, "front")}
    cpus = usable_cpus if usable_cpus is not None else float(machine.usable_cpus())
    host_ms = sum(cpu.values())
    host_limit = cpus * 1000 / host_ms if host_ms > 0 else None
    bound = min(x for x in (ex, host_limit) if x) if ex or host_limit else None
    return {
        "batch_size": size, "images_per_pass": count,
        "usable_cpus": cpus, "host_cpu_ms_per_image": host_ms,
        "host_limit_img_s": host_limit, "bound_img_s": bound,
        "bound_by": None if bound is None else "device" if bound == ex else "host",
        "e2e_over_bound": e2e / bound if e2e and bound else None,
        "baseline_images_per_pass": baseline_count or count,
        "e2e_img_s": e2e, "executor_img_s": ex, "serial_img_s": ser,
        # the front's main thread does per-image work no worker count lifts: its ceiling
        "front_main_ms_per_image": front_main,
        "front_ceiling_img_s": 1000 / front_main if front_main else None,
        "e2e_over_executor": e2e / ex if ex else None,
        "e2e_steady_img_s": steady,
        "steady_over_executor": steady / ex if ex and steady else None,
        "e2e_over_serial": e2e / ser if ser else None,
        "latency_p50_ms": med("e2e", "latency_p50_ms"),
        "latency_p99_ms": med("e2e", "latency_p99_ms"),
        "busy_fraction": busy,
        "cpu_ms_per_image": cpu,
        "busiest_threads": runs["e2e"][-1].get("busiest_threads", []),   # the last repeat
        "front_bytes_per_image": med("e2e", "front_bytes_per_image"),
        "images_per_batch": med("e2e", "images_per_batch"),
        "batch_fill": med("e2e", "batch_fill"),
        "executor_wall_img_s": med("executor", "wall_img_s"),
        "executor_in_e2e_img_s": med("e2e", "executor_in_e2e_img_s"),
        "errors": {"e2e": sum(r["errors"] for r in runs["e2e"]),
                   "serial": sum(r["errors"] for r in runs["serial"])},
        "mIoU": {"e2e": med("e2e", "mIoU"), "serial": med("serial", "mIoU")},
        "repeats": runs,
    }


def model_info(model_dir: Path, manifest: Manifest) -> dict[str, Any]:
    source = manifest.source or {}
    config = source.get("config") or source.get("note") or ""
    return {"dir": str(model_dir), "name": Path(str(config)).stem if config else "",
            "input_size": list(manifest.input_size), "head": manifest.head,
            "num_classes": manifest.num_classes,
            "checkpoint_sha256": source.get("checkpoint_sha256")}


def table(doc: dict[str, Any]) -> str:
    """The printed summary: one row per batch size, medians of the repeats."""
    header = ["batch", "e2e img/s", "front ceiling", "steady", "executor img/s", "host limit",
              "serial img/s",
              "e2e/executor", "e2e/bound", "bound by", "steady/exec", "e2e/serial",
              "p50 ms", "p99 ms", "busy pre/exe/post"]
    rows = []
    for r in doc["results"]:
        busy = "/".join(f"{r['busy_fraction'][s]:.2f}" for s in STAGES)
        rows.append([str(r["batch_size"]), _f(r["e2e_img_s"]), _f(r.get("front_ceiling_img_s"), 0),
                     _f(r.get("e2e_steady_img_s")),
                     _f(r["executor_img_s"]), _f(r.get("host_limit_img_s")),
                     _f(r["serial_img_s"]), _f(r["e2e_over_executor"], 2),
                     _f(r.get("e2e_over_bound"), 2), r.get("bound_by") or "-",
                     _f(r.get("steady_over_executor"), 2), _f(r["e2e_over_serial"], 2),
                     _f(r["latency_p50_ms"]), _f(r["latency_p99_ms"]), busy])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    best = doc["best"]
    row = next(r for r in doc["results"] if r["batch_size"] == best["batch_size"])
    cpu = row.get("cpu_ms_per_image")
    total = sum(cpu.values()) if cpu else 0.0
    if total > 0:
        parts = ", ".join(f"{stage} {ms:.2f}" for stage, ms in cpu.items())
        lines.append(f"host CPU per image at batch {best['batch_size']}: {parts} ms; "
                     f"{total:.2f} ms in all = {1000 / total:.0f} img/s per core")
    if row.get("host_limit_img_s") is not None:
        cpus = row["usable_cpus"]
        lines.append(
            f"host limit: {cpus:g} usable CPUs / {row['host_cpu_ms_per_image']:.2f} ms per "
            f"image = {row['host_limit_img_s']:.1f} img/s; executor only "
            f"{_f(row['executor_img_s'])} img/s: the {row['bound_by']} bounds this pipeline "
            f"at {_f(row['bound_img_s'])} img/s, e2e reaches "
            f"{_f(row['e2e_over_bound'], 2)} of it")
    if row.get("front_main_ms_per_image"):
        ms = row["front_main_ms_per_image"]
        busy = f", the front busy {ms * row['e2e_img_s'] / 1000:.0%} of it" \
            if row["e2e_img_s"] else ""
        lines.append(f"front ceiling: 1000 / {ms:.3f} ms of the front's main thread per "
                     f"image = {row['front_ceiling_img_s']:.0f} img/s (e2e "
                     f"{_f(row['e2e_img_s'])} img/s at batch {best['batch_size']}{busy})")
    busiest = row.get("busiest_threads") or []
    if busiest:
        lines.append("busiest threads (ms per image, the rate each allows): " + ", ".join(
            f"{t['process']}/{t['thread']} {t['ms_per_image']:.2f} ({t['max_img_s']:.0f}/s)"
            for t in busiest[:4]))
    lines.append(f"best batch {best['batch_size']}: e2e {_f(best['e2e_img_s'])} img/s = "
                 f"{_f(best['e2e_over_executor'], 2)} x executor only "
                 f"(steady {_f(best.get('e2e_steady_img_s'))} img/s = "
                 f"{_f(best.get('steady_over_executor'), 2)} x), "
                 f"{_f(best['e2e_over_serial'], 2)} x serial")
    return "\n".join(lines)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
