# The two commands of the README. Each sets up what it needs first.
.PHONY: setup demo test lint bench fuzz reliability

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

# Every parser of untrusted bytes, >= 1,000,000 inputs (exits 1 on a finding).
fuzz: setup
	.venv/bin/python -m benchmarks.fuzz --inputs 1100000 --seconds 1500

# Fault soak through the kernel (10 min), 100 daemon kills, cache and registry trouble.
reliability: setup
	.venv/bin/python -m benchmarks.reliability
