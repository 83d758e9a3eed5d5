"""Matching methods: each is a registered function `(models, spec, data, seed) -> list of perms per model`."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from ..base.validate import check_models
from ..base.errors import EdgefuseError
from ..spec.permspec import PermSpec, permute

METHODS: dict[str, Callable] = {}
DEFAULT_METHOD = "activation"  # the default alignment everywhere (why: docs/results.md, "The least-squares repair")
WITHOUT_DATA = "weight"  # what the default falls back to where no data is given: it reads the weights alone


def register(name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        METHODS[name] = fn
        return fn
    return deco


def align_perms(models: list[nn.Module], spec: PermSpec, method: str | None = None, data: Iterable | None = None,
                seed: int = 0, **options) -> list[dict]:
    """Permutations that line every model up with models[0] (whose permutation is the identity). `method` None is
    DEFAULT_METHOD (activation matching, which reads `data`), or WITHOUT_DATA (weight matching) where no data is
    given; `options` go to the method (e.g. reg=0.05 for entropic "ot")."""
    check_models(models, "alignment")
    if method is None:
        method = DEFAULT_METHOD if data is not None else WITHOUT_DATA
    if method not in METHODS:
        raise EdgefuseError(f"unknown alignment method '{method}' (available: {', '.join(sorted(METHODS))})")
    return METHODS[method](models, spec, data=data, seed=seed, **options)


def align(models: list[nn.Module], spec: PermSpec, method: str | None = None, data: Iterable | None = None,
          seed: int = 0, **options) -> list[nn.Module]:
    """New modules, each computing the same function as its input, with hidden units in models[0]'s order."""
    perms = align_perms(models, spec, method, data, seed, **options)
    return [permute(m, spec, p) for m, p in zip(models, perms)]


from . import activation, ot, weight  # noqa: E402,F401  (register the methods)
