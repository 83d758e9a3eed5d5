"""Vision Transformers through the pipeline: aligned, fused at block boundaries, repaired, exported and chosen."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import edgefuse as ef
from edgefuse.cli.main import cli
from edgefuse.device.check import check_onnx
from edgefuse.fuse import fuse
from edgefuse.fuse.batched import batch_refusals
from edgefuse.fuse.stacked import stack_models
from edgefuse.graph.onnx import export_onnx
from edgefuse.measure.metrics import macs
from edgefuse.models import data, zoo
from edgefuse.targets import load_target

from . import attention_nets as an
from .conftest import save_checkpoints, train_digits
from .nets import randomize_bn


@pytest.fixture(scope="module")
def vits():
    return train_digits(an.digits_vit, 3, epochs=15)


def test_the_zoo_vit_has_a_spec_that_keeps_its_function_and_a_cut_at_every_half_block():
    model = an.randomize_norms(zoo.build("vit", width=32).eval(), 0)
    x = torch.rand(2, 1, 28, 28)
    spec = ef.permutation_spec(model, x)
    assert len(spec.cut_points) == 2 * 4 + 2 and {f.blocks for f in spec.families} == {4}
    permuted = ef.permute(model, spec, spec.random_perms(1))
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_alignment_keeps_each_vit_and_lsq_brings_the_fused_vit_closer_to_the_ensemble(vits, method):
    x, y = data.digits()
    calib, held = [x[i:i + 100] for i in range(0, 1000, 100)], x[1000:]
    spec = ef.permutation_spec(vits[0], x[:2])
    aligned = ef.align(vits, spec, method=method, data=calib)
    with torch.no_grad():
        for a, m in zip(aligned, vits):
            torch.testing.assert_close(a(held), m(held), atol=1e-4, rtol=1e-4)
        reference = ef.ensemble(vits)(held)
        torch.testing.assert_close(fuse(aligned, spec, depth=0)(held), reference)
        for depth in (2, len(spec.cut_points)):
            plain = fuse(aligned, spec, depth=depth, repair=None)(held)
            repaired = fuse(aligned, spec, depth=depth, data=calib, repair="lsq")(held)
            assert (repaired - reference).pow(2).mean() < (plain - reference).pow(2).mean()


def test_a_fused_vit_exports_with_parity(vits, tmp_path):
    x, _ = data.digits()
    spec = ef.permutation_spec(vits[0], x[:2])
    aligned = ef.align(vits, spec, method="weight")
    model = fuse(aligned, spec, depth=3, data=[x[:200]], repair="lsq")
    path = export_onnx(model, x[:2], tmp_path / "vit.onnx", 17)
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x[1000:1064].numpy()})[0]
    with torch.no_grad():
        ref = model(x[1000:1064]).numpy()
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    report = check_onnx(path, load_target("jetson-orin-nano-jp6"))  # TensorRT parses every op a ViT graph uses
    assert report.ok, report.errors
    assert {"LayerNormalization", "Softmax", "MatMul"} <= set(report.operators)


@pytest.mark.parametrize("combine", ["mean", "probs"])
def test_a_vit_ensemble_batched_along_a_member_axis_is_the_ensemble(vits, combine, tmp_path):
    x, _ = data.digits()
    batched_refusal, grouped = batch_refusals(vits)
    assert grouped is not None and batched_refusal is None  # attention: no grouped kernels, but a member axis
    ens = ef.ensemble(vits, combine=combine, head_outputs=True)
    batched = ens.batch_heads()
    assert batched.batched and batched.heads[0].form == "member axis"
    with torch.no_grad():
        (a, heads_a), (b, heads_b) = ens(x[1000:1100]), batched(x[1000:1100])
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(heads_b, heads_a, atol=1e-5, rtol=1e-5)
    path = export_onnx(batched, x[:2], tmp_path / "batched.onnx", 17)
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x[1000:1032].numpy()})[0]
    np.testing.assert_allclose(out, a[:32].numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [lambda: an.TinyViT(an.TimmAttention), lambda: an.TinyViT(an.HandAttention),
                                  an.ConvNeXtBlock, an.LayerScaleBlock, lambda: zoo.resnet20(width=4),
                                  lambda: zoo.mobilenetv2(width=4)],
                         ids=["timm-style", "by hand", "channels-last", "layer scale", "resnet20", "mobilenetv2"])
def test_the_member_axis_form_computes_every_member(make):
    """The stacked rewrite alone (batch_models picks grouped kernels where they exist), on nets of every kind."""
    torch.manual_seed(0)
    models = [an.randomize_norms(randomize_bn(make(), i).eval(), i) for i in range(3)]
    x = torch.rand(4, 1, 28, 28) if make in (an.ConvNeXtBlock,) or "resnet" in str(make) or "mobile" in str(make) \
        else torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        (a, heads_a), (b, heads_b) = ef.ensemble(models, head_outputs=True)(x), stack_models(models, "mean", True)(x)
    torch.testing.assert_close(heads_b, heads_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_export_of_vits_ships_a_non_dominated_model_with_fused_rows(vits, tmp_path):
    paths = save_checkpoints(vits, tmp_path)
    res = CliRunner().invoke(cli, ["-q", "export", "--model", "tests.attention_nets:digits_vit", *paths, "--dataset",
                                   "digits", "--out-root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "cpu-ort" / "report.json").read_text())
    fused = [c for c in report["candidates"] if c["kind"] == "fused"]
    assert fused and all(c["depth"] for c in fused) and all(c["latency_by_batch"] for c in fused)
    assert report["ensemble_batched"]["label"].startswith("ensemble, batched (member axis)")
    assert report["batched_heads"] and not any(c["alpha"] for c in report["candidates"])  # alpha: no grouped form
    assert report["parity"]["max_abs_diff"] < 1e-4
    shipped = next(c for c in report["candidates"] if c["key"] == report["shipped"]["key"])
    if shipped["dominated_by"] is not None:  # only within noise: a member tied with what would ship, as fast
        assert shipped["kind"] in ("member", "distilled member") and "not clearly slower" in report["shipped"]["reason"]


def test_a_batched_vit_costs_the_macs_of_its_members(vits):
    x, _ = data.digits()
    member = macs(vits[0], x[:1])
    assert member > 0 and macs(ef.ensemble(vits).batch_heads(), x[:1]) == len(vits) * member
    spec = ef.permutation_spec(vits[0], x[:2])
    full = fuse(ef.align(vits, spec, method="weight"), spec, depth=len(spec.cut_points), repair=None)
    assert macs(full.batch_heads(), x[:1]) == member  # the full merge's heads are the N final Linears, averaged


@pytest.mark.skipif(an.torchvision_vit() is None, reason="torchvision's models do not import here")
def test_torchvision_vits_batch_along_a_member_axis_with_their_macs(tmp_path):
    """nn.MultiheadAttention as one stacked layer; its projections count as MACs in the members and the batch."""
    models = an.torchvision_vits(3)
    x = torch.rand(5, 3, 8, 8)
    ens = ef.ensemble(models, head_outputs=True)
    batched = ens.batch_heads()
    assert batched.heads[0].form == "member axis"
    with torch.no_grad():
        (a, heads_a), (b, heads_b) = ens(x), batched(x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(heads_b, heads_a, atol=1e-5, rtol=1e-4)
    attention = 2 * 4 * 16 * 16 * 17  # 2 blocks, 4·E² per token, 17 tokens
    assert macs(batched, x[:1]) == macs(ens, x[:1]) == 3 * macs(models[0], x[:1]) and macs(models[0], x[:1]) > attention
    path = export_onnx(batched, x[:2], tmp_path / "tv.onnx", 18)
    session = ort.InferenceSession(str(path))
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], a.numpy(),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(an.torchvision_vit() is None, reason="torchvision's models do not import here")
def test_activation_matching_of_multihead_attention_falls_back_to_weight_matching(capsys):
    """Q, K and V inside nn.MultiheadAttention never appear in the graph: weight matching aligns them, said once."""
    models = an.torchvision_vits(2, layers=1, heads=2, width=8)
    x = torch.rand(8, 3, 8, 8)
    spec = ef.permutation_spec(models[0], x)
    perms = ef.align_perms(models, spec, method="activation", data=[x])
    assert "weight matching aligns these models instead" in capsys.readouterr().err
    expected = ef.align_perms(models, spec, method="weight")
    assert all(torch.equal(perms[1][g], expected[1][g]) for g in spec.groups)
