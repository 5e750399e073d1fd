"""No import circle between any two modules of the project.

The contracts in pyproject.toml (run by `lint-imports` in ./scripts/test) keep the layers
and forbid circles between sibling modules, but not one between a package and a module
inside it (pspnet.stages.backends imported its backend modules, which imported it back). This
counts every circle on the whole graph, imports inside functions included.
"""

from __future__ import annotations

import graphlib

import grimp

ROOT_PACKAGES = ("pspnet", "studies")
# The layers, top to bottom (a folder imports only from folders below it; siblings on one
# floor do not import each other). Also a contract in pyproject.toml; this test counts.
LAYERS = (
    ("studies",),
    ("pspnet.__main__",),
    ("pspnet.cli",),
    ("pspnet.demo", "pspnet.worker"),
    ("pspnet.bench",),
    ("pspnet.batch",),
    ("pspnet.daemon", "pspnet.stages", "pspnet.build_model"),
    ("pspnet.model",),
    ("pspnet.core",),
)


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
    assert graph.direct_import_exists(importer="pspnet.stages.backends",
                                      imported="pspnet.stages.backends.ort")
    cycles = import_cycles(graph)
    print(f"FIGURE import cycles between modules: {len(cycles)} "
          f"({len(graph.modules)} modules, {graph.count_imports()} imports)")
    assert not cycles, "import circles: " + "; ".join(" -> ".join(reversed(c)) for c in cycles)


def layer_of(module: str) -> tuple[int, str] | None:
    for floor, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return floor, name
    return None


def test_no_import_goes_up_or_sideways() -> None:
    graph = grimp.build_graph(*ROOT_PACKAGES, cache_dir=None)
    up, sideways, arrows = [], [], set()
    for importer in graph.modules:
        here = layer_of(importer)
        if here is None:
            continue
        for imported in graph.find_modules_directly_imported_by(importer):
            there = layer_of(imported)
            if there is None or there[1] == here[1]:
                continue
            arrows.add((here[1], there[1]))
            if there[0] < here[0]:
                up.append(f"{importer} -> {imported}")
            elif there[0] == here[0]:
                sideways.append(f"{importer} -> {imported}")
    print(f"FIGURE layers: {' > '.join(' | '.join(n.split('.')[-1] for n in f) for f in LAYERS)};"
          f" {len(arrows)} arrows between folders, {len(up)} up, {len(sideways)} sideways")
    assert ("pspnet.daemon", "pspnet.core") in arrows       # the graph is the real one
    assert not up, "imports from a lower layer to a higher one: " + "; ".join(up)
    assert not sideways, "imports between siblings: " + "; ".join(sideways)
