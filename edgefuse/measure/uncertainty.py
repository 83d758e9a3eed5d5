"""Which inputs a deployed model should not be trusted on: a confidence signal (the max softmax probability, or the
heads' mutual information where the graph outputs head_logits) and a threshold on it, both chosen on validation data
and then measured on test data, so a device can flag inputs with one comparison."""
from __future__ import annotations

import numpy as np
import torch

from .metrics import misclassification_auroc, mutual_information

SIGNALS = ("max_softmax", "mutual_information")
FLAG_WHEN = {"max_softmax": "below", "mutual_information": "above"}


def signal_values(signal: str, logits: np.ndarray, head_logits: np.ndarray | None) -> np.ndarray:
    """The signal per input, in its own units: max softmax probability, or the heads' mutual information (nats)."""
    if signal == "max_softmax":
        return torch.softmax(torch.from_numpy(np.asarray(logits)).double(), 1).max(1).values.numpy()
    return mutual_information(head_logits)


def _trust(signal: str, values: np.ndarray) -> np.ndarray:
    """Higher = more trusted, whatever the signal's direction."""
    return values if FLAG_WHEN[signal] == "below" else -values


def youden_threshold(trust: np.ndarray, correct: np.ndarray) -> float:
    """The trust threshold that best separates right from wrong answers: the ROC point maximising (share of errors
    flagged) − (share of right answers flagged), inputs below the threshold being flagged."""
    order = np.argsort(trust, kind="stable")
    t, c = trust[order], correct[order]
    wrong, right = np.cumsum(~c), np.cumsum(c)  # flagged counts when the threshold sits just above t[i]
    last = np.r_[t[1:] != t[:-1], True]  # only between distinct values
    j = np.where(last, wrong / max((~c).sum(), 1) - right / max(c.sum(), 1), -np.inf)
    i = int(np.argmax(j))
    return float(t[i + 1] if i + 1 < len(t) else np.nextafter(t[i], np.inf))


def _effect(trust: np.ndarray, correct: np.ndarray, threshold: float) -> dict[str, float | None]:
    flagged = trust < threshold
    kept = ~flagged
    return {"flagged": float(flagged.mean()),
            "kept_accuracy": float(correct[kept].mean()) if kept.any() else None,
            "errors_flagged": float(flagged[~correct].mean()) if (~correct).any() else None}


def flag_rule(val: tuple[np.ndarray, np.ndarray | None], y_val: np.ndarray,
              test: tuple[np.ndarray, np.ndarray | None], y_test: np.ndarray) -> dict | None:
    """The signal with the higher validation AUROC and its Youden threshold, with what it does on both splits: share
    of inputs flagged, accuracy on the rest, share of the errors caught. `val`/`test` are (logits, head_logits or
    None). None when validation has no error or no right answer to tell apart."""
    signals = SIGNALS if val[1] is not None else SIGNALS[:1]
    correct_val = np.asarray(val[0]).argmax(1) == np.asarray(y_val)
    aurocs = {s: misclassification_auroc(_trust(s, signal_values(s, *val)), correct_val) for s in signals}
    if any(a is None for a in aurocs.values()):
        return None
    signal = max(signals, key=lambda s: aurocs[s])
    trust_val = _trust(signal, signal_values(signal, *val))
    threshold = youden_threshold(trust_val, correct_val)
    trust_test = _trust(signal, signal_values(signal, *test))
    correct_test = np.asarray(test[0]).argmax(1) == np.asarray(y_test)
    return {"signal": signal, "flag_when": FLAG_WHEN[signal],
            "threshold": threshold if FLAG_WHEN[signal] == "below" else -threshold,
            "validation_auroc": aurocs[signal],
            "validation": _effect(trust_val, correct_val, threshold),
            "test": _effect(trust_test, correct_test, threshold)}
