"""OCI media types, descriptors and platforms: the vocabulary, no I/O."""

from __future__ import annotations

import platform as _platform
from collections.abc import Mapping
from typing import Any

from lazyfs.errors import FormatError, NotFoundError
from lazyfs.format.digest import check_digest

__all__ = [
    "ACCEPT_MANIFESTS",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "MEDIA_DOCKER_MANIFEST",
    "MEDIA_DOCKER_MANIFEST_LIST",
    "MEDIA_OCI_CONFIG",
    "MEDIA_OCI_INDEX",
    "MEDIA_OCI_MANIFEST",
    "Platform",
    "check_descriptor",
    "check_image_manifest",
    "default_platform",
    "parse_platform",
    "pick_platform",
]

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST_LIST)
ACCEPT_MANIFESTS = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

# (os, architecture, variant or None)
Platform = tuple[str, str, str | None]

_ARCH_ALIASES = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def default_platform() -> str:
    """``linux/<arch>[/<variant>]`` of this machine, in OCI spelling."""
    machine = _platform.machine().lower()
    arch, variant = _ARCH_ALIASES.get(machine, (machine, None))
    return f"linux/{arch}" + (f"/{variant}" if variant else "")


def parse_platform(value: str) -> Platform:
    """``os/arch[/variant]`` split into its parts; FormatError if it is not that."""
    parts = value.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise FormatError(f"platform {value!r} is not os/arch[/variant]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def check_descriptor(desc: object, what: str) -> dict[str, Any]:
    """``desc`` if it is a descriptor whose digest, size and mediaType are well formed."""
    if not isinstance(desc, dict):
        raise FormatError(f"{what}: descriptor is not a JSON object")
    check_digest(desc.get("digest"), what=f"{what}: digest")
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"{what}: size {size!r} is not a non-negative integer")
    if not isinstance(desc.get("mediaType", ""), str):
        raise FormatError(f"{what}: mediaType is not a string")
    return desc


def check_image_manifest(manifest: Mapping[str, Any], what: object) -> list[dict[str, Any]]:
    """The layer descriptors of an image manifest (schemaVersion 2), each checked."""
    if manifest.get("schemaVersion") != 2:
        raise FormatError(f"{what}: manifest schemaVersion {manifest.get('schemaVersion')!r} is not 2")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise FormatError(f"{what}: manifest has no 'layers' list")
    return [check_descriptor(layer, f"{what}: layer {i}") for i, layer in enumerate(layers)]


def pick_platform(index: Mapping[str, Any], want: Platform, what: str) -> dict[str, Any]:
    """The descriptor of ``index``'s manifest for platform ``want``.

    An entry without a variant (or with the architecture's default one)
    ranks first when no variant is asked for; ties go to the first entry.
    """
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise FormatError(f"{what}: index has no 'manifests' list")
    want_os, want_arch, want_variant = want
    default_variant = {"arm64": "v8"}.get(want_arch)
    candidates = []
    seen = []
    for i, entry in enumerate(entries):
        desc = check_descriptor(entry, f"{what}: index entry {i}")
        plat = desc.get("platform") or {}
        if not isinstance(plat, dict):
            continue
        os_, arch, variant = plat.get("os"), plat.get("architecture"), plat.get("variant")
        seen.append("/".join(str(p) for p in (os_, arch, variant) if p))
        if os_ != want_os or arch != want_arch:
            continue
        if want_variant is not None and (variant or default_variant) != want_variant:
            continue
        rank = 0 if variant in (None, default_variant) else 1
        candidates.append((rank, i, desc))
    if not candidates:
        name = "/".join(p for p in want if p)
        raise NotFoundError(
            f"{what}: no manifest for platform {name} (index has: {', '.join(seen) or 'none'})"
        )
    return min(candidates, key=lambda c: (c[0], c[1]))[2]
