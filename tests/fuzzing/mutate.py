"""Mutators: byte-level (any format), JSON-tree (documents) and tar-aware.

Fast on purpose: each mutation is a handful of slice operations, so the
parsers, not the mutator, set the rate. ``rng`` is a ``random.Random`` so a
run is reproducible from its seed.
"""

from __future__ import annotations

import copy
import json
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Mutator", "byte_mutator", "json_mutator", "tar_mutator", "text_mutator"]

Mutator = Callable[[bytes, Sequence[bytes], random.Random], bytes]

# Values that sit on the edges parsers check: zero, one, signs, widths.
_INTERESTING = (
    0, 1, 2, 7, 8, 9, 16, 23, 64, 72, 127, 128, 255, 256, 511, 512, 4095, 4096, 4097,
    0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32,
    (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0x184D2A50, 0x184D2A5F, 0xCDE4EC67, 0xFD2FB528,
    32 << 20, (32 << 20) + 1, 64 << 20,
)  # fmt: skip
_WIDTHS = ((1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q"), (4, ">I"), (8, ">Q"))


def _pack(value: int, width: int, fmt: str) -> bytes:
    return struct.pack(fmt, value & ((1 << (8 * width)) - 1))


def _one(data: bytearray, others: Sequence[bytes], rng: random.Random, tokens: Sequence[bytes]) -> None:
    n = len(data)
    op = rng.randrange(12)
    if op == 0 and n:  # flip a bit
        i = rng.randrange(n)
        data[i] ^= 1 << rng.randrange(8)
    elif op == 1 and n:  # set a byte
        data[rng.randrange(n)] = rng.choice((0, 0xFF, 0x7F, 0x80, 1, rng.randrange(256)))
    elif op in (2, 3) and n:  # an edge integer over a field
        width, fmt = rng.choice(_WIDTHS)
        v = rng.choice(_INTERESTING)
        v = rng.choice((v, v - 1, v + 1, n, rng.getrandbits(8 * width), -v))
        i = rng.randrange(max(1, n - width + 1))
        data[i : i + width] = _pack(v, width, fmt)
    elif op == 4:  # insert random bytes
        i = rng.randrange(n + 1)
        data[i:i] = rng.randbytes(rng.choice((1, 2, 4, 8, rng.randrange(1, 64))))
    elif op == 5:  # insert a run of one byte (long runs find quadratic code and deep nesting)
        i = rng.randrange(n + 1)
        length = rng.choice((16, 256, 4096, rng.randrange(1, 100_000)))
        data[i:i] = bytes([rng.choice((0, 0x20, 0x5B, 0x7B, 0x2C, 0x3D, 0x22, 0x61, rng.randrange(256)))]) * length
    elif op == 6 and n:  # delete a range
        i = rng.randrange(n)
        del data[i : i + rng.choice((1, 2, 4, 8, rng.randrange(1, n + 1)))]
    elif op == 7 and n:  # copy a range elsewhere
        i = rng.randrange(n)
        piece = data[i : i + rng.randrange(1, min(n - i, 512) + 1)]
        j = rng.randrange(n + 1)
        if rng.random() < 0.5:
            data[j:j] = piece
        else:
            data[j : j + len(piece)] = piece
    elif op == 8 and n:  # truncate
        del data[rng.randrange(n) :]
    elif op == 9 and others:  # splice with another corpus entry
        other = rng.choice(others)
        if other:
            i, j = rng.randrange(n + 1), rng.randrange(len(other))
            data[i:] = other[j:] if rng.random() < 0.5 else other[j : j + rng.randrange(1, 256)] + data[i:]
    elif op in (10, 11) and tokens:  # a dictionary token, inserted or over bytes
        tok = rng.choice(tokens)
        i = rng.randrange(n + 1)
        if op == 10:
            data[i:i] = tok
        else:
            data[i : i + len(tok)] = tok


def byte_mutator(tokens: Sequence[bytes] = (), max_len: int = 1 << 20) -> Mutator:
    """Stack 1-4 byte-level mutations, result capped at ``max_len``."""

    def mutate(seed: bytes, others: Sequence[bytes], rng: random.Random) -> bytes:
        data = bytearray(seed)
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            _one(data, others, rng, tokens)
        return bytes(data[:max_len])

    return mutate


def text_mutator(tokens: Sequence[bytes], max_len: int = 1 << 16) -> Mutator:
    """Like :func:`byte_mutator`, but half the time token-only edits (keeps text textual)."""
    raw = byte_mutator(tokens, max_len)

    def mutate(seed: bytes, others: Sequence[bytes], rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            return raw(seed, others, rng)
        data = bytearray(seed)
        for _ in range(rng.randrange(1, 4)):
            _one(data, others, rng, tokens) if rng.random() < 0.3 else _token_edit(data, rng, tokens)
        return bytes(data[:max_len])

    return mutate


def _token_edit(data: bytearray, rng: random.Random, tokens: Sequence[bytes]) -> None:
    tok = rng.choice(tokens) * rng.choice((1, 1, 1, 2, 3, 50, 1000))
    i = rng.randrange(len(data) + 1)
    if rng.random() < 0.6:
        data[i:i] = tok
    else:
        j = min(len(data), i + rng.randrange(1, 16))
        data[i:j] = tok


# ---------------------------------------------------------------- JSON

_DEEP = "\x00DEEP\x00"


def _random_value(rng: random.Random, keys: Sequence[str], strings: Sequence[str]) -> Any:
    r = rng.randrange(16)
    if r == 0:
        return None
    if r == 1:
        return rng.choice((True, False))
    if r == 2:
        return rng.choice((0, -1, 1, 2, 2**31, 2**53 + 1, 2**63, 2**64, 10**30, -(10**30), 10**400))
    if r == 3:
        return rng.choice((0.5, -0.0, 1e308, float("inf"), float("nan"), 2.0))
    if r == 4:
        return rng.choice(("", "0", "-1", "01", "1e3", " 1", "+1", "9" * 20, "9" * 5000))
    if r == 5:
        return rng.choice(strings) if strings else "x"
    if r == 6:
        return "x" * rng.choice((1, 255, 256, 4096, 4096, 4096, 100_000))
    if r == 7:
        return []
    if r == 8:
        return {}
    if r == 9:
        return [_random_value(rng, keys, strings) for _ in range(rng.randrange(1, 4))]
    if r == 10:
        return {rng.choice(keys) if keys else "k": _random_value(rng, keys, strings)}
    if r == 11:
        return _DEEP  # replaced by deep nesting in the text
    if r == 12:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 8))).encode(
            "utf-8", "surrogatepass"
        ).decode("utf-8", "replace")
    if r == 13:
        return "sha256:" + rng.randbytes(32).hex()
    if r == 14:
        return "sha512:" + rng.randbytes(64).hex()
    return rng.choice(("\ud800", "a\x00b", "\\", '"', "/../..", "%2e%2e"))


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _nodes(v, (*path, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def json_mutator(keys: Sequence[str] = (), strings: Sequence[str] = (), max_len: int = 1 << 20) -> Mutator:
    """Edit the decoded tree (replace, delete, add, copy a node), re-encode;
    one time in five, byte-level edits on top. Non-JSON input gets byte edits."""
    tokens = [b'"', b",", b":", b"{", b"}", b"[", b"]", b"null", b"1e999", b"-0", b"\\u0000", b"\xff"]
    tokens += [json.dumps(k).encode() for k in keys]
    raw = byte_mutator(tokens, max_len)

    def mutate(seed: bytes, others: Sequence[bytes], rng: random.Random) -> bytes:
        try:
            doc = json.loads(seed)
        except (ValueError, RecursionError):
            return raw(seed, others, rng)
        for _ in range(rng.randrange(1, 4)):
            paths = _nodes(doc)
            path = rng.choice(paths)
            r = rng.randrange(5)
            if not path or r == 0:
                new = _random_value(rng, keys, strings)
                if not path:
                    doc = new if rng.random() < 0.2 else doc
                    continue
            elif r == 1:  # copy another node of this or another document here
                new = copy.deepcopy(_get(doc, rng.choice(paths)))  # no cycles
            else:
                new = _random_value(rng, keys, strings)
            parent = _get(doc, path[:-1])
            if r == 2 and isinstance(parent, dict):
                del parent[path[-1]]
            elif r == 3 and isinstance(parent, dict):
                parent[rng.choice(keys) if keys else "k"] = new
            else:
                parent[path[-1]] = new
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5)
        if _DEEP in json.dumps(_DEEP) and json.dumps(_DEEP) in text:
            depth = rng.choice((50, 1000, 1000, 1000, 5000, 100_000))  # the stack gives out near 1000
            opener, closer = rng.choice((("[", "]"), ('{"a":', "}")))
            text = text.replace(json.dumps(_DEEP), opener * depth + "1" + closer * depth, 1)
            text = text.replace(json.dumps(_DEEP), "null")
        out = text.encode("utf-8", "surrogatepass")
        if rng.random() < 0.2:
            out = raw(out, others, rng)
        return out[:max_len]

    return mutate


# ---------------------------------------------------------------- tar

_PAX_KEYS = (
    b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime", b"uname", b"gname", b"hdrcharset",
    b"GNU.sparse.map", b"GNU.sparse.size", b"GNU.sparse.realsize", b"GNU.sparse.numblocks",
    b"GNU.sparse.offset", b"GNU.sparse.numbytes", b"GNU.sparse.major", b"GNU.sparse.minor",
    b"GNU.sparse.name", b"SCHILY.xattr.user.a", b"SCHILY.xattr.trusted.overlay.opaque",
    b"SCHILY.xattr.security.capability", b"LIBARCHIVE.xattr.user.%41", b"SCHILY.devmajor",
)  # fmt: skip
_PAX_VALUES = (
    b"", b"0", b"-1", b"1.5", b"99999999999999999999", b"1e9", b"x", b"../../outside/x",
    b"/etc/passwd", b"0,1,2", b"0,10,4096,10", b"a,b", b"1,0", b"ISO-IR 10646 2000 UTF-8",
    b"BINARY", b"====", b"\xff\xfe", b"a/../../b", b".wh.x", b".wh..wh..opq",
)  # fmt: skip
_TAR_TOKENS = (
    b"../", b"/", b".wh.", b".wh..wh..opq", b"ustar\x0000", b"ustar  \x00", b"\x80", b"\xff",
    b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"g", b"x", b"L", b"K", b"S", b"V", b"M",
    b"77777777777", b"00000000000",
)  # fmt: skip


def _octal_field(data: bytes, off: int, width: int) -> int | None:
    raw = data[off : off + width].split(b"\0", 1)[0].strip()
    try:
        return int(raw, 8) if raw else 0
    except ValueError:
        return None


def fix_tar_checksums(data: bytearray) -> None:
    """Recompute the checksum of every header reachable by following size fields,
    so mutations reach the parser behind the checksum check."""
    off = 0
    while off + 512 <= len(data):
        block = data[off : off + 512]
        if not block.strip(b"\0"):
            break
        block[148:156] = b" " * 8
        data[off + 148 : off + 156] = b"%06o\0 " % (sum(block) & 0o777777)
        size = _octal_field(data, off + 124, 12)
        if size is None or size > len(data):
            break
        off += 512 + -(-size // 512) * 512


def tar_mutator(max_len: int = 1 << 20) -> Mutator:
    """Header-field edits with checksums fixed, PAX records, plus byte edits."""
    raw = byte_mutator(_TAR_TOKENS, max_len)

    def mutate(seed: bytes, others: Sequence[bytes], rng: random.Random) -> bytes:
        data = bytearray(seed)
        headers = []
        off = 0
        while off + 512 <= len(data) and data[off : off + 512].strip(b"\0"):
            headers.append(off)
            size = _octal_field(data, off + 124, 12)
            if size is None:
                break
            off += 512 + -(-size // 512) * 512
        for _ in range(rng.randrange(1, 4)):
            r = rng.random()
            if headers and r < 0.45:  # a header field
                h = rng.choice(headers)
                field_off, width = rng.choice(
                    ((0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (156, 1),
                     (157, 100), (257, 8), (329, 8), (337, 8), (345, 155))
                )  # fmt: skip
                choice = rng.randrange(5)
                if choice == 0:
                    value = b"%o" % rng.choice(_INTERESTING)
                elif choice == 1:
                    value = b"\x80" + rng.randbytes(width - 1)  # base-256 number
                elif choice == 2:
                    value = rng.choice(_TAR_TOKENS) * rng.randrange(1, 30)
                elif choice == 3:
                    value = rng.choice(_PAX_VALUES)
                else:
                    value = rng.randbytes(width)
                value = value[:width].ljust(width, b"\0") if rng.random() < 0.7 else value[:width]
                data[h + field_off : h + field_off + len(value)] = value
            elif headers and r < 0.65:  # a PAX record before an entry
                h = rng.choice(headers)
                recs = b""
                for _ in range(rng.randrange(1, 4)):
                    body = b" " + rng.choice(_PAX_KEYS) + b"=" + rng.choice(_PAX_VALUES) + b"\n"
                    n = len(body) + len(str(len(body)))
                    n += len(str(n)) - len(str(len(body)))
                    recs += str(n).encode() + body if rng.random() < 0.9 else str(rng.randrange(999)).encode() + body
                hdr = bytearray(512)
                hdr[0:9] = b"PaxHeader"
                hdr[100:108] = b"0000644\0"
                hdr[124:136] = b"%011o\0" % len(recs)
                hdr[136:148] = b"00000000000\0"
                hdr[156:157] = rng.choice((b"x", b"g"))
                hdr[257:265] = b"ustar\x0000"
                data[h:h] = bytes(hdr) + recs + bytes(-len(recs) % 512)
            else:
                data = bytearray(raw(bytes(data), others, rng))
        if rng.random() < 0.9:
            fix_tar_checksums(data)
        return bytes(data[:max_len])

    return mutate
