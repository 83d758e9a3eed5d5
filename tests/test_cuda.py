"""The cuda runtime: real checks on a GPU, a clear one-line refusal everywhere else."""
import subprocess
import sys

import pytest
import torch

import edgefuse as ef
from edgefuse.models import zoo
from edgefuse.measure.cuda import CudaRunner

from . import nets

HAS_CUDA = torch.cuda.is_available()
NO_GPU = "no CUDA GPU on this machine (CI never has one); run `make gpu-check` on a GPU machine"


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU: the refusal path cannot be exercised")
def test_cuda_runner_refuses_without_a_gpu():
    with pytest.raises(ef.EdgefuseError, match="no CUDA GPU"):
        CudaRunner(zoo.mlp(width=8, depth=1))


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU: the refusal path cannot be exercised")
def test_gpu_check_without_a_gpu_is_one_line():
    res = subprocess.run([sys.executable, "-m", "edgefuse.jobs.gpucheck"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "no CUDA GPU" in res.stderr


@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", 1e-2)])
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_runner_matches_cpu(precision, tol, graphs):
    models = [nets.member(lambda: zoo.cnn(width=4), s) for s in range(3)]
    ens = ef.ensemble(models, batched=True)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        ref = ens(x)
    runner = CudaRunner(ens, precision, graphs=graphs)
    got = torch.from_numpy(runner(x.numpy()))
    assert float((got - ref).abs().max() / ref.abs().max()) <= tol
    lat = runner.latency(x.numpy(), budget_s=0.05)
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"]


@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_cuda_peak_memory_counts_weights_and_grows_with_batch():
    ens = ef.ensemble([nets.member(lambda: zoo.cnn(width=8), s) for s in range(2)], batched=True)
    runner = CudaRunner(ens, "fp32", graphs=False)
    weights = sum(p.numel() * 4 for p in ens.parameters()) / 2**20
    small, big = (runner.peak_memory_mb(torch.rand(b, 1, 28, 28).numpy()) for b in (1, 256))
    assert weights < small < big


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU: the refusal path cannot be exercised")
def test_an_export_for_a_cuda_target_without_a_gpu_is_one_line_and_writes_nothing(cnn_checkpoints, tmp_path):
    from click.testing import CliRunner

    from edgefuse.cli import cli

    res = CliRunner().invoke(cli, ["-q", "export", "--model", "tests.nets:digits_cnn", *cnn_checkpoints,
                                   "--dataset", "digits", "--target", "desktop-cuda", "--out-root", str(tmp_path)])
    assert res.exit_code == 1 and "no CUDA GPU" in res.output and len(res.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_an_export_for_a_cuda_target_is_measured_on_the_gpu_and_renders(cnn_checkpoints, tmp_path):
    import json

    from click.testing import CliRunner

    from edgefuse.cli import cli

    res = CliRunner().invoke(cli, ["-q", "export", "--model", "tests.nets:digits_cnn", *cnn_checkpoints,
                                   "--dataset", "digits", "--target", "desktop-cuda", "--out-root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "desktop-cuda"
    report = json.loads((out / "report.json").read_text())
    assert all(c["runtime"].startswith("cuda:") for c in report["candidates"])
    assert report["budget"]["latency_ms"] == {"1": 0.25, "32": 0.5, "256": 2.0}
    assert "edgefuse report: desktop-cuda" in (out / "report.md").read_text() and (out / "model.onnx").is_file()
