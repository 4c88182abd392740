# visrec: every target installs the locked environment first if it is missing or stale.
#   make repro   run the whole DVC pipeline on the embedded default data set, print metrics
#   make test    run the test suite
#   make bench   print the speed benchmarks (bench/)
#   make serve   the BentoML recognition service on 127.0.0.1:3000
#   make bento   build the Bento (service + models + gallery) into $(BENTOML_HOME) (default ~/bentoml)
#   make mlflow-ui  the MLflow UI on 127.0.0.1:5000 over the stages' tracked runs (mlruns.db)
#   make airflow    Airflow standalone on 127.0.0.1:8080 with dags/ (retraining, gallery updates)
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

# Airflow 3 (scheduler, API server and UI on 127.0.0.1:8080) over this repo's dags/; its state
# lives in airflow_home/ (git-ignored). The login is printed at start-up. DAGs start PAUSED
# (Airflow's default, kept on purpose: a retraining is a heavy job): the line printed first
# says how to unpause the weekly retraining. LocalExecutor runs at most one task per core
# (Airflow's default is 32 worker processes). The whole process group is stopped on
# Ctrl-C / SIGTERM (TERM, then KILL after 10 s): `airflow standalone` alone leaves its
# children running.
airflow: env
	@echo "make airflow: DAGs start paused; to run the weekly retraining: AIRFLOW_HOME=$(CURDIR)/airflow_home $(VENV)/bin/airflow dags unpause visrec_retrain"
	@export AIRFLOW_HOME=$(CURDIR)/airflow_home AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	  AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=8080 \
	  AIRFLOW__CORE__PARALLELISM=$$(nproc) AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY=0 \
	  VISREC_REPO=$(CURDIR); \
	setsid airflow standalone & pid=$$!; \
	stop() { kill -TERM -- -$$pid 2>/dev/null; for _ in $$(seq 20); do kill -0 -- -$$pid 2>/dev/null || exit 0; sleep 0.5; done; \
	         kill -KILL -- -$$pid 2>/dev/null; exit 0; }; \
	trap stop TERM INT HUP; wait $$pid

# On-demand benchmarks (not part of `make test`); bench_recognition needs `make repro` first.
bench: env
	python bench/bench_extractor.py
	python bench/bench_detector.py
	python bench/bench_index.py --data clustered --sizes 10000 100000
	python bench/bench_efficientnet_lite.py
	python bench/bench_recognition.py

clean-env:
	rm -rf $(VENV) $(TOOLS)
