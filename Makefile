# Two commands do all the set-up: `make run` (the experiment) and `make test` (the tests).
# Both create .venv and install the package into it when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all

.PHONY: install run test lint dag clean

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

dag: install
	$(VENV)/bin/snakemake --rulegraph | dot -Tsvg > rulegraph.svg

clean:
	rm -rf data work results logs .snakemake
