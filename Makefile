# Two commands do all the set-up: `make run` (the experiment) and `make test` (the tests).
# Both create .venv and install the package into it when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all

.PHONY: install run test lint dag readme-dag clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/snakemake --cores $(CORES) results/table.csv

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/snakemake --lint

# rulegraph.md (mermaid: GitHub and browsers draw it); rulegraph.svg too where Graphviz's dot is installed.
dag: install
	$(PY) tools/readme_dag.py > rulegraph.md
	if command -v dot >/dev/null; then $(VENV)/bin/snakemake --rulegraph | dot -Tsvg > rulegraph.svg; fi

# Rewrite README's rule graph after the rules change (tests/test_dag_drawing.py checks it).
readme-dag: install
	$(PY) tools/readme_dag.py --readme README.md

clean:
	rm -rf data work results logs .snakemake
