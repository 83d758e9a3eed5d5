"""Static target check: will this ONNX file build with the target's TensorRT? Opset, operators with their tensor
types, DLA fallbacks and the batch profile, read from the file alone, so it runs on any machine."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ..base.errors import EdgefuseError
from ..graph.read import read_onnx
from ..targets import Target, opset_range

TABLE = Path(__file__).with_name("trt_operators.csv")
KNOWN = ((8, 5), (8, 6), (10, 0), (10, 1))
# Layer families DLA runs (shared/tensorrt/README.md); the rest falls back to the GPU. GlobalAveragePool is left
# out on purpose: some DLA versions lack it, so it is reported rather than promised.
DLA_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "MaxPool",
           "AveragePool", "BatchNormalization", "Add", "Sub", "Mul", "Div", "Max", "Min", "Concat"}
# Shape plumbing that TensorRT folds or runs on shape tensors, never as DLA layers.
SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Constant", "Cast", "Concat", "Slice",
             "Identity"}
TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL"}


@dataclass
class CheckReport:
    target: str
    tensorrt: str
    table_version: str
    opset: int
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dla_fallback: list[str] = field(default_factory=list)
    operators: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {"target": self.target, "tensorrt": self.tensorrt, "table_version": self.table_version,
                "opset": self.opset, "ok": self.ok, "errors": self.errors, "notes": self.notes,
                "dla_fallback": self.dla_fallback, "operators": self.operators}


@cache
def support_table() -> dict[tuple[int, int], dict[str, tuple[bool, frozenset[str]]]]:
    """{TensorRT version: {operator: (supported, types)}} from the onnx-tensorrt operator matrix."""
    table: dict = {}
    with TABLE.open() as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        for r in rows:
            version = tuple(int(p) for p in r["tensorrt"].split("."))
            table.setdefault(version, {})[r["operator"]] = (r["supported"] == "Y", frozenset(r["types"].split()))
    return table


def closest_table(version: tuple[int, int]) -> tuple[int, int]:
    """The newest known table not newer than `version` (10.3 reads 10.1); the oldest when older than all."""
    older = [v for v in KNOWN if v <= version]
    return max(older) if older else min(KNOWN)


def _types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {t.name: t.data_type for t in g.initializer}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        out[v.name] = v.type.tensor_type.elem_type
    return out


def check_onnx(path: str | Path, target: Target) -> CheckReport:
    """Everything the TensorRT parser and builder would refuse, found before a device is involved."""
    if target.runtime != "tensorrt":
        raise EdgefuseError(f"target '{target.name}' runs on {target.runtime}, not TensorRT: nothing to check")
    model = read_onnx(path)
    version = target.trt_version
    known = closest_table(version)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    report = CheckReport(target.name, target.tensorrt, "%d.%d" % known, opset)
    if known != version:
        report.notes.append(f"TensorRT {target.tensorrt} is not in the operator table; checked against "
                            f"{known[0]}.{known[1]}, the closest older release listed")
    low, high = opset_range(version)
    if not low <= opset <= high:
        report.errors.append(f"opset {opset} is outside what TensorRT {target.tensorrt} parses ({low} to {high})")
    table, types = support_table()[known], _types(model)
    for node in model.graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        report.operators[op] = report.operators.get(op, 0) + 1
    for op in sorted(report.operators):
        if op not in table or not table[op][0]:
            report.errors.append(f"operator {op} is not supported by the TensorRT {known[0]}.{known[1]} ONNX parser")
    for node in model.graph.node:
        entry = table.get(node.op_type)
        if not entry or not entry[0] or not node.input or not node.input[0]:
            continue
        t = TYPE_NAMES.get(types.get(node.input[0], 0))
        t = "INT32" if t == "INT64" else t  # TensorRT casts INT64 tensors down to INT32
        if t and entry[1] and t not in entry[1]:
            report.errors.append(f"node {node.name or node.op_type}: {node.op_type} on {t} is not supported "
                                 f"(TensorRT {known[0]}.{known[1]} takes {' '.join(sorted(entry[1]))})")
    _check_shapes(model, target, report)
    if target.dla_core is not None:
        report.dla_fallback = sorted(op for op in report.operators if op not in DLA_OPS | SHAPE_OPS)
        if report.dla_fallback and not target.gpu_fallback:
            report.errors.append("without GPU fallback DLA cannot run: " + ", ".join(report.dla_fallback))
    return report


def _check_shapes(model, target: Target, report: CheckReport) -> None:
    """The batch axis must be dynamic when the profile spans several sizes; every other axis must be static."""
    low, _, high = target.batch_profile
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if not dims:
            report.errors.append(f"input {inp.name} has no shape")
            continue
        batch = dims[0]
        if batch.HasField("dim_value") and low != high:
            report.errors.append(f"input {inp.name} has a fixed batch of {batch.dim_value}; the profile needs "
                                 f"{low} to {high}")
        if batch.HasField("dim_value") and not low <= batch.dim_value <= high:
            report.errors.append(f"input {inp.name} has batch {batch.dim_value}, outside the profile {low}..{high}")
        dynamic = [i for i, d in enumerate(dims[1:], 1) if not d.HasField("dim_value")]
        if dynamic:
            report.errors.append(f"input {inp.name} has dynamic non-batch axes {dynamic}: the profile fixes only "
                                 "the batch")


def format_report(report: CheckReport) -> str:
    lines = [f"target {report.target}: TensorRT {report.tensorrt} (operator table {report.table_version}), "
             f"opset {report.opset}: {'OK, will parse' if report.ok else 'WILL NOT BUILD'}",
             "operators: " + ", ".join(f"{op}×{n}" for op, n in sorted(report.operators.items()))]
    lines += [f"note: {n}" for n in report.notes]
    if report.dla_fallback:
        lines.append("falls back from DLA to the GPU: " + ", ".join(report.dla_fallback))
    lines += [f"error: {e}" for e in report.errors]
    return "\n".join(lines)
