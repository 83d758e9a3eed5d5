"""The depth choice: most accurate within the MACs share, never slower than an exact ensemble."""
from edgefuse.pipeline import choose_depth
from edgefuse.targets import parse_target

TARGET = parse_target("t", 'runtime = "onnxruntime"\ndevice = "cpu"\nbatch_sizes = [1, 32]\n')


def _row(depth, acc, macs, p50_b1, p50_b32):
    return {"depth": depth, "accuracy": acc, "macs": macs, "latency_ms": {"p50": p50_b1},
            "latency_by_batch": {"1": {"p50": p50_b1}, "32": {"p50": p50_b32}}}


ROWS = [_row(0, 0.92, 100, 1.0, 30.0), _row(1, 0.90, 80, 0.9, 25.0), _row(2, 0.85, 50, 0.6, 15.0),
        _row(3, 0.80, 30, 0.4, 9.0), _row(4, 0.70, 25, 0.3, 8.0)]


def test_most_accurate_within_the_macs_share():
    assert choose_depth(ROWS, ROWS[0], TARGET) == 2


def test_never_slower_than_the_best_exact_ensemble():
    # The batched ensemble runs b1 in 0.5 ms: depth 2 (0.6 ms) is dominated there, depth 3 is not.
    baseline = {"1": {"name": "ensemble_batched", "p50": 0.5}, "32": {"name": "ensemble", "p50": 30.0}}
    assert choose_depth(ROWS, ROWS[0], TARGET, baseline) == 3


def test_ensemble_when_every_fused_model_is_slower():
    baseline = {"1": {"name": "ensemble_batched", "p50": 0.2}, "32": {"name": "ensemble", "p50": 30.0}}
    assert choose_depth(ROWS, ROWS[0], TARGET, baseline) == 0
