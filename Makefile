# The README's two commands. Each creates or refreshes .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs venv peer smg engine-sources soak bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmfleet demo

lint: $(STAMP)
	$(BIN)/ruff check lmfleet tests bench examples
	$(BIN)/ruff format --check lmfleet tests bench examples
	$(BIN)/mypy lmfleet

# The real LMDeploy 0.18.0 api_server (CPU torch, stub engine) for tests/conformance.
# Cached in .venv-peer; bounded; a failure is recorded and the conformance tests skip.
peer:
	-PYTHON=$(PYTHON) tests/conformance/peer/setup_peer.sh

# vLLM's and SGLang's released wheels (~375 MB, not installed: read as zip files by
# tests/conformance/test_engine_sources.py); cached; a failure skips those tests.
ENGINES := .cache/engines
engine-sources: $(STAMP)
	-test -n "$$(ls $(ENGINES)/vllm-0.33.0-*.whl $(ENGINES)/sglang-0.5.23-*.whl 2>/dev/null | sed -n 2p)" \
		|| timeout 600 $(BIN)/python -m pip download -q --no-deps -d $(ENGINES) vllm==0.33.0 sglang==0.5.23

# Docs build first, so that pytest's summary is the last line CI reads. Two workers
# (pytest-xdist; one per test file, conformance together: tests/conftest.py): most
# tests wait on node processes, so two halve the wall time on two cores.
test: lint peer engine-sources docs
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# The user guide and API reference (mkdocs + mkdocstrings); warnings are errors.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet

# Chaos under load through a proxy process (not in CI): SOAK_MINUTES=10 by default.
SOAK_MINUTES ?= 10
soak: $(STAMP)
	$(BIN)/python tests/reliability/soak.py --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) .venv-peer .venv-peer.failed .venv-peer.log .venv-smg .cache .pytest_cache .mypy_cache .ruff_cache site

# Shepherd Model Gateway (Rust) for bench/proxy_overhead.py, in a venv of its own.
SMG_VERSION := 1.13.0
smg:
	test -x .venv-smg/bin/smg || ($(PYTHON) -m venv .venv-smg && \
		timeout 600 .venv-smg/bin/python -m pip install -q smg==$(SMG_VERSION))

# Benchmarks (never part of `make test`): about an hour on 2 cores; each bench ends
# every process it starts. LMDeploy's proxy comes from .venv-peer (`make peer`).
# Results: bench/results/*.json, docs/bench_*.png; docs/benchmarks.md explains them.
bench: $(STAMP) smg
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/python -m pip install -q matplotlib
	$(BIN)/python bench/routing_pick.py
	$(BIN)/python bench/monitor_cpu.py --nodes 64 --seconds 20
	$(BIN)/python -m bench.proxy_overhead
	$(BIN)/python -m bench.client_overhead
	$(BIN)/python -m bench.routing_quality --cells single80 --seeds 10 --requests 1000 \
		--routers all --scale 8 --coarsen 4  # one cell, ~35 min; the matrix: bench/routing_quality.py
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.failure
	$(BIN)/python -m bench.weight_update
	$(BIN)/python -m bench.plots

# The wheel and sdist (`python -m build`, isolated) in dist/, replacing what was there.
# Until a release is on PyPI: pip install 'dist/lmfleet-0.1.0-py3-none-any.whl[serve]'.
.PHONY: dist dist-check
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

# Not part of `make test` (it needs the registry): the wheel with its `serve` extra in a
# fresh venv, its dependencies resolved by pip, then `lmfleet --help` and the README
# quickstart from outside the repository (tests/test_dist.py, which `make test` runs,
# does the same offline, borrowing the dependencies from .venv).
dist-check: dist
	$(BIN)/python tests/test_dist.py dist/*.whl
