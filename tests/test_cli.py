"""The command line: `captioning caption` from an artifact alone, one-line errors, shared options,
threads set once, and `pack` (the prepared data's max_length into the artifact)."""
import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioning.captioner import load_captioner, pack_model
from captioning.cli import build_parser, main
from captioning.compress import artifact as capz
from captioning.encoders import create_encoder, load_encoder, save_encoder
from captioning.models import create_decoder, load_decoder, save_decoder

COCO5 = Path(__file__).parent / "data" / "coco5"
COCO_IMAGES = sorted(COCO5.glob("*2014/*.jpg"))
RULES = Path(__file__).resolve().parents[1] / "workflow" / "rules"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny untrained model: enough to check that captioning runs end to end from one file."""
    enc = create_encoder("mobilenetv3_small_050", img_size=64)
    itow = {i + 1: w for i, w in enumerate("a man dog on the with red".split())}
    dec = create_decoder("updown", vocab_size=len(itow), feat_dim=enc.feat_dim, input_encoding_size=16,
                         rnn_size=16, att_hid_size=8)
    path = tmp_path_factory.mktemp("art") / "tiny.capz"
    pack_model(path, enc, dec, itow, max_length=8)
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
    capsys.readouterr()  # what earlier calls printed
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


# ---- options: shared, aliased, and every one the workflow passes ----------------------------------

def _verbs() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


def _rule_commands():
    """(rule file, verb, options) of every `captioning <verb>` shell command in workflow/rules."""
    for smk in sorted(RULES.glob("*.smk")):
        for m in re.finditer(r'"\{params\.cli\} ([\w-]+)(.*?)> \{log\}', smk.read_text(), re.S):
            yield smk.name, m.group(1), set(re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(2)))


def test_every_option_the_workflow_passes_exists():
    found = list(_rule_commands())
    assert {verb for _, verb, _ in found} == {"synth", "prepare", "encoder", "extract", "merge-features", "train",
                                              "scst", "prune", "pack", "score", "latency", "table"}
    verbs = _verbs()
    for rule_file, verb, options in found:
        known = set(verbs[verb]._option_string_actions)
        assert options <= known, f"{rule_file}: captioning {verb} lacks {sorted(options - known)}"
    assert "--objects" in verbs["encoder"]._option_string_actions  # features.smk passes it through a param


@pytest.mark.parametrize("argv", [
    ["caption", "x.jpg", "--model", "m.capz"],
    ["evaluate", "--model", "m.capz", "--prepared", "p", "--out-dir", "o"],
    ["latency", "--models", "m.capz", "--prepared", "p", "--out", "o.json"],
])
def test_beam_size_and_beam_are_one_option(argv):
    parse = build_parser().parse_args
    assert parse(argv).beam_size == 3
    assert parse([*argv, "--beam-size", "5"]).beam_size == 5
    assert parse([*argv, "--beam", "2"]).beam_size == 2
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):  # argparse's usage line and one error line, no traceback
            parse([*argv, "--beam", bad])


# ---- threads: one setting, applied once in main() ----------------------------------------------------

@pytest.fixture
def threads_calls(monkeypatch):
    """Records every captioning.utils.set_threads call (still applied); torch's thread count restored after."""
    import captioning.utils

    calls, real, before = [], captioning.utils.set_threads, torch.get_num_threads()
    monkeypatch.setattr(captioning.utils, "set_threads", lambda n: (calls.append(n), real(n)))
    yield calls
    torch.set_num_threads(before)


def _record(seen, result=None):
    """A stand-in library function: records its arguments and the thread count it runs with."""
    def fake(*args, **kwargs):
        seen.append({"args": args, "kwargs": kwargs, "threads_now": torch.get_num_threads()})
        return result
    return fake


TRAINING_VERBS = {
    "train_xe": ["train", "--features", "f.h5", "--prepared", "p", "--decoder", "updown", "--out", "o"],
    "train_scst": ["scst", "--decoder", "d", "--features", "f.h5", "--prepared", "p", "--out", "o"],
    "finetune_pruned": ["prune", "--decoder", "d", "--features", "f.h5", "--prepared", "p", "--ratio", "0.5",
                        "--out", "o"],
}


@pytest.mark.parametrize("fn", TRAINING_VERBS)
def test_training_verbs_set_threads_once_and_do_not_pass_them(fn, monkeypatch, threads_calls):
    import captioning.training

    seen = []
    monkeypatch.setattr(captioning.training, fn, _record(seen))  # fails if the name is not exported
    n = 3 if torch.get_num_threads() != 3 else 2
    assert main([*TRAINING_VERBS[fn], "--threads", str(n)]) == 0
    assert threads_calls == [n] and seen[0]["threads_now"] == n
    assert "threads" not in seen[0]["kwargs"]
    before = torch.get_num_threads()
    assert main(TRAINING_VERBS[fn]) == 0  # no --threads: torch's own count, untouched
    assert threads_calls == [n] and seen[1]["threads_now"] == before


def test_evaluate_and_latency_threads_time_only(monkeypatch, threads_calls):
    """Their --threads is the timing's thread count: passed on, never applied to the whole process."""
    import captioning.evaluation.evaluate
    import captioning.evaluation.latency

    seen = []
    monkeypatch.setattr(captioning.evaluation.evaluate, "evaluate",
                        _record(seen, {"CIDEr": 1.0, "size_mb": 1.0, "latency_ms": None}))
    monkeypatch.setattr(captioning.evaluation.latency, "measure_artifacts", _record(seen, {}))
    before = torch.get_num_threads()
    assert main(["evaluate", "--model", "m.capz", "--prepared", "p", "--out-dir", "o", "--threads", "5"]) == 0
    assert main(["latency", "--models", "a.capz", "--prepared", "p", "--out", "o.json", "--threads", "5"]) == 0
    assert main(["evaluate", "--model", "m.capz", "--prepared", "p", "--out-dir", "o"]) == 0
    assert threads_calls == [] and [s["threads_now"] for s in seen] == [before] * 3
    assert [s["kwargs"]["threads"] for s in seen] == [5, 5, 1]


# ---- pack: the prepared data's vocabulary and max_length into the artifact --------------------------

@pytest.fixture(scope="module")
def pack_inputs(tmp_path_factory):
    """An encoder file, a partly zero decoder file and a prepared directory with max_length 12."""
    d = tmp_path_factory.mktemp("pack")
    enc = create_encoder("mobilenetv3_small_050", img_size=64)
    save_encoder(enc, d / "enc.safetensors")
    itow = {i + 1: w for i, w in enumerate("a man dog on the with red".split())}
    dec = create_decoder("updown", vocab_size=len(itow), feat_dim=enc.feat_dim, input_encoding_size=16,
                         rnn_size=16, att_hid_size=8)
    with torch.no_grad():
        dec.logit.weight[:, :5] = 0
    save_decoder(dec, d / "dec.safetensors")
    (d / "prep").mkdir()
    vocab = {"itow": {str(k): v for k, v in itow.items()}, "word_count_threshold": 0, "max_length": 12}
    (d / "prep" / "vocab.json").write_text(json.dumps(vocab))
    return d, itow


def _pack(d, prepared, out, quantization="fp32"):
    return main(["pack", "--encoder", str(d / "enc.safetensors"), "--decoder", str(d / "dec.safetensors"),
                 "--prepared", str(prepared), "--quantization", quantization, "--meta", '{"variant": "x"}',
                 "--out", str(out)])


@pytest.mark.parametrize("quantization", ["fp32", "int8"])
def test_pack_stores_what_it_did_before(pack_inputs, tmp_path, quantization, capsys):
    """Same config keys in the same order as before the CLI moved into pack_variant, so the bytes
    equal pack_model's with the prepared data's vocabulary and max_length."""
    from captioning.compress.prune import measured_sparsity
    from captioning.compress.quantize import storage_floor_bytes

    d, itow = pack_inputs
    out = tmp_path / "m.capz"
    assert _pack(d, d / "prep", out, quantization) == 0
    assert capsys.readouterr().out.startswith(f"{out}: ")
    config, _ = capz.read(out)
    assert list(config) == ["encoder", "decoder", "vocab", "max_len", "variant", "storage", "runtime"]
    assert config["max_len"] == 12 and config["variant"] == {"variant": "x"}
    encoder, decoder = load_encoder(d / "enc.safetensors"), load_decoder(d / "dec.safetensors")
    groups = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}
    assert config["storage"] == {**measured_sparsity(decoder),
                                 "floor_bytes": storage_floor_bytes(groups, quantization)}
    assert config["storage"]["sparsity"] > 0
    pack_model(tmp_path / "ref.capz", encoder, decoder, itow, 12, extra={k: config[k] for k in ("variant", "storage")},
               quantization=quantization)
    assert (tmp_path / "ref.capz").read_bytes() == out.read_bytes()
    assert load_captioner(out).max_length == 12


def _prepared_images(d, tmp_path):
    """A prepared dir (pack_inputs' vocabulary) whose images are the COCO five: odd ids test, even train."""
    prep = tmp_path / "prep"
    shutil.copytree(d / "prep", prep)
    root = COCO_IMAGES[0].parents[1]
    images = [{"id": n, "split": "test" if n % 2 else "train", "file_path": str(p.relative_to(root))}
              for n, p in enumerate(COCO_IMAGES)]
    (prep / "images.json").write_text(json.dumps(images))
    (prep / "info.json").write_text(json.dumps({"image_root": str(root)}))
    return prep, root, images


def test_pack_for_onnxruntime_int8_calibrates_on_training_images(pack_inputs, tmp_path, capsys):
    from captioning.deploy.ort_search import OrtCaptioner

    d, _ = pack_inputs
    prep, root, images = _prepared_images(d, tmp_path)
    out = tmp_path / "m.capz"
    args = ["pack", "--encoder", str(d / "enc.safetensors"), "--decoder", str(d / "dec.safetensors"),
            "--prepared", str(prep), "--out", str(out), "--quantization", "int8", "--runtime", "onnxruntime"]
    assert main(args) == 2 and "needs calibration images" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--calibration-images", "3"]) == 0
    ort = load_captioner(out)
    assert isinstance(ort, OrtCaptioner) and ort.config["runtime"]["encoder_ranges"]
    assert len(ort.caption_files([root / im["file_path"] for im in images if im["split"] == "test"])) == 2


def test_pack_also_captions_the_test_split_with_the_packed_file(pack_inputs, tmp_path, capsys):
    """What rule pack hands rule score: the test images' captions, written from the artifact on disk,
    and the variant's size and parameters."""
    from captioning.evaluation.evaluate import count_params

    d, _ = pack_inputs
    prep, root, images = _prepared_images(d, tmp_path)
    out, eval_dir = tmp_path / "m.capz", tmp_path / "eval"
    assert main(["pack", "--encoder", str(d / "enc.safetensors"), "--decoder", str(d / "dec.safetensors"),
                 "--prepared", str(prep), "--quantization", "int8", "--meta", '{"variant": "x"}', "--out", str(out),
                 "--caption-dir", str(eval_dir), "--beam-size", "2", "--device", "cpu"]) == 0
    captions = json.loads((eval_dir / "captions.json").read_text())
    test = [im for im in images if im["split"] == "test"]
    assert [c["image_id"] for c in captions] == [im["id"] for im in test]  # the test split only, in order
    cap = load_captioner(out)
    assert [c["caption"] for c in captions] == cap.caption_files([root / im["file_path"] for im in test], beam_size=2)
    variant = json.loads((eval_dir / "variant.json").read_text())
    assert variant["variant"] == "x" and variant["size_bytes"] == out.stat().st_size
    assert (variant["params"], variant["nonzero_params"]) == count_params(cap)
    assert variant["n_images"] == len(test) == 2 and variant["beam_size"] == 2 and variant["latency_ms"] is None


def test_max_length_is_needed_not_guessed(pack_inputs, tmp_path, capsys):
    d, _ = pack_inputs
    prep = tmp_path / "prep"
    prep.mkdir()
    vocab = json.loads((d / "prep" / "vocab.json").read_text())
    (prep / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if k != "max_length"}))
    _one_line_error(capsys, ["pack", "--encoder", str(d / "enc.safetensors"), "--decoder", str(d / "dec.safetensors"),
                             "--prepared", str(prep), "--out", str(tmp_path / "m.capz")],
                    f"{prep / 'vocab.json'}: no 'max_length'")
    assert not (tmp_path / "m.capz").exists()
    assert _pack(d, d / "prep", tmp_path / "ok.capz") == 0
    config, groups = capz.read(tmp_path / "ok.capz")
    capz.pack(tmp_path / "old.capz", groups, {k: v for k, v in config.items() if k != "max_len"})
    _one_line_error(capsys, ["caption", str(COCO_IMAGES[0]), "--model", str(tmp_path / "old.capz")],
                    "old.capz: no 'max_len'")


def test_pretrain_without_its_inputs_is_one_line(tmp_path, capsys):
    _one_line_error(capsys, ["encoder", "--timm-name", "mobilenetv3_small_050", "--weights", "pretrain",
                             "--out", str(tmp_path / "e.safetensors")], "--objects", "--prepared")
    assert not (tmp_path / "e.safetensors").exists()
