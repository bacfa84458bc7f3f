# Every target does its own set-up on a fresh machine: `make demo` and `make test` depend on `install`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
EXTRAS  ?= cpu,dev
DEMO    ?= demo_out
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-fast bench lint clean bytecode

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[$(EXTRAS)]'
	touch $@

# Every Ray worker process imports xmodal; where PYTHONDONTWRITEBYTECODE is set (as on this machine)
# each of them would compile it again. Compiled once here, they read the cached bytecode.
bytecode: install
	$(BIN)/python -m compileall -q xmodal

# The main job end to end on local Ray: synthetic data -> Parquet -> pretraining -> embeddings -> gallery k-NN tables
# (LAB in-domain, and LAB gallery -> SEA queries: the paper's two headline set-ups).
demo: bytecode
	rm -rf $(DEMO)
	$(BIN)/xmodal synth $(DEMO)/raw --lab 1200 --sea 600 --uto 4000 --seed 0 --image-size 64
	$(BIN)/xmodal ingest $(DEMO)/raw $(DEMO)/data
	$(BIN)/xmodal pretrain --config configs/laptop.yaml --name demo \
		--set data.train=$(DEMO)/data/UTO --set data.val=$(DEMO)/data/SEA --set train.storage_path=$(DEMO)/runs
	$(BIN)/xmodal embed --checkpoint $(DEMO)/runs/demo --data $(DEMO)/data/LAB --out $(DEMO)/emb/LAB
	$(BIN)/xmodal embed --checkpoint $(DEMO)/runs/demo --data $(DEMO)/data/SEA --out $(DEMO)/emb/SEA
	$(BIN)/xmodal benchmark --embeddings $(DEMO)/emb/LAB --out $(DEMO)/benchmark --combos I-I P-P I+P-I+P I-P P-I
	$(BIN)/xmodal benchmark --embeddings $(DEMO)/emb/LAB --queries $(DEMO)/emb/SEA --out $(DEMO)/benchmark_sea \
		--combos I-I P-P I+P-I+P
	@echo "run folder: $(DEMO)/runs/demo   results: $(DEMO)/benchmark/results.md (LAB), $(DEMO)/benchmark_sea/results.md (LAB gallery, SEA queries)"

test: bytecode
	$(BIN)/python -m pytest -q --timeout=900 --durations=12 tests

test-fast: bytecode
	$(BIN)/python -m pytest -q -m "not slow" tests

# The issues' CPU benchmarks at laptop sizes (each prints its ratio against a plain baseline); the
# GPU one is bench/gpu_check.sh, the accuracy studies (bench_logit_scale, bench_embed_options) take
# their runs as arguments (bench/RESULTS.md), and the 1M-particle archive is `bench_scale.py
# --particles 1000000` (~45 min).
bench: install
	$(BIN)/python bench/bench_synth.py
	$(BIN)/python bench/bench_ingest.py
	$(BIN)/python bench/bench_knn.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_scale.py --particles 20000 --scale 100000

lint: install
	$(BIN)/ruff check xmodal tests bench

clean:
	rm -rf $(DEMO) runs .pytest_cache
