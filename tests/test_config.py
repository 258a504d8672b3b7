"""Config checks: every bad value becomes one line that names the key and what is allowed."""
from pathlib import Path

import yaml

from captioning.config import config_problems, load_schema, schema_problems

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
