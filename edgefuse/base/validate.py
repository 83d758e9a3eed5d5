"""Checks on the N models before anything is aligned or fused: one clear error instead of a wrong fused model."""
from __future__ import annotations

import torch
from torch import nn

from .errors import EdgefuseError


def check_models(models: list[nn.Module], what: str = "fusion") -> None:
    """Same architecture, eval mode, finite weights, BatchNorm with running statistics."""
    if len(models) < 2:
        raise EdgefuseError(f"{what} needs at least 2 models, got {len(models)}")
    ref = models[0].state_dict()
    for i, m in enumerate(models):
        kinds = _kinds(m.state_dict())
        if any(device == "meta" for _, device in kinds):
            raise EdgefuseError(f"model {i} is on the meta device (no weights): load its checkpoint first")
        if i and kinds != _kinds(ref):
            raise EdgefuseError(f"model {i} has weights of type/device {sorted(kinds)}, model 0 {sorted(_kinds(ref))}: "
                                "convert them alike (e.g. .float().cpu())")
        if m.training:
            raise EdgefuseError(f"model {i} is in training mode: call .eval() first (dropout and BatchNorm "
                                "statistics would change its outputs)")
        for name, mod in m.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.track_running_stats:
                raise EdgefuseError(f"model {i}: BatchNorm '{name}' has no running statistics "
                                    "(track_running_stats=False); it cannot be exported for inference")
        state = m.state_dict()
        if i:
            diff = next((k for k in list(ref) + list(state) if k not in ref or k not in state), None)
            if diff is not None:
                raise EdgefuseError(f"model {i} has a different architecture from model 0: key '{diff}'")
            shaped = next((k for k in ref if ref[k].shape != state[k].shape), None)
            if shaped is not None:
                raise EdgefuseError(f"model {i} has a different architecture from model 0: '{shaped}' has shape "
                                    f"{tuple(state[shaped].shape)}, model 0 {tuple(ref[shaped].shape)}")
        bad = nonfinite_tensor(m)
        if bad is not None:
            raise EdgefuseError(f"model {i}: '{bad}' holds NaN or Inf values")


def nonfinite_tensor(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or Inf, if any."""
    return next((k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()),
                None)


def _kinds(state: dict) -> set[tuple[str, str]]:
    """(dtype, device) of the floating-point tensors: members must agree before one graph can hold them."""
    return {(str(t.dtype).removeprefix("torch."), t.device.type) for t in state.values() if t.is_floating_point()}
