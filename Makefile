# The two commands of the README. Each sets up what it needs first.
.PHONY: setup demo test lint bench

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/python examples/demo.py

test: setup
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check lazyfs cache tests benchmarks examples

bench: setup
	.venv/bin/python -m benchmarks.coldstart
