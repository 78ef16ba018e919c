# Entry points for developers and CI. Every target runs as root on Debian.
# `make test` and `make demo` set up the machine first, so they work on a fresh clone.

PYTHON ?= python3.11
VENV := .venv
STACK := $(PYTHON) deploy/local/stack.py
# Extra pytest arguments, for example: make test PYTEST_ARGS="-k stack -x"
PYTEST_ARGS ?=

.PHONY: setup test demo stack-start stack-stop stack-status

setup:
	PYTHON=$(PYTHON) bash deploy/local/setup.sh

# Start the stack, run pytest, and stop the stack whatever pytest returned.
# pytest exits with 5 when it collected no test, which counts as a failure here.
test: setup
	@status=0; \
	$(STACK) start && $(VENV)/bin/python -m pytest $(PYTEST_ARGS) || status=$$?; \
	$(STACK) stop; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; \
	exit $$status

demo: setup
	$(VENV)/bin/caption-worker demo

stack-start:
	$(STACK) start

stack-stop:
	$(STACK) stop

stack-status:
	$(STACK) status
