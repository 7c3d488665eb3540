# The README's two commands: `make run` and `make test`. Both install what they need into .venv first,
# from requirements.lock (exact versions of every package, made by `make lock`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: the CPU wheel on dev/CI machines (it lies on their disk); on a CUDA machine pip takes the CUDA
# build of the same release from PyPI. torch is not in the lock, so one lock serves both.
TORCH ?= torch==2.13.0
LOCK := requirements.lock

.PHONY: install run demo test test-fast test-latest lock screenshots style-suite demo-base clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $@

# The web UI on http://127.0.0.1:7860 (localhost only), with the offline built-in base preselected.
run: install
	$(PY) -m app

# Headless: the README's first example, offline: the demo style set on the demo base, with its style report.
demo: install
	$(PY) -m trainer train presets/demo-style.toml

test: install
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The demo base's style suite (scripts/style_suite.py): 11 styles, 2 negative controls and an overcooked run trained
# on builtin:demo-sd, the report's verdict against each style's ground truth, the overcooking warning; the table in docs/demo-base.md comes from outputs/style-suite.
style-suite: install
	HF_HUB_OFFLINE=1 $(PY) scripts/style_suite.py --out outputs/style-suite

# Retrain the demo base (assets/demo-sd) from scratch: about an hour on one CPU core (docs/demo-base.md).
demo-base: install
	HF_HUB_OFFLINE=1 $(PY) scripts/train_demo_base.py

# Refresh docs/screenshots/ui-*.png from the real-browser test (the tests never write into the repo otherwise).
screenshots: install
	STYLE_LORA_SCREENSHOTS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_browser.py

# Re-resolve every dependency to the newest versions pyproject.toml allows, in a clean venv, and rewrite the lock.
# Then run `make test` before committing it.
lock:
	rm -rf .venv-lock build  # build/: what `pip install .` leaves behind
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH)"
	.venv-lock/bin/python -m pip install -q ".[test]"
	{ echo "# Exact versions of everything \`make install\` installs except torch (the Makefile picks its build)."; \
	  echo "# Made by \`make lock\` (pip freeze of a clean venv with the newest versions pyproject.toml allows)."; \
	  echo "# Change it only with \`make lock\` and a full \`make test\`."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|style-lora-studio)[ =@]'; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock build

# Drift check for maintainers: the newest allowed versions (not the lock) in a separate venv, fast tests only.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q "$(TORCH)"
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
	.venv-latest/bin/python -m pip freeze | grep -i -E '^(diffusers|transformers|peft|accelerate|gradio|pydantic)='
	HF_HUB_OFFLINE=1 .venv-latest/bin/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .venv-lock .venv-latest outputs/.builtin
