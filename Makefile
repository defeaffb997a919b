# supsup-lite: `make run` executes the notebook series, `make test` runs the tests. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: setup run test lab benchmarks clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Execute every notebook in place (tutorial scale unless SUPSUP_SCALE says otherwise) and write figures/.
run: setup
	SUPSUP_SCALE=$${SUPSUP_SCALE:-tutorial} $(PY) scripts/run_notebooks.py $(NOTEBOOKS)

# Unit tests, then every notebook re-executed at smoke scale by nbval (committed outputs are not compared
# except in cells marked NBVAL_CHECK_OUTPUT).
# Two workers, one thread each (the notebooks of one file stay on one worker: --dist loadscope).
test: setup
	SUPSUP_SCALE=smoke MPLBACKEND=Agg OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadscope \
	  tests $(NOTEBOOKS) --nbval-lax --nbval-current-env --nbval-cell-timeout=600 -p no:cacheprovider

lab: setup
	$(PY) -m jupyter lab notebooks

benchmarks: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
