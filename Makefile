# Everything creates and uses .venv itself: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The tested torch build. An unpinned torch pulls several GB of CUDA wheels; override with
# `make test TORCH_VERSION=...` to try another one.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: demo test lint bench fuzz clean fs-tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/python -m reshard.demo

# loadgroup: tests marked xdist_group("loopfs") run on one worker, so loop-mounted
# filesystems are made one set at a time.
test: $(STAMP) fs-tools lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# ruff (lint and format) over everything, mypy over the package; make test runs it first.
lint: $(STAMP)
	$(BIN)/ruff check reshard tests bench
	$(BIN)/ruff format --check reshard tests bench
	$(BIN)/mypy

# tests/test_reflink.py and tests/test_copy_chain.py make real XFS, btrfs and ext4
# filesystems (loop-mounted images, as root): install their mkfs tools where missing.
fs-tools:
	@command -v mkfs.xfs >/dev/null && command -v mkfs.btrfs >/dev/null && command -v mkfs.ext4 >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -q xfsprogs btrfs-progs e2fsprogs >/dev/null || \
	      { apt-get update -q >/dev/null && apt-get install -y -q xfsprogs btrfs-progs e2fsprogs >/dev/null; }; }; } || \
	  echo "make: xfsprogs/btrfs-progs missing and not installable here; the filesystem tests will say so"

# Each bench/bench_*.py prints a table and one JSON line; they run one after another
# because timings taken side by side would disturb each other.
bench: $(STAMP)
	@set -e; for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script; done

fuzz: $(STAMP)
	$(BIN)/python bench/fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
