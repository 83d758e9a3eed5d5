"""The latency stream's stopping rule: a third pass runs only where it could move p50 or the mean noticeably."""
import numpy as np
import pytest

from edgefuse.measure import runners


class Clock:
    """A perf_counter the runner advances: each call takes the next scripted duration (seconds)."""

    def __init__(self, durations) -> None:
        self.now, self.durations = 0.0, iter(durations)

    def perf_counter(self) -> float:
        return self.now

    def run(self, _batch) -> None:
        self.now += next(self.durations)


def timed(monkeypatch, durations) -> dict:
    clock = Clock(durations)
    monkeypatch.setattr(runners.time, "perf_counter", clock.perf_counter)
    return runners.stream_latency(clock.run, np.zeros((40, 1, 2, 2), np.float32), 1, min_inputs=40, warmup=0)


def test_two_passes_that_agree_settle_the_figures(monkeypatch):
    lat = timed(monkeypatch, [0.002] * 40 + [0.00201] * 40 + [1.0] * 40)  # a third pass would be an outlier
    assert lat["passes"] == 2 and lat["runs"] == 80 and lat["p50"] == pytest.approx(2.005, rel=1e-6)


def test_passes_that_disagree_run_a_third_whose_median_decides(monkeypatch):
    lat = timed(monkeypatch, [0.002] * 40 + [0.003] * 40 + [0.0025] * 40)
    assert lat["passes"] == 3 and lat["runs"] == 120 and lat["p50"] == pytest.approx(2.5)


def test_the_settled_figures_lie_within_the_precision_of_the_full_run():
    rng, checked = np.random.default_rng(0), 0
    for _ in range(200):
        a = rng.uniform(1, 2, 50)
        b = a * rng.uniform(0.99, 1.01, 50)
        c = a * rng.uniform(0.5, 2.0, 50)
        if runners.settled([a, b]):
            checked += 1
            two, three = np.median([a, b], 0), np.median([a, b, c], 0)
            for stat in (np.mean, lambda v: np.percentile(v, 50)):
                assert abs(stat(two) - stat(three)) <= runners.PRECISION * stat(three)
    assert checked > 100


def test_a_torch_runner_leaves_the_callers_thread_count():
    """Timing on one thread must not leave repairs and distillation that follow on one thread."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runner = runners.TorchRunner(torch.nn.Linear(3, 2), threads=1)
        seen = []
        runner.module.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
        runner(np.zeros((4, 3), np.float32))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
