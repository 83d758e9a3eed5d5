"""The least-squares repair ("lsq", after PLeaS): layer by layer, in order, re-solve each merged layer's weights so
that its outputs, on the inputs the fused model really gives it, match the mean of the members' aligned outputs;
at a depth split, re-solve each head's first layer so that it reproduces its own member from the trunk's features.
A BatchNorm right after a solved layer is folded into the fit (the target is the members' normalised output and the
fused BatchNorm becomes the identity on those channels). Ridge regression in closed form from normal equations
accumulated batch by batch (patches of one batch at a time, never all of them), one system per group of a grouped
or depthwise conv; the ridge is the one that fits held-out calibration batches best."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..base.errors import EdgefuseError
from ..spec.trace import trace

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


def _columns(layer: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None,
             out_size: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """The layer's input as regression rows, one matrix per group: every row, or only the rows `keep` (row r of a
    conv is output position r of the flattened (batch, height, width) of size `out_size`), whose patches are
    gathered from the padded input directly, never unfolding the positions a sample leaves out."""
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        cols = [rows if keep is None else rows[keep]]
    elif isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise EdgefuseError(f"lsq repair: conv padding {layer.padding!r}/{layer.padding_mode} is not supported")
        if keep is None:
            patches = nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = _patches_at(layer, x, keep, out_size)
        cols = list(rows.chunk(layer.groups, dim=1))
    else:
        raise EdgefuseError(f"lsq repair: {type(layer).__name__} layers are not supported (Linear, Conv2d)")
    return cols


def _patches_at(layer: nn.Conv2d, x: torch.Tensor, keep: torch.Tensor, out_size: tuple[int, ...]) -> torch.Tensor:
    """unfold's rows `keep`, in its column order (channel, then kernel row, then kernel column)."""
    (ph, pw), (sh, sw), (dh, dw) = layer.padding, layer.stride, layer.dilation
    padded = nn.functional.pad(x, (pw, pw, ph, ph))
    _, height, width = out_size
    b, pos = keep // (height * width), keep % (height * width)
    y, z = (pos // width) * sh, (pos % width) * sw
    kh, kw = layer.kernel_size
    taps = [padded[b, :, y + i * dh, z + j * dw] for i in range(kh) for j in range(kw)]
    return torch.stack(taps, 2).reshape(len(keep), -1)


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
    shrunk = a.clone()
    shrunk.diagonal()[:-1] += ridge * a.diagonal().mean().clamp_min(1e-12)  # the bias (last) is not shrunk
    factor, info = torch.linalg.cholesky_ex(shrunk)  # symmetric positive definite: half the work of an LU solve
    return torch.cholesky_solve(b, factor) if int(info) == 0 else torch.linalg.solve(shrunk, b)


def fit_layer(fused: nn.Module, members: list[nn.Module], fit: Fit, xs: list[torch.Tensor]) -> float:
    """Re-solve one layer in place; returns the chosen relative ridge."""
    return fit_layers(fused, members, [fit], xs)[0]


def _source(fit: Fit) -> nn.Module:
    return fit.source or fit.layer


class NormalEquations:
    """One layer's ridge regression (weights and bias) of targets on its inputs, from normal equations accumulated
    batch by batch: at most `MAX_ROWS` rows in all (a seeded sample, spread evenly over `batches`), one system per
    group of a grouped conv; batches marked held out choose the ridge."""

    def __init__(self, layer: nn.Module, batches: int) -> None:
        self.layer = layer
        self.stats = {k: [[0, 0] for _ in range(_groups(layer))] for k in ("fit", "held")}
        self.gen = torch.Generator().manual_seed(0)
        self.per_batch = -(-MAX_ROWS // batches)

    def add(self, x: torch.Tensor, target: torch.Tensor, held: bool = False) -> None:
        """One batch: the layer's input `x` and the output it should give (channels on the layer's output axis)."""
        targets = _targets(self.layer, target)
        keep = None
        if len(targets[0]) > self.per_batch:
            keep = torch.randperm(len(targets[0]), generator=self.gen)[:self.per_batch]
            targets = [t[keep] for t in targets]
        size = (len(target), *target.shape[2:]) if isinstance(self.layer, nn.Conv2d) else ()
        cols = _columns(self.layer, x, keep, size)
        for g, (c, t) in enumerate(zip(cols, targets)):
            c = torch.cat([c.float(), torch.ones(len(c), 1)], 1)  # the bias's column
            acc = self.stats["held" if held else "fit"][g]  # one batch's products in float32, their sum in float64
            acc[0], acc[1] = acc[0] + (c.T @ c).double(), acc[1] + (c.T @ t.float()).double()

    def write(self) -> float:
        """Choose the ridge on the held-out batches, solve on all of them, write the layer; returns the ridge."""
        stats = self.stats
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
            self.layer.weight.copy_(weight.reshape(self.layer.weight.shape))
            self.layer.bias = nn.Parameter(bias)
        return best


def held_out(i: int, batches: int) -> bool:
    """Every HOLDOUT-th calibration batch chooses the ridge (none when there are too few)."""
    return batches >= HOLDOUT and i % HOLDOUT == HOLDOUT - 1


def fit_layers(fused: nn.Module, members: list[nn.Module], fits: list[Fit], xs: list[torch.Tensor]) -> list[float]:
    """Re-solve fits that read the same input (one layer's merged part and its members' isolated units) in place,
    from one pass over the calibration batches: the input is captured once per batch, and each member's output
    once. Returns the chosen relative ridges."""
    systems = [NormalEquations(f.layer, len(xs)) for f in fits]
    for i, x in enumerate(xs):
        inp = _capture(fused, _source(fits[0]), x, want_input=True)
        outs: dict[tuple[int, str], torch.Tensor] = {}
        for fit, system in zip(fits, systems):
            axis = -1 if isinstance(fit.layer, nn.Linear) else 1
            for p in fit.parents:
                if (p, fit.bn or fit.name) not in outs:
                    outs[(p, fit.bn or fit.name)] = _capture(members[p], members[p].get_submodule(fit.bn or fit.name),
                                                             x, want_input=False)
            target = torch.stack([outs[(p, fit.bn or fit.name)] for p in fit.parents]).mean(0)
            own = inp if fit.select is None else inp.index_select(axis, fit.select)
            system.add(own, target.index_select(axis, fit.units), held_out(i, len(xs)))
    return [system.write() for system in systems]


def _groups(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else layer.groups


def lsq_repair(fused: nn.Module, members: list[nn.Module], fits: list[Fit], xs: list[torch.Tensor]) -> nn.Module:
    """Every fit in order, each seeing the layers solved before it (fits in a row that read the same input are
    solved together); a following BatchNorm becomes the identity."""
    fused.eval()
    for _, group in itertools.groupby(fits, key=lambda f: id(_source(f))):
        group = list(group)
        fit_layers(fused, members, group, xs)
        for fit in group:
            if fit.write is not None:
                fit.write(fit.layer)
            if fit.bn is not None:
                identity_bn(fit.owner.get_submodule(fit.bn), slice(fit.channels, fit.channels + len(fit.units)))
    return fused


def identity_bn(bn: nn.Module, channels: slice) -> None:
    """These channels of a BatchNorm pass through unchanged (eval mode)."""
    with torch.no_grad():
        bn.running_mean[channels] = 0
        bn.running_var[channels] = 1 - bn.eps
        if bn.affine:
            bn.weight[channels] = 1
            bn.bias[channels] = 0
