"""The shape of the package (docs/architecture.md): no module imports one that imports it back,
and imports go one way through the rooms, counting the imports inside functions too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segcompare"

# Import order of the rooms: a module may import its own room and the rooms before it. Training
# validates with evaluate's inference, so evaluate comes before train here although a run trains
# first; `metrics` serves both.
ROOMS = [
    ("segcompare", "segcompare.utils"),
    ("segcompare.data",),
    ("segcompare.models",),
    ("segcompare.metrics", "segcompare.config", "segcompare.losses"),
    ("segcompare.evaluate",),
    ("segcompare.train", "segcompare.run_folder"),
    ("segcompare.infer", "segcompare.stats"),
    ("segcompare.bench", "segcompare.export"),
    ("segcompare.compare",),
    ("segcompare.demo",),
    ("segcompare.cli", "segcompare.__main__"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The segcompare modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from segcompare.models import hrnet` imports the submodule hrnet (its package's
            # __init__ runs first, as for any submodule, which is no dependency of ours);
            # `from segcompare.models import build_model` imports the package itself
            sub = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n in modules else node.module for n in sub]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def _room(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(ROOMS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} belongs to no room: add it to ROOMS"
    return best[0]


def test_no_module_imports_one_that_imports_it_back():
    graph = _graph()
    assert "segcompare.models.variants" in graph["segcompare.models.checkpoint"]

    def cycle_from(start: str) -> list[str]:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return []

    cycles = [c for c in map(cycle_from, graph) if c]
    assert not cycles, cycles[0]


def test_imports_go_one_way_through_the_rooms():
    graph = _graph()
    backwards = sorted(
        f"{a} imports {b}" for a, deps in graph.items() for b in deps
        if _room(b) > _room(a) and not b == "segcompare"
    )  # fmt: skip
    assert not backwards, backwards


def test_the_check_sees_imports_inside_functions(tmp_path):
    code = "def f():\n    from segcompare.compare import run_compare\n"
    (tmp_path / "m.py").write_text(code)
    assert _imports(tmp_path / "m.py", {"segcompare.compare"}) == {"segcompare.compare"}
