"""FusedModel: one shared trunk feeding N heads whose outputs are averaged. A plain module, so it traces and exports."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import EdgefuseError

COMBINES = ("mean", "probs")


class FusedModel(nn.Module):
    """`combine="mean"` averages logits; `"probs"` averages softmax probabilities and returns their log, so the
    output stays a log-score that argmax and NLL read the same way."""

    def __init__(self, trunk: nn.Module, heads: list[nn.Module], combine: str = "mean") -> None:
        super().__init__()
        if combine not in COMBINES:
            raise EdgefuseError(f"unknown combine '{combine}' (choose from {', '.join(COMBINES)})")
        if not heads:
            raise EdgefuseError("a fused model needs at least one head")
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        outs = torch.stack([head(h) for head in self.heads])
        if self.combine == "probs":
            return torch.log(torch.softmax(outs, dim=-1).mean(0))
        return outs.mean(0)


def ensemble(models: list[nn.Module], combine: str = "mean") -> FusedModel:
    """The exact ensemble as one module: an identity trunk and every model as a head (copies, never shared)."""
    import copy

    if len(models) < 2:
        raise EdgefuseError(f"an ensemble needs at least 2 models, got {len(models)}")
    return FusedModel(nn.Identity(), [copy.deepcopy(m).eval() for m in models], combine).eval()
