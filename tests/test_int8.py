"""INT8 QDQ graphs: calibrated on training inputs only, per-channel weight scales, close to FP32, weighed as
candidates next to the FP32 ones."""
import dataclasses

import numpy as np
import onnx
import pytest
import torch

import edgefuse as ef
from edgefuse.run.points import export_and_measure
from edgefuse.targets import load_target
from edgefuse.models.data import load_dataset
from edgefuse.graph.int8 import CALIBRATION_IMAGES, quantize_int8, reference_parity
from edgefuse.measure.runners import OrtRunner

from . import nets


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    model = nets.member(nets.digits_cnn, 0)
    x = load_dataset("digits").x_test[:4]
    return model, ef.export_onnx(model, x, tmp_path_factory.mktemp("int8") / "m.onnx")


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """No input normalisation: the first quantizer sees the images themselves."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 10)).eval()
    return model, ef.export_onnx(model, torch.rand(4, 1, 8, 8), tmp_path_factory.mktemp("bare") / "m.onnx")


def _input_scale(path) -> float:
    model = onnx.load(str(path))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    first = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == model.graph.input[0].name)
    return float(init[first.input[1]])


def test_activation_scales_come_from_the_calibration_images_only(bare, tmp_path):
    _, path = bare
    x = torch.rand(CALIBRATION_IMAGES + 100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x[CALIBRATION_IMAGES:] *= 10  # beyond the images used: must not widen any range
    q = quantize_int8(path, x, tmp_path / "q.onnx")
    assert q.calibration_images == CALIBRATION_IMAGES and q.summary()["calibration"]["split"] == "train"
    assert _input_scale(q.path) == pytest.approx(float(x[:CALIBRATION_IMAGES].abs().max()) / 127, rel=1e-6)


def test_a_candidate_calibrates_on_the_training_split(bare, tmp_path):
    model, _ = bare
    splits = load_dataset("digits")
    halved = dataclasses.replace(splits, x_train=splits.x_train * 0.5)  # unlike validation and test images
    row = export_and_measure(model, halved, tmp_path / "c.onnx", load_target("cpu-ort"), "int8", key="c",
                             label="c", kind="member")
    assert row.precision == "int8" and row.quantization["calibration"]["images"] == CALIBRATION_IMAGES
    assert _input_scale(row.file) == pytest.approx(float(halved.x_train[:CALIBRATION_IMAGES].abs().max()) / 127,
                                                   rel=1e-6)


def test_weight_scales_are_per_output_channel(fp32, tmp_path):
    model, path = fp32
    torch_convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    graph = onnx.load(str(quantize_int8(path, torch.rand(64, 1, 8, 8), tmp_path / "q.onnx").path)).graph
    init = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    dequant = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == len(torch_convs)
    for conv, layer in zip(convs, torch_convs):
        weight = dequant[conv.input[1]]
        assert init[weight.input[0]].shape[0] == layer.out_channels
        assert init[weight.input[1]].shape == (layer.out_channels,)


def test_the_int8_graph_of_a_random_net_stays_close_to_fp32(fp32, tmp_path):
    _, path = fp32
    splits = load_dataset("digits")
    q = quantize_int8(path, splits.x_train, tmp_path / "q.onnx")
    x = splits.x_test[:256].numpy()
    ours, ref = OrtRunner(q.path)(x), OrtRunner(path)(x)
    assert np.abs(ours - ref).max() <= 0.05 * np.abs(ref).max()
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert reference_parity(q.path, x[:16]) <= 0.05 * np.abs(ref).max()  # ORT's INT8 kernels = QDQ arithmetic


def test_keep_ends_leaves_the_first_and_last_layer_in_fp32(fp32, tmp_path):
    _, path = fp32
    q = quantize_int8(path, torch.rand(64, 1, 8, 8), tmp_path / "q.onnx", keep_ends=True)
    graph = onnx.load(str(q.path)).graph
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert len(q.kept_higher) == 2 and {weighted[0].name, weighted[-1].name} == set(q.kept_higher)
    assert weighted[0].input[1] not in dequantized and weighted[-1].input[1] not in dequantized  # FP32 weights
    assert all(n.input[1] in dequantized for n in weighted[1:-1])


def test_the_int8_graph_passes_every_tensorrt_targets_static_check(fp32, tmp_path):
    from edgefuse.device.check import check_onnx
    from edgefuse.targets import available_targets, load_target

    model, _ = fp32
    x = load_dataset("digits").x_test[:4]
    targets = [t for t in map(load_target, available_targets()) if t.runtime == "tensorrt"]
    assert len(targets) >= 5
    for target in targets:
        path = ef.export_onnx(model, x, tmp_path / f"{target.name}.onnx", opset=target.opset)
        q = quantize_int8(path, torch.rand(64, 1, 8, 8), tmp_path / f"{target.name}-int8.onnx")
        report = check_onnx(q.path, target)
        assert report.ok, (target.name, report.errors)
        assert {"QuantizeLinear", "DequantizeLinear"} <= set(report.operators)
