"""Normalisation inside the model, so the exported graph takes raw [0, 1] images on the device."""
from __future__ import annotations

import torch
from torch import nn

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class Normalize(nn.Module):
    def __init__(self, mean: float = FASHION_MEAN, std: float = FASHION_STD) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
