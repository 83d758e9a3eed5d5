"""Each registered choice has one default, defined once: no signature, dataclass field or CLI option repeats it as
a literal, and the command line's help and `edgefuse check` load neither torch nor scipy to show or check anything."""
import ast
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgefuse"
ALIASES = {"methods": "method", "repairs": "repair", "teacher_combine": "combine", "latency_binds": "binds"}


def knobs() -> dict[str, set[str]]:
    """Each registered choice and the names it accepts."""
    def names(ref: str) -> set[str]:
        module, _, attr = ref.partition(":")
        return {n for n in getattr(import_module(f"edgefuse.{module}"), attr) if n is not None}

    return {"method": names("align:METHODS"), "repair": names("fuse.repair:REPAIRS"),
            "select": names("fuse.select:SELECTIONS"), "combine": names("base.combine:COMBINES"),
            "arch": names("models.zoo:ARCHITECTURES"), "zoo": names("run.config:ZOOS"),
            "binds": names("targets:BINDS")}


def _knob_of_option(call: ast.Call) -> str | None:
    """The parameter a click.option call declares: its explicit name, else its long flag."""
    decls = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    plain = [d for d in decls if not d.startswith("-")]
    longs = [d[2:].replace("-", "_") for d in decls if d.startswith("--")]
    return (plain or longs or [None])[0]


def _literals(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [v for e in node.elts for v in _literals(e)]
    return []


def definitions(source: str, where: str, registry: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(knob, place) for every literal default of a knob (a parameter, dataclass field or click option of its name
    whose default names a registered choice) and every module constant DEFAULT_<KNOB>."""
    found = []

    def note(name: str | None, value: ast.AST, line: int) -> None:
        knob = ALIASES.get(name, name)
        if knob in registry and any(v in registry[knob] for v in _literals(value)):
            found.append((knob, f"{where}:{line}"))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            for a, d in zip(positional[len(positional) - len(args.defaults):], args.defaults):
                note(a.arg, d, d.lineno)
            for a, d in zip(args.kwonlyargs, args.kw_defaults):
                if d is not None:
                    note(a.arg, d, d.lineno)
        elif isinstance(node, ast.ClassDef):
            for s in node.body:
                if isinstance(s, ast.AnnAssign) and s.value is not None and isinstance(s.target, ast.Name):
                    note(s.target.id, s.value, s.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "option":
            for k in node.keywords:
                if k.arg == "default":
                    note(_knob_of_option(node), k.value, k.value.lineno)
        elif isinstance(node, ast.Assign) and node.col_offset == 0:
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id.startswith("DEFAULT_"):
                    note(t.id[len("DEFAULT_"):].lower(), node.value, node.lineno)
    return found


def test_each_registered_choice_has_its_default_defined_once():
    registry = knobs()
    places: dict[str, list[str]] = {k: [] for k in registry}
    for path in sorted(PACKAGE.rglob("*.py")):
        for knob, where in definitions(path.read_text(), str(path.relative_to(PACKAGE.parent)), registry):
            places[knob].append(where)
    assert {k: v for k, v in places.items() if len(v) != 1} == {}


def test_the_check_finds_a_second_literal_default():
    registry = knobs()
    source = ('DEFAULT_REPAIR = "lsq"\n'
              'def fuse(models, repair="bn", combine=DEFAULT_COMBINE): ...\n'
              'class Point:\n    method: str = "weight"\n'
              'opt = click.option("--method", "methods", default=("activation",))\n')
    assert [k for k, _ in definitions(source, "x.py", registry)] == ["repair", "repair", "method", "method"]


def _loaded(args: list[str]) -> list[str]:
    code = ("import sys\nfrom edgefuse.cli import main\nsys.argv = ['edgefuse', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'scipy'}))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    return eval(out.stdout.strip().splitlines()[-1])


def test_edgefuse_help_loads_neither_torch_nor_scipy():
    assert _loaded(["--help"]) == []


def test_edgefuse_check_loads_neither_torch_nor_scipy(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    assert _loaded(["check", str(tmp_path / "relu.onnx"), "--target", "jetson-orin-nano-jp6"]) == []


def test_a_command_s_help_still_lists_the_registries_and_their_defaults():
    from click.testing import CliRunner

    from edgefuse.cli import cli

    out = CliRunner().invoke(cli, ["sweep", "--help"], terminal_width=200).output
    assert "[activation|ot|weight]" in out and "[default: lsq]" in out and "[bn|lsq|none|repair]" in out
