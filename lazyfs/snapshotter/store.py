"""The snapshotter's state: snapshots and lazily mounted images, in sqlite.

One database file under the snapshotter's root. Every change is one
transaction, so a crash leaves either the old or the new state, and a
restarted snapshotter finds every snapshot it had (and what to re-mount).

Snapshots follow containerd's model: an *active* snapshot is writable and
becomes *committed* (under a new name) when containerd commits it; a
*view* is a read-only active snapshot; only committed snapshots can be
parents. A *remote* snapshot is a committed one whose contents are a layer
mounted lazily (``image`` and ``layer`` say which); the snapshotter makes
those itself when containerd asks to prepare a layer it can fetch lazily.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lazyfs.errors import LazyErofsError

__all__ = [
    "AlreadyExists",
    "FailedPrecondition",
    "ImageRow",
    "InvalidArgument",
    "Kind",
    "NotFound",
    "Snapshot",
    "Store",
]


class SnapshotError(LazyErofsError):
    """A snapshot request that cannot be done as asked."""


class NotFound(SnapshotError):
    pass


class AlreadyExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass


class InvalidArgument(SnapshotError):
    pass


class Kind(enum.IntEnum):
    # Same numbers as containerd's snapshots.v1.Kind.
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Snapshot:
    id: int
    key: str
    parent: str  # "" for none
    kind: Kind
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    image: str | None = None  # manifest digest of the lazily mounted image (remote only)
    layer: str | None = None  # layer digest (remote only)
    size: int = 0  # bytes used, measured at commit
    inodes: int = 0

    @property
    def remote(self) -> bool:
        return self.layer is not None


@dataclass(frozen=True)
class ImageRow:
    digest: str  # manifest digest
    ref: str  # repository@digest, as the image daemon was started with
    dir: str  # where its FUSE tree is mounted


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    key     TEXT NOT NULL UNIQUE,
    parent  TEXT NOT NULL DEFAULT '',
    kind    INTEGER NOT NULL,
    labels  TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    image   TEXT,
    layer   TEXT,
    size    INTEGER NOT NULL DEFAULT 0,
    inodes  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY,
    ref    TEXT NOT NULL,
    dir    TEXT NOT NULL
);
PRAGMA user_version = 1;
"""
_COLUMNS = "id, key, parent, kind, labels, created, updated, image, layer, size, inodes"


def _snapshot(row: tuple) -> Snapshot:
    id_, key, parent, kind, labels, created, updated, image, layer, size, inodes = row
    return Snapshot(id_, key, parent, Kind(kind), json.loads(labels), created, updated, image, layer, size, inodes)


class Store:
    """Thread-safe: grpcio serves requests from a thread pool, and one lock
    around the connection keeps every read-check-write sequence atomic."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self._db.close()

    def _one(self, where: str, *args: object) -> Snapshot | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE {where}", args).fetchone()
        return _snapshot(row) if row else None

    def get(self, key: str) -> Snapshot:
        with self.lock:
            snap = self._one("key = ?", key)
        if snap is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return snap

    def find(self, key: str) -> Snapshot | None:
        with self.lock:
            return self._one("key = ?", key)

    def chain(self, key: str) -> list[Snapshot]:
        """``key`` and its ancestors, nearest first."""
        out = []
        with self.lock:
            while key:
                snap = self._one("key = ?", key)
                if snap is None:
                    raise NotFound(f"snapshot {key!r} (an ancestor) does not exist")
                out.append(snap)
                key = snap.parent
        return out

    def all(self) -> list[Snapshot]:
        with self.lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id").fetchall()
        return [_snapshot(r) for r in rows]

    def create(
        self,
        key: str,
        parent: str,
        kind: Kind,
        labels: Mapping[str, str],
        *,
        image: str | None = None,
        layer: str | None = None,
    ) -> Snapshot:
        if not key:
            raise InvalidArgument("a snapshot key must not be empty")
        now = time.time()
        with self.lock, self._transaction():
            if self._one("key = ?", key) is not None:
                raise AlreadyExists(f"snapshot {key!r} already exists")
            if parent:
                p = self._one("key = ?", parent)
                if p is None:
                    raise NotFound(f"parent snapshot {parent!r} does not exist")
                if p.kind != Kind.COMMITTED:
                    raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            cur = self._db.execute(
                "INSERT INTO snapshots (key, parent, kind, labels, created, updated, image, layer) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, parent, int(kind), json.dumps(dict(labels)), now, now, image, layer),
            )
            snap = self._one("id = ?", cur.lastrowid)
        assert snap is not None
        return snap

    def commit(self, key: str, name: str, labels: Mapping[str, str], size: int, inodes: int) -> Snapshot:
        with self.lock, self._transaction():
            snap = self._one("key = ?", key)
            if snap is None:
                raise NotFound(f"snapshot {key!r} does not exist")
            if snap.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is a {snap.kind.name.lower()} snapshot, not an active one")
            if self._one("key = ?", name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            merged = {**snap.labels, **labels}
            self._db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated = ?, size = ?, inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), json.dumps(merged), time.time(), size, inodes, snap.id),
            )
            out = self._one("id = ?", snap.id)
        assert out is not None
        return out

    def set_labels(self, key: str, labels: Mapping[str, str]) -> Snapshot:
        with self.lock, self._transaction():
            snap = self._one("key = ?", key)
            if snap is None:
                raise NotFound(f"snapshot {key!r} does not exist")
            self._db.execute(
                "UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                (json.dumps(dict(labels)), time.time(), snap.id),
            )
            out = self._one("id = ?", snap.id)
        assert out is not None
        return out

    def remove(self, key: str) -> Snapshot:
        with self.lock, self._transaction():
            snap = self._one("key = ?", key)
            if snap is None:
                raise NotFound(f"snapshot {key!r} does not exist")
            child = self._db.execute("SELECT key FROM snapshots WHERE parent = ? LIMIT 1", (key,)).fetchone()
            if child:
                raise FailedPrecondition(f"snapshot {key!r} has children (e.g. {child[0]!r}); remove them first")
            self._db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        return snap

    # -- lazily mounted images

    def images(self) -> list[ImageRow]:
        with self.lock:
            rows = self._db.execute("SELECT digest, ref, dir FROM images ORDER BY digest").fetchall()
        return [ImageRow(*r) for r in rows]

    def image(self, digest: str) -> ImageRow | None:
        with self.lock:
            row = self._db.execute("SELECT digest, ref, dir FROM images WHERE digest = ?", (digest,)).fetchone()
        return ImageRow(*row) if row else None

    def add_image(self, row: ImageRow) -> None:
        with self.lock:
            self._db.execute("INSERT OR REPLACE INTO images (digest, ref, dir) VALUES (?, ?, ?)", (row.digest, row.ref, row.dir))

    def drop_image(self, digest: str) -> None:
        with self.lock:
            self._db.execute("DELETE FROM images WHERE digest = ?", (digest,))

    def image_users(self, digest: str) -> int:
        with self.lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM snapshots WHERE image = ?", (digest,)).fetchone()
        return int(n)

    def _transaction(self) -> _Tx:
        return _Tx(self._db)


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")

