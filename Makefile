# onnxflow: `make demo` and `make test` are all a fresh clone needs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install when pyproject.toml changes; the stamp lives inside the venv.
STAMP  := $(VENV)/.installed

export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TF_CPP_MIN_LOG_LEVEL ?= 2
# MLflow servers started here (make ui, the tests' and benchmarks' servers) run no GenAI
# job runner: nothing here submits jobs, and it starts a dozen huey processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false

.PHONY: install converter-env demo lint test test-all docs docs-serve triton-examples soak bench bench-pipeline bench-convert bench-models bench-sweep bench-train ui stop clean help

help:  ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# serving/_capture.c: the capture's C extension, built by the install
$(STAMP): pyproject.toml setup.py serving/_capture.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e ".[pipeline,test]"
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install everything (once; again when pyproject changes)

converter-env: $(STAMP)  ## onnx2tf's own venv for convert --to tensorflow|tflite (~1 GB; ONNXFLOW_CONVERTER_VENV)
	$(BIN)/python -m onnxflow.converter_env

DEMO_PORT ?= 8080

demo: $(STAMP)  ## Train torch + keras + sklearn on digits, register, promote, serve champion (DEMO_PORT)
	$(BIN)/onnxflow run --framework all --deploy --port $(DEMO_PORT)

demo-loop: $(STAMP)  ## The production loop: serve, shifted traffic, drift, feedback, retrain on evidence, shadow, policy
	$(BIN)/python bench/demo_loop.py

lint: $(STAMP)  ## ruff check and ruff format --check (make test runs it first)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) system-packages lint  ## Lint, then run the test suite (fast tests; CI runs this)
	$(BIN)/pytest

test-all: $(STAMP) system-packages image-packages  ## Run every test, slow ones included
	$(BIN)/pytest -m "not triton_examples"

triton-examples: $(STAMP)  ## Triton's own example clients against onnxflow serve (TRITON_EXAMPLES=DIR)
	@test -n "$(TRITON_EXAMPLES)" || { echo "set TRITON_EXAMPLES to a folder of Triton's examples (see tests/serving/triton_examples/README.md)"; exit 2; }
	ONNXFLOW_TRITON_EXAMPLES=$(TRITON_EXAMPLES) $(BIN)/pytest tests/serving/test_triton_examples.py -m triton_examples

soak: $(STAMP)  ## Reliability, long form: load, hot swaps, faults, 1,000+ fuzz cases; one table
	ONNXFLOW_SOAK=1 $(BIN)/pytest tests/reliability tests/integration/test_hostile.py -m reliability

bench: $(STAMP)  ## Serving benchmarks: vs mlflow models serve; start-up, memory; capture cost
	$(BIN)/python bench/serve_bench.py --install-tools
	$(BIN)/python bench/team_bench.py
	$(BIN)/python bench/capture_bench.py --install-tools
	$(BIN)/python bench/startup_bench.py --runs 5 --models 5 --output docs/startup.md

bench-pipeline: $(STAMP)  ## Demo pipeline wall time, and how much is Prefect + MLflow overhead
	$(BIN)/python bench/pipeline_bench.py

bench-convert: $(STAMP)  ## convert --to tensorflow: digits, images (ResNet-18), text recipes: time, size, parity, latency
	$(BIN)/python -m onnxflow.converter_env
	$(BIN)/python bench/convert_bench.py

bench-models: $(STAMP)  ## Example recipes full size: train/export/parity/latency/endpoint req/s
	$(BIN)/python bench/models_bench.py

bench-sweep: $(STAMP)  ## --framework all, and an 8-trial sweep on 1 vs 2 Dask workers: wall times
	$(BIN)/python bench/sweep_bench.py

BENCH_TRAIN_ARGS ?=

bench-train: $(STAMP)  ## Torch loop samples/s: built-in vs tuned, streamed vs in memory; peak memory (BENCH_TRAIN_ARGS)
	$(BIN)/python bench/train_bench.py $(BENCH_TRAIN_ARGS)

ui: $(STAMP)  ## MLflow UI on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

docs: $(STAMP)  ## Build the docs site into site/ (strict: a broken link or docstring fails)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

DOCS_ADDR ?= 127.0.0.1:8000

docs-serve: $(STAMP)  ## Serve the docs site on http://DOCS_ADDR (127.0.0.1:8000), rebuilt on change
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr $(DOCS_ADDR)

stop: $(STAMP)  ## Stop the endpoint started by make demo
	$(BIN)/onnxflow stop

clean:  ## Stop the endpoint and stack, then remove runs, registry, artifacts (keeps .venv)
	-@if [ -x $(BIN)/onnxflow ]; then $(BIN)/onnxflow stop; $(BIN)/onnxflow stack down; fi
	rm -rf mlflow.db artifacts .onnxflow
	find mlruns -mindepth 1 ! -name .gitkeep -exec rm -rf {} +

# --- the service stack (onnxflow.stack; settings: ONNXFLOW_STACK_*) ---------------------
.PHONY: up down status system-packages image-packages images compose-up compose-down

up: $(STAMP)  ## Start Prefect + MLflow servers, worker, deployments and endpoint on 127.0.0.1
	$(BIN)/onnxflow stack up

status:  ## What the stack runs, and the URLs of the Prefect UI, MLflow UI and endpoint
	@if [ -x $(BIN)/onnxflow ]; then $(BIN)/onnxflow stack status; else echo "the stack is not running"; fi

down:  ## Stop everything `make up` started
	@if [ -x $(BIN)/onnxflow ]; then $(BIN)/onnxflow stack down; else echo "nothing was running"; fi

system-packages:  ## Debian's chromium (reviewer's browser test) and wrk (load tests); needs root + apt
	@command -v chromium >/dev/null && command -v wrk >/dev/null || { \
	  if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	    echo "make test needs chromium (the reviewer's browser test) and wrk (load tests)," >&2; \
	    echo "installed with apt-get, which needs root. Install them once, then run make test again:" >&2; \
	    echo "    sudo apt-get install chromium wrk     (or: sudo make system-packages)" >&2; \
	    exit 1; \
	  fi; \
	  echo "installing Debian's chromium and wrk with apt-get (once)"; \
	  apt-get -o DPkg::Lock::Timeout=120 update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get -o DPkg::Lock::Timeout=120 install -y -qq chromium wrk; }

image-packages:  ## Debian's podman, runc and mmdebstrap (make images, the image tests); needs root + apt
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap)

images: image-packages  ## Build the serving and pipeline images (infra/images.sh; ENGINE, BASE_IMAGE)
	infra/images.sh all

compose-up: $(STAMP) images  ## infra/docker-compose.yml under podman-compose, on images built here
	infra/images.sh postgres
	PATH="$(CURDIR)/$(BIN):$$PATH" infra/compose-up.sh

compose-down:  ## Stop what compose-up started and remove its containers and volumes
	POSTGRES_IMAGE=localhost/onnxflow-postgres:latest $(BIN)/podman-compose \
	  -f infra/docker-compose.yml --in-pod false down -v
