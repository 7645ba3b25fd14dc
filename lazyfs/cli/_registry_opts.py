"""Registry options shared by every command that talks to a registry.

``add_registry_options`` may be called on any parser (mount, inspect,
verify, push); ``options_from_args`` turns the parsed flags back into a
:class:`lazyfs.oci.RegistryOptions`. The password is only ever read
from stdin, so it never shows up in ``ps`` or shell history.
"""

from __future__ import annotations

import argparse
import os
import sys

from lazyfs.errors import AuthError, FormatError
from lazyfs.oci import (
    DEFAULT_OVERALL_TIMEOUT,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    RegistryOptions,
)

__all__ = ["add_registry_options", "options_from_args", "registry_argv"]

_MARK = "_lazyerofs_registry_options"


def add_registry_options(parser: argparse.ArgumentParser) -> None:
    """Add the ``registry`` option group to ``parser`` (a second call is a no-op)."""
    if getattr(parser, _MARK, False):
        return
    setattr(parser, _MARK, True)
    g = parser.add_argument_group("registry")
    plain = g.add_mutually_exclusive_group()
    plain.add_argument(
        "--plain-http",
        dest="plain_http",
        action="store_const",
        const=True,
        default=None,
        help="talk HTTP, not HTTPS (default: only for localhost/127.x/[::1], as docker does)",
    )
    plain.add_argument(
        "--no-plain-http",
        dest="plain_http",
        action="store_const",
        const=False,
        help="HTTPS even for loopback hosts",
    )
    g.add_argument(
        "--insecure-tls",
        action="store_true",
        help="DANGEROUS: do not verify the registry's TLS certificate",
    )
    g.add_argument(
        "--username", metavar="USER", help="registry user (default: from the docker config)"
    )
    g.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password (or token) from the first line of stdin",
    )
    g.add_argument(
        "--docker-config",
        metavar="FILE",
        help="docker config.json with credentials (default: $DOCKER_CONFIG/config.json or ~/.docker/config.json)",
    )
    g.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="platform to pick from an index (default: this host)",
    )
    g.add_argument("--http2", action="store_true", help="use HTTP/2 where the registry offers it")
    g.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        metavar="N",
        help=f"retries of a failed request, with backoff (default: {DEFAULT_RETRIES})",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"network timeout per request (default: {DEFAULT_TIMEOUT:g})",
    )
    g.add_argument(
        "--overall-timeout",
        type=float,
        default=DEFAULT_OVERALL_TIMEOUT,
        metavar="SECONDS",
        help=(
            "deadline of each whole network stage (resolving the manifest and config, "
            f"a token fetch, a size probe), retries included (default: {DEFAULT_OVERALL_TIMEOUT:g})"
        ),
    )


def options_from_args(args: argparse.Namespace) -> RegistryOptions:
    """The RegistryOptions the flags ask for (reads stdin once for --password-stdin)."""
    password = None
    if getattr(args, "password_stdin", False):
        cached = getattr(args, "_password_from_stdin", None)
        if cached is None:
            line = sys.stdin.readline()
            cached = line.rstrip("\r\n")
            args._password_from_stdin = cached
        password = cached
        if not getattr(args, "username", None):
            raise AuthError("--password-stdin needs --username")
    if getattr(args, "retries", 0) < 0:
        raise FormatError(f"--retries must be >= 0, not {args.retries}")
    for flag, value in (
        ("--timeout", getattr(args, "timeout", DEFAULT_TIMEOUT)),
        ("--overall-timeout", getattr(args, "overall_timeout", DEFAULT_OVERALL_TIMEOUT)),
    ):
        if not value > 0:  # also refuses NaN
            raise FormatError(f"{flag} must be a number of seconds > 0, not {value}")
    docker_config = getattr(args, "docker_config", None)
    return RegistryOptions(
        plain_http=getattr(args, "plain_http", None),
        insecure_tls=bool(getattr(args, "insecure_tls", False)),
        username=getattr(args, "username", None),
        password=password,
        docker_config=os.path.expanduser(docker_config) if docker_config else None,
        http2=bool(getattr(args, "http2", False)),
        retries=getattr(args, "retries", DEFAULT_RETRIES),
        timeout=getattr(args, "timeout", DEFAULT_TIMEOUT),
        platform=getattr(args, "platform", None),
        overall_timeout=getattr(args, "overall_timeout", DEFAULT_OVERALL_TIMEOUT),
    )


def registry_argv(options: RegistryOptions) -> list[str]:
    """The flags that ask a child ``lazyerofs`` command for ``options``
    (all but the password, which goes to its stdin with --password-stdin)."""
    argv = []
    if options.plain_http is not None:
        argv.append("--plain-http" if options.plain_http else "--no-plain-http")
    if options.insecure_tls:
        argv.append("--insecure-tls")
    if options.username:
        argv += ["--username", options.username]
    if options.docker_config:
        argv += ["--docker-config", os.fspath(options.docker_config)]
    if options.platform:
        argv += ["--platform", options.platform]
    if options.http2:
        argv.append("--http2")
    argv += [
        "--retries", str(options.retries),
        "--timeout", repr(options.timeout),
        "--overall-timeout", repr(options.overall_timeout),
    ]
    return argv
