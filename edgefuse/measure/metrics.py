"""What a candidate costs (MACs, parameters, counted from the layers that run) and how good it is (accuracy, NLL,
ECE, and whether two accuracies differ beyond noise)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..base.errors import EdgefuseError


def macs(module: nn.Module, example_input: torch.Tensor) -> int:
    """MACs for one sample: Linear and Conv layers as they are actually called (a head run N times counts N times),
    nn.MultiheadAttention's projections (4·E per output: Q, K, V and the output projection, which it calls as
    tensors, not layers), and any layer that says how many inputs each of its outputs reads
    (`inputs_per_output`)."""
    total = 0

    def hook(mod: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(mod, nn.MultiheadAttention):
            output, per_out = output[0], 4 * mod.embed_dim
        elif hasattr(mod, "inputs_per_output"):
            per_out = mod.inputs_per_output
        else:
            per_out = mod.weight.shape[1] if isinstance(mod, nn.Linear) else mod.weight[0].numel()
        total += output.numel() * per_out  # one sample: a member-axis layer's output is (N, 1, …)

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention))
               or hasattr(m, "inputs_per_output")]
    try:
        with torch.no_grad():
            module.eval()(example_input[:1])
    finally:
        for h in handles:
            h.remove()
    return int(total)


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def misclassification_auroc(confidence: np.ndarray, correct: np.ndarray) -> float | None:
    """How well `confidence` ranks the right answers above the wrong ones: the area under the ROC curve of telling
    correct from misclassified inputs (0.5: no better than chance), from scipy's ranks with ties shared (the
    Mann-Whitney statistic). None when every answer is right, or every one wrong: nothing to tell apart."""
    from scipy.stats import rankdata

    correct = np.asarray(correct, dtype=bool)
    right, wrong = int(correct.sum()), int((~correct).sum())
    if right == 0 or wrong == 0:
        return None
    ranks = rankdata(np.asarray(confidence, dtype=np.float64))
    return float((ranks[correct].sum() - right * (right + 1) / 2) / (right * wrong))


def mutual_information(head_logits: np.ndarray) -> np.ndarray:
    """Per input, how much N heads disagree: the entropy of their mean probabilities minus the mean of their own
    entropies (the ensemble's mutual information, BALD). 0 when every head gives the same distribution; it grows
    when each head is sure of a different class, which one confident model cannot express. (batch, N, classes)."""
    logp = torch.log_softmax(torch.from_numpy(np.asarray(head_logits)).double(), -1)
    p = logp.exp()
    mean = p.mean(1)
    entropy_of_mean = -(mean * torch.log(mean.clamp_min(1e-300))).sum(-1)
    mean_entropy = -(p * logp).sum(-1).mean(1)
    return (entropy_of_mean - mean_entropy).clamp_min(0).numpy()


def scores(logits: np.ndarray, labels: torch.Tensor, bins: int = 15,
           head_logits: np.ndarray | None = None) -> dict[str, float | None]:
    """Accuracy, mean negative log-likelihood of log-softmax(logits), expected calibration error (15 equal-width
    confidence bins: fused models can be as accurate yet over-confident), `auroc`, how well the max softmax
    probability flags the misclassified inputs, and `heads_auroc`, how well the heads' disagreement (low mutual
    information = trusted) flags them (None without heads). Non-finite outputs are an error: a NaN row would
    otherwise count as a wrong answer and pass as a result."""
    bad = int((~np.isfinite(logits)).any(axis=tuple(range(1, logits.ndim))).sum()) if logits.size else 0
    if bad:
        raise EdgefuseError(f"the model gives non-finite outputs for {bad} of {len(logits)} inputs")
    t = torch.from_numpy(np.asarray(logits)).double()
    nll = torch.nn.functional.cross_entropy(t, labels).item()
    conf, pred = torch.softmax(t, 1).max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(inside.double().mean() * (conf[inside].mean() - correct[inside].mean()).abs())
    right = correct.numpy().astype(bool)
    heads = None if head_logits is None else misclassification_auroc(-mutual_information(head_logits), right)
    return {"accuracy": float(correct.mean()), "nll": float(nll), "ece": ece,
            "auroc": misclassification_auroc(conf.numpy(), right), "heads_auroc": heads}


def paired_z(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """How many standard errors apart two classifiers' accuracies are on the same samples (McNemar's statistic,
    signed: positive when `a` is better). Only the samples they disagree on carry information, so two members that
    differ on 3 % of the images need a much smaller gap to be told apart than two unrelated models."""
    a_only = int((correct_a & ~correct_b).sum())
    b_only = int((~correct_a & correct_b).sum())
    if a_only + b_only == 0:
        return 0.0
    return (a_only - b_only) / math.sqrt(a_only + b_only)
