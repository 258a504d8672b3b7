"""The experiment grid: variant names, what each variant is, and which variants the config asks for."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from captioning.variants import Variant, baseline_variants, decoder_family, dstage_name, grid, kd_teacher, parse_dstage

ROOT = Path(__file__).resolve().parents[1]


def _config():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def _small():
    """Two encoders, a decoder and its architecture variant, every stage on with one setting each."""
    return {
        "dataset": {"name": "mini"},
        "baseline_encoder": "big",
        "encoders": {"big": {"timm_name": "resnet50"}, "small": {"timm_name": "mobilenetv3_small_100"}},
        "decoders": {"u": {"arch": "updown"}, "u_slim": {"variant_of": "u", "rnn_size": 8}},
        # global at the compare ratio is already in the sweep: one row, not two
        "compress": {"encoders": ["small"], "decoders": ["u"], "quantization": ["fp32", "int8"],
                     "onnxruntime": ["int8"],
                     "prune": {"method": "global", "ratios": [0.5], "compare_ratio": 0.5,
                               "compare_methods": ["global", "gradual"]}},
        "distill": {"encoders": ["small"], "decoders": ["u_slim"]},
        "scst": {"encoders": ["small"], "decoders": ["u"], "quantization": ["fp32", "int8"]},
    }


@pytest.mark.parametrize("train, method, ratio, dstage", [
    ("xe", None, 0.0, "xe"),
    ("scst", None, 0.0, "scst"),
    ("kd", None, 0.0, "kd"),
    ("xe", "global", 0.9, "xe_global0.9"),
    ("xe", "layerwise", 0.95, "xe_layerwise0.95"),
    ("xe", "gradual", 0.5, "xe_gradual0.5"),
    ("xe", "global", 0.0, "xe_global0"),  # the sweep's dense control
])
def test_dstage_name_and_parse_are_inverses(train, method, ratio, dstage):
    assert dstage_name(train, method, ratio if method else None) == dstage
    assert parse_dstage(dstage) == (train, method, ratio)


@pytest.mark.parametrize("dstage, base, k", [
    ("xe_seed1", "xe", 1), ("xe_global0_seed12", "xe_global0", 12), ("xe", "xe", 0), ("xe_global0.9", "xe_global0.9", 0),
])
def test_seed_copies_are_named_after_their_reference(dstage, base, k):
    v = Variant("lite0", "updown", dstage)
    assert v.seed == k and v.with_seed(0) == Variant("lite0", "updown", base)
    assert v.with_seed(0).with_seed(k) == v and Variant.parse(v.name) == v
    assert (v.training, v.prune_method, v.prune_ratio) == (base.split("_")[0], *parse_dstage(base)[1:])
    c = _config()
    assert v.stage(c) == ("seed" if k else v.with_seed(0).stage(c))
    assert v.meta({**c, "seed": 10})["seed"] == 10 + k


def test_seeds_copy_the_dense_references_architectures_and_students_only():
    c = {**_small(), "seeds": 3}
    names = [v.name for v in grid(c)]
    assert names[:len(grid(_small()))] == [v.name for v in grid(_small())]  # the main rows first, unchanged
    # the distilled student too (stage distill), and the int8 rows of these models, on ONNX Runtime too
    # (a budget's row is judged over the seeds); never an SCST or pruned row
    assert names[len(grid(_small())):] == [
        f"{v}_seed{k}-{q}" for k in (1, 2)
        for v, q in (("big-u-xe", "fp32"), ("small-u-xe", "fp32"), ("small-u_slim-xe", "fp32"), ("small-u-xe", "int8"),
                     ("small-u-xe", "int8_ort"), ("small-u-xe_global0", "fp32"), ("small-u-xe_global0", "int8"),
                     ("small-u_slim-kd", "fp32"))]
    assert all(v.stage(c) == "seed" for v in grid(c)[len(grid(_small())):])


def test_variant_name_round_trip_and_parts():
    v = Variant.parse("lite0-updown-xe_global0.9-int8")
    assert v == Variant("lite0", "updown", "xe_global0.9", "int8")
    assert v.name == "lite0-updown-xe_global0.9-int8"
    assert (v.training, v.prune_method, v.prune_ratio) == ("xe", "global", 0.9)
    plain = Variant("r50", "aoanet_slim")  # dstage and quantization default to the dense fp32 decoder
    assert plain.name == "r50-aoanet_slim-xe-fp32" and Variant.parse(plain.name) == plain
    assert (plain.training, plain.prune_method, plain.prune_ratio) == ("xe", None, 0.0)


@pytest.mark.parametrize("name", ["lite0-updown-xe", "lite0-up-down-xe-fp32", "lite0--xe-fp32", ""])
def test_parse_refuses_what_is_not_a_variant_name(name):
    with pytest.raises(ValueError, match="not a variant name"):
        Variant.parse(name)


@pytest.mark.parametrize("name, stage", [
    ("r50-updown-xe-fp32", "baseline"),
    ("mnv3s-updown-xe-fp32", "encoder"),
    ("lite0-updown_slim-xe-fp32", "architecture"),
    ("r50-updown_slim-xe-fp32", "architecture"),
    ("lite0-updown-xe-int8", "quantize"),
    ("lite0-updown-xe_global0.9-fp32", "prune"),
    ("lite0-updown-xe_gradual0.9-fp16", "prune"),  # pruning is the change it measures, quantized or not
    ("lite0-updown-scst-fp32", "scst"),
    ("lite0-updown-scst-int8", "quantize"),
    ("lite0-updown_slim-kd-fp32", "distill"),
    ("lite0-updown-xe_global0-fp32", "control"),   # the sweep's ratio-0 point: fine-tuned, nothing pruned
    ("lite0-updown-xe_global0-int8", "quantize"),
    ("lite0-updown_slim-xe_global0-fp32", "architecture"),  # a slim decoder given the control's fine-tuning
    ("lite0-updown_slim-xe_global0-int8", "quantize"),
    ("lite0-updown-xe-int8_ort", "quantize"),    # int8 weights, on another engine
    ("lite0-updown-xe-fp32_ort", "runtime"),     # the same weights on ONNX Runtime: speed, not compression
])
def test_stage_is_the_one_change_a_row_measures(name, stage):
    assert Variant.parse(name).stage(_config()) == stage


def test_meta_is_the_tables_identity_columns_in_order():
    meta = Variant.parse("lite0-transformer_slim-xe_layerwise0.7-fp16").meta(_config())
    assert meta == {
        "variant": "lite0-transformer_slim-xe_layerwise0.7-fp16",
        "dataset": "synth",
        "encoder": "lite0",
        "decoder": "transformer_slim",
        "family": "transformer",
        "stage": "prune",
        "training": "xe",
        "prune_method": "layerwise",
        "prune_ratio": 0.7,
        "quantization": "fp16",
        "runtime": "torch",
        "seed": 0,
    }
    assert list(meta) == ["variant", "dataset", "encoder", "decoder", "family", "stage", "training",
                          "prune_method", "prune_ratio", "quantization", "runtime", "seed"]
    # a distilled row names its teacher too (the table's last identity column)
    assert Variant.parse("lite0-updown_slim-kd-int8").meta(_config())["teacher"] == "lite0-updown-scst-fp32"


def test_runtime_is_a_suffix_of_the_quantization():
    v = Variant.parse("lite0-aoanet-xe-int8_ort")
    assert (v.quantization, v.runtime) == ("int8", "onnxruntime")
    assert v.meta(_config())["quantization"] == "int8" and v.meta(_config())["runtime"] == "onnxruntime"
    assert (Variant.parse("lite0-aoanet-xe-int8").runtime, Variant.parse("lite0-aoanet-xe-fp32_ort").quantization) \
        == ("torch", "fp32")


def test_a_variant_that_changes_only_training_settings_is_tuning_and_a_reference():
    c = _small()
    c["decoders"] = {**c["decoders"], "u_d2": {"variant_of": "u", "drop_prob": 0.2, "train": {"lr": 0.002}},
                     "u_same": {"variant_of": "u", "rnn_size": 8, "drop_prob": 0.2}}
    c["decoders"]["u"] = {"arch": "updown", "rnn_size": 8}
    assert Variant("small", "u_d2").stage(c) == "tuning"
    assert Variant("small", "u_same").stage(c) == "tuning"     # its width is the parent's
    assert Variant("small", "u_slim").stage(c) == "tuning"      # rnn_size 8, now the parent's too
    c["decoders"]["u_slim"] = {"variant_of": "u", "rnn_size": 4}
    assert Variant("small", "u_slim").stage(c) == "architecture"
    seeds = [v.name for v in grid({**c, "seeds": 2}) if v.seed]
    # both are seeded: a tuned parent is a reference, an architecture is compared with its parent over the seeds
    assert "small-u_d2-xe_seed1-fp32" in seeds and "small-u_slim-xe_seed1-fp32" in seeds
    # never a pruned, ONNX Runtime fp32 or SCST row
    assert not [n for n in seeds if Variant.parse(n).prune_ratio > 0 or "fp32_ort" in n or "scst" in n]


def test_decoder_family_is_the_parent_of_a_variant():
    c = _config()
    assert decoder_family(c, "aoanet_slim") == "aoanet"
    assert decoder_family(c, "aoanet") == "aoanet"


def test_kd_teacher_is_the_family_decoder_on_the_students_encoder_unless_told():
    c = _config()
    # the default: the family's SCST decoder on the student's own encoder
    assert kd_teacher(c, "lite0", "updown_slim") == Variant("lite0", "updown", "scst")
    assert kd_teacher(c, "lite0", "aoanet") == Variant("lite0", "aoanet", "scst")
    c["distill"]["teacher_encoder"], c["distill"]["teacher_training"] = "r50", "xe"
    assert kd_teacher(c, "lite0", "updown_slim") == Variant("r50", "updown")  # the big encoder's cross-entropy teacher
    del c["distill"]["teacher_training"]  # unset: the schema's default
    assert kd_teacher(c, "lite0", "updown_slim") == Variant("r50", "updown", "scst")


def test_default_grid():
    c = _config()
    variants = grid(c)
    names = [v.name for v in variants]
    # xe rows: r50 x 3 families + lite0 x 6 decoders = 9; compress: lite0 x 3 pruned decoders x
    # (xe + 6 global ratios + gradual0.9 + gradual_lamp0.9) x 2 quantizations = 54, less the 3 dense fp32 rows
    # already there, plus the 3 slim decoders in int8 (their fp32 rows are there), plus 6 dense decoders x
    # (fp32, int8) on ONNX Runtime, plus the dense control of the 6 compress decoders in fp32 and int8,
    # the 3 slim decoders' also on ONNX Runtime (fp32, int8); distill: the 3 slim decoders' kd rows in
    # fp32 and int8 (their xe rows are there); scst: 3 decoders.
    assert len(variants) == 9 + 51 + 3 + 12 + 12 + 6 + 6 + 3 == 102
    assert len(set(names)) == len(names)
    assert names[:3] == ["r50-updown-xe-fp32", "r50-aoanet-xe-fp32", "r50-transformer-xe-fp32"]
    assert all(Variant.parse(n) == v for n, v in zip(names, variants))
    assert {"lite0-aoanet-xe_gradual0.9-int8", "lite0-updown-xe_gradual_lamp0.9-int8", "lite0-updown_slim-kd-fp32",
            "lite0-transformer-scst-fp32", "lite0-transformer-xe-int8_ort", "lite0-updown-xe-fp32_ort",
            "lite0-aoanet_slim-xe-int8", "lite0-transformer_slim-xe-int8_ort"} <= set(names)
    assert not any("_slim-xe_" in n and "-xe_global0-" not in n for n in names)  # the slim decoders are not pruned
    assert not any(n.startswith("r50-") and "_slim" in n for n in names)  # compared with the family baseline
    stages = [v.stage(c) for v in variants]
    assert stages.count("baseline") == 3 and stages.count("distill") == 3 and stages.count("scst") == 3
    assert "lite0-transformer_slim-kd-int8" in names
    assert [n for n, s in zip(names, stages) if s == "control"] == [
        f"lite0-{d}-xe_global0-fp32" for d in ("updown", "aoanet", "transformer")]
    # the slim decoders get the control's fine-tuning too: architecture changes, compressed from there
    assert [n for n, s in zip(names, stages) if s == "architecture" and "_global0-" in n] == [
        f"lite0-{d}_slim-xe_global0-fp32" for d in ("updown", "aoanet", "transformer")]
    assert {f"lite0-{d}-xe_global0-int8" for d in ("updown", "updown_slim", "transformer_slim")} <= set(names)
    assert [n for n in names if "-xe_global0-int8_ort" in n] == [
        f"lite0-{d}_slim-xe_global0-int8_ort" for d in ("updown", "aoanet", "transformer")]


def test_small_grid_equals_the_hand_written_rows_in_order():
    assert [v.name for v in grid(_small())] == [
        "big-u-xe-fp32", "small-u-xe-fp32", "small-u_slim-xe-fp32",
        "small-u-xe-int8", "small-u-xe_global0.5-fp32", "small-u-xe_global0.5-int8",
        "small-u-xe_gradual0.5-fp32", "small-u-xe_gradual0.5-int8",
        "small-u-xe-int8_ort",
        "small-u-xe_global0-fp32", "small-u-xe_global0-int8",
        "small-u_slim-kd-fp32",
        "small-u-scst-fp32", "small-u-scst-int8",
    ]


def test_distilled_students_in_each_quantization_never_fill_a_budget():
    from captioning.results.summary import compression_rows

    c = _small()
    c["distill"]["quantization"] = ["fp32", "int8"]
    names = [v.name for v in grid(c)]
    assert [n for n in names if "-kd-" in n] == ["small-u_slim-kd-fp32", "small-u_slim-kd-int8"]
    kd8 = Variant.parse("small-u_slim-kd-int8")
    assert (kd8.stage(c), kd8.training) == ("quantize", "kd")
    rows = pd.DataFrame([v.meta(c) for v in grid(c)])
    # a compression row of a decoder trained another way than cross-entropy: the teacher's gain is no
    # compression's, so it is compared with cross-entropy only in the training section
    assert "small-u_slim-kd-int8" not in set(compression_rows(rows)["variant"])
    assert "small-u-xe_global0.5-int8" in set(compression_rows(rows)["variant"])


def test_stages_turned_off_leave_the_cross_entropy_rows():
    c = _small()
    for stage in ("compress", "distill", "scst"):
        c[stage]["encoders"] = []
    assert [v.name for v in grid(c)] == ["big-u-xe-fp32", "small-u-xe-fp32", "small-u_slim-xe-fp32"]


def test_baseline_variants_one_per_family_on_the_baseline_encoder():
    c = _config()
    assert [v.name for v in baseline_variants(c)] == ["r50-updown-xe-fp32", "r50-aoanet-xe-fp32",
                                                      "r50-transformer-xe-fp32"]
    assert set(baseline_variants(c)) <= set(grid(c))
    assert [v.name for v in baseline_variants(_small())] == ["big-u-xe-fp32"]


def test_importing_the_grid_does_not_import_torch():
    """The Snakefile imports it: planning the DAG must not wait for torch."""
    code = "import sys, captioning.variants, captioning.config; sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_decoders_left_out_of_the_pruning_sweep_get_the_controls_fine_tuning_and_are_quantized():
    c = _small()
    c["compress"]["decoders"] = ["u", "u_slim"]
    c["compress"]["prune"]["decoders"] = ["u"]
    names = [v.name for v in grid(c)]
    slim = [n for n in names if n.startswith("small-u_slim-") and "-kd-" not in n]
    assert slim == ["small-u_slim-xe-fp32", "small-u_slim-xe-int8", "small-u_slim-xe-int8_ort",
                    "small-u_slim-xe_global0-fp32", "small-u_slim-xe_global0-int8",
                    "small-u_slim-xe_global0-int8_ort"]  # never pruned
    assert [n for n in names if "_global0-" in n] == [
        "small-u-xe_global0-fp32", "small-u-xe_global0-int8", "small-u_slim-xe_global0-fp32",
        "small-u_slim-xe_global0-int8", "small-u_slim-xe_global0-int8_ort"]  # the slim one on ONNX Runtime too
    assert Variant.parse("small-u_slim-xe-int8").stage(c) == "quantize"
    # u's control is the reference candidate; u_slim's is an architecture change trained as long
    assert [Variant.parse(n).stage(c) for n in names if "-xe_global0-fp32" in n] == ["control", "architecture"]
    # under several seeds it is set beside the parent's control over the seeds
    seeded = [v.name for v in grid({**c, "seeds": 2}) if v.seed]
    assert {"small-u-xe_global0_seed1-fp32", "small-u_slim-xe_global0_seed1-fp32"} <= set(seeded)
    c["compress"]["prune"]["decoders"] = None  # every compress decoder
    assert "small-u_slim-xe_gradual0.5-int8" in [v.name for v in grid(c)]


def test_the_dense_control_can_be_turned_off():
    c = _small()
    c["compress"]["prune"]["control"] = False
    assert "small-u-xe_global0-fp32" not in [v.name for v in grid(c)]
    c["compress"]["prune"].update(control=True, ratios=[], compare_methods=[])  # no sweep, no control
    assert not any(v.control for v in grid(c))


def test_every_compress_decoder_has_an_fp32_control_even_without_fp32_rows():
    """The summary reads controls in fp32: a slim decoder left unpruned keeps its fp32 control when
    compress.quantization lists int8 only."""
    c = _small()
    c["compress"] = {**c["compress"], "decoders": ["u", "u_slim"], "quantization": ["int8"],
                     "prune": {**c["compress"]["prune"], "decoders": ["u"]}}
    names = [v.name for v in grid(c)]
    assert "small-u_slim-xe_global0-fp32" in names and "small-u_slim-xe_global0-int8" in names
    assert "small-u_slim-xe_global0.5-int8" not in names and "small-u-xe_global0.5-fp32" not in names
    assert len(names) == len(set(names))
