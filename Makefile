# The README's two commands: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# This machine keeps the CPU build of torch in /opt/wheels; elsewhere pip's defaults apply.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP    := $(PY) -m pip install --disable-pip-version-check -q $(FIND_LINKS) -c constraints.txt
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: demo test venv clean bench bench-ingest bench-async bench-privacy bench-model bench-tlog bench-secagg bench-upload bench-pacing bench-race bench-compression

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

# Each regenerates its committed results in benchmarks/results/ (see docs/benchmarks.md).
bench: bench-ingest bench-async bench-privacy bench-model bench-upload

bench-ingest: venv
	$(PY) benchmarks/ingest.py $(ARGS)

bench-async: venv
	$(PY) benchmarks/async_vs_sync.py $(ARGS)

bench-privacy: venv
	$(PY) benchmarks/privacy_accuracy.py $(ARGS)

bench-model: venv
	$(PY) benchmarks/model_pull.py $(ARGS)

bench-tlog: venv
	$(PY) benchmarks/tlog_verify.py $(ARGS)

bench-secagg: venv
	$(PY) benchmarks/secagg.py $(ARGS)

bench-upload: venv
	$(PY) benchmarks/upload_memory.py $(ARGS)

bench-pacing: venv
	$(PY) benchmarks/pacing.py $(ARGS)

bench-race: venv
	$(PY) benchmarks/race.py $(ARGS)

bench-compression: venv
	$(PY) benchmarks/compression.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
