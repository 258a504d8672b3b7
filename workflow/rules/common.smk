# Config validation and the functions that turn the config into target lists; the grid itself
# (what each variant is called and what it is) lives in captioning/variants.py, where it is tested.
import json
import os
import sys
from importlib.metadata import version

sys.path.insert(0, workflow.basedir)  # the package, when the workflow runs from a checkout
from captioning.config import gpu_jobs, validate_config  # noqa: E402
from captioning.variants import Variant, baseline_variants, decoder_family, decoder_settings, grid, kd_teacher  # noqa: E402


# The schema (one line naming the key for a bad value), its defaults filled into config, then the
# cross-key rules.
validate_config(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")

DS = config["dataset"]["name"]
DATA = f"data/{DS}"
WORK = f"work/{DS}"
PREP = f"{WORK}/prepared"
EVAL = f"results/eval/{DS}"
# The gpu resource of training jobs: 1 on CUDA (one at a time locally, --gpus=1 on SLURM), else 0.
GPU = gpu_jobs(config["device"])
# Rules call the library through its CLI, with the interpreter that runs Snakemake.
CAPTIONING = f"{sys.executable} -m captioning"


wildcard_constraints:
    enc="[A-Za-z0-9_]+",
    dec="[A-Za-z0-9_]+",
    dstage="[A-Za-z0-9_.]+",
    train="xe|scst|kd",
    method="global|layerwise|gradual|lamp|gradual_lamp",
    ratio="0(\\.[0-9]+)?",
    quant="fp32|fp16|int8|fp32_ort|int8_ort",
    k="[1-9][0-9]*",


def as_json(obj):
    """A config slice as one JSON shell word: rules rerun when exactly this slice changes."""
    return json.dumps(obj, sort_keys=True)


def gpu_opts():
    """The training options shared by every training step: CUDA-only ones, and how features are read."""
    return {k: config["train"][k] for k in ("amp", "pin_memory", "features", "memory_limit_mb", "workers")}


def job(name, key):
    """A rule's mem_mb or runtime from the config's resources section (training memory follows
    train.memory_limit_mb, the most a job reads into memory; score's time follows the variant count)."""
    value = config["resources"][name][key]
    if value is not None:
        return value
    if name == "score":
        spice = config["evaluate"]["spice"]
        if key == "mem_mb":
            return 10000 if spice == "on" else 4000
        return lambda wc, input: 30 + (3 if spice != "off" else 1) * len(input.captions)
    return config["train"]["memory_limit_mb"] + 4000


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


def variant_meta(wc):
    """What a variant is, as the --meta JSON recorded in its artifact and metrics."""
    return as_json(variant_of(wc).meta(config))


def variant_of(wc):
    return Variant(wc.enc, wc.dec, wc.dstage, wc.quant)


def calibration_images(wc):
    """Training images that calibrate an int8 ONNX Runtime encoder; 0 for every other variant, so
    changing the count repacks those variants alone."""
    v = variant_of(wc)
    return config["compress"]["calibration_images"] if (v.runtime, v.quantization) == ("onnxruntime", "int8") else 0


def prune_teacher(wc):
    """The SCST decoder that teaches pruned fine-tuning and its control (finetune kd_teacher scst with
    kd_weight > 0), else none."""
    finetune = config["compress"]["prune"]["finetune"]
    if finetune.get("kd_teacher", "self") != "scst" or not finetune.get("kd_weight", 0):
        return []
    return f"{WORK}/decoders/{wc.enc}/{wc.dec}/scst.safetensors"


def teacher_arg(wc, input):
    return f" --teacher {input.teacher}" if input.teacher else ""


def all_artifacts():
    return [f"{WORK}/artifacts/{v.name}.capz" for v in grid(config)]


def all_eval_files(name):
    """One file per variant in its evaluation dir: captions.json, variant.json or metrics.json."""
    return [f"{EVAL}/{v.name}/{name}" for v in grid(config)]


def baseline_names():
    return [v.name for v in baseline_variants(config)]


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
