"""The command line: `captioning caption` from an artifact alone, and one-line errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from captioning.captioner import pack_model
from captioning.cli import main
from captioning.encoders import create_encoder
from captioning.models import create_decoder

COCO5 = Path(__file__).parent / "data" / "coco5"
COCO_IMAGES = sorted(COCO5.glob("*2014/*.jpg"))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny untrained model: enough to check that captioning runs end to end from one file."""
    enc = create_encoder("mobilenetv3_small_050", img_size=64)
    itow = {i + 1: w for i, w in enumerate("a man dog on the with red".split())}
    dec = create_decoder("updown", vocab_size=len(itow), feat_dim=enc.feat_dim, input_encoding_size=16,
                         rnn_size=16, att_hid_size=8)
    path = tmp_path_factory.mktemp("art") / "tiny.capz"
    pack_model(path, enc, dec, itow, max_len=8)
    return path


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """The same COCO photo as grayscale, CMYK JPEG, PNG with alpha and palette PNG."""
    d = tmp_path_factory.mktemp("modes")
    im = Image.open(COCO_IMAGES[0])
    paths = {"gray": d / "gray.jpg", "cmyk": d / "cmyk.jpg", "rgba": d / "rgba.png", "pal": d / "pal.png"}
    im.convert("L").save(paths["gray"])
    im.convert("CMYK").save(paths["cmyk"])
    rgba = im.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(paths["rgba"])
    im.convert("P").save(paths["pal"])
    return paths


def test_caption_real_coco_images_as_json(artifact, capsys):
    assert len(COCO_IMAGES) == 5
    assert main(["caption", *map(str, COCO_IMAGES), "--model", str(artifact), "--json", "--beam", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == list(map(str, COCO_IMAGES))
    words = {"a", "man", "dog", "on", "the", "with", "red"}
    for o in out:
        assert isinstance(o["caption"], str) and set(o["caption"].split()) <= words


def test_caption_any_image_mode(artifact, odd_images, capsys):
    paths = [str(p) for p in odd_images.values()]
    assert main(["caption", *paths, "--model", str(artifact)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths


def test_caption_needs_nothing_but_the_artifact(artifact, tmp_path):
    """Run in an empty directory, in a fresh process, with the hub offline."""
    model = tmp_path / "model.capz"
    shutil.copy(artifact, model)
    img = tmp_path / "x.jpg"
    shutil.copy(COCO_IMAGES[1], img)
    r = subprocess.run([sys.executable, "-m", "captioning", "caption", "x.jpg", "--model", "model.capz"],
                       cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("x.jpg\t")


@pytest.mark.parametrize("make_bad, expected", [
    (lambda d: d / "missing.jpg", "image not found"),
    (lambda d: (d / "trunc.jpg").write_bytes(COCO_IMAGES[0].read_bytes()[:2000]) and d / "trunc.jpg",
     "not a readable image"),
    (lambda d: (d / "text.jpg").write_text("hello") and d / "text.jpg", "not a readable image"),
])
def test_bad_image_is_one_line(artifact, tmp_path, capsys, make_bad, expected):
    bad = make_bad(tmp_path)
    assert main(["caption", str(bad), "--model", str(artifact)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and str(bad) in err


def test_bad_artifact_is_one_line(tmp_path, capsys):
    fake = tmp_path / "m.capz"
    fake.write_bytes(b"not an artifact")
    assert main(["caption", str(COCO_IMAGES[0]), "--model", str(fake)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"captioning caption: error: {fake}: not a captioning artifact (.capz)"


def _one_line_error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for e in expected:
        assert e in err, err


def test_unknown_encoder_is_one_line(tmp_path, capsys):
    _one_line_error(capsys, ["encoder", "--timm-name", "resnet9000", "--weights", "random",
                             "--out", str(tmp_path / "e.safetensors")], "unknown encoder 'resnet9000'")
    assert not (tmp_path / "e.safetensors").exists()


def test_pickled_weights_are_refused_not_loaded(tmp_path, capsys):
    import pickle

    bad = tmp_path / "w.pth"
    bad.write_bytes(pickle.dumps({"conv_stem.weight": __import__("os").getcwd}))  # an arbitrary callable
    _one_line_error(capsys, ["encoder", "--timm-name", "mobilenetv3_small_050", "--weights", str(bad),
                             "--out", str(tmp_path / "e.safetensors")], str(bad), "refused")
    assert not (tmp_path / "e.safetensors").exists()


def test_mismatched_weights_are_one_line(tmp_path, capsys):
    from captioning.io import save_tensors
    import torch

    bad = tmp_path / "w.safetensors"
    save_tensors(bad, {"not.a.key": torch.zeros(3)})
    _one_line_error(capsys, ["encoder", "--timm-name", "mobilenetv3_small_050", "--weights", str(bad),
                             "--out", str(tmp_path / "e.safetensors")], str(bad))


def test_karpathy_json_missing_field_is_one_line(tmp_path, capsys):
    data = json.loads((COCO5 / "dataset_coco_testing.json").read_text())
    del data["images"][2]["sentences"]
    bad = tmp_path / "dataset_coco.json"
    bad.write_text(json.dumps(data))
    _one_line_error(capsys, ["prepare", "--dataset-json", str(bad), "--image-root", str(COCO5),
                             "--out", str(tmp_path / "prep")], str(bad), "image 2", "sentences")
    assert not (tmp_path / "prep" / "labels.h5").exists()


def test_empty_and_very_long_captions_are_handled(tmp_path):
    """An empty caption is dropped with a warning; a very long one is truncated to max_length."""
    import h5py

    data = json.loads((COCO5 / "dataset_coco_testing.json").read_text())
    sents = data["images"][0]["sentences"]
    sents[0]["tokens"], sents[0]["raw"] = [], ""
    sents[1]["tokens"] = ["word"] * 500
    sents[1]["raw"] = " ".join(sents[1]["tokens"])
    src = tmp_path / "dataset_coco.json"
    src.write_text(json.dumps(data))
    with pytest.warns(UserWarning):
        assert main(["prepare", "--dataset-json", str(src), "--image-root", str(COCO5), "--out",
                     str(tmp_path / "prep"), "--word-count-threshold", "0", "--max-length", "16"]) == 0
    with h5py.File(tmp_path / "prep" / "labels.h5") as f:
        assert f["labels"].shape[1] == 16
        assert f["label_length"][:].max() == 16
        assert len(f["labels"]) == sum(len(im["sentences"]) for im in data["images"]) - 1
