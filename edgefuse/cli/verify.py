"""`edgefuse verify`: an ONNX graph, or an exported cascade folder, measured on a data source's test split."""
from __future__ import annotations

from pathlib import Path

import click

from ..base.errors import EdgefuseError, first_line
from .lazy import Default
from .options import CONFIG, echo, splits_of


@click.command()
@click.argument("onnx_file", type=click.Path())
@click.option("--data", "--dataset", "data", default=Default(CONFIG + "data"), show_default=True, metavar="SOURCE",
              help="As for export: a built-in name, a folder, an .npz file or MODULE:FUNCTION.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--batch", "batch_sizes", type=click.IntRange(1, 4096), multiple=True, default=(1,),
              show_default=True, help="Batch size(s) for latency; repeat the option for several.")
def verify(onnx_file: str, data: str, threads: int, batch_sizes: tuple[int, ...]) -> None:
    """Accuracy, NLL and latency of an ONNX model on the dataset's test split (onnxruntime CPU).

    Reads ONNX_FILE (or an exported cascade folder: its cascade.json and two stage graphs, run as two sessions and
    a host loop) and the dataset; writes nothing (prints JSON). Latency is per call over the test inputs in order
    (2 or 3 passes, each call's median), and a cascade's `escalated` says which share ran its second stage."""
    import json

    from ..graph.read import read_onnx
    from ..models.data import BUILTIN, Splits, test_split
    from ..models.fit import check_outputs
    from ..measure.cascade import Cascade, predict_cascade
    from ..measure.metrics import scores
    from ..measure.runners import OrtRunner, predict, stream_latency

    cascade = Path(onnx_file).is_dir()
    if cascade:
        runner = Cascade.load(onnx_file, threads)
    else:
        read_onnx(onnx_file)
        try:
            runner = OrtRunner(onnx_file, threads)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise EdgefuseError(f"cannot load {onnx_file}: {first_line(e)}") from None
    if data in BUILTIN:
        x_test, y_test = test_split(data)
        splits = Splits(data, x_test[:0], None, x_test[:0], y_test[:0], x_test, y_test)
    else:
        splits = splits_of(data, None)
        x_test, y_test = splits.x_test, splits.y_test
    try:
        logits, escalated = predict_cascade(runner, x_test.numpy()) if cascade else (predict(runner, x_test), None)
    except Exception as e:
        raise EdgefuseError(f"{onnx_file} does not run on {data} inputs {tuple(x_test.shape[1:])}: "
                            f"{first_line(e)}") from None
    if logits.ndim != 2:
        raise EdgefuseError(f"{onnx_file}'s output on {data} has shape {tuple(logits.shape)}: expected (batch, "
                            "classes)")
    check_outputs(int(logits.shape[1]), splits, onnx_file)
    result = scores(logits, y_test)
    if cascade:
        result["escalated"] = float(escalated.mean())
    result["latency_ms"] = {str(b): stream_latency(runner, x_test.numpy(), b) for b in batch_sizes}
    echo(json.dumps(result, indent=2))
