"""Weight matching with the assignment solved as optimal transport (POT): exact (earth mover's distance, whose
optimum between uniform marginals is a permutation) or entropic (Sinkhorn, rounded to the nearest permutation)."""
from __future__ import annotations

import warnings
from functools import partial

import numpy as np
from torch import nn

from ..base.hooks import optional
from ..spec.permspec import PermSpec
from . import register
from .weight import lsa, weight_matching


def ot_assign(similarity: np.ndarray, reg: float = 0.0) -> np.ndarray:
    ot = optional("ot", "POT", "optimal-transport matching")

    n = similarity.shape[0]
    cost = similarity.max() - similarity
    cost = cost / max(float(cost.max()), 1e-12)
    marginal = np.full(n, 1.0 / n)
    if reg > 0:
        with warnings.catch_warnings():  # an unconverged plan is still rounded to a permutation, and the caller
            warnings.simplefilter("ignore")  # keeps it only if it raises the similarity
            plan = ot.sinkhorn(marginal, marginal, cost, reg, numItermax=2000)
        return lsa(plan)
    plan = ot.emd(marginal, marginal, cost)
    return plan.argmax(1)


@register("ot")
def ot_matching(models: list[nn.Module], spec: PermSpec, data=None, seed: int = 0, reg: float = 0.0,
                **options) -> list[dict]:
    """`reg` = 0: exact OT; `reg` > 0: entropic OT with that regularisation (costs are scaled to [0, 1]). `options`
    go to weight matching (rounds, tolerance, history)."""
    return weight_matching(models, spec, seed=seed, solve=partial(ot_assign, reg=reg), **options)
