"""Fixtures for registry tests (filled by the registry work)."""
