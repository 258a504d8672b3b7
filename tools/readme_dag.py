"""The workflow's rule graph as a Markdown ```mermaid block, for `make dag` and README.

`snakemake --rulegraph mermaid-js` numbers its nodes in an order that changes from run to run.
Naming each node after its rule and sorting the lines gives the same block every time, so README's
copy can be regenerated in place (`make readme-dag`) and checked (tests/test_dag_drawing.py).
Mermaid needs no Graphviz: GitHub and a browser with mermaid draw it. Stdlib only.

    python tools/readme_dag.py [--config config.yaml]      # print the block
    python tools/readme_dag.py --readme README.md          # rewrite README's block
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MERMAID_BLOCK = re.compile(r"```mermaid\n.*?```\n", re.S)


def snakemake_rulegraph(config: Path) -> str:
    """Snakemake's mermaid rule graph for ``config``, planned in a scratch directory.

    A scratch directory keeps snakemake's .snakemake/ out of the repository, and the graph only
    depends on the config, not on what a run has already made.
    """
    with tempfile.TemporaryDirectory() as workdir:
        shutil.copy(config, Path(workdir) / "config.yaml")
        r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", workdir,
                            "--rulegraph", "mermaid-js"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"snakemake --rulegraph mermaid-js failed:\n{r.stderr[-3000:]}")
    return r.stdout


def canonical(mermaid: str) -> str:
    """``mermaid`` with each node named after its rule and the lines sorted: one text per graph.

    Snakemake's colours are dropped: they spread over every rule the workflow defines, so a rule
    added without jobs in this config (e.g. the ``seeds`` rules) would recolour the whole graph.
    """
    names = dict(re.findall(r"^\s*(id\d+)\[(\w+)\]\s*$", mermaid, re.M))
    if not names:
        raise ValueError(f"no rule nodes in snakemake's mermaid output:\n{mermaid[:500]}")
    edges = re.findall(r"^\s*(id\d+) --> (id\d+)\s*$", mermaid, re.M)
    linked = {i for edge in edges for i in edge}
    lines = (sorted(n for i, n in names.items() if i not in linked)  # a rule with no edge is drawn too
             + sorted(f"{names[a]} --> {names[b]}" for a, b in edges))
    return "flowchart TB\n" + "".join(f"    {line}\n" for line in lines)


def markdown(config: Path) -> str:
    """The fenced ```mermaid block of ``config``'s rule graph."""
    return "```mermaid\n" + canonical(snakemake_rulegraph(config)) + "```\n"


def readme_block(text: str) -> str:
    """The one ```mermaid block of a README."""
    blocks = MERMAID_BLOCK.findall(text)
    if len(blocks) != 1:
        raise ValueError(f"expected one ```mermaid block, found {len(blocks)}")
    return blocks[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    ap.add_argument("--readme", type=Path, help="rewrite this file's ```mermaid block instead of printing")
    args = ap.parse_args(argv)
    block = markdown(args.config)
    if args.readme is None:
        sys.stdout.write(block)
        return
    text = args.readme.read_text()
    readme_block(text)
    args.readme.write_text(MERMAID_BLOCK.sub(lambda _: block, text))


if __name__ == "__main__":
    main()
