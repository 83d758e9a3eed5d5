"""edgefuse: align N models, fuse them partially (shared trunk + N heads), export one ONNX graph, verify it.

The public names load lazily, so that `import edgefuse.spec` (or a memory probe's fresh process) pays only for what
it uses, never for the run layer, rich or onnx."""
from __future__ import annotations

import importlib
import sys
import types

_PUBLIC = {
    "EdgefuseError": "base.errors", "UnsupportedModelError": "base.errors",
    "load_models": "models.load", "load_base": "models.load", "load_data": "models.sources",
    "PermSpec": "spec.permspec", "permutation_spec": "spec.permspec", "permute": "spec.permspec",
    "align": "align", "align_perms": "align",
    "FusedModel": "fuse", "batch_models": "fuse", "ensemble": "fuse", "fuse": "fuse", "merged_model": "fuse.merges",
    "export_onnx": "graph.onnx",
    "barrier": "measure.barrier", "macs": "measure.metrics", "params": "measure.metrics",
    "verify": "jobs.verify",
    "Cascade": "measure.cascade", "CascadeRule": "base.cascade",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


# Two subpackages share their name with the function they export: `ef.align` and `ef.fuse` stay the functions even
# after the import system binds the subpackage to this module's attribute.
_SHADOWED = ("align", "fuse")


class _Package(types.ModuleType):
    def __getattribute__(self, name: str):
        value = super().__getattribute__(name)
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return getattr(value, name)
        return value


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'edgefuse' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
