"""The batched exact ensemble and batched heads: grouped kernels (or a member axis), same function."""
import re

import onnx
import pytest
import torch

import edgefuse as ef
from edgefuse.fuse.batched import batch_refusals
from edgefuse.models import zoo
from edgefuse.graph.onnx import onnx_nodes

from . import nets

X = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
ARCHS = {"mlp": lambda: zoo.mlp(width=32, depth=2), "cnn-bn": lambda: zoo.cnn(width=4),
         "resnet": lambda: zoo.resnet20(width=4), "depthwise-se": lambda: zoo.mobilenetv2(width=4, expand=2)}


def _members(factory, n=3):
    return [nets.member(factory, seed) for seed in range(n)]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("combine", ["mean", "probs"])
def test_batched_ensemble_is_exact(arch, combine):
    models = _members(ARCHS[arch])
    seq, bat = ef.ensemble(models, combine), ef.ensemble(models, combine, batched=True)
    with torch.no_grad():
        assert _rel(bat(X), seq(X)) <= 1e-5
    assert ef.macs(bat, X) == ef.macs(seq, X)


@pytest.mark.parametrize("factory", [nets.Normed, nets.HiddenCat, nets.Residual, nets.RegNetBlock,
                                     nets.ShuffleNetBlock])
def test_batched_norms_cat_residual_grouped_and_shuffle(factory):
    x = X[:, :, :8, :8]
    models = _members(factory, 4)
    with torch.no_grad():
        assert _rel(ef.ensemble(models, batched=True)(x), ef.ensemble(models)(x)) <= 1e-5


def test_batched_fp16_within_tolerance():
    models = _members(ARCHS["cnn-bn"])
    seq = ef.ensemble(models)
    bat = seq.batch_heads().half()
    with torch.no_grad():
        assert _rel(bat(X.half()).float(), seq(X)) <= 1e-2


def test_batched_heads_equal_unbatched(cnns, digits_split):
    calib, x, _ = digits_split
    spec = ef.permutation_spec(cnns[0], x[:2])
    for k in range(1, len(spec.cut_points) + 1):
        fused = ef.fuse(cnns, spec, depth=k, data=[calib[:200]])
        batched = ef.fuse(cnns, spec, depth=k, data=[calib[:200]], batch_heads=True)
        assert batched.batched and batched.n_heads == len(cnns) and len(batched.heads) == 1
        with torch.no_grad():
            assert _rel(batched(x), fused(x)) <= 1e-5


def test_batched_owns_its_tensors():
    models = _members(ARCHS["cnn-bn"])
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    bat = ef.ensemble(models, batched=True)
    with torch.no_grad():
        for p in bat.parameters():
            p.add_(1.0)
    for m, b in zip(models, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k])


@pytest.mark.parametrize("opset", [17, 18])
def test_batched_onnx_has_fewer_nodes_and_same_outputs(tmp_path, opset):
    import onnxruntime as ort

    models = _members(ARCHS["cnn-bn"], 4)
    seq, bat = ef.ensemble(models), ef.ensemble(models, batched=True)
    p_seq = ef.export_onnx(seq, X[:2], tmp_path / "seq.onnx", opset=opset)
    p_bat = ef.export_onnx(bat, X[:2], tmp_path / "bat.onnx", opset=opset)
    assert onnx.load(str(p_bat)).opset_import[0].version == opset
    assert onnx_nodes(p_bat) * 2 < onnx_nodes(p_seq)
    ops = {n.op_type for n in onnx.load(str(p_bat)).graph.node}
    assert "Loop" not in ops and "Scan" not in ops
    a = ort.InferenceSession(str(p_seq)).run(None, {"input": X[:7].numpy()})[0]
    b = ort.InferenceSession(str(p_bat)).run(None, {"input": X[:7].numpy()})[0]
    assert abs(a - b).max() <= 1e-5 * abs(a).max()


@pytest.mark.parametrize("factory,node", [(nets.HiddenSoftmax, "'softmax'"), (nets.TinyViTBlock, "'(embed|mean)'")])
def test_channel_mixing_ops_have_no_grouped_kernels_and_batch_along_a_member_axis(factory, node):
    models = [factory().eval() for _ in range(2)]
    batched_refusal, grouped = batch_refusals(models)
    assert re.search(node, grouped) and batched_refusal is None
    batched = ef.ensemble(models, batched=True)
    assert batched.heads[0].form == "member axis"
    with torch.no_grad():
        torch.testing.assert_close(batched(X[:5, :, :8, :8]), ef.ensemble(models)(X[:5, :, :8, :8]))
