"""Kill-safety and determinism: a training job killed with SIGKILL resumes when rerun, and the
same config gives the same table.

Snakemake deletes the declared output of a killed job before rerunning it, so training keeps its
state in undeclared siblings of the output (``checkpoint.run_files``) and writes the output only at the end.
"""
import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from captioning.io import load_tensors
from captioning.models import load_decoder, read_decoder_meta, save_decoder
from captioning.results.table import COLUMNS
from captioning.training import train_xe
from captioning.training.scst import train_scst
from captioning.training.checkpoint import run_files
from helpers import ROOT, SNAKEMAKE, TINY_DAG, make_dataset, smk, write_config
from helpers import TINY as TINY_DECODER  # the tiny decoder of the training tests

KW = dict(batch_size=3, lr=5e-3, seed=3, progress=False)


def _weights(path) -> dict:
    return load_tensors(path)[0]


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _resume_epoch(resume_path: Path) -> int:
    """The last finished epoch recorded in a resume file, 0 while there is none (or it is mid-rename)."""
    with contextlib.suppress(Exception):
        if resume_path.is_file():
            return int(load_tensors(resume_path)[1]["epoch"])
    return 0


def _wait_for_epoch(resume_path: Path, proc: subprocess.Popen, epoch: int, timeout: float) -> int:
    """Poll until the resume file records ``epoch`` or later; fail if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen = _resume_epoch(resume_path)
        if seen >= epoch:
            return seen
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before epoch {epoch} was saved")
        time.sleep(0.02)
    raise AssertionError(f"{resume_path}: no epoch {epoch} after {timeout} s")


# ---- unit level: train_xe / train_scst killed after an epoch -------------------------------------

# Run train_xe in a child that hangs right after epoch 1's resume file is saved, so the SIGKILL
# lands at a known point instead of racing a 20 ms epoch.
_HANG_AFTER_EPOCH_1 = """
import json, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from captioning.training import loop, xe
from helpers import TINY
save = loop.save_resume
def save_then_hang(path, decoder, optimizer, meta, mask=None):
    save(path, decoder, optimizer, meta, mask)
    if meta["epoch"] == 1:
        time.sleep(600)
loop.save_resume = save_then_hang
xe.train_xe({feats!r}, {prep!r}, {out!r}, "updown", TINY, epochs=3, **json.loads({kw!r}))
"""


def test_train_xe_killed_after_an_epoch_resumes_to_the_same_weights(tmp_path, capfd):
    feats, prep = make_dataset(tmp_path)
    full, out = tmp_path / "full" / "xe.safetensors", tmp_path / "killed" / "xe.safetensors"
    ref = train_xe(feats, prep, full, "updown", TINY_DECODER, epochs=3, **KW)
    resume, best = run_files(out)

    script = _HANG_AFTER_EPOCH_1.format(root=str(ROOT), tests=str(ROOT / "tests"), feats=str(feats),
                                        prep=str(prep), out=str(out), kw=json.dumps(KW))
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        assert _wait_for_epoch(resume, child, 1, timeout=120) == 1
    finally:
        child.kill()
        child.wait()
    # mid-run, the declared output does not exist (nothing "looks done"); the run lives beside it
    assert not out.exists() and best.is_file() and read_decoder_meta(best)["epoch"] == 1

    capfd.readouterr()
    res = train_xe(feats, prep, out, "updown", TINY_DECODER, epochs=3, **KW)
    assert f"xe: resuming {out} after epoch 1" in capfd.readouterr().err
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in res["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in ref["history"]]
    assert res["best_epoch"] == ref["best_epoch"] and _same_weights(out, full)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, resume.name, best.name])  # no temp files
    assert load_tensors(resume)[0] == {} and os.path.samefile(out, best)  # a finished record, no copy


def test_resume_needs_the_matching_best_checkpoint(tmp_path, capfd):
    feats, prep = make_dataset(tmp_path)
    full, out = tmp_path / "full" / "xe.safetensors", tmp_path / "cut" / "xe.safetensors"
    train_xe(feats, prep, full, "updown", TINY_DECODER, epochs=3, **KW)
    resume, best = run_files(out)

    # "killed" after epoch 1, then Snakemake deletes the declared output: still resumes
    train_xe(feats, prep, out, "updown", TINY_DECODER, epochs=1, keep_resume=True, **KW)
    assert out.is_file() and resume.is_file() and best.is_file()
    out.unlink()
    capfd.readouterr()
    train_xe(feats, prep, out, "updown", TINY_DECODER, epochs=2, keep_resume=True, **KW)
    assert f"xe: resuming {out} after epoch 1" in capfd.readouterr().err

    # a best file that disagrees with the resume file (a kill between the two writes) is not trusted
    decoder = load_decoder(best)
    save_decoder(decoder, best, {**read_decoder_meta(best), "epoch": 7})
    train_xe(feats, prep, out, "updown", TINY_DECODER, epochs=3, **KW)
    assert "holds epoch 7, not the best epoch" in capfd.readouterr().err
    assert _same_weights(out, full)  # started over, same result

    # nor is a resume file whose best file is gone
    train_xe(feats, prep, out, "updown", TINY_DECODER, epochs=1, keep_resume=True, **KW)
    best.unlink()
    capfd.readouterr()
    train_xe(feats, prep, out, "updown", TINY_DECODER, epochs=3, **KW)
    assert f"({best} is gone); starting over" in capfd.readouterr().err
    assert _same_weights(out, full) and read_decoder_meta(resume)["finished"]


def test_a_finished_run_whose_output_is_deleted_publishes_it_again(tmp_path, capfd):
    """SLURM may record a job that exited 0 as TIMEOUT; Snakemake then deletes the output and reruns it.

    The rerun must not train from epoch 1: it finds the finished record and publishes the same file.
    """
    feats, prep = make_dataset(tmp_path)
    out = tmp_path / "m" / "xe.safetensors"
    ref = train_xe(feats, prep, out, "updown", TINY_DECODER, epochs=3, **KW)
    blob = out.read_bytes()
    out.unlink()
    capfd.readouterr()
    again = train_xe(feats, prep, out, "updown", TINY_DECODER, epochs=3, **KW)
    assert f"xe: {out} finished after epoch 3 already; publishing it again" in capfd.readouterr().err
    assert again["history"] == ref["history"] and again["best_epoch"] == ref["best_epoch"]  # no epoch was rerun
    assert out.read_bytes() == blob

    # a run asked for more epochs cannot continue from a record without weights: it starts over
    out.unlink()
    longer = train_xe(feats, prep, out, "updown", TINY_DECODER, epochs=4, **KW)
    assert "(a finished run with {'epochs': 3, 'patience': None}, not {'epochs': 4, 'patience': None})" \
        "; starting over" in capfd.readouterr().err
    assert [h["epoch"] for h in longer["history"]] == [1, 2, 3, 4]


def test_train_scst_resumes_after_its_output_was_deleted(tmp_path, capfd):
    feats, prep = make_dataset(tmp_path)
    xe = tmp_path / "xe.safetensors"
    train_xe(feats, prep, xe, "updown", TINY_DECODER, epochs=2, **KW)
    kw = dict(KW, lr=1e-2, sample_n=2, max_length=8)
    full, out = tmp_path / "full" / "scst.safetensors", tmp_path / "cut" / "scst.safetensors"
    ref = train_scst(xe, feats, prep, full, epochs=2, **kw)
    train_scst(xe, feats, prep, out, epochs=1, keep_resume=True, **kw)
    out.unlink()  # Snakemake's cleanup of an incomplete job
    capfd.readouterr()
    res = train_scst(xe, feats, prep, out, epochs=2, **kw)
    assert f"scst: resuming {out} after epoch 1" in capfd.readouterr().err
    assert [h["reward"] for h in res["history"]] == [h["reward"] for h in ref["history"]]
    assert _same_weights(out, full)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(p.name for p in (out, *run_files(out)))


# ---- the workflow: SIGKILL a training job, rerun Snakemake -----------------------------------------

EPOCHS = 6
# One encoder that is also the baseline, no compression, SCST or distillation: one training job.
SMALL = {**TINY_DAG, "encoders": {"lite0": TINY_DAG["encoders"]["lite0"]}, "baseline_encoder": "lite0",
         "decoders": {"updown": TINY_DAG["decoders"]["updown"]},
         "train": {**TINY_DAG["train"], "epochs": EPOCHS, "batch_size": 4},
         "compress": {**TINY_DAG["compress"], "encoders": [], "decoders": None},
         "scst": {**TINY_DAG["scst"], "encoders": [], "decoders": None},
         "distill": {"encoders": []}}
VARIANT = "lite0-updown-xe-fp32"
XE_OUT = "work/tiny/decoders/lite0/updown/xe.safetensors"
TRAIN_LOG = "logs/train_xe/tiny-lite0-updown.log"


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory):
    """The small DAG run uninterrupted in two temp dirs, side by side (one core each)."""
    dirs = [tmp_path_factory.mktemp(name) for name in ("clean", "again")]
    runs = []
    for d in dirs:
        write_config(d, SMALL)
        with open(d / "snakemake.log", "w") as log:
            runs.append(subprocess.Popen(SNAKEMAKE + ["-d", str(d), "--cores", "1", "results/table.csv"],
                                         cwd=d, stdout=log, stderr=subprocess.STDOUT))
    for d, run in zip(dirs, runs):
        assert run.wait() == 0, f"snakemake failed in {d}:\n{(d / 'snakemake.log').read_text()[-5000:]}"
    return dirs


def _process_tree(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc: psutil is not a dependency)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _cmdline_and_cwd(pid: int) -> tuple[str, str]:
    """(XE_OUT if the command line names it, else "", the working directory) of a process."""
    with contextlib.suppress(OSError):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return (XE_OUT if XE_OUT in cmd else "", os.path.realpath(os.readlink(f"/proc/{pid}/cwd")))
    return "", ""


def _gone(pid: int) -> bool:
    """Exited, or a zombie nobody has reaped yet."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


@pytest.mark.integration
def test_killed_training_job_resumes_when_snakemake_reruns(tmp_path, clean_runs):
    work = tmp_path
    write_config(work, SMALL)
    out = work / XE_OUT
    resume, best = run_files(out)
    with open(work / "first.log", "w") as log:
        first = subprocess.Popen(SNAKEMAKE + ["-d", str(work), "--cores", "2", "results/table.csv"],
                                 cwd=work, stdout=log, stderr=subprocess.STDOUT)
        tree = []
        try:
            seen = _wait_for_epoch(resume, first, 1, timeout=300)
            # only processes of this run: descendants of our Snakemake, working in our temp dir
            tree = _process_tree(first.pid)
            trainers = [p for p in tree if _cmdline_and_cwd(p) == (XE_OUT, os.path.realpath(work))]
            assert trainers, "found no training process to kill"
        finally:
            # SIGKILL Snakemake, then its jobs (the trainer among them): no chance to clean up, like a lost node
            tree = tree or _process_tree(first.pid)
            first.kill()
            first.wait()
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 30
            while not all(_gone(p) for p in tree) and time.time() < deadline:
                time.sleep(0.1)
    killed_at = _resume_epoch(resume)
    assert 1 <= seen <= killed_at < EPOCHS, "the kill did not land mid-training"
    assert not out.exists() and best.is_file()  # nothing looks done mid-run

    smk(work, "--unlock")  # a killed Snakemake leaves its lock behind
    smk(work, "results/table.csv")
    text = (work / TRAIN_LOG).read_text()
    m = re.search(r"xe: resuming (\S+) after epoch (\d+)", text)
    assert m, f"training restarted instead of resuming:\n{text[-2000:]}"
    assert m.group(1) == XE_OUT and int(m.group(2)) == killed_at and "starting over" not in text
    history = json.loads((work / (TRAIN_LOG + ".json")).read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert read_decoder_meta(resume)["finished"] and os.path.samefile(best, out)  # a record, no second copy

    df = pd.read_csv(work / "results/table.csv")
    assert list(df.columns) == COLUMNS and list(df["variant"]) == [VARIANT]
    assert df["CIDEr"].notna().all() and df["BLEU_4"].notna().all()
    # resumed = uninterrupted, down to the weights
    assert _same_weights(out, clean_runs[0] / XE_OUT)


# ---- determinism ----------------------------------------------------------------------------------

def _csv_without(path: Path, column: str) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(path.read_text())))
    i = rows[0].index(column)
    return [r[:i] + r[i + 1:] for r in rows]


@pytest.mark.integration
def test_same_config_gives_the_same_table(clean_runs):
    clean_run, again = clean_runs
    a, b = clean_run / "results/table.csv", again / "results/table.csv"
    pd.testing.assert_frame_equal(pd.read_csv(a).drop(columns="latency_ms"), pd.read_csv(b).drop(columns="latency_ms"))
    assert _csv_without(a, "latency_ms") == _csv_without(b, "latency_ms")  # the text too, not just the values
    # safetensors writes its metadata keys in no fixed order, so compare contents, not bytes
    assert _same_weights(clean_run / XE_OUT, again / XE_OUT)
    assert read_decoder_meta(clean_run / XE_OUT) == read_decoder_meta(again / XE_OUT)
    caps = f"results/eval/tiny/{VARIANT}/captions.json"
    assert (clean_run / caps).read_text() == (again / caps).read_text()
