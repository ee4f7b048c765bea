# cbpo-orch: `make demo` sets up and runs the main job; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/cbpo-orch

.PHONY: setup model demo sample-task-adapter test gpu-check gpu-wheels
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench,postgres]'
	touch $@

model: setup
	$(CLI) setup-model

# The demo starts from the shipped sample's task adapter for the default model (built by
# `make sample-task-adapter`), and scores each of the sample's 6 test users on its 8 newest items
# besides its 2 queries: the protocol the defaults were validated under, on users never tuned on.
SAMPLE := cbpo_orch/samples/huffpost-headline
SAMPLE_TASK_ADAPTER := $(SAMPLE)/task-adapter-SmolLM2-135M-Instruct
demo: model
	$(CLI) submit --users all --method base,sft,cbpo --max-profile 24 --eval-items 8 --task-adapter $(SAMPLE_TASK_ADAPTER)

# The sample's task adapter: SFT of a LoRA (r=16 on q/k/v/o) on the sample's 6 train-split users'
# 24 newest items, 2 epochs at lr 1e-3, stored in bf16 (3.7 MB).
sample-task-adapter: model
	rm -rf $(SAMPLE_TASK_ADAPTER).new
	$(CLI) train-task-adapter --task lamp4 --data $(SAMPLE) --max-profile 24 --epochs 2 --lr 1e-3 --out $(SAMPLE_TASK_ADAPTER).new
	$(PY) -c "import sys, torch; from safetensors.torch import load_file, save_file; f = sys.argv[1]; save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f)" $(SAMPLE_TASK_ADAPTER).new/adapter_model.safetensors
	rm -rf $(SAMPLE_TASK_ADAPTER) && mv $(SAMPLE_TASK_ADAPTER).new $(SAMPLE_TASK_ADAPTER)

# Two pytest processes, one test module each at a time (the Ray-heavy modules one after another in
# one of them: tests/conftest.py): most tests wait on Ray, a subprocess or a server rather than
# compute, so two overlap on 2 cores.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup

# On a CUDA machine with torch, transformers and peft (no network, no install): one pass's
# tokens/s at 1, 8, 32 and 64 rows, packed = alone in bf16, then the single- vs multi-user
# training throughput of the Qwen2-0.5B shape, then
# serving's cross-user batched generation against one request at a time. The lent GPU machines
# lack FAISS and SQLAlchemy: with the wheels of `make gpu-wheels` in .whl/, they are installed
# from there (into $(GPU_SITE), no network) and the index, γ and registry phases are timed too.
GPU_SITE ?= /tmp/cbpo-gpu-site
gpu-check:
	if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=.:$(GPU_SITE) python3 bench/throughput.py --shape qwen2-0.5b --device cuda --users 32 --check --pass-rows 1,8,32,64
	PYTHONPATH=.:$(GPU_SITE) python3 bench/batched_generation.py --shape qwen2-0.5b --device cuda

# Where PyPI is reachable: the wheels gpu-check installs on a GPU machine without network, for its
# Python (GPU_PYTHON; the lent machines run 3.12) on x86-64 Linux. .whl/ is ignored by git.
GPU_PYTHON ?= 3.12
gpu-wheels:
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl 'faiss-cpu>=1.8' 'sqlalchemy>=2.0' greenlet
	ls .whl
