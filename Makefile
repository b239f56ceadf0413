# The two commands a new user needs: `make demo` and `make test`. Each does all set-up itself
# (scripts/bootstrap.sh: Debian packages, .venv with torch), then builds with CMake.
VENV   ?= .venv
BUILD  ?= build
JOBS   ?= $(shell nproc)
PYTHON := $(CURDIR)/$(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

CMAKE_FLAGS ?=

.PHONY: all bootstrap configure build test demo install bench clean

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

demo: build
	@$(BUILD)/examples/cpp/mixsga_quickstart
	@echo
	@$(BUILD)/examples/cpp/mixsga_generate

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
