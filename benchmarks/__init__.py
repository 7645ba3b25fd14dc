"""Benchmarks: each writes its result under benchmarks/results/."""
