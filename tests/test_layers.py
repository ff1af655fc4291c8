"""The package's modules import only from their own floor or lower ones, without circles.

Imports are read from the source (``ast``): module-level and function-level ones alike, except
those under ``if TYPE_CHECKING:`` (annotations only). The few known exceptions are listed with
their reason; each must still exist, so the lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fibroquant"

#: Floors, low to high: a module may import from its own floor and the ones below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "layout", "protocols", "exclusions", "console", "cores", "config", "confidence",
     "bitmask", "measure"),  # base
    ("stains", "kernels", "registration", "focus", "slides", "read_dicom", "read_openslide",
     "wsi_writers", "synthetic", "synthetic_fibres", "annotations", "outdir"),  # images, stains
    ("tissue", "collagen", "shading"),  # tissue, exclusions and the collagen decision
    ("tiles", "classifier"),  # the analysis image's tiles, and what decides their pixels
    ("pipeline", "traits", "skanpaths", "warm_skan", "stats", "schema"),  # one slide, cohort figures
    ("store", "recover", "report", "cohort", "agreement", "tasks", "zoom"),  # tables, outputs, tasks
    ("executor", "run", "cluster"),  # running many slides
    ("cli_common", "cli", "cli_ops", "cli_study", "cli_agree", "__main__", "__init__"),  # commands
)

#: Imports from a higher floor, each a function-level import with a reason.
UPWARD = {
    ("config", "classifier"): "settings validate and hash the classifier file (issue 22)",
    ("classifier", "pipeline"): "training measures each training slide first (issue 22)",
    ("classifier", "agreement"): "training reads the annotators' majority (issue 22)",
}

#: Imports that close a circle on one floor (importer, imported), each with a reason.
CIRCLES = {
    ("cli_ops", "cli"): "command modules register on the Typer app, cli.app, which imports them",
    ("cli_study", "cli"): "command modules register on the Typer app, cli.app, which imports them",
    ("cli_agree", "cli"): "command modules register on the Typer app, cli.app, which imports them",
    ("slides", "read_dicom"): "open_slide dispatches to the DICOM reader (issue 26)",
    ("schema", "traits"): "the schema lists the trait columns (issue 27)",
}


def _floor() -> dict[str, int]:
    return {m: i for i, floor in enumerate(LAYERS) for m in floor}


def _imports(path: Path) -> set[str]:
    """Names of the fibroquant modules ``path`` imports (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "fibroquant":
                continue
            if len(parts) > 1:
                out.add(parts[1])
            else:  # from fibroquant import x: modules, or the package's own names
                out |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names
                    if a.name.startswith("fibroquant.")}
    out.discard(path.stem)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_floor(graph):
    floor = _floor()
    assert sorted(set(graph) - set(floor)) == [], "place new modules in LAYERS"
    assert sorted(set(floor) - set(graph)) == [], "LAYERS names modules that do not exist"


def test_no_import_from_a_higher_floor(graph):
    floor = _floor()
    upward = {(m, d) for m, deps in graph.items() for d in deps if floor[d] > floor[m]}
    assert upward - set(UPWARD) == set(), "a lower floor imports a higher one"
    assert set(UPWARD) - upward == set(), "fixed: remove it from UPWARD"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle(graph):
    known = set(UPWARD) | set(CIRCLES)
    pruned = {m: {d for d in deps if (m, d) not in known} for m, deps in graph.items()}
    assert _cycles(pruned) == []
    circles = _cycles({m: {d for d in deps if (m, d) not in UPWARD}
                       for m, deps in graph.items()})
    for a, b in CIRCLES:
        assert b in graph[a], f"fixed: remove {a} -> {b} from CIRCLES"
        assert any({a, b} <= set(c) for c in circles), f"fixed: remove {a} -> {b} from CIRCLES"


def test_the_tile_path_stays_low(graph):
    """The collagen decision and the kernels it runs in know nothing of slides or runs (the
    kernels read only the table of excluded classes, for their bits)."""
    assert graph["kernels"] <= {"exclusions"}
    assert graph["collagen"] <= {"config", "kernels", "stains"}
    assert "collagen" not in graph["tissue"]


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
