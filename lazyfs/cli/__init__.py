"""The ``lazyerofs`` command: a thin shell over the library.

Each subcommand lives in ``lazyfs/cli/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed namespace and returning an exit code.

Only the module of the command being run is imported (all of them for
``--help`` or an unknown command), and each imports its libraries (httpx,
trio, zstandard, pyfuse3) only as far as it needs them: ``lazyerofs umount``
should not pay for the HTTP stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence

from lazyfs import __version__
from lazyfs.errors import LazyErofsError

__all__ = ["STARTED", "build_parser", "main"]

# When the command started, for the startup timings of a mount
# (CLOCK_MONOTONIC: the forked daemon reads the same clock).
STARTED = time.monotonic()

# Order here is the order in `--help`.
COMMAND_MODULES = (
    "build",
    "inspect",
    "push",
    "convert",
    "optimize",
    "mount",
    "umount",
    "snapshotter",
    "pull",
    "status",
    "stats",
    "profile",
    "verify",
    "cache",
    "service",
)
# Other names a command answers to (its module registers them as aliases).
COMMAND_ALIASES = {"unmount": "umount"}
# Global options that take a value (the command name is the first word after them).
_VALUED_OPTIONS = ("--log-level",)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` (a module of COMMAND_MODULES) the
    parser of that one command, which is all ``main`` needs to run it."""
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
    for name in COMMAND_MODULES if only is None else (only,):
        try:
            module = importlib.import_module(f"lazyfs.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lazyfs.cli.{name}":
                raise
            continue  # not built yet
        module.register(sub)
    return parser


def _command_module(argv: Sequence[str]) -> str | None:
    """The module of the command ``argv`` names, or None (help, version,
    unknown): then every command is registered, for the full usage."""
    words = iter(argv)
    for word in words:
        if word in _VALUED_OPTIONS:
            next(words, None)
        elif word.startswith("-"):
            if word in ("-h", "--help", "--version"):
                return None
        else:
            name = COMMAND_ALIASES.get(word, word)
            return name if name in COMMAND_MODULES else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_module(argv)
    if command == "mount" and "lazyfs.cli.mount" not in sys.modules:
        # A running `lazyerofs service` has the mount command imported
        # already: hand the mount over (None: it is not there, mount here).
        # Not where it is imported already (the service's own child, the
        # snapshotter's zygote).
        from lazyfs.cli.service import handoff

        code = handoff(argv, STARTED)
        if code is not None:
            return code
    parser = build_parser(command)
    args = parser.parse_args(argv)
    args.started = STARTED
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="lazyerofs: %(levelname)s: %(name)s: %(message)s",
    )
    # The HTTP libraries' loggers are held at WARNING by every RegistryClient
    # (lazyfs.oci quiet_library_loggers), which is what reads $LAZYEROFS_DEBUG_HTTP.
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
