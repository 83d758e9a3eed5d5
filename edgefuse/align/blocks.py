"""Assignment under block constraints: the permutations of a family of groups (a grouped convolution's input and
output) that move whole blocks together, found exactly from each group's unit similarities."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..spec.permspec import Family

Solver = Callable[[np.ndarray], np.ndarray]


def _tile_values(similarity: np.ndarray, blocks: int, solve: Solver) -> tuple[np.ndarray, np.ndarray]:
    """For every (reference block a, other block b): the best inner assignment's columns and its total."""
    width = similarity.shape[0] // blocks
    tiles = similarity.reshape(blocks, width, blocks, width).transpose(0, 2, 1, 3)
    if width == 1:
        return np.zeros((blocks, blocks, 1), dtype=np.int64), tiles[:, :, 0, 0]
    cols = np.empty((blocks, blocks, width), dtype=np.int64)
    for a in range(blocks):
        for b in range(blocks):
            cols[a, b] = solve(tiles[a, b])
    return cols, np.take_along_axis(tiles, cols[..., None], 3)[..., 0].sum(-1)


def assign(similarities: list[np.ndarray], family: Family, solve: Solver) -> list[np.ndarray]:
    """Per group of `family`, the columns (units of the other model) for each row (unit of the reference) that
    maximise the family's total similarity among block-structured permutations: block a of the reference takes
    block σ(a) of the other model, σ shared by every group, each group reordering freely inside the block."""
    if family.blocks == 1:
        return [solve(s) for s in similarities]
    tiles = [_tile_values(s, family.blocks, solve) for s in similarities]
    total = sum(value for _, value in tiles)
    sigma = np.arange(family.blocks) if family.fixed else solve(total)
    out = []
    for (cols, _), s in zip(tiles, similarities):
        width = s.shape[0] // family.blocks
        out.append(np.concatenate([sigma[a] * width + cols[a, sigma[a]] for a in range(family.blocks)]))
    return out
