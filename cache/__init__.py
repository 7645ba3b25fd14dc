"""lazyerofs' chunk cache: decompressed frames on local disk, keyed by digest.

Plain storage with no FUSE, HTTP or lazyfs imports (stdlib and cachetools
only), so a container snapshotter can share the directory and the code::

    from cache import ChunkCache

    with ChunkCache("/var/cache/lazyerofs", max_bytes=parse_size("10GiB")) as c:
        data = c.get(digest, size)
        if data is None:
            data = fetch_and_verify(...)
            c.put(digest, data)
        part = c.read(digest, size, offset, length)  # only those bytes from disk

The directory must belong to the user running the cache and be writable by
no one else (``CacheError`` otherwise): entries are only as trustworthy as
the directory that holds them.

The implementation lives in private modules; this is the whole public surface:

    _store.py   ChunkCache: the memory LRU, range reads, counters, when to scan
    _handles.py descriptors of recently read entries, kept open for range reads
    _entry.py   one entry on disk: header, read (judging damage), write-then-rename
    _dirs.py    the directory handles, and whether to trust them (owner, mode, no links);
                open_root/open_dir are public, for side stores kept in the cache dir
    _evict.py   scanning the directory, LRU eviction, stale temp files
    _sizes.py   human sizes and the default cache location
"""

from cache._dirs import CacheError, open_dir, open_root
from cache._evict import CacheEntry
from cache._sizes import default_cache_dir, format_size, parse_size
from cache._store import DEFAULT_MAX_BYTES, DEFAULT_MEMORY_BYTES, CacheStatistics, ChunkCache

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MEMORY_BYTES",
    "CacheEntry",
    "CacheError",
    "CacheStatistics",
    "ChunkCache",
    "default_cache_dir",
    "format_size",
    "open_dir",
    "open_root",
    "parse_size",
]
