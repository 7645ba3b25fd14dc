"""Process life of a mount: resolve, open layers, serve FUSE, tear down.

``run_mount`` either serves in the foreground or forks a daemon that reports
readiness (or the reason it failed) back to the waiting parent through a
pipe, so ``lazyerofs mount`` returns only once the mount works, and leaves
nothing mounted when it does not. SIGTERM/SIGINT unmount cleanly: kernel
mounts first (they read through FUSE), then the FUSE mount.

Runtime state (pid and start time, kernel mounts) of the mount at DIR lives
in ``/run/lazyerofs/<id>/state.json`` so ``lazyerofs umount DIR`` can clean up
even after the daemon was killed. ``<id>`` hashes DIR's real path. The run
and state directories are 0700 and the state file and log 0600: the
per-layer EROFS mounts sit in there, and a URL's secrets never go in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import trio

from lazyfs.errors import FetchError, FormatError, IntegrityError, LazyErofsError, MountError
from lazyfs.fetch.files import (
    DEFAULT_MERGE_BYTES,
    DEFAULT_READ_TIMEOUT,
    Demand,
    LinkEstimate,
    PlainLayer,
    SeekableLayer,
    charge_table,
)
from lazyfs.format import seekable
from lazyfs.mount import kernel as kmount

__all__ = [
    "FUSE_TYPE",
    "MountConfig",
    "is_our_daemon",
    "load_state",
    "redact_url",
    "run_mount",
    "state_dir",
    "teardown",
]

log = logging.getLogger(__name__)

RUN_DIR = Path(os.environ.get("LAZYEROFS_RUN_DIR", "/run/lazyerofs"))
# What /proc/self/mountinfo calls our FUSE mounts (fsname/subtype below).
FUSE_TYPE = "fuse.lazyerofs"
# Libraries that log request URLs (signed queries) or headers at INFO/DEBUG.
_CHATTY_LOGGERS = ("httpx", "httpcore", "hpack", "h2")


@dataclass
class MountConfig:
    ref: str
    mountpoint: str
    descriptor_file: str | None = None
    rootfs: str | None = None
    cache_dir: str | None = None
    cache_size: int | None = None
    memory_cache: int | None = None
    verify_at_rest: bool = False
    read_timeout: float = DEFAULT_READ_TIMEOUT
    merge_bytes: int = DEFAULT_MERGE_BYTES
    insecure_skip_verify: bool = False
    strict: bool = False
    foreground: bool = False
    log_file: str | None = None
    log_level: str = "info"
    registry: Any = None  # lazyfs.oci.client.RegistryOptions
    touch_log: str | None = None  # write touched frames here at exit (benchmarks)
    prefetch: bool = False
    readahead_kb: int = 4096
    fetch_ahead: int = 0
    loop: bool = False
    allow_other: bool = False  # let every local user read the FUSE tree
    rootfs_allow_suid_dev: bool = False  # honour setuid bits and device nodes in the rootfs
    nonempty: bool = False  # mount over a directory that has entries


def mount_id(mountpoint: str) -> str:
    # The real path: a mount made through a symlink is the same mount.
    return hashlib.sha256(kmount.real_path(mountpoint).encode()).hexdigest()[:16]


def state_dir(mountpoint: str) -> Path:
    return RUN_DIR / mount_id(mountpoint)


def redact_url(ref: str) -> str:
    """``ref`` fit for a log or state file: a URL loses its userinfo, query
    and fragment (signed storage URLs carry their secret there)."""
    if "://" not in ref:
        return ref
    try:
        u = urlsplit(ref)
        netloc = u.netloc.rpartition("@")[2]
    except ValueError:
        return "<unparsable URL>"
    return urlunsplit((u.scheme, netloc, u.path, "", ""))


def _private_dir(path: Path) -> None:
    """Make ``path`` a directory only its owner (us) can enter: 0700, ours,
    not a symlink. A looser mode is tightened; another owner is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{path} is not a directory (a symlink?); remove it")
    if st.st_uid != os.geteuid():
        raise MountError(f"{path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); refusing to use it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700, follow_symlinks=False)


def _open_private(path: str, flags: int) -> int:
    """Open ``path`` for writing, mode 0600, never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    except BaseException:
        os.close(fd)
        raise
    return fd


def load_state(mountpoint: str) -> dict[str, Any] | None:
    try:
        fd = os.open(state_dir(mountpoint) / "state.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd) as f:
        try:
            state = json.load(f)
        except json.JSONDecodeError:
            return None
    return state if isinstance(state, dict) else None


def _save_state(mountpoint: str, state: dict[str, Any]) -> None:
    _private_dir(RUN_DIR)
    d = state_dir(mountpoint)
    _private_dir(d)
    tmp = d / "state.json.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    with os.fdopen(_open_private(str(tmp), os.O_EXCL), "w") as f:
        f.write(json.dumps(state, indent=2))
    tmp.replace(d / "state.json")


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid it
    names one process, so a pid reused by another one is told apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data.rpartition(b")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_our_daemon(state: dict[str, Any]) -> bool:
    """True if the state's pid is still the daemon that wrote it: same start
    time, and a lazyerofs command line."""
    pid, started = state.get("pid"), state.get("start_time")
    if not isinstance(pid, int) or pid <= 0 or not isinstance(started, int):
        return False
    if process_start_time(pid) != started:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"lazyerofs" in cmdline or b"lazyfs" in cmdline


def teardown(mountpoint: str, state: dict[str, Any] | None) -> None:
    """Undo kernel mounts recorded in ``state`` (rootfs, then EROFS, then loops).

    Only what is still the kind of mount we made is taken down: an overlay
    (or bind of an EROFS layer) at the rootfs, EROFS inside our state dir.
    """
    if not state:
        return
    errors = []
    rootfs = state.get("rootfs")
    if isinstance(rootfs, str):
        found = kmount.find_mount(rootfs)
        if found is not None and found[0] not in ("overlay", "erofs"):
            errors.append(f"{rootfs}: the mount there is {found[0]}, not our rootfs; left alone")
        elif found is not None:
            try:
                kmount.umount(rootfs)
            except MountError as exc:
                errors.append(str(exc))
    ours = str(state_dir(mountpoint)) + "/"
    for m in reversed(state.get("kernel_mounts", [])):
        target = m.get("target") if isinstance(m, dict) else None
        if not isinstance(target, str) or not target.startswith(ours):
            errors.append(f"{target!r}: not inside {ours}; left alone")
            continue
        found = kmount.find_mount(target)
        if found is not None and found[0] != "erofs":
            errors.append(f"{target}: the mount there is {found[0]}, not EROFS; left alone")
            continue
        try:
            kmount.umount(target)
        except MountError as exc:
            errors.append(str(exc))
        if m.get("loop"):
            kmount.detach_loop(m["loop"])
        with contextlib.suppress(OSError):
            os.rmdir(m["target"])
    if errors:
        raise MountError("; ".join(errors))


# --------------------------------------------------------------------------
# Building the layers


@dataclass
class _Image:
    manifest: bytes
    layers: list[tuple[Any, str, bytes | None]] = field(default_factory=list)
    objects: list[Any] = field(default_factory=list)


async def _open_layer(
    cfg: MountConfig,
    index: int,
    desc_dict: dict[str, Any],
    source: Any,
    cache: Any,
    limiter: trio.CapacityLimiter,
    demand: Demand,
    link: LinkEstimate,
) -> tuple[Any, bytes | None] | None:
    name = f"layer {index} ({desc_dict.get('digest', '?')[:19]})"
    desc = seekable.parse_descriptor(desc_dict, name=name)
    if desc.media_type == seekable.MEDIA_TYPE_PLAIN:
        if source.size != desc.size:
            raise IntegrityError(f"{name}: registry says the blob is {source.size} bytes, descriptor {desc.size}")
        # Verified whole before its first byte is served (see PlainLayer),
        # with or without --insecure-skip-verify: its digest is a chain.
        log.info("%s: plain EROFS layer: the whole blob is fetched and checked on first read", name)
        spool = getattr(cache, "root", None)
        return PlainLayer(name, desc, source, read_timeout=cfg.read_timeout, spool_dir=spool), None
    if not desc.seekable:
        if cfg.strict:
            raise FormatError(f"{name}: media type {desc.media_type} is not an EROFS layer (--strict)")
        log.warning("%s: skipping layer of media type %s", name, desc.media_type)
        return None
    assert desc.table_offset is not None
    if source.size != desc.size:
        raise IntegrityError(f"{name}: registry says the blob is {source.size} bytes, descriptor {desc.size}")
    try:
        with trio.fail_after(cfg.read_timeout):
            data = await source.read(desc.table_offset, seekable.table_read_size(desc))
    except trio.TooSlowError as exc:
        raise FetchError(f"{name}: chunk table not fetched within {cfg.read_timeout:g}s") from exc
    # --insecure-skip-verify only lets through a layer whose chain cannot be
    # established; a present chunk_digest and present frame checksums are
    # always checked (SeekableLayer decides that from the table itself).
    table = seekable.read_chunk_table(data, desc, verify=not cfg.insecure_skip_verify, name=name)
    del data
    charge_table(name, table)
    verified = desc.chunk_digest is not None and table.hash_algo == seekable.HASH_SHA512
    if not verified:
        missing = "no frame checksums (hash_algo 0)" if table.hash_algo == seekable.HASH_NONE else "no chunk_digest"
        log.warning("%s: INSECURE: %s, its frames are served unverified (--insecure-skip-verify)", name, missing)
    verity = None
    sidecar = None
    if desc.verity_offset is not None:
        from lazyfs.fetch.verity_tail import open_verity_tail

        verity, sidecar = await open_verity_tail(name, desc, table.uncompressed_size, source)
    layer = SeekableLayer(
        name,
        desc,
        table,
        source,
        cache,
        limiter=limiter,
        read_timeout=cfg.read_timeout,
        merge_bytes=cfg.merge_bytes,
        verified=verified,
        verity=verity,
        demand=demand,
        fetch_ahead=cfg.fetch_ahead,
        link=link,
    )
    return layer, sidecar


async def _open_image(cfg: MountConfig, stack: contextlib.AsyncExitStack, cache: Any, limiter: trio.CapacityLimiter) -> _Image:
    if cfg.descriptor_file:
        with open(cfg.descriptor_file) as f:
            try:
                desc = json.load(f)
            except json.JSONDecodeError as exc:
                raise FormatError(f"{cfg.descriptor_file}: not valid JSON: {exc}") from exc
        parsed = seekable.parse_descriptor(desc, name=cfg.descriptor_file)
        if os.path.exists(cfg.ref):
            from lazyfs.fetch.source import FileSource

            source = FileSource(cfg.ref)
            stack.callback(source.close)
        else:
            from lazyfs.oci import client as registry

            source = await stack.enter_async_context(
                registry.open_url_blob(cfg.ref, size=parsed.size, options=cfg.registry or registry.RegistryOptions())
            )
        manifest = json.dumps({"schemaVersion": 2, "layers": [desc]}, indent=2).encode()
        descs = [(desc, source)]
    else:
        from lazyfs.oci import client as registry

        client = await stack.enter_async_context(registry.RegistryClient(cfg.registry or registry.RegistryOptions()))
        ref = registry.parse_reference(cfg.ref)
        image = await client.resolve(ref)
        manifest = image.manifest_bytes
        descs = [(d, client.blob(ref, d)) for d in image.layers]
    out = _Image(manifest)
    demand = Demand()
    link = LinkEstimate()  # one network path for all layers
    opened: list[Any] = [None] * len(descs)

    async def open_one(i: int) -> None:
        opened[i] = await _open_layer(cfg, i, descs[i][0], descs[i][1], cache, limiter, demand, link)

    # One round trip for all chunk tables, not one per layer.
    async with trio.open_nursery() as nursery:
        for i in range(len(descs)):
            nursery.start_soon(open_one, i)
    for (desc, _), result in zip(descs, opened, strict=True):
        if result is None:
            continue
        layer, sidecar = result
        out.layers.append((layer, desc["digest"], sidecar))
        out.objects.append(layer)
    if not out.layers:
        raise FormatError(f"{redact_url(cfg.ref)}: no EROFS layers to mount")
    return out


def _stats(image: _Image, cache: Any) -> dict[str, Any]:
    keys = ("bytes_fetched", "requests", "frames_fetched", "cache_hits", "cache_misses", "verify_failures", "read_errors")
    total = dict.fromkeys(keys, 0)
    per_layer = []
    for i, layer in enumerate(image.objects):
        s = layer.stats
        entry: dict[str, Any] = {"index": i, "digest": layer.desc.digest, "size": layer.size}
        for k in keys:
            total[k] += getattr(s, k)
            entry[k] = getattr(s, k)
        if isinstance(layer, SeekableLayer):
            entry["frames_present"] = layer.frames_present
            entry["frames_total"] = layer.table.frame_count
            entry["blob_size"] = layer.desc.size
        entry["verified"] = layer.verified
        per_layer.append(entry)
    out: dict[str, Any] = dict(total)
    out["layers"] = per_layer
    with contextlib.suppress(Exception):
        out["cache"] = asdict(cache.statistics())
    return out


# --------------------------------------------------------------------------
# Serving


async def _serve(cfg: MountConfig, notify: Any) -> None:
    import pyfuse3

    from cache import CacheError, ChunkCache, default_cache_dir
    from lazyfs.mount.fuse import LazyFS

    kwargs: dict[str, Any] = {"verify_at_rest": cfg.verify_at_rest}
    if cfg.cache_size is not None:
        kwargs["max_bytes"] = cfg.cache_size
    if cfg.memory_cache is not None:
        kwargs["memory_bytes"] = cfg.memory_cache
    try:
        cache = ChunkCache(cfg.cache_dir or default_cache_dir(), **kwargs)
    except CacheError as exc:
        raise LazyErofsError(str(exc)) from exc
    # Two cores: a few threads keep both busy hashing and decompressing.
    limiter = trio.CapacityLimiter(4)
    mountpoint = kmount.real_path(cfg.mountpoint)
    state: dict[str, Any] = {
        "pid": os.getpid(),
        "start_time": process_start_time(os.getpid()),
        "mountpoint": mountpoint,
        "ref": redact_url(cfg.ref),
        "rootfs": None,
        "kernel_mounts": [],
        "log": cfg.log_file,
    }
    async with contextlib.AsyncExitStack() as stack:
        image = await _open_image(cfg, stack, cache, limiter)
        fs = LazyFS(manifest=image.manifest, layers=image.layers, stats=lambda: _stats(image, cache))
        options = set(pyfuse3.default_options)
        options |= {"fsname=lazyerofs", "subtype=lazyerofs", "ro"}
        # Without allow_other only the mounting user (root) gets in: images
        # pulled with credentials stay private, and the kernel EROFS and
        # overlay mounts still work (they are made by root). With it, the
        # kernel checks the tree's modes for everyone else.
        options.discard("allow_other")
        options.discard("default_permissions")
        if cfg.allow_other:
            options |= {"allow_other", "default_permissions"}
        try:
            pyfuse3.init(fs, mountpoint, options)
        except RuntimeError as exc:
            raise MountError(f"cannot mount FUSE at {mountpoint}: {exc}") from exc
        _save_state(mountpoint, state)
        try:
            async with trio.open_nursery() as nursery:
                for layer in image.objects:
                    if isinstance(layer, (SeekableLayer, PlainLayer)):
                        layer.start(nursery)
                nursery.start_soon(pyfuse3.main)
                # A stat through FUSE (served by the loop above, from a thread)
                # completes the kernel's INIT, which resets the readahead.
                await trio.to_thread.run_sync(os.stat, mountpoint)
                _set_readahead(mountpoint, cfg.readahead_kb)
                if cfg.rootfs:
                    rootfs_flags = 0 if cfg.rootfs_allow_suid_dev else kmount.ROOTFS_FLAGS
                    await trio.to_thread.run_sync(
                        _kernel_mounts, mountpoint, cfg.rootfs, len(image.layers), state, cfg.loop, rootfs_flags
                    )
                notify(None)
                if cfg.prefetch:
                    nursery.start_soon(_prefetch_all, image)
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                    async for signum in signals:
                        log.info("signal %d: unmounting", signum)
                        break
                # Kernel mounts read through FUSE: take them down while it still serves.
                await trio.to_thread.run_sync(teardown, mountpoint, load_state(mountpoint))
                nursery.cancel_scope.cancel()
        except BaseException:
            with contextlib.suppress(Exception):
                await trio.to_thread.run_sync(teardown, mountpoint, load_state(mountpoint))
            raise
        finally:
            if cfg.touch_log:
                _write_touch_log(cfg.touch_log, image)
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
            shutil.rmtree(state_dir(mountpoint), ignore_errors=True)
            with contextlib.suppress(Exception):
                cache.close()


async def _prefetch_all(image: _Image) -> None:
    """Background fill of every layer, bottom first; yields to on-demand reads."""
    for layer in image.objects:
        if isinstance(layer, SeekableLayer):
            fetched = await layer.prefetch()
            log.info("%s: prefetched %d frames", layer.name, fetched)


def _write_touch_log(path: str, image: _Image) -> None:
    data = []
    for layer in image.objects:
        if isinstance(layer, SeekableLayer):
            data.append(
                {
                    "digest": layer.desc.digest,
                    "frames": sorted(layer.stats.fetched_frames),
                    "spans": [layer.table.span(i) for i in sorted(layer.stats.fetched_frames)],
                    "frame_count": layer.table.frame_count,
                }
            )
    Path(path).write_text(json.dumps(data))


def _set_readahead(mountpoint: str, kib: int) -> None:
    """Raise the FUSE mount's readahead window (128 KiB by default): sequential
    readers then get large requests and the daemon far fewer round trips."""
    # Not os.stat(): that would wait on this very daemon, which is not serving yet.
    device = kmount.device_of(mountpoint)
    if device is None:
        return
    path = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    try:
        path.write_text(f"{kib}\n")
    except OSError as exc:
        log.info("cannot set readahead of %s to %d KiB: %s", mountpoint, kib, exc)


def _kernel_mounts(
    mountpoint: str, rootfs: str, count: int, state: dict[str, Any], loop: bool, rootfs_flags: int
) -> None:
    """EROFS-mount every layer file (nosuid, nodev, noexec: they are only
    overlay lowers) and stack them at ``rootfs``; record each step."""
    base = state_dir(mountpoint) / "erofs"
    targets = []
    for i in range(count):
        target = str(base / str(i))
        m = kmount.mount_erofs(os.path.join(mountpoint, "layers", str(i), "layer.erofs"), target, force_loop=loop)
        state["kernel_mounts"].append({"target": m.target, "loop": m.loop, "source": m.source})
        _save_state(mountpoint, state)
        targets.append(target)
    kmount.mount_overlay(list(reversed(targets)), rootfs, flags=rootfs_flags)
    state["rootfs"] = kmount.real_path(rootfs)
    _save_state(mountpoint, state)


def _check_mountpoint(cfg: MountConfig) -> None:
    if os.geteuid() != 0:
        raise MountError(
            "mounting needs root (FUSE plus kernel EROFS/overlay mounts and /run/lazyerofs); run it as root"
        )
    if cfg.rootfs is not None:
        mnt, rootfs = kmount.real_path(cfg.mountpoint), kmount.real_path(cfg.rootfs)
        if rootfs == mnt or rootfs.startswith(mnt + "/") or mnt.startswith(rootfs + "/"):
            raise MountError(f"--rootfs {cfg.rootfs} and the mount point {cfg.mountpoint} must not contain each other")
    for what, path in (("mount point", cfg.mountpoint), ("--rootfs", cfg.rootfs)):
        if path is None:
            continue
        if not os.path.isdir(path):
            raise MountError(f"{what} {path} is not a directory")
        existing = kmount.find_mount(path)
        if existing is not None:
            raise MountError(f"{what} {path} is already a mount point ({existing[0]}); try 'lazyerofs umount'")
        if not cfg.nonempty and os.listdir(path):
            raise MountError(f"{what} {path} is not empty (the mount would hide its files); pass --nonempty to mount anyway")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module")


def _open_log(cfg: MountConfig) -> Any:
    """The daemon's log file, 0600, opened before the fork so a bad path is a
    plain error. None in the foreground (the log goes to stderr)."""
    if cfg.foreground:
        return None
    if cfg.log_file is None:
        _private_dir(RUN_DIR)
        cfg.log_file = str(RUN_DIR / f"{mount_id(cfg.mountpoint)}.log")
    try:
        return os.fdopen(_open_private(cfg.log_file, os.O_APPEND), "a", buffering=1)
    except OSError as exc:
        raise MountError(f"cannot open the log file {cfg.log_file}: {exc.strerror}") from exc


def _setup_logging(cfg: MountConfig, stream: Any) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s lazyerofs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, cfg.log_level.upper()))
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _printable(text: str) -> str:
    """Text from the daemon (and so maybe from a registry) for a terminal:
    control characters escaped."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


class _ReadyPipe(logging.Handler):
    """The daemon's end of the readiness pipe, one JSON object a line.

    Until the mount is ready (or has failed), every record of level WARNING
    or above also goes up the pipe, and the waiting parent prints it on the
    user's terminal: an unverified layer is not news only the log hears.
    Then one final ``{"ok": true}`` or ``{"error": ...}`` and EOF.
    """

    def __init__(self, fd: int) -> None:
        super().__init__(logging.WARNING)
        self._file = os.fdopen(fd, "wb")

    def emit(self, record: logging.LogRecord) -> None:  # called under self.lock
        self._send({"warning": record.getMessage()})

    def _send(self, message: dict[str, Any]) -> None:
        if self._file.closed:
            return
        try:
            self._file.write(json.dumps(message).encode() + b"\n")
            self._file.flush()
        except OSError:
            pass  # the parent is gone: nobody to tell

    def finish(self, error: str | None) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._file.closed:
                return
            self._send({"ok": True} if error is None else {"error": error})
            with contextlib.suppress(OSError):
                self._file.close()
        logging.getLogger().removeHandler(self)


def _wait_ready(read_fd: int, pid: int) -> int:
    """Parent side of :class:`_ReadyPipe`: print forwarded warnings, then
    return 0 once the daemon says the mount is ready, else print its error."""
    error = None
    ready = False
    with os.fdopen(read_fd, "rb") as r:
        for raw in r:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                message = {"error": line}
            if not isinstance(message, dict):
                message = {"error": line}
            if "warning" in message:
                print(f"lazyerofs: warning: {_printable(str(message['warning']))}", file=sys.stderr, flush=True)
            elif message.get("ok") is True:
                ready = True
            else:
                error = str(message.get("error", line))
    if ready:
        return 0
    os.waitpid(pid, 0)
    print(f"lazyerofs: error: {_printable(error or 'daemon exited before the mount was ready')}", file=sys.stderr)
    return 1


def run_mount(cfg: MountConfig) -> int:
    """Mount and serve; returns the process exit code."""
    cfg.mountpoint = kmount.real_path(cfg.mountpoint)
    if cfg.rootfs is not None:
        cfg.rootfs = kmount.real_path(cfg.rootfs)
    _check_mountpoint(cfg)
    log_stream = _open_log(cfg)
    if cfg.foreground:
        _setup_logging(cfg, None)

        def ready(_: object) -> None:
            print(f"lazyerofs: mounted {redact_url(cfg.ref)} at {cfg.mountpoint}", file=sys.stderr, flush=True)

        with unwrap_group():
            trio.run(_serve, cfg, ready)
        return 0

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        log_stream.close()
        return _wait_ready(read_fd, pid)
    # Child: detach from the caller's session and stdio so a caller capturing
    # our output sees EOF as soon as the parent exits.
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _setup_logging(cfg, log_stream)
    pipe = _ReadyPipe(write_fd)
    logging.getLogger().addHandler(pipe)

    code = 0
    try:
        with unwrap_group():
            trio.run(_serve, cfg, pipe.finish)
    except LazyErofsError as exc:
        pipe.finish(str(exc))  # first: the parent prints it once, as the error
        log.error("%s", exc)
        code = 1
    except BaseException as exc:
        pipe.finish(f"daemon failed: {exc!r}")
        log.exception("daemon failed")
        code = 1
    log.info("exiting")
    os._exit(code)


@contextlib.contextmanager
def unwrap_group() -> Any:
    """Re-raise a lone exception out of trio's exception groups, so errors
    reach the user as the one message they are."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from group
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` exits; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
