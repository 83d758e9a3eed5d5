"""graph/onnx.py's export cache: a module exported before is not exported again, a changed module is, and a cache
entry that no longer computes what the module computes is replaced, never shipped."""
import pytest
import torch
from torch import nn

from edgefuse.base.errors import EdgefuseError
from edgefuse.graph import onnx as graph_onnx

pytest.importorskip("onnx")
X = torch.rand(2, 1, 8, 8)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()


def test_a_module_exported_before_is_reused_and_a_changed_one_is_exported(tmp_path, monkeypatch):
    cache, calls = tmp_path / "cache", []
    export = graph_onnx._export
    monkeypatch.setattr(graph_onnx, "_export", lambda *a: (calls.append(1), export(*a))[1])
    first = graph_onnx.export_onnx(_net(0), X, tmp_path / "a.onnx", cache=cache)
    again = graph_onnx.export_onnx(_net(0), X, tmp_path / "b.onnx", cache=cache)
    assert len(calls) == 1 and first.read_bytes() == again.read_bytes()
    graph_onnx.export_onnx(_net(1), X, tmp_path / "c.onnx", cache=cache)  # other weights: another graph
    assert len(calls) == 2 and len(list(cache.iterdir())) == 2


def test_a_cache_entry_that_computes_something_else_is_replaced(tmp_path):
    cache = tmp_path / "cache"
    graph_onnx.export_onnx(_net(0), X, tmp_path / "a.onnx", cache=cache)
    other = graph_onnx.export_onnx(_net(1), X, tmp_path / "other.onnx")
    (entry,) = cache.iterdir()
    entry.write_bytes(other.read_bytes())  # the right name, another network's graph
    out = graph_onnx.export_onnx(_net(0), X, tmp_path / "b.onnx", cache=cache)
    assert graph_onnx.parity(out, _net(0), graph_onnx.parity_inputs(X)) < 1e-4
    assert entry.read_bytes() == out.read_bytes()  # the entry now holds the right graph


def test_a_graph_the_torchscript_exporter_gets_wrong_comes_from_the_dynamo_exporter(tmp_path, monkeypatch):
    """The first exporter's graph is accepted only if it gives the module's outputs; opset 17 has no second one."""
    export, used = graph_onnx._export, []

    def frozen_batch(module, example, path, opset, dynamo):  # the TorchScript graph runs at batch 2 only
        used.append(dynamo)
        return export(module if dynamo else _FrozenBatch(module), example, path, opset, dynamo)

    monkeypatch.setattr(graph_onnx, "_export", frozen_batch)
    path = graph_onnx.export_onnx(_net(0), X, tmp_path / "a.onnx")
    assert used == [False, True] and graph_onnx.parity(path, _net(0), [X[:1], X[:3]]) < 1e-4
    with pytest.raises(EdgefuseError, match="does not run|differs from PyTorch"):
        graph_onnx.export_onnx(_net(0), X, tmp_path / "b.onnx", opset=17)
    assert not (tmp_path / "b.onnx").exists()


class _FrozenBatch(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.reshape(2, *x.shape[1:]))


class _Branchy(nn.Module):
    """Which layer runs depends on the input's values: a trace holds one branch only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _net(0), _net(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.mean() > -1 else self.b(x)  # inputs in [0, 1] never take b


def test_a_trace_that_froze_a_branch_is_not_shipped_where_another_exporter_can_try(tmp_path, monkeypatch):
    """The parity inputs take one branch, so the traced graph passes parity; the tracer's warning sends the export
    to the dynamo exporter, which refuses the data-dependent branch in one line instead of freezing it."""
    export, used = graph_onnx._export, []

    def record(module, example, path, opset, dynamo):
        used.append(dynamo)
        return export(module, example, path, opset, dynamo)

    monkeypatch.setattr(graph_onnx, "_export", record)
    with pytest.raises(EdgefuseError, match="ONNX export failed"):
        graph_onnx.export_onnx(_Branchy().eval(), X, tmp_path / "a.onnx")
    assert used == [False, True] and not (tmp_path / "a.onnx").exists()
    assert graph_onnx.parity(graph_onnx.export_onnx(_Branchy().eval(), X, tmp_path / "b.onnx", opset=17),
                             _Branchy().eval(), [X]) < 1e-4  # opset 17 has one exporter: its parity-checked trace
