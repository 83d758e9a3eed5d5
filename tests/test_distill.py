"""Distillation as a training phase: augmentation is a real shift/flip, the student moves towards the teacher, the
teacher never changes, and fixed seeds give the same student twice."""
import copy

import pytest
import torch

import edgefuse as ef
from edgefuse.fuse import DistillConfig, distill
from edgefuse.fuse.distill import shift_flip


def test_shift_flip_is_a_shift_and_a_flip_of_each_image():
    torch.manual_seed(0)
    x = torch.zeros(16, 1, 12, 12)
    x[:, :, 2:10, 2:10] = torch.rand(16, 1, 8, 8)  # content away from the border, so no shift crops it
    out = shift_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    flips = 0
    for img, src in zip(out, x):
        padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
        views = {(dy, dx, f): (padded[:, dy:dy + 12, dx:dx + 12].flip(-1) if f else padded[:, dy:dy + 12, dx:dx + 12])
                 for dy in range(5) for dx in range(5) for f in (False, True)}
        match = [k for k, v in views.items() if torch.equal(v, img)]
        assert match, "every output is one of the 50 shifted/flipped copies of its input"
        flips += match[0][2]
    assert 0 < flips < 16  # both flipped and unflipped images occur
    assert torch.equal(shift_flip(x.flatten(1), torch.Generator()), x.flatten(1))  # not images: unchanged


def _kl(student, teacher, x):
    with torch.no_grad():
        return torch.nn.functional.kl_div(torch.log_softmax(student(x), -1), torch.log_softmax(teacher(x), -1),
                                          log_target=True, reduction="batchmean").item()


def test_distillation_moves_the_student_only_and_repeats_exactly(mlps, digits_split):
    calib, x, _ = digits_split
    teacher = ef.ensemble(mlps)
    before = copy.deepcopy(teacher.state_dict())
    cfg = DistillConfig(steps=60, batch_size=64)
    a = distill(copy.deepcopy(mlps[0]), teacher, calib, cfg, quiet=True)
    b = distill(copy.deepcopy(mlps[0]), teacher, calib, cfg, quiet=True)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert _kl(a, teacher, x) < _kl(mlps[0], teacher, x)
    c = distill(copy.deepcopy(mlps[0]), teacher, calib, DistillConfig(steps=60, batch_size=64, seed=1), quiet=True)
    assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_distillation_refuses_no_data_and_non_finite_inputs(mlps):
    teacher = ef.ensemble(mlps)
    with pytest.raises(ef.EdgefuseError, match="unlabeled inputs"):
        distill(copy.deepcopy(mlps[0]), teacher, torch.zeros(0, 1, 8, 8), quiet=True)
    bad = torch.full((8, 1, 8, 8), float("nan"))
    with pytest.raises(ef.EdgefuseError, match="not finite"):
        distill(copy.deepcopy(mlps[0]), teacher, bad, DistillConfig(steps=2, batch_size=4), quiet=True)
    with pytest.raises(ef.EdgefuseError, match="at least 1 step"):
        DistillConfig(steps=0)


def test_students_of_one_run_share_one_teacher_pass_and_learn_the_same(mlps, digits_split):
    calls = {"n": 0}

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls["n"] += 1
            return self.inner(x)

    teacher = Counting(ef.ensemble(mlps))
    x = digits_split[0][:300]
    cfg = DistillConfig(steps=6, batch_size=32)
    alone = distill(copy.deepcopy(mlps[0]), teacher, x, cfg, quiet=True)
    assert calls["n"] == 6
    shared: list = []
    first = distill(copy.deepcopy(mlps[0]), teacher, x, cfg, quiet=True, targets=shared)
    second = distill(copy.deepcopy(mlps[1]), teacher, x, cfg, quiet=True, targets=shared)
    assert calls["n"] == 12 and len(shared) == 6  # the second student's teacher outputs came from the first's pass
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), first.state_dict().values()))
    again = distill(copy.deepcopy(mlps[1]), teacher, x, cfg, quiet=True)
    assert all(torch.equal(a, b) for a, b in zip(second.state_dict().values(), again.state_dict().values()))
