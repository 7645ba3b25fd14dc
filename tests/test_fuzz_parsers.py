"""A short slice of the fuzzing (``make fuzz`` runs the full budget): every
target, a few thousand mutated inputs each (or a couple of seconds for the
slow whole-flow ones), in a watched worker. Any exception other than the
project's own errors, an input over the deadline, a hang or an input that
blows the memory bound fails the test with the input attached."""

from __future__ import annotations

import pytest

from tests.fuzzing import seeds
from tests.fuzzing.engine import run_isolated
from tests.fuzzing.targets import TARGETS

INPUTS = 3000
SECONDS = 2.5  # per target; ~15 targets keep the file well under a minute


@pytest.fixture(scope="module", autouse=True)
def _seeds() -> None:
    seeds.real_blobs()  # built once, inherited by the forked workers


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_raises_only_project_errors(name: str) -> None:
    stats = run_isolated(name, inputs=INPUTS, seconds=SECONDS, seed=20240917, hard_deadline=15.0)
    report = "\n".join(
        f"{f.kind} {f.exc_type} at {f.where}: {f.message[:200]} (input base64 {f.input_b64[:400]})"
        for f in stats.findings
    )
    assert not stats.findings, report
    # Not vacuous: the slice ran, and some inputs got past the first check.
    assert stats.inputs >= 50, stats.inputs  # the mock-registry targets run ~50-500/s
    assert len(stats.refused) + (stats.passed > 0) >= 1
    assert stats.corpus > len(TARGETS[name].seeds())


def test_every_parser_of_the_brief_has_a_target() -> None:
    assert {
        "chunk_table", "descriptor", "manifest", "client_resolve", "config", "reference",
        "www_authenticate", "token_answer", "docker_config", "verity_superblock", "zstd_frame",
        "tar", "profile", "error_body",
    } <= set(TARGETS)  # fmt: skip
