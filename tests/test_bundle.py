"""`captioning export`: an artifact's one ONNX model and captioner.json caption with onnxruntime and
PIL alone, as the artifact does on ONNX Runtime."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from captioning.captioner import load_captioner, pack_model
from captioning.cli import main
from captioning.deploy.bundle import FILES
from small_decoders import image_captioner

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = sorted((Path(__file__).parent / "data" / "coco5").glob("*/*.jpg"))


def _image(path: Path, size: int, mean, std) -> np.ndarray:
    """captioner.json's image steps, written from its text with PIL and numpy only."""
    with Image.open(path) as im:
        im.draft(None, (size, size))
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
    x = np.asarray(im, dtype=np.float32) / 255.0
    return ((x - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)


def _caption_with_bundle(folder: Path, paths, beam: int) -> list[str]:
    meta = json.loads((folder / "captioner.json").read_text())
    session = ort.InferenceSession(str(folder / meta["model"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "beam_size"]
    assert [o.name for o in session.get_outputs()] == ["seq"]
    img = meta["image"]
    images = np.stack([_image(p, img["size"], img["mean"], img["std"]) for p in paths])
    seq, = session.run(None, {"images": images, "beam_size": np.array(beam, dtype=np.int64)})
    assert seq.shape == (len(paths), meta["max_length"])
    words = [[meta["vocab"][str(t)] for t in row[:list(row).index(0) if 0 in row else len(row)]] for row in seq]
    return [" ".join(w) for w in words]


@pytest.mark.parametrize("family,quantization", [("updown", "fp32"), ("aoanet", "int8"), ("transformer", "int8")])
def test_exported_files_caption_as_the_artifact_does(family, quantization, tmp_path, capsys):
    cap = image_captioner(family)
    model = tmp_path / "m.capz"
    pack_model(model, cap.encoder, cap.decoder, cap.itow, cap.max_length, quantization=quantization,
               runtime="onnxruntime", calibration=cap.images(IMAGES) if quantization == "int8" else None)
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "bundle")]) == 0
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == sorted(FILES)
    assert capsys.readouterr().out.split() == [str(tmp_path / "bundle" / f) for f in FILES]
    want = load_captioner(model).caption_files(IMAGES, beam_size=3)
    assert _caption_with_bundle(tmp_path / "bundle", IMAGES, 3) == want and len(set(want)) > 1
    meta = json.loads((tmp_path / "bundle" / "captioner.json").read_text())
    assert meta["quantization"] == quantization and meta["image"]["size"] == cap.encoder.img_size


def test_export_of_an_int8_artifact_packed_for_torch_fails_in_one_line(tmp_path, capsys):
    cap = image_captioner("updown")
    pack_model(tmp_path / "m.capz", cap.encoder, cap.decoder, cap.itow, cap.max_length, quantization="int8")
    assert main(["export", "--model", str(tmp_path / "m.capz"), "--out", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no calibrated encoder ranges" in err[0]
    assert not (tmp_path / "b").exists()
