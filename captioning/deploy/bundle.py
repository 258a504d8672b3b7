"""An artifact as plain ONNX files, for a runtime without Python or this package (ONNX Runtime Mobile,
its C, Java or JavaScript bindings): three graphs and one JSON file.

    encoder.onnx    images [B, 3, S, S] float32                        -> fc, att
    init.onnx       fc, att                                             -> ctx_i.., state_i..
    search.onnx     image_state_i.., image_ctx_i.. (init's outputs), beam_size [] int64 -> seq [B, T] int64
    captioner.json  the vocabulary (word ids -> words; 0 ends a caption), max_length, and how an image
                    becomes the encoder's input

The graphs are those ``OrtCaptioner`` runs for the artifact (int8 ones for an int8 artifact packed
for ONNX Runtime), so the files caption as ``captioning caption --runtime onnxruntime`` does.
A caller feeds ``init``'s output ``x`` to ``search`` as ``image_x`` and turns each row of ``seq``
into words up to the first 0.
"""
from __future__ import annotations

from pathlib import Path

from ..io import write_bytes, write_json
from .beam_step import beam_step_graph
from .ort_search import OrtCaptioner, artifact_graphs
from .search_graph import search_graph

FILES = ("encoder.onnx", "init.onnx", "search.onnx", "captioner.json")

IMAGE_STEPS = [
    "decode the file; a JPEG at the smallest of 1/2, 1/4 or 1/8 scale that still covers size x size "
    "(libjpeg's scaled decoding, as PIL's Image.draft)",
    "convert to RGB (alpha composited onto white)",
    "resize to size x size, bilinear with antialiasing (PIL's Image.resize with Image.BILINEAR)",
    "scale to [0, 1] as float32, subtract mean and divide by std per channel, channels first",
]


def export_bundle(ort: OrtCaptioner, out_dir: str | Path) -> list[Path]:
    """Write ``ort``'s graphs and ``captioner.json`` (see the module docstring) into ``out_dir``; the paths written."""
    ranges = ort.config.get("runtime", {}).get("encoder_ranges")
    graphs = artifact_graphs(ort.torch, ort.quantization, ranges)
    search = search_graph(beam_step_graph(graphs["step"]), ort.max_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = ort.torch.encoder
    paths = [out_dir / name for name in FILES]
    for path, graph in zip(paths, (graphs["encoder"], graphs["init"], search)):
        write_bytes(path, graph)
    write_json(paths[3], {
        "format": "captioning-onnx-bundle/1", "source": str(ort.source), "quantization": ort.quantization,
        "max_length": ort.max_length, "vocab": {str(i): w for i, w in sorted(ort.itow.items())},
        "image": {"size": encoder.img_size, "mean": list(encoder.mean), "std": list(encoder.std), "steps": IMAGE_STEPS},
        "graphs": {"encoder": "encoder.onnx", "init": "init.onnx", "search": "search.onnx"},
        "search_inputs": "each init output x as image_x, and beam_size (int64 scalar, e.g. 3)",
    })
    return paths
