"""The whole DAG, end to end, on a tiny config in a temporary directory.

One module-scoped run builds the table; the other tests reuse it to check caching,
what a config change reruns, and that bad config values stop the run in one line.
"""
import re
import subprocess

import pandas as pd
import pytest
import yaml

from captioning.results.table import COLUMNS
from helpers import ROOT, SNAKEMAKE, TINY_DAG, planned_jobs, smk, write_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("dag")
    write_config(work, TINY_DAG)
    smk(work, "results/table.csv")
    return work


@pytest.mark.integration
def test_table_has_every_variant_and_column(tiny_run):
    df = pd.read_csv(tiny_run / "results/table.csv")
    assert list(df.columns) == COLUMNS
    assert sorted(df["variant"]) == sorted(
        ["r50-updown-xe-fp32", "mnv3s-updown-xe-fp32", "lite0-updown-scst-fp32", "mnv3s-updown-kd-fp32",
         "r50-aoanet-xe-fp32", "lite0-aoanet-xe-fp32", "lite0-aoanet-scst-fp32",
         "r50-transformer-xe-fp32", "lite0-updown_slim-xe-fp32"]
        + [f"lite0-{d}-{s}-{q}" for d in ("updown", "transformer")
           for s in ("xe", "xe_global0.5", "xe_gradual0.5") for q in ("fp32", "fp16", "int8")]
        + ["lite0-updown-xe_global0-fp32", "lite0-transformer-xe_global0-fp32"]  # the dense controls
        + [f"lite0-{d}-xe_global0-{q}" for d in ("updown", "transformer") for q in ("fp16", "int8")]
        + [f"lite0-{d}-xe-{q}_ort" for d in ("updown", "transformer") for q in ("fp32", "int8")])  # ONNX Runtime
    # Every decoder is compared with its family's baseline; the variant inherited its parent's arch.
    by = df.set_index("variant")
    assert by.loc["lite0-updown_slim-xe-fp32", "family"] == "updown"
    assert by.loc["lite0-updown_slim-xe-fp32", "stage"] == "architecture"
    assert by.loc["lite0-updown_slim-xe-fp32", "params"] < by.loc["lite0-updown-xe-fp32", "params"]
    assert set(df["family"]) == {"updown", "aoanet", "transformer"}
    assert (df.loc[df["stage"] == "baseline", "encoder"] == "r50").all() and (df["stage"] == "baseline").sum() == 3
    # The pruned variants reached the ratio asked for, measured from the weights.
    pruned = df[df["prune_ratio"] > 0]
    assert len(pruned) == 12 and set(pruned["prune_method"]) == {"global", "gradual"}
    assert ((pruned["sparsity"] - 0.5).abs() <= 0.005).all()
    # Artifact sizes fall with sparsity and with quantization.
    size = df.set_index("variant")["size_mb"]
    for d in ("updown", "transformer"):
        for s in ("xe", "xe_global0.5"):
            assert size[f"lite0-{d}-{s}-fp32"] > size[f"lite0-{d}-{s}-fp16"] > size[f"lite0-{d}-{s}-int8"]
        for q in ("fp32", "fp16", "int8"):
            assert size[f"lite0-{d}-xe-{q}"] > size[f"lite0-{d}-xe_global0.5-{q}"]
    assert (df["floor_mb"] > 0).all()
    scst = df.set_index("variant").loc["lite0-updown-scst-fp32"]
    assert scst["stage"] == "scst" and scst["training"] == "scst"
    assert df.set_index("variant").loc["mnv3s-updown-kd-fp32", "stage"] == "distill"
    summary = (tiny_run / "results/summary.md").read_text()
    assert all(f"## {d}" in summary for d in ("updown", "aoanet", "transformer"))
    assert "`lite0-aoanet-scst-fp32` | scst |" in summary and "`mnv3s-updown-kd-fp32` | kd |" in summary
    rows = df[df["stage"].isin(["baseline", "encoder"]) & (df["decoder"] == "updown")].set_index("encoder")
    assert rows.loc["r50", "stage"] == "baseline" and rows.loc["r50", "size_reduction_pct"] == 0
    assert (rows.loc[["mnv3s", "lite0"], "stage"] == "encoder").all()
    # The small encoders really are smaller on disk than resnet50.
    assert (rows.loc[["mnv3s", "lite0"], "size_reduction_pct"] > 50).all()
    assert rows["params"].is_unique
    for col in ["BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "latency_ms", "size_mb"]:
        assert df[col].notna().all(), col
    # The dense controls: fine-tuned like the pruned rows, nothing pruned.
    controls = by[by["stage"] == "control"]
    assert sorted(controls.index) == ["lite0-transformer-xe_global0-fp32", "lite0-updown-xe_global0-fp32"]
    assert (controls["sparsity"] == 0).all() and (controls["prune_ratio"] == 0).all()
    # Every change is against the family's best uncompressed model, with a bootstrap interval.
    uncompressed = df[df["stage"].isin(["baseline", "encoder", "control"])]
    best = uncompressed.loc[uncompressed.groupby("family")["CIDEr"].idxmax()].set_index("family")["variant"]
    assert (df["quality_reference"] == df["family"].map(best)).all()
    assert (df["reference_cider"] > 0).all()
    assert df[["cider_change_pct", "cider_change_lo", "cider_change_hi"]].notna().all().all()
    assert (df["cider_change_lo"] <= df["cider_change_pct"] + 1e-9).all()
    assert (df["cider_change_pct"] <= df["cider_change_hi"] + 1e-9).all()
    # ONNX Runtime rows: the same stored weights on another engine; fp32 there captions as torch does.
    ort = by[by["runtime"] == "onnxruntime"]
    assert len(ort) == 4 and (by["runtime"].isin(["torch", "onnxruntime"])).all()
    for d in ("updown", "transformer"):
        assert by.loc[f"lite0-{d}-xe-fp32_ort", "stage"] == "runtime"
        assert by.loc[f"lite0-{d}-xe-fp32_ort", "CIDEr"] == pytest.approx(by.loc[f"lite0-{d}-xe-fp32", "CIDEr"])
        assert by.loc[f"lite0-{d}-xe-int8_ort", "stage"] == "quantize"
        assert by.loc[f"lite0-{d}-xe-int8_ort", "quantization"] == "int8"
    assert "Quality reference: `" in summary and "Pruning against the dense control `lite0-updown-xe_global0-fp32`" in summary
    assert (tiny_run / "results/table.md").is_file()
    assert (tiny_run / "results/pareto.png").stat().st_size > 1000


@pytest.mark.integration
def test_every_rule_left_a_log_and_a_benchmark(tiny_run):
    for rule in ["synthetic_dataset", "prepare_captions", "encoder_weights", "features", "train_xe",
                 "prune_finetune", "pack", "score", "latency", "table"]:
        assert list((tiny_run / "logs" / rule).glob("*.log")), rule
        assert list((tiny_run / "logs/benchmarks" / rule).glob("*.tsv")), rule


@pytest.mark.integration
def test_second_run_does_nothing(tiny_run):
    r = smk(tiny_run, "-n", "results/table.csv")
    assert "Nothing to be done" in r.stdout + r.stderr
    assert planned_jobs(tiny_run) == []


@pytest.mark.integration
def test_changing_one_encoder_reruns_only_what_depends_on_it(tiny_run):
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cfg["encoders"]["mnv3s"]["img_size"] = 48
    write_config(tiny_run, cfg)
    try:
        assert planned_jobs(tiny_run) == sorted([
            "Making the weights of encoder mnv3s",
            "Extracting features of tiny with encoder mnv3s",
            "Training decoder updown on encoder mnv3s features (cross-entropy)",
            # the distilled student's teacher: the family's SCST decoder on mnv3s (distill.teacher_training)
            "Self-critical training of decoder updown on encoder mnv3s features (CIDEr-D reward)",
            "Distilling decoder updown on encoder mnv3s features from its family's teacher",
            "Packing and captioning variant mnv3s-updown-kd-fp32",
            "Packing and captioning variant mnv3s-updown-xe-fp32",
            "Scoring the test captions of every variant of tiny",
            "Timing every artifact of tiny on CPU",
            "Writing the results table of tiny",
        ])
    finally:
        write_config(tiny_run, TINY_DAG)


@pytest.mark.integration
def test_plans_with_no_data_present(tmp_path):
    write_config(tmp_path, TINY_DAG)
    r = smk(tmp_path, "-n", "results/table.csv")
    assert "synthetic_dataset" in r.stdout and "train_xe" in r.stdout


@pytest.mark.integration
def test_bad_config_value_stops_with_one_line(tmp_path):
    cfg = yaml.safe_load(yaml.safe_dump(TINY_DAG))
    cfg["train"]["epochs"] = "many"
    write_config(tmp_path, cfg)
    r = smk(tmp_path, "-n", "results/table.csv", check=False)
    assert r.returncode != 0
    assert "config error: train.epochs: 'many' is not allowed (allowed: integer >= 1)" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.integration
def test_lint_is_clean():
    r = subprocess.run(SNAKEMAKE + ["--lint"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "Congratulations" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.integration
def test_seeds_train_each_dense_reference_architecture_and_student_again_under_its_own_seed(tmp_path):
    write_config(tmp_path, {**TINY_DAG, "seed": 5, "seeds": 2})
    out = smk(tmp_path, "-n", "-p", "results/table.csv").stdout
    shells = [line for line in out.splitlines() if " -m captioning " in line]
    outs = [m.group(1) for m in (re.search(r" --out (\S+)", s) for s in shells) if m]
    seeded = sorted(o.split("/decoders/")[1] for o in outs if "/decoders/" in o and "_seed1" in o)
    # the baseline, encoder and architecture rows' cross-entropy decoders, the dense controls
    # fine-tuned from them, and the distilled student
    assert seeded == sorted(["r50/updown/xe_seed1.safetensors", "r50/aoanet/xe_seed1.safetensors",
                             "r50/transformer/xe_seed1.safetensors", "mnv3s/updown/xe_seed1.safetensors",
                             "lite0/updown/xe_seed1.safetensors", "lite0/aoanet/xe_seed1.safetensors",
                             "lite0/transformer/xe_seed1.safetensors", "lite0/updown_slim/xe_seed1.safetensors",
                             "lite0/updown/xe_global0_seed1.safetensors",
                             "lite0/transformer/xe_global0_seed1.safetensors",
                             "mnv3s/updown/kd_seed1.safetensors"])
    # the student under seed + 1 learns from the same teacher as under the main seed
    teachers = {re.search(r"--out \S+/(kd\S*)\.safetensors", s).group(1): re.search(r'"teacher": "([^"]+)"', s).group(1)
                for s in shells if "/mnv3s/updown/kd" in s and " train " in s}
    assert set(teachers) == {"kd", "kd_seed1"} and teachers["kd"] == teachers["kd_seed1"]
    for s in shells:
        if "_seed1.safetensors --log-json" in s:
            assert " --seed 6 " in s, s  # seed + 1
            if " prune " in s:
                assert re.search(r"--decoder \S+/xe_seed1\.safetensors ", s), s  # from the same seed's decoder
        elif " train " in s or " prune " in s:
            assert " --seed 5 " in s, s
    packed = [s for s in shells if " pack " in s and "_seed1-fp32.capz" in s]
    assert len(packed) == 11


@pytest.mark.integration
def test_pruned_fine_tuning_and_its_control_learn_from_the_scst_decoder_with_kd_teacher_scst(tmp_path):
    prune = {**TINY_DAG["compress"]["prune"], "finetune": {"epochs": 2, "batch_size": 10, "kd_weight": 0.5,
                                                           "kd_teacher": "scst"}}
    write_config(tmp_path, {**TINY_DAG, "compress": {**TINY_DAG["compress"], "prune": prune}})
    shells = [line for line in smk(tmp_path, "-n", "-p", "results/table.csv").stdout.splitlines()
              if " -m captioning " in line]
    pruned = [s for s in shells if " prune " in s]
    assert {re.search(r"--out \S+/decoders/(\S+)\.safetensors", s).group(1) for s in pruned} >= {
        "lite0/updown/xe_global0", "lite0/updown/xe_global0.5", "lite0/transformer/xe_global0.5"}
    for s in pruned:
        dec = re.search(r"--decoder \S+/decoders/lite0/(\w+)/xe\.safetensors", s).group(1)
        assert f"--teacher work/tiny/decoders/lite0/{dec}/scst.safetensors " in s, s
    # the Transformer is not in scst.decoders: its SCST decoder is built for the teacher alone
    assert any(" scst " in s and "--out work/tiny/decoders/lite0/transformer/scst.safetensors" in s for s in shells)
    # the default teaches from the decoder itself, and kd_teacher without kd_weight teaches nothing: no --teacher
    write_config(tmp_path, TINY_DAG)
    assert " --teacher " not in smk(tmp_path, "-n", "-p", "results/table.csv").stdout
    prune["finetune"] = {"epochs": 2, "batch_size": 10, "kd_teacher": "scst"}
    write_config(tmp_path, {**TINY_DAG, "compress": {**TINY_DAG["compress"], "prune": prune}})
    assert " --teacher " not in smk(tmp_path, "-n", "-p", "results/table.csv").stdout


@pytest.mark.integration
def test_an_scst_teacher_is_trained_on_demand_and_teaches_by_its_captions(tmp_path):
    write_config(tmp_path, {**TINY_DAG, "distill": {**TINY_DAG["distill"], "teacher_training": "scst"}})
    shells = [line for line in smk(tmp_path, "-n", "-p", "results/table.csv").stdout.splitlines()
              if " -m captioning " in line]
    kd = [s for s in shells if "/kd.safetensors --log-json" in s]
    assert len(kd) == 1 and '"teacher": "work/tiny/decoders/mnv3s/updown/scst.safetensors"' in kd[0], kd
    assert '"kd_mode": "sequence"' in kd[0]  # the default mode
    # mnv3s is not in scst.encoders: its SCST decoder is built for the teacher alone, with no row of its own
    assert any(" scst " in s and "--out work/tiny/decoders/mnv3s/updown/scst.safetensors" in s for s in shells)
    assert not any("artifacts/mnv3s-updown-scst-" in s for s in shells)
    # ... though the student's row names it as its teacher
    assert any('"teacher": "mnv3s-updown-scst-fp32"' in s and "artifacts/mnv3s-updown-kd-" in s for s in shells)
