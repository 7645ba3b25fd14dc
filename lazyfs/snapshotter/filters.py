"""containerd's filter expressions, as ``List`` receives them.

A request carries a list of filters, any of which may match (OR); each is a
comma-separated list of selectors that must all match (AND). A selector is
a field path, optionally followed by an operator (``==``, ``!=`` or ``~=``,
a regular expression) and a value; a field path alone means "is present".
Field names and values may be double-quoted (Go string syntax), which is how
containerd sends label keys with dots: ``labels."containerd.io/snapshot.ref"==sha256:...``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping, Sequence

from lazyfs.snapshotter.store import InvalidArgument

__all__ = ["Matcher", "parse_filters"]

# Fields of a snapshot a filter can name, given as a lookup from a path.
Fields = Callable[[list[str]], str | None]
Matcher = Callable[[Fields], bool]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<quoted>"(?:[^"\\]|\\.)*")
      | (?P<op>==|!=|~=)
      | (?P<punct>[.,])
      | (?P<word>[^\s.,=!~"]+(?:[=!~](?![=])[^\s.,=!~"]*)*)
    )""",
    re.VERBOSE,
)
# A bare value runs to the next comma (it may hold dots, colons, slashes).
_VALUE = re.compile(r"\s*([^\s,]*)")


def _unquote(text: str, where: str) -> str:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise InvalidArgument(f"filter {where!r}: bad quoted string {text}") from None
    if not isinstance(value, str):
        raise InvalidArgument(f"filter {where!r}: bad quoted string {text}")
    return value


def _parse_one(expr: str) -> Matcher:
    pos = 0
    selectors: list[tuple[list[str], str | None, str | None]] = []
    while True:
        path: list[str] = []
        op = value = None
        while True:  # field ("." field)*
            m = _TOKEN.match(expr, pos)
            if not m or not (m.group("word") or m.group("quoted")):
                raise InvalidArgument(f"filter {expr!r}: expected a field name at column {pos + 1}")
            path.append(_unquote(m.group("quoted"), expr) if m.group("quoted") else m.group("word"))
            pos = m.end()
            m = _TOKEN.match(expr, pos)
            if m and m.group("punct") == ".":
                pos = m.end()
                continue
            break
        m = _TOKEN.match(expr, pos)
        if m and m.group("op"):
            op = m.group("op")
            pos = m.end()
            rest = expr[pos:].lstrip()
            if rest.startswith('"'):
                q = _TOKEN.match(expr, pos)
                if not q or not q.group("quoted"):
                    raise InvalidArgument(f"filter {expr!r}: unterminated quoted value")
                value = _unquote(q.group("quoted"), expr)
                pos = q.end()
            else:
                v = _VALUE.match(expr, pos)
                assert v is not None
                value = v.group(1)
                pos = v.end()
            if op == "~=":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise InvalidArgument(f"filter {expr!r}: bad regular expression {value!r}: {exc}") from None
        selectors.append((path, op, value))
        m = _TOKEN.match(expr, pos)
        if m is None or expr[pos:].strip() == "":
            break
        if m.group("punct") != ",":
            raise InvalidArgument(f"filter {expr!r}: expected ',' at column {pos + 1}")
        pos = m.end()

    def match(fields: Fields) -> bool:
        for path, op, value in selectors:
            got = fields(path)
            if op is None:
                ok = got is not None
            elif op == "==":
                ok = got == value
            elif op == "!=":
                ok = got != value
            else:
                ok = got is not None and re.search(value or "", got) is not None
            if not ok:
                return False
        return True

    return match


def parse_filters(filters: Sequence[str]) -> Matcher:
    """One matcher for the whole list (no filters: everything matches)."""
    matchers = [_parse_one(f) for f in filters if f.strip()]
    if not matchers:
        return lambda _fields: True
    return lambda fields: any(m(fields) for m in matchers)


def snapshot_fields(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> Fields:
    """The fields containerd lets a snapshot filter name."""

    def lookup(path: list[str]) -> str | None:
        head, rest = path[0], path[1:]
        if head == "labels" and rest:
            return labels.get(".".join(rest))
        if rest:
            return None
        return {"name": name, "parent": parent, "kind": kind}.get(head)

    return lookup
