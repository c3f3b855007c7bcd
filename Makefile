# parlm: the two README commands and helpers. Every target sets up .venv first (idempotent).
PYTHON := .venv/bin/python
SEEDS ?= 42 314
RUN_ID ?=

.PHONY: setup demo test lab

setup:
	@bash scripts/setup.sh

# The main job: every stage of the demo preset for two seeds, then the multi-seed report.
# The report lands in runs/<run_id>/report/ (the run id is printed; set RUN_ID=... to resume).
demo: setup
	$(PYTHON) -m parlm.run --preset demo --seeds $(SEEDS) $(if $(RUN_ID),--run-id $(RUN_ID),)

# Unit tests, then every notebook under nbval.
test: setup
	@bash scripts/run_tests.sh

# JupyterLab on the notebooks (pick the kernel `parlm (<this checkout>)`); root needs --allow-root.
lab: setup
	.venv/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root,) notebooks/
