# Two commands matter: `make run` and `make test`. Everything else is a helper for them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= out
# pytest-xdist workers for tests/ (make test-fast; make test, where they run beside the notebooks' process).
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist worksteal
# The package is used from the checkout (not pip-installed) so that a Kaggle bundle test can
# prove the bundled notebook runs with the repository off sys.path.
export PYTHONPATH := $(CURDIR)
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: run test test-fast install notebooks kaggle bench clean tpu-image-set docs
# The order the Kaggle chain runs them (hpa_nb.core.chain.KERNELS, a test keeps the two equal): the submission last,
# so that it scores cells with every model made before it.
CHAIN := tests/test_kaggle_chain.py
# Run beside the notebooks rather than with the tests, so that the two processes take about the same time.
BESIDE := tests/test_kerashub.py
TPU_TODAY := requirements-kaggle-tpu-2026-12.txt
NOTEBOOKS := 00_prepare 01_eda 02_augmentation 03_train 04_evaluate 06_cells 07_cell_train 05_submission

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

# The notebooks in order on the default sample (QUICK sizes off Kaggle): executed copies and every
# artifact (run folder, plots, metrics, submission) land under $(OUT)/.
run: $(VENV)/.installed
	@mkdir -p $(OUT)/notebooks
	@for notebook in $(NOTEBOOKS:%=notebooks/%.ipynb); do \
	  echo "== $$notebook"; \
	  HPA_OUT=$(CURDIR)/$(OUT) $(PY) -m papermill --cwd notebooks -k python3 --progress-bar \
	    $$notebook $(OUT)/notebooks/$$(basename $$notebook) || exit 1; \
	done
	@echo "executed notebooks and artifacts are in $(OUT)/"

# The whole suite as two pytest runs side by side: the tests (tests/, over TEST_WORKERS pytest-xdist workers at
# nice 5), and beside them nbval over the committed notebooks (fresh outputs into a throw-away HPA_OUT) then the
# Kaggle chain and KerasHub's families, one process whose report follows the tests'. The notebooks and the chain
# must run in order, so that process keeps a core to itself, and the tests' workers share the rest and whatever it
# leaves idle; the two take about the same time. The training kernels
# also run in Python 3.12 venvs of Kaggle's TPU image, one per package set (.ci/kaggle-tpu-venv, cached by its file's
# hash), and the HPA-Cell-Segmentation adapter in a torch venv (.ci/hpacellseg-venv, likewise). Without a Python 3.12
# the TPU-image checks are skipped with one line, except in CI (CI=true), where they are required. Fails if either
# pytest process fails; each lists its slowest tests at the end. First, ruff's format and lint checks and the docs
# site (seconds each).
test: $(VENV)/.installed
	@$(PY) -m ruff format --check --quiet . && $(PY) -m ruff check --quiet . || \
	  { echo "ruff: run $(PY) -m ruff format . && $(PY) -m ruff check --fix . (settings in pyproject.toml)"; exit 1; }
	@$(MAKE) --no-print-directory docs
	@hcs_venv=$$(bash .ci/hpacellseg-venv $(PYTHON)) || exit 1; export HPA_HCS_VENV=$$hcs_venv; \
	if tpu_venv=$$(bash .ci/kaggle-tpu-venv) && tpu_today=$$(bash .ci/kaggle-tpu-venv $(TPU_TODAY)); then \
	  export HPA_TPU_VENV=$$tpu_venv HPA_TPU_VENV_2026_12=$$tpu_today; \
	elif [ $$? -eq 3 ]; then export HPA_NO_PYTHON312=1; else exit 1; fi; report=$$(mktemp); \
	{ HPA_OUT=$$(mktemp -d) $(PY) -m pytest --nbval-lax -p no:cacheprovider --durations=10 notebooks $(CHAIN) $(BESIDE) >$$report 2>&1; \
	  echo $$? >$$report.status; } & \
	HPA_OUT=$$(mktemp -d) nice -n 5 $(PY) -m pytest $(XDIST) --durations=15 tests \
	  --ignore=$(CHAIN) --ignore=$(BESIDE); tests=$$?; wait; \
	echo "== beside the tests: nbval over notebooks/, then the Kaggle chain and KerasHub's families"; cat $$report; \
	notebooks=$$(cat $$report.status); rm -f $$report $$report.status; test $$tests -eq 0 && test $$notebooks -eq 0

# The docs site (mkdocs.yml: docs/ and an API reference from the docstrings) into site/, strict: a broken link, a
# missing page or an anchor that is not there stops it.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# The quick loop while editing: the tests not marked slow (no notebooks, no venvs, no subprocess kills; the only
# training is the two shared tiny runs, two steps each at 32 px, that the scoring and evaluation tests read).
test-fast: $(VENV)/.installed
	HPA_OUT=$$(mktemp -d) $(PY) -m pytest $(XDIST) -m "not slow" tests

# After editing notebooks/*.py: refresh each .ipynb from its .py, re-execute it in place on the
# default sample (the committed outputs), and rebuild the Kaggle bundles.
notebooks: $(VENV)/.installed
	$(PY) -m jupytext --sync notebooks/[0-9][0-9]_*.py
	@for notebook in $(NOTEBOOKS:%=notebooks/%.ipynb); do \
	  HPA_OUT=$(CURDIR)/$(OUT) $(PY) -m jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=1800 $$notebook || exit 1; \
	done
	$(PY) -m hpa_nb kaggle build

bench: $(VENV)/.installed
	$(PY) -m hpa_nb bench loader --size 1024
	$(PY) -m hpa_nb bench loader
	$(PY) -m hpa_nb bench train
	KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  $(PY) -m hpa_nb bench train --image-size 64 --batch-size 2

# Kaggle's TPU image floats (keras, jax and numpy unpinned): resolve its recipe again into this month's package set,
# requirements-kaggle-tpu-YYYY-MM.txt (then point TPU_TODAY at it and run make test).
tpu-image-set: $(VENV)/.installed
	$(PY) -m hpa_nb kaggle image-set

# Self-contained Kaggle kernels: build/kaggle/<name>/ per notebook (commit build/kaggle/03_train/).
kaggle: $(VENV)/.installed
	$(PY) -m hpa_nb kaggle build

clean:
	rm -rf $(OUT) build/kaggle-push .pytest_cache
