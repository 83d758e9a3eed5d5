"""FusedModel: one shared trunk feeding N heads whose outputs are averaged. A plain module, so it traces and exports."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..base.validate import check_models
from ..base.errors import EdgefuseError, UnsupportedModelError
from .batched import batch_models
from ..base.combine import DEFAULT_COMBINE, check_combine, combine_outputs


class FusedModel(nn.Module):
    """`combine="mean"` averages logits; `"probs"` averages softmax probabilities and returns their log, so the
    output stays a log-score that argmax and NLL read the same way. With `batched=True` the heads list holds one
    module that runs all N heads as grouped kernels and already combines their outputs (see `batch_heads`).
    `head_outputs=True` also returns every head's output, shape (batch, N, ...), for on-device diagnostics."""

    def __init__(self, trunk: nn.Module, heads: list[nn.Module], combine: str = DEFAULT_COMBINE, batched: bool = False,
                 n_heads: int | None = None, head_outputs: bool = False) -> None:
        super().__init__()
        check_combine(combine)
        if not heads:
            raise EdgefuseError("a fused model needs at least one head")
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.combine = combine
        self.batched = batched
        self.n_heads = n_heads or len(heads)
        self.head_outputs = head_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        if self.batched:
            return self.heads[0](h)
        outs = torch.stack([head(h) for head in self.heads])
        combined = combine_outputs(outs, 0, self.combine)
        return (combined, outs.transpose(0, 1)) if self.head_outputs else combined

    def batch_heads(self) -> FusedModel:
        """The same function with the N heads as one network of grouped kernels: fewer, larger kernels."""
        if self.batched:
            return copy.deepcopy(self)
        heads = batch_models(list(self.heads), self.combine, head_outputs=self.head_outputs)
        return FusedModel(copy.deepcopy(self.trunk), [heads], self.combine, batched=True, n_heads=len(self.heads),
                          head_outputs=self.head_outputs).eval()

    def fastest(self) -> FusedModel:
        """`batch_heads()` where the heads have a batched form (grouped kernels, or a member axis), else this model,
        its heads one after another (attention with a mask has neither yet)."""
        try:
            return self.batch_heads()
        except UnsupportedModelError:
            return self


def ensemble(models: list[nn.Module], combine: str = DEFAULT_COMBINE, batched: bool = False,
             head_outputs: bool = False) -> FusedModel:
    """The exact ensemble as one module: an identity trunk and every model as a head (copies, never shared);
    `batched=True` runs the members as one network of grouped kernels, with the same outputs; `head_outputs=True`
    also returns every member's output."""
    if len(models) < 2:
        raise EdgefuseError(f"an ensemble needs at least 2 models, got {len(models)}")
    if batched:  # one graph of grouped kernels needs one architecture
        check_models(models, "a batched ensemble")
    ens = FusedModel(nn.Identity(), [copy.deepcopy(m).eval() for m in models], combine,
                     head_outputs=head_outputs).eval()
    return ens.batch_heads() if batched else ens
