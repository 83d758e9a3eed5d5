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


def _format(path: Path) -> str:
    """What the file holds, from its first bytes (its suffix may say otherwise): "zip" (torch.save's archive),
    "pickle" (torch's legacy format), "safetensors" (an 8-byte header length, then a JSON header), or "unknown"."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "safetensors" if len(head) == 9 and head[8:9] == b"{" else "unknown"


def _truncated(path: Path, kind: str) -> str | None:
    """Why the file is incomplete, when it is: a zip archive without its end record, or a safetensors file shorter
    than its header says."""
    if kind != "safetensors":
        import zipfile

        return "it is cut short (the zip archive has no end record)" if kind == "zip" and \
            not zipfile.is_zipfile(path) else None
    import json

    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n)) if 8 + n <= size else None
        except ValueError:
            return None
    if header is None:
        return f"it is cut short (its header alone needs {8 + n:,} bytes, the file holds {size:,})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    need = 8 + n + max(ends, default=0)
    return f"it is cut short (its header describes {need:,} bytes, the file holds {size:,})" if need > size else None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors, or torch.load with weights_only=True (a pickle that would run code is refused), by what the file
    holds whatever its suffix; a training checkpoint's one dict of tensors (`state_dict`, `model`, ...) is taken
    from it."""
    path = Path(path)
    if path.is_dir():
        raise EdgefuseError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise EdgefuseError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise EdgefuseError(f"cannot read checkpoint {path}: the file is empty")
    kind = _format(path)
    if kind == "unknown":
        raise EdgefuseError(f"cannot read checkpoint {path}: it is neither a safetensors file nor a torch checkpoint "
                            "(torch.save's zip archive or pickle)")
    why = _truncated(path, kind)
    if why:
        raise EdgefuseError(f"cannot read checkpoint {path}: {why}; copy or save it again")
    try:
        if kind == "safetensors":
            from safetensors.torch import load, load_file
            source = native(path)
            state = load_file(source) if isinstance(source, str) else load(source)
        else:
            with warnings.catch_warnings(), open(path, "rb") as f:  # a file object: torch.load would go by the
                warnings.simplefilter("ignore")  # suffix; and its pickle-protocol warnings say less than our error
                state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EdgefuseError(f"cannot read checkpoint {path}: it holds Python objects, not only tensors "
                            "(refused: loading it could run code; save a state_dict or use safetensors)") from None
    except Exception as e:  # corrupt files raise many types; the user needs the file name and the first line
        raise EdgefuseError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    state = _tensors_of(state)
    if state is None:
        raise EdgefuseError(f"checkpoint {path} is not a state dict of tensors, nor a dict holding exactly one")
    return state


def _tensors_of(state) -> dict[str, torch.Tensor] | None:
    """The state dict itself, or the one dict of tensors a training checkpoint holds beside its optimizer state and
    counters (Lightning's `state_dict`, a script's `model` or `model_state_dict`)."""
    def tensors(d) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())
    if tensors(state):
        return state
    if not isinstance(state, dict):
        return None
    inner = [v for v in state.values() if tensors(v)]
    return inner[0] if len(inner) == 1 else state.get("state_dict") if tensors(state.get("state_dict")) else None


def _strip_prefix(state: dict[str, torch.Tensor], expected: dict) -> tuple[dict[str, torch.Tensor], str]:
    """Keys saved from a wrapper (`module.` of DataParallel, `model.` of Lightning, or several): the prefix every key
    shares, removed one component at a time while that makes the keys the model's. ("", unchanged) otherwise."""
    keys, prefix = list(state), ""
    while keys and all(k.startswith(prefix) for k in keys):
        first = keys[0][len(prefix):].split(".", 1)
        if len(first) < 2 or not all(k[len(prefix):].startswith(first[0] + ".") for k in keys):
            break
        prefix += first[0] + "."
        if {k[len(prefix):] for k in keys} == set(expected):
            return {k[len(prefix):]: v for k, v in state.items()}, prefix
    return state, prefix


def load_models(factory: str | Callable[[], nn.Module], paths: list[str | Path]) -> list[nn.Module]:
    """N eval-mode modules of one architecture; a checkpoint that does not fit it is named with its first bad key."""
    make = resolve_factory(factory)
    models = []
    for p in paths:
        state = read_state_dict(p)
        model = _build(make, factory)
        expected = model.state_dict()
        state, prefix = _strip_prefix(state, expected) if set(state) != set(expected) else (state, "")
        missing = [k for k in expected if k not in state]
        extra = [k for k in state if k not in expected]
        if missing or extra:
            what = f"missing key '{missing[0]}'" if missing else f"unexpected key '{extra[0]}'"
            shared = f"; every key starts with '{prefix}' and without it they still do not match" if prefix else ""
            raise EdgefuseError(f"checkpoint {p} does not fit the architecture: {what} "
                                f"({len(missing)} missing, {len(extra)} unexpected){shared}")
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


def load_base(factory: str | Callable[[], nn.Module], path: str | Path) -> dict[str, torch.Tensor]:
    """The pretrained weights the members were fine-tuned from, as the tensors the architecture shares with them:
    a head of another shape (the pretraining task's classes) is left out, and merges use the members' mean there.
    A checkpoint sharing under half of the architecture's tensors is not its base."""
    state = read_state_dict(path)
    expected = _build(resolve_factory(factory), factory).state_dict()
    state, _ = _strip_prefix(state, expected) if set(state) != set(expected) else (state, "")
    shared = {k: v for k, v in state.items() if k in expected and tuple(v.shape) == tuple(expected[k].shape)
              and v.is_floating_point() == expected[k].is_floating_point()}
    if 2 * len(shared) < len(expected):
        raise EdgefuseError(f"base {path} shares {len(shared)} of the architecture's {len(expected)} tensors (by name "
                            "and shape): it is not the network the members were fine-tuned from")
    bad = next((k for k, v in shared.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise EdgefuseError(f"base {path}: '{bad}' holds NaN or Inf values")
    return shared


def _build(make: Callable[[], nn.Module], factory) -> nn.Module:
    """One fresh model from the user's factory; a factory that fails or returns something else is the user's error."""
    try:
        model = make()
    except Exception as e:
        raise EdgefuseError(f"model factory '{factory}' failed: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise EdgefuseError(f"model factory '{factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model
