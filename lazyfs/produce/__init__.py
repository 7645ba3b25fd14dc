"""Producers: turn trees (and later OCI images) into seekable EROFS.

mkfs.py    raw EROFS images with mkfs.erofs; recognising one by its superblock
build.py   a directory or raw image -> seekable blob + BLOB.json
erofs_writer.py  one layer's tar -> an EROFS image directly (convert's default)
tarstage.py  one layer's tar -> a staging tree of exactly its changes (whiteouts
             in overlayfs form, nothing followed, nothing written outside;
             convert --via-mkfs)
layout.py    an EROFS image laid out again for a recorded start (optimize)
convert.py   an OCI/Docker image of tar layers -> the same image in seekable EROFS
"""

from lazyfs.produce.build import build_blob, write_descriptor
from lazyfs.produce.convert import (
    LAYER_MEDIA_TYPES,
    ConvertOptions,
    ConvertReport,
    LayerReport,
    PlatformReport,
    convert_image,
)
from lazyfs.produce.mkfs import EROFS_MAGIC, is_erofs_image, make_erofs
from lazyfs.produce.tarstage import DEFAULT_MAX_LAYER_BYTES, StageResult, stage_tar

__all__ = [
    "DEFAULT_MAX_LAYER_BYTES",
    "EROFS_MAGIC",
    "LAYER_MEDIA_TYPES",
    "ConvertOptions",
    "ConvertReport",
    "LayerReport",
    "PlatformReport",
    "StageResult",
    "build_blob",
    "convert_image",
    "is_erofs_image",
    "make_erofs",
    "stage_tar",
    "write_descriptor",
]
