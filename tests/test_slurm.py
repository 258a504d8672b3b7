"""The DAG on a real one-node SLURM cluster, through profiles/slurm.

tests/slurm/start.sh installs and starts slurmctld, slurmd and munged on this machine (root
and apt-get needed; otherwise the test is skipped and says why). A small variant of the
workflow test's TINY_DAG config then runs twice: once with `--profile profiles/slurm`, every job
an sbatch job, and once locally. The SLURM run must have really gone through sbatch, and
both runs must give the same table (latency aside: it is a timing).
"""
import copy
import os
import re
import shutil
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest

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
