"""The package reads like the pipeline: no module imports one that imports it back, not even inside a function."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgefuse"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every import statement anywhere in a module (top level or inside functions), resolved to package modules."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                stem = ".".join(base + ([node.module] if node.module else []))
                targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not a cycle
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt == b:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False
    return sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})


def test_the_walker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "edgefuse.pipeline" in graph and "edgefuse.choose" in graph["edgefuse.pipeline"]
    assert cycles(graph) == []


def test_lower_layers_never_import_the_jobs_above_them():
    graph = import_graph()
    top = {"edgefuse.pipeline", "edgefuse.sweep", "edgefuse.verify", "edgefuse.cli"}
    for low in ("edgefuse.candidates.jobs", "edgefuse.choose", "edgefuse.report", "edgefuse.gpucheck",
                "edgefuse.compete", "edgefuse.device"):
        assert not graph[low] & top, (low, graph[low] & top)
