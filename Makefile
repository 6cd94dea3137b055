# Two commands from a fresh clone: `make demo` and `make test`.
# Each creates .venv and installs what it needs on first use (idempotent: a stamp is
# rebuilt only when pyproject.toml or constraints.txt change). Every pip install goes
# through constraints.txt, so torch stays the CPU 2.13.0 build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
BROWSER_STAMP := $(VENV)/.installed-browser
DEMO_OUT ?= gradclip-demo

.PHONY: demo test lint bench docs figures clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# What `make demo` needs: the package and its experiments extra.
$(RUN_STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[experiments]"
	touch $@

# What `make test` needs: every extra, the linters and the peer packages.
$(DEV_STAMP): $(RUN_STAMP)
	$(PIP_INSTALL) -e ".[dev]"
	touch $@

# Debian's chromium and its driver, for the test that opens the HTML report.
$(BROWSER_STAMP): $(PY)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then touch $@; \
	else \
		echo "installing Debian's chromium and chromium-driver (for the report's browser test)"; \
		if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null; }; then touch $@; \
		else echo "could not install chromium (needs Debian's apt as root): the browser test skips, or fails under CI"; fi; \
	fi

demo: $(RUN_STAMP)
	$(VENV)/bin/gradclip demo --out $(DEMO_OUT)

test: lint $(BROWSER_STAMP)
	$(PY) -m pytest -q

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts docs/_ext
	$(VENV)/bin/ruff format --check src tests benchmarks scripts docs/_ext
	$(VENV)/bin/mypy

# The documentation site, strict (warnings are errors); make test builds it too.
docs: $(DEV_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Regenerate the guide's figures with gradclip compare/sweep (minutes; not part of test).
figures: $(RUN_STAMP)
	$(PY) scripts/figures.py

bench: $(DEV_STAMP)
	$(PY) -m benchmarks.clip

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
