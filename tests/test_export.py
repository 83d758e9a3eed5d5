import numpy as np
import onnx
import pytest
import torch

import edgefuse as ef
from edgefuse.models import data, zoo
from edgefuse.measure.runners import OrtRunner

from . import nets


@pytest.mark.parametrize("which", ["mlps", "cnns"])
@pytest.mark.parametrize("opset", [None, 17])
def test_fused_onnx_matches_pytorch(which, opset, request, digits_split, tmp_path):
    models = request.getfixturevalue(which)
    calib, x, _ = digits_split
    spec = ef.permutation_spec(models[0], x[:2])
    fused = ef.fuse(ef.align(models, spec), spec, depth=2, data=data.batches(calib))
    path = ef.export_onnx(fused, x[:2], tmp_path / "m.onnx", opset=opset)
    proto = onnx.load(str(path))
    assert not list(tmp_path.glob("*.data")) and len(list(tmp_path.iterdir())) == 1  # one self-contained file
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == (opset or 18)
    runner = OrtRunner(path)
    with torch.no_grad():
        for b in (1, 3, 7):
            np.testing.assert_allclose(runner(x[:b].numpy()), fused(x[:b]).numpy(), atol=1e-4, rtol=1e-4)


def test_export_failure_leaves_previous_file(mlps, digits_split, tmp_path):
    _, x, _ = digits_split
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"previous")

    class Stateful(torch.nn.Module):
        """Python state is baked into the graph at export, so the ONNX output drifts from PyTorch's."""

        calls = 0

        def forward(self, x):
            self.calls += 1
            return x.flatten(1) * self.calls

    with pytest.raises(ef.EdgefuseError, match="differs from PyTorch"):
        ef.export_onnx(Stateful(), x[:2], dest)
    assert dest.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


ZOO = {"mlp": lambda: zoo.mlp(width=16, depth=2), "cnn": lambda: zoo.cnn(width=4),
       "resnet20": lambda: zoo.resnet20(width=4), "mobilenetv2": lambda: zoo.mobilenetv2(width=4, expand=2)}


@pytest.mark.parametrize("arch", list(ZOO))
@pytest.mark.parametrize("batched", [False, True])
def test_every_zoo_architecture_exports_fused(arch, batched, tmp_path):
    """Parity is checked inside export_onnx at batch 1 and 3; here the file also runs at batch 7."""
    models = [nets.member(ZOO[arch], s) for s in range(3)]
    x = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    spec = ef.permutation_spec(models[0], x[:2])
    fused = ef.fuse(models, spec, depth=len(spec.cut_points) // 2, data=[x], batch_heads=batched)
    path = ef.export_onnx(fused, x[:2], tmp_path / "m.onnx", opset=17 if batched else None)
    with torch.no_grad():
        np.testing.assert_allclose(OrtRunner(path)(x.numpy()), fused(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batched", [False, True])
def test_head_outputs_beside_the_mean(cnns, digits_split, tmp_path, batched):
    import onnxruntime as ort

    calib, x, _ = digits_split
    spec = ef.permutation_spec(cnns[0], x[:2])
    fused = ef.fuse(cnns, spec, depth=2, data=[calib[:200]], batch_heads=batched, head_outputs=True)
    path = ef.export_onnx(fused, x[:2], tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path))
    assert [o.name for o in sess.get_outputs()] == ["logits", "head_logits"]
    mean, heads = sess.run(None, {"input": x[:5].numpy()})
    assert heads.shape == (5, len(cnns), 10)
    np.testing.assert_allclose(heads.mean(1), mean, atol=1e-5)
    plain = ef.fuse(cnns, spec, depth=2, data=[calib[:200]])
    with torch.no_grad():
        np.testing.assert_allclose(mean, plain(x[:5]).numpy(), atol=1e-4)


@pytest.mark.parametrize("net", [nets.StochasticDepthBlock, nets.RegNetBlock, nets.BlockGroupNorm])
def test_stochastic_depth_and_grouped_blocks_fuse_at_every_depth_and_alpha_with_parity(net, tmp_path):
    models = [nets.member(net, s) for s in range(3)]
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    spec = ef.permutation_spec(models[0], x[:2])
    aligned = ef.align(models, spec)
    points = [{"depth": d} for d in range(len(spec.cut_points) + 1)] + [{"alpha": a} for a in (0.25, 0.5)]
    for kw in points:
        fused = ef.fuse(aligned, spec, data=[x], **kw)
        path = ef.export_onnx(fused, x[:2], tmp_path / "m.onnx")
        with torch.no_grad():
            np.testing.assert_allclose(OrtRunner(path)(x.numpy()), fused(x).numpy(), atol=1e-4, rtol=1e-4)


def test_a_shufflenet_stage_fuses_at_every_depth_and_alpha_with_batched_heads_and_parity(tmp_path):
    models = [nets.member(nets.ShuffleNetBlock, s) for s in range(3)]
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    spec = ef.permutation_spec(models[0], x[:2])
    aligned = ef.align(models, spec)
    for depth in range(len(spec.cut_points) + 1):
        fused = ef.fuse(aligned, spec, depth=depth, data=[x], batch_heads=True)
        path = ef.export_onnx(fused, x[:2], tmp_path / "m.onnx")
        with torch.no_grad():
            np.testing.assert_allclose(ef.fuse(aligned, spec, depth=depth, data=[x])(x).numpy(), fused(x).numpy(),
                                       atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(OrtRunner(path)(x.numpy()), fused(x).numpy(), atol=1e-4, rtol=1e-4)
    for alpha in (0.25, 0.5):
        fused = ef.fuse(aligned, spec, alpha=alpha, data=[x])
        path = ef.export_onnx(fused, x[:2], tmp_path / "m.onnx")
        with torch.no_grad():
            np.testing.assert_allclose(OrtRunner(path)(x.numpy()), fused(x).numpy(), atol=1e-4, rtol=1e-4)
