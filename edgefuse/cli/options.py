"""What the commands that read models and data share: their options, the models and run configuration those
options describe, and how they print."""
from __future__ import annotations

import click

from ..base.errors import EdgefuseError
from .lazy import Default, RegistryChoice

CONFIG = "edgefuse.run.config:RunConfig."  # the run's defaults, read from RunConfig when a command needs them
ARCHS = RegistryChoice("edgefuse.models.zoo:ARCHITECTURES")


def echo(text: str, err: bool = False) -> None:
    """click.echo for text that may hold a file name which is not valid UTF-8 (Python keeps its bytes as
    surrogates, which a UTF-8 stream refuses): such bytes are shown as U+FFFD."""
    click.echo(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), err=err)


def cli_models(arch: str, model: str | None, checkpoints: tuple[str, ...], n: int, cache: str, quiet: bool,
               partition: str):
    """User checkpoints when --model is given, else the cached zoo (trained on `partition`'s shards)."""
    if model:
        from ..models.load import load_models
        if len(checkpoints) < 2:
            raise EdgefuseError(f"--model needs at least 2 checkpoints, got {len(checkpoints)}")
        return load_models(model, list(checkpoints))
    if checkpoints:
        raise EdgefuseError("checkpoints were given without --model (say which architecture they are for)")
    from ..models.partition import parse_partition
    from ..models.zoo import zoo_models
    return zoo_models(arch, n, cache=cache, quiet=quiet, partition=parse_partition(partition))[0]


partition_option = click.option(
    "--partition", default=Default(CONFIG + "partition"), show_default=True, metavar="all|iid|dirichlet:A|classes:K",
    help="The zoo's training data: all of it per member, or disjoint shards (IID, Dirichlet label skew of "
    "concentration A per class, K classes per member).")

finetune_options = [
    click.option("--base", metavar="CHECKPOINT", type=click.Path(),
                 help="The pretrained checkpoint your models were fine-tuned from (with --model): merges against it "
                 "(task arithmetic, TIES) become candidates and alignment is skipped. Without it, fine-tunes are "
                 "recognised by alignment leaving their units in place."),
    click.option("--zoo", type=RegistryChoice("edgefuse.run.config:ZOOS"), default=Default(CONFIG + "zoo"),
                 show_default=True,
                 help="Without --model: N networks trained from scratch, or one pretrained and fine-tuned N times."),
]


def with_finetunes(f):
    for opt in reversed(finetune_options):
        f = opt(f)
    return f


model_options = [
    click.option("--arch", type=ARCHS, default=Default(CONFIG + "arch"), show_default=True,
                 help="Zoo architecture, used when --model is not given."),
    click.option("--model", "model", metavar="MODULE:FUNCTION",
                 help="Factory of your architecture (e.g. mypkg.nets:make_net, or zoo:cnn)."),
    click.option("-n", "--n-models", "n", type=click.IntRange(2, 64), default=Default(CONFIG + "n"), show_default=True,
                 help="Number of zoo models (seeds 0..N-1)."),
    click.option("--cache", default=Default(CONFIG + "cache"), show_default=True,
                 help="Folder of cached zoo checkpoints."),
    partition_option,
    click.option("--data", "--dataset", "data", default=Default(CONFIG + "data"), show_default=True, metavar="SOURCE",
                 help="fashion-mnist, digits, a folder (train/ test/ [val/] of <class>/<image>), an .npz file or "
                 "MODULE:FUNCTION returning the splits."),
    click.option("--val-size", type=click.IntRange(1, None), default=None,
                 help="Validation samples held out of the training split when SOURCE has no val split (default: "
                 "a tenth, at most 5,000)."),
    click.option("--calibration-images", type=click.IntRange(0, None),
                 default=Default("edgefuse.models.data:CALIBRATION_IMAGES"), show_default=True,
                 help="Training images that calibrate alignment and repairs (0: all of them)."),
]


def run_config_of(obj: dict, checkpoints: tuple[str, ...], opts: dict, **fields):
    """The RunConfig of a command: its options by name, the user's models (and their base) loaded when --model is
    given."""
    from ..run.config import RunConfig

    model, base = opts.pop("model"), opts.pop("base", None)
    models = cli_models(opts["arch"], model, checkpoints, opts["n"], opts["cache"], obj["quiet"], opts["partition"]) \
        if model or checkpoints else None
    if base is not None and not model:
        raise EdgefuseError("--base names the pretrained checkpoint your models were fine-tuned from: give it with "
                            "--model and their checkpoints (the zoo's base comes with --zoo finetune)")
    if model and opts.get("zoo", RunConfig.zoo) != RunConfig.zoo:
        raise EdgefuseError("--zoo chooses the built-in zoo, and --model gives your own models: use one of them")
    if base is not None:
        from ..models.load import load_base
        fields["base"] = load_base(model, base)
    return RunConfig(models=models, **opts, **fields)


def splits_of(data: str, val_size: int | None, calibration_images: int | None = None):
    """The splits of a --data source (read here for fuse and verify; export and sweep read them in the run)."""
    from ..models.sources import load_data
    return load_data(data, val_size).with_calibration(calibration_images)


def with_models(f):
    for opt in reversed(model_options):
        f = opt(f)
    return click.argument("checkpoints", nargs=-1, type=click.Path())(f)
