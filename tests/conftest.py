"""Shared fixtures. Fixture modules live beside this file and are listed here."""

from __future__ import annotations

import os
import shutil

import pytest

pytest_plugins = [
    "support.registry",  # real docker-registry instances, fault proxy
    "support.mount",  # FUSE/EROFS mounts with finalizers
    "support.containerd",  # containerd + runc + the lazyerofs snapshotter
]


def require_root_tools(*tools: str) -> None:
    """Skip with a clear reason where an end-to-end test cannot run."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (run scripts/setup.sh)")
