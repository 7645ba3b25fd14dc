"""Test and benchmark harness, not shipped: a local docker-registry, a network
emulator with fault injection, an independent blob encoder, mount fixtures.

Imported as ``support.*`` by the tests (tests/ is on their path) and as
``tests.support.*`` by benchmarks and examples (run from the repository root).
"""
