# The README's commands. Each target is self-sufficient on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test lint pretrain

# Re-runs only when the pins or the package metadata change. torch comes first so nothing
# that depends on it pulls a CUDA build.
$(STAMP): requirements-cpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements-cpu.txt
	$(PIP) install --quiet -r requirements-cpu.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests launch benchmarks

# The embedded default: pretrain the `tiny` preset on Shakespeare with 2 CPU processes.
DEMO := data/shakespeare
pretrain: $(STAMP)
	$(PY) launch/prepare_demo.py --out $(DEMO)
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 launch/pretrain.py \
	    model=tiny data=shakespeare train=cpu_demo run_name=cpu-demo \
	    optim.warmup_steps=15 checkpoint.every=50 \
	    tokenizer=$(DEMO)/tokenizer.model $(ARGS)
	@echo "run folder: runs/cpu-demo (metrics.jsonl, loss_curve.png, samples.txt, checkpoints/)"
