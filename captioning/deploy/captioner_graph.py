"""A whole captioner as one ONNX model: the encoder, the decoder set-up and the search graph joined.

    captioner   images [B, 3, S, S] float32, beam_size [] int64 -> seq [B, max_length] int64

``OrtCaptioner`` captions with it in one runtime call per batch, and ``captioning export`` ships
it. One call instead of three (encoder, set-up, search) saves the runtime's fixed cost per call and
the copies of the image features between them: measured 0.21-0.28 ms a caption (3-4%, trained
int8 artifacts, batch 1, beam 3, one thread; 7.23 -> 7.01 ms for Up-Down, 8.70 -> 8.48 for the
Transformer), with the same captions.
"""
from __future__ import annotations

import onnx

from .search_graph import BEAM_SIZE, SEQ

IMAGES = "images"


def captioner_graph(encoder: bytes, init: bytes, search: bytes) -> bytes:
    """encoder -> init -> search as one model with inputs ``images`` and ``beam_size`` and output ``seq``:
    each graph's names get its own prefix (no clashes), init reads what the encoder gives it, and the
    search reads each init output ``x`` as ``image_x``."""
    from onnx import compose

    e, i, s = (compose.add_prefix(onnx.load_from_string(g), p)
               for g, p in ((encoder, "encoder/"), (init, "init/"), (search, "search/")))
    wanted = {x.name for x in (*i.graph.input, *s.graph.input)}  # a graph drops the inputs it does not use
    model = compose.merge_models(e, i, io_map=[(f"encoder/{n}", f"init/{n}") for n in ("fc", "att") if f"init/{n}" in wanted])
    io_map = [(o.name, "search/image_" + o.name[len("init/"):]) for o in i.graph.output]
    model = compose.merge_models(model, s, outputs=[f"search/{SEQ}"], io_map=[(a, b) for a, b in io_map if b in wanted])
    plain = {f"encoder/{IMAGES}": IMAGES, f"search/{BEAM_SIZE}": BEAM_SIZE, f"search/{SEQ}": SEQ}
    g = model.graph  # only the outer graph uses these three names: the search's loop body does not
    for value in (*g.input, *g.output):
        value.name = plain.get(value.name, value.name)
    for node in g.node:
        node.input[:] = [plain.get(n, n) for n in node.input]
        node.output[:] = [plain.get(n, n) for n in node.output]
    onnx.checker.check_model(model)
    return model.SerializeToString()
