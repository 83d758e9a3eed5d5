"""Cost of a module: multiply-accumulates per sample and parameter count, counted from the layers that run."""
from __future__ import annotations

import torch
from torch import nn


def macs(module: nn.Module, example_input: torch.Tensor) -> int:
    """MACs for one sample: Linear and Conv layers as they are actually called (a head run N times counts N times),
    and any layer that says how many inputs each of its outputs reads (`inputs_per_output`)."""
    total = 0

    def hook(mod: nn.Module, inputs, output) -> None:
        nonlocal total
        if hasattr(mod, "inputs_per_output"):
            per_out = mod.inputs_per_output
        else:
            per_out = mod.weight.shape[1] if isinstance(mod, nn.Linear) else mod.weight[0].numel()
        total += output.numel() // output.shape[0] * per_out

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or hasattr(m, "inputs_per_output")]
    try:
        with torch.no_grad():
            module.eval()(example_input[:1])
    finally:
        for h in handles:
            h.remove()
    return int(total)


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
