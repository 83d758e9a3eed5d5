"""Thin click layer over the library: each command says what it reads and what it writes."""
from __future__ import annotations

import errno
import sys
from pathlib import Path

import click

from ..base.errors import EdgefuseError, first_line
from ..base.files import claimed
from .lazy import Default, RegistryChoice, cli_names
from .options import (ARCHS, CONFIG, cli_models, echo, partition_option, run_config_of, splits_of,
                      with_finetunes, with_models)

METHODS = RegistryChoice("edgefuse.align:METHODS")
REPAIRS = RegistryChoice("edgefuse.fuse.repair:REPAIRS")
GRID_REPAIRS = RegistryChoice("edgefuse.fuse.repair:REPAIRS", lambda r: [k for k, m in r.items() if m.in_grid])


DEBUG = {"on": False}


SYSTEM_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE}


class Cli(click.Group):
    """Errors a user can cause are one line on stderr with exit 1; --debug shows the traceback instead."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except EdgefuseError as e:
            if DEBUG["on"]:
                raise
            echo(f"edgefuse: error: {e}", err=True)
            sys.exit(1)
        except Exception as e:  # a bug: still one line, with the way to see more
            if DEBUG["on"]:
                raise
            if isinstance(e, OSError) and e.errno in SYSTEM_ERRNOS:  # the disk or permissions, not a bug
                echo(f"edgefuse: error: {e.strerror}" + (f": {e.filename}" if e.filename else ""), err=True)
                sys.exit(1)
            echo(f"edgefuse: internal error: {type(e).__name__}: {first_line(e)} (rerun with --debug for the "
                  "traceback)", err=True)
            sys.exit(3)


def _show(md: str) -> None:
    """The report's table: rendered by rich on a terminal, plain Markdown when piped."""
    import sys

    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markdown import Markdown
        Console().print(Markdown(md))
    else:
        echo(md)


def _console(quiet: bool):
    from rich.console import Console
    return Console(stderr=True, quiet=quiet)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """edgefuse: align N models of one architecture, fuse them into a shared trunk with N heads, export one ONNX
    graph and verify it against the ensemble."""
    DEBUG["on"] = debug
    ctx.obj = {"quiet": quiet}


@cli.command()
@click.option("--arch", type=ARCHS, default=Default(CONFIG + "arch"), show_default=True)
@click.option("-n", "--n-models", "n", type=click.IntRange(2, 64), default=Default(CONFIG + "n"), show_default=True)
@click.option("--epochs", type=click.IntRange(1, 100), default=None, help="Default: 4 (mlp), 2 (others).")
@click.option("--width", type=click.IntRange(1, 4096), default=None, help="Default: 256 (mlp), 16 (others).")
@click.option("--cache", default=Default(CONFIG + "cache"), show_default=True)
@partition_option
@click.pass_obj
def train(obj: dict, arch: str, n: int, epochs: int | None, width: int | None, cache: str, partition: str) -> None:
    """Train N zoo models on Fashion-MNIST (seeds 0..N-1), each on all of the training split or on its shard.

    Reads /usr/share/datasets/fashion-mnist; writes CACHE/<arch>-w<width>-e<epochs>-val5000[-<partition>-n<N>]/
    seed<i>.safetensors. Cached models are not retrained."""
    from ..models.partition import parse_partition
    from ..models.zoo import zoo_models
    _, paths = zoo_models(arch, n, width=width, epochs=epochs, cache=cache, quiet=obj["quiet"],
                          partition=parse_partition(partition))
    for p in paths:
        echo(str(p))


@cli.command("fuse")
@with_models
@click.option("--depth", type=click.IntRange(0, None), default=None,
              help="Shared layers: 0 = ensemble, the number of cut points = full merge.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=None,
              help="Neuron-level fusion instead of --depth: share of units kept per model (1 = ensemble, 0 = merge).")
@click.option("--method", type=METHODS, default=Default("edgefuse.align:DEFAULT_METHOD"), show_default=True,
              help="Alignment method.")
@click.option("--select", type=RegistryChoice("edgefuse.fuse.select:SELECTIONS"),
              default=Default("edgefuse.fuse.select:DEFAULT_SELECT"), show_default=True,
              help="With --alpha: which units stay isolated (the costliest after alignment, or the paper's partial "
              "OT with a sink, which re-matches the rest).")
@click.option("--repair", type=REPAIRS, default=Default("edgefuse.fuse.repair:DEFAULT_REPAIR"), show_default=True,
              help="bn: reset BatchNorm; repair: REPAIR rescaling (nets without BN); lsq: re-solve merged layers by "
              "least squares towards the members' mean; distill: train towards the ensemble on calibration images.")
@click.option("--steps", type=click.IntRange(1, 100000), default=Default("edgefuse.targets:DISTILL_STEPS"),
              show_default=True,
              help="Distillation steps (--repair distill).")
@click.option("--opset", type=click.IntRange(9, 23), default=None, help="Default 18 (dynamo exporter); <=17 uses "
              "the TorchScript exporter.")
@click.option("--batch-heads/--no-batch-heads", default=True, show_default=True,
              help="Run the N heads as one network of grouped kernels (same outputs, fewer ONNX nodes).")
@click.option("--head-outputs", is_flag=True, help="Also output every head's logits (head_logits: batch × N × classes).")
@click.option("-o", "--out", type=click.Path(dir_okay=False), required=True, help="ONNX file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.pass_obj
def fuse_cmd(obj: dict, checkpoints: tuple[str, ...], **opts) -> None:
    """Align and fuse N models at one depth, write the fused model as ONNX.

    Reads CHECKPOINTS (safetensors or weights-only torch files) with --model, else the zoo cache; reads the
    data's training split for calibration. Writes OUT (parity-checked against PyTorch)."""
    out, depth, alpha = opts["out"], opts["depth"], opts["alpha"]
    if (depth is None) == (alpha is None):
        raise EdgefuseError("give exactly one of --depth and --alpha")
    with claimed(Path(out), opts["force"]):
        _fuse_to(obj, checkpoints, opts)


def _fuse_to(obj: dict, checkpoints: tuple[str, ...], opts: dict) -> None:
    """The fuse command's work, under the claim on its output file."""
    from ..align import align
    from ..fuse import fuse
    from ..spec.permspec import permutation_spec
    from ..graph.onnx import export_onnx
    from ..models.fit import check_fit

    out, depth, alpha = opts["out"], opts["depth"], opts["alpha"]
    models = cli_models(opts["arch"], opts["model"], checkpoints, opts["n"], opts["cache"], obj["quiet"],
                        opts["partition"])
    splits = splits_of(opts["data"], opts["val_size"], opts["calibration_images"])
    check_fit(models[0], splits)
    spec = permutation_spec(models[0], splits.example)
    calib_batches = splits.calib_batches
    aligned = align(models, spec, method=opts["method"], data=calib_batches)
    repair = None if opts["repair"] == "none" else opts["repair"]
    fused = fuse(aligned, spec, depth=depth, alpha=alpha, data=calib_batches, steps=opts["steps"], repair=repair,
                 batch_heads=opts["batch_heads"] and alpha is None, head_outputs=opts["head_outputs"],
                 select=opts["select"])
    echo(str(export_onnx(fused, splits.example, out, opset=opts["opset"])))


@cli.command()
@with_models
@with_finetunes
@click.option("--target", default=Default(CONFIG + "target"), show_default=True,
              help="Name of a file in targets/, or a .toml path.")
@click.option("--method", type=METHODS, default=Default("edgefuse.align:DEFAULT_METHOD"), show_default=True,
              help="Alignment method.")
@click.option("--depth", type=click.IntRange(0, None), default=None,
              help="Ship this fusion depth instead of the chooser's pick (0 = the batched exact ensemble).")
@click.option("--augment/--no-augment", default=None,
              help="Shift/flip the distillation images (default: the target's distill_augment).")
@click.option("--out-root", default=Default(CONFIG + "out_root"), show_default=True)
@click.option("--force", is_flag=True, help="Replace an earlier export of this target.")
@click.option("--all-points", is_flag=True,
              help="Build and measure every fused point, also those over the target's MACs budget, which could not "
              "ship (by default they are listed in the report, unbuilt).")
@click.pass_obj
def export(obj: dict, checkpoints: tuple[str, ...], **opts) -> None:
    """The main job: every member, the distilled member, the sub-ensembles, the exact ensembles and the fused
    points, measured alike; the best on validation within the target's budget ships.

    Reads CHECKPOINTS with --model (else trains or loads the zoo), the data and the target file.
    Writes OUT_ROOT/TARGET/{model.onnx, report.json, report.md, pareto.png, candidates/}."""
    from ..jobs.export import run_export
    from ..run.report import markdown

    run = run_config_of(obj, checkpoints, opts, methods=(opts.pop("method"),))
    report = run_export(run, console=_console(obj["quiet"]))
    _show(markdown(report))
    echo(f"wrote {Path(run.out_root) / report['target']}/ (model.onnx: {report['shipped']['label']}, "
          f"{report['shipped']['kind']})")


@cli.command()
@with_models
@with_finetunes
@click.option("--target", default=Default(CONFIG + "target"), show_default=True,
              help="Name of a file in targets/, or a .toml path.")
@click.option("--latency-ms", type=click.FloatRange(0, None, min_open=True), multiple=True,
              help="Latency budget per call (the expected cost, or the p99 where the target's latency_binds says "
              "so): once for every batch size of the target, or once per batch size in the target's order "
              "(default: the target's).")
@click.option("--memory-mb", type=click.FloatRange(0, None, min_open=True), default=None,
              help="Peak memory budget (default: the target's).")
@click.option("--max-drop", type=click.FloatRange(0, 1), default=None,
              help="Instead of the most accurate: the fastest within this validation-accuracy drop from the "
              "ensemble.")
@click.option("--min-auroc", type=click.FloatRange(0, 1), default=None,
              help="Ship only a candidate whose misclassification-detection AUROC on validation (max softmax or its "
              "heads' disagreement) reaches this (default: the target's min_auroc).")
@click.option("--alpha", "alphas", type=click.FloatRange(0, 1), multiple=True, default=Default(CONFIG + "alphas"),
              show_default=True, help="Alpha values to try (repeat the option).")
@click.option("--method", "methods", type=METHODS, multiple=True, default=Default(CONFIG + "methods"),
              show_default=True, help="Alignment methods to try (repeat the option).")
@click.option("--repair", "repairs", type=GRID_REPAIRS, multiple=True, default=Default(CONFIG + "repairs", cli_names),
              show_default=True, help="Repairs to try (repeat the option).")
@click.option("--distill-steps", type=click.IntRange(0, 1_000_000), default=None,
              help="Distillation steps for the distilled member and the best depth and alpha (default: the "
              "target's distill_steps; 0: none).")
@click.option("--augment/--no-augment", default=None, help="Shift/flip the distillation images (default: the "
              "target's).")
@click.option("--workers", type=click.IntRange(0, 64), default=Default(CONFIG + "workers"), show_default=True,
              help="Local worker processes (0: in this process).")
@click.option("--ray", "ray_address", default=None, help="Run candidates on a Ray cluster (needs edgefuse[ray]).")
@click.option("--out-root", default=Default(CONFIG + "out_root"), show_default=True)
@click.pass_obj
def sweep(obj: dict, checkpoints: tuple[str, ...], **opts) -> None:
    """Measure members, sub-ensembles, exact ensembles, depths and alphas; choose on validation within the budget.

    Reads the models (as export does) and the target; writes OUT_ROOT/TARGET/sweep/{sweep.json, sweep.md,
    pareto.png, points/, candidates/}. Finished points are kept in points/, so an interrupted sweep resumes."""
    from ..run.report import markdown
    from ..jobs.sweep import run_sweep

    latency = opts.pop("latency_ms")
    run = run_config_of(obj, checkpoints, opts, latency_ms=(latency[0] if len(latency) == 1 else latency) or None,
                      repairs=tuple(None if r == "none" else r for r in opts.pop("repairs")))
    result = run_sweep(run, console=_console(obj["quiet"]))
    _show(markdown(result))
    echo(f"chose {result['shipped']['label']} ({result['shipped']['kind']}); wrote "
          f"{Path(run.out_root) / result['target'] / 'sweep'}/")


from .device import build, check  # noqa: E402  (commands of the device stage)
from .verify import verify  # noqa: E402

cli.add_command(check)
cli.add_command(build)
cli.add_command(verify)


def main() -> None:
    """SIGTERM (kill, timeout) unwinds like Ctrl-C: staging folders and locks are cleaned up on the way out."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cli(prog_name="edgefuse")
