import pytest
import torch

import edgefuse as ef
from edgefuse.models import data
from edgefuse.fuse.split import average_state


def _outputs(models, x):
    with torch.no_grad():
        return torch.stack([m(x) for m in models])


@pytest.mark.parametrize("which", ["mlps", "cnns"])
def test_depth_zero_is_the_ensemble(which, request, digits_split):
    models = request.getfixturevalue(which)
    calib, x, _ = digits_split
    spec = ef.permutation_spec(models[0], x[:2])
    fused = ef.fuse(models, spec, depth=0, data=data.batches(calib))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), _outputs(models, x).mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ef.ensemble(models)(x), _outputs(models, x).mean(0), atol=1e-5, rtol=1e-5)


def test_full_depth_is_the_weight_average(mlps, digits_split):
    _, x, _ = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    fused = ef.fuse(mlps, spec, depth=len(spec.cut_points), repair=None)
    merged = ef.permute(mlps[0], spec, spec.identity_perms())
    merged.load_state_dict(average_state(mlps))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), merged(x), atol=1e-5, rtol=1e-5)
    assert ef.macs(fused, x) < ef.macs(ef.ensemble(mlps), x) / 2


def test_macs_fall_with_depth(cnns, digits_split):
    calib, x, _ = digits_split
    spec = ef.permutation_spec(cnns[0], x[:2])
    costs = [ef.macs(ef.fuse(cnns, spec, depth=k, data=data.batches(calib)), x)
             for k in range(len(spec.cut_points) + 1)]
    assert costs == sorted(costs, reverse=True) and costs[0] == 4 * ef.macs(cnns[0], x)


def test_fusion_never_touches_inputs(cnns, digits_split):
    calib, x, _ = digits_split
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in cnns]
    spec = ef.permutation_spec(cnns[0], x[:2])
    fused = ef.fuse(cnns, spec, depth=2, data=data.batches(calib))
    own = {p.data_ptr() for m in cnns for p in m.state_dict().values()}
    assert not own & {p.data_ptr() for p in fused.state_dict().values()}
    for m, b in zip(cnns, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k])


def test_bn_repair_helps_the_merged_cnn(cnns, digits_split):
    """At depth 1 (first conv merged) the merged model is far from chance, so the repair's effect is measurable; the
    full merge of these 4 small CNNs is at chance with or without it (0.07–0.12), where a comparison means nothing."""
    calib, x, y = digits_split
    spec = ef.permutation_spec(cnns[0], x[:2])
    aligned = ef.align(cnns, spec)
    acc = {}
    for repair in (None, "bn"):
        with torch.no_grad():
            out = ef.fuse(aligned, spec, depth=1, data=data.batches(calib), repair=repair)(x)
        acc[repair] = (out.argmax(1) == y).float().mean().item()
    assert acc["bn"] > acc[None] + 0.1


@pytest.mark.parametrize("kwargs,msg", [({"depth": 99}, "depth must be between"), ({"depth": 1, "repair": "x"},
                                        "unknown repair"), ({}, "needs depth"), ({"depth": 1, "data": []}, "empty")])
def test_bad_fuse_arguments(cnns, digits_split, kwargs, msg):
    _, x, _ = digits_split
    spec = ef.permutation_spec(cnns[0], x[:2])
    with pytest.raises(ef.EdgefuseError, match=msg):
        ef.fuse(cnns, spec, **kwargs)


def test_a_registered_repair_is_what_fuse_runs_and_names_it(cnns, digits_split, monkeypatch):
    """Adding a repair is registering one function: fuse() runs it on the merged model, and an unknown name lists
    the registered ones."""
    from edgefuse.fuse.repair import REPAIRS, Repair

    calib, x, _ = digits_split
    seen = []
    def zero_logits(job):
        seen.append(job)
        for head in job.fused.heads:
            last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.data.zero_()
    monkeypatch.setitem(REPAIRS, "zero-logits", Repair("zero-logits", zero_logits, "test"))
    spec = ef.permutation_spec(cnns[0], x[:2])
    fused = ef.fuse(cnns[:2], spec, depth=1, data=[calib[:100]], repair="zero-logits")
    assert len(seen) == 1 and seen[0].aligned[0] is cnns[0] and seen[0].layouts is None
    with torch.no_grad():
        out = fused(x[:8])
    assert torch.allclose(out, out[:1].expand_as(out))  # zeroed head weights: every input gets the biases
    with pytest.raises(ef.EdgefuseError, match="choose from .*zero-logits"):
        ef.fuse(cnns[:2], spec, depth=1, data=[calib[:100]], repair="nothing-like-it")
