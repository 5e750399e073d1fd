"""No class in a product folder over MAX_CLASS_LINES lines (issue 25).

A class that long does several jobs (the daemon's Server carried watch intake and a
shutdown of four timeouts; the torch backend its program loading, CUDA streams and graphs).
Measured from the source (AST: first line of the decorators to the last line of the
body), per product folder: the installed package, not tests or studies.

`python -m tests.test_class_sizes [ROOT]` prints the largest class per folder of any
checkout (ROOT: another worktree, for a before/after).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT_FOLDERS = ("core", "model", "daemon", "stages", "build_model", "batch", "bench",
                   "pspnet")
MAX_CLASS_LINES = 250


def class_sizes(root: Path) -> dict[str, int]:
    """'folder/file.py:Class' -> lines, for every class (nested ones too) of the product."""
    sizes = {}
    root = root.resolve()
    files = {p.resolve() for folder in PRODUCT_FOLDERS for p in (root / folder).rglob("*.py")}
    for path in sorted(files):              # resolved: pspnet/daemon -> ../daemon counts once
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                sizes[f"{path.relative_to(root)}:{node.name}"] = node.end_lineno - first + 1
    return sizes


def largest_per_folder(sizes: dict[str, int]) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for name, lines in sizes.items():
        folder = name.split("/", 1)[0]
        if folder not in out or lines > out[folder][1]:
            out[folder] = (name, lines)
    return out


def table(root: Path, top: int = 5) -> str:
    sizes = class_sizes(root)
    largest = largest_per_folder(sizes)
    rows = [f"  {folder:12} {lines:4}  {name}"
            for folder, (name, lines) in sorted(largest.items(), key=lambda kv: -kv[1][1])]
    biggest = sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
    return "\n".join([*rows, f"  the {top} largest: "
                       + ", ".join(f"{name.rsplit(':', 1)[1]} {n}" for name, n in biggest)])


def test_no_product_class_over_the_limit() -> None:
    sizes = class_sizes(REPO)
    assert len(sizes) > 50 and "daemon/server.py:Server" in sizes   # the real tree
    print(f"\nFIGURE largest class per product folder (limit {MAX_CLASS_LINES}):\n"
          f"{table(REPO)}")
    over = {name: lines for name, lines in sizes.items() if lines > MAX_CLASS_LINES}
    assert not over, f"classes over {MAX_CLASS_LINES} lines: {over}"


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
    print(f"largest class per product folder, {root}:\n{table(root)}")
