"""The one output comparator: two lists of outputs (a graph's and its reference's) compared for count, shape,
finiteness and size of difference. ONNX parity, the FP16 and INT8 drops, the bundle's self-check and the device's
golden check all read it.

numpy only, and no package imports: it is copied as-is into every deploy bundle."""
from __future__ import annotations

import numpy as np


def differences(outputs: list[np.ndarray], references: list[np.ndarray]) -> tuple[float, list[str]]:
    """The largest |output − reference| over every output, and what makes the two incomparable (output count,
    shapes, NaN or Inf on either side), one line each; with any such line the difference is inf."""
    if len(outputs) != len(references):
        return float("inf"), [f"{len(outputs)} outputs, {len(references)} references"]
    worst, problems = 0.0, []
    for i, (got, ref) in enumerate(zip(outputs, references)):
        got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
        if got.shape != ref.shape:
            problems.append(f"output {i}: shape {got.shape}, reference {ref.shape}")
            continue
        bad = int((~np.isfinite(got)).sum() + (~np.isfinite(ref)).sum())
        if bad:
            problems.append(f"output {i}: {bad} NaN or Inf values")
            continue
        if got.size:
            worst = max(worst, float(np.abs(got - ref).max()))
    return (float("inf") if problems else worst), problems


def mismatches(outputs: list[np.ndarray], references: list[np.ndarray], atol: float, rtol: float) -> list[str]:
    """One line per output that cannot be compared or differs beyond atol + rtol·|reference| anywhere; an empty
    list means a match."""
    _, problems = differences(outputs, references)
    if problems:
        return problems
    for i, (got, ref) in enumerate(zip(outputs, references)):
        got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
        excess = np.abs(got - ref) - (atol + rtol * np.abs(ref))
        if (excess > 0).any():
            problems.append(f"output {i}: max |diff| {np.abs(got - ref).max():.3g} exceeds atol {atol} + "
                            f"rtol {rtol}·|ref| at {int((excess > 0).sum())} values")
    return problems
