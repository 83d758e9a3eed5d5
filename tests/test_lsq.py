"""The least-squares repair: the solver recovers a layer that is exactly the members' mean (dense, grouped and
depthwise convs, Linear), the first merged layer of a depth split matches the members' normalised mean, and on the
narrow digits CNN it lifts every fused point above BatchNorm reset; a head whose input also takes a shortcut gets
an adapter that brings it closer to its member."""
import copy
import importlib

import pytest
import torch
import torch.fx as fx
from torch import nn

import edgefuse as ef
from edgefuse.fuse.adapter import NAME, needs_adapter
from edgefuse.fuse import lsq
from edgefuse.fuse.lsq import RIDGES, Fit, _capture, fit_layer, following_bn
from edgefuse.models import data

from . import nets
from .conftest import train_digits

fuse_module = importlib.import_module("edgefuse.fuse.least_squares")  # where repair "lsq" builds its fits


@pytest.fixture(scope="module")
def residuals():
    """4 trained digits MLPs with a residual block right after the first cut."""
    return train_digits(nets.Residual, 4)


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(6, 5),
    lambda: nn.Conv2d(4, 6, 3, padding=1),
    lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
    lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
], ids=["linear", "conv", "grouped", "depthwise"])
def test_the_solver_recovers_the_mean_layer(make):
    torch.manual_seed(0)
    members = [nn.Sequential(make()).eval() for _ in range(3)]
    fused = nn.Sequential(make()).eval()
    shape = (8, 6) if isinstance(members[0][0], nn.Linear) else (8, 4, 9, 9)
    xs = [torch.randn(shape) for _ in range(10)]
    out = members[0][0].weight.shape[0]
    ridge = fit_layer(fused, members, Fit(fused[0], (0, 1, 2), "0", torch.arange(out), None, fused), xs)
    assert ridge in RIDGES
    mean_w = torch.stack([m[0].weight for m in members]).mean(0)
    mean_b = torch.stack([m[0].bias for m in members]).mean(0)
    torch.testing.assert_close(fused[0].weight, mean_w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fused[0].bias, mean_b, atol=1e-3, rtol=1e-3)


def test_the_first_merged_layer_matches_the_members_normalised_mean(cnns):
    s = data.load_dataset("digits")
    spec = ef.permutation_spec(cnns[0], s.example)
    aligned = ef.align(cnns, spec)
    fused = ef.fuse(aligned, spec, depth=1, data=s.calib_batches, repair="lsq")
    first = spec.weight_layers[0]
    bn = following_bn(cnns[0], [first])[first]
    got = _capture(fused, fused.trunk.get_submodule(bn), s.x_val, want_input=False)
    want = torch.stack([_capture(m, m.get_submodule(bn), s.x_val, want_input=False) for m in aligned]).mean(0)
    assert float(((got - want) ** 2).mean() / want.var()) < 1e-6


def test_lsq_lifts_every_fused_point_above_bn_reset_on_a_narrow_cnn(cnns):
    s = data.load_dataset("digits")
    spec = ef.permutation_spec(cnns[0], s.example)
    aligned = ef.align(cnns, spec)

    def acc(m):
        with torch.no_grad():
            return float((m.eval()(s.x_val).argmax(1) == s.y_val).float().mean())
    for depth in range(2, len(spec.cut_points) + 1):
        bn = acc(ef.fuse(aligned, spec, depth=depth, data=s.calib_batches, repair="bn"))
        lsq = acc(ef.fuse(aligned, spec, depth=depth, data=s.calib_batches, repair="lsq"))
        assert lsq > bn + 0.2, (depth, bn, lsq)
    bn = acc(ef.fuse(aligned, spec, alpha=0.5, data=s.calib_batches, repair="bn"))
    lsq = acc(ef.fuse(aligned, spec, alpha=0.5, data=s.calib_batches, repair="lsq"))
    assert lsq > bn, (bn, lsq)


def test_lsq_leaves_the_inputs_alone(cnns):
    s = data.load_dataset("digits")
    spec = ef.permutation_spec(cnns[0], s.example)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in cnns]
    ef.fuse(cnns, spec, depth=2, data=s.calib_batches, repair="lsq")
    for m, state in zip(cnns, before):
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_each_members_isolated_units_are_refit_towards_that_member(cnns, monkeypatch):
    """Under alpha, a member's isolated units read merged features that lsq changed: refitting them (from the
    fused inputs and the member's own) brings their outputs closer to the member's own than its original weights
    do, on validation images the fit never saw."""
    s = data.load_dataset("digits")
    spec = ef.permutation_spec(cnns[0], s.example)
    aligned = ef.align(cnns, spec)
    fits, real = [], fuse_module.isolated_fits

    def spy(*args):
        made = real(*args)
        fits.extend(made)
        return made

    def errors(fused):
        out = []
        for fit in fits:
            where = fit.bn or fit.name
            got = _capture(fused, fused.heads[0].get_submodule(where), s.x_val, want_input=False)
            got = got[:, fit.channels:fit.channels + len(fit.units)]
            m = aligned[fit.parents[0]]
            want = _capture(m, m.get_submodule(where), s.x_val, want_input=False).index_select(1, fit.units)
            out.append(float(((got - want) ** 2).mean() / want.var()))
        return out

    monkeypatch.setattr(fuse_module, "isolated_fits", spy)
    refit = errors(ef.fuse(aligned, spec, alpha=0.5, data=s.calib_batches, repair="lsq"))
    assert len(fits) >= 2 * len(aligned)  # at least two layers with isolated units, one fit per member each
    monkeypatch.setattr(fuse_module, "isolated_fits", lambda *args: [])
    kept = errors(ef.fuse(aligned, spec, alpha=0.5, data=s.calib_batches, repair="lsq"))
    later = [(r, k) for fit, r, k in zip(fits, refit, kept) if fit.select is not None]  # past the shared input
    assert later and all(r < k for r, k in later), later


def _head_errors(fused, aligned, x) -> list[float]:
    """Per head, the mean squared distance of its logits to its own member's, relative to their variance."""
    with torch.no_grad():
        _, heads = fused(x)
        wants = [m(x) for m in aligned]
        return [float(((heads[:, i] - want) ** 2).mean() / want.var()) for i, want in enumerate(wants)]


def test_only_a_head_whose_input_also_takes_a_shortcut_gets_an_adapter(residuals, cnns):
    s = data.load_dataset("digits")
    spec = ef.permutation_spec(residuals[0], s.example)
    fused = ef.fuse(ef.align(residuals, spec), spec, depth=1, data=s.calib_batches, repair="lsq")
    assert all(isinstance(head.get_submodule(NAME), nn.Linear) for head in fused.heads)
    spec = ef.permutation_spec(cnns[0], s.example)
    fused = ef.fuse(ef.align(cnns, spec), spec, depth=2, data=s.calib_batches, repair="lsq")
    assert not any(NAME in dict(head.named_modules()) for head in fused.heads)


class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x.view(x.size(0), -1))


class _Skip(_Flat):
    def forward(self, x):
        return self.fc(x) + x


def test_a_head_that_only_asks_its_inputs_shape_needs_no_adapter():
    assert not needs_adapter(fx.symbolic_trace(_Flat()))
    assert needs_adapter(fx.symbolic_trace(_Skip()))


def test_the_adapter_brings_every_head_closer_to_its_member(residuals, monkeypatch):
    """On validation inputs the fit never saw, each head's logits are nearer its own member's with the adapter
    than with the first layer re-solved alone."""
    s = data.load_dataset("digits")
    spec = ef.permutation_spec(residuals[0], s.example)
    aligned = ef.align(residuals, spec)
    adapted = _head_errors(ef.fuse(aligned, spec, depth=1, data=s.calib_batches, repair="lsq", head_outputs=True),
                           aligned, s.x_val)
    monkeypatch.setattr(fuse_module, "adapt_heads", lambda *args: [])
    alone = _head_errors(ef.fuse(aligned, spec, depth=1, data=s.calib_batches, repair="lsq", head_outputs=True),
                         aligned, s.x_val)
    assert all(a < b for a, b in zip(adapted, alone)), (adapted, alone)


def test_lsq_on_copies_of_one_residual_net_keeps_its_function(residuals):
    s = data.load_dataset("digits")
    copies = [copy.deepcopy(residuals[0]) for _ in range(3)]
    spec = ef.permutation_spec(copies[0], s.example)
    fused = ef.fuse(copies, spec, depth=1, data=s.calib_batches, repair="lsq")
    with torch.no_grad():
        want = residuals[0](s.x_val)
        assert float(((fused(s.x_val) - want) ** 2).mean() / want.var()) < 1e-4


def test_batched_heads_with_adapters_give_the_same_outputs(residuals):
    s = data.load_dataset("digits")
    spec = ef.permutation_spec(residuals[0], s.example)
    aligned = ef.align(residuals, spec)
    fused = ef.fuse(aligned, spec, depth=1, data=s.calib_batches, repair="lsq")
    with torch.no_grad():
        torch.testing.assert_close(fused.batch_heads()(s.x_val), fused(s.x_val), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0), dilation=(2, 1), groups=2),
    nn.Conv2d(4, 4, 1),
], ids=["3x3", "strided-dilated-grouped", "1x1"])
def test_sampled_patches_are_unfolds_rows(conv):
    """A sample of regression rows is gathered from the padded input without unfolding the others: the same
    rows, in the same column order, as unfolding every position and keeping those."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 11)
    out = conv(x)
    keep = torch.randperm(out.shape[0] * out.shape[2] * out.shape[3])[:50]
    every = lsq._columns(conv, x)
    some = lsq._columns(conv, x, keep, (len(out), *out.shape[2:]))
    assert len(some) == conv.groups
    for a, b in zip(every, some):
        torch.testing.assert_close(b, a[keep], rtol=0, atol=0)
