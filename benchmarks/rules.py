"""Per-rule time of a workflow run, split into model work and overhead.

Model work (encoding, training steps, compressing, captioning) is what compression can speed up;
the rest of a job's wall time is start-up and scoring overhead, which it cannot. Each job's
Snakemake benchmark (logs/benchmarks/<rule>/<stem>.tsv) gives its wall and CPU seconds; the last
`captioning timing: {...}` line of its log (logs/<rule>/<stem>.log, written by captioning/timing.py)
gives its model seconds. A job whose log has no such line (a rule that is not the CLI, or an older
run) counts 0 model seconds and is counted in the `untimed` column. Stdlib only.

    python benchmarks/rules.py RUN_DIR [--wall SECONDS] [--cores 2] [--markdown]
"""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path

TIMING_PREFIX = "captioning timing: "  # captioning.timing.TIMING_PREFIX; copied so this runs without the package


@dataclass
class Job:
    rule: str
    wall: float
    cpu: float
    model: float | None  # None: the log has no timing line


@dataclass
class Row:
    rule: str
    jobs: int
    wall: float
    cpu: float
    model: float
    untimed: int

    @property
    def overhead(self) -> float:
        return self.wall - self.model

    @property
    def overhead_pct(self) -> float:
        return 100 * self.overhead / self.wall if self.wall else 0.0


def _seconds(value: str) -> float:
    """A benchmark number; Snakemake writes NA when a job ended before it was first sampled."""
    return 0.0 if value == "NA" else float(value)


def model_seconds(log: Path) -> float | None:
    """The model seconds of the log's last timing line; None without a log or such a line."""
    if not log.is_file():
        return None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(TIMING_PREFIX)]
    return float(json.loads(lines[-1][len(TIMING_PREFIX):])["model_seconds"]) if lines else None


def read_job(tsv: Path, run_dir: Path) -> Job:
    """One job from its benchmark file and the log with the same rule and stem."""
    rel = tsv.relative_to(run_dir / "logs" / "benchmarks")
    with tsv.open() as f:
        record = next(csv.DictReader(f, delimiter="\t"), None)
    if record is None:
        raise SystemExit(f"{tsv}: empty benchmark file (a job that did not finish?)")
    return Job(rule=rel.parts[0], wall=_seconds(record["s"]), cpu=_seconds(record["cpu_time"]),
               model=model_seconds(run_dir / "logs" / rel.with_suffix(".log")))


def read_run(run_dir: Path) -> list[Job]:
    return [read_job(tsv, run_dir) for tsv in sorted((run_dir / "logs" / "benchmarks").rglob("*.tsv"))]


def per_rule(jobs: list[Job]) -> list[Row]:
    """One row per rule, the slowest (summed wall) first."""
    rows: dict[str, Row] = {}
    for job in jobs:
        row = rows.setdefault(job.rule, Row(job.rule, 0, 0.0, 0.0, 0.0, 0))
        row.jobs += 1
        row.wall += job.wall
        row.cpu += job.cpu
        row.model += job.model or 0.0
        row.untimed += job.model is None
    return sorted(rows.values(), key=lambda r: r.wall, reverse=True)


def total(rows: list[Row]) -> Row:
    return Row("total", sum(r.jobs for r in rows), sum(r.wall for r in rows), sum(r.cpu for r in rows),
               sum(r.model for r in rows), sum(r.untimed for r in rows))


def overhead_ratio(rows: list[Row]) -> float:
    """(summed job wall − summed model work) / summed job wall: the share compression cannot shrink."""
    t = total(rows)
    return t.overhead / t.wall if t.wall else 0.0


def parallel_efficiency(rows: list[Row], wall: float, cores: int) -> float:
    """Summed job wall / (run wall × cores): how busy the cores were kept."""
    return total(rows).wall / (wall * cores)


HEADER = ["rule", "jobs", "wall s", "CPU s", "model s", "overhead s", "overhead %", "untimed"]


def _cells(row: Row) -> list[str]:
    return [row.rule, str(row.jobs), f"{row.wall:.1f}", f"{row.cpu:.1f}", f"{row.model:.1f}",
            f"{row.overhead:.1f}", f"{row.overhead_pct:.0f}", str(row.untimed)]


def format_table(rows: list[Row], markdown: bool = False) -> str:
    table = [HEADER] + [_cells(r) for r in rows + [total(rows)]]
    if markdown:
        lines = ["| " + " | ".join(cells) + " |" for cells in table]
        return "\n".join(lines[:1] + ["|" + "---|" * len(HEADER)] + lines[1:])
    widths = [max(len(cells[i]) for cells in table) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                     for cells in table)


def summary(rows: list[Row], wall: float | None, cores: int) -> list[str]:
    lines = [f"overhead ratio: {100 * overhead_ratio(rows):.0f}% of the summed job wall time is not model work"]
    if total(rows).untimed:
        lines.append("untimed: jobs whose log has no timing line; their model work counts as 0")
    if wall is not None:
        lines.append(f"run wall: {wall:.1f} s on {cores} cores, "
                     f"parallel efficiency {100 * parallel_efficiency(rows, wall, cores):.0f}%")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="the directory the workflow ran in (holds logs/)")
    ap.add_argument("--wall", type=float, help="the run's wall time in seconds, for the parallel efficiency")
    ap.add_argument("--cores", type=int, default=2, help="cores the run was given (default 2)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    if args.wall is not None and args.wall <= 0 or args.cores < 1:
        ap.error("--wall must be > 0 and --cores >= 1")
    rows = per_rule(read_run(args.run_dir))
    if not rows:
        raise SystemExit(f"no benchmark files under {args.run_dir / 'logs' / 'benchmarks'}")
    print(format_table(rows, args.markdown))
    print()
    print(("\n\n" if args.markdown else "\n").join(summary(rows, args.wall, args.cores)))


if __name__ == "__main__":
    main()
