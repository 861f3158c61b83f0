# Two commands matter: `make run` and `make test`. Everything else is a helper for them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= out
# The package is used from the checkout (not pip-installed) so that a Kaggle bundle test can
# prove the bundled notebook runs with the repository off sys.path.
export PYTHONPATH := $(CURDIR)
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: run test install install-dev kaggle bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m hpa_nb sample --out $(OUT)/sample
	$(PY) -m hpa_nb train --quick --data $(OUT)/sample --out $(OUT)/run
	$(PY) -m hpa_nb evaluate --model $(OUT)/run --data $(OUT)/sample --out $(OUT)/eval

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m hpa_nb bench loader
	$(PY) -m hpa_nb bench train

# Self-contained Kaggle kernels: build/kaggle/<name>/ per notebook (commit build/kaggle/03_train/).
kaggle: $(VENV)/.installed
	$(PY) -m hpa_nb kaggle build

clean:
	rm -rf $(OUT) build/kaggle-push .pytest_cache
