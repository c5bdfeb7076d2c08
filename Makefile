# headprune: set-up, tests and lint. Everything runs inside $(VENV), created from scratch by `make install`.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first. The default takes the local CPU wheel on the project's machines; on a GPU box
# pick a CUDA build, e.g. `make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=
# A local WikiText-2 copy, read by the datamodule whenever a recipe leaves data_dir empty (and by the tests). The
# default is the copy beside the checkout when there is one; empty = the datamodule downloads from the hub.
WIKITEXT_DIR ?= $(if $(wildcard ../shared/data/wikitext-2),$(abspath ../shared/data/wikitext-2),)
export WIKITEXT_DIR
DEMO_ARGS ?=
RUNS ?= runs/demo
SCALE ?= wt2-cpu
# layer types trained at once by `make compare`: two single-threaded processes on the CPU scale, one on a GPU node
JOBS ?= $(if $(filter wt2-cpu,$(SCALE)),2,1)
BIN := $(VENV)/bin
STAMP := $(VENV)/.headprune-installed

.PHONY: install test test-fast lint demo compare report bench bench-throughput bench-compile bench-data bench-prune bench-generate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The whole suite (CI runs this). pytest exits 5 when it collected nothing: say so, and keep the failure (a run of
# no tests is never green).
test: install
	@$(BIN)/python -m pytest $(PYTEST_ARGS) || { s=$$?; [ $$s -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$s; }

# the quick loop for editing: everything not marked slow
test-fast: install
	$(BIN)/python -m pytest -m 'not slow' $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

# train a small All-attention LM on WikiText-2, prune half its heads, test both, write the report (about 5 min on 2 cores)
demo: install
	$(BIN)/python -m experiments.demo $(DEMO_ARGS)

# the paper's comparison (All-attention vs Transformer-XL; gates, random and importance removal at 25/43/60% of the
# heads; seeds), resumable; results are copied to experiments/results/$(SCALE). SCALE=wt2-cpu (2 CPU cores, the
# time is in experiments/results/wt2-cpu/command.txt) or SCALE=wt103-gpu (16 layers, a node of 8 GPUs)
compare: install
	$(BIN)/python -m experiments.compare --scale $(SCALE) --jobs $(JOBS) --results experiments/results/$(SCALE)

# regenerate the table and plots of every finished run under $(RUNS)
report: install
	$(BIN)/python -m experiments.report $(RUNS)

# every speed benchmark, one JSON line per figure (workload, metric, value, unit, hardware); about 15 min on 2 cores
bench: bench-throughput bench-compile bench-prune bench-data bench-generate

# W1: layer-stack FLOP efficiency vs torch.mm, All-attention vs Transformer-XL tokens/s, pruned speed-ups
bench-throughput: install
	$(BIN)/python -m experiments.benchmarks.throughput

# the opt-in torch.compile of the layers, before and after an in-run head removal
bench-compile: install
	$(BIN)/python -m experiments.benchmarks.compile_effect

# generation and whole-model eval with the inference cache: batch 1 and 8, dense vs half the heads removed, W1 and
# the paper's 16-layer shapes
bench-generate: install
	$(BIN)/python -m experiments.benchmarks.generation

bench-data: install
	$(BIN)/python -m experiments.benchmarks.data_prep

bench-prune: install
	$(BIN)/python -m experiments.benchmarks.pruning_speedup --layers 2 --batch 4 --threads 2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
