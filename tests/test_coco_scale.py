"""configs/coco.yaml planned at COCO's real size, on the SLURM profile, with nothing to run.

tools/simulate_coco.py writes a Karpathy JSON with COCO's counts (123,287 images, 5 captions
each) that reuses the 5 real fixture images. The dry run must plan the whole paper-scale
experiment fast, and every job must ask SLURM for what its work needs at that size: the
features' bytes follow from COCO's counts and the encoders' grid shapes, the times from the
throughputs assumed below (deliberately low for a GPU node, so a job that fits them fits).
"""
import copy
import json
import subprocess
import sys
import time

import pytest
import yaml

from helpers import ROOT, SNAKEMAKE, TINY_DAG, job_counts_in, write_config

sys.path.insert(0, str(ROOT / "tools"))
import simulate_coco  # noqa: E402

TRAIN_IMAGES = 82_783 + 30_504      # Karpathy's train + restval
TEST_IMAGES = 5_000
ALL_IMAGES = 123_287
# Bytes per image of the cached features (fc + a 7×7 grid, float16) at 224 px.
FEATURE_BYTES = {"r101": (49 + 1) * 2048 * 2, "lite0": (49 + 1) * 320 * 2}
STREAM_PEAK_MB = 4000   # a streaming training job's peak RSS (benchmarks/streaming.py: under 4 GB)
MODEL_MB = 4000         # the model, Adam's moments, batches and the CUDA context, on top of the features
# Images per second assumed, low on purpose.
XE_RATE, SCST_RATE, EXTRACT_RATE, CAPTION_RATE = 25, 10, 20, 2

EXPECTED_JOBS = {"prepare_captions": 1, "encoder_weights": 2, "features_shard": 16, "features": 2,
                 "train_xe": 9, "train_scst": 3, "prune_finetune": 21, "pack": 87, "score": 1,
                 "latency": 1, "table": 1}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """(config path, its dict, the run's folder) for the simulated COCO."""
    data, run = tmp_path_factory.mktemp("coco"), tmp_path_factory.mktemp("run")
    path = simulate_coco.simulate(data)
    return path, yaml.safe_load(path.read_text()), run


def test_simulated_dataset_has_cocos_counts(coco):
    _, cfg, _ = coco
    images = json.loads(open(cfg["dataset"]["json"]).read())["images"]
    splits = {}
    for im in images:
        splits[im["split"]] = splits.get(im["split"], 0) + 1
        assert len(im["sentences"]) == 5
    assert len(images) == ALL_IMAGES
    assert splits == {"train": 82_783, "restval": 30_504, "val": 5_000, "test": TEST_IMAGES}
    assert len({im["cocoid"] for im in images}) == ALL_IMAGES


def test_dry_run_plans_the_paper_experiment_fast(coco):
    path, _, run = coco
    start = time.monotonic()
    r = subprocess.run(SNAKEMAKE + ["-d", str(run), "-n", "--profile", str(ROOT / "profiles" / "slurm"),
                                    "--workflow-profile", "none", "--configfile", str(path), "--",
                                    "results/table.csv"], capture_output=True, text=True, cwd=run)
    seconds = time.monotonic() - start
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert job_counts_in(r.stdout) == EXPECTED_JOBS
    assert seconds < 60, f"planning took {seconds:.1f} s"
    # the default experiment's encoders do not leak in: --configfile replaces config.yaml
    assert "r50" not in r.stdout and "mnv3s" not in r.stdout


@pytest.fixture(scope="module")
def jobs(coco):
    path, _, run = coco
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "dag_resources.py"), "--json", "-d", str(run),
                        "--configfile", str(path)], capture_output=True, text=True, cwd=run)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_resources_tool_sees_every_planned_job(jobs):
    counts = {}
    for j in jobs:
        counts[j["rule"]] = counts.get(j["rule"], 0) + 1
    assert counts == EXPECTED_JOBS


def test_every_gpu_job_asks_for_one_gpu(jobs):
    gpu_rules = {"train_xe", "train_scst", "prune_finetune", "features_shard"}
    assert {j["rule"] for j in jobs if j["gpu"]} == gpu_rules
    assert all(j["gpu"] == 1 for j in jobs if j["rule"] in gpu_rules)


def test_training_memory_fits_cocos_features(coco, jobs):
    _, cfg, _ = coco
    limit = cfg["train"]["memory_limit_mb"]
    assert ALL_IMAGES * FEATURE_BYTES["r101"] / 1e6 > limit  # the big features stream: 25 GB
    training = [j for j in jobs if j["rule"] in ("train_xe", "train_scst", "prune_finetune")]
    assert training
    for j in training:
        features_mb = ALL_IMAGES * FEATURE_BYTES[j["wildcards"]["enc"]] / 1e6
        held = features_mb if features_mb <= limit else STREAM_PEAK_MB
        assert j["mem_mb"] >= held + MODEL_MB, j


def test_time_limits_fit_cocos_sizes(coco, jobs):
    """Each training job's limit outlasts one epoch (so every resubmission makes progress), and
    the retries the profile allows cover all epochs; the other jobs fit in one go."""
    _, cfg, _ = coco
    retries = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())["retries"]
    epoch_min = {"train_xe": TRAIN_IMAGES / XE_RATE / 60, "prune_finetune": TRAIN_IMAGES / XE_RATE / 60,
                 "train_scst": TRAIN_IMAGES / SCST_RATE / 60}
    epochs = {"train_xe": cfg["train"]["epochs"], "prune_finetune": cfg["compress"]["prune"]["finetune"]["epochs"],
              "train_scst": cfg["scst"]["epochs"]}
    shards = cfg["extract"]["shards"]
    for j in jobs:
        rule, minutes = j["rule"], j["runtime"]
        if rule in epoch_min:
            assert minutes >= 1.5 * epoch_min[rule], j
            assert minutes * (1 + retries) >= epochs[rule] * epoch_min[rule], j
        elif rule == "features_shard":
            assert minutes >= ALL_IMAGES / shards / EXTRACT_RATE / 60, j
        elif rule == "pack":
            assert minutes >= TEST_IMAGES / CAPTION_RATE / 60, j
        elif rule == "score":
            assert minutes >= 30 + sum(r["rule"] == "pack" for r in jobs), j


def test_resources_follow_the_config(tmp_path):
    """Set values reach the jobs; unset training memory follows train.memory_limit_mb, and the
    score job's time follows the number of variants."""
    cfg = copy.deepcopy(TINY_DAG)
    cfg["train"] = {**cfg.get("train", {}), "memory_limit_mb": 1000}
    cfg["resources"] = {"pack": {"runtime": 7}, "features": {"mem_mb": 123}}
    write_config(tmp_path, cfg)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "dag_resources.py"), "--json", "-d", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = [json.loads(line) for line in r.stdout.splitlines()]
    by_rule = {}
    for j in jobs:
        by_rule.setdefault(j["rule"], []).append(j)
    assert {j["runtime"] for j in by_rule["pack"]} == {7}
    assert {j["mem_mb"] for j in by_rule["features"]} == {123}
    assert {j["mem_mb"] for j in by_rule["train_xe"] + by_rule["prune_finetune"]} == {5000}
    assert {j["runtime"] for j in by_rule["train_xe"]} == {240}  # the schema's default
    assert by_rule["score"][0]["runtime"] == 30 + 3 * len(by_rule["pack"])
