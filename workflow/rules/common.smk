# Config validation and the functions that turn the config into target lists.
import json
import os
import sys

from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the package, when the workflow runs from a checkout
from captioning.config import check_config, decoder_settings, gpu_jobs, stage_decoders  # noqa: E402


# One line naming the key for a bad value, then Snakemake's validate fills in the defaults.
check_config(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")
validate(config, schema="../schemas/config.schema.yaml", set_default=True)
check_config(config)

DS = config["dataset"]["name"]
DATA = f"data/{DS}"
WORK = f"work/{DS}"
PREP = f"{WORK}/prepared"
# The gpu resource of training jobs: 1 on CUDA (one at a time locally, --gpus=1 on SLURM), else 0.
GPU = gpu_jobs(config["device"])
# Rules call the library through its CLI, with the interpreter that runs Snakemake.
CAPTIONING = f"{sys.executable} -m captioning"


wildcard_constraints:
    enc="[A-Za-z0-9_]+",
    dec="[A-Za-z0-9_]+",
    dstage="[A-Za-z0-9_.]+",
    train="xe|scst|kd",
    method="global|layerwise|gradual",
    ratio="0\\.[0-9]+",
    quant="fp32|fp16|int8",


def as_json(obj):
    """A config slice as one JSON shell word: rules rerun when exactly this slice changes."""
    return json.dumps(obj, sort_keys=True)


def gpu_opts():
    """The training options that matter only on CUDA, shared by every training rule."""
    return {k: config["train"][k] for k in ("amp", "pin_memory")}


def encoder_cfg(wc):
    return config["encoders"][wc.enc]


def decoder_cfg(wc):
    """The decoder's full settings (a variant_of entry inherits its parent's)."""
    return decoder_settings(config, wc.dec)


def decoder_args(wc):
    """The settings the decoder is built with, as one JSON shell word."""
    return as_json({k: v for k, v in decoder_cfg(wc).items() if k not in ("arch", "variant_of", "train")})


def train_args(wc, extra=None):
    """Cross-entropy settings for the decoder: the train section, its own train keys over them.
    (No **kwargs: Snakemake would pass a params function every argument it can name.)"""
    t = {k: v for k, v in config["train"].items() if k != "threads"}
    return as_json({**t, **decoder_cfg(wc).get("train", {}), **(extra or {})})


# A variant is {enc}-{dec}-{dstage}-{quant}: dstage names how the decoder was trained and
# pruned (xe, or xe_global0.9: pruned to 90% by global magnitude, then fine-tuned).
def dstage_name(train, method=None, ratio=None):
    return train if method is None else f"{train}_{method}{ratio:g}"


def parse_dstage(dstage):
    train, _, prune = dstage.partition("_")
    if not prune:
        return train, None, 0.0
    method = prune.rstrip("0123456789.")
    return train, method, float(prune[len(method):])


def variant_name(enc, dec, dstage, quant):
    return f"{enc}-{dec}-{dstage}-{quant}"


def variant_meta(wc):
    """What a variant is, recorded in its artifact and metrics: the table's identity columns."""
    train, method, ratio = parse_dstage(wc.dstage)
    if method:
        stage = "prune"
    elif wc.quant != "fp32":
        stage = "quantize"
    elif train != "xe":
        stage = {"kd": "distill"}.get(train, train)
    elif "variant_of" in config["decoders"][wc.dec]:
        stage = "architecture"
    else:
        stage = "baseline" if wc.enc == config["baseline_encoder"] else "encoder"
    return {
        "variant": variant_name(wc.enc, wc.dec, wc.dstage, wc.quant),
        "dataset": DS,
        "encoder": wc.enc,
        "decoder": wc.dec,
        "family": decoder_family(wc.dec),
        "stage": stage,
        "training": train,
        "prune_method": method,
        "prune_ratio": ratio,
        "quantization": wc.quant,
    }


def decoder_family(dec):
    """The decoder whose baseline a decoder's rows are compared with (itself, or what it is a variant of)."""
    return config["decoders"][dec].get("variant_of", dec)


def all_variants():
    """(enc, dec, dstage, quant) of every table row: baseline and encoder replacement for every
    encoder and its decoders, then for the compress encoders and decoders every quantization of the
    dense and pruned decoders, then the distilled and SCST rows."""
    c = config["compress"]
    p = c["prune"]
    # Baseline and encoder replacement; an architecture variant needs no big-encoder row of its own
    # (it is compared with its family's baseline).
    out = [(e, d, "xe", "fp32") for e, enc in config["encoders"].items()
           for d in (enc.get("decoders") or config["decoders"])
           if not ("variant_of" in config["decoders"][d] and e == config["baseline_encoder"])]
    stages = ["xe"] + [dstage_name("xe", p["method"], r) for r in p["ratios"]]
    stages += [dstage_name("xe", m, p["compare_ratio"]) for m in p["compare_methods"]]
    for e in c["encoders"]:
        for d in stage_decoders(config, "compress"):
            out += [(e, d, s, q) for s in dict.fromkeys(stages) for q in c["quantization"]]
    for e in config["distill"]["encoders"]:
        # each student beside the same decoder trained without a teacher
        out += [(e, d, t, "fp32") for d in stage_decoders(config, "distill") for t in ("xe", "kd")]
    for e in config["scst"]["encoders"]:
        out += [(e, d, "scst", q) for d in stage_decoders(config, "scst") for q in config["scst"]["quantization"]]
    return list(dict.fromkeys(out))


def all_metrics():
    return [f"results/eval/{DS}/{variant_name(*v)}/metrics.json" for v in all_variants()]


def baseline_variants():
    families = dict.fromkeys(decoder_family(d) for d in config["decoders"])
    return [variant_name(config["baseline_encoder"], d, "xe", "fp32") for d in families]


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
