# splitserve: `make run` serves the default model, `make test` runs every test.
# Both set up whatever is missing first (scripts/setup.sh).

VENV       := .venv
PY         := $(VENV)/bin/python
BIN        := target/release/splitserve
FIXTURES   := tests/fixtures/generated
ARGS       ?=

# tch builds against the libtorch inside the venv's torch wheel.
export LIBTORCH_USE_PYTORCH := 1
# A cold build (no target/ yet, as in a fresh clone) has no incremental state to reuse: it skips
# writing it, which is slower than building without. Later builds are incremental (Cargo.toml).
ifeq ($(wildcard target/release),)
export CARGO_INCREMENTAL ?= 0
endif
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: all setup tools build run gpu-check test test-rust test-rust-build test-python test-deploy fixtures bench-fixtures bench bench-v2 bench-llm bench-setup reliability fmt lint clean image image-test mutants

all: build

setup: $(VENV)/.requirements.sha256

$(VENV)/.requirements.sha256: requirements.txt scripts/setup.sh scripts/export/pyproject.toml
	bash scripts/setup.sh

build: setup
	bash scripts/build-cache.sh restore
	cargo build --release

## Serves the built-in default model (an MLP) on 0.0.0.0:50051. Extra flags: make run ARGS="--model ..."
run: build
	$(BIN) serve $(ARGS)

fixtures: $(FIXTURES)/.stamp

## TorchScript models, and PyTorch 2 packages (.pt2: about a minute each to compile, cached by
## torch version under ~/.cache/splitserve/pt2, so a second clone copies them).
$(FIXTURES)/.stamp: scripts/make_fixtures.py scripts/make_pt2_fixtures.py $(wildcard scripts/export/splitserve_export/*.py) | setup
	$(PY) scripts/make_fixtures.py $(FIXTURES)
	$(PY) scripts/make_pt2_fixtures.py $(FIXTURES)
	touch $@

## The .pt2 twins of the benchmark models (never in make test).
bench-fixtures: fixtures
	$(PY) scripts/make_pt2_fixtures.py $(FIXTURES) --bench

## Every test. Set-up and tests overlap on the 2 cores a fresh clone has: the deploy tools install
## and the fixtures are written while cargo builds; then the Python tests (mostly waiting on the
## real servers they start), the Rust tests (after their compile) and the deploy tests (rendering)
## run side by side, each suite's output printed whole when it ends (their time bounds are generous:
## every suite also passed on a machine loaded several times over).
test: setup
	$(MAKE) -j3 build fixtures tools
	$(MAKE) -j3 -Otarget test-python test-rust test-deploy; status=$$?; \
	  bash scripts/build-cache.sh save; exit $$status

test-rust-build: build
	cargo test --release --no-run

test-rust: build fixtures test-rust-build
	cargo test --release -- --test-threads 2

## On a machine with an NVIDIA GPU: every GPU test (a missing GPU fails them), CUDA vs CPU
## answers, GPU metrics, a real out of memory and device-side assert, CPU vs CUDA benchmark.
gpu-check: build fixtures
	bash scripts/gpu-check.sh

## Test tools beyond the venv: promtool and the Prometheus server (Debian), Helm SDK, validators,
## the KServe SDK (in .venv-kserve: it pins protobuf<7), the libraries perf_analyzer loads
## (.tools/perf_analyzer, Debian libb64-0d; scripts/perf_analyzer runs it).
tools: setup
	bash scripts/setup-deploy-tools.sh

test-python: build fixtures tools
	$(PY) -m pytest -q tests/python

## Chart, rendered manifests, Dockerfile, dashboards and alert rules (no cluster needed).
test-deploy: build tools
	$(PY) -m pytest -q tests/deploy

## Side-by-side benchmarks, both written to docs/benchmarks.md: against the Python servers
## (run.py), then over the Open Inference Protocol against MLServer and Triton (bench-v2).
bench: build fixtures bench-fixtures bench-setup
	$(PY) scripts/bench/run.py
	$(PY) scripts/bench/v2.py

## splitserve over KServe v2 vs MLServer and Triton, perf_analyzer as the load generator.
bench-v2: build fixtures bench-setup
	$(PY) scripts/bench/v2.py

## Split-LLM decoding (never in make test; run it alone on the machine, about 15 minutes): a GPT-2
## trunk on splitserve with and without KV sessions vs a transformers server behind grpc.server,
## contexts 16 to 1,000; writes docs/benchmarks-llm.md. Smoke test: make bench-llm ARGS=--quick
bench-llm: build
	$(PY) scripts/bench/llm.py $(ARGS)
	$(PY) scripts/bench/llm_concurrent.py $(filter --quick,$(ARGS))

## The benchmark's own venvs (never in make test): .venv-bench (perf_analyzer) and
## .venv-peers (MLServer, Triton via nvidia-pytriton, torch; about 5 GB), plus libb64-0d.
bench-setup:
	bash scripts/bench/setup.sh

## Reliability under overload, a 1,000,000-request soak, SIGTERM and SIGKILL, connection
## rotation: the real binary on loopback ports, about 3 minutes; writes docs/reliability.md.
reliability: build fixtures
	$(PY) scripts/reliability.py

## The container image splitserve:<appVersion>-cpu with podman (VARIANT=cuda: -cuda), from the
## Dockerfile; makes the base images locally where no registry is reachable (docs/image.md).
image:
	bash scripts/image/build.sh

## Runs the image as the Helm chart's pod does and checks health, answers, metrics, HEALTHCHECK
## and the SIGTERM drain (docs/image.md). Not part of make test.
image-test: setup
	$(PY) scripts/image/test.py

fmt:
	cargo fmt

lint: setup
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings

clean:
	cargo clean
	rm -rf $(FIXTURES)

## Mutation testing (never in make test; hours for every module on 2 cores): cargo-mutants over
## listen, auth, grpc/layers, repository, training/checkpoint and v2, each against the Rust and
## Python tests that claim it (scripts/mutants.sh, .cargo/mutants.toml); docs/testing.md.
## One module: make mutants MODULES=auth; part of one: make mutants MODULES=listen ARGS="--shard 0/8"
MUTANTS_VERSION := 25.3.1
MODULES ?= auth checkpoint v2 layers listen repository
.tools/bin/cargo-mutants:
	cargo install --locked --root .tools cargo-mutants --version $(MUTANTS_VERSION)

mutants: build fixtures tools .tools/bin/cargo-mutants
	rc=0; for m in $(MODULES); do bash scripts/mutants.sh $$m $(ARGS) || rc=$$?; done; exit $$rc

