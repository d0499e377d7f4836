# `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
DATA_DIR ?= .
# browser tests drive Debian's chromium (never a downloaded browser); CI runs as root and installs it
CHROMIUM := /usr/bin/chromium
# the bf16 fast path compiles its Winograd transforms with the system C compiler (without one: direct convolutions)
CC_BIN := /usr/bin/cc

.PHONY: run test bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so pip takes the CPU wheel and never a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# k-diffusion is a test-only reference; it depends on torchvision, so no deps
	$(PIP) install -q --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sdstudio serve --data-dir $(DATA_DIR)

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

$(CC_BIN):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc

test: $(STAMP) $(CHROMIUM) $(CC_BIN)
	$(PY) -m pytest -q -p no:cacheprovider

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/load.py
	$(PY) bench/generate.py
	$(PY) bench/duel.py
	$(PY) bench/lora.py
	$(PY) bench/options.py
	$(PY) bench/winograd.py
	$(PY) bench/vae_attention.py
	$(PY) bench/attention.py
	$(PY) bench/roofline.py
	$(PY) bench/compile.py
	$(PY) bench/fast_fp32.py
	$(PY) bench/gpu.py
	$(PY) bench/gpu_unet.py

clean:
	rm -rf $(VENV)
