"""The step graph with beam search's per-step selection appended, so one ONNX Runtime call does both.

A beam step is the decoder step, then the best K continuations of each image's K beams, then the
decoder states reordered to follow them. In numpy (``ort_search.numpy_select``) the selection is
a dozen small array calls, and at this project's sizes (beam 3, a few hundred words) their Python
overhead outweighed their arithmetic: measured on the trained Up-Down int8 graphs, 0.12 ms a step
beside the step's own 0.22 ms. Appended to the graph it runs in ONNX Runtime's kernels, and a
whole search is 1.12-1.20x faster (``benchmarks/beam_step.py``, random-init int8 models):

    beam      tokens [B*K], state_i.., ctx_i.., scores [B, K] -> score [B, K], beam [B, K], word [B, K], new_state_i..

The arithmetic is the numpy path's, so the captions are the same: candidates are ``scores + logprobs``
in float32; ONNX's TopK puts the lower index first among equal values (the numpy ``topk``'s order);
NaN ranks as +inf there too and is returned as NaN; ``beam``, ``word`` = divmod(index, V+1); every
``new_state_i`` row is taken from its beam's row. ``B`` and ``K`` come from ``scores``' shape, so
one graph serves any batch and beam width. ``search_graph`` loops over this graph, so captioning
makes one call per search, not per step.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SCORES, OUTPUTS = "scores", ("score", "beam", "word")
_P = "beam_select/"  # prefix of every name added here: no clash with the exporter's names


class GraphBuilder:
    """Nodes and constants appended to a graph's node and initializer lists, every name under ``prefix``
    and unique: ``b(op, inputs)`` adds a node and returns its output name(s), ``b.const(name, value)``
    an initializer and its name."""

    def __init__(self, prefix: str, nodes, initializers):
        self.prefix, self.nodes, self.initializers = prefix, nodes, initializers

    def const(self, name: str, value, dtype=np.int64) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), self.prefix + name))
        return self.prefix + name

    def __call__(self, op: str, inputs: list[str], n_out: int = 1, **attrs):
        stem = f"{self.prefix}{op}_{len(self.nodes)}"
        out = [f"{stem}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, out, name=stem, **attrs))
        return out if n_out > 1 else out[0]


def beam_step_graph(step: bytes | str) -> bytes:
    """``step`` (an exported, possibly quantized, step graph: model bytes or a path) with the selection
    appended (see the module docstring)."""
    model = onnx.load_from_string(step) if isinstance(step, bytes) else onnx.load(step)
    g = model.graph
    outputs = [o.name for o in g.output]
    if not outputs or outputs[0] != "logprobs" or not all(o.startswith("new_state_") for o in outputs[1:]):
        raise ValueError(f"not a step graph (outputs {outputs})")

    node = GraphBuilder(_P, g.node, g.initializer)
    const = node.const

    logprobs = node("Cast", ["logprobs"], to=TensorProto.FLOAT)  # a no-op for float32 graphs
    b = node("Shape", [SCORES], start=0, end=1)                    # [B]
    k = node("Shape", [SCORES], start=1, end=2)                    # [K]
    words = g.output[0].type.tensor_type.shape.dim  # V+1 as a constant when the graph says it: one node fewer per step
    v1 = (const("v1", [words[1].dim_value]) if len(words) == 2 and words[1].HasField("dim_value")
          else node("Shape", [logprobs], start=1, end=2))                                    # [V+1]
    per_beam = node("Reshape", [logprobs, node("Concat", [b, k, v1], axis=0)])
    cand3 = node("Add", [node("Unsqueeze", [SCORES, const("axis2", [2])]), per_beam])
    cand = node("Reshape", [cand3, node("Concat", [b, const("minus1", [-1])], axis=0)])  # [B, K*(V+1)]
    ranked = node("Where", [node("IsNaN", [cand]), const("inf", np.inf, np.float32), cand])
    _, index = node("TopK", [ranked, k], n_out=2, axis=1, largest=1, sorted=1)
    score = node("GatherElements", [cand, index], axis=1)
    beam, word = node("Div", [index, v1]), node("Mod", [index, v1])
    first_row = node("Mul", [node("Range", [const("zero", 0), node("Squeeze", [b]), const("one", 1)]),
                             node("Squeeze", [k])])            # image i's first row: i*K
    src = node("Reshape", [node("Add", [beam, node("Unsqueeze", [first_row, const("axis1", [1])])]),
                           const("flat", [-1])])
    states = [node("Gather", [o, src], axis=0) for o in outputs[1:]]

    g.input.append(helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["batch", "beam"]))
    old = {o.name: o for o in g.output}
    del g.output[:]
    for name, tensor, dtype in ((OUTPUTS[0], score, TensorProto.FLOAT), (OUTPUTS[1], beam, TensorProto.INT64),
                                (OUTPUTS[2], word, TensorProto.INT64)):
        g.node.append(helper.make_node("Identity", [tensor], [name], name=_P + name))
        g.output.append(helper.make_tensor_value_info(name, dtype, ["batch", "beam"]))
    for name, tensor in zip(outputs[1:], states):
        # the step's own output keeps its name for the Gather's input: the reordered state gets "beam_" + name
        g.node.append(helper.make_node("Identity", [tensor], ["beam_" + name], name=_P + "beam_" + name))
        out = onnx.ValueInfoProto()
        out.CopyFrom(old[name])
        out.name = "beam_" + name
        g.output.append(out)
    onnx.checker.check_model(model)
    return model.SerializeToString()
