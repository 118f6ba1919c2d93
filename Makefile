# Multimodal GPT on Phi-2, served by Triton. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# Where exports and the served repository go (git-ignored). FROM: a checkpoint dir; empty = embedded default.
FROM ?=
EXPORT_DIR ?= artifacts/export
REPO_DIR ?= artifacts/triton_repo
INT8 ?= 0
INT4 ?= 0
KV ?= shared
HOST ?= 127.0.0.1
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
METRICS_PORT ?= 8002
PRESET ?= tiny
MAX_STEPS ?=
TOY_DIR ?= runs/toy
BENCH_DIR ?= artifacts/bench
BENCH_ARGS ?=
SOAK_DIR ?= artifacts/soak
SOAK_ARGS ?=
API_HOST ?= 127.0.0.1
API_PORT ?= 8080
TRITON ?= 127.0.0.1:$(GRPC_PORT)
API_ARGS ?=

.PHONY: help install browser test lint export serve api chat demo soak pretrain finetune eval toy toy-eval bench clean

help:
	@echo "make install                  create .venv with everything for a CPU machine"
	@echo "make test                     run the whole test suite (offline)"
	@echo "make lint                     ruff"
	@echo "make export [FROM=dir] [INT8=1|INT4=1] [KV=concat]  export vision/LLM/Whisper to ONNX into $(EXPORT_DIR), with parity checks"
	@echo "make serve                    run tritonserver on the exported repository (127.0.0.1; GRPC_PORT/HTTP_PORT/METRICS_PORT)"
	@echo "make api [API_PORT=8080] [GRPC_PORT=8001]  OpenAI-compatible API (+ web chat at /) in front of \`make serve\`"
	@echo "make chat                     the same server; open http://$(API_HOST):$(API_PORT)/ for the web chat"
	@echo "make demo                     export if needed, serve, ask about an image and a spoken question, stop"
	@echo "make soak [SOAK_ARGS=..]      ~10 min: mixed load, then faults (killed models, overload, SIGTERM); JSON verdict"
	@echo "make pretrain PRESET=.. CAPTIONS=.. IMAGES=.. OUT=.. [MAX_STEPS=N]   stage 1 (projector)"
	@echo "make finetune PRESET=.. INSTRUCT=.. IMAGES=.. INIT=.. OUT=.. [MAX_STEPS=N]  stage 2 (LoRA)"
	@echo "make eval CHECKPOINT=.. [INSTRUCT=..|CAPTIONS=..] IMAGES=.. OUT=..   held-out loss, samples, BLEU-4/CIDEr"
	@echo "make toy [TOY_DIR=runs/toy]    rebuild the embedded default from scratch (world, models, stage 1+2) into mmgpt/assets/toy"
	@echo "make toy-eval                  accuracy of the embedded default in-process and through tritonserver (gates)"
	@echo "make bench [BENCH_ARGS=..]     speed at Phi-2 width against transformers, llama.cpp, CTranslate2 (one run; $(BENCH_DIR))"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed browser

# The web chat's browser test drives Debian's chromium (Playwright's own browser downloads are not used).
# Installed here where apt-get can (as root); elsewhere that one test is skipped and says why.
APT := DEBIAN_FRONTEND=noninteractive timeout 900 apt-get
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  echo "installing Debian's chromium (for the web chat's browser test)" && \
	  { $(APT) install -y -q chromium >/dev/null 2>&1 || \
	    { $(APT) update -q >/dev/null 2>&1 && $(APT) install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium is not installed and could not be (needs root and apt-get): the web chat's browser test will be skipped"

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

export: install
	$(PY) -m mmgpt.export $(if $(FROM),--checkpoint $(FROM)) --out $(EXPORT_DIR) $(if $(filter 1,$(INT8)),--int8) $(if $(filter 1,$(INT4)),--int4) --kv $(KV)

serve: install
	$(PY) -m mmgpt.serving.launch --export-dir $(EXPORT_DIR) --repo-dir $(REPO_DIR) --host $(HOST) \
		--grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT)

api: install
	$(PY) -m mmgpt.client.openai_server --host $(API_HOST) --port $(API_PORT) --triton $(TRITON) $(API_ARGS)

chat: api

demo: install
	$(PY) -m mmgpt.serving.demo --export-dir $(EXPORT_DIR) --repo-dir $(REPO_DIR)

soak: install
	@test -f $(EXPORT_DIR)/mmgpt_config.json || $(MAKE) export
	$(PY) -m mmgpt.serving.soak --export-dir $(EXPORT_DIR) --out $(SOAK_DIR) $(SOAK_ARGS)

pretrain: install
	$(PY) -m mmgpt.training.pretrain --preset $(PRESET) --captions $(CAPTIONS) --images $(IMAGES) --out $(OUT) $(if $(MAX_STEPS),--max-steps $(MAX_STEPS))

finetune: install
	$(PY) -m mmgpt.training.finetune --preset $(PRESET) --instruct $(INSTRUCT) --images $(IMAGES) --init $(INIT) --out $(OUT) $(if $(MAX_STEPS),--max-steps $(MAX_STEPS))

eval: install
	$(PY) -m mmgpt.training.evaluate --checkpoint $(CHECKPOINT) $(if $(INSTRUCT),--instruct $(INSTRUCT)) $(if $(CAPTIONS),--captions $(CAPTIONS)) --images $(IMAGES) --out $(OUT)

toy: install
	$(PY) -m mmgpt.toy.build --out $(TOY_DIR)

toy-eval: install
	$(PY) -m mmgpt.toy.evaluate

# llama-cpp-python compiles llama.cpp from source on first install, not part of `install`: only the libraries
# it loads (bench/llamacpp-lite.cmake says why), ~3 min on 2 cores instead of ~6.5; your own CMAKE_ARGS come
# after these and win
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/bench/llamacpp-lite.cmake
$(VENV)/.bench-installed: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m mmgpt.bench --out $(BENCH_DIR) $(BENCH_ARGS)

clean:
	rm -rf artifacts build
