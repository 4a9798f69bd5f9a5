# rwkvops tasks. `make install` then `make test` on a fresh machine; `make demo` runs the main job.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
EXTRAS  ?= dev,cuda12,torch
PYTEST  := $(VPY) -m pytest

.PHONY: install test test-gpu demo bench compile compile-check wheel lint sanitize clean

install:            ## create .venv and install rwkvops (editable) with the dev extras
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c constraints.txt "cupy-cuda12x[ctk]" torch
	$(VPY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e examples/rwkvops_ema

test:               ## CPU tests, NVRTC compile check of every kernel, packaging test (GPU tests skip without a GPU)
	$(PYTEST) -q tests examples/rwkvops_ema/tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests ran" >&2; exit 1; fi; exit $$rc

test-gpu:           ## the GPU tests only (needs a CUDA device)
	$(PYTEST) -q -m gpu tests examples/rwkvops_ema/tests

demo:               ## python -m rwkvops demo: every op on realistic shapes (GPU) or small shapes (CPU)
	$(VPY) -m rwkvops demo

bench:              ## pytest-benchmark suites on a GPU; writes benchmarks/results/<gpu>.{json,md,png}
	$(VPY) -m pytest -q benchmarks/bench_ops.py
	$(VPY) benchmarks/report.py

compile:            ## compile every kernel instantiation for the current GPU, print the time
	$(VPY) -m rwkvops compile

compile-check:      ## NVRTC compile of every instantiation for sm_80 and sm_90 (no GPU needed)
	$(VPY) -m rwkvops compile --nvrtc

wheel:              ## build sdist and wheel into dist/
	$(VPY) -m build --no-isolation --outdir dist .

lint:
	$(VPY) -m compileall -q rwkvops tests benchmarks examples

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
