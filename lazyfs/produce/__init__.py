"""Producers: turn trees (and later OCI images) into seekable EROFS.

    mkfs.py    raw EROFS images with mkfs.erofs; recognising one by its superblock
    build.py   a directory or raw image -> seekable blob + BLOB.json
"""

from lazyfs.produce.build import build_blob, write_descriptor
from lazyfs.produce.mkfs import EROFS_MAGIC, is_erofs_image, make_erofs

__all__ = ["EROFS_MAGIC", "build_blob", "is_erofs_image", "make_erofs", "write_descriptor"]
