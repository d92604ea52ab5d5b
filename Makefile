# stablelm-ref: every target creates .venv itself; only python3 and make are needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
PIP     := $(PYTHON) -m pip -q --disable-pip-version-check
SHARED  ?= ../shared

.PHONY: help install test crosscheck goldens demo walkthrough bench bench-llama bench-gpu test-gpu fuzz clean

help:
	@echo "make install      create .venv with the package and its test tools (stablelm-ref: .venv/bin/stablelm-ref)"
	@echo "make test         create .venv, install .[test], run the test suite (CPU)"
	@echo "make demo         generate text offline with the embedded default model"
	@echo "make crosscheck   compare live against transformers (installs torch CPU + transformers)"
	@echo "make goldens      rebuild tests/goldens/ with transformers"
	@echo "make walkthrough  run every walkthrough chapter, redrawing stale figures (WALK_ARGS=--check: fail instead)"
	@echo "make bench        CPU speed against transformers (tools/bench_cpu.py)"
	@echo "make bench-llama  CPU speed against llama.cpp f32 and transformers (tools/bench_llama.py; builds llama.cpp once)"
	@echo "make bench-gpu    GPU speed against transformers (says 'no GPU' and succeeds without one)"
	@echo "make test-gpu     the GPU tests (tests/gpu; says 'no GPU' and succeeds without one)"
	@echo "make fuzz         the long hostile-input fuzzing run (tests/test_hostile_*.py)"
	@echo "make clean        remove .venv and the build and test caches"

$(PYTHON):
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.test: pyproject.toml | $(PYTHON)
	$(PIP) install -e '.[test]'
	@touch $@

$(VENV)/.plots: $(VENV)/.test
	$(PIP) install -e '.[test,plots]'
	@touch $@

$(VENV)/.crosscheck: $(VENV)/.test
	$(PIP) install 'torch==2.13.0'
	$(PIP) install -e '.[test,crosscheck]'
	@touch $@

install: $(VENV)/.test

test: $(VENV)/.test
	$(PYTHON) -m pytest -q -p no:cacheprovider

crosscheck: $(VENV)/.crosscheck
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/crosscheck

$(VENV)/.bench: $(VENV)/.test
	$(PIP) install 'torch==2.13.0'
	$(PIP) install -e '.[test,crosscheck,bench]'
	@touch $@

# OpenBLAS's CORETYPE/L2_SIZE overrides (set on some machines for old builds) slow current NumPy:
# the benchmark runs as a user's machine would, and prints which OpenBLAS kernel ran.
bench: $(VENV)/.bench
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PYTHON) tools/bench_cpu.py $(BENCH_ARGS)

# llama.cpp (pinned, from the llama-cpp-python source distribution) built once into ~/.cache/stablelm-ref
# (about 12 minutes on two cores; needs cmake and a C++ compiler), then every side on the same checkpoint
bench-llama: $(VENV)/.bench
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE STABLELM_SHARED=$(or $(STABLELM_SHARED),$(SHARED)) \
		$(PYTHON) tools/bench_llama.py $(BENCH_ARGS)

demo: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(BIN)/stablelm-ref generate "def fibonacci(n):"

goldens: $(VENV)/.crosscheck
	$(PYTHON) tools/make_goldens.py --out tests/goldens

walkthrough: $(VENV)/.plots
	MPLBACKEND=Agg STABLELM_SHARED=$(SHARED) $(PYTHON) tools/run_walkthrough.py $(WALK_ARGS)

# >= 10,000 generated hostile inputs (checkpoints, configs, ids: tests/test_hostile_input.py) and ~6,500 more
# (templates, JSON shapes, text, labels, arguments, rope numbers: tests/test_hostile_classes.py);
# `make test` runs a few hundred of them
fuzz: $(VENV)/.test
	HYPOTHESIS_PROFILE=fuzz $(PYTHON) -m pytest -q -p no:cacheprovider --hypothesis-show-statistics \
		tests/test_hostile_input.py tests/test_hostile_classes.py tests/test_hostile_round3.py

# GPU targets: need an NVIDIA GPU and CuPy (pip install -e '.[gpu]'). Without them tools/has_gpu.py says
# why and the target succeeds without running anything (nor installing torch for bench-gpu).
test-gpu: $(VENV)/.test
	@$(PYTHON) tools/has_gpu.py || { echo "make test-gpu: skipped"; exit 0; }; \
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/gpu

bench-gpu: $(VENV)/.test
	@$(PYTHON) tools/has_gpu.py || { echo "make bench-gpu: skipped"; exit 0; }; \
	$(MAKE) --no-print-directory $(VENV)/.crosscheck && \
	$(PYTHON) tools/bench_gpu.py && $(PYTHON) tools/bench_attention.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
