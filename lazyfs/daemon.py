"""Process life of a mount: resolve, open layers, serve FUSE, tear down.

``run_mount`` either serves in the foreground or forks a daemon that reports
readiness (or the reason it failed) back to the waiting parent through a
pipe, so ``lazyerofs mount`` returns only once the mount works, and leaves
nothing mounted when it does not. SIGTERM/SIGINT unmount cleanly: kernel
mounts first (they read through FUSE), then the FUSE mount.

Runtime state (pid, kernel mounts) of the mount at DIR lives in
``/run/lazyerofs/<id>/state.json`` so ``lazyerofs umount DIR`` can clean up
even after the daemon was killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from lazyfs import kmount, seekable
from lazyfs.errors import FetchError, FormatError, IntegrityError, LazyErofsError, MountError
from lazyfs.layer import (
    DEFAULT_MERGE_BYTES,
    DEFAULT_READ_TIMEOUT,
    Demand,
    LinkEstimate,
    PlainLayer,
    SeekableLayer,
)

__all__ = ["MountConfig", "load_state", "run_mount", "state_dir", "teardown"]

log = logging.getLogger(__name__)

RUN_DIR = Path(os.environ.get("LAZYEROFS_RUN_DIR", "/run/lazyerofs"))


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
    registry: Any = None  # lazyfs.registry.RegistryOptions
    touch_log: str | None = None  # write touched frames here at exit (benchmarks)
    prefetch: bool = False
    readahead_kb: int = 4096
    fetch_ahead: int = 0
    loop: bool = False


def mount_id(mountpoint: str) -> str:
    return hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]


def state_dir(mountpoint: str) -> Path:
    return RUN_DIR / mount_id(mountpoint)


def load_state(mountpoint: str) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir(mountpoint) / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _save_state(mountpoint: str, state: dict[str, Any]) -> None:
    d = state_dir(mountpoint)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(d / "state.json")


def teardown(mountpoint: str, state: dict[str, Any] | None) -> None:
    """Undo kernel mounts recorded in ``state`` (rootfs, then EROFS, then loops)."""
    if not state:
        return
    errors = []
    if state.get("rootfs"):
        try:
            kmount.umount(state["rootfs"])
        except MountError as exc:
            errors.append(str(exc))
    for m in reversed(state.get("kernel_mounts", [])):
        try:
            kmount.umount(m["target"])
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
        log.warning("%s: plain EROFS layer: served by direct range reads, unverified per read", name)
        return PlainLayer(name, desc, source, read_timeout=cfg.read_timeout), None
    if not desc.seekable:
        if cfg.strict:
            raise FormatError(f"{name}: media type {desc.media_type} is not an EROFS layer (--strict)")
        log.warning("%s: skipping layer of media type %s", name, desc.media_type)
        return None
    assert desc.table_offset is not None
    if source.size != desc.size:
        raise IntegrityError(f"{name}: registry says the blob is {source.size} bytes, descriptor {desc.size}")
    verify = not cfg.insecure_skip_verify
    try:
        with trio.fail_after(cfg.read_timeout):
            data = await source.read(desc.table_offset, seekable.table_read_size(desc))
    except trio.TooSlowError as exc:
        raise FetchError(f"{name}: chunk table not fetched within {cfg.read_timeout:g}s") from exc
    table = seekable.read_chunk_table(data, desc, verify=verify, name=name)
    verified = verify and table.hash_algo == seekable.HASH_SHA512
    if not verified:
        log.warning("%s: INSECURE: frames are served without verification", name)
    verity = None
    sidecar = None
    if desc.verity_offset is not None:
        from lazyfs.verity_tail import open_verity_tail

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
            from lazyfs.sources import FileSource

            source = FileSource(cfg.ref)
            stack.callback(source.close)
        else:
            from lazyfs import registry

            source = await stack.enter_async_context(
                registry.open_url_blob(cfg.ref, size=parsed.size, options=cfg.registry or registry.RegistryOptions())
            )
        manifest = json.dumps({"schemaVersion": 2, "layers": [desc]}, indent=2).encode()
        descs = [(desc, source)]
    else:
        from lazyfs import registry

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
        raise FormatError(f"{cfg.ref}: no EROFS layers to mount")
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

    from cache import ChunkCache, default_cache_dir
    from lazyfs.fs import LazyFS

    kwargs: dict[str, Any] = {"verify_at_rest": cfg.verify_at_rest}
    if cfg.cache_size is not None:
        kwargs["max_bytes"] = cfg.cache_size
    if cfg.memory_cache is not None:
        kwargs["memory_bytes"] = cfg.memory_cache
    cache = ChunkCache(cfg.cache_dir or default_cache_dir(), **kwargs)
    # Two cores: a few threads keep both busy hashing and decompressing.
    limiter = trio.CapacityLimiter(4)
    mountpoint = os.path.abspath(cfg.mountpoint)
    state: dict[str, Any] = {
        "pid": os.getpid(),
        "mountpoint": mountpoint,
        "ref": cfg.ref,
        "rootfs": None,
        "kernel_mounts": [],
        "log": cfg.log_file,
    }
    async with contextlib.AsyncExitStack() as stack:
        image = await _open_image(cfg, stack, cache, limiter)
        fs = LazyFS(manifest=image.manifest, layers=image.layers, stats=lambda: _stats(image, cache))
        options = set(pyfuse3.default_options)
        options |= {"fsname=lazyerofs", "subtype=lazyerofs", "ro", "allow_other"}
        options.discard("default_permissions")
        try:
            pyfuse3.init(fs, mountpoint, options)
        except RuntimeError as exc:
            raise MountError(f"cannot mount FUSE at {mountpoint}: {exc}") from exc
        _save_state(mountpoint, state)
        try:
            async with trio.open_nursery() as nursery:
                for layer in image.objects:
                    if isinstance(layer, SeekableLayer):
                        layer.start(nursery)
                nursery.start_soon(pyfuse3.main)
                # A stat through FUSE (served by the loop above, from a thread)
                # completes the kernel's INIT, which resets the readahead.
                await trio.to_thread.run_sync(os.stat, mountpoint)
                _set_readahead(mountpoint, cfg.readahead_kb)
                if cfg.rootfs:
                    await trio.to_thread.run_sync(
                        _kernel_mounts, mountpoint, cfg.rootfs, len(image.layers), state, cfg.loop
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


def _kernel_mounts(mountpoint: str, rootfs: str, count: int, state: dict[str, Any], loop: bool) -> None:
    """EROFS-mount every layer file and stack them at ``rootfs``; record each step."""
    base = state_dir(mountpoint) / "erofs"
    targets = []
    for i in range(count):
        target = str(base / str(i))
        m = kmount.mount_erofs(os.path.join(mountpoint, "layers", str(i), "layer.erofs"), target, force_loop=loop)
        state["kernel_mounts"].append({"target": m.target, "loop": m.loop, "source": m.source})
        _save_state(mountpoint, state)
        targets.append(target)
    kmount.mount_overlay(list(reversed(targets)), rootfs)
    state["rootfs"] = os.path.abspath(rootfs)
    _save_state(mountpoint, state)


def _check_mountpoint(cfg: MountConfig) -> None:
    for what, path in (("mount point", cfg.mountpoint), ("--rootfs", cfg.rootfs)):
        if path is None:
            continue
        if not os.path.isdir(path):
            raise MountError(f"{what} {path} is not a directory")
        existing = kmount.find_mount(path)
        if existing is not None:
            raise MountError(f"{what} {path} is already a mount point ({existing[0]}); try 'lazyerofs umount'")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module")


def _setup_logging(cfg: MountConfig) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    if cfg.foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(cfg.log_file or os.devnull)
    handler.setFormatter(logging.Formatter("%(asctime)s lazyerofs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, cfg.log_level.upper()))


def run_mount(cfg: MountConfig) -> int:
    """Mount and serve; returns the process exit code."""
    _check_mountpoint(cfg)
    if cfg.log_file is None and not cfg.foreground:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        cfg.log_file = str(RUN_DIR / f"{mount_id(cfg.mountpoint)}.log")
    if cfg.foreground:
        _setup_logging(cfg)

        def ready(_: object) -> None:
            print(f"lazyerofs: mounted {cfg.ref} at {cfg.mountpoint}", file=sys.stderr, flush=True)

        with unwrap_group():
            trio.run(_serve, cfg, ready)
        return 0

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as r:
            message = r.read().decode(errors="replace")
        if message.startswith("ok"):
            return 0
        os.waitpid(pid, 0)
        print(f"lazyerofs: error: {message or 'daemon exited before the mount was ready'}", file=sys.stderr)
        return 1
    # Child: detach from the caller's session and stdio so a caller capturing
    # our output sees EOF as soon as the parent exits.
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _setup_logging(cfg)
    writer = os.fdopen(write_fd, "wb")

    def notify(error: str | None) -> None:
        if not writer.closed:
            writer.write(b"ok" if error is None else error.encode())
            writer.close()

    code = 0
    try:
        with unwrap_group():
            trio.run(_serve, cfg, notify)
    except LazyErofsError as exc:
        log.error("%s", exc)
        notify(str(exc))
        code = 1
    except BaseException as exc:
        log.exception("daemon failed")
        notify(f"daemon failed: {exc!r}")
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
