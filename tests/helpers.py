"""Shared test data: a tiny fake dataset in the formats the stages write, and the tiny DAG config.

Test modules import from here, never from each other.
"""
import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

from captioning.training.xe import sequence_loss

WORDS = ["a", "dog", "cat", "on", "the", "grass", "mat", "runs", "sits", "red"]
W = {w: i + 1 for i, w in enumerate(WORDS)}
# Two kinds of image; captions depend on the kind, features too.
CAPS = {0: ["a dog runs on the grass", "a red dog runs", "the dog runs on grass", "a dog on the grass", "dog runs"],
        1: ["a cat sits on the mat", "the cat sits", "a red cat on a mat", "a cat on the mat", "cat sits on mat"]}
SPLITS = ["train", "train", "restval", "train", "train", "train", "val", "val", "test", "test"]
L, C, HW = 7, 6, 4


def make_dataset(root, n_caps=(5, 5, 3, 5, 5, 1, 5, 5, 5, 5), ids=None, seed=0):
    """features.h5 and a prepared dir in the formats the earlier stages write."""
    rng = np.random.default_rng(seed)
    prep = root / "prepared"
    prep.mkdir(parents=True, exist_ok=True)
    n = len(SPLITS)
    img_ids = list(range(100, 100 + n))
    kinds = [i % 2 for i in range(n)]
    images = [{"id": i, "file_path": f"img/{i}.jpg", "split": s} for i, s in zip(img_ids, SPLITS)]
    (prep / "images.json").write_text(json.dumps(images))
    (prep / "vocab.json").write_text(json.dumps({"itow": {str(i): w for w, i in W.items()}}))
    labels, start, end = [], [], []
    for k, nc in zip(kinds, n_caps):
        start.append(len(labels))
        for j in range(nc):
            row = [W[w] for w in CAPS[k][j % 5].split()][:L]
            labels.append(row + [0] * (L - len(row)))
        end.append(len(labels))
    with h5py.File(prep / "labels.h5", "w") as f:
        f["labels"] = np.array(labels, dtype=np.int32)
        f["label_start_ix"] = np.array(start, dtype=np.int64)
        f["label_end_ix"] = np.array(end, dtype=np.int64)
    for split in ("val", "test"):
        anns = [{"image_id": i, "id": 10 * i + j, "caption": CAPS[k][j].capitalize() + "."}
                for i, k, s in zip(img_ids, kinds, SPLITS) if s == split for j in range(5)]
        refs = {"images": [{"id": a["image_id"]} for a in anns[::5]], "annotations": anns}
        (prep / f"refs_{split}.json").write_text(json.dumps(refs))
    centers = rng.normal(size=(2, HW, C))
    att = np.stack([centers[k] + 0.3 * rng.normal(size=(HW, C)) for k in kinds]).astype(np.float16)
    feats = root / "features.h5"
    with h5py.File(feats, "w") as f:
        f["ids"] = np.array(ids if ids is not None else img_ids, dtype=np.int64)
        f["fc"] = att.mean(1)
        f["att"] = att
    return feats, prep


TINY = dict(input_encoding_size=16, rnn_size=16, att_hid_size=8, drop_prob=0.1)


def prune_smallest(module, zeros: float) -> None:
    """Zero the smallest-magnitude fraction ``zeros`` of every weight (dim >= 2), in place."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                cut = p.abs().flatten().kthvalue(max(1, int(zeros * p.numel()))).values
                p[p.abs() <= cut] = 0


def overfit(model, fc, att, seq, lr: float, steps: int) -> list[float]:
    """Adam on one batch with the training loss, ``steps`` times; the loss before each step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = sequence_loss(model(fc, att, seq), seq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---- the tiny DAG of the workflow tests ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A script of ``benchmarks/`` (not a package module) as a module, registered in sys.modules
    (dataclasses need that)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]

TINY_DAG = {
    "seed": 0,
    "dataset": {"name": "tiny", "kind": "synthetic", "word_count_threshold": 1,
                "synthetic": {"n_train": 40, "n_val": 8, "n_test": 8, "img_size": 64}},
    "encoders": {
        "r50": {"timm_name": "resnet50", "weights": "pretrain", "img_size": 64,
                "pretrain": {"epochs": 1, "batch_size": 20}},
        "mnv3s": {"timm_name": "mobilenetv3_small_100", "weights": "pretrain", "img_size": 64,
                  "pretrain": {"epochs": 1, "batch_size": 20}, "decoders": ["updown"]},
        "lite0": {"timm_name": "tf_efficientnet_lite0", "weights": "efficientnet-lite0", "img_size": 64},
    },
    "baseline_encoder": "r50",
    # All three families and an architecture variant; the stages' decoders lists spread them over the stages.
    "decoders": {
        "updown": {"arch": "updown", "input_encoding_size": 32, "rnn_size": 32, "att_hid_size": 16},
        "aoanet": {"arch": "aoanet", "input_encoding_size": 32, "rnn_size": 32, "att_hid_size": 32, "num_heads": 2,
                   "refiner_layers": 1, "train": {"lr": 0.001}},
        "transformer": {"arch": "transformer", "d_model": 32, "d_ff": 64, "num_heads": 2, "enc_layers": 1,
                        "dec_layers": 1},
        "updown_slim": {"variant_of": "updown", "rnn_size": 16, "embed_rank": 8},
    },
    "train": {"epochs": 1, "batch_size": 10, "threads": 1},
    "compress": {"encoders": ["lite0"], "decoders": ["updown", "transformer"], "quantization": ["fp32", "fp16", "int8"],
                 "onnxruntime": ["fp32", "int8"], "calibration_images": 8,
                 "prune": {"method": "global", "ratios": [0.5], "compare_ratio": 0.5,
                           "compare_methods": ["gradual"], "finetune": {"epochs": 2, "batch_size": 10}}},
    "scst": {"encoders": ["lite0"], "decoders": ["updown", "aoanet"], "epochs": 1, "batch_size": 10, "sample_n": 2},
    "distill": {"encoders": ["mnv3s"], "decoders": ["updown"]},
    "evaluate": {"beam_size": 2, "latency_images": 3},
}


def smk(workdir, *args, check=True):
    r = subprocess.run(SNAKEMAKE + ["-d", str(workdir), "--cores", "2", *args],
                       capture_output=True, text=True, cwd=workdir)
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def job_counts_in(out):
    """{rule: number of jobs} from the job stats of Snakemake's output."""
    stats = out[out.index("Job stats:"):].split("\n")[3:]
    counts = {}
    for line in stats:
        name, _, n = line.partition(" ")
        if name == "total":
            return counts
        counts[name] = int(n)
    raise AssertionError(f"no job stats in:\n{out}")


def write_config(workdir, cfg):
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


def planned_jobs(workdir):
    """The one-line message of every job a dry run plans (each names its wildcards)."""
    out = smk(workdir, "-n", "results/table.csv").stdout
    return sorted(re.findall(r"^Job \d+: (.*)$", out, flags=re.M))


@contextlib.contextmanager
def fake_meteor():
    """Stands in for METEOR's 10 s start where a test is not about METEOR's numbers."""
    class Fake:
        def compute_score(self, gts, res):
            return 0.5, [0.5] * len(gts)
    yield Fake()
