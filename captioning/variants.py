"""The experiment grid: what a variant is, how it is named, and every variant the config asks for.

A variant is one row of the results table and one artifact, named ``{enc}-{dec}-{dstage}-{quant}``
(e.g. ``lite0-updown-xe_global0.9-int8``) so that a file list reads as the experiment. ``dstage``
says how the decoder was trained and pruned: ``xe``, ``scst``, ``kd``, or ``xe_global0.9`` (pruned
to 90% by global magnitude, then fine-tuned). ``xe_global0`` is the sweep's dense control: the same
fine-tuning at ratio 0, so a pruned row can be read against a dense model trained exactly as long.
A ``_seed<k>`` suffix (``xe_seed1``, ``xe_global0_seed2``, ``kd_seed1``) is a dense decoder trained
again under seed ``seed + k`` (config ``seeds``): training noise, measured, never a reference or a
budget row.
``quant`` is the quantization, with ``_ort`` when the variant runs on ONNX Runtime instead of torch
(``lite0-updown-xe-int8_ort``): the same stored weights, another engine, so another latency and,
for int8, statically quantized encoder activations.

Imported by the Snakefile, so it must stay light (no torch).
"""
from __future__ import annotations

from dataclasses import dataclass


def decoder_settings(config: dict, name: str) -> dict:
    """A decoders entry with its variant_of parent's arch and settings filled in (its own keys win)."""
    dec = config["decoders"][name]
    parent = config["decoders"][dec["variant_of"]] if dec.get("variant_of") else {}
    out = {**parent, **dec}
    if "train" in parent or "train" in dec:
        out["train"] = {**parent.get("train", {}), **dec.get("train", {})}
    return out


def stage_decoders(config: dict, stage: str) -> list[str]:
    """The decoders a stage (compress, scst, distill) covers: its decoders list, or every decoder."""
    names = config.get(stage, {}).get("decoders")
    return list(config["decoders"]) if names is None else list(names)


def pruned_decoders(config: dict) -> list[str]:
    """The compress decoders that the pruning sweep covers: compress.prune's decoders list, or every
    compress decoder. The others are not pruned; they still get the dense control's fine-tuning."""
    names = config["compress"]["prune"].get("decoders")
    return stage_decoders(config, "compress") if names is None else list(names)


def decoder_family(config: dict, dec: str) -> str:
    """The decoder whose baseline a decoder's rows are compared with (itself, or what it is a variant of)."""
    return config["decoders"][dec].get("variant_of", dec)


def kd_teacher(config: dict, enc: str, dec: str) -> Variant:
    """The decoder that teaches student ``dec`` on encoder ``enc``: its family decoder on
    ``distill.teacher_encoder`` (by default the student's own encoder), trained as
    ``distill.teacher_training`` says (xe, or scst on top of it). A teacher should be the family's
    strongest uncompressed model; on our data that is the small encoder's, whose ImageNet weights
    beat the big encoder's in-domain pretraining, and a student as good as its cross-entropy teacher
    has nothing to learn from it."""
    distill = config.get("distill", {})
    return Variant(distill.get("teacher_encoder") or enc, decoder_family(config, dec),
                   distill.get("teacher_training") or "scst")


# Decoder settings that change how a model trains, not its size or shape: a variant_of entry that
# overrides only these is the parent's architecture, tuned (stage "tuning"), an uncompressed model
# that may be the quality reference, never an architecture change that fills a budget.
TRAINING_ONLY_KEYS = ("drop_prob", "att_dropout", "aoa_dropout", "ctx_drop", "dropout", "train")


def is_tuning(config: dict, dec: str) -> bool:
    """Whether ``dec`` is a variant_of entry whose settings differ from its parent's only in training-only keys."""
    entry = config["decoders"][dec]
    if "variant_of" not in entry:
        return False
    parent = decoder_settings(config, entry["variant_of"])
    own = decoder_settings(config, dec)
    changed = {k for k in set(own) | set(parent) if k != "variant_of" and own.get(k) != parent.get(k)}
    return changed <= set(TRAINING_ONLY_KEYS)


SEED_TAG = "_seed"
ORT_TAG = "_ort"  # after the quantization: the variant runs on ONNX Runtime
# The rows of uncompressed models (dense, cross-entropy, any encoder, the parent architecture under
# any training settings): quality-reference candidates.
REFERENCE_STAGES = ("baseline", "encoder", "tuning", "control")
# What ``seeds`` trains again: the references, each architecture change and each distilled student
# (with the same teacher), so the summary can set an architecture beside its parent, and a student
# beside the same decoder trained without a teacher, over the seeds (one seed's gap is within
# training noise); their quantizations too, so a budget's row is judged over the seeds.
SEEDED_STAGES = (*REFERENCE_STAGES, "architecture", "distill")


def dstage_name(train: str, method: str | None = None, ratio: float | None = None, seed: int = 0) -> str:
    """``xe``, or ``xe_global0.9`` for a decoder pruned to that ratio by that method; ``_seed<k>`` after
    either for the same decoder trained under seed offset ``k``."""
    name = train if method is None else f"{train}_{method}{ratio:g}"
    return f"{name}{SEED_TAG}{seed}" if seed else name


def split_seed(dstage: str) -> tuple[str, int]:
    """(dstage without its seed tag, seed offset k or 0)."""
    base, tag, k = dstage.rpartition(SEED_TAG)
    if tag and k.isdigit() and int(k) > 0:
        return base, int(k)
    return dstage, 0


def parse_dstage(dstage: str) -> tuple[str, str | None, float]:
    """(training, prune method or None, prune ratio or 0.0): the inverse of dstage_name."""
    train, _, prune = split_seed(dstage)[0].partition("_")
    if not prune:
        return train, None, 0.0
    method = prune.rstrip("0123456789.")
    return train, method, float(prune[len(method):])


@dataclass(frozen=True)
class Variant:
    """One table row: encoder, decoder, how the decoder was trained and pruned, quantization (and runtime)."""

    enc: str
    dec: str
    dstage: str = "xe"
    quant: str = "fp32"

    @classmethod
    def parse(cls, name: str) -> Variant:
        """The variant a name such as ``lite0-updown-xe_global0.9-int8`` stands for."""
        parts = name.split("-")
        if len(parts) != 4 or not all(parts):
            raise ValueError(f"not a variant name ({{enc}}-{{dec}}-{{dstage}}-{{quant}}): {name!r}")
        return cls(*parts)

    @property
    def name(self) -> str:
        return f"{self.enc}-{self.dec}-{self.dstage}-{self.quant}"

    @property
    def training(self) -> str:
        return parse_dstage(self.dstage)[0]

    @property
    def prune_method(self) -> str | None:
        return parse_dstage(self.dstage)[1]

    @property
    def prune_ratio(self) -> float:
        return parse_dstage(self.dstage)[2]

    @property
    def quantization(self) -> str:
        """fp32, fp16 or int8: how the weights are stored (and, for int8, computed)."""
        return self.quant.removesuffix(ORT_TAG)

    @property
    def runtime(self) -> str:
        """The engine that runs the variant: torch, or onnxruntime."""
        return "onnxruntime" if self.quant.endswith(ORT_TAG) else "torch"

    @property
    def seed(self) -> int:
        """The seed offset this decoder was trained under (0: the experiment's own ``seed``)."""
        return split_seed(self.dstage)[1]

    def with_seed(self, k: int) -> Variant:
        """The same variant trained under seed offset ``k``."""
        train, method, ratio = parse_dstage(self.dstage)
        return Variant(self.enc, self.dec, dstage_name(train, method, ratio, k), self.quant)

    @property
    def control(self) -> bool:
        """The pruning sweep's ratio-0 point: fine-tuned exactly as the pruned rows are, nothing pruned."""
        return self.prune_method is not None and self.prune_ratio == 0

    def stage(self, config: dict) -> str:
        """The one change this row measures against its baseline, checked from the most specific:
        a pruned decoder, then quantization, then the dense control (an architecture change's
        control stays "architecture": never a reference), then SCST or distillation, then a
        variant_of entry (an architecture change, or "tuning" when it changes only training settings
        such as dropout), then a replaced encoder. A reference trained under another seed measures
        training noise alone (stage "seed")."""
        if self.seed:
            return "seed"
        if self.prune_method and not self.control:
            return "prune"
        if self.quantization != "fp32":
            return "quantize"
        if self.runtime != "torch":
            return "runtime"  # the same fp32 weights on another engine: a speed row, not compression
        if self.control:
            # an architecture change gets the same fine-tuning as its parent's control, and stays what it is
            return "architecture" if self._architecture(config) else "control"
        if self.training != "xe":
            return {"kd": "distill"}.get(self.training, self.training)
        if "variant_of" in config["decoders"][self.dec]:
            return "architecture" if self._architecture(config) else "tuning"
        return "baseline" if self.enc == config["baseline_encoder"] else "encoder"

    def _architecture(self, config: dict) -> bool:
        """Whether the decoder is a variant_of entry that changes the architecture, not only training."""
        return "variant_of" in config["decoders"][self.dec] and not is_tuning(config, self.dec)

    def meta(self, config: dict) -> dict:
        """What the variant is, recorded in its artifact and metrics: the table's identity columns.
        A distilled row also names its teacher (its fp32 row), so the summary can show what the
        student kept; the other rows leave the key out, so their packing jobs' parameters stay as
        they were."""
        meta = {
            "variant": self.name,
            "dataset": config["dataset"]["name"],
            "encoder": self.enc,
            "decoder": self.dec,
            "family": decoder_family(config, self.dec),
            "stage": self.stage(config),
            "training": self.training,
            "prune_method": self.prune_method,
            "prune_ratio": self.prune_ratio,
            "quantization": self.quantization,
            "runtime": self.runtime,
            "seed": config.get("seed", 0) + self.seed,
        }
        if self.training == "kd":
            meta["teacher"] = kd_teacher(config, self.enc, self.dec).name
        return meta


def grid(config: dict) -> list[Variant]:
    """Every table row, once, in table order: baseline and encoder replacement for every encoder and
    its decoders; then for the compress encoders and decoders every quantization of the dense
    decoders and of the pruned ones (``pruned_decoders``), the dense decoders on ONNX Runtime, and
    the dense control of every compress decoder in every quantization (the pruned decoders' fp32
    controls first), the unpruned decoders' also on ONNX Runtime; then the distilled rows (in each
    of ``distill.quantization``) and the SCST rows; then, with ``seeds`` > 1, the dense references
    (baseline, encoder, tuning and control rows), the architecture changes (a slim decoder's control
    too) and the distilled students under the other seeds, each in fp32 and in its other
    quantizations (on ONNX Runtime too, fp32 there aside)."""
    c = config["compress"]
    p = c["prune"]
    # An architecture variant needs no big-encoder row of its own: it is compared with its family's baseline.
    out = [Variant(e, d) for e, enc in config["encoders"].items()
           for d in (enc.get("decoders") or config["decoders"])
           if not ("variant_of" in config["decoders"][d] and e == config["baseline_encoder"])]
    stages = ["xe"] + [dstage_name("xe", p["method"], r) for r in p["ratios"]]
    stages += [dstage_name("xe", m, p["compare_ratio"]) for m in p["compare_methods"]]
    pruned = pruned_decoders(config)
    for e in c["encoders"]:
        out += [Variant(e, d, s, q) for d in stage_decoders(config, "compress")
                for s in (stages if d in pruned else ["xe"]) for q in c["quantization"]]
        # the dense decoders again on ONNX Runtime, in each of its modes
        out += [Variant(e, d, "xe", q + ORT_TAG) for d in stage_decoders(config, "compress")
                for q in c.get("onnxruntime", [])]
        if p.get("control", True) and (p["ratios"] or p["compare_methods"]):
            # the dense control of the sweep: what every pruned row's extra fine-tuning alone gives;
            # the decoders left unpruned get the same fine-tuning, so that a slim decoder is compressed
            # from a model trained as long as the control it is measured against: in every
            # quantization, and theirs on ONNX Runtime too (what a deployer would ship)
            control = dstage_name("xe", p["method"], 0)
            out += [Variant(e, d, control) for d in pruned]
            out += [Variant(e, d, control, q) for d in stage_decoders(config, "compress") for q in c["quantization"]]
            out += [Variant(e, d, control, q + ORT_TAG) for d in stage_decoders(config, "compress")
                    if d not in pruned for q in c.get("onnxruntime", [])]
            # every fp32 control, even where compress.quantization leaves fp32 out: the summary reads them
            out += [Variant(e, d, control) for d in stage_decoders(config, "compress")]
    for e in config["distill"]["encoders"]:
        # each student beside the same decoder trained without a teacher, then in its other quantizations
        students = stage_decoders(config, "distill")
        out += [Variant(e, d, t) for d in students for t in ("xe", "kd")]
        out += [Variant(e, d, "kd", q) for d in students for q in config["distill"].get("quantization", ["fp32"])]
    for e in config["scst"]["encoders"]:
        out += [Variant(e, d, "scst", q) for d in stage_decoders(config, "scst")
                for q in config["scst"]["quantization"]]
    out = list(dict.fromkeys(out))
    # the seeded models in their quantizations too (ONNX Runtime's included; its fp32 gives torch's
    # captions): a row that fills a budget (a slim control in int8) or is the fastest within it is
    # then also judged over the seeds, not on one seed's draw alone
    seeded = [v for v in out if v.stage(config) in SEEDED_STAGES
              or (v.stage(config) == "quantize" and Variant(v.enc, v.dec, v.dstage).stage(config) in SEEDED_STAGES)]
    return out + [v.with_seed(k) for k in range(1, config.get("seeds", 1)) for v in seeded]


def baseline_variants(config: dict) -> list[Variant]:
    """The big-encoder row of each decoder family: what every other row of that family is compared with."""
    families = dict.fromkeys(decoder_family(config, d) for d in config["decoders"])
    return [Variant(config["baseline_encoder"], d) for d in families]
