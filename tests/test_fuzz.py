"""Fuzz-style properties on random small nets: permuting, aligning and fusing never crash, and depth 0 stays the
ensemble while every depth keeps finite outputs and falling cost."""
import random

import pytest
import torch
from torch import nn

import edgefuse as ef

from . import nets


def random_net(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    if rng.random() < 0.5:
        layers, prev = [nn.Flatten()], 64
        for _ in range(rng.randint(1, 3)):
            w = rng.randint(2, 12)
            layers += [nn.Linear(prev, w), rng.choice([nn.ReLU(), nn.GELU(), nn.Tanh()])]
            if rng.random() < 0.3:
                layers.append(nn.LayerNorm(w))
            prev = w
        return nn.Sequential(*layers, nn.Linear(prev, 10)), (64,)
    layers, prev = [], 1
    for _ in range(rng.randint(1, 3)):
        w = rng.randint(2, 8)
        layers += [nn.Conv2d(prev, w, 3, padding=1, bias=rng.random() < 0.5)]
        if rng.random() < 0.6:
            layers.append(nn.BatchNorm2d(w))
        layers.append(nn.ReLU())
        prev = w
    if rng.random() < 0.5:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, 10)]
    else:
        layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(prev * 16, 10)]
    return nn.Sequential(*layers), (1, 8, 8)


@pytest.mark.parametrize("seed", range(12))
def test_random_nets_keep_the_properties(seed):
    _, shape = random_net(random.Random(seed))  # the architecture is fixed by the seed, the weights are not
    n = random.Random(-seed).randint(2, 4)
    models = []
    for i in range(n):
        torch.manual_seed(seed * 10 + i)
        m, _ = random_net(random.Random(seed))
        models.append(nets.randomize_bn(m, seed * 10 + i))
    x = torch.rand(5, *shape)
    spec = ef.permutation_spec(models[0], x[:2])
    with torch.no_grad():
        permuted = ef.permute(models[0], spec, spec.random_perms(seed))
        torch.testing.assert_close(permuted(x), models[0](x), atol=1e-5, rtol=1e-5)
        aligned = ef.align(models, spec, seed=seed)
        ens = torch.stack([m(x) for m in models]).mean(0)
        torch.testing.assert_close(ef.fuse(aligned, spec, depth=0)(x), ens, atol=1e-5, rtol=1e-5)
        costs = []
        for depth in range(len(spec.cut_points) + 1):
            fused = ef.fuse(aligned, spec, depth=depth, data=[torch.rand(16, *shape)])
            assert torch.isfinite(fused(x)).all()
            costs.append(ef.macs(fused, x))
        assert costs == sorted(costs, reverse=True)
