"""Choices and defaults the command line reads from the module that defines them, when a command's help or its
parsing first needs them: `edgefuse --help` and `edgefuse check` then load neither torch nor scipy, while every
registry (alignment methods, repairs, architectures) and every default stays defined once, where it belongs."""
from __future__ import annotations

import importlib
from typing import Any, Callable

import click


def resolve(ref: str) -> Any:
    """The object `module:NAME` (a dotted NAME reads an attribute of it)."""
    module, _, name = ref.partition(":")
    value: Any = importlib.import_module(module)
    for part in name.split("."):
        value = getattr(value, part)
    return value


class Default:
    """A default read from `module:NAME` when the command runs or shows its help (click calls it; its text is the
    value's, so `show_default` prints the value rather than "(dynamic)"). `convert` maps the value for the CLI."""

    def __init__(self, ref: str, convert: Callable[[Any], Any] = lambda v: v) -> None:
        self.ref, self.convert = ref, convert

    def __call__(self) -> Any:
        return self.convert(resolve(self.ref))

    def __str__(self) -> str:
        value = self()
        return ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def cli_names(values) -> tuple[str, ...]:
    """Registered names as the CLI spells them: no repair (None) is "none"."""
    return tuple("none" if v is None else v for v in values)


class RegistryChoice(click.Choice):
    """A click.Choice over a registry's names, read when first needed. `names` maps the registry to the names the
    CLI offers (None, "no repair", shows as "none")."""

    def __init__(self, ref: str, names: Callable[[Any], Any] = lambda registry: registry) -> None:
        self.ref, self.names, self.case_sensitive = ref, names, True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(sorted(cli_names(self.names(resolve(self.ref)))))
