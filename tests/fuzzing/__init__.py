"""Fuzzing of every parser that reads bytes someone else wrote.

    targets.py  one target per parser (TARGETS), seeds from real blobs
    seeds.py    the seeds: blobs built with the project's producer and the
                independent test encoder, manifests, references, tars...
    mutate.py   byte-level, JSON-tree and tar-aware mutators
    engine.py   the loop (verdicts, deadline, memory bound, corpus) and the
                forked, watched worker that catches hangs

``python -m benchmarks.fuzz`` runs it with a budget; tests/test_fuzz_parsers.py
runs a short slice in CI.
"""
