"""configs/prune_width.yaml plans the width study it describes: one matched recipe for every decoder.

The numbers in its header were measured by running its jobs' commands by hand; this checks that the
DAG would run those commands: every decoder trained alike, then pruned to 90% and fine-tuned
exactly as its dense control.
"""
import json
import re
import shlex
import subprocess

import pytest
import yaml

from helpers import ROOT, SNAKEMAKE, job_counts_in

CONFIG = ROOT / "configs" / "prune_width.yaml"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """{rule: [the parsed arguments of each planned job's command]} and the dry run's job counts."""
    run = tmp_path_factory.mktemp("width")
    r = subprocess.run(SNAKEMAKE + ["-d", str(run), "-n", "-p", "--cores", "2", "--configfile", str(CONFIG)],
                       capture_output=True, text=True, cwd=run)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    commands = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\S*python\S* -m captioning (train|prune) (.*?) > ", line.removeprefix("Shell command: "))
        if m:
            argv = shlex.split(m.group(2))
            commands.setdefault(m.group(1), []).append(dict(zip(argv[::2], argv[1::2])))
    return commands, job_counts_in(r.stdout)


def test_every_decoder_is_trained_then_pruned_beside_its_control(planned):
    commands, counts = planned
    decoders = yaml.safe_load(CONFIG.read_text())["decoders"]
    assert counts["train_xe"] == len(decoders) and counts["prune_finetune"] == 2 * len(decoders)
    assert "r50" not in json.dumps(commands)     # --configfile replaces config.yaml's encoders
    pruned = {}
    for job in commands["prune"]:
        name = job["--out"].split("/")[-2]
        pruned.setdefault(name, set()).add((job["--method"], job["--ratio"]))
    assert pruned == {d: {("gradual_lamp", "0.9"), ("gradual_lamp", "0")} for d in decoders}


def test_the_recipe_is_the_same_for_every_row(planned):
    commands, _ = planned
    finetunes = {job["--finetune"] for job in commands["prune"]}
    assert len(finetunes) == 1
    ft = json.loads(finetunes.pop())
    assert (ft["epochs"], ft["schedule_epochs"], ft["lr"], ft["kd_weight"], ft["kd_teacher"]) == (8, 4, 0.0005, 0.5, "self")
    trains = [json.loads(job["--train-config"]) for job in commands["train"]]
    assert {(t["epochs"], t["patience"]) for t in trains} == {(12, 12)}
    # only the learning rate is the family's own (AoANet's); the rest of the schedule is shared
    assert len({json.dumps({k: v for k, v in t.items() if k != "lr"}, sort_keys=True) for t in trains}) == 1
    assert {job["--threads"] for job in commands["train"] + commands["prune"]} == {"1"}
