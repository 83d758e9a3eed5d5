"""α graphs as dense layers where that is cheap: the same function, fewer operators, and at most DENSE_MAX× the
MACs of the blocks it replaces."""
import copy

import pytest
import torch

import edgefuse as ef
from edgefuse.fuse.dense import DENSE_MAX, densify
from edgefuse.fuse.neuron import MixedLayer
from edgefuse.measure.metrics import macs

from .test_alpha import ARCHS, X, _aligned


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_a_densified_alpha_model_computes_the_same_function(arch, alpha):
    aligned, spec = _aligned(arch)
    fused = ef.fuse(aligned, spec, alpha=alpha, repair=None, dense=False)
    dense = copy.deepcopy(fused)
    changed = densify(dense)
    with torch.no_grad():
        a, b = fused(X), dense(X)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
    mixed = [m for m in dense.modules() if isinstance(m, MixedLayer)]
    assert len(mixed) == sum(isinstance(m, MixedLayer) for m in fused.modules()) - changed
    assert macs(dense, X) <= DENSE_MAX * macs(fused, X)


def test_a_small_share_of_isolated_units_leaves_one_kernel_per_layer(cnns, digits_split, tmp_path):
    onnx = pytest.importorskip("onnx")
    from edgefuse.graph.onnx import export_onnx

    calib, x, _ = digits_split
    spec = ef.permutation_spec(cnns[0], x[:2])
    fused = ef.fuse(ef.align(cnns, spec), spec, alpha=0.1, data=[calib[:200]], repair="bn", dense=False)
    dense = ef.fuse(ef.align(cnns, spec), spec, alpha=0.1, data=[calib[:200]], repair="bn")  # dense by default
    changed = sum(isinstance(m, MixedLayer) for m in fused.modules()) - \
        sum(isinstance(m, MixedLayer) for m in dense.modules())
    assert changed and not any(isinstance(m, MixedLayer) for m in dense.modules()
                               if getattr(m, "from_isolated", None) is not None)
    nodes = {name: len(onnx.load(export_onnx(m, x[:2], tmp_path / f"{name}.onnx")).graph.node)
             for name, m in (("blocks", fused), ("dense", dense), ("member", cnns[0]))}
    assert nodes["dense"] == nodes["member"] < nodes["blocks"]  # BatchNorm folded, no slices or concatenations


@pytest.mark.parametrize("dense_is_faster", [True, False])
def test_the_alpha_form_that_times_faster_is_kept(dense_is_faster, tmp_path, monkeypatch):
    """run/forms.faster_form times the α model and its all-dense copy and keeps the faster; either computes the
    same function; its scratch graphs are removed; a TensorRT target keeps the model as built."""
    from dataclasses import replace

    from edgefuse.models.data import Splits
    from edgefuse.run import forms
    from edgefuse.targets import load_target

    aligned, spec = _aligned("cnn-bn")
    fused = ef.fuse(aligned, spec, alpha=0.5, repair=None)
    y = torch.zeros(len(X), dtype=torch.long)
    splits = Splits("x", X, y, X, y, X, y)
    timed = []

    def fake(runner, x, batch, passes):
        dense = runner.graphs[0].name.endswith("-dense.onnx")
        timed.append((dense, batch, passes))
        return {"p50": 1.0 if dense == dense_is_faster else 2.0}

    monkeypatch.setattr(forms, "stream_latency", fake)
    cpu = load_target("cpu-ort")
    kept, form = forms.faster_form(fused, splits, cpu, tmp_path / "a")
    assert form == ("dense" if dense_is_faster else "blocks") and (kept is fused) != dense_is_faster
    assert sorted(timed) == sorted((d, b, forms.FORM_PASSES) for d in (True, False) for b in cpu.batch_sizes)
    with torch.no_grad():
        a, b = fused(X), kept(X)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
    assert not list(tmp_path.iterdir())
    assert forms.faster_form(fused, splits, replace(cpu, runtime="tensorrt"), tmp_path / "a") == (fused, "blocks")
