"""Load N checkpoints into one architecture without ever unpickling code."""
from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..base.errors import EdgefuseError, first_line
from ..base.files import native
from ..base.hooks import import_callable


def resolve_factory(factory: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """`module.path:function`, or `zoo:NAME` (also a bare zoo name) for the built-in architectures."""
    if callable(factory):
        return factory
    from . import zoo

    name = factory.removeprefix("zoo:")
    if ":" not in factory or factory.startswith("zoo:"):
        if name in zoo.ARCHITECTURES:
            return zoo.ARCHITECTURES[name]
        raise EdgefuseError(f"unknown model factory '{factory}': use 'module.path:function' or one of "
                            f"{', '.join('zoo:' + a for a in zoo.ARCHITECTURES)}")
    return import_callable(factory, "model factory")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors, or torch.load with weights_only=True (a pickle that would run code is refused)."""
    path = Path(path)
    if path.is_dir():
        raise EdgefuseError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise EdgefuseError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load, load_file
            source = native(path)
            state = load_file(source) if isinstance(source, str) else load(source)
        else:
            with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; the error says enough
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EdgefuseError(f"cannot read checkpoint {path}: it holds Python objects, not only tensors "
                            "(refused: loading it could run code; save a state_dict or use safetensors)") from None
    except Exception as e:  # corrupt files raise many types; the user needs the file name and the first line
        raise EdgefuseError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EdgefuseError(f"checkpoint {path} is not a state dict of tensors")
    return state


def load_models(factory: str | Callable[[], nn.Module], paths: list[str | Path]) -> list[nn.Module]:
    """N eval-mode modules of one architecture; a checkpoint that does not fit it is named with its first bad key."""
    make = resolve_factory(factory)
    models = []
    for p in paths:
        state = read_state_dict(p)
        model = _build(make, factory)
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        extra = [k for k in state if k not in expected]
        if missing or extra:
            what = f"missing key '{missing[0]}'" if missing else f"unexpected key '{extra[0]}'"
            raise EdgefuseError(f"checkpoint {p} does not fit the architecture: {what} "
                                f"({len(missing)} missing, {len(extra)} unexpected)")
        for k, v in expected.items():
            if tuple(v.shape) != tuple(state[k].shape):
                raise EdgefuseError(f"checkpoint {p} does not fit the architecture: '{k}' has shape "
                                    f"{tuple(state[k].shape)}, expected {tuple(v.shape)}")
            if v.is_floating_point() and not state[k].is_floating_point():
                raise EdgefuseError(f"checkpoint {p}: '{k}' holds {str(state[k].dtype).removeprefix('torch.')} "
                                    f"values where the model has {str(v.dtype).removeprefix('torch.')} weights "
                                    "(quantized or corrupted? load it as floating point)")
        model.load_state_dict(state)
        models.append(model.eval())
    return models


def _build(make: Callable[[], nn.Module], factory) -> nn.Module:
    """One fresh model from the user's factory; a factory that fails or returns something else is the user's error."""
    try:
        model = make()
    except Exception as e:
        raise EdgefuseError(f"model factory '{factory}' failed: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise EdgefuseError(f"model factory '{factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model
