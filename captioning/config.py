"""The workflow config's check, run once before any job starts: JSON Schema, its defaults filled in,
then the cross-key rules the schema cannot express.

Imported by the Snakefile, so it must stay light (no torch).
"""
from __future__ import annotations

import copy
import os
import sys

WEIGHT_SOURCES = ("pretrain", "random", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def _allowed(schema: dict) -> str:
    """What a schema node allows, in words."""
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    parts = []
    t = schema.get("type")
    if t:
        parts.append(" or ".join(t) if isinstance(t, list) else t)
    bounds = [f"{word} {schema[key]}" for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                        ("maximum", "<="), ("exclusiveMaximum", "<"))
              if key in schema]
    if bounds:
        parts.append(" and ".join(bounds))
    if "pattern" in schema:
        parts.append(f"matching {schema['pattern']}")
    return " ".join(parts) or "see workflow/schemas/config.schema.yaml"


def schema_problems(config: dict, schema: dict) -> list[str]:
    """Validate against the JSON Schema; each violation becomes one line naming the key."""
    from jsonschema import Draft202012Validator

    lines = []
    for err in sorted(Draft202012Validator(schema).iter_errors(config), key=lambda e: list(map(str, e.path))):
        key = ".".join(map(str, err.absolute_path)) or "(top level)"
        if err.validator == "additionalProperties":
            known = ", ".join(err.schema.get("properties", {})) or "none"
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            lines.append(f"{key}: unknown key(s) {', '.join(extra)} (allowed: {known})")
        elif err.validator == "required":
            lines.append(f"{key}: {err.message}")
        elif err.validator == "anyOf" and key.startswith("decoders."):
            lines.append(f"{key}: needs an arch, or a variant_of entry to inherit one from")
        elif err.validator == "propertyNames":
            lines.append(f"{key}: name {err.instance!r} must match {err.schema['pattern']}")
        else:
            lines.append(f"{key}: {err.instance!r} is not allowed (allowed: {_allowed(err.schema)})")
    return list(dict.fromkeys(lines))


def config_problems(config: dict) -> list[str]:
    """Every cross-key problem, each as one line naming the key."""
    problems = []
    ds = config.get("dataset", {})
    if ds.get("kind") == "karpathy":
        for key in ("json", "image_root"):
            if not ds.get(key):
                problems.append(f"dataset.{key}: required when dataset.kind is karpathy")
        if ds.get("json") and not os.path.isfile(ds["json"]):
            problems.append(f"dataset.json: file not found: {ds['json']}")
        if ds.get("image_root") and not os.path.isdir(ds["image_root"]):
            problems.append(f"dataset.image_root: folder not found: {ds['image_root']}")
    encoders = config.get("encoders", {})
    if config.get("baseline_encoder") not in encoders:
        problems.append(f"baseline_encoder: '{config.get('baseline_encoder')}' is not one of the "
                        f"encoders ({', '.join(encoders)})")
    for stage in ("compress", "scst", "distill"):
        for name in config.get(stage, {}).get("encoders", []):
            if name not in encoders:
                problems.append(f"{stage}.encoders: '{name}' is not one of the encoders ({', '.join(encoders)})")
    decoders = config.get("decoders", {})
    for name, dec in decoders.items():
        parent = dec.get("variant_of")
        if parent is not None and (parent not in decoders or "variant_of" in decoders[parent]):
            problems.append(f"decoders.{name}.variant_of: '{parent}' must be another decoders entry that is "
                            "not itself a variant")
        elif parent is not None and dec.get("arch", decoders[parent]["arch"]) != decoders[parent]["arch"]:
            problems.append(f"decoders.{name}.arch: a variant keeps its parent's arch "
                            f"({decoders[parent]['arch']}); drop the key or the variant_of")
    lists = [(f"encoders.{name}.decoders", enc.get("decoders")) for name, enc in encoders.items()]
    lists += [(f"{stage}.decoders", config.get(stage, {}).get("decoders"))
              for stage in ("compress", "scst", "distill")]
    lists.append(("compress.prune.decoders", config.get("compress", {}).get("prune", {}).get("decoders")))
    for key, names in lists:
        for name in names or []:
            if name not in decoders:
                problems.append(f"{key}: '{name}' is not one of the decoders ({', '.join(decoders)})")
    compress = config.get("compress", {})
    if compress.get("decoders") is not None:
        for name in compress.get("prune", {}).get("decoders") or []:
            if name in decoders and name not in compress["decoders"]:  # else already reported above
                problems.append(f"compress.prune.decoders: '{name}' is not one of compress.decoders "
                                f"({', '.join(compress['decoders'])})")
    if config.get("baseline_encoder") in config.get("distill", {}).get("encoders", []):
        problems.append("distill.encoders: the baseline encoder trains no architecture variants to distil; "
                        "list only other encoders")
    teacher = config.get("distill", {}).get("teacher_encoder")
    if teacher is not None and teacher not in encoders:
        problems.append(f"distill.teacher_encoder: '{teacher}' is not one of the encoders ({', '.join(encoders)})")
    for name, enc in encoders.items():
        w = enc.get("weights", "pretrain")
        if w == "pretrain" and ds.get("kind") == "karpathy":
            problems.append(f"encoders.{name}.weights: pretrain needs object labels, which only the "
                            "synthetic dataset has; give a weights file instead")
        elif w not in WEIGHT_SOURCES and not os.path.isfile(w):
            problems.append(f"encoders.{name}.weights: '{w}' is neither one of "
                            f"{', '.join(WEIGHT_SOURCES)} nor an existing file")
    return problems


def gpu_jobs(device: str) -> int:
    """The ``gpu`` resource of a training job: 1 when it runs on CUDA, else 0.

    The local profile allows one gpu at a time, so on a CPU-only machine (0) training jobs run
    side by side instead of one by one. ``auto`` looks for an NVIDIA driver on the machine that
    plans the jobs: on a cluster whose login node has no GPU, set ``device: cuda``.
    """
    if device == "auto":
        return int(os.path.isdir("/proc/driver/nvidia/gpus") and bool(os.listdir("/proc/driver/nvidia/gpus")))
    return int(device == "cuda")


def load_schema(path) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def fill_defaults(config: dict, schema: dict) -> None:
    """Set every missing key that has a schema default, at every depth, as Snakemake's
    ``validate(config, schema, set_default=True)`` does (defaults are copied, not shared)."""
    from jsonschema import Draft202012Validator, validators

    properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, props, instance, schema):
        if isinstance(instance, dict):
            for key, sub in props.items():
                if "default" in sub:
                    instance.setdefault(key, copy.deepcopy(sub["default"]))
        yield from properties(validator, props, instance, schema)

    validators.extend(Draft202012Validator, {"properties": set_defaults})(schema).validate(config)


def validate_config(config: dict, schema_path) -> None:
    """Check the config once before any job starts: the schema, then (defaults filled in) the
    cross-key rules. Stops with one line per problem and no traceback, so the user sees which key."""
    schema = load_schema(schema_path)
    problems = schema_problems(config, schema)
    if not problems:
        fill_defaults(config, schema)
        problems = config_problems(config)
    if problems:
        for p in problems:
            print(f"config error: {p}", file=sys.stderr)
        sys.exit(1)
