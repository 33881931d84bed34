# The README's two commands (each installs what it needs into .venv on first use, then is quick):
#   make demo   run the main job: the tiny pretraining recipe on the built-in demo corpus
#   make test   lint and run the test suite (what CI runs, through .ci/run)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zidong-installed

.PHONY: install demo test test-main-job lint format clean hf-common

install: $(STAMP)

# Editable install: source edits need no reinstall; only a change to pyproject.toml re-runs pip.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

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
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
