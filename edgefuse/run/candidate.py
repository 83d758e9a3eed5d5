"""A candidate row: what one shippable model scored on validation and test data and what it cost on the target,
measured the same way for every kind (member, distilled member, exact ensemble, fused point)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..align import DEFAULT_METHOD
from ..fuse.repair import DEFAULT_REPAIR
from ..models.data import Splits
from ..measure.metrics import macs, params, scores
from ..measure.runners import OrtRunner, Runner, TorchRunner, predict, scoring_threads, stream_latency
from ..measure.uncertainty import flag_rule
from ..targets import DEFAULT_BINDS
from .kept import kept_outputs

KINDS = ("member", "distilled member", "sub-ensemble", "ensemble", "fused", "cascade")


@dataclass(frozen=True)
class Point:
    """What to build: member `value` (kind "member"), a depth split or neuron-level fusion at `alpha`; with the
    alignment method, the repair, and whether it is then distilled towards the ensemble."""
    kind: str
    value: float
    method: str = DEFAULT_METHOD
    repair: str | None = DEFAULT_REPAIR
    distill: bool = False
    precision: str = "fp32"

    @property
    def key(self) -> str:
        int8 = "-int8" if self.precision == "int8" else ""
        if self.kind == "member":
            return f"member{int(self.value)}" + ("-distilled" if self.distill else "") + int8
        return f"{self.method}-{self.kind}{self.value:g}-{self.repair or 'none'}" + \
            ("-distill" if self.distill else "") + int8

    @property
    def label(self) -> str:
        int8 = ", INT8" if self.precision == "int8" else ""
        if self.kind == "member":
            return f"member {int(self.value)}" + (" distilled" if self.distill else "") + int8
        what = f"depth {int(self.value)}" if self.kind == "depth" else f"alpha {self.value:g}"
        extra = [x for x in (self.method if self.method != "weight" else "",
                             f"repair {self.repair}" if self.repair != "bn" else "") if x]
        return what + (f" ({', '.join(extra)})" if extra else "") + (" + distill" if self.distill else "") + int8

    def as_int8(self) -> Point:
        return replace(self, precision="int8")

    @property
    def row_kind(self) -> str:
        if self.kind == "member":
            return "distilled member" if self.distill else "member"
        return "fused"


@dataclass(frozen=True)
class Candidate:
    """One row of the report. `validation` and `test` hold accuracy, NLL and ECE; the choice reads only
    `validation` (and `val_correct`, per sample, for the noise test), the report quotes `test`. `uncertainty`: the
    signal and threshold (chosen on validation) that flag inputs it should not be trusted on."""
    key: str
    label: str
    kind: str
    validation: dict[str, float]
    test: dict[str, float]
    macs: int
    params: int
    latency_by_batch: dict[str, dict[str, float]]
    runtime: str
    peak_memory_mb: float | None = None
    onnx_nodes: int | None = None
    agreement: float | None = None
    file: str | None = None
    point: Point | None = None
    batched_heads: bool = False
    distill: str | None = None
    precision: str = "fp32"
    quantization: dict | None = None
    uncertainty: dict | None = None
    members: tuple[int, ...] | None = None  # a sub-ensemble's members, by index
    cascade: dict | None = None  # a cascade's rule, stage graphs, escalation rates and worst-case MACs
    combine: str | None = None  # how a row that combines members does it: "mean" of logits or "probs"
    merge: dict | None = None  # a merge's method, its parameters (chosen on validation) and the members merged
    seconds: dict[str, float] | None = None  # where its time went: fuse and repair, distill, export, measure
    form: str | None = None  # an α model's graph form: blocks, dense or branches, the fastest (run/forms.py)
    val_correct: np.ndarray | None = field(default=None, repr=False, compare=False)
    test_predictions: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def depth(self) -> int | None:
        if self.kind == "ensemble":
            return 0
        return int(self.point.value) if self.point and self.point.kind == "depth" else None

    @property
    def alpha(self) -> float | None:
        return self.point.value if self.point and self.point.kind == "alpha" else None

    @property
    def uncertainty_auroc(self) -> float | None:
        """Validation AUROC of the better of its misclassification signals (max softmax, heads' disagreement)."""
        values = [v for v in (self.validation.get("auroc"), self.validation.get("heads_auroc")) if v is not None]
        return max(values) if values else None

    @property
    def accuracy(self) -> float:
        """Validation accuracy: the number every choice is made on."""
        return self.validation["accuracy"]

    def p50(self, batch: str) -> float:
        return self.latency_by_batch[batch]["p50"]

    def latency(self, batch: str, binds: str = DEFAULT_BINDS) -> float:
        """The latency figure a budget binds: the expected cost per call (measure/runners.summarize; rows measured
        before it was recorded give their p50) or the p99."""
        lat = self.latency_by_batch[batch]
        return lat["p99"] if binds == "p99" else lat.get("expected", lat["p50"])

    def cost_macs(self, binds: str = DEFAULT_BINDS) -> int:
        """MACs per input: a cascade's mean on validation, or its worst case where the budget binds the p99."""
        return self.cascade["macs_worst"] if binds == "p99" and self.cascade else self.macs

    def to_json(self, root: str | Path | None = None, stored: bool = False) -> dict:
        """The JSON row: test scores at the top level (the report's contract), both splits spelled out, the file
        relative to `root`. `stored=True` keeps the per-sample columns, for resumable sweep points."""
        out = {k: v for k, v in asdict(self).items() if k not in ("val_correct", "test_predictions", "point")}
        out |= self.test | {"latency_ms": self.latency_by_batch[next(iter(self.latency_by_batch))],
                            "depth": self.depth, "alpha": self.alpha,
                            "point": asdict(self.point) if self.point else None}
        if self.file and root is not None:
            out["file"] = os.path.relpath(self.file, root)
        if self.cascade and root is not None:
            out["cascade"] = self.cascade | {"stages": [os.path.relpath(f, root) for f in self.cascade["stages"]]}
        if stored:
            out["val_correct"] = np.packbits(self.val_correct).tobytes().hex()
            out["n_val"] = len(self.val_correct)
            out["test_predictions"] = self.test_predictions.tolist()
        return out

    @classmethod
    def from_json(cls, row: dict, root: str | Path) -> Candidate:
        """A stored sweep point, exactly as it was measured."""
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in row.items() if k in names}
        kw["point"] = Point(**row["point"]) if row.get("point") else None
        kw["members"] = tuple(row["members"]) if row.get("members") is not None else None
        kw["file"] = str(Path(root) / row["file"]) if row.get("file") else None
        if row.get("cascade"):
            kw["cascade"] = row["cascade"] | {"stages": [str(Path(root) / f) for f in row["cascade"]["stages"]]}
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(row["val_correct"]), dtype=np.uint8))
        kw["val_correct"] = bits[:row["n_val"]].astype(bool)
        kw["test_predictions"] = np.asarray(row["test_predictions"])
        return cls(**kw)


def measure(module: nn.Module, splits: Splits, onnx_path: str | Path | None = None,
            batch_sizes: tuple[int, ...] = (1,), threads: int = 1,
            runner: Runner | None = None, predictor: Runner | None = None, cache: Path | None = None,
            **fields) -> Candidate:
    """Score `module` on the validation and test splits and time it, through `runner` when given, else the ONNX
    file when given, else PyTorch. Scores come from the same graph run on every core (`predictor`): only the timing
    needs the target's thread count; a graph's outputs are kept in `cache` (run/kept.py) for the next run. MACs and
    parameters always come from `module`."""
    runner = runner or (OrtRunner(onnx_path, threads) if onnx_path else TorchRunner(module, threads))
    predictor = predictor or (OrtRunner(onnx_path, scoring_threads()) if onnx_path else runner)
    val, val_heads = kept_outputs(cache, predictor, splits, "validation")
    test, test_heads = kept_outputs(cache, predictor, splits, "test")
    x_test = splits.x_test.numpy()
    lat = {str(b): stream_latency(runner, x_test, b) for b in batch_sizes}
    fields.setdefault("file", str(onnx_path) if onnx_path else None)
    rule = flag_rule((val, val_heads), splits.y_val.numpy(), (test, test_heads), splits.y_test.numpy())
    return Candidate(validation=scores(val, splits.y_val, head_logits=val_heads),
                     test=scores(test, splits.y_test, head_logits=test_heads), uncertainty=rule,
                     macs=macs(module, splits.x_test[:1]), params=params(module), latency_by_batch=lat,
                     runtime=runner.name, val_correct=(val.argmax(1) == splits.y_val.numpy()),
                     test_predictions=test.argmax(1), **fields)


def with_agreement(c: Candidate, reference: np.ndarray) -> Candidate:
    """The share of test images on which `c` predicts what the exact ensemble predicts."""
    return replace(c, agreement=float((c.test_predictions == reference).mean()))


def torch_predictions(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    return predict(TorchRunner(module.eval(), threads=torch.get_num_threads()), x).argmax(1)
