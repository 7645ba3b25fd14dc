"""The FUSE tree turns every failure of a layer read into EIO for that read."""

from __future__ import annotations

import errno
import os

import pyfuse3
import pytest

from lazyfs.errors import FetchError
from lazyfs.mount.fuse import LazyFS


class _Layer:
    size = 4096

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def read(self, offset: int, size: int) -> bytes:
        raise self.error


async def _read_layer_file(layer: _Layer) -> bytes:
    fs = LazyFS(manifest=b"{}", layers=[(layer, "sha256:" + "0" * 64, None)], stats=dict)
    layers = await fs.lookup(pyfuse3.ROOT_INODE, b"layers")
    zero = await fs.lookup(layers.st_ino, b"0")
    file = await fs.lookup(zero.st_ino, b"layer.erofs")
    info = await fs.open(file.st_ino, os.O_RDONLY, None)  # type: ignore[arg-type]
    return await fs.read(info.fh, 0, 4096)


@pytest.mark.parametrize(
    "error",
    [FetchError("registry down"), RuntimeError("a bug below the tree"), KeyError("missing")],
    ids=["our-error", "runtime-error", "key-error"],
)
async def test_any_failure_of_a_layer_read_is_eio_for_that_read_only(error: BaseException):
    # An exception other than FUSEError escaping a handler would end pyfuse3's
    # loop, and a kernel mount waiting on the read would hang for ever.
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await _read_layer_file(_Layer(error))
    assert caught.value.errno == errno.EIO
