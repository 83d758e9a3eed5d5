"""The package reads like the pipeline: no module imports one that imports it back, not even inside a function."""
import ast
import subprocess
import sys
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


# The pipeline, bottom to top: a package may import its own layer and the ones below it, never one above.
LAYERS = ["base", "targets", "models", "measure", "spec", "align", "fuse", "graph", "run", "device", "jobs", "cli"]


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else len(LAYERS)


def test_no_import_cycles():
    graph = import_graph()
    assert "edgefuse.jobs.export" in graph and "edgefuse.run.choose" in graph["edgefuse.jobs.export"]
    assert cycles(graph) == []


def test_every_module_sits_in_a_layer_package():
    graph = import_graph()
    loose = [m for m in graph if m.count(".") == 1 and m.split(".")[1] not in LAYERS]
    assert loose == []


def test_no_module_imports_an_upper_package():
    graph = import_graph()
    upward = [(m, t) for m in graph if m != "edgefuse" for t in graph[m] if layer(t) > layer(m)]
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert layer("edgefuse.run.choose") > layer("edgefuse.graph.onnx") > layer("edgefuse.fuse.model")


def test_import_spec_loads_neither_rich_onnx_nor_the_run_layer():
    code = ("import sys, edgefuse.spec; bad = [m for m in sys.modules if m.split('.')[0] in ('rich', 'onnx', "
            "'onnxruntime') or m.startswith(('edgefuse.run', 'edgefuse.jobs', 'edgefuse.device'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"


def public_functions_with_many_parameters(limit: int = 8) -> list[str]:
    out = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                if len(names) > limit:
                    out.append(f"{module_name(path)}.{node.name} ({len(names)})")
    return out


def test_no_public_function_takes_more_than_eight_parameters():
    assert public_functions_with_many_parameters() == []
    assert public_functions_with_many_parameters(limit=1)  # the walker sees parameters at all


def test_every_public_name_is_in_the_docs():
    """The face's names are the Python contract: each appears in README.md or docs/."""
    import re

    import edgefuse

    root = Path(__file__).resolve().parents[1]
    text = "".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    missing = [n for n in edgefuse.__all__ if not re.search(rf"\b{n}\b", text)]
    assert not missing, missing
