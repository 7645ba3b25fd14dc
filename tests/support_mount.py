"""Fixtures for mount tests (filled by the mount work)."""
