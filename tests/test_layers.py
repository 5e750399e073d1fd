"""No import circle between any two modules of the project.

The contracts in pyproject.toml (run by `lint-imports` in ./scripts/test) keep the layers
and forbid circles between sibling modules, but not one between a package and a module
inside it (stages.backends imported its backend modules, which imported it back). This
counts every circle on the whole graph, imports inside functions included.
"""

from __future__ import annotations

import graphlib

import grimp

ROOT_PACKAGES = ("pspnet", "bench", "daemon", "build_model", "stages")


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Circles found one at a time: graphlib names one, its closing import is set aside,
    and the search starts again until none is left (0 only for an acyclic graph)."""
    imports = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = []
    while True:
        try:
            graphlib.TopologicalSorter(imports).prepare()
        except graphlib.CycleError as exc:
            cycle = exc.args[1]          # [a, b, ..., a]: b imports a
            cycles.append(cycle)
            imports[cycle[1]].discard(cycle[0])
        else:
            return cycles


def test_no_import_cycles_between_modules() -> None:
    graph = grimp.build_graph(*ROOT_PACKAGES, cache_dir=None)
    # the graph is the real one, lazy imports included (else 0 would prove nothing)
    assert len(graph.modules) > 50
    assert graph.direct_import_exists(importer="stages.backends",
                                      imported="stages.backends.ort")
    cycles = import_cycles(graph)
    print(f"FIGURE import cycles between modules: {len(cycles)} "
          f"({len(graph.modules)} modules, {graph.count_imports()} imports)")
    assert not cycles, "import circles: " + "; ".join(" -> ".join(reversed(c)) for c in cycles)
