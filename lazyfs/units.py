"""Human sizes: ``parse_size("4MiB")`` and ``format_size(4194304)``.

Re-exported from ``cache`` so the cache package stays free of lazyfs imports
while the CLI has one spelling for sizes.
"""

from __future__ import annotations

from cache import format_size, parse_size

__all__ = ["format_size", "parse_size"]
