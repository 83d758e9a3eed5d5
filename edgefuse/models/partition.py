"""How the zoo's members share the training split: all of it (the default), or disjoint shards — IID, label skew
drawn from a Dirichlet per class (the federated-learning convention), or K classes per member — so fusion and
sub-ensembles can be measured on members trained on different data."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..base.errors import EdgefuseError

KINDS = ("all", "iid", "dirichlet", "classes")


@dataclass(frozen=True)
class Partition:
    """`kind` "all" (every member sees the whole split), "iid", "dirichlet" (`value`: the concentration α; small
    is skewed) or "classes" (`value`: classes per member). `seed`: the zoo's draw, which shards and which member
    seeds (seed·N …): another seed is another zoo, for benchmarks that report a spread over zoos."""
    kind: str = "all"
    value: float = 0.0
    seed: int = 0

    @property
    def tag(self) -> str:
        """The cache folder's suffix: members trained on other shards are other models."""
        return {"all": "", "iid": "-iid", "dirichlet": f"-dir{self.value:g}", "classes": f"-cls{int(self.value)}"}[
            self.kind]

    def describe(self) -> str:
        return {"all": "every member on the whole training split",
                "iid": "disjoint IID shards of the training split, one per member",
                "dirichlet": f"disjoint shards with label skew (Dirichlet α = {self.value:g} per class)",
                "classes": f"disjoint shards of {int(self.value)} classes per member"}[self.kind]

    def shards(self, y: torch.Tensor, n: int) -> list[torch.Tensor]:
        """The training indices of each of the `n` members (all of them for "all"); disjoint otherwise."""
        gen, rng = torch.Generator().manual_seed(self.seed), np.random.default_rng(self.seed)
        if self.kind == "all":
            return [torch.arange(len(y))] * n
        if self.kind == "iid":
            return list(torch.randperm(len(y), generator=gen).tensor_split(n))
        classes = int(y.max()) + 1
        parts: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for c in range(classes):
            idx = (y == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            if self.kind == "classes":
                holders = [m for m in range(n) if c in {(m * int(self.value) + j) % classes
                                                        for j in range(int(self.value))}] or [c % n]
                share = torch.full((len(holders),), 1.0 / len(holders))
            else:
                holders = list(range(n))
                share = torch.from_numpy(rng.dirichlet(np.full(n, float(self.value))))
            cuts = (share.cumsum(0) * len(idx)).round().long().tolist()
            for m, (lo, hi) in zip(holders, zip([0, *cuts[:-1]], cuts)):
                parts[m].append(idx[lo:hi])
        out = [torch.cat(p) if p else torch.zeros(0, dtype=torch.long) for p in parts]
        empty = [m for m, p in enumerate(out) if len(p) == 0]
        if empty:
            raise EdgefuseError(f"partition {self.kind}:{self.value:g} leaves member {empty[0]} no training data; "
                                "use a larger α or fewer members")
        return out


def parse_partition(text: str) -> Partition:
    """"all", "iid", "dirichlet:A" (A > 0) or "classes:K" (K ≥ 1)."""
    kind, _, value = text.partition(":")
    try:
        if kind in ("all", "iid") and not value:
            return Partition(kind)
        if kind == "dirichlet" and float(value) > 0:
            return Partition(kind, float(value))
        if kind == "classes" and int(value) >= 1:
            return Partition(kind, int(value))
    except ValueError:
        pass
    raise EdgefuseError(f"unknown partition '{text}': use all, iid, dirichlet:A (A > 0) or classes:K (K ≥ 1)")
