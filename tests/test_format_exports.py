"""``lazyfs.format`` names its submodules' public names without importing
them (so the registry path does not load zstandard): every name it promises
must be where it says, and every public name of its submodules reachable."""

from __future__ import annotations

import importlib

import pytest

import lazyfs.format as fmt


@pytest.mark.parametrize("module", ["digest", "encode", "seekable"])
def test_every_public_name_of_a_submodule_is_reachable_from_the_package(module: str):
    mod = importlib.import_module(f"lazyfs.format.{module}")
    missing = [name for name in mod.__all__ if name not in fmt._WHERE]
    assert not missing, f"lazyfs.format does not export {module}.{missing}"


def test_every_name_the_package_promises_resolves_to_its_submodules_object():
    for name, module in fmt._WHERE.items():
        mod = importlib.import_module(f"lazyfs.format.{module}")
        assert name in mod.__all__, f"{module}.__all__ lacks {name}"
        assert getattr(fmt, name) is getattr(mod, name)
