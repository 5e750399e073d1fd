"""The bench's picture: images/s against batch size, one line per mode.

Why a picture: whether the pipeline tracks the executor's ceiling across batch sizes, and
where the serial baseline falls behind, reads at a glance from three lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODES = (("executor_img_s", "executor only (ceiling)", "--"),
         ("e2e_img_s", "end to end (pipeline), whole pass", "-"),
         ("e2e_steady_img_s", "end to end, steady (pipeline full)", "-."),
         ("serial_img_s", "serial baseline", ":"))


def plot(doc: dict[str, Any], path: Path) -> None:
    """Write a PNG (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    sizes = [r["batch_size"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key, label, style in MODES:
        values = [r.get(key) for r in rows]
        if all(v is None for v in values):        # older results: no steady figure
            continue
        ax.plot(sizes, [float("nan") if v is None else v for v in values], style,
                marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (median of repeats)")
    ax.set_ylim(bottom=0)
    model = doc.get("model", {})
    ax.set_title(f"{doc['machine']}: {doc['backend']} {doc['precision']}, "
                 f"{model.get('name', '')} {model.get('input_size', '')}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
