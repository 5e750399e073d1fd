"""Fold the device run's pieces into what comes back: one bench JSON + plot, one summary.

Why: run.sh benches one batch size per `pspnet bench` call (a timeout then loses one size,
not all) and the lead gets at most 8 files back, so the per-size documents are merged here
into the document `pspnet bench` would have written for all sizes at once (results sorted
by batch size, `best` recomputed, every part's settings kept), and the plot is drawn with
pspnet.bench.plot. Runs of another configuration (e.g. compile=1) go under "variants", never into
the main results. summary.json: every step's status and time, the headline figures.

  python3 studies/device/report.py --parts DIR --variant-parts DIR --json OUT/h100.json \
      --plot OUT/h100.png --steps STEPS.tsv --agreement OUT/agreement.json \
      --summary OUT/summary.json --variants OUT/h100-variants.json

Never raises for a missing or broken piece: it reports what it found.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any


def load_parts(folder: Path | None) -> list[dict[str, Any]]:
    docs = []
    if folder is None or not folder.is_dir():
        return docs
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"[report] skipping {path}: {exc}\n")
            continue
        if isinstance(doc, dict) and doc.get("results"):
            doc["_part"] = path.name
            docs.append(doc)
    return docs


def merge(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One bench document from several (each with its own batch sizes)."""
    if not parts:
        return None
    doc = {k: v for k, v in parts[0].items() if k not in ("results", "_part")}
    rows: dict[int, dict[str, Any]] = {}
    for part in parts:
        for row in part["results"]:
            rows[int(row["batch_size"])] = {**row, "part": part["_part"],
                                            "created": part.get("created")}
    doc["results"] = [rows[k] for k in sorted(rows)]
    doc["settings"] = dict(doc.get("settings") or {})
    doc["settings"]["batch_sizes"] = sorted(rows)
    doc["settings"]["merged_from"] = [
        {"part": p["_part"], "batch_sizes": (p.get("settings") or {}).get("batch_sizes"),
         "inputs": p.get("inputs"), "created": p.get("created")} for p in parts]
    scored = [r for r in doc["results"] if r.get("e2e_img_s") is not None]
    if scored:
        best = max(scored, key=lambda r: r["e2e_img_s"])
        ratio_ex, ratio_ser = best.get("e2e_over_executor"), best.get("e2e_over_serial")
        doc["best"] = {"batch_size": best["batch_size"], "e2e_img_s": best["e2e_img_s"],
                       "e2e_over_executor": ratio_ex, "e2e_over_serial": ratio_ser,
                       "e2e_steady_img_s": best.get("e2e_steady_img_s"),
                       "steady_over_executor": best.get("steady_over_executor"),
                       "meets_0.9x_executor": ratio_ex is not None and ratio_ex >= 0.9,
                       "meets_1.5x_serial": ratio_ser is not None and ratio_ser >= 1.5}
    return doc


def headline(doc: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not doc:
        return []
    keys = ("batch_size", "e2e_img_s", "e2e_steady_img_s", "executor_img_s",
            "executor_wall_img_s", "executor_in_e2e_img_s", "serial_img_s",
            "e2e_over_executor", "steady_over_executor", "latency_p50_ms", "latency_p99_ms",
            "busy_fraction", "cpu_ms_per_image")
    return [{k: r.get(k) for k in keys} for r in doc.get("results", [])]


def read_steps(path: Path | None) -> list[dict[str, Any]]:
    steps = []
    if path is None or not path.is_file():
        return steps
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 4:
            name, rc, seconds, limit = fields[:4]
            steps.append({"step": name, "rc": rc, "seconds": _num(seconds),
                          "limit_s": _num(limit)})
    return steps


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", type=Path, default=None)
    p.add_argument("--variant-parts", type=Path, action="append", default=[],
                   metavar="DIR", help="folder of another configuration's parts (name = "
                                       "folder name)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--steps", type=Path, default=None)
    p.add_argument("--agreement", type=Path, default=None)
    p.add_argument("--summary", type=Path, default=None)
    p.add_argument("--variants", type=Path, default=None,
                   help="variants.py's table JSON: its rows go into the summary")
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="added to summary.json as is")
    args = p.parse_args(argv)

    summary: dict[str, Any] = dict(kv.split("=", 1) for kv in args.extra)
    summary["steps"] = read_steps(args.steps)
    doc = None
    try:
        doc = merge(load_parts(args.parts))
        variants = {}
        for folder in args.variant_parts:
            merged = merge(load_parts(folder))
            if merged:
                variants[folder.name] = {"settings": merged.get("settings"),
                                         "precision": merged.get("precision"),
                                         "results": merged["results"]}
        if doc is None and variants:       # only a variant ran: keep it visible anyway
            doc = {"results": [], "variants": variants}
        elif doc is not None and variants:
            doc["variants"] = variants
        if doc is not None and args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        summary["bench"] = headline(doc)
        summary["bench_best"] = (doc or {}).get("best")
        summary["variants"] = {k: headline(v) for k, v in (doc or {}).get("variants",
                                                                           {}).items()}
    except Exception:  # noqa: BLE001 - the summary must still be written
        summary["bench_error"] = traceback.format_exc()[-2000:]
    try:
        if doc is not None and doc.get("results") and args.plot is not None:
            from pspnet.bench.plot import plot

            plot(doc, args.plot)
    except Exception:  # noqa: BLE001
        summary["plot_error"] = traceback.format_exc()[-2000:]
    if args.agreement is not None and args.agreement.is_file():
        try:
            agreement = json.loads(args.agreement.read_text())
            summary["agreement"] = agreement.get("summary")
            summary["agreement_errors"] = agreement.get("errors")
        except (OSError, ValueError) as exc:
            summary["agreement_error"] = str(exc)
    if args.variants is not None and args.variants.is_file():
        try:
            summary["variants_executor"] = json.loads(args.variants.read_text()).get("rows")
        except (OSError, ValueError) as exc:
            summary["variants_error"] = str(exc)
    text = json.dumps(summary, indent=1, default=str)
    if args.summary is not None:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
