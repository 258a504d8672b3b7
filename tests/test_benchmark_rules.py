"""benchmarks/rules.py on a made-up run: per-rule sums, the overhead ratio, untimed logs, efficiency."""
import subprocess
import sys

import pytest

from captioning.timing import TIMING_PREFIX
from helpers import ROOT, load_script

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


rules = load_script("rules")


def _job(run, rule, stem, wall, cpu, model=None):
    """A job's benchmark TSV and its log, the log ending in a timing line when ``model`` is given."""
    bench = run / "logs" / "benchmarks" / rule / f"{stem}.tsv"
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text(HEADER + f"{wall}\t0:00:01\t100\t200\t90\t95\t1\t2\t50\t{cpu}\n")
    log = run / "logs" / rule / f"{stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timing = "" if model is None else TIMING_PREFIX + f'{{"verb": "{rule}", "model_seconds": {model}}}\n'
    log.write_text("loading\n" + timing)


@pytest.fixture
def run(tmp_path):
    _job(tmp_path, "train_xe", "synth-lite0-updown", wall=30.0, cpu=50.0, model=24.0)
    _job(tmp_path, "train_xe", "synth-r50-updown", wall=50.0, cpu=90.0, model=40.0)
    _job(tmp_path, "pack", "synth-lite0-updown-xe-fp32", wall=6.0, cpu=5.0, model=2.0)
    _job(tmp_path, "pack", "synth-lite0-updown-xe-int8", wall=4.0, cpu="NA")  # an older log: no timing line
    return tmp_path


def test_the_script_reads_the_prefix_the_cli_writes():
    assert rules.TIMING_PREFIX == TIMING_PREFIX


def test_sums_per_rule_slowest_first(run):
    rows = rules.per_rule(rules.read_run(run))
    assert [(r.rule, r.jobs, r.wall, r.cpu, r.model, r.untimed) for r in rows] == [
        ("train_xe", 2, 80.0, 140.0, 64.0, 0), ("pack", 2, 10.0, 5.0, 2.0, 1)]
    assert rows[0].overhead == 16.0 and rows[0].overhead_pct == 20.0
    assert rows[1].overhead == 8.0 and rows[1].overhead_pct == 80.0


def test_overhead_ratio_and_parallel_efficiency(run):
    rows = rules.per_rule(rules.read_run(run))
    assert rules.overhead_ratio(rows) == pytest.approx((90 - 66) / 90)
    assert rules.parallel_efficiency(rows, wall=60.0, cores=2) == pytest.approx(90 / 120)


def test_the_last_timing_line_counts(tmp_path):
    log = tmp_path / "x.log"
    log.write_text(TIMING_PREFIX + '{"verb": "train", "model_seconds": 1.5}\nmore\n'
                   + TIMING_PREFIX + '{"verb": "train", "model_seconds": 2.5}\n')
    assert rules.model_seconds(log) == 2.5
    assert rules.model_seconds(tmp_path / "missing.log") is None


def test_command_line_prints_table_and_summary(run):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rules.py"), str(run), "--wall", "60",
                        "--markdown"], capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| rule | jobs | wall s |") and lines[1].startswith("|---|")
    assert lines[2].startswith("| train_xe | 2 | 80.0 | 140.0 | 64.0 | 16.0 | 20 | 0 |")
    assert lines[4] == "| total | 4 | 90.0 | 145.0 | 66.0 | 24.0 | 27 | 1 |"
    assert "overhead ratio: 27%" in r.stdout and "parallel efficiency 75%" in r.stdout
