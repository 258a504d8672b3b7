# Config validation and the functions that turn the config into target lists.
import json
import os
import sys

from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the package, when the workflow runs from a checkout
from captioning.config import check_config  # noqa: E402


# One line naming the key for a bad value, then Snakemake's validate fills in the defaults.
check_config(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")
validate(config, schema="../schemas/config.schema.yaml", set_default=True)
check_config(config)

DS = config["dataset"]["name"]
DATA = f"data/{DS}"
WORK = f"work/{DS}"
PREP = f"{WORK}/prepared"
# Rules call the library through its CLI, with the interpreter that runs Snakemake.
CAPTIONING = f"{sys.executable} -m captioning"


wildcard_constraints:
    enc="[A-Za-z0-9_]+",
    dec="[A-Za-z0-9_]+",
    stage="[A-Za-z0-9_.]+",


def as_json(obj):
    """A config slice as one JSON shell word: rules rerun when exactly this slice changes."""
    return json.dumps(obj, sort_keys=True)


def encoder_cfg(wc):
    return config["encoders"][wc.enc]


def decoder_cfg(wc):
    return config["decoders"][wc.dec]


def variant_name(enc, dec, stage):
    return f"{enc}-{dec}-{stage}"


def variant_meta(wc):
    """What a variant is, recorded in its artifact and metrics: the table's identity columns."""
    return {
        "variant": variant_name(wc.enc, wc.dec, wc.stage),
        "dataset": DS,
        "encoder": wc.enc,
        "decoder": wc.dec,
        "stage": "baseline" if wc.enc == config["baseline_encoder"] else "encoder",
        "prune_method": None,
        "prune_ratio": 0.0,
        "sparsity": None,
        "quantization": "fp32",
    }


def all_variants():
    """(encoder, decoder, stage) of every variant the table holds: baseline + encoder replacement."""
    return [(e, d, "xe") for d in config["decoders"] for e in config["encoders"]]


def all_metrics():
    return [f"results/eval/{DS}/{variant_name(*v)}/metrics.json" for v in all_variants()]


def dataset_json():
    """The Karpathy JSON: generated for the synthetic dataset, the user's file otherwise."""
    d = config["dataset"]
    return f"{DATA}/dataset_synth.json" if d["kind"] == "synthetic" else d["json"]


def image_root():
    d = config["dataset"]
    return f"{DATA}/images" if d["kind"] == "synthetic" else d["image_root"]


def encoder_weight_inputs(wc):
    """Pretraining reads the object labels and the images; other weight sources read nothing here."""
    if encoder_cfg(wc).get("weights", "pretrain") == "pretrain":
        return {"objects": f"{DATA}/objects.json", "images": f"{PREP}/images.json"}
    return {}
