# Two commands for a fresh machine (Python 3.11+ with pip and venv; no GPU needed):
#   make demo   builds the embedded dataset and pretrains the tiny MAE on it (~3 min on 2 cores)
#   make study-quick  the label-efficiency study on that dataset (~23 min on 2 cores)
#   make test   runs the test suite on 8 fake CPU devices (~10 min on 2 cores)
#   make test-fast  the everyday tier: no end-to-end or multi-process tests (~2 min)
# Both create .venv from the pinned requirements on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/synthetic_tiny
DEMO_WORKDIR ?= workdirs/demo
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo study-quick test test-fast bench venv clean

# The environment takes about 3.7 GB (TensorFlow 1.3, PyTorch 0.75, jaxlib 0.35) plus about 1.3 GB of
# wheels while pip installs; pip's cache is off so the wheels are not kept a second time. With
# less free, make warns first (pip's own message comes later, among its other output).
INSTALL_NEEDS_GB := 5
export PIP_NO_CACHE_DIR := 1

$(VENV)/.installed: requirements.txt requirements-lock.txt requirements-parity.txt setup.py
	@free_gb=$$(df -Pk . | awk 'NR == 2 {printf "%.1f", $$4 / 1048576}'); \
	if awk "BEGIN {exit !($$free_gb < $(INSTALL_NEEDS_GB))}"; then \
	  echo "make: warning: only $$free_gb GB free in $$(pwd); installing .venv needs about" \
	       "$(INSTALL_NEEDS_GB) GB, so pip may fail with 'No space left on device'." >&2; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-parity.txt -c requirements-lock.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

$(DEMO_DATA)/dataset_info.json: | $(VENV)/.installed
	$(PY) -m data_pipeline.build_synthetic --output $(DEMO_DATA) --tile_size 128 \
	    --train 768 --validation 128 --test 640 --num_shards 8

demo: $(VENV)/.installed $(DEMO_DATA)/dataset_info.json
	$(PY) -m mae_jax.main --config configs/pretrain.py:tiny --workdir $(DEMO_WORKDIR) \
	    --config.dataset.data_dir=$(DEMO_DATA)

# The label-efficiency study on the embedded dataset (pretrain, then 64 fine-tuning runs).
study-quick: $(VENV)/.installed $(DEMO_DATA)/dataset_info.json
	$(PY) -m mae_jax.trainers.study --config configs/study.py:quick --workdir workdirs/study_quick \
	    --config.data_dir=$(DEMO_DATA)

# Tests run in TEST_WORKERS processes (pytest-xdist): XLA compiles on one thread, so a second
# process keeps the second core busy. Whole files go to one process (loadfile), so the
# fixtures a file shares (trained workdirs, scenes, maps) are made once. Each process holds
# its own 8 fake devices; the machine's memory in use peaked at 9 GB. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q \
    -n $(TEST_WORKERS) --dist loadfile

test: $(VENV)/.installed
	$(PYTEST) tests

# Markers (pytest.ini): integration = a trainer or tool end to end; multiprocess = several
# processes. CI and `make test` run everything.
test-fast: $(VENV)/.installed
	$(PYTEST) -m 'not integration and not multiprocess' tests

bench: $(VENV)/.installed
	$(PY) bench/bench_step.py --preset tiny --repeats 5
	$(PY) bench/bench_step.py --preset poster --batch 2 --steps 3 --warmup 1 --repeats 3

clean:
	rm -rf $(VENV) $(DEMO_WORKDIR)
