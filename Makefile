# Every target creates .venv and installs what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-shards test test-all lint bench models clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/swinv2 train --config configs/demo_digits.yaml --out runs/demo_digits

# The demo from shards: the digits packed, then trained with data.source: shards.
DIGITS := runs/.cache/digits32
demo-shards: $(STAMP)
	$(VENV)/bin/swinv2 data digits $(DIGITS)
	$(VENV)/bin/swinv2 data pack $(DIGITS)/train $(DIGITS)_shards/train --shard-samples 128
	$(VENV)/bin/swinv2 data pack $(DIGITS)/val $(DIGITS)_shards/val --shard-samples 128 --classes $(DIGITS)_shards/train
	$(VENV)/bin/swinv2 train --config configs/demo_digits_shards.yaml --out runs/demo_digits_shards

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# All three run, then the target fails if any of them found something.
lint: $(STAMP)
	status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/ruff format --check . || status=1; \
	$(VENV)/bin/mypy || status=1; \
	exit $$status

bench: $(STAMP)
	$(PY) benchmarks/run_cpu.py --out benchmarks/results

models: $(STAMP)
	$(VENV)/bin/swinv2 models

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
