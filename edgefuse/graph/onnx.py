"""One self-contained ONNX file with a dynamic batch axis, simplified, and checked against PyTorch before it lands."""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from ..base.compare import differences
from ..base.errors import EdgefuseError, first_line, warn_once
from ..base.files import commit, new_temp_path
from ..measure.runners import OrtRunner, scoring_threads

INPUT, OUTPUT, HEADS = "input", "logits", "head_logits"
# The TorchScript exporter writes opsets up to 20 and exports the zoo's CNN in 0.04 s against the dynamo exporter's
# 1.2 s (warm, 1 thread): it runs wherever it can, the dynamo exporter above it and where it fails.
TORCHSCRIPT_MAX_OPSET = 20
DYNAMO_MIN_OPSET = 18
DEFAULT_OPSET = 18


def _outputs(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _exporters(opset: int) -> list[bool]:
    """Which exporters to try, in order (dynamo or not): the TorchScript one up to opset 20 (TensorRT 8.x parses no
    more than 17), then the dynamo one from opset 18 up, for graphs the first cannot write or writes wrong (an
    operator it lacks, a batch size it froze)."""
    return ([False] if opset <= TORCHSCRIPT_MAX_OPSET else []) + ([True] if opset >= DYNAMO_MIN_OPSET else [])


def _export(module: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamo: bool) -> list[str]:
    """One exporter's graph; returns what the TorchScript tracer warned of (a value it froze into the graph: a
    branch taken on a tensor, a size turned into a number). A second output (a FusedModel's per-head outputs) is
    named head_logits."""
    names = [OUTPUT, HEADS][:len(_outputs(module, example))]
    kwargs: dict = dict(input_names=[INPUT], output_names=names, opset_version=opset, dynamo=dynamo)
    if dynamo:
        kwargs.update(dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)
    else:
        kwargs.update(dynamic_axes={INPUT: {0: "batch"}, **{n: {0: "batch"} for n in names}})
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()), _silent_fd1():
        warnings.simplefilter("always")
        torch.onnx.export(module, (example,), str(path), **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


def _checked_graph(module: nn.Module, example: torch.Tensor, path: Path, opset: int, simplify: bool,
                   atol: float) -> None:
    """Write at `path` the first exporter's graph that passes onnx's checker and, simplified, gives the module's
    outputs at batch 1 and 3 — a TorchScript trace that froze a value only where no other exporter follows —;
    else one line saying what the last exporter's graph got wrong."""
    import onnx

    problem, exporters = "", _exporters(opset)
    for i, dynamo in enumerate(exporters):
        try:
            froze = _export(module, example, path, opset, dynamo)
        except Exception as e:  # exporter failures are many types; report the first line
            problem = f"ONNX export failed: {first_line(e)}"
            continue
        if froze and i < len(exporters) - 1:  # a graph right on the parity inputs may be wrong on others
            problem = f"ONNX export failed: the TorchScript trace froze a value ({first_line(froze[0])})"
            continue
        try:
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
            if simplify:
                _simplify(path)
            diff, tolerance = _parity(path, module, example, atol)
        except EdgefuseError as e:
            problem = str(e)
            continue
        except Exception as e:  # the checker's and onnxruntime's own error types
            problem = f"the exported ONNX graph does not run: {first_line(e)}"
            continue
        if diff <= tolerance:
            return
        problem = f"ONNX output differs from PyTorch by {diff:.3g} (tolerance {tolerance:.3g})"
    path.unlink(missing_ok=True)
    raise EdgefuseError(problem)


@contextlib.contextmanager
def _silent_fd1():
    """On failure the TorchScript exporter's C++ side prints its whole IR graph to file descriptor 1, past Python's
    sys.stdout (70 lines under `-q`): silence the descriptor itself while the exporter runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _simplify(path: Path) -> None:
    """onnxsim's constant folding and shape simplification, where it is installed (a GPU machine without a
    registry may lack it: the graph is then written as exported, which is equally correct)."""
    import onnx

    try:
        import onnxsim
    except ImportError:
        warn_once("onnxsim is not installed: ONNX graphs are written as exported, unsimplified")
        return

    model = onnx.load(str(path))
    simplified, ok = onnxsim.simplify(model)
    if ok:
        onnx.save(simplified, str(path))


def parity(onnx_path: str | Path, module: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Largest |ONNX - PyTorch| over the given input batches, run with onnxruntime on the CPU (on the process's
    torch threads, never spinning)."""
    runner = OrtRunner(onnx_path, scoring_threads())
    worst = 0.0
    for x in inputs:
        refs = [r.numpy() for r in _outputs(module, x)]
        diff, problems = differences(runner.outputs(x.numpy()), refs)
        if problems:
            raise EdgefuseError(f"the ONNX graph and the PyTorch model (the reference) at batch {len(x)}: "
                                f"{problems[0]}" + (" (non-finite values: NaN or Inf is never a result)"
                                                    if "NaN" in problems[0] else ""))
        worst = max(worst, diff)
    return worst


def parity_inputs(example: torch.Tensor, sizes: tuple[int, ...] = (1, 3), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand((b, *example.shape[1:]), generator=gen, dtype=example.dtype) for b in sizes]


def export_onnx(module: nn.Module, example_input: torch.Tensor, path: str | Path, opset: int | None = None,
                simplify: bool = True, atol: float = 1e-4, cache: Path | None = None) -> Path:
    """Export, check and simplify into a temporary file beside `path`, verify parity at batch 1 and 3 (max abs
    difference <= atol, scaled by the output magnitude), and only then replace `path`. With `cache` (a folder), a
    graph exported earlier from the same module (its tensors, structure and code), input shape and settings is
    reused instead of exported again (the exporter takes seconds per graph), still parity-checked first."""
    path = Path(path)
    opset = opset or DEFAULT_OPSET
    module = module.eval()
    example = example_input if example_input.shape[0] >= 2 else example_input.repeat(2, *[1] * (example_input.ndim - 1))
    cached = Path(cache) / f"{_cache_key(module, example, opset, simplify)}.onnx" if cache is not None else None
    tmp = new_temp_path(path, ".onnx")
    try:
        if cached is not None and cached.is_file():
            shutil.copyfile(cached, tmp)
            if _matches(tmp, module, example, atol):
                commit(tmp, path)
                return path
        _checked_graph(module, example, tmp, opset, simplify, atol)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp, new := new_temp_path(cached, ".onnx"))
            commit(new, cached)
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _cache_key(module: nn.Module, example: torch.Tensor, opset: int, simplify: bool) -> str:
    """What an exported graph depends on: the module's classes, fx code and tensors, the input's shape and type,
    the opset, simplification and the torch version."""
    h = hashlib.sha256(repr((torch.__version__, opset, simplify, tuple(example.shape[1:]), str(example.dtype),
                             str(module))).encode())
    for name, m in module.named_modules():
        h.update(f"{name}:{type(m).__qualname__}:{getattr(m, 'code', '')}".encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _parity(file: Path, module: nn.Module, example: torch.Tensor, atol: float) -> tuple[float, float]:
    """The largest |ONNX - PyTorch| at batch 1 and 3, and the tolerance: `atol` scaled by the output magnitude."""
    inputs = parity_inputs(example)
    scale = max(1.0, max(float(o.abs().max()) for o in _outputs(module, inputs[-1])))
    return parity(file, module, inputs), atol * scale


def _matches(file: Path, module: nn.Module, example: torch.Tensor, atol: float) -> bool:
    """A cached graph computes what the module computes: its outputs and their shapes, at batch 1 and 3."""
    try:
        diff, tolerance = _parity(file, module, example, atol)
        return diff <= tolerance
    except Exception:  # a stale or unreadable cache entry: export afresh
        return False


def onnx_nodes(path: str | Path) -> int:
    """Nodes in the main graph: on a Jetson at batch 1 each costs a kernel launch, so fewer is faster."""
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)
