"""Encoder outputs shared across variants (evaluation/encoded.py): a variant that reuses them
captions exactly as one that encodes the images itself, and nothing but an identical encoder on
identical images reuses them."""
import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from captioning.captioner import load_captioner
from captioning.cli import main
from captioning.encoders import create_encoder, save_encoder
from captioning.evaluation.encoded import encoded_batches, encoder_key
from captioning.models import create_decoder, save_decoder

COCO5 = Path(__file__).parent / "data" / "coco5"
IMAGES = sorted(COCO5.glob("*2014/*.jpg"))  # five real COCO images, all in the test split here
WORDS = "a man dog on the with red".split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An encoder, two decoders that differ, and a prepared dir whose test split is the five images."""
    d = tmp_path_factory.mktemp("encoded")
    enc = create_encoder("mobilenetv3_small_050", img_size=64)
    save_encoder(enc, d / "enc.safetensors")
    for seed in (0, 1):
        torch.manual_seed(seed)
        dec = create_decoder("updown", vocab_size=len(WORDS), feat_dim=enc.feat_dim, input_encoding_size=16,
                             rnn_size=16, att_hid_size=8)
        save_decoder(dec, d / f"dec{seed}.safetensors")
    prep = d / "prep"
    prep.mkdir()
    vocab = {"itow": {str(i + 1): w for i, w in enumerate(WORDS)}, "word_count_threshold": 0, "max_length": 8}
    (prep / "vocab.json").write_text(json.dumps(vocab))
    root = IMAGES[0].parents[1]
    images = [{"id": n, "split": "test", "file_path": str(p.relative_to(root))} for n, p in enumerate(IMAGES)]
    (prep / "images.json").write_text(json.dumps(images))
    (prep / "info.json").write_text(json.dumps({"image_root": str(root)}))
    return d


def _pack(d, tmp_path, name, decoder, quantization, cache):
    out, eval_dir = tmp_path / f"{name}.capz", tmp_path / name
    argv = ["pack", "--encoder", str(d / "enc.safetensors"), "--decoder", str(d / decoder), "--prepared",
            str(d / "prep"), "--quantization", quantization, "--out", str(out), "--caption-dir", str(eval_dir),
            "--device", "cpu"] + (["--encoder-cache", str(cache)] if cache else [])
    assert main(argv) == 0
    return out, [c["caption"] for c in json.loads((eval_dir / "captions.json").read_text())]


def test_variants_with_one_encoder_encode_once_and_caption_as_without_it(inputs, tmp_path, capsys):
    cache = tmp_path / "encoded"
    a, caps_a = _pack(inputs, tmp_path, "a", "dec0.safetensors", "fp32", cache)
    assert "encoder outputs: computing" in capsys.readouterr().err
    b, caps_b = _pack(inputs, tmp_path, "b", "dec1.safetensors", "fp32", cache)
    assert "encoder outputs: reused" in capsys.readouterr().err
    assert len(list(cache.iterdir())) == 1  # one encoder, one file
    q, caps_q = _pack(inputs, tmp_path, "q", "dec0.safetensors", "int8", cache)
    assert "encoder outputs: computing" in capsys.readouterr().err  # another mode is another encoder
    assert len(list(cache.iterdir())) == 2

    for model, caps in ((a, caps_a), (b, caps_b), (q, caps_q)):
        assert caps == load_captioner(model).caption_files(IMAGES)  # what the artifact says alone
    _, plain = _pack(inputs, tmp_path, "plain", "dec1.safetensors", "fp32", None)
    assert plain == caps_b and caps_a != caps_b  # the decoders differ, so the test can fail


def test_cached_outputs_are_the_encoders_bit_for_bit(inputs, tmp_path):
    a, _ = _pack(inputs, tmp_path, "a", "dec0.safetensors", "fp32", tmp_path / "c")
    cap = load_captioner(a)
    got = list(encoded_batches(cap, IMAGES, 2, tmp_path / "c2"))  # computed, in batches of 2 ...
    again = list(encoded_batches(cap, IMAGES, 2, tmp_path / "c2"))  # ... then read back
    assert [len(fc) for fc, _ in again] == [2, 2, 1]
    with torch.no_grad():
        for i, ((fc, att), (fc2, att2)) in enumerate(zip(got, again)):
            want_fc, want_att = cap.encoder(cap.images(IMAGES[2 * i:2 * i + 2]))
            assert torch.equal(fc, want_fc) and torch.equal(att, want_att)
            assert torch.equal(fc2, want_fc) and torch.equal(att2, want_att)


def test_the_key_follows_images_weights_and_batches(inputs, tmp_path):
    a, _ = _pack(inputs, tmp_path, "a", "dec0.safetensors", "fp32", None)
    cap = load_captioner(a)
    key = encoder_key(cap, IMAGES, 16)
    assert encoder_key(cap, IMAGES, 16) == key
    assert encoder_key(cap, IMAGES[::-1], 16) != key
    assert encoder_key(cap, IMAGES, 2) != key
    copy = tmp_path / "x.jpg"
    shutil.copy(IMAGES[0], copy)
    assert encoder_key(cap, [copy, *IMAGES[1:]], 16) == key  # the bytes count, not the path
    copy.write_bytes(copy.read_bytes() + b"\0")
    assert encoder_key(cap, [copy, *IMAGES[1:]], 16) != key
    with torch.no_grad():
        next(iter(cap.encoder.parameters())).add_(1e-3)
    assert encoder_key(cap, IMAGES, 16) != key


@pytest.mark.parametrize("damage", ["truncated", "unfinished", "other count"])
def test_a_damaged_cache_file_is_recomputed_not_trusted(inputs, tmp_path, capsys, damage):
    cache = tmp_path / "encoded"
    _, want = _pack(inputs, tmp_path, "a", "dec0.safetensors", "fp32", cache)
    (path,) = cache.iterdir()
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    else:
        with h5py.File(path, "r+") as f:
            if damage == "unfinished":
                del f.attrs["complete"]  # as a job killed mid-file would leave it, were it not written aside
            else:
                del f["fc"]
                f.create_dataset("fc", data=torch.zeros(3, 8).numpy())
    capsys.readouterr()
    _, got = _pack(inputs, tmp_path, "b", "dec0.safetensors", "fp32", cache)
    assert "encoder outputs: computing" in capsys.readouterr().err and got == want
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] and f["fc"].shape[0] == len(IMAGES)  # replaced by a good one
