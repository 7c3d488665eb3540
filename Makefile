# The README's two commands: `make run` and `make test`. Both install what they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: the CPU wheel on dev/CI machines; on a CUDA machine pip picks the CUDA build of the same release.
TORCH ?= torch==2.13.0

.PHONY: install run demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The web UI on http://127.0.0.1:7860 (localhost only), with the offline built-in base preselected.
run: install
	$(PY) -m app

# Headless: the README's first example, offline: the demo style set on the demo base, with its style report.
demo: install
	$(PY) -m trainer train presets/demo-style.toml

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) outputs/.builtin
