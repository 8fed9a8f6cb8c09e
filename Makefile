# The README's two commands: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# This machine keeps the CPU build of torch in /opt/wheels; elsewhere pip's defaults apply.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP    := $(PY) -m pip install --disable-pip-version-check -q $(FIND_LINKS) -c constraints.txt
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: demo test venv clean bench

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[all,test,bench]"
	touch $@

demo: venv
	$(VENV)/bin/fedsilo-coordinator demo $(ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Each regenerates its committed results in benchmarks/results/ (see docs/benchmarks.md):
# `make bench-NAME ARGS="..."` runs benchmarks/$(BENCH_NAME).py.
BENCH_ingest      := ingest
BENCH_async       := async_vs_sync
BENCH_privacy     := privacy_accuracy
BENCH_model       := model_pull
BENCH_tlog        := tlog_verify
BENCH_secagg      := secagg
BENCH_upload      := upload_memory
BENCH_pacing      := pacing
BENCH_race        := race
BENCH_compression := compression
BENCHES := $(patsubst BENCH_%,bench-%,$(filter BENCH_%,$(.VARIABLES)))
.PHONY: $(BENCHES)

bench: bench-ingest bench-async bench-privacy bench-model bench-upload

$(BENCHES): bench-%: venv
	$(PY) benchmarks/$(BENCH_$*).py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
