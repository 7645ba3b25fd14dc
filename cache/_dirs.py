"""Opening the cache's directories, and deciding whether to trust them.

The directory is the truth (there is no index), so it must be ours. The root,
``chunks/`` and ``tmp/`` must be owned by the effective user and writable by
nobody else, or the cache refuses to open (:class:`CacheError`): whoever can
write there can plant entries, and an entry's own digest cannot tell a
forgery from the real thing. Below the root everything goes through directory
descriptors opened with ``O_NOFOLLOW`` (``openat``, ``renameat``,
``unlinkat``, ``fstatat``), so a symbolic link planted anywhere inside is
never followed and nothing outside the root is read, written or removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Iterator

__all__ = [
    "CACHE_NAMES",
    "DIR_FLAGS",
    "DIR_MODE",
    "FILE_MODE",
    "PATH_FLAGS",
    "CacheDirs",
    "CacheError",
    "check_trusted",
    "open_dir",
    "open_lock",
    "open_root",
]

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
# What a cache root holds; a root holding anything else is someone's
# directory that was pointed at, and its mode is not ours to change.
# "tables" holds verified chunk tables kept by the mount (lazyfs.fetch.tables).
CACHE_NAMES = frozenset({"chunks", "tmp", "lock", "tables"})
# Never through a symlink: O_DIRECTORY|O_NOFOLLOW fails on one (ENOTDIR).
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A handle good only for *at() calls: cheaper than a readable open, and all
# the hot path needs of chunks/xx.
PATH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CacheError(Exception):
    """The cache directory cannot be used, or cannot be trusted.

    Raised when opening a cache whose root (or ``chunks/``, ``tmp/``, ``lock``)
    cannot be created or opened, is not a directory, is a symbolic link, is
    owned by another user, or is writable by group or others. The message
    names the path and the reason; callers show it as it is.
    """


def _refusal(path: str, exc: OSError) -> CacheError:
    """Turn a failed open of a cache directory into one clear sentence."""
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            is_link = stat.S_ISLNK(os.lstat(path).st_mode)
        except OSError:
            is_link = False
        if is_link:
            why = "is a symbolic link; refusing to follow it (give the real directory)"
        else:
            why = "is not a directory"
    else:
        why = f"cannot be opened: {exc.strerror or exc}"
    return CacheError(f"cache directory {path} {why}")


def open_root(root: str) -> int:
    """Open (creating if missing) the cache root, never through a link."""
    try:
        return os.open(root, DIR_FLAGS)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _refusal(root, exc) from exc
    try:
        # Intermediate directories get the usual mode; the cache itself 0700.
        os.makedirs(root, mode=DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cache directory {root} cannot be created: {exc.strerror or exc}") from exc
    try:
        return os.open(root, DIR_FLAGS)
    except OSError as exc:
        raise _refusal(root, exc) from exc


def open_dir(parent: int, name: str, display: str) -> int:
    """Open (creating 0700 if missing) directory ``name`` under ``parent``,
    never through a link, and check it is ours alone."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        try:
            os.mkdir(name, DIR_MODE, dir_fd=parent)
        except FileExistsError:
            pass  # another process made it meanwhile
        except OSError as exc:
            raise CacheError(f"cache directory {display} cannot be created: {exc.strerror or exc}") from exc
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise _refusal(display, exc) from exc
    except OSError as exc:
        raise _refusal(display, exc) from exc
    try:
        check_trusted(fd, display, tighten=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_trusted(fd: int, display: str, *, tighten: bool) -> None:
    """Refuse a directory someone else could write; make ours private."""
    st = os.fstat(fd)
    euid = os.geteuid()
    if st.st_uid != euid:
        raise CacheError(
            f"cache directory {display} is owned by uid {st.st_uid}, not by this user (uid {euid}); "
            "refusing to trust entries someone else could have written"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = {0o020: "its group", 0o002: "others", 0o022: "its group and others"}[mode & 0o022]
        raise CacheError(
            f"cache directory {display} is writable by {who} (mode {mode:04o}), who could plant entries; "
            "refusing it (check its contents, then chmod 0700 it, or use another directory)"
        )
    if mode & 0o077 and tighten:
        try:
            os.fchmod(fd, DIR_MODE)
        except OSError as exc:
            log.warning(
                "chunk cache: %s has mode %04o (other users can read cached chunks) and cannot be tightened: %s",
                display,
                mode,
                exc.strerror or exc,
            )
        else:
            log.warning(
                "chunk cache: tightened %s from mode %04o to 0700 so other users cannot read cached chunks",
                display,
                mode,
            )


def open_lock(root: int, display: str) -> int:
    """Open the root's ``lock`` file (the flock target of eviction scans)."""
    # O_NONBLOCK: a FIFO or device in its place must not hang the open
    # (flock's blocking is its own, unaffected).
    base = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        try:
            fd = os.open("lock", os.O_RDWR | os.O_CREAT | base, FILE_MODE, dir_fd=root)
        except OSError as exc:
            # A read-only cache (a pre-seeded image, a full remount) still
            # serves hits; flock works on a read-only descriptor on local
            # filesystems.
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            fd = os.open("lock", os.O_RDONLY | base, dir_fd=root)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CacheError(f"cache lock file {display} is a symbolic link; refusing to follow it") from exc
        raise CacheError(f"cache lock file {display} cannot be opened: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CacheError(f"cache lock file {display} is not a regular file")
    return fd


class CacheDirs:
    """The directory handles of one open cache: the root, ``chunks/``,
    ``tmp/`` and the ``lock`` file, each opened once and checked.

    Thread-safe. Handles replaced after ``tmp/`` or ``chunks/`` vanished
    under us (:meth:`reopen`) stay open until :meth:`release`, so a thread
    still using one never sees its number reused for another file. After
    :meth:`release` every handle is -1 and every call fails or misses.

    Raises:
        CacheError: a directory cannot be created or opened, or is not safe
            to trust (see the module docstring).
    """

    def __init__(self, root: str) -> None:
        self.display = root
        self.root = self.chunks = self.tmp = self.lock = -1
        self._retired: list[int] = []
        # Guards the handles (never held over I/O) and the warned-paths set.
        self._mutex = threading.Lock()
        self._warned_paths: set[str] = set()
        try:
            self.root = open_root(root)
            # listdir on a dup of the fd: nothing here follows a link.
            foreign = set(os.listdir(self.root)) - CACHE_NAMES
            check_trusted(self.root, root, tighten=not foreign)
            if foreign and os.fstat(self.root).st_mode & 0o077:
                log.info(
                    "chunk cache %s also holds other files: its mode is left alone (chunks/ and tmp/ are 0700)",
                    root,
                )
            self.chunks = open_dir(self.root, "chunks", f"{root}/chunks")
            self.tmp = open_dir(self.root, "tmp", f"{root}/tmp")
            self.lock = open_lock(self.root, f"{root}/lock")
        except BaseException:
            self.release()
            raise

    @property
    def closed(self) -> bool:
        return self.lock < 0

    def sub(self, prefix: str) -> int | None:
        """A handle on ``chunks/<prefix>`` for *at() calls, or None when it
        does not exist, is not a real directory, or the cache is closed."""
        try:
            return os.open(prefix, PATH_FLAGS, dir_fd=self.chunks)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                self.warn_path(f"{self.display}/chunks/{prefix}", "is not a directory (a symbolic link?): ignored")
            else:
                log.debug("chunk cache %s: cannot open chunks/%s: %s", self.display, prefix, exc)
            return None

    def make_sub(self, prefix: str) -> int:
        """Like :meth:`sub`, creating the directory (0700) when missing."""
        chunks = self.chunks
        try:
            return os.open(prefix, PATH_FLAGS, dir_fd=chunks)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                self.warn_path(
                    f"{self.display}/chunks/{prefix}", "is not a directory (a symbolic link?): not writing into it"
                )
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(prefix, DIR_MODE, dir_fd=chunks)
        return os.open(prefix, PATH_FLAGS, dir_fd=chunks)

    def reopen(self) -> None:
        """Open ``chunks/`` and ``tmp/`` afresh (after an rm -rf of the cache)."""
        chunks = open_dir(self.root, "chunks", f"{self.display}/chunks")
        try:
            tmp = open_dir(self.root, "tmp", f"{self.display}/tmp")
        except BaseException:
            os.close(chunks)
            raise
        with self._mutex:
            if self.root < 0:  # closed meanwhile
                os.close(chunks)
                os.close(tmp)
                return
            self._retired += [self.chunks, self.tmp]
            self.chunks, self.tmp = chunks, tmp

    @contextlib.contextmanager
    def flocked(self) -> Iterator[None]:
        """Hold the cache's flock: one scan at a time across processes."""
        fd = self.lock
        if fd < 0:
            raise ValueError("chunk cache is closed")
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def warn_path(self, path: str, what: str) -> None:
        """Warn once per path (a planted link is reported, not re-reported)."""
        with self._mutex:
            first = path not in self._warned_paths
            self._warned_paths.add(path)
        if first:
            log.warning("chunk cache: %s %s", path, what)

    def release(self) -> None:
        """Close every handle. Idempotent."""
        with self._mutex:
            fds = [self.lock, self.chunks, self.tmp, self.root, *self._retired]
            self.lock = self.chunks = self.tmp = self.root = -1
            self._retired = []
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
