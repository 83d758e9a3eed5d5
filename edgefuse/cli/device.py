"""CLI commands of the device stage: the static TensorRT check and the engine build."""
from __future__ import annotations

from pathlib import Path

import click

from ..base.errors import EdgefuseError
from ..base.files import claimed


@click.command()
@click.argument("onnx_file", type=click.Path())
@click.option("--target", required=True, help="A TensorRT target: a name in targets/ or a .toml path.")
@click.option("--json", "as_json", is_flag=True, help="Print the check as JSON.")
def check(onnx_file: str, target: str, as_json: bool) -> None:
    """Static TensorRT check: opset, operators and their types, DLA fallbacks, batch profile.

    Reads ONNX_FILE and the target; writes nothing. Exits 1 when the model cannot build for that target."""
    import json

    from ..device.check import check_onnx, format_report
    from ..targets import load_target

    if not Path(onnx_file).is_file():
        raise EdgefuseError(f"ONNX file not found: {onnx_file}")
    report = check_onnx(onnx_file, load_target(target))
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else format_report(report))
    if not report.ok:
        raise EdgefuseError(f"{onnx_file} will not build for {report.target}: {report.errors[0]}")


@click.command()
@click.argument("onnx_file", type=click.Path())
@click.option("--target", required=True, help="A TensorRT target: a name in targets/ or a .toml path.")
@click.option("-o", "--out", type=click.Path(dir_okay=False), required=True, help="Engine file to write.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None, help="Timing cache to reuse/update.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def build(onnx_file: str, target: str, out: str, timing_cache: str | None, force: bool) -> None:
    """Build a TensorRT engine here (needs an NVIDIA GPU and `pip install 'edgefuse[tensorrt]'`).

    Reads ONNX_FILE and the target; writes OUT (and the timing cache). On a Jetson, the bundle's deploy.py does
    the same without edgefuse installed."""
    from ..device.stage import build_engine
    from ..device.check import check_onnx
    from ..targets import load_target

    if not Path(onnx_file).is_file():
        raise EdgefuseError(f"ONNX file not found: {onnx_file}")
    tgt = load_target(target)
    report = check_onnx(onnx_file, tgt)
    if not report.ok:
        raise EdgefuseError(f"{onnx_file} will not build for {tgt.name}: {report.errors[0]}")
    with claimed(Path(out), force):
        click.echo(str(build_engine(onnx_file, tgt, out, timing_cache)))
