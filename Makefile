# llama-serve developer commands. `make serve` and `make test` are the two that matter.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
ARGS ?=

.PHONY: install test serve lint bench clean

install: $(VENV)/.installed

# constraints.txt pins the CPU wheel of torch for dev/CI; GPU users install without it.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/llama-serve serve $(MODEL) $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
