"""An artifact as plain ONNX, for a runtime without Python or this package (ONNX Runtime Mobile, its
C, Java or JavaScript bindings): one model file and one JSON file.

    captioner.onnx  images [B, 3, S, S] float32, beam_size [] int64 -> seq [B, max_length] int64
    captioner.json  the vocabulary (word ids -> words; 0 ends a caption), max_length, and how an
                    image file becomes ``images``

The model is the encoder, the decoder set-up and the search graph (``search_graph``) joined into
one: the graphs ``OrtCaptioner`` runs for the artifact (int8 for an int8 artifact packed for ONNX
Runtime), so it captions as ``captioning caption --runtime onnxruntime`` does, in one call.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from ..io import write_bytes, write_json
from .beam_step import beam_step_graph
from .ort_search import OrtCaptioner, artifact_graphs
from .search_graph import BEAM_SIZE, SEQ, search_graph

FILES = ("captioner.onnx", "captioner.json")
IMAGES = "images"

IMAGE_STEPS = [
    "decode the file; a JPEG at the smallest of 1/2, 1/4 or 1/8 scale that still covers size x size "
    "(libjpeg's scaled decoding, as PIL's Image.draft)",
    "convert to RGB (alpha composited onto white)",
    "resize to size x size, bilinear with antialiasing (PIL's Image.resize with Image.BILINEAR)",
    "scale to [0, 1] as float32, subtract mean and divide by std per channel, channels first",
]


def joined_graph(encoder: bytes, init: bytes, search: bytes) -> bytes:
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


def export_bundle(ort: OrtCaptioner, out_dir: str | Path) -> list[Path]:
    """Write ``ort``'s joined graph and ``captioner.json`` (see the module docstring) into ``out_dir``; the paths written."""
    ranges = ort.config.get("runtime", {}).get("encoder_ranges")
    graphs = artifact_graphs(ort.torch, ort.quantization, ranges)
    model = joined_graph(graphs["encoder"], graphs["init"], search_graph(beam_step_graph(graphs["step"]), ort.max_length))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in FILES]
    write_bytes(paths[0], model)
    encoder = ort.torch.encoder
    write_json(paths[1], {
        "format": "captioning-onnx/1", "source": str(ort.source), "quantization": ort.quantization,
        "model": FILES[0], "inputs": {IMAGES: "float32 [B, 3, size, size]", BEAM_SIZE: "int64 scalar, e.g. 3"},
        "outputs": {SEQ: "int64 [B, max_length]: word ids, 0 after the caption's last word"},
        "max_length": ort.max_length, "vocab": {str(i): w for i, w in sorted(ort.itow.items())},
        "image": {"size": encoder.img_size, "mean": list(encoder.mean), "std": list(encoder.std), "steps": IMAGE_STEPS},
    })
    return paths
