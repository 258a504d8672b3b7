"""What every job of the DAG would ask of a scheduler, without running anything.

A dry run (``snakemake -n``) lists the jobs but not their resources, and those are what a
cluster user must check before submitting a COCO-scale run: memory, time limit, GPUs and CPUs
per job. This builds the same DAG through Snakemake's API and prints them per rule:

    python tools/dag_resources.py [--configfile FILE ...] [--json] [TARGET ...]

With ``--json`` it prints one object per job: {"rule", "wildcards", "threads", "mem_mb",
"runtime", "gpu"}. It reads Snakemake's workflow object (``_prepare_dag``/``_build_dag``, what
``--rulegraph`` calls), which has no public API for this.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job_resources(configfiles=(), targets=("results/table.csv",), workdir=".", snakefile=ROOT / "Snakefile",
                  cores: int = 8) -> list[dict]:
    """Every job the targets need (finished ones included), with its evaluated resources."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

    with contextlib.redirect_stdout(sys.stderr), SnakemakeApi(OutputSettings()) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=cores, nodes=1000),
            config_settings=ConfigSettings(configfiles=[Path(f).resolve() for f in configfiles]),
            snakefile=Path(snakefile), workdir=Path(workdir))
        dag_api = workflow_api.dag(dag_settings=DAGSettings(targets=set(targets), forceall=True))
        workflow = dag_api.workflow_api._workflow
        workflow.dag_settings = dag_api.dag_settings
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        jobs = list(workflow.dag.jobs)
    rows = []
    for job in jobs:
        res = dict(job.resources.items())
        rows.append({"rule": job.rule.name, "wildcards": dict(job.wildcards_dict), "threads": job.threads,
                     "mem_mb": res.get("mem_mb"), "runtime": res.get("runtime"), "gpu": res.get("gpu", 0)})
    return sorted(rows, key=lambda r: (r["rule"], json.dumps(r["wildcards"], sort_keys=True)))


def per_rule(rows: list[dict]) -> str:
    """A table: jobs per rule and the range of each resource."""
    by_rule = defaultdict(list)
    for r in rows:
        by_rule[r["rule"]].append(r)
    span = lambda vals: str(min(vals)) if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}"  # noqa: E731
    lines = [f"{'rule':<20} {'jobs':>5} {'threads':>8} {'mem_mb':>12} {'runtime min':>12} {'gpu':>4}"]
    for rule, rs in sorted(by_rule.items()):
        lines.append(f"{rule:<20} {len(rs):>5} {span([r['threads'] for r in rs]):>8} "
                     f"{span([r['mem_mb'] or 0 for r in rs]):>12} {span([r['runtime'] or 0 for r in rs]):>12} "
                     f"{span([r['gpu'] for r in rs]):>4}")
    lines.append(f"{'total':<20} {len(rows):>5}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", default=["results/table.csv"])
    ap.add_argument("--configfile", nargs="+", default=[], help="config files (default: config.yaml)")
    ap.add_argument("--directory", "-d", default=".", help="working directory of the run")
    ap.add_argument("--json", action="store_true", help="one JSON object per job")
    a = ap.parse_args(argv)
    rows = job_resources(a.configfile, a.targets, a.directory)
    print("\n".join(json.dumps(r, sort_keys=True) for r in rows) if a.json else per_rule(rows))


if __name__ == "__main__":
    main()
