"""The whole beam search as one ONNX graph: a Loop over the beam step, so a search is one runtime call.

``ort_search.beam_search`` drives ``beam_step``'s graph from Python, one ONNX Runtime call per
word, and each call pays the runtime's fixed cost and the loop's numpy bookkeeping. Here the loop
and its bookkeeping are ONNX nodes around the beam step, so the runtime runs the search from the
decoder's first state to the finished captions: 1.23-1.38x faster (``benchmarks/beam_step.py``,
int8, beam 3, one thread; trained Up-Down 2.57 -> 2.06 ms, AoANet 2.30 -> 1.67, Transformer
4.30 -> 3.48). And a deployment without Python (ONNX Runtime Mobile, its C, Java or JavaScript
bindings) gets the search as well as the model:

    search    image_state_i.., image_ctx_i.. [B, ...], beam_size [] int64 -> seq [B, max_length] int64

``image_*`` are the ``init`` graph's outputs, one row per image. Each step is ``beam_search``'s,
node for node: the K live beams continue as the beam step chose; a beam that emits the end token
(or reaches ``max_length``) is merged into the K finished ones by a stable descending sort (TopK
puts the lower index first among equal values, as ``np.argsort(-x, kind="stable")``), and the loop
stops once no live beam can beat a finished one. Merging when no beam ended changes nothing
(finished scores come first among ties), so it runs every step. NaN ranks as +inf there, as in
the numpy search and torch's sort, so a model that emits NaN gets the same captions too.

ONNX Runtime runs every node of a loop body at every step and moves nothing out of it, and at beam 3
a node's fixed cost is a large share of its work. So what is the same at every step (the heads'
view of the attention keys and values, the selection's row offsets) is computed once before the
loop (``_hoist``), after ONNX Runtime's exact basic optimisations have turned shape arithmetic into
constants. With the step graphs' If nodes gone (``squeeze`` exported as an If), a body has 9-17
fewer nodes (Up-Down 107 -> 98, AoANet 105 -> 92, the Transformer 170 -> 153, as ONNX Runtime
runs them), and a search is 1.03x, 1.12x and 1.09x faster (trained int8 artifacts, beam 3, one
thread, the two interleaved in one process; 1.01x, 1.07x and 1.03x from the encoder's input to
the caption), with the same captions.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .beam_step import OUTPUTS, SCORES, GraphBuilder

BEAM_SIZE, SEQ = "beam_size", "seq"
_P = "search/"  # prefix of every name added here
_RANDOM = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _type_and_shape(info: onnx.ValueInfoProto) -> tuple[int, list]:
    """A tensor's element type and shape: fixed dims kept, the others unknown (a state may grow step by step)."""
    tt = info.type.tensor_type
    return tt.elem_type, [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _read(nodes) -> set[str]:
    """Every name ``nodes`` read, in their subgraphs (an If's branches) too."""
    out = set()
    for node in nodes:
        out.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out |= _read(a.g.node)
    return out


def _hoist(body_nodes: list, body_inits: list, outer_names: set[str], kept_shape: dict[str, str],
           body_outputs: set[str], nodes: list, inits: list) -> list:
    """Loop-invariant code motion (see the module docstring): move out of the loop body every node that
    computes the same tensor at every step, appending it to the outer graph's ``nodes`` (and the
    constants it reads to ``inits``, renamed); returns the body's nodes left.

    Invariant: a value of the outer graph the body reads (``outer_names``: every image's rows
    repeated per beam), the ``Shape`` of a carried tensor the loop keeps the shape of (``kept_shape``:
    its name -> its initial value's, read instead), and what a node computes from those and
    constants alone. A node of constants alone stays: ONNX Runtime folds those at load, and the
    body's own fusions look for their constants there."""
    const = {t.name for t in body_inits}
    invariant = set(outer_names)
    hoisted = set()
    for node in body_nodes:
        ins = [n for n in node.input if n]
        movable = (not set(node.output) & body_outputs and node.op_type not in _RANDOM
                   and not any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute))
        if movable and node.op_type == "Shape" and ins and ins[0] in kept_shape:
            hoisted.add(id(node))
        elif movable and ins and all(n in const or n in invariant for n in ins) and any(n in invariant for n in ins):
            hoisted.add(id(node))
        if id(node) in hoisted:
            invariant.update(node.output)
        elif node.op_type not in _RANDOM and all(n in const for n in ins):  # Constant nodes and their arithmetic
            const.update(node.output)
    if not hoisted:
        return body_nodes
    producers = {o: node for node in body_nodes for o in node.output}
    by_name = {t.name: t for t in body_inits}
    copied: dict[str, str] = {}

    def constant(name: str) -> str:
        """The outer graph's copy of a body constant (an initializer or a constant node's output)."""
        if name not in copied:
            copied[name] = _P + "hoisted/" + name
            if name in by_name:
                t = onnx.TensorProto()
                t.CopyFrom(by_name[name])
                t.name = copied[name]
                inits.append(t)
            else:
                node = producers[name]
                ins = [constant(n) if n else n for n in node.input]
                outs = [_P + "hoisted/" + o for o in node.output]
                copied.update(zip(node.output, outs))
                nodes.append(helper.make_node(node.op_type, ins, outs, name=_P + "hoisted/" + node.name, domain=node.domain))
                nodes[-1].attribute.extend(node.attribute)
        return copied[name]

    for node in body_nodes:
        if id(node) in hoisted:
            moved = onnx.NodeProto()
            moved.CopyFrom(node)
            if node.op_type == "Shape" and node.input[0] in kept_shape:
                moved.input[0] = kept_shape[node.input[0]]
            else:
                moved.input[:] = [constant(n) if n in const else n for n in node.input]
            nodes.append(moved)
    return [node for node in body_nodes if id(node) not in hoisted]


def search_graph(beam: bytes, max_length: int) -> bytes:
    """The beam step graph ``beam`` (``beam_step.beam_step_graph``'s output) inside a Loop of at most
    ``max_length`` steps, with ``beam_search``'s bookkeeping (see the module docstring)."""
    from .onnx_export import constant_folded

    model = constant_folded(beam)
    g = model.graph
    outs = [o.name for o in g.output]
    if outs[:3] != list(OUTPUTS) or not all(o.startswith("beam_new_state_") for o in outs[3:]):
        raise ValueError(f"not a beam step graph (outputs {outs})")
    n_state = len(outs) - 3
    ins = {i.name: i for i in g.input}
    ctx_names = sorted((n for n in ins if n.startswith("ctx_")), key=lambda n: int(n[4:]))
    state_info = {o.name[len("beam_new_"):]: o for o in g.output[3:]}  # type and shape (dim 0: the batch)
    T = max_length

    # --- the loop body: the beam step, then beam_search's bookkeeping on the carried tensors
    body_nodes, body_inits = list(g.node), list(g.initializer)
    b = GraphBuilder(_P + "body/", body_nodes, body_inits)
    t, live_seq, done_seq, done_score = (_P + n for n in ("t", "live_seq", "done_seq", "done_score"))
    neg_inf = b.const("neg_inf", -np.inf, np.float32)
    score, beam_ix, word = OUTPUTS
    seq_shape = b("Shape", [live_seq])
    follow = b("Expand", [b("Unsqueeze", [beam_ix, b.const("axis2", [2])]), seq_shape])
    at_t = b("Equal", [b.const("positions", np.arange(T)), t])                        # [T]
    live = b("Where", [at_t, b("Unsqueeze", [word, b.const("axis2b", [2])]), b("GatherElements", [live_seq, follow], axis=1)])
    ended = b("Or", [b("Equal", [word, b.const("end", 0)]), b("Equal", [t, b.const("last", T - 1)])])
    merged = b("Concat", [done_score, b("Where", [ended, score, neg_inf])], axis=1)  # [B, 2K]
    k = b("Shape", [SCORES], start=1, end=2)
    ranked = b("Where", [b("IsNaN", [merged]), b.const("inf", np.inf, np.float32), merged])  # NaN as +inf
    _, order = b("TopK", [ranked, k], n_out=2, axis=1, largest=1, sorted=1)
    new_done_score = b("GatherElements", [merged, order], axis=1)
    both = b("Concat", [done_seq, live], axis=1)                                     # [B, 2K, T]
    new_done_seq = b("GatherElements", [both, b("Expand", [b("Unsqueeze", [order, b.const("axis2c", [2])]), seq_shape])], axis=1)
    new_score = b("Where", [ended, neg_inf, score])
    # numpy's live.max(1) <= done[:, -1]: a row with a NaN live score is never hopeless (NaN <= x is false,
    # while ReduceMax may skip NaN)
    worst = b("Squeeze", [b("Slice", [new_done_score, b.const("last_col", [-1]), b.const("end_col", [2**62]),
                                      b.const("axis1", [1])]), b.const("axis1b", [1])])
    nan_row = b("Cast", [b("ReduceMax", [b("Cast", [b("IsNaN", [new_score])], to=TensorProto.INT32)], axes=[1], keepdims=0)],
                to=TensorProto.BOOL)
    hopeless = b("And", [b("LessOrEqual", [b("ReduceMax", [new_score], axes=[1], keepdims=0), worst]), b("Not", [nan_row])])
    go_on = b("Equal", [b("ReduceMin", [b("Cast", [hopeless], to=TensorProto.INT32)], keepdims=0), b.const("zero32", 0, np.int32)])
    tokens = b("Reshape", [word, b.const("flat", [-1])])

    carried_out = [tokens, new_score, *(f"beam_new_state_{i}" for i in range(n_state)), live, new_done_seq, new_done_score]
    body_out_names = [_P + "go_on", _P + "tokens_out", _P + "scores_out",
                      *(_P + f"state_out_{i}" for i in range(n_state)),
                      _P + "live_seq_out", _P + "done_seq_out", _P + "done_score_out"]
    for src, dst in zip([go_on, *carried_out], body_out_names):
        body_nodes.append(helper.make_node("Identity", [src], [dst], name=dst))

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    carried = [("tokens", i64, ["rows"]), (SCORES, f32, ["batch", "beam"]),
               *((f"state_{i}", *_type_and_shape(state_info[f"state_{i}"])) for i in range(n_state)),
               (live_seq, i64, ["batch", "beam", T]), (done_seq, i64, ["batch", "beam", T]), (done_score, f32, ["batch", "beam"])]

    # --- the outer graph: K copies of every image's rows, the first step's scores, the loop, the best caption
    nodes, inits = [], []
    o = GraphBuilder(_P + "outer/", nodes, inits)
    first = "image_state_0" if n_state else f"image_{ctx_names[0]}"
    B = o("Shape", [first], start=0, end=1)
    K = o("Reshape", [BEAM_SIZE, o.const("one_dim", [1])])
    BK = o("Mul", [B, K])

    def repeat(x: str, out: str) -> None:
        """Row i -> rows i*K .. i*K+K-1 (np.repeat(x, K, axis=0)); allowzero: the Transformer's first cache is [B, 0, d]."""
        rest = o("Shape", [x], start=1)
        wide = o("Expand", [o("Unsqueeze", [x, o.const(f"axis1_{out}", [1])]), o("Concat", [B, K, rest], axis=0)])
        nodes.append(helper.make_node("Reshape", [wide, o("Concat", [BK, rest], axis=0)], [out],
                                      name=_P + "repeat_" + out, allowzero=1))

    for name in ctx_names:
        repeat("image_" + name, name)  # the body reads ctx_i from here (outer scope)
    for i in range(n_state):
        repeat(f"image_state_{i}", _P + f"state_in_{i}")
    start_scores = o("Where", [o("Equal", [o("Range", [o.const("zero", 0), BEAM_SIZE, o.const("step", 1)]), o.const("zero_b", 0)]),
                               o.const("zero_f", 0.0, np.float32), o.const("neg_inf", -np.inf, np.float32)])
    seq_dims = o("Concat", [B, K, o.const("T", [T])], axis=0)
    zeros_seq = o("ConstantOfShape", [seq_dims], value=numpy_helper.from_array(np.zeros(1, np.int64)))
    initial = [o("ConstantOfShape", [BK], value=numpy_helper.from_array(np.zeros(1, np.int64))),
               o("Expand", [start_scores, o("Concat", [B, K], axis=0)]),
               *(_P + f"state_in_{i}" for i in range(n_state)),
               zeros_seq, zeros_seq,
               o("ConstantOfShape", [o("Concat", [B, K], axis=0)], value=numpy_helper.from_array(np.full(1, -np.inf, np.float32)))]
    kept_shape = {"tokens": initial[0], SCORES: initial[1], live_seq: zeros_seq, done_seq: zeros_seq, done_score: initial[-1]}
    body_nodes = _hoist(body_nodes, body_inits, set(ctx_names), kept_shape, set(body_out_names), nodes, inits)
    read = _read(body_nodes)
    body_inits = [t for t in body_inits if t.name in read]
    body = helper.make_graph(
        body_nodes, "search_step",
        [helper.make_tensor_value_info(t, i64, []), helper.make_tensor_value_info(_P + "cond", TensorProto.BOOL, []),
         *(helper.make_tensor_value_info(n, ty, shape) for n, ty, shape in carried)],
        [helper.make_tensor_value_info(body_out_names[0], TensorProto.BOOL, []),
         *(helper.make_tensor_value_info(n, ty, shape) for n, (_, ty, shape) in zip(body_out_names[1:], carried))],
        body_inits)
    finals = [_P + f"final_{n}" for n in ("tokens", "scores", *(f"state_{i}" for i in range(n_state)), "live", "done", "done_score")]
    nodes.append(helper.make_node("Loop", [o.const("max_length", T), o.const("true", True, np.bool_), *initial], finals,
                                  name=_P + "loop", body=body))
    nodes.append(helper.make_node("Gather", [finals[-2], o.const("best", 0)], [SEQ], name=_P + "best", axis=1))

    inputs = [*(helper.make_tensor_value_info(f"image_state_{i}", *_type_and_shape(state_info[f"state_{i}"]))
                for i in range(n_state)),
              *(helper.make_tensor_value_info("image_" + n, *_type_and_shape(ins[n])) for n in ctx_names),
              helper.make_tensor_value_info(BEAM_SIZE, i64, [])]
    outer = helper.make_graph(nodes, "search", inputs, [helper.make_tensor_value_info(SEQ, i64, ["batch", T])], inits)
    out = helper.make_model(outer, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    onnx.checker.check_model(out)
    return out.SerializeToString()
