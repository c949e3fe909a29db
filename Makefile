# `make demo` and `make test`: both create .venv when missing and install the project into it (newest versions).
# `make test-lowest`: the same suite in .venv-lowest on the lowest versions pyproject.toml declares.
# `make test-sae`: the SAELens integration test (tests/integration, marker `sae`) in its own .venv-sae with the `sae`
# extra (sae-lens pulls transformer-lens 3.x); `make test` skips it where sae_lens is not installed.
PYTHON ?= python3
# make test spreads the suite over this many pytest-xdist workers (one per core here); all tests of one tiny
# architecture run in one worker, which traces it once (tests/conftest.py groups them). PYTEST_WORKERS=0: serial.
PYTEST_WORKERS ?= auto
PYTEST_ARGS := -n $(PYTEST_WORKERS) --dist loadgroup
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The lowest Python pyproject.toml's requires-python allows (tests/test_versions.py keeps the two equal).
PYTHON_LOWEST ?= python3.11
VENV_LOWEST := .venv-lowest
PY_LOWEST := $(VENV_LOWEST)/bin/python
STAMP_LOWEST := $(VENV_LOWEST)/.installed
VENV_SAE := .venv-sae
PY_SAE := $(VENV_SAE)/bin/python
STAMP_SAE := $(VENV_SAE)/.installed

.PHONY: demo test test-lowest test-sae bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints-ci.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-ci.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fxbridge demo

test: $(STAMP)
	FXBRIDGE_CONSTRAINTS=constraints-ci.txt $(PY) -m pytest $(PYTEST_ARGS)

$(PY_LOWEST):
	@command -v $(PYTHON_LOWEST) >/dev/null 2>&1 || { echo "make test-lowest: $(PYTHON_LOWEST) (the lowest Python \
	pyproject.toml declares) is not on PATH. Install it, or run 'make test-lowest PYTHON_LOWEST=python3' to test \
	the lowest package versions on another Python (the Python lower bound is then not what is tested)." >&2; exit 1; }
	$(PYTHON_LOWEST) -m venv $(VENV_LOWEST)

$(STAMP_LOWEST): $(PY_LOWEST) pyproject.toml constraints-lowest.txt
	$(PY_LOWEST) -m pip install --quiet --upgrade pip
	$(PY_LOWEST) -m pip install --quiet -c constraints-lowest.txt -e ".[test]"
	touch $(STAMP_LOWEST)

test-lowest: $(STAMP_LOWEST)
	FXBRIDGE_CONSTRAINTS=constraints-lowest.txt $(PY_LOWEST) -m pytest $(PYTEST_ARGS)

$(PY_SAE):
	$(PYTHON) -m venv $(VENV_SAE)

$(STAMP_SAE): $(PY_SAE) pyproject.toml constraints-ci.txt
	$(PY_SAE) -m pip install --quiet --upgrade pip
	$(PY_SAE) -m pip install --quiet -c constraints-ci.txt -e ".[test,sae]"
	touch $(STAMP_SAE)

test-sae: $(STAMP_SAE)
	FXBRIDGE_CONSTRAINTS=constraints-ci.txt $(PY_SAE) -m pytest -m sae tests/integration

bench: $(STAMP)
	$(PY) -m fxbridge bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(VENV_LOWEST) $(VENV_SAE) build *.egg-info
