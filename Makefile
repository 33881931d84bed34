# The README's two commands (each installs what it needs into .venv on first use, then is quick):
#   make demo   run the main job: the tiny pretraining recipe on the built-in demo corpus
#   make test   lint and run the test suite (what CI runs, through .ci/run)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zidong-installed
LOCK := constraints.txt
LOCK_VENV := .venv-lock

.PHONY: install demo test test-main-job lint format clean hf-common lock

install: $(STAMP)

# Editable install of the versions in constraints.txt (the lock): source edits need no reinstall; a change to
# pyproject.toml or to the lock re-runs pip.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) pip
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) -e ".[dev]"
	touch $(STAMP)

# Refresh the lock: the newest versions pyproject.toml's ranges allow today, resolved in a fresh environment (so
# nothing installed by hand leaks in). Commit constraints.txt with the change that needed it; `make install` then
# brings every checkout to it.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[dev]"
	{ echo "# The versions \`make install\` and CI install, as pip constraints: what pyproject.toml's ranges resolved to"; \
	  echo "# in a fresh environment ($$($(LOCK_VENV)/bin/python -c 'import platform; print("Python", platform.python_version(), platform.system(), platform.machine())'), $$(date -u +%F))."; \
	  echo "# Regenerate with \`make lock\`; never edit by hand."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable --all; } > $(LOCK)
	rm -rf $(LOCK_VENV)

demo: $(STAMP)
	$(BIN)/zidong pretrain recipes/pretrain/tiny.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest-xdist workers, one thread each (tests/conftest.py), whole files per worker (module fixtures are built
# once), the main job's file first: the rest of the suite runs beside it. Serial `pytest` works too, just slower.
test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# the full main job (1500 steps) and the fine-tunes from it against the levels measured for them, on one thread as
# they were measured (11 min 39 s on a quiet 2-core machine); `make test` runs the same tests from the recipe cut to 300 steps. Run it after
# changing the recipe, the model, the data or the trainer.
test-main-job: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m main_job tests/test_main_job.py

# transformers' own common model tests on zidong's models: a development check, not part of `make test` (it
# downloads the installed transformers version's source distribution once; see scripts/hf_common/run.py)
hf-common: $(STAMP)
	$(BIN)/python scripts/hf_common/run.py

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .ruff_cache *.egg-info
