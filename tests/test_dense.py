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
    from edgefuse.run.forms import built_form

    assert built_form(dense) == "dense" and built_form(fused) == "blocks"  # as the report names the row's form


@pytest.mark.parametrize("fastest", ["blocks", "dense", "branches"])
def test_the_alpha_form_that_times_fastest_is_kept(fastest, tmp_path, monkeypatch):
    """run/forms.faster_form times the α model in each graph form and keeps the fastest; every form computes the
    same function; its scratch graphs are removed; a TensorRT target keeps the model as built."""
    from dataclasses import replace

    from edgefuse.run import forms

    fused, splits, cpu, timed = _timed_forms(monkeypatch, fastest)
    kept, form = forms.faster_form(fused, splits, cpu, tmp_path / "a")
    assert form == fastest and (kept is fused) == (fastest == "blocks")
    assert sorted(timed) == sorted((f, b, forms.FORM_PASSES) for f in ("blocks", "dense", "branches")
                                   for b in cpu.batch_sizes)
    with torch.no_grad():
        a, b = fused(X), kept(X)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
    assert not list(tmp_path.iterdir())
    assert forms.faster_form(fused, splits, replace(cpu, runtime="tensorrt"), tmp_path / "a") == (fused, "blocks")


@pytest.mark.parametrize("alpha", [0.25, 0.75])
def test_an_alpha_model_in_branches_computes_the_same_function_with_the_same_macs(alpha, tmp_path):
    """fuse/branches.py: each member's isolated units as one convolution over its inputs; the exported graph
    computes it too, with one add fewer per layer changed."""
    onnx = pytest.importorskip("onnx")
    from edgefuse.fuse.branches import BranchLayer, branch
    from edgefuse.graph.onnx import export_onnx

    aligned, spec = _aligned("cnn-bn")
    fused = ef.fuse(aligned, spec, alpha=alpha, repair=None, dense=False)
    branched = copy.deepcopy(fused)
    changed = branch(branched)
    assert changed == sum(isinstance(m, BranchLayer) for m in branched.modules()) > 0
    with torch.no_grad():
        a, b = fused(X), branched(X)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
    assert macs(branched, X) == macs(fused, X)
    ops = {name: [n.op_type for n in onnx.load(export_onnx(m, X[:2], tmp_path / f"{name}.onnx")).graph.node]
           for name, m in (("blocks", fused), ("branches", branched))}
    assert ops["branches"].count("Add") == ops["blocks"].count("Add") - changed
    assert ops["branches"].count("Gather") == len(aligned) * changed


def test_a_form_outside_the_macs_budget_is_not_timed_where_another_fits(tmp_path, monkeypatch):
    """The all-dense copy multiplies zeros: under a MACs cap the blocks meet and it does not, it is never timed or
    kept, however fast it would be; where no form fits the cap, every form is timed."""
    from edgefuse.run import forms

    fused, splits, cpu, timed = _timed_forms(monkeypatch, "dense")
    blocks = macs(fused, X[:1])
    assert forms.faster_form(fused, splits, cpu, tmp_path / "a", macs_cap=blocks)[1] in ("blocks", "branches")
    assert "dense" not in {f for f, _, _ in timed} and {"blocks", "branches"} <= {f for f, _, _ in timed}
    assert forms.faster_form(fused, splits, cpu, tmp_path / "a", macs_cap=blocks / 2)[1] == "dense"


def _timed_forms(monkeypatch, fastest: str):
    """An α 0.5 model, its data, the cpu-ort target and the list of (form, batch, passes) a scripted timer, under
    which `fastest` is the fastest form, is asked for."""
    from edgefuse.models.data import Splits
    from edgefuse.run import forms
    from edgefuse.targets import load_target

    aligned, spec = _aligned("cnn-bn")
    fused = ef.fuse(aligned, spec, alpha=0.5, repair=None)
    y = torch.zeros(len(X), dtype=torch.long)
    timed = []

    def fake(runner, x, batch, passes):
        form = runner.graphs[0].name.rsplit("-", 1)[1].removesuffix(".onnx")
        timed.append((form, batch, passes))
        return {"p50": 1.0 if form == fastest else 2.0}

    monkeypatch.setattr(forms, "stream_latency", fake)
    return fused, Splits("x", X, y, X, y, X, y), load_target("cpu-ort"), timed
