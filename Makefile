# cbpo-orch: `make demo` sets up and runs the main job; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/cbpo-orch

.PHONY: setup model demo test gpu-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench,postgres]'
	touch $@

model: setup
	$(CLI) setup-model

demo: model
	$(CLI) submit --users 3 --method base,sft,cbpo --max-profile 16

# Two pytest processes, one test file each at a time: most tests wait on Ray, a subprocess or a
# server rather than compute, so two overlap on 2 cores.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

# On a CUDA machine with torch, transformers and peft (no network, no install): one pass's
# tokens/s at 1, 8, 32 and 64 rows, packed = alone in bf16, then the single- vs multi-user
# training throughput of the Qwen2-0.5B shape, then
# serving's cross-user batched generation against one request at a time.
gpu-check:
	PYTHONPATH=. python3 bench/throughput.py --shape qwen2-0.5b --device cuda --users 32 --check --pass-rows 1,8,32,64
	PYTHONPATH=. python3 bench/batched_generation.py --shape qwen2-0.5b --device cuda
