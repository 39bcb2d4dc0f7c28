"""The benches and the test bed sit on the runtime's public API (udrv.registry, udrv.service, ...):
they never import the cli, the runtime never imports them, and no import circle runs through
them. Imports are read from the source (every `import` statement, inside functions too), so a
lazy import counts as much as one at the top."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import udrv

PACKAGE = Path(udrv.__file__).resolve().parent
OUTSIDE_THE_RUNTIME = ("udrv.bench", "udrv.testbed", "udrv.cli", "udrv.demo")


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = ("udrv",) + p.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    """udrv module -> the udrv modules it imports (a name imported from a package counts as its
    submodule when there is one)."""
    mods = _modules()

    def known(name: str | None) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module
                if node.level:
                    pkg = here
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{node.module}" if node.module else pkg
                found |= {known(f"{base}.{a.name}") for a in node.names}
        graph[mod] = {m for m in found if m and m != mod}
    return graph


def circles_through(graph: dict[str, set[str]], prefixes: tuple[str, ...]) -> list[list[str]]:
    """Import paths from a module under prefixes back to itself."""
    out = []
    for start in (m for m in graph if m.startswith(prefixes)):
        seen, todo = {start}, [[start]]
        while todo:
            path = todo.pop()
            for nxt in graph[path[-1]]:
                if nxt == start:
                    out.append(path + [start])
                elif nxt not in seen:
                    seen.add(nxt)
                    todo.append(path + [nxt])
    return out


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    g = import_graph()
    assert "udrv.registry" in g["udrv.service"]           # inside serve()
    assert "udrv.testbed.guest" in g["udrv.bench.sidebyside"]   # `from ..testbed import guest`, in a function
    assert "udrv.bench.recovery" in g["udrv.cli"]


def test_benches_and_the_testbed_never_import_the_cli() -> None:
    g = import_graph()
    assert [m for m in g if m.startswith(("udrv.bench", "udrv.testbed")) and "udrv.cli" in g[m]] == []


def test_the_runtime_imports_no_bench_testbed_or_cli() -> None:
    g = import_graph()
    wrong = {m: sorted(d for d in deps if d.startswith(OUTSIDE_THE_RUNTIME))
             for m, deps in g.items() if not m.startswith(OUTSIDE_THE_RUNTIME)}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_no_import_circle_runs_through_the_cli_the_api_the_benches_or_the_testbed() -> None:
    g = import_graph()
    assert circles_through(g, OUTSIDE_THE_RUNTIME + ("udrv.registry", "udrv.service")) == []


def test_a_circle_is_found_when_there_is_one() -> None:
    g = {"udrv.bench.a": {"udrv.cli"}, "udrv.cli": {"udrv.x"}, "udrv.x": {"udrv.bench.a"}}
    assert circles_through(g, ("udrv.bench",)) == [["udrv.bench.a", "udrv.cli", "udrv.x", "udrv.bench.a"]]


def test_the_supervisor_imports_no_driver_and_no_model():
    """The trusted process stays small: no driver or model code is loaded with it."""
    import subprocess
    import sys
    code = ("import sys, udrv.supervisor, udrv.service, udrv.models.catalog, udrv.peer, udrv.placement; "
            "print(','.join(m for m in sys.modules if m.startswith(('udrv.drivers.', 'udrv.models.', 'udrv.nic', "
            "'udrv.guard', 'udrv.usbnet', 'udrv.pcinet', 'udrv.registry')) and m != 'udrv.models.catalog'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", r.stdout
