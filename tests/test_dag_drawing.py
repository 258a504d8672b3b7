"""The rule graph draws without Graphviz (mermaid), and README shows the workflow's current one."""
import importlib.util
import re
import subprocess

import pytest

from helpers import ROOT, SNAKEMAKE, TINY_DAG, write_config


def _readme_dag():
    """tools/readme_dag.py, the generator `make dag` and `make readme-dag` run (not a package)."""
    spec = importlib.util.spec_from_file_location("readme_dag", ROOT / "tools" / "readme_dag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme_dag = _readme_dag()
RULES = {"all", "synthetic_dataset", "prepare_captions", "encoder_weights", "features", "train_xe",
         "prune_finetune", "train_scst", "train_kd", "pack", "score", "latency", "table"}


@pytest.mark.integration
def test_rulegraph_in_mermaid_names_every_rule(tmp_path):
    write_config(tmp_path, TINY_DAG)
    r = subprocess.run(SNAKEMAKE + ["-d", str(tmp_path), "--rulegraph", "mermaid-js"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    graph = readme_dag.canonical(r.stdout)  # stdout only: snakemake logs to stderr
    assert set(re.findall(r"\w+", graph.removeprefix("flowchart TB"))) == RULES
    assert "train_xe --> pack" in graph and "table --> all" in graph


@pytest.mark.integration
def test_readme_shows_the_current_rule_graph():
    generated = readme_dag.markdown(ROOT / "config.yaml")
    shown = readme_dag.readme_block((ROOT / "README.md").read_text())
    assert shown.split() == generated.split(), (
        "README's rule graph is out of date: run `make readme-dag` "
        "(or `.venv/bin/python tools/readme_dag.py --readme README.md`)")
