"""A containerd proxy snapshotter whose layers are mounted lazily.

    store.py      sqlite state: snapshots (key, kind, parent, labels, times) and image mounts
    filters.py    containerd's filter expressions for List
    remote.py     image daemons ('lazyerofs mount', one per image) and per-layer EROFS mounts
    snapshots.py  the snapshot semantics: directories, overlayfs mounts, remote layers
    server.py     the gRPC service over a unix socket, signals, the serve loop
    metrics.py    Prometheus collector (per-image counters read from each daemon)
    teardown.py   unmount everything under a root

Arrows: server -> snapshots -> remote, store; remote -> lazyfs.mount (not
lazyfs.fetch: the bytes are the image daemon's business).
"""
