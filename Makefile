# visrec: every target installs the locked environment first if it is missing or stale.
#   make repro   run the whole DVC pipeline on the embedded default data set, print metrics
#   make test    run the test suite
#   make bench   print the speed benchmarks (bench/)
#   make serve   the BentoML recognition service on 127.0.0.1:3000
#   make bento   build the Bento (service + models + gallery) into $(BENTOML_HOME) (default ~/bentoml)
#   make mlflow-ui  the MLflow UI on 127.0.0.1:5000 over the stages' tracked runs (mlruns.db)
#   make airflow    Airflow 3 on 127.0.0.1:8080 with dags/ (retraining, gallery updates), nothing on other interfaces
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.8
TOOLS := .tools
VENV := .venv
UV := $(TOOLS)/bin/uv
# The stamp names the lock file's hash: a changed lock makes the environment stale.
LOCK_HASH := $(shell sha1sum uv.lock pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)
STAMP := $(VENV)/.visrec-env-$(LOCK_HASH)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)

.PHONY: env repro test test-fast bench serve bento mlflow-ui airflow clean-env

env: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --extra dev --python $(PYTHON)
	rm -f $(VENV)/.visrec-env-*
	touch $@

repro: env
	dvc repro
	dvc metrics show

test: env
	pytest

test-fast: env
	pytest -m "not slow and not integration"

# The BentoML service on serve.host:serve.port (127.0.0.1:3000) with the models and gallery `make repro` made.
# Gallery changes through the API need VISREC_ADMIN_TOKEN set (else they are disabled).
serve: env
	VISREC_PARAMS=params.yaml bentoml serve bento.service:VisrecRecognition \
	  --host "$$(python -c 'from visrec.config import load_config; print(load_config().serve.host)')" \
	  --port "$$(python -c 'from visrec.config import load_config; print(load_config().serve.port)')"

# The Bento (bento/bentofile.yaml) from the models and gallery `make repro` made. BentoML runs
# `uv` while it builds; the uv-made .venv has neither uv nor pip, so the pinned uv in .tools/bin
# goes on PATH. Serve it with `bentoml serve visrec:latest`.
bento: env $(UV)
	@test -f data/export/extractor/model.json || { echo "no exported models: run 'make repro' first"; exit 1; }
	PATH="$$PATH:$(CURDIR)/$(TOOLS)/bin" bentoml build -f bento/bentofile.yaml .

# Every stage logs a run to mlruns.db (params.yaml `tracking`); `visrec runs compare` is the terminal view.
mlflow-ui: env
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns.db --host 127.0.0.1 --port 5000

# Airflow 3 over this repo's dags/ (python -m visrec.orchestration.airflow_local): db migrate, then
# the API server and UI on $(AIRFLOW_HOST):$(AIRFLOW_PORT), the scheduler, the dag-processor and the
# triggerer, in one process group; no other listener (no log servers: the API server reads task
# logs from airflow_home/logs). State in airflow_home/ (git-ignored). It prints first how to unpause
# the weekly retraining (DAGs start PAUSED, Airflow's default, kept on purpose: a retraining is a
# heavy job), then the login. LocalExecutor runs at most one task per core. Ctrl-C / SIGTERM stops
# every process it started (TERM, KILL after 10 s; the API server last).
# `make airflow AIRFLOW_HOST=0.0.0.0` opens the UI to the network, deliberately.
AIRFLOW_HOST ?= 127.0.0.1
AIRFLOW_PORT ?= 8080
airflow: env
	exec python -m visrec.orchestration.airflow_local --repo $(CURDIR) --home $(CURDIR)/airflow_home \
	  --host $(AIRFLOW_HOST) --port $(AIRFLOW_PORT)

# On-demand benchmarks (not part of `make test`); bench_recognition needs `make repro` first.
bench: env
	python bench/bench_extractor.py
	python bench/bench_detector.py
	python bench/bench_index.py --data clustered --sizes 10000 100000
	python bench/bench_efficientnet_lite.py
	python bench/bench_recognition.py

clean-env:
	rm -rf $(VENV) $(TOOLS)
