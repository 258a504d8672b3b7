"""Fuzzing the artifact loader (benchmarks/fuzz_artifact.py) under a memory limit: every mutant of a
valid artifact loads into a model that captions, or fails with one UserError line.

The campaign runs in a subprocess that caps its own address space (and first checks that the cap
bites), so an allocation bomb shows up as a MemoryError finding instead of taking the machine down.
"""
import json
import os
import subprocess
import sys

from helpers import ROOT

KINDS = {"prefix", "zstd", "header-bits", "payload-bits", "set", "truncate-file", "truncate-raw", "header-length"}


def test_every_mutant_loads_and_captions_or_is_refused_in_one_line():
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_artifact.py"), "--mutants", "1500",
                           "--seconds", "20", "--seed", "7", "--mem-mb", "384"],
                          capture_output=True, text=True, env=env, timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and report["findings"] == 0, report["examples"] or proc.stderr[-2000:]
    assert report["tried"] >= 200 and report["tried"] == report["loaded"] + report["refused"], report
    assert report["loaded"] > 0 and report["refused"] > 0, report
    assert KINDS <= set(report["mutations"]), report["mutations"]
    assert report["peak_rss_growth_mb"] < 384, report
