"""A cascade as one ONNX graph, so that `model.onnx` is the whole shipped model for any onnxruntime user: the first
stage's graph, its gate score compared with the threshold per input, and an `If` that runs only when some input
escalates. Its branch gathers the escalated rows (`NonZero`, `Gather`), runs the second stage's graph on them,
combines with the first stage's logits as base/cascade.py does and scatters the rows back (`ScatterND`): operators
TensorRT's ONNX parser also takes. At batch 1 that is
the cascade exactly; at batch B the second stage runs on the escalated rows only. A cap (at most k rows per call)
needs the host loop of measure/cascade.py."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..base.cascade import CascadeRule
from ..base.errors import EdgefuseError
from ..base.files import commit, native, new_temp_path
from .onnx import INPUT, OUTPUT


def cascade_graph(rule: CascadeRule, first: str | Path, rest: str | Path, path: str | Path) -> Path:
    """Write the cascade of `rule` over the stage graphs `first` (logits) and `rest` (its members' logits as the
    second output, or the only output for one member) as one ONNX file at `path`."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    if rule.cap is not None:
        raise EdgefuseError("a capped cascade runs as its stage graphs and a host loop (ef.Cascade), not one graph")
    m1 = compose.add_prefix(onnx.load(native(first)), "s1_")
    m2 = compose.add_prefix(onnx.load(native(rest)), "s2_")
    opset = m1.opset_import[0].version
    if opset != m2.opset_import[0].version:
        raise EdgefuseError("the two stage graphs of a cascade need one opset")
    g1, g2 = m1.graph, m2.graph
    x1, x2, y1 = g1.input[0].name, g2.input[0].name, g1.output[0].name
    heads = g2.output[1].name if len(g2.output) > 1 else None
    k = len(rule.members)

    def const(name: str, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    def reduce(op: str, inp: str, out: str, axis: str):
        """A reduction over one axis: its axes an input from opset 18, an attribute before."""
        if opset >= 18:
            return helper.make_node(op, [inp, axis], [out], keepdims=0)
        return helper.make_node(op, [inp], [out], keepdims=0, axes=[0 if axis == "c_axis0" else 1])

    gate = [helper.make_node("Softmax", [y1], ["c_p"], axis=1)]
    if rule.gate == "max_softmax":
        gate.append(reduce("ReduceMax", "c_p", "c_score", "c_axis1"))
    else:  # margin: the top probability minus the second
        gate += [helper.make_node("TopK", ["c_p", "c_two"], ["c_top", "c_topi"], axis=1),
                 helper.make_node("Split", ["c_top"], ["c_t1", "c_t2"], axis=1, num_outputs=2) if opset >= 18 else
                 helper.make_node("Split", ["c_top", "c_ones"], ["c_t1", "c_t2"], axis=1),
                 helper.make_node("Sub", ["c_t1", "c_t2"], ["c_diff"]),
                 helper.make_node("Squeeze", ["c_diff", "c_axis1"], ["c_score"])]
    gate += [helper.make_node("Less", ["c_score", "c_threshold"], ["c_mask"]),
             helper.make_node("Cast", ["c_mask"], ["c_maskf"], to=TensorProto.FLOAT),
             reduce("ReduceMax", "c_maskf", "c_anyf", "c_axis0"),
             helper.make_node("Cast", ["c_anyf"], ["c_any"], to=TensorProto.BOOL)]

    # The branch: escalated rows through stage 2, combined with stage 1's, scattered back into stage 1's logits.
    stage2 = [n for n in g2.node]
    for n in stage2:
        n.input[:] = ["c_xe" if i == x2 else i for i in n.input]
    members = heads or g2.output[0].name
    branch = [helper.make_node("NonZero", ["c_maskf"], ["c_nz"]),
              helper.make_node("Squeeze", ["c_nz", "c_axis0"], ["c_rows"]),
              helper.make_node("Gather", [INPUT, "c_rows"], ["c_xe"], axis=0), *stage2,
              helper.make_node("Gather", [y1, "c_rows"], ["c_y1e"], axis=0),
              helper.make_node("Unsqueeze", ["c_y1e", "c_axis1"], ["c_y1u"])]
    if heads is None:
        branch.append(helper.make_node("Unsqueeze", [members, "c_axis1"], ["c_rest"]))
    else:
        branch.append(helper.make_node("Identity", [members], ["c_rest"]))
    branch.append(helper.make_node("Concat", ["c_y1u", "c_rest"], ["c_all"], axis=1))
    if rule.combine == "probs":
        branch += [helper.make_node("LogSoftmax", ["c_all"], ["c_logp"], axis=2),
                   reduce("ReduceLogSumExp", "c_logp", "c_lse", "c_axis1"),
                   helper.make_node("Sub", ["c_lse", "c_logk"], ["c_comb"])]
    else:
        branch.append(reduce("ReduceMean", "c_all", "c_comb", "c_axis1"))
    branch += [helper.make_node("Transpose", ["c_nz"], ["c_idx"], perm=[1, 0]),
               helper.make_node("ScatterND", [y1, "c_idx", "c_comb"], ["c_out"])]
    out_info = helper.make_tensor_value_info("c_out", TensorProto.FLOAT, None)
    then_graph = helper.make_graph(branch, "escalate", [], [out_info], initializer=list(g2.initializer))
    else_graph = helper.make_graph([helper.make_node("Identity", [y1], ["c_keep"])], "keep", [],
                                   [helper.make_tensor_value_info("c_keep", TensorProto.FLOAT, None)])
    for n in g1.node:
        n.input[:] = [INPUT if i == x1 else i for i in n.input]
    nodes = [*g1.node, *gate, helper.make_node("If", ["c_any"], [OUTPUT], then_branch=then_graph,
                                                 else_branch=else_graph)]
    consts = [const("c_threshold", rule.threshold), const("c_axis0", [0], np.int64), const("c_axis1", [1], np.int64)]
    if rule.gate == "margin":
        consts += [const("c_two", [2], np.int64)] + ([const("c_ones", [1, 1], np.int64)] if opset < 18 else [])
    if rule.combine == "probs":
        consts.append(const("c_logk", math.log(k)))
    inp = helper.make_tensor_value_info(INPUT, g1.input[0].type.tensor_type.elem_type,
                                        [d.dim_param or d.dim_value for d in g1.input[0].type.tensor_type.shape.dim])
    classes = g1.output[0].type.tensor_type.shape.dim[1].dim_value
    out = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", classes])
    graph = helper.make_graph(nodes, "edgefuse_cascade", [inp], [out],
                              initializer=[*g1.initializer, *consts])
    model = helper.make_model(graph, opset_imports=list(m1.opset_import), producer_name="edgefuse")
    model.ir_version = m1.ir_version
    onnx.checker.check_model(model)
    tmp = new_temp_path(Path(path))
    onnx.save(model, native(tmp))
    commit(tmp, Path(path))
    return Path(path)
