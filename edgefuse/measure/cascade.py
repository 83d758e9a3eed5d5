"""A cascade run by onnxruntime as its two stage graphs and a host loop: the first stage's graph on every input,
the second stage's on the rows the gate escalates (gathered), the rule of base/cascade.py in between. That is the
form a device runs (one engine per stage) and the only form of a capped cascade; `Cascade.load` opens an exported
cascade folder, and is `ef.Cascade`."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..base.cascade import CascadeRule, read_cascade, write_description
from .runners import OrtRunner


class Cascade:
    """Callable on a batch of inputs (numpy, the models' input shape): the cascade's logits. `last_escalated` is
    the mask of the last call. The second stage's graph outputs each of its members' logits (batch, k, classes),
    as its second output when it has two (a batched ensemble with head outputs), else as its only output (one
    member)."""

    def __init__(self, rule: CascadeRule, first: str | Path, rest: str | Path, threads: int = 1) -> None:
        self.rule = rule
        self.first, self.rest = OrtRunner(first, threads), OrtRunner(rest, threads)
        self.name = f"{self.first.name} cascade"
        self.last_escalated = np.zeros(0, dtype=bool)

    def _rest(self, x: np.ndarray) -> np.ndarray:
        out = self.rest.outputs(x)
        return out[1] if len(out) > 1 else out[0][:, None]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y, self.last_escalated = self.rule.run(np.ascontiguousarray(x, dtype=np.float32), self.first, self._rest)
        return y

    @classmethod
    def load(cls, folder: str | Path, threads: int = 1) -> Cascade:
        """An exported cascade (base/cascade.read_cascade): its rule and two stage graphs, each checked before
        anything runs; a missing, swapped or edited graph is one CascadeError."""
        rule, paths = read_cascade(folder)
        return cls(rule, *paths, threads=threads)


def write_cascade(row, folder: Path) -> dict:
    """A cascade row's stage graphs and description in `folder` (stage1.onnx, stage2.onnx, cascade.json): what
    `Cascade.load` and a device's two engines run. Returns the description."""
    folder.mkdir(parents=True, exist_ok=True)
    files = ("stage1.onnx", "stage2.onnx")
    for src, name in zip(row.cascade["stages"], files):
        shutil.copyfile(src, folder / name)
    return write_description(folder, CascadeRule.from_json(row.cascade), files, key=row.key, label=row.label,
                             escalated=row.cascade["escalated"])


def predict_cascade(cascade: Cascade, x, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Outputs and escalation mask for a whole dataset, batch by batch."""
    outs, masks = [], []
    for i in range(0, len(x), batch_size):
        outs.append(cascade(np.asarray(x[i:i + batch_size])))
        masks.append(cascade.last_escalated)
    return np.concatenate(outs), np.concatenate(masks)


def calls_escalated(mask: np.ndarray, batch_size: int) -> float:
    """The share of calls at `batch_size` over the inputs in order that run the second stage."""
    n = len(mask) // batch_size * batch_size or len(mask)
    return float(mask[:n].reshape(-1, min(batch_size, n)).any(1).mean())
