# The two commands a new user needs: `make demo` and `make test`. Each does all set-up itself
# (scripts/bootstrap.sh: Debian packages, .venv with torch), then builds with CMake.
VENV   ?= .venv
BUILD  ?= build
JOBS   ?= $(shell nproc)
PYTHON := $(CURDIR)/$(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

CMAKE_FLAGS ?=

.PHONY: all bootstrap configure build test test-sanitize demo study install bench clean

all: build

bootstrap:
	@bash scripts/bootstrap.sh

configure: bootstrap
	@cmake -S . -B $(BUILD) -G Ninja -DMIXSGA_PYTHON=$(PYTHON) $(CMAKE_FLAGS) > $(BUILD).configure.log 2>&1 \
	  || (cat $(BUILD).configure.log; exit 1)
	@grep -E "^-- mixsga" $(BUILD).configure.log || true

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

test: build
	@# ctest runs $(JOBS) tests at once: one torch thread each, or they oversubscribe the cores.
	@OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

# The library, the C++ gtests and the fuzz harness built with ASan + UBSan (no CUDA, Python, examples
# or benchmarks), the gtests and the fuzz corpus run clean, then FUZZ_SECONDS of new random cases.
# -O1, the usual sanitizer level: readable reports, fast enough tests, and a much shorter compile than
# Release's -O3 (this build runs in CI). Runtime options and suppressions: tests/sanitize/ (each
# explained). CI runs it after `make test`.
SAN_BUILD    ?= build-asan
FUZZ_SECONDS ?= 60
test-sanitize: bootstrap
	@cmake -S . -B $(SAN_BUILD) -G Ninja -DMIXSGA_PYTHON=$(PYTHON) -DMIXSGA_SANITIZE=ON -DMIXSGA_WITH_CUDA=OFF \
	  -DMIXSGA_BUILD_PYTHON=OFF -DMIXSGA_BUILD_EXAMPLES=OFF -DMIXSGA_BUILD_BENCHMARKS=OFF \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 \
	  > $(SAN_BUILD).configure.log 2>&1 || (cat $(SAN_BUILD).configure.log; exit 1)
	@# gtest discovery runs the sanitized test binary at build time, so the options apply there too.
	@. tests/sanitize/env.sh && cmake --build $(SAN_BUILD) -j $(JOBS)
	@. tests/sanitize/env.sh && OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
	  ctest --test-dir $(SAN_BUILD) --output-on-failure -j $(JOBS)
	@. tests/sanitize/env.sh && OMP_NUM_THREADS=1 $(SAN_BUILD)/tests/fuzz/mixsga_fuzz --seconds $(FUZZ_SECONDS)

# The C++ examples, then the paper's protocol at laptop scale (examples/python/demo.py, ~10-15 min on
# 2 cores the first time; the base model is cached in out/demo/cache). DEMO_ARGS=--quick for a smoke run,
# DEMO_ARGS="--model smollm2" to continue the pretrained SmolLM2-135M instead (out/demo-smollm2).
demo: build
	@$(BUILD)/examples/cpp/mixsga_quickstart
	@echo
	@$(BUILD)/examples/cpp/mixsga_generate
	@echo
	@PYTHONPATH=$(CURDIR)/$(BUILD)/python $(PYTHON) examples/python/demo.py $(DEMO_ARGS)

# The quality study (examples/python/study.py, docs/STUDY.md): static GQA against mixSGA as in the paper
# and with the quality extensions, by uptraining budget (0.1-10 % of a well-trained base's pretraining),
# 3 seeds, on Debian's linux-doc and python docs. Runs are appended to out/regime/runs.jsonl and the base
# is cached with its curve (checkpointed as it trains), so an interrupted study resumes. STUDY_ARGS:
# --quick (smoke run), --push (the attempts to keep mixSGA's lead), --continuation (the older study:
# 125 % of a short base's pretraining), --smollm2-uptrain, --smollm2-conversion.
study: build
	@PYTHONPATH=$(CURDIR)/$(BUILD)/python $(PYTHON) examples/python/study.py $(STUDY_ARGS)

install: build
	@cmake --install $(BUILD) --prefix $(or $(PREFIX),$(CURDIR)/$(BUILD)/_install)

clean:
	rm -rf $(BUILD) $(BUILD).configure.log

# Google Benchmark binaries; console tables plus JSON in out/bench/.
bench: build
	@mkdir -p out/bench
	@for b in bench_layer bench_decode; do \
	  $(BUILD)/benchmarks/$$b --benchmark_out=out/bench/$$b.json --benchmark_out_format=json $(BENCH_ARGS) || exit 1; \
	done
	@echo "JSON results in out/bench/"
