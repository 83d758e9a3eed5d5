import numpy as np
import onnx
import pytest
import torch

import edgefuse as ef
from edgefuse import data
from edgefuse.runtime import OrtRunner


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
