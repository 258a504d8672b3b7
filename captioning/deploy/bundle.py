"""An artifact as plain ONNX, for a runtime without Python or this package (ONNX Runtime Mobile, its
C, Java or JavaScript bindings): one model file and one JSON file.

    captioner.onnx  images [B, 3, S, S] float32, beam_size [] int64 -> seq [B, max_length] int64
    captioner.json  the vocabulary (word ids -> words; 0 ends a caption), max_length, and how an
                    image file becomes ``images``

The model is ``captioner_graph``, the one ``OrtCaptioner`` captions the artifact with (int8 for an
int8 artifact packed for ONNX Runtime), so it captions as ``captioning caption --runtime
onnxruntime`` does.
"""
from __future__ import annotations

from pathlib import Path

from ..io import write_bytes, write_json
from .captioner_graph import IMAGES
from .ort_search import OrtCaptioner
from .search_graph import BEAM_SIZE, SEQ

FILES = ("captioner.onnx", "captioner.json")

IMAGE_STEPS = [
    "decode the file; a JPEG at the smallest of 1/2, 1/4 or 1/8 scale that still covers size x size "
    "(libjpeg's scaled decoding, as PIL's Image.draft)",
    "convert to RGB (alpha composited onto white)",
    "resize to size x size, bilinear with antialiasing (PIL's Image.resize with Image.BILINEAR)",
    "scale to [0, 1] as float32, subtract mean and divide by std per channel, channels first",
]


def export_bundle(ort: OrtCaptioner, out_dir: str | Path) -> list[Path]:
    """Write ``ort``'s joined graph and ``captioner.json`` (see the module docstring) into ``out_dir``; the paths written."""
    model = ort.sessions.graph("captioner")  # the graph it captions with, not a second export
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
