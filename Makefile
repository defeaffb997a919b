# supsup-lite: `make run` executes the notebook series, `make test` runs the tests. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
CHROMIUM  := /usr/bin/chromium

.PHONY: setup browser run test lab benchmarks clean

# The package with its [notebooks] and [dev] extras (pyproject.toml) at the tested versions (constraints.txt).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[notebooks,dev]"
	touch $(STAMP)

setup: $(STAMP)

# Debian's headless Chromium for tests/test_browser.py, installed when missing and we are root (as in CI);
# otherwise, or when apt-get fails, the browser test is skipped and says why.
browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
	      echo "make browser: apt-get could not install chromium; tests/test_browser.py will be skipped"; \
	  else echo "make browser: no $(CHROMIUM) and not root; tests/test_browser.py will be skipped" \
	    "(install Debian's chromium to run it)"; fi; }

# Execute every notebook (tutorial scale unless SUPSUP_SCALE says otherwise) and write figures/. A notebook is
# replaced only when all its cells ran; the others still run, and every failure is listed at the end.
run: setup
	SUPSUP_SCALE=$${SUPSUP_SCALE:-tutorial} $(PY) scripts/run_notebooks.py $(NOTEBOOKS)

# Unit tests, the browser test, then every notebook re-executed at smoke scale by nbval (committed outputs are
# not compared except in cells marked NBVAL_CHECK_OUTPUT).
# Two workers, one thread each (the notebooks of one file stay on one worker: --dist loadscope).
test: setup browser
	SUPSUP_SCALE=smoke MPLBACKEND=Agg OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadscope \
	  tests $(NOTEBOOKS) --nbval-lax --nbval-current-env --nbval-cell-timeout=600 -p no:cacheprovider

lab: setup
	$(PY) -m jupyter lab notebooks

benchmarks: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache tests/browser/screenshots
