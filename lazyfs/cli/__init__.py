"""The ``lazyerofs`` command: a thin shell over the library.

Each subcommand lives in ``lazyfs/cli/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from lazyfs import __version__
from lazyfs.errors import LazyErofsError

__all__ = ["build_parser", "main"]

# Order here is the order in `--help`.
COMMAND_MODULES = (
    "build",
    "inspect",
    "push",
    "mount",
    "umount",
    "stats",
    "verify",
    "cache",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazyerofs",
        description=(
            "Lazy-loading FUSE filesystem for seekable EROFS container layers. "
            "Fetches only the zstd frames that are read, verifies each against "
            "its SHA-512 before serving it, and caches it locally."
        ),
        epilog="Run 'lazyerofs COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"lazyerofs {__version__}")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="logging verbosity on stderr (default: warning)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"lazyfs.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lazyfs.cli.{name}":
                raise
            continue  # not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="lazyerofs: %(levelname)s: %(name)s: %(message)s",
    )
    # HTTP libraries log request URLs (signed queries) and, at DEBUG, headers
    # (bearer tokens): never below WARNING, whatever --log-level says.
    for name in ("httpx", "httpcore", "hpack", "h2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except LazyErofsError as exc:
        print(f"lazyerofs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as SIGPIPE would.
        # Point stdout at /dev/null so the exit-time flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


if __name__ == "__main__":
    sys.exit(main())
