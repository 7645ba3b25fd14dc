"""``python -m lazyfs.cli``: the same as the ``lazyerofs`` command."""

import sys

from lazyfs.cli import main

sys.exit(main())
