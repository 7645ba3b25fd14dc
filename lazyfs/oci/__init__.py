"""The OCI distribution client: references, auth, resolve, blob ranges, push.

Knows nothing of the seekable format: it turns a reference into a checked
manifest and a descriptor into a :class:`RemoteBlob` whose ``read`` returns
exactly the bytes asked for or raises one of :mod:`lazyfs.errors`.

    reference.py    image references (``[registry/]repo[:tag][@digest]``), loopback hosts
    media.py        media types, descriptors, platforms (``os/arch[/variant]``)
    transport.py    RegistryOptions; retries with backoff, deadlines: the one place
                    httpx errors become ours; status mapping; safe URLs; HTTP loggers
    credentials.py  Secret, Credentials, docker's config.json
    auth.py         challenges, TokenCache, AuthSession, RegistryAuth (an httpx.Auth)
    client.py       RegistryClient: resolve (index -> platform), fetch_manifest (as
                    stored), config, blob readers, push; open_url_blob
    blob.py         RemoteBlob: ranges, redirects, Content-Range; stream (whole blob,
                    digest checked as it passes)
    push.py         uploads (monolithic, chunked), manifests, whole images
    referrers.py    artifacts about an image: referrers API or referrers tag schema

Code outside this package imports from here only.
"""

from lazyfs.oci.auth import parse_challenges
from lazyfs.oci.blob import RemoteBlob
from lazyfs.oci.client import RegistryClient, ResolvedImage, open_url_blob
from lazyfs.oci.credentials import Credentials, Secret, load_docker_credentials
from lazyfs.oci.media import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_DOCKER_MANIFEST_LIST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    check_descriptor,
    check_image_manifest,
    default_platform,
    parse_platform,
)
from lazyfs.oci.push import ImageLayer, image_config, image_manifest, push_image
from lazyfs.oci.reference import Reference, is_loopback_host, parse_reference
from lazyfs.oci.referrers import (
    Artifact,
    PushedArtifact,
    find_artifact,
    list_referrers,
    push_artifact,
    referrers_tag,
)
from lazyfs.oci.transport import (
    DEBUG_HTTP_ENV,
    DEFAULT_OVERALL_TIMEOUT,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    BlobStatistics,
    RegistryOptions,
    quiet_library_loggers,
)

__all__ = [
    "DEBUG_HTTP_ENV",
    "DEFAULT_OVERALL_TIMEOUT",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "MEDIA_DOCKER_MANIFEST",
    "MEDIA_DOCKER_MANIFEST_LIST",
    "MEDIA_OCI_CONFIG",
    "MEDIA_OCI_INDEX",
    "MEDIA_OCI_MANIFEST",
    "Artifact",
    "BlobStatistics",
    "Credentials",
    "ImageLayer",
    "PushedArtifact",
    "Reference",
    "RegistryClient",
    "RegistryOptions",
    "RemoteBlob",
    "ResolvedImage",
    "Secret",
    "check_descriptor",
    "check_image_manifest",
    "default_platform",
    "find_artifact",
    "image_config",
    "image_manifest",
    "is_loopback_host",
    "list_referrers",
    "load_docker_credentials",
    "open_url_blob",
    "parse_challenges",
    "parse_platform",
    "parse_reference",
    "push_artifact",
    "push_image",
    "quiet_library_loggers",
    "referrers_tag",
]
