"""The DAG on a real one-node SLURM cluster, through profiles/slurm.

tests/slurm/start.sh installs and starts slurmctld, slurmd and munged on this machine (root
and apt-get needed; otherwise the test is skipped and says why). A small variant of the
workflow test's TINY_DAG config then runs twice: once with `--profile profiles/slurm`, every job
an sbatch job, and once locally. The SLURM run must have really gone through sbatch, and
both runs must give the same table (latency aside: it is a timing).

Then one training job with a 1-minute time limit, longer than that: SLURM must kill it (TIMEOUT),
Snakemake resubmit it, and the new job continue from the last finished epoch, ending with the
weights an uninterrupted local run gives.
"""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pandas as pd
import pytest
import torch

from captioning.io import load_tensors
from captioning.training.checkpoint import run_files
from helpers import ROOT, SNAKEMAKE, TINY_DAG, job_counts_in, smk, write_config

SCRIPTS = ROOT / "tests" / "slurm"
PARTITION = "test"

# TINY_DAG without the slow parts (resnet50 pretraining, SCST, distillation, the quantization
# sweep), keeping one rule of each kind: a pretrained encoder and a packaged one, XE training,
# pruning with fine-tuning (and its dense control), packing, evaluation and the table. 19 jobs.
SMALL = copy.deepcopy(TINY_DAG)
SMALL["encoders"] = {k: TINY_DAG["encoders"][k] for k in ("mnv3s", "lite0")}
SMALL["baseline_encoder"] = "mnv3s"
SMALL["decoders"] = {"updown": TINY_DAG["decoders"]["updown"]}
SMALL["compress"]["decoders"] = SMALL["scst"]["decoders"] = None
SMALL["compress"]["quantization"] = ["fp32"]
SMALL["compress"]["onnxruntime"] = []  # torch rows only: the SLURM test proves scheduling, not engines
SMALL["compress"]["prune"]["compare_methods"] = []
SMALL["scst"]["encoders"] = []
SMALL["distill"] = {"encoders": []}


def why_not_here():
    """Why this machine cannot run a SLURM cluster, or None when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "not root (start.sh installs SLURM and starts its daemons)"
    if all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is not available to install it"
    return None


def rule_names():
    """Every rule of the workflow, read from the rule files (so new rules are covered), those made
    with ``use rule X as Y`` included."""
    text = "".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    found = re.findall(r"^(?:rule (\w+):|use rule \w+ as (\w+))", text, flags=re.M)
    return sorted({a or b for a, b in found})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running cluster: the environment that reaches it, and its state folder."""
    why = why_not_here()
    if why:
        pytest.skip(f"SLURM test did not run: {why}")
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURM_TEST_DIR=str(state), SLURM_TEST_PARTITION=PARTITION,
               SLURM_CONF=str(state / "slurm.conf"))
    try:
        r = subprocess.run(["bash", SCRIPTS / "start.sh"], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"tests/slurm/start.sh failed:\n{r.stdout}\n{r.stderr}"
        yield env, state
    finally:
        subprocess.run(["bash", SCRIPTS / "stop.sh"], env=env, capture_output=True, timeout=120)


def node_size(env):
    """(CPUs, memory in MB) of the test node, as SLURM sees it."""
    out = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%c %m"], env=env, capture_output=True, text=True)
    cpus, mem = out.stdout.split()
    return int(cpus), int(mem)


def smk_slurm(workdir, env, *args, retries=0, check=True):
    """snakemake with profiles/slurm, overridden for the CPU-only test node: its partition,
    no GPUs, its core count, and every SLURM log kept as evidence. ``retries``: how often a failed
    job is resubmitted (the profile's own is 1; 0 makes a failure show at once). With ``check``, a
    failed run raises; the finished process is returned either way."""
    rules = rule_names()
    overrides = [f"{r}:gpu=0" for r in rules]
    cpus, mem = node_size(env)
    if mem < 8000:  # a small machine: let each job ask for the whole node instead
        overrides += [f"{r}:mem_mb={mem}" for r in rules]
    cmd = SNAKEMAKE + [
        "-d", str(workdir), "--profile", str(ROOT / "profiles" / "slurm"), "--workflow-profile", "none",
        "--default-resources", f"slurm_partition={PARTITION}", "mem_mb=1000", "runtime=30",
        "--slurm-keep-successful-logs", "--set-resources", *overrides,
        "--cores", str(cpus), "--jobs", "4", "--latency-wait", "5", "--retries", str(retries),
        *args,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake on SLURM failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The same config run on SLURM and locally, at the same time (the local run fills the
    time the SLURM run spends waiting on the scheduler)."""
    env, _ = cluster
    on_slurm, local = tmp_path_factory.mktemp("on_slurm"), tmp_path_factory.mktemp("local")
    for work in (on_slurm, local):
        write_config(work, SMALL)
    with ThreadPoolExecutor(2) as pool:
        slurm_run = pool.submit(smk_slurm, on_slurm, env, "results/table.csv")
        local_run = pool.submit(smk, local, "results/table.csv")
        r = slurm_run.result()
        local_run.result()
    log = r.stdout + r.stderr
    return on_slurm, local, log


def job_counts(workdir):
    """{rule: number of jobs} of the whole DAG, from a forced dry run."""
    return job_counts_in(smk(workdir, "-n", "--forceall", "results/table.csv").stdout)


def slurm_jobs(env):
    """Every job slurmctld remembers, as {jobid: {field: value}} (`scontrol show job -o`)."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], env=env, capture_output=True, text=True).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        jobs[fields["JobId"]] = fields
    return jobs


def test_profile_plans_the_dag(tmp_path):
    """Runs everywhere, cluster or not: the profile's options all exist and it plans every job
    (a misspelt key in profiles/slurm/config.yaml stops Snakemake here)."""
    write_config(tmp_path, SMALL)
    r = subprocess.run(SNAKEMAKE + ["-d", str(tmp_path), "--profile", str(ROOT / "profiles" / "slurm"),
                                    "--workflow-profile", "none", "-n", "results/table.csv"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Using profile" in r.stderr and "profiles/default" not in r.stderr
    assert job_counts_in(r.stdout) == {"synthetic_dataset": 1, "prepare_captions": 1, "encoder_weights": 2,
                                       "features": 2, "train_xe": 2, "prune_finetune": 2, "pack": 4,
                                       "score": 1, "latency": 1, "table": 1}


@pytest.mark.integration
def test_every_job_went_through_sbatch(cluster, runs):
    env, state = cluster
    on_slurm, _, log = runs
    # Snakemake's log of each SLURM job: .snakemake/slurm_logs/rule_<rule>/<wildcards>/<jobid>.log
    root = on_slurm / ".snakemake" / "slurm_logs"
    ids = {p.stem: p.relative_to(root).parts[0].removeprefix("rule_") for p in root.rglob("*.log")}
    assert dict(Counter(ids.values())) == job_counts(on_slurm)
    # slurmctld ran each of them, in the test partition, to completion, with the rule's resources.
    jobs = slurm_jobs(env)
    for jobid, rule in ids.items():
        job = jobs[jobid]
        assert f"SLURM jobid {jobid} " in log
        assert job["JobState"] == "COMPLETED" and job["Partition"] == PARTITION, job
        assert job["Comment"].startswith(f"rule_{rule}"), job
    train = [jobs[i] for i, rule in ids.items() if rule == "train_xe"]
    assert len(train) == 2 and all(j["NumCPUs"] == "1" for j in train)
    if node_size(env)[1] >= 8000:
        assert all(j["MinMemoryNode"] == "8000M" for j in train)  # train_xe's own mem_mb
    # SLURM's job completion log saw them finish too.
    finished = re.findall(r"^JobId=(\d+) .*JobState=COMPLETED", (state / "jobcomp.log").read_text(), flags=re.M)
    assert set(ids) <= set(finished)


@pytest.mark.integration
def test_slurm_table_matches_local_run(runs):
    on_slurm, local, _ = runs
    a = pd.read_csv(on_slurm / "results/table.csv").drop(columns="latency_ms")
    b = pd.read_csv(local / "results/table.csv").drop(columns="latency_ms")
    assert sorted(a["variant"]) == sorted(
        ["mnv3s-updown-xe-fp32", "lite0-updown-xe-fp32", "lite0-updown-xe_global0.5-fp32", "lite0-updown-xe_global0-fp32"])
    a = a.sort_values("variant").reset_index(drop=True)
    b = b.sort_values("variant").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=True)


# ---- a training job killed at its time limit, resubmitted ---------------------------------------

# One cross-entropy job that outlasts its 1-minute limit, from SMALL's lite0 encoder (ImageNet
# weights, no pretraining job). The decoder is wide enough for an epoch of a few seconds, and 40
# val images make val CIDEr-D (which picks the published epoch) less noisy, so the best epoch
# tends to be a late one, trained after the resume. The epoch count is set per run, from how
# long an epoch takes here and now.
RESUME = copy.deepcopy(SMALL)
RESUME["encoders"] = {"lite0": SMALL["encoders"]["lite0"]}
RESUME["baseline_encoder"] = "lite0"
RESUME["dataset"]["synthetic"].update(n_train=200, n_val=40)
RESUME["decoders"]["updown"].update(input_encoding_size=256, rnn_size=256, att_hid_size=128)
RESUME["train"].update(lr=0.002)
RESUME["resources"] = {"train_xe": {"runtime": 1}}  # minutes: the SLURM time limit (sbatch -t 1)
RESUME_TARGET = "work/tiny/decoders/lite0/updown/xe.safetensors"
RESUME_LOG = "logs/train_xe/tiny-lite0-updown.log"

# The timing. slurmctld tests time limits every 30 s (not configurable), so a job with a 1-minute
# limit is killed at the first test after 60 s: 60 to 90 s after it starts, depending on where in
# that 30-s cycle it started. The test starts Snakemake 10-18 s into a cycle (read from
# slurmctld's debug2 log); the job starts about 2 s later, so the first attempt is killed about
# 75 s after it starts and, less its start-up (about 8 s), trains for about 65 s. Training
# RESUME_TRAIN_SECONDS in all leaves about 20 s for the second attempt: well inside its minute.
# (That margin matters: a job that finishes after its limit but before the next test still
# counts as TIMEOUT: see the docstring of test_timed_out_training_resumes_when_resubmitted.)
LIMIT_CHECK_PHASE = (10, 18)
RESUME_TRAIN_SECONDS = 85

SECONDS_PER_EPOCH = """\
import json, sys
import torch
torch.set_num_threads(1)  # as the job: train --threads 1
from captioning.training.xe import train_xe
history = train_xe(**json.loads(sys.argv[1]))["history"]
print(sum(row["seconds"] for row in history) / len(history))  # epochs alone, not the set-up
"""


def seconds_per_epoch(workdir, scratch):
    """Wall seconds of one RESUME epoch here and now, from two epochs on the prepared data."""
    dec = {k: v for k, v in RESUME["decoders"]["updown"].items() if k != "arch"}
    kw = {"features_h5": str(workdir / "work/tiny/features/lite0.h5"), "prepared_dir": str(workdir / "work/tiny/prepared"),
          "out_path": str(scratch / "calibration.safetensors"), "decoder_name": "updown", "decoder_cfg": dec, "epochs": 2,
          "batch_size": RESUME["train"]["batch_size"], "lr": RESUME["train"]["lr"], "device": "cpu", "progress": False}
    r = subprocess.run([sys.executable, "-c", SECONDS_PER_EPOCH, json.dumps(kw)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return float(r.stdout.splitlines()[-1])


def time_limit_checks(state):
    """When slurmctld tested job time limits (logged at debug2 level), as time.time() seconds."""
    text = (state / "slurmctld.log").read_text(errors="replace")
    stamps = re.findall(r"^\[([0-9T:.-]+)\] debug2: Testing job time limits", text, flags=re.M)
    return [datetime.fromisoformat(s).timestamp() for s in stamps]


def wait_for_phase(state, lo, hi, timeout=75):
    """Wait until ``lo`` to ``hi`` seconds after one of slurmctld's time-limit tests; return how many."""
    end = time.time() + timeout
    while time.time() < end:
        checks = time_limit_checks(state)
        phase = time.time() - checks[-1] if checks else None
        if phase is not None and lo <= phase <= hi:
            return phase
        time.sleep(lo - phase if phase is not None and phase < lo else 0.5)
    raise AssertionError(f"slurmctld logged no time-limit test in {timeout} s (see {state / 'slurmctld.log'})")


class AttemptLogs(threading.Thread):
    """Samples a log file that every attempt of a job rewrites, until ``stop()``: ``texts`` ends up
    with each attempt's last content (a new attempt is content that does not extend the last)."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.texts, self._stop_event = path, [], threading.Event()

    def run(self):
        last = ""
        while True:
            final = self._stop_event.is_set()
            try:
                text = self.path.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            if text and not last.startswith(text):  # else: nothing new, or a new attempt not yet told apart
                if self.texts and text.startswith(last):
                    self.texts[-1] = text
                else:
                    self.texts.append(text)
                last = text
            if final:
                return
            time.sleep(0.3)

    def stop(self):
        self._stop_event.set()
        self.join()


def training_progress(text):
    """(epoch resumed after or None, [epochs finished], [their seconds]) from a train log (tqdm's
    \\r lines split). A run that found itself finished already counts as resumed after its last epoch."""
    lines = text.replace("\r", "\n").splitlines()
    resumed = [int(m[1] or m[2]) for line in lines
               if (m := re.match(r"xe: (?:resuming \S+ after epoch (\d+)|\S+ finished after epoch (\d+) already; "
                                 r"publishing it again)$", line))]
    assert len(resumed) <= 1, resumed
    epochs = [m for line in lines if (m := re.match(r"xe epoch (\d+)/\d+: loss .*\(([0-9.]+) s\)$", line))]
    return (resumed[0] if resumed else None), [int(m[1]) for m in epochs], [float(m[2]) for m in epochs]


def run_seconds(value):
    """Seconds of a SLURM duration ([days-]hh:mm:ss)."""
    days, _, hms = value.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return ((int(days) if days else 0) * 24 + h) * 3600 + m * 60 + s


@pytest.mark.integration
def test_timed_out_training_resumes_when_resubmitted(cluster, tmp_path):
    """A train_xe job that outlasts its SLURM time limit is killed (TIMEOUT), Snakemake resubmits it
    (retries), and the new job continues from the last finished epoch instead of starting over,
    ending with the very weights an uninterrupted local run gives.

    A job whose training ends after its time limit but before slurmctld's next limit test exits 0
    and is still recorded TIMEOUT; Snakemake then deletes its output as a failed job's. The
    resubmitted job must find the finished record (checkpoint.finish) and publish the same file
    again, not start over."""
    env, state = cluster
    subprocess.run(["scontrol", "setdebug", "debug2"], env=env, check=True)  # log the time-limit tests
    try:
        _timed_out_training_resumes(env, state, tmp_path)
    finally:
        subprocess.run(["scontrol", "setdebug", "info"], env=env, check=False)


def _timed_out_training_resumes(env, state, tmp_path):
    on_slurm, local = tmp_path / "on_slurm", tmp_path / "local"
    on_slurm.mkdir()
    # The inputs, locally (they are not what this test is about); then how long an epoch takes.
    write_config(on_slurm, {**RESUME, "train": {**RESUME["train"], "epochs": 1}})
    smk(on_slurm, RESUME_TARGET, "--omit-from", "train_xe")
    per_epoch = seconds_per_epoch(on_slurm, tmp_path)
    epochs = max(4, round(RESUME_TRAIN_SECONDS / per_epoch))
    write_config(on_slurm, {**RESUME, "train": {**RESUME["train"], "epochs": epochs}})
    shutil.copytree(on_slurm, local, symlinks=True)  # the uninterrupted twin, same inputs

    watch = AttemptLogs(on_slurm / RESUME_LOG)
    watch.start()
    phase = wait_for_phase(state, *LIMIT_CHECK_PHASE)
    try:  # the profile's retries is 1; one more spares the test a slow moment
        r = smk_slurm(on_slurm, env, RESUME_TARGET, retries=2, check=False)
    finally:
        watch.stop()
    # The twin runs after, not beside: on a small machine a second training at the same time
    # would make the job's epochs slower than measured, and by how much is anyone's guess.
    smk(local, RESUME_TARGET)
    out = r.stdout + r.stderr
    about = (f"{epochs} epochs of {per_epoch:.1f} s, started {phase:.0f} s after a time-limit test; "
             f"snakemake:\n{out[-4000:]}")

    # SLURM's records: every sbatch job of the rule, in order; the first ran out of time.
    ids = sorted((p.stem for p in (on_slurm / ".snakemake/slurm_logs/rule_train_xe").rglob("*.log")), key=int)
    jobs = slurm_jobs(env)
    comp = dict(re.findall(r"^JobId=(\d+) .*?JobState=(\w+)", (state / "jobcomp.log").read_text(), flags=re.M))
    assert len(ids) >= 2, f"one sbatch job only: {[jobs[i] for i in ids]}\n{about}"
    first = jobs[ids[0]]
    assert (first["JobState"], first["Reason"], first["TimeLimit"]) == ("TIMEOUT", "TimeLimit", "00:01:00"), first
    assert run_seconds(first["RunTime"]) >= 60, first
    assert f"SLURM-job '{ids[0]}' failed, SLURM status is: 'TIMEOUT'" in out, about

    # Each attempt's training log: the first trained from epoch 1; every later one resumed after the
    # last epoch its predecessor finished (or the one before, had the kill come between that epoch's
    # log line and its resume file), and the last one finished the run. An attempt that finished
    # every epoch and was still recorded TIMEOUT is followed by one that publishes it again.
    assert len(watch.texts) == len(ids), f"{len(watch.texts)} training logs seen for {len(ids)} jobs\n{about}"
    progress = [training_progress(t) for t in watch.texts]
    runs = "; ".join(f"job {i} {jobs[i]['JobState']} after {jobs[i]['RunTime']}: "
                     + (f"resumed after epoch {k}, " if k is not None else "")
                     + (f"finished epochs {e[0]}-{e[-1]} ({min(sec):.1f}-{max(sec):.1f} s each)" if e else "no epoch")
                     for i, (k, e, sec) in zip(ids, progress))
    about = f"{runs}\n{about}"
    resumed, finished, _ = progress[0]
    assert resumed is None and finished and finished == list(range(1, len(finished) + 1)), about
    done = finished[-1]
    for n, (resumed, finished, _) in enumerate(progress[1:], 2):
        assert resumed is not None, f"attempt {n} started over\n{about}"
        assert done - 1 <= resumed <= done and resumed >= 1, about
        assert finished == list(range(resumed + 1, resumed + 1 + len(finished))), about
        done = finished[-1] if finished else resumed
    assert done == epochs, about
    assert progress[-1][0] == training_progress((on_slurm / RESUME_LOG).read_text())[0]
    # ... and SLURM agrees: all but the last ran out of time, the last completed.
    states = [jobs[i]["JobState"] for i in ids]
    assert states == ["TIMEOUT"] * (len(ids) - 1) + ["COMPLETED"], about
    assert [comp.get(i) for i in ids] == states  # slurmctld's job completion log agrees
    assert all(jobs[i]["Comment"].startswith("rule_train_xe") and jobs[i]["TimeLimit"] == "00:01:00" for i in ids)

    # The same weights, metadata and per-epoch history as the uninterrupted run (seconds aside).
    (a, meta_a), (b, meta_b) = load_tensors(on_slurm / RESUME_TARGET), load_tensors(local / RESUME_TARGET)
    assert a.keys() == b.keys() and meta_a == meta_b
    assert not [k for k in a if not torch.equal(a[k], b[k])], "the resumed run's weights differ"
    ra, rb = (json.loads((w / f"{RESUME_LOG}.json").read_text()) for w in (on_slurm, local))
    hist = [[{k: v for k, v in row.items() if k != "seconds"} for row in rep["history"]] for rep in (ra, rb)]
    assert hist[0] == hist[1] and len(hist[0]) == epochs
    assert ra["best_epoch"] == rb["best_epoch"] == meta_a["epoch"]
    # Once published, the run files are a finished record and a second name of the output.
    resume, best = run_files(on_slurm / RESUME_TARGET)
    assert load_tensors(resume)[0] == {} and load_tensors(resume)[1]["finished"] is True
    assert os.path.samefile(best, on_slurm / RESUME_TARGET)
    print(f"\n{epochs} epochs of {per_epoch:.1f} s, Snakemake started {phase:.0f} s after a time-limit test; "
          f"{runs}; best epoch {meta_a['epoch']}")
