"""Process life of a mount: check, fork, open the image, serve FUSE, tear down.

``run_mount`` either serves in the foreground or forks a daemon that reports
readiness (or the reason it failed) back to the waiting parent through a
pipe (:mod:`lazyfs.mount._ready`), so ``lazyerofs mount`` returns only once
the mount works, and leaves nothing mounted when it does not. SIGTERM/SIGINT
unmount cleanly: kernel mounts first (they read through FUSE), then the FUSE
mount. What the daemon did is recorded step by step in its state file
(:mod:`lazyfs.mount.state`), so ``unmount`` can undo it even after a crash.

Never stat the FUSE mount point from the daemon's trio thread: the kernel
would ask this very daemon, which is not answering while it waits. Paths are
resolved with ``kernel.real_path`` and blocking kernel calls run in threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

from lazyfs.errors import LazyErofsError, MountError
from lazyfs.mount import kernel as kmount
from lazyfs.mount._ready import ReadyPipe, Timeline, wait_ready
from lazyfs.mount.state import (
    RUN_DIR,
    RunState,
    discard_log,
    load_state,
    log_path,
    open_private,
    private_dir,
    process_start_time,
    prune_kept_logs,
    redact_url,
    state_dir,
    teardown,
)

# trio, httpx (lazyfs.oci), the fetch side, the cache and pyfuse3 are
# imported where a mount needs them: `lazyerofs umount` and `stats` import
# this package too and need none of them.
if TYPE_CHECKING:
    from cache import ChunkCache
    from lazyfs.fetch import Layer, ReadSettings
    from lazyfs.fetch.offload import FetchWorkers
    from lazyfs.oci import RegistryOptions

__all__ = ["MountConfig", "run_mount", "unwrap_group"]

log = logging.getLogger(__name__)

# What an EROFS mount reads first: the superblock at 1024 and the metadata
# just after it (all inside the first frame of any frame size).
_SUPERBLOCK_AREA = 4096
# Called once the mount is ready (None) or has failed (the reason).
Notify = Callable[[str | None], None]


@dataclass
class MountConfig:
    """Everything ``lazyerofs mount`` was asked to do."""

    ref: str  # image reference, or with descriptor_file a blob path or URL
    mountpoint: str
    descriptor_file: str | None = None
    rootfs: str | None = None  # also stack the layers (kernel EROFS + overlay) here
    cache_dir: str | None = None  # None: default_cache_dir()
    cache_size: int | None = None  # None: the cache's default budget
    memory_cache: int | None = None
    verify_at_rest: bool = False
    read: ReadSettings = field(default_factory=lambda: _read_settings())
    registry: RegistryOptions = field(default_factory=lambda: _registry_options())
    foreground: bool = False
    log_file: str | None = None  # None: /run/lazyerofs/<id>.log
    log_level: str = "info"
    touch_log: str | None = None  # write touched frames here at exit (benchmarks)
    profile_file: str | None = None  # replay this startup profile (else the registry's)
    profile_lookup: bool = True  # look a startup profile up in the registry
    readahead_kb: int = 4096
    loop: bool = False  # kernel EROFS mounts through loop devices
    allow_other: bool = False  # let every local user read the FUSE tree
    rootfs_allow_suid_dev: bool = False  # honour setuid bits and device nodes in the rootfs
    nonempty: bool = False  # mount over a directory that has entries
    started: float | None = None  # time.monotonic() when the command started (startup timings)
    fetch_workers: int | None = None  # processes that fetch frames (None: one per spare core, see offload)


def _read_settings() -> ReadSettings:
    from lazyfs.fetch import ReadSettings

    return ReadSettings()


def _registry_options() -> RegistryOptions:
    from lazyfs.oci import RegistryOptions

    return RegistryOptions()


def run_mount(cfg: MountConfig) -> int:
    """Mount and serve; returns the process exit code.

    In the foreground this returns when the mount is taken down; otherwise
    the process forks and neither side returns: the parent exits once the
    daemon reports the mount ready (0) or failed (1, its error printed),
    right away and without the interpreter's teardown, and the daemon exits
    when the mount is taken down.
    """
    timeline = Timeline(cfg.started)
    timeline.mark("command")  # interpreter, imports and argument parsing
    rootfs = kmount.real_path(cfg.rootfs) if cfg.rootfs is not None else None
    cfg = replace(cfg, mountpoint=kmount.real_path(cfg.mountpoint), rootfs=rootfs)
    _check_mountpoint(cfg)
    log_stream = _open_log(cfg)
    import trio  # after the checks: a refused mount need not pay for it

    if log_stream is None:
        _setup_logging(cfg, None)

        def ready(_: str | None) -> None:
            print(f"lazyerofs: mounted {redact_url(cfg.ref)} at {cfg.mountpoint}", file=sys.stderr, flush=True)

        workers = _spawn_workers(cfg, keep_fds=())
        with unwrap_group():
            trio.run(_serve, cfg, ready, timeline, workers)
        return 0

    timeline.mark("checks")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        log_stream.close()
        code = wait_ready(read_fd, pid)
        if code:
            print(f"lazyerofs: the daemon's log is kept at {cfg.log_file}", file=sys.stderr)
        # Nothing is left to do here, and the interpreter's own teardown
        # (trio, httpx, pyfuse3 loaded) would hold the caller 70-100 ms.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    # Child: detach from the caller's session and stdio so a caller capturing
    # our output sees EOF as soon as the parent exits.
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _setup_logging(cfg, log_stream)
    # Before the pipe's handler is added: a worker must not hold it.
    workers = _spawn_workers(cfg, keep_fds=(log_stream.fileno(),))
    pipe = ReadyPipe(write_fd)
    logging.getLogger().addHandler(pipe)
    timeline.mark("fork")

    code = 0
    try:
        with unwrap_group():
            trio.run(_serve, cfg, pipe.finish, timeline, workers)
    except LazyErofsError as exc:
        pipe.finish(str(exc))  # first: the parent prints it once, as the error
        log.error("%s", exc)
        code = 1
    except BaseException as exc:
        pipe.finish(f"daemon failed: {exc!r}")
        log.exception("daemon failed")
        code = 1
    log.info("exiting")
    if code == 0:
        discard_log(cfg.log_file, cfg.mountpoint)  # one log per mount, kept only after a failure
    os._exit(code)


def _spawn_workers(cfg: MountConfig, *, keep_fds: tuple[int, ...]) -> FetchWorkers | None:
    """Fork the mount's fetch workers (before trio starts: one thread, so
    the fork is safe). None for a mount of a local blob, or with 0 asked."""
    from lazyfs.fetch.offload import CacheSpec, FetchWorkers, default_workers

    n = default_workers() if cfg.fetch_workers is None else cfg.fetch_workers
    if n <= 0 or (cfg.descriptor_file is not None and os.path.exists(cfg.ref)):
        return None
    root, max_bytes = _cache_place(cfg)
    return FetchWorkers.spawn(n, CacheSpec(root, max_bytes, cfg.verify_at_rest), keep_fds=keep_fds)


def _cache_place(cfg: MountConfig) -> tuple[str, int]:
    """The chunk cache's directory and disk budget, defaults applied (the
    daemon and its fetch workers open the same)."""
    from cache import DEFAULT_MAX_BYTES, default_cache_dir

    return str(cfg.cache_dir or default_cache_dir()), DEFAULT_MAX_BYTES if cfg.cache_size is None else cfg.cache_size


def _open_cache(cfg: MountConfig) -> ChunkCache:
    from cache import CacheError, ChunkCache
    from lazyfs.fetch.context import memory_cache_share

    try:
        # The memory LRU is the first share of the mount's memory budget.
        memory_bytes = memory_cache_share(cfg.read.memory_budget, cfg.memory_cache)
    except ValueError as exc:
        raise MountError(f"--memory-cache: {exc}") from exc
    try:
        root, max_bytes = _cache_place(cfg)
        return ChunkCache(
            root,
            max_bytes=max_bytes,
            memory_bytes=memory_bytes,
            verify_at_rest=cfg.verify_at_rest,
        )
    except CacheError as exc:
        raise LazyErofsError(str(exc)) from exc


def _fuse_options(allow_other: bool) -> set[str]:
    import pyfuse3

    options = set(pyfuse3.default_options)
    options |= {"fsname=lazyerofs", "subtype=lazyerofs", "ro"}
    # Without allow_other only the mounting user (root) gets in: images
    # pulled with credentials stay private, and the kernel EROFS and
    # overlay mounts still work (they are made by root). With it, the
    # kernel checks the tree's modes for everyone else.
    options.discard("allow_other")
    options.discard("default_permissions")
    if allow_other:
        options |= {"allow_other", "default_permissions"}
    return options


async def _serve(cfg: MountConfig, notify: Notify, timeline: Timeline, workers: FetchWorkers | None = None) -> None:
    """Open the image, mount it, call ``notify(None)`` once it works, then
    serve until a signal; every way out leaves nothing mounted. ``workers``:
    fetch workers already forked (they stop when this returns)."""
    import pyfuse3
    import trio

    from lazyfs.fetch.context import limit_allocator_slack
    from lazyfs.mount.fuse import LazyFS
    from lazyfs.mount.image import ProfileOptions, open_image, stats, write_touch_log
    from lazyfs.mount.rootfs import mount_rootfs

    timeline.mark("imports")
    limit_allocator_slack()  # RSS follows the memory budget, not the heap's high-water mark
    cache = _open_cache(cfg)
    timeline.mark("cache")
    mountpoint = cfg.mountpoint  # already a real path (run_mount)
    state = RunState(
        pid=os.getpid(),
        start_time=process_start_time(os.getpid()),
        mountpoint=mountpoint,
        ref=redact_url(cfg.ref),
        log=cfg.log_file,
    )
    async with contextlib.AsyncExitStack() as stack:
        if workers is not None:
            await stack.enter_async_context(workers.running())
        image = await open_image(
            cfg.ref,
            descriptor_file=cfg.descriptor_file,
            registry=cfg.registry,
            settings=cfg.read,
            cache=cache,
            stack=stack,
            mark=timeline.mark,
            profile=ProfileOptions(lookup=cfg.profile_lookup, file=cfg.profile_file),
            offload=workers,
        )
        files = image.files
        fs = LazyFS(
            manifest=image.manifest,
            layers=[(layer.file, layer.digest, layer.sidecar) for layer in image.layers],
            stats=lambda: {**stats(files, cache, image.context, image.profile), "startup": timeline.as_dict()},
            profile=image.profile.record,
        )
        try:
            pyfuse3.init(fs, mountpoint, _fuse_options(cfg.allow_other))
        except RuntimeError as exc:
            raise MountError(f"cannot mount FUSE at {mountpoint}: {exc}") from exc
        timeline.mark("fuse_init")
        state.save()
        try:
            async with trio.open_nursery() as nursery:
                for layer in files:
                    layer.start(nursery)
                if cfg.rootfs:
                    # The kernel mounts below read each layer's superblock
                    # one layer after another; fetch those first frames
                    # now, all at once, while FUSE finishes its INIT.
                    for layer in files:
                        nursery.start_soon(_first_frame, layer)
                nursery.start_soon(pyfuse3.main)
                # A stat through FUSE (served by the loop above, from a thread)
                # completes the kernel's INIT, which resets the readahead.
                await trio.to_thread.run_sync(os.stat, mountpoint)
                timeline.mark("fuse_ready")
                if cfg.readahead_kb <= KERNEL_READAHEAD_KB:
                    _set_readahead(mountpoint, cfg.readahead_kb)  # a smaller window: from the start
                else:
                    nursery.start_soon(_readahead_once_cached, mountpoint, files, cfg.readahead_kb)
                if cfg.rootfs:
                    rootfs_flags = 0 if cfg.rootfs_allow_suid_dev else kmount.ROOTFS_FLAGS
                    await trio.to_thread.run_sync(
                        mount_rootfs, state, cfg.rootfs, len(image.layers), cfg.loop, rootfs_flags
                    )
                    timeline.mark("rootfs")
                timeline.mark("ready")
                log.info("ready %.3fs after the command started: %s", timeline.marks["ready"], timeline.summary())
                notify(None)
                # --prefetch: the background fetcher open_image started goes
                # on to the rest of the image (after the profile) from now.
                image.profile.mounted.set()
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
                write_touch_log(cfg.touch_log, files)
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
            shutil.rmtree(state_dir(mountpoint), ignore_errors=True)
            with contextlib.suppress(Exception):
                cache.close()


async def _first_frame(layer: Layer) -> None:
    """Read the start of ``layer`` (EROFS superblock and root directory) into
    the cache. Only a head start: a failure here is the kernel mount's to
    report, when it reads the same bytes."""
    try:
        await layer.read(0, _SUPERBLOCK_AREA)
    except LazyErofsError as exc:
        log.debug("%s: early read of the first frame failed: %s", layer.name, exc)


# The kernel's FUSE readahead window until we set one.
KERNEL_READAHEAD_KB = 128


async def _readahead_once_cached(mountpoint: str, files: list[Layer], kib: int) -> None:
    """Raise the FUSE readahead window to ``kib`` once every frame of the
    image is in the cache: at once for a warm mount, else when the
    background fetch (or the reads) got the rest.

    Until then the kernel's own 128 KiB stays: a larger window makes the
    kernel read ahead into frames nobody asked for, and each is a fetch. An
    image laid out for its start (``lazyerofs optimize``) is read in order
    up to the end of its hot part; 4 MiB of readahead there fetched 4 more
    frames per layer, 1.4x what the start needed instead of 1.04x
    (benchmarks/results/layout.md). Sequential cold readers do not need it:
    the fetch policy fetches ahead of them itself.
    """
    import trio

    stores = [store for f in files if (store := getattr(f, "store", None)) is not None]
    total = sum(f.frames_total for f in files if getattr(f, "store", None) is not None)
    # A warm cache is only known by asking it (one thread hop for all layers).
    present = await trio.to_thread.run_sync(lambda: sum(s.refresh_present() for s in stores))
    while present < total:
        await trio.sleep(1.0)  # frames fetched since are known without asking
        present = sum(f.frames_present for f in files if getattr(f, "store", None) is not None)
    _set_readahead(mountpoint, kib)
    log.info("every frame is cached: FUSE readahead raised to %d KiB", kib)


def _set_readahead(mountpoint: str, kib: int) -> None:
    """Set the FUSE mount's readahead window (128 KiB by default): sequential
    readers of cached data then get large requests and the daemon far fewer
    round trips."""
    # Not os.stat(): that would wait on this very daemon, which is not serving yet.
    device = kmount.device_of(mountpoint)
    if device is None:
        return
    path = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    try:
        path.write_text(f"{kib}\n")
    except OSError as exc:
        log.info("cannot set readahead of %s to %d KiB: %s", mountpoint, kib, exc)


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


def _open_log(cfg: MountConfig) -> IO[str] | None:
    """The daemon's log file, 0600, opened before the fork so a bad path is a
    plain error. None in the foreground (the log goes to stderr). Sets
    ``cfg.log_file`` to the default path when none was given."""
    if cfg.foreground:
        return None
    if cfg.log_file is None:
        private_dir(RUN_DIR)
        cfg.log_file = str(log_path(cfg.mountpoint))
        prune_kept_logs()  # the logs failures kept stay bounded
    try:
        return os.fdopen(open_private(cfg.log_file, os.O_APPEND), "a", buffering=1)
    except OSError as exc:
        raise MountError(f"cannot open the log file {cfg.log_file}: {exc.strerror}") from exc


def _setup_logging(cfg: MountConfig, stream: IO[str] | None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s lazyerofs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, cfg.log_level.upper()))


@contextlib.contextmanager
def unwrap_group() -> Iterator[None]:
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
