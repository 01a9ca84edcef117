# llama-serve developer commands. `make serve` and `make test` are the two that matter.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
ARGS ?=
# `make bench`: the bench model (made by BENCH_MAKER below) served by us, the standard workload.
BENCH_MODEL ?= $(HOME)/.cache/llama-serve/bench-model
BENCH_PORT ?= 8765
BENCH_SERVE_ARGS ?= --max-num-seqs 64 --max-model-len 2048
BENCH_ARGS ?= --input-len 128 --output-len 64 --num-prompts 64 --concurrency 1,4,16,64

.PHONY: install test test-docker serve lint bench gpu-check gpu-wheels clean

install: $(VENV)/.installed

# constraints.txt pins the CPU wheel of torch for dev/CI; GPU users install without it.
# Beside a CPU torch, the tests run the GPU kernels under Triton's interpreter: the version
# the GPU hosts we measure on have (3.9 fails them). A CUDA torch pins its own Triton.
CPU_TRITON ?= triton==3.6.0
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -c constraints.txt torch
	if $(VENV)/bin/python -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; \
	then echo '$(CPU_TRITON)'; fi > $(VENV)/triton-constraint.txt
	$(VENV)/bin/pip install -q -c constraints.txt -c $(VENV)/triton-constraint.txt -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/llama-serve serve $(MODEL) $(ARGS)

# The issue's bench model maker lives beside this checkout in the dev workspace; elsewhere the
# same shapes come from model/demo.py (its own random weights and tokenizer).
BENCH_MAKER ?= ../shared/bench/make_model.py
# Written beside and renamed when complete: an interrupted run leaves no half model behind.
$(BENCH_MODEL)/config.json: | install
	@rm -rf $(BENCH_MODEL).part && \
	if [ -f $(BENCH_MAKER) ]; then $(PY) $(BENCH_MAKER) --size bench --out $(BENCH_MODEL).part; \
	else $(PY) -m model.demo $(BENCH_MODEL).part; fi && \
	rm -rf $(BENCH_MODEL) && mv $(BENCH_MODEL).part $(BENCH_MODEL)

bench: install $(BENCH_MODEL)/config.json
	@$(PY) -m server serve $(BENCH_MODEL) --port $(BENCH_PORT) --served-model-name bench \
		$(BENCH_SERVE_ARGS) --log-level warning & pid=$$!; trap "kill $$pid" EXIT; \
	for i in $$(seq 600); do \
		curl -sf http://127.0.0.1:$(BENCH_PORT)/health >/dev/null && break; sleep 0.2; done; \
	$(VENV)/bin/llama-serve bench --base-url http://127.0.0.1:$(BENCH_PORT) --model bench \
		--tokenizer $(BENCH_MODEL) $(BENCH_ARGS) --json bench.json

# On a CUDA host, the README's GPU figures in one go: the GPU tests, a decode step of a
# Llama-2-7B shape (random bf16 weights) against its bandwidth floor, with the Triton kernels
# and without, and the standard workload served on it once per GPU_VARIANTS: as is, without
# async scheduling, with the engine in a process of its own, without async output processing,
# without the Triton kernels, and without the start-up warm-up (about a minute each on an
# H100; name fewer for a short lease). Without the venv, point PY at a python that has the
# dependencies:
#   make gpu-check PY=python3 GPU_VARIANTS='"" --engine-process'
# A host without network that has torch but not the HTTP stack (the lent GPU machines) gets
# it from wheels that `make gpu-wheels` downloads here into .whl/ (for GPU_PYTHON):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site make gpu-check PY=python3
GPU_VARIANTS ?= "" --no-async-scheduling --engine-process --no-async-output-proc \
	--no-gpu-kernels --no-warmup
GPU_PYTHON ?= 3.12
# What serving needs beyond torch, tokenizers, safetensors, jinja2, httpx, prometheus-client,
# uvloop, click, h11 and idna, which such an image has; the versions are this venv's (with
# anyio and typing_extensions, which the image may hold too old for them)
GPU_WHEELS ?= fastapi starlette pydantic pydantic_core annotated_types annotated_doc \
	typing_inspection typing_extensions opentelemetry_api anyio sse_starlette uvicorn httptools
GPU_SHAPE ?= $(HOME)/.cache/llama-serve/llama2-7b-shape
GPU_TOKENIZER ?= $(BENCH_MODEL)
GPU_DEVICE_ARGS ?= --device cuda --dtype bfloat16
GPU_SERVE_ARGS ?= --max-num-seqs 64 --max-model-len 1024
GPU_BENCH_ARGS ?= --input-len 128 --output-len 64 --num-prompts 64 --concurrency 1,4,16,64
GPU_TESTS ?= tests/model/test_gpu.py tests/model/test_triton_kernels.py
GPU_SHAPE_CONFIG ?= dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, \
	hidden_dim=11008, torch_dtype='bfloat16'
# The shape's tokenizer: the bench model's, else model.demo's of the same vocabulary, made with
# $(PY) (a CUDA host without network and without the venv has no other way to one)
$(GPU_SHAPE)/config.json:
	@test -f $(GPU_TOKENIZER)/tokenizer.json || $(PY) -m model.demo $(GPU_TOKENIZER)
	mkdir -p $(GPU_SHAPE) && cp $(GPU_TOKENIZER)/tokenizer*.json $(GPU_SHAPE)/
	$(PY) -c "import json; from model.config import ModelConfig; \
		print(json.dumps(ModelConfig($(GPU_SHAPE_CONFIG)).to_hf()))" > $@

gpu-check: $(GPU_SHAPE)/config.json
	$(PY) -m pytest -q -m gpu $(GPU_TESTS)
	$(PY) -m model.step_times $(GPU_SHAPE) --load-format dummy $(GPU_DEVICE_ARGS)
	$(PY) -m model.step_times $(GPU_SHAPE) --load-format dummy $(GPU_DEVICE_ARGS) --no-gpu-kernels
	@status=0; for flags in $(GPU_VARIANTS); do \
		echo "=== serve $$flags"; \
		$(PY) -m server serve $(GPU_SHAPE) --load-format dummy $(GPU_DEVICE_ARGS) \
			$(GPU_SERVE_ARGS) --port $(BENCH_PORT) --served-model-name bench \
			--log-level warning $$flags & pid=$$!; \
		for i in $$(seq 1200); do kill -0 $$pid 2>/dev/null || break; \
			curl -sf http://127.0.0.1:$(BENCH_PORT)/health >/dev/null && break; sleep 0.2; done; \
		$(PY) -m server bench --base-url http://127.0.0.1:$(BENCH_PORT) --model bench \
			--tokenizer $(GPU_SHAPE) $(GPU_BENCH_ARGS) --no-progress || status=1; \
		kill $$pid; wait $$pid || status=1; \
	done; exit $$status

gpu-wheels: install
	rm -rf .whl && mkdir .whl && for pkg in $(GPU_WHEELS); do \
		version=$$($(PY) -c "import importlib.metadata as m; print(m.version('$$pkg'))") && \
		$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl \
			--python-version $(GPU_PYTHON) --implementation cp \
			--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
			--platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
			"$$pkg==$$version" || exit 1; \
	done

# The image and the compose stack, for real, on a Docker engine of its own (about 4 minutes).
test-docker: install
	PYTHON=$(PY) bash docker/ci/setup-docker.sh install
	$(PY) -m pytest -q -m docker tests/deployment/test_docker.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint docker/Dockerfile docker/cuda-base.Dockerfile
	PYTHON=$(PY) bash docker/ci/setup-docker.sh compose
	docker compose -f docker/compose.yaml --profile monitoring config -q

clean:
	rm -rf $(VENV) .pytest_cache
