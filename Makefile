# covid_keras: `make demo` and `make test` work on a fresh machine (they create .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TF_ENABLE_ONEDNN_OPTS := 1
DEMO_DIR ?= runs/demo
# pytest-xdist workers for the suites (0: one process). Each test module stays on one
# worker (--dist loadscope), so a module's fixtures are built once.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadscope)

.PHONY: venv demo test test-fast test-slow lint bench clean

$(VENV)/.installed: setup.py setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dicom,beam,jax,serving,web,dev]"
	# TF Serving's client protos: their metadata asks for the full `tensorflow`, which would
	# clash with tensorflow-cpu, so without dependencies (grpcio comes from [serving]).
	$(PY) -m pip install --quiet --no-deps tensorflow-serving-api==2.21.0
	touch $@

venv: $(VENV)/.installed

## demo: generated 3-class chest CT studies (real DICOM) -> TFRecords -> a tiny DRENet
## trained on the CPU, with validation (and held-out test) patient-level metrics printed.
demo: venv
	$(PY) -m data_prep.phantom --output_dir=$(DEMO_DIR)/studies --kinds=normal,covid,bacterial \
	    --patients_per_kind=10 --num_slices=60 --matrix=256 --seed=0
	$(PY) -m data_prep.build_tfrecords --flagfile=configs/data/demo.cfg \
	    --input=$(DEMO_DIR)/studies --output_dir=$(DEMO_DIR)/tfrecords
	$(PY) -m covid_keras.train --flagfile=configs/demo.cfg \
	    --data_dir=$(DEMO_DIR)/tfrecords --run_dir=$(DEMO_DIR)/drenet --overwrite
	$(PY) -m covid_keras.evaluate --run_dir=$(DEMO_DIR)/drenet --split=test
	@echo "The diagnosis page on the demo model (then open http://127.0.0.1:8080/):"
	@echo "  $(PY) -m covid_keras.web --model=$(DEMO_DIR)/drenet --port=8080"

# The JAX pass builds large models (DenseNets, a ResNet-50 DRENet) and runs each a few steps:
# XLA's CPU backend at -O0 compiles them faster than it loses in running them (the whole
# JAX pass 179 s instead of 234-262 s; the TF pass, whose trainings run longer, was 15 %
# slower at -O0 and keeps the default). The code and the tests are the same.
JAX_TEST_XLA_FLAGS := --xla_backend_optimization_level=0

# JAX's persistent compilation cache, in a folder new for each `make test` and shared by
# every process of both passes: a computation that one test compiled (the same model, shapes
# and flags) is read back by the next instead of compiled again, and every computation is
# still compiled once in each run. The JAX pass took 294 s instead of 402 s with it (user
# CPU 307 s instead of 368 s; one run each, beside a training: bench/README.md, "Test
# suite"). No size limit: with one, JAX locks the folder and totals its size at every write
# (the same pass took 521 s, 102 s of it system time). Without the lock, a process may read
# an entry that another is still writing: JAX then warns and compiles (setup.cfg lets that
# one warning through).
JAX_TEST_CACHE := JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1

## test: lint + the whole suite under TensorFlow, then the (fast) model tests under JAX.
test: venv lint
	cache=$$(mktemp -d) && trap 'rm -rf "$$cache"' EXIT && \
	export JAX_COMPILATION_CACHE_DIR="$$cache" $(JAX_TEST_CACHE) && \
	$(PY) -m pytest -q $(XDIST) --durations=15 tests && \
	KERAS_BACKEND=jax XLA_FLAGS="$$XLA_FLAGS $(JAX_TEST_XLA_FLAGS)" \
	    $(PY) -m pytest -q $(XDIST) --durations=15 -m "model and not slow" tests

test-fast: venv
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

test-slow: venv
	$(PY) -m pytest -q $(XDIST) -m slow tests

lint: venv
	$(PY) -m ruff check .

bench: venv
	$(PY) bench/prep.py

clean:
	rm -rf $(VENV) runs .pytest_cache
