"""One run of the pipeline, described once: the CLI and Python build the same frozen configuration, the export and
the sweep read it, and every knob has its one default here or, for a registered choice (alignment, repair,
architecture), in its registry (the target's budgets and distillation settings are the target file's, overridden
only where a field below is set)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from torch import nn

from ..align import DEFAULT_METHOD
from ..base.errors import EdgefuseError
from ..fuse.repair import DEFAULT_REPAIR
from ..models.data import Splits
from ..models.zoo import DEFAULT_ARCH

DEFAULT_ALPHAS = (0.1, 0.25, 0.5, 0.75)
ZOOS = ("scratch", "finetune")


@dataclass(frozen=True)
class RunConfig:
    """`models`: the user's N models (None: the embedded zoo of `n` × `arch`, cached under `cache`, trained on
    `partition`'s shards; `zoo` "finetune": one base pretrained, then fine-tuned N times); `base`: the pretrained
    network the given models were fine-tuned from (optional: fine-tunes are also recognised by alignment returning
    the identity); `data`: a
    source as `ef.load_data` takes it, or its splits; `depth`: ship this depth instead of the chooser's pick (export
    only); `calibration_images`: how many training images calibrate; `latency_ms`, `memory_mb`, `max_drop`, `min_auroc`, `distill_steps`, `augment`: the target's values
    unless given; `workers` / `ray_address`: where the sweep's points run (the export runs them in this process)."""
    target: str = "cpu-ort"
    models: tuple[nn.Module, ...] | None = None
    base: nn.Module | dict | None = None  # the pretrained network (or its state dict) the members were fine-tuned from
    zoo: str = "scratch"  # without models: "scratch" (N seeds) or "finetune" (one base fine-tuned N times)
    arch: str = DEFAULT_ARCH
    n: int = 4
    partition: str = "all"  # the zoo's: all, iid, dirichlet:A or classes:K (models/partition.py)
    data: str | Splits = "fashion-mnist"
    val_size: int | None = None
    calibration_images: int | None = None  # None: the data's default (models/data.CALIBRATION_IMAGES); 0: all
    out_root: str = "build"
    cache: str = "build/cache"
    methods: tuple[str, ...] = (DEFAULT_METHOD,)
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    repairs: tuple[str | None, ...] = (DEFAULT_REPAIR,)
    depth: int | None = None
    latency_ms: float | tuple[float, ...] | None = None
    memory_mb: float | None = None
    max_drop: float | None = None
    min_auroc: float | None = None
    distill_steps: int | None = None
    augment: bool | None = None
    workers: int = 1
    ray_address: str | None = None
    force: bool = False
    all_points: bool = False  # export: build the fused points over the MACs budget too (run/prune.py)

    def __post_init__(self) -> None:
        if self.models is not None:
            object.__setattr__(self, "models", tuple(self.models))
            if len(self.models) < 2:
                raise EdgefuseError(f"a run needs at least 2 models, got {len(self.models)}")
        for name in ("methods", "alphas", "repairs"):
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))
        if not self.methods:
            raise EdgefuseError("a run needs at least one alignment method")
        if self.zoo not in ZOOS:
            raise EdgefuseError(f"unknown zoo '{self.zoo}' (choose from {', '.join(ZOOS)})")

    @property
    def model_list(self) -> list[nn.Module] | None:
        return list(self.models) if self.models is not None else None


def run_config(config: RunConfig | str | None, overrides: dict) -> RunConfig:
    """A RunConfig from a config, a target name, or nothing, with keyword overrides (unknown names are errors)."""
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown run setting '{unknown[0]}' (known: {', '.join(sorted(known))})")
    if isinstance(config, RunConfig):
        return replace(config, **overrides)
    return RunConfig(**({"target": config} if config is not None else {}), **overrides)
