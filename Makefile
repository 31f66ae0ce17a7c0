# Two commands: `make demo` and `make test`. Both set up .venv first if anything is missing.
PY := .venv/bin/python
STAMP := .venv/.vild_d2_setup
PYTEST_ARGS ?=

.PHONY: setup demo test clean-venv

setup:
	@bash tools/setup_venv.sh

demo: setup
	$(PY) tools/run_pipeline.py $(DEMO_ARGS)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean-venv:
	rm -rf .venv
