"""Config checks: every bad value becomes one line that names the key and what is allowed."""
from pathlib import Path

import yaml

from captioning.config import config_problems, load_schema, schema_problems
from captioning.variants import decoder_settings, pruned_decoders, stage_decoders

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = load_schema(ROOT / "workflow/schemas/config.schema.yaml")


def _config():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_shipped_config_is_valid():
    assert schema_problems(_config(), SCHEMA) == []
    assert config_problems(_config()) == []


def test_wrong_type_names_the_key_and_what_is_allowed():
    c = _config()
    c["dataset"]["synthetic"]["img_size"] = "big"
    assert schema_problems(c, SCHEMA) == [
        "dataset.synthetic.img_size: 'big' is not allowed (allowed: integer >= 32)"]
    c = _config()
    c["seeds"] = 0
    assert schema_problems(c, SCHEMA) == ["seeds: 0 is not allowed (allowed: integer >= 1)"]
    c = _config()
    c["encoders"]["r50"]["img_size"] = 4096
    assert schema_problems(c, SCHEMA) == ["encoders.r50.img_size: 4096 is not allowed (allowed: integer >= 32 and <= 2048)"]


def test_enum_and_unknown_key():
    c = _config()
    c["evaluate"]["spice"] = "maybe"
    c["train"]["epoch"] = 3
    lines = schema_problems(c, SCHEMA)
    assert "evaluate.spice: 'maybe' is not allowed (allowed: one of auto, on, off)" in lines
    assert any(line.startswith("train: unknown key(s) epoch (allowed: epochs,") for line in lines)


def test_cross_key_problems(tmp_path):
    c = _config()
    c["baseline_encoder"] = "vit"
    c["encoders"]["lite0"]["weights"] = str(tmp_path / "missing.safetensors")
    lines = config_problems(c)
    assert lines[0].startswith("baseline_encoder: 'vit' is not one of the encoders")
    assert lines[1].startswith("encoders.lite0.weights:")
    c = _config()
    c["dataset"]["kind"] = "karpathy"
    lines = config_problems(c)
    assert "dataset.json: required when dataset.kind is karpathy" in lines
    assert any(line.startswith("encoders.r50.weights: pretrain needs object labels") for line in lines)


def test_variant_inherits_its_parent_and_overrides_some_keys():
    c = _config()
    c["decoders"]["ud_small"] = {"variant_of": "updown", "rnn_size": 64, "train": {"epochs": 2}}
    c["decoders"]["updown"]["train"] = {"lr": 0.003}
    s = decoder_settings(c, "ud_small")
    assert s["arch"] == "updown" and s["rnn_size"] == 64
    assert s["input_encoding_size"] == c["decoders"]["updown"]["input_encoding_size"]
    assert s["train"] == {"lr": 0.003, "epochs": 2}  # train keys merge, the variant's win
    assert decoder_settings(c, "updown") == c["decoders"]["updown"]


def test_decoder_entry_needs_an_arch_or_a_parent():
    c = _config()
    c["decoders"]["orphan"] = {"rnn_size": 64}
    assert schema_problems(c, SCHEMA) == [
        "decoders.orphan: needs an arch, or a variant_of entry to inherit one from"]


def test_stage_decoders_and_their_names_are_checked():
    c = _config()
    assert stage_decoders(c, "compress") == list(c["decoders"])
    assert pruned_decoders(c) == ["updown", "aoanet", "transformer"]
    c["compress"]["decoders"] = None
    assert stage_decoders(c, "compress") == list(c["decoders"])
    c["scst"]["decoders"] = ["updown", "lstm"]
    c["encoders"]["lite0"]["decoders"] = ["gru"]
    c["decoders"]["aoanet_slim"]["arch"] = "updown"
    c["distill"]["teacher_encoder"] = "vit"
    c["compress"]["decoders"] = ["updown", "aoanet"]
    c["compress"]["prune"]["decoders"] = ["updown", "updown_slim", "lstm"]
    lines = config_problems(c)
    assert "compress.prune.decoders: 'updown_slim' is not one of compress.decoders (updown, aoanet)" \
        in lines
    # a name that is no decoder at all is reported once, as such
    assert [line for line in lines if "'lstm'" in line and line.startswith("compress.prune")] == \
        ["compress.prune.decoders: 'lstm' is not one of the decoders (" + ", ".join(c["decoders"]) + ")"]
    assert any(line.startswith("distill.teacher_encoder: 'vit' is not one of the encoders") for line in lines)
    assert any(line.startswith("scst.decoders: 'lstm' is not one of the decoders") for line in lines)
    assert any(line.startswith("encoders.lite0.decoders: 'gru' is not one of the decoders") for line in lines)
    assert any(line.startswith("decoders.aoanet_slim.arch: a variant keeps its parent's arch") for line in lines)
