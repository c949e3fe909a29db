# Two commands: `make demo` and `make test`. Both create .venv when missing and install the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

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
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m fxbridge bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
