"""OCI / Docker manifests, indexes and image configs: media types, parsing, platform choice.

Pure: takes bytes, returns frozen values. Schema1 is refused with a clear error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .digest import Digest
from .errors import InvalidReference, ManifestInvalid, PlatformNotFound, UnsupportedManifest
from .platform import Platform, choose

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

LAYER_GZIP_TYPES = ("application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
LAYER_ZSTD_TYPES = ("application/vnd.oci.image.layer.v1.tar+zstd",
                    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd")
LAYER_PLAIN_TYPES = ("application/vnd.oci.image.layer.v1.tar",
                     "application/vnd.oci.image.layer.nondistributable.v1.tar",
                     "application/vnd.docker.image.rootfs.diff.tar")

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
# A JSON document up to this size is decoded where it is (under a millisecond). A bigger one
# (a 20000-layer manifest is ~3 MB: 10-30 ms) is decoded by async callers in a worker thread,
# and ``loads`` then makes the C decoder call back into Python at every JSON object, where
# the interpreter can hand the GIL to the event loop; the C decoder alone would hold it for
# the whole document, blocking the loop even from a thread.
INLINE_JSON = 256 * 1024
# ... and before a bigger document is decoded at all, its JSON values are bounded by what a
# manifest or config of ``max_layers`` layers can need: decoding cost follows the number of
# values (600k nested arrays in 2.4 MB: 200-450 ms), not the byte size. Counted at C speed
# as commas and brackets (an upper bound: those inside strings count too).
VALUES_PER_LAYER = 64
CONTAINERS_PER_LAYER = 16
SPARE_LAYERS = 64
ATTESTATION_ANNOTATION = "vnd.docker.reference.type"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_json(cls, obj: object, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ManifestInvalid(f"{where}: descriptor is not an object")
        try:
            digest = Digest.parse(obj["digest"])
            size = obj["size"]
            media_type = obj.get("mediaType", "")
        except (KeyError, TypeError, InvalidReference) as e:
            raise ManifestInvalid(f"{where}: bad descriptor ({e})") from e
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestInvalid(f"{where}: descriptor {digest} has an invalid size {size!r}")
        urls = obj.get("urls") or ()
        annotations = obj.get("annotations") or {}
        return cls(
            media_type=media_type if isinstance(media_type, str) else "",
            digest=digest,
            size=size,
            platform=Platform.from_json(obj.get("platform")),
            urls=tuple(u for u in urls if isinstance(u, str)),
            # a map of strings (OCI); anything else is dropped, never turned into text
            annotations=tuple(sorted((k, v) for k, v in annotations.items()
                                     if isinstance(k, str) and isinstance(v, str))),
        )

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)

    @property
    def is_attestation(self) -> bool:
        if self.annotation(ATTESTATION_ANNOTATION) == "attestation-manifest":
            return True
        p = self.platform
        return p is not None and (p.os == "unknown" or p.architecture == "unknown")


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageIndex:
    media_type: str
    manifests: tuple[Descriptor, ...]

    def platforms(self) -> list[Platform]:
        return [d.platform for d in self.manifests if d.platform and not d.is_attestation]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config fetchd needs; ``raw`` keeps the registry's exact bytes."""

    raw: bytes
    diff_ids: tuple[Digest, ...]
    platform: Platform | None
    data: dict[str, Any] = field(repr=False, compare=False, hash=False, default_factory=dict)


def _same(obj: dict[str, Any]) -> dict[str, Any]:
    return obj


def loads(body: bytes) -> Any:
    """``json.loads(body)``. For a body bigger than ``INLINE_JSON`` the decoder calls back
    into Python at every object (same result, ~10% slower): a point where a worker thread
    running it gives the GIL to the event loop when the loop asks for it."""
    if len(body) <= INLINE_JSON:
        return json.loads(body)
    return json.loads(body, object_hook=_same)


def _check_values(body: bytes, max_layers: int | None, what: str, where: str) -> None:
    """Refuse a big document with more JSON values than ``max_layers`` layers can need,
    before decoding it (see ``VALUES_PER_LAYER``)."""
    if max_layers is None or len(body) <= INLINE_JSON:
        return
    slots = max_layers + SPARE_LAYERS
    values = body.count(b",") + 1
    containers = body.count(b"[") + body.count(b"{")
    if values > VALUES_PER_LAYER * slots or containers > CONTAINERS_PER_LAYER * slots:
        raise ManifestInvalid(
            f"{where}: the {what} holds about {values} JSON values in {containers} arrays and "
            f"objects, more than one of at most {max_layers} layers needs ([server] "
            "max_layers); nothing was fetched. The registry sent something else than an "
            "image's metadata: check the image")


def parse_manifest(body: bytes, content_type: str | None, where: str,
                   max_layers: int | None = None) -> ImageManifest | ImageIndex:
    """Parse a manifest or index. ``where`` names it in errors (e.g. 'docker.io/library/debian:12').

    ``max_layers`` caps the layer list (and an index's entries): a longer list is refused
    before any of its entries is looked at, and a big body's JSON values before it is
    decoded. A body bigger than ``INLINE_JSON`` takes tens of ms: async callers run it in a
    worker thread (it then leaves the GIL to the loop at every object).
    """
    if len(body) > MAX_MANIFEST_SIZE:
        raise ManifestInvalid(f"{where}: manifest of {len(body)} bytes exceeds the {MAX_MANIFEST_SIZE} byte limit")
    _check_values(body, max_layers, "manifest", where)
    try:
        obj = loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestInvalid(f"{where}: manifest is not valid JSON ({e})") from e
    except RecursionError:
        raise ManifestInvalid(f"{where}: {_TOO_DEEP}") from None
    try:
        return _manifest(obj, content_type, where, max_layers)
    except RecursionError:  # a nested value deep inside (an annotation, a platform)
        raise ManifestInvalid(f"{where}: {_TOO_DEEP}") from None


_TOO_DEEP = ("JSON nested too deeply to be a manifest or image config; the registry sent "
             "something else, check the image")


def _manifest(obj: Any, content_type: str | None, where: str,
              max_layers: int | None) -> ImageManifest | ImageIndex:
    if not isinstance(obj, dict):
        raise ManifestInvalid(f"{where}: manifest is not a JSON object")
    media_type = obj.get("mediaType") or (content_type or "").split(";")[0].strip()
    if media_type in DOCKER_SCHEMA1 or obj.get("schemaVersion") == 1:
        raise UnsupportedManifest(
            f"{where}: Docker schema1 manifests are not supported (removed from Docker and "
            "containerd); push the image again with a current client"
        )
    if not media_type:
        media_type = OCI_INDEX if "manifests" in obj else OCI_MANIFEST
    if media_type in INDEX_TYPES:
        entries = obj.get("manifests")
        if not isinstance(entries, list):
            raise ManifestInvalid(f"{where}: index has no 'manifests' list")
        _check_count(len(entries), max_layers, "index entries", where)
        return ImageIndex(media_type, tuple(Descriptor.from_json(e, where) for e in entries))
    if media_type in MANIFEST_TYPES:
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise ManifestInvalid(f"{where}: manifest has no 'layers' list")
        _check_count(len(layers), max_layers, "layers", where)
        return ImageManifest(
            media_type,
            Descriptor.from_json(obj.get("config"), where),
            tuple(Descriptor.from_json(layer, where) for layer in layers),
        )
    raise UnsupportedManifest(f"{where}: unsupported manifest media type {media_type!r}")


def _check_count(n: int, limit: int | None, what: str, where: str) -> None:
    if limit is not None and n > limit:
        raise ManifestInvalid(
            f"{where}: {n} {what}, more than the {limit} this daemon accepts ([server] "
            "max_layers); nothing was fetched. Squash the image, or raise max_layers if it is "
            "trusted")


def parse_config(raw: bytes, where: str, max_layers: int | None = None) -> ImageConfig:
    """The image config's diff_ids and platform; as ``parse_manifest``, a body bigger than
    ``INLINE_JSON`` belongs in a worker thread."""
    _check_values(raw, max_layers, "image config", where)
    try:
        obj = loads(raw)
        listed = obj["rootfs"]["diff_ids"]
        if isinstance(listed, list):
            _check_count(len(listed), max_layers, "diff_ids in the image config", where)
        diff_ids = tuple(Digest.parse(d) for d in listed)
        if not isinstance(obj, dict):
            raise ManifestInvalid(f"{where}: image config is not a JSON object")
        return ImageConfig(raw, diff_ids, Platform.from_json(obj), obj)
    except (ValueError, KeyError, TypeError, InvalidReference) as e:
        raise ManifestInvalid(f"{where}: image config is invalid ({e})") from e
    except RecursionError:
        raise ManifestInvalid(f"{where}: {_TOO_DEEP}") from None


def select_platform(index: ImageIndex, want: Platform, where: str) -> Descriptor:
    """The index entry for ``want``; attestation and unknown entries are never chosen.

    Raises PlatformNotFound listing what the image offers.
    """
    usable = [d for d in index.manifests if not d.is_attestation]
    chosen = choose(want, [d.platform for d in usable])
    if chosen is None:
        offered = ", ".join(sorted({str(p) for p in index.platforms()})) or "none"
        raise PlatformNotFound(f"{where} has no image for {want}; it offers: {offered}")
    return usable[chosen]


def layer_compression(media_type: str, head: bytes = b"") -> str:
    """'gzip', 'zstd' or 'none', by magic bytes first, then media type."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if head:
        return "none"
    if media_type in LAYER_GZIP_TYPES or media_type.endswith("gzip"):
        return "gzip"
    if media_type in LAYER_ZSTD_TYPES or media_type.endswith("zstd"):
        return "zstd"
    return "none"
