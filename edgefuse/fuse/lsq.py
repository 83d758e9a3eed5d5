"""The least-squares repair ("lsq", after PLeaS): layer by layer, in order, re-solve each merged layer's weights so
that its outputs, on the inputs the fused model really gives it, match the mean of the members' aligned outputs;
at a depth split, re-solve each head's first layer so that it reproduces its own member from the trunk's features.
A BatchNorm right after a solved layer is folded into the fit (the target is the members' normalised output and the
fused BatchNorm becomes the identity on those channels). Ridge regression in closed form from normal equations
accumulated batch by batch (patches of one batch at a time, never all of them), one system per group of a grouped
or depthwise conv; the ridge is the one that fits held-out calibration batches best."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..base.errors import EdgefuseError
from ..spec.trace import trace
from .layers import GroupedLinear
from .neuron import MixedLayer

RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)  # relative to the mean diagonal of the normal matrix
HOLDOUT = 5  # every fifth calibration batch chooses the ridge
# Regression rows per layer: a conv gives one row per output position, 1.6 M for 2,000 28x28 images; a seeded sample
# of 150,000 (spread evenly over the batches) fits the zoo CNN as well and 10x faster.
MAX_ROWS = 150_000


@dataclass(frozen=True)
class Fit:
    """One layer to re-solve: `layer` (a Linear/Conv of the fused model) and, for its output channels in order,
    `parents` (member indices whose outputs are averaged), `name` (the layer in a member), `units` (their
    channels), `bn`, the name of a BatchNorm that follows it in the members, if any, and `owner`, the part of the
    fused model in which that name resolves. A member's isolated units in an alpha-fused layer are solved in a
    stand-alone `layer` fed by `source`'s input channels `select`, then written back by `write`; `channels` is the
    first of its outputs' channels in the following BatchNorm."""
    layer: nn.Module
    parents: tuple[int, ...]
    name: str
    units: torch.Tensor
    bn: str | None
    owner: nn.Module
    source: nn.Module | None = None
    select: torch.Tensor | None = None
    write: Callable[[nn.Module], None] | None = None
    channels: int = 0


def following_bn(model: nn.Module, names: list[str]) -> dict[str, str]:
    """For each layer name, the BatchNorm that alone consumes its output (the next node of the traced graph)."""
    gm = trace(model)
    modules = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in names and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module" and isinstance(modules.get(user.target), nn.modules.batchnorm._BatchNorm):
                out[node.target] = user.target
    return out


def _columns(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The layer's input as regression rows, one matrix per group."""
    if isinstance(layer, nn.Linear):
        cols = [x.reshape(-1, x.shape[-1])]
    elif isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise EdgefuseError(f"lsq repair: conv padding {layer.padding!r}/{layer.padding_mode} is not supported")
        patches = nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        cols = list(rows.chunk(layer.groups, dim=1))
    else:
        raise EdgefuseError(f"lsq repair: {type(layer).__name__} layers are not supported (Linear, Conv2d)")
    return cols


def _targets(layer: nn.Module, t: torch.Tensor) -> list[torch.Tensor]:
    rows = t.reshape(-1, t.shape[-1]) if isinstance(layer, nn.Linear) else t.movedim(1, -1).reshape(-1, t.shape[1])
    groups = 1 if isinstance(layer, nn.Linear) else layer.groups
    return list(rows.chunk(groups, dim=1))


def _capture(model: nn.Module, module: nn.Module, x: torch.Tensor, want_input: bool) -> torch.Tensor:
    got = {}

    def hook(_m, inputs, output):
        got["v"] = inputs[0] if want_input else output
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["v"]


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is not computed."""


def _solve(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    reg = torch.eye(len(a), dtype=a.dtype) * ridge * a.diagonal().mean().clamp_min(1e-12)
    reg[-1, -1] = 0  # the bias is not shrunk
    return torch.linalg.solve(a + reg, b)


def fit_layer(fused: nn.Module, members: list[nn.Module], fit: Fit, xs: list[torch.Tensor]) -> float:
    """Re-solve one layer in place; returns the chosen relative ridge."""
    return fit_layers(fused, members, [fit], xs)[0]


def _source(fit: Fit) -> nn.Module:
    return fit.source or fit.layer


def fit_layers(fused: nn.Module, members: list[nn.Module], fits: list[Fit], xs: list[torch.Tensor]) -> list[float]:
    """Re-solve fits that read the same input (one layer's merged part and its members' isolated units) in place,
    from one pass over the calibration batches: the input is captured once per batch, and each member's output
    once. Returns the chosen relative ridges."""
    stats = [{k: [[0, 0] for _ in range(_groups(f.layer))] for k in ("fit", "held")} for f in fits]
    gens = [torch.Generator().manual_seed(0) for _ in fits]
    per_batch = -(-MAX_ROWS // len(xs))
    for i, x in enumerate(xs):
        part = "held" if len(xs) >= HOLDOUT and i % HOLDOUT == HOLDOUT - 1 else "fit"
        inp = _capture(fused, _source(fits[0]), x, want_input=True)
        outs: dict[tuple[int, str], torch.Tensor] = {}
        for fit, stat, gen in zip(fits, stats, gens):
            axis = -1 if isinstance(fit.layer, nn.Linear) else 1
            for p in fit.parents:
                if (p, fit.bn or fit.name) not in outs:
                    outs[(p, fit.bn or fit.name)] = _capture(members[p], members[p].get_submodule(fit.bn or fit.name),
                                                             x, want_input=False)
            target = torch.stack([outs[(p, fit.bn or fit.name)] for p in fit.parents]).mean(0)
            own = inp if fit.select is None else inp.index_select(axis, fit.select)
            cols, targets = _columns(fit.layer, own), _targets(fit.layer, target.index_select(axis, fit.units))
            if len(cols[0]) > per_batch:
                keep = torch.randperm(len(cols[0]), generator=gen)[:per_batch]
                cols, targets = [c[keep] for c in cols], [t[keep] for t in targets]
            for g, (c, t) in enumerate(zip(cols, targets)):
                c = torch.cat([c.double(), torch.ones(len(c), 1, dtype=torch.float64)], 1)  # the bias's column
                acc = stat[part][g]
                acc[0], acc[1] = acc[0] + c.T @ c, acc[1] + c.T @ t.double()
    return [_finish(fit, stat) for fit, stat in zip(fits, stats)]


def _groups(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else layer.groups


def _finish(fit: Fit, stats: dict) -> float:
    """Choose the ridge on the held-out batches, solve on all of them, write the layer."""
    best, best_err = RIDGES[0], None
    if any(isinstance(s[0], torch.Tensor) for s in stats["held"]):
        for ridge in RIDGES:
            err = 0.0
            for (a, b), (ah, bh) in zip(stats["fit"], stats["held"]):
                w = _solve(a, b, ridge)
                err += float((w * (ah @ w)).sum() - 2 * (w * bh).sum())
            if best_err is None or err < best_err:
                best, best_err = ridge, err
    solved = [_solve(f[0] + (h[0] if isinstance(h[0], torch.Tensor) else 0),
                     f[1] + (h[1] if isinstance(h[1], torch.Tensor) else 0), best)
              for f, h in zip(stats["fit"], stats["held"])]
    weight = torch.cat([w[:-1].T for w in solved]).float()
    bias = torch.cat([w[-1] for w in solved]).float()
    with torch.no_grad():
        fit.layer.weight.copy_(weight.reshape(fit.layer.weight.shape))
        fit.layer.bias = nn.Parameter(bias)
    return best


def lsq_repair(fused: nn.Module, members: list[nn.Module], fits: list[Fit], xs: list[torch.Tensor]) -> nn.Module:
    """Every fit in order, each seeing the layers solved before it (fits in a row that read the same input are
    solved together); a following BatchNorm becomes the identity."""
    fused.eval()
    k = 0
    while k < len(fits):
        j = k + 1
        while j < len(fits) and _source(fits[j]) is _source(fits[k]):
            j += 1
        fit_layers(fused, members, fits[k:j], xs)
        for fit in fits[k:j]:
            if fit.write is not None:
                fit.write(fit.layer)
            if fit.bn is not None:
                identity_bn(fit.owner.get_submodule(fit.bn), slice(fit.channels, fit.channels + len(fit.units)))
        k = j
    return fused


def identity_bn(bn: nn.Module, channels: slice) -> None:
    """These channels of a BatchNorm pass through unchanged (eval mode)."""
    with torch.no_grad():
        bn.running_mean[channels] = 0
        bn.running_var[channels] = 1 - bn.eps
        if bn.affine:
            bn.weight[channels] = 1
            bn.bias[channels] = 0


def isolated_fits(layer: MixedLayer, n: int, name: str, units: torch.Tensor, bn: str | None,
                  owner: nn.Module) -> list[Fit]:
    """One fit per member for its isolated units of an alpha-fused layer: from the fused input channels and its
    own isolated ones, towards its own outputs. They read features the merged layers before them changed, so
    their original weights no longer fit."""
    parts = [m for m in (layer.from_fused, layer.from_isolated) if m is not None]
    if not parts or not len(units):
        return []
    width = len(units)
    start = layer.fused.weight.shape[0] if layer.fused is not None else 0
    split = layer.split
    own = layer.from_isolated.weight.shape[1] if layer.from_isolated is not None else 0  # inputs per member
    shared = split if split is not None else layer.from_fused.weight.shape[1]  # inputs every member reads
    out = []
    for i in range(n):
        select = None if split is None else torch.cat([torch.arange(split), split + i * own + torch.arange(own)])
        proxy = _proxy(parts[0], width, shared + own)
        out.append(Fit(proxy, (i,), name, units, bn, owner, source=layer, select=select,
                       write=_writer(layer, i, width, shared), channels=start + i * width))
    return out


def _proxy(like: nn.Module, out: int, inp: int) -> nn.Module:
    """A stand-alone Linear/Conv of `like`'s kind with these widths, to solve one member's isolated units in."""
    if isinstance(like, (nn.Linear, GroupedLinear)):
        return nn.Linear(inp, out)
    proxy = copy.deepcopy(like)
    proxy.weight = nn.Parameter(torch.zeros(out, inp, *like.weight.shape[2:]))
    proxy.in_channels, proxy.out_channels, proxy.groups = inp, out, 1
    return proxy


def _writer(layer: MixedLayer, i: int, width: int, shared: int) -> Callable[[nn.Module], None]:
    """Copies a solved proxy into member i's rows of the layer's parts: the columns of the fused inputs into
    `from_fused`, the rest into its block of `from_isolated`, the bias into the part that adds it."""
    rows = slice(i * width, (i + 1) * width)

    def write(proxy: nn.Module) -> None:
        w, b = proxy.weight.detach(), proxy.bias.detach()
        with torch.no_grad():
            if layer.from_fused is not None:
                layer.from_fused.weight[rows] = w[:, :shared]
            iso = layer.from_isolated
            if iso is not None:
                if isinstance(iso, GroupedLinear):
                    iso.weight[i] = w[:, shared:].T
                else:
                    iso.weight[rows] = w[:, shared:]
            holder = layer.from_fused if layer.from_fused is not None else iso
            if holder.bias is None:
                holder.bias = nn.Parameter(torch.zeros(holder.weight.shape[0] if not isinstance(
                    holder, GroupedLinear) else holder.weight.shape[0] * holder.weight.shape[2]))
            holder.bias[rows] = b

    return write
