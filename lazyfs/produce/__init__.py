"""Producers: turn trees (and later OCI images) into seekable EROFS.

    mkfs.py   raw EROFS images with mkfs.erofs; recognising one by its superblock
"""

from lazyfs.produce.mkfs import EROFS_MAGIC, is_erofs_image, make_erofs

__all__ = ["EROFS_MAGIC", "is_erofs_image", "make_erofs"]
