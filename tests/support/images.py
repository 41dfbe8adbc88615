"""Deterministic test images, pushed into a registry through its HTTP API.

Everything is generated from fixed seeds: the same code on the same host yields the same
blobs and digests (gzip/zstd bytes can differ between library versions, so tests must
compare against the catalog's values, never against hard-coded digests).

Building is pure (``build_catalog()``, ``make_layer()``, ``make_image()``); pushing is a
separate step (``push_image()``) that returns a copy of the image bound to a registry host.

Catalog (``CATALOG_NAMES``):

- ``multi-oci``: OCI index, 9 linux platforms (amd64, arm64/v8, arm/v7, arm/v6, 386,
  ppc64le, riscv64, s390x, mips64le), 2-3 gzip layers each, one base layer shared by all,
  plus a BuildKit attestation entry (``unknown/unknown``) for amd64.
- ``multi-docker``: Docker manifest list: amd64, arm64 (no variant), arm/v7, 386.
- ``single-oci`` / ``single-docker``: one linux/amd64 manifest, no index.
- ``zstd``: OCI, two zstd layers, the second made of 3 zstd frames.
- ``uncompressed``: OCI, two plain tar layers.
- ``multimember``: OCI, one normal gzip layer and one of 3 gzip members.
- ``layers40``: Docker schema2, 40 distinct small gzip layers.
- ``dup-layer``: OCI whose layer list holds the same (empty) layer twice.
- ``shared-a`` / ``shared-b``: OCI, share their two base layers, each has its own top layer.
- ``big`` (``build_big_layer()`` + ``big_image`` fixture): one ~175 MB gzip layer of ~575 MB tar.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import os
import random
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import zstandard

from fetchd.digest import Digest
from fetchd.manifest import (
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
)
from fetchd.platform import Platform

Compression = Literal["gzip", "gzip-multi", "zstd", "zstd-multi", "none"]
Flavor = Literal["oci", "docker"]

LAYER_TYPES: dict[tuple[Flavor, str], str] = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
}
ATTESTATION_LAYER = "application/vnd.in-toto+json"
MTIME = 1_700_000_000  # fixed, non-zero like real layers
CREATED = "2024-05-01T12:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CATALOG_NAMES = (
    "multi-oci", "multi-docker", "single-oci", "single-docker", "zstd", "uncompressed",
    "multimember", "layers40", "dup-layer", "shared-a", "shared-b",
)
MULTI_OCI_PLATFORMS = (
    "linux/amd64", "linux/arm64/v8", "linux/arm/v7", "linux/arm/v6", "linux/386",
    "linux/ppc64le", "linux/riscv64", "linux/s390x", "linux/mips64le",
)
MULTI_DOCKER_PLATFORMS = ("linux/amd64", "linux/arm64", "linux/arm/v7", "linux/386")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Layer:
    """One layer blob. ``data`` holds the blob bytes (small layers) or ``path`` the file (big)."""

    media_type: str
    digest: Digest
    size: int
    diff_id: Digest
    compression: str  # gzip | zstd | none (as fetchd.manifest.layer_compression says)
    tar_size: int
    data: bytes | None = field(default=None, repr=False)
    path: Path | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def tar(self) -> bytes:
        """The uncompressed layer tar (hashes to ``diff_id``)."""
        return decompress(self.read(), self.compression)

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}


@dataclass(frozen=True)
class PlatformImage:
    """One image manifest of a catalog entry, with its config and layers."""

    platform: Platform
    manifest_digest: Digest
    manifest_media_type: str
    manifest_bytes: bytes = field(repr=False)
    config_digest: Digest
    config_media_type: str
    config_bytes: bytes = field(repr=False)
    layers: tuple[Layer, ...]

    @property
    def diff_ids(self) -> tuple[Digest, ...]:
        return tuple(layer.diff_id for layer in self.layers)

    @property
    def manifest_size(self) -> int:
        return len(self.manifest_bytes)

    @property
    def config_size(self) -> int:
        return len(self.config_bytes)

    def manifest_descriptor(self) -> Descriptor:
        return Descriptor(self.manifest_media_type, self.manifest_digest, len(self.manifest_bytes),
                          platform=self.platform)

    def config_descriptor(self) -> Descriptor:
        return Descriptor(self.config_media_type, self.config_digest, len(self.config_bytes))


@dataclass(frozen=True, eq=False)
class CatalogImage:
    """A test image: its top manifest (index or manifest) and every platform's parts.

    ``host`` is empty until the image is pushed (``push_image`` returns a bound copy).
    ``platforms`` is keyed by ``str(Platform)``: ``"linux/arm64/v8"``, ``"linux/amd64"``.
    """

    name: str
    repository: str
    tag: str
    digest: Digest
    media_type: str
    raw: bytes = field(repr=False)
    platforms: Mapping[str, PlatformImage] = field(repr=False)
    attestation: PlatformImage | None = field(default=None, repr=False)
    host: str = ""

    @property
    def reference(self) -> str:
        """``127.0.0.1:PORT/repo:tag``."""
        return self.ref()

    @property
    def reference_by_digest(self) -> str:
        return self.ref(by_digest=True)

    def ref(self, host: str | None = None, *, by_digest: bool = False, tag: str | None = None) -> str:
        """The reference through another host (e.g. a proxy's ``.host``), by tag or digest."""
        h = host if host is not None else self.host
        if not h:
            raise ValueError(f"image {self.name} is not pushed yet: no registry host")
        if by_digest:
            return f"{h}/{self.repository}@{self.digest}"
        return f"{h}/{self.repository}:{tag or self.tag}"

    @property
    def is_index(self) -> bool:
        return self.media_type in (OCI_INDEX, DOCKER_LIST)

    def platform(self, which: str | Platform) -> PlatformImage:
        key = str(which if isinstance(which, Platform) else Platform.parse(which))
        try:
            return self.platforms[key]
        except KeyError:
            raise KeyError(f"{self.name} has no {key}; it has {sorted(self.platforms)}") from None

    @property
    def only(self) -> PlatformImage:
        """The single platform image (single-manifest images and one-platform indexes)."""
        if len(self.platforms) != 1:
            raise ValueError(f"{self.name} has {len(self.platforms)} platforms")
        return next(iter(self.platforms.values()))

    def all_parts(self) -> list[PlatformImage]:
        parts = list(self.platforms.values())
        return parts + ([self.attestation] if self.attestation else [])

    def blob_digests(self) -> set[Digest]:
        """Every distinct config and layer digest (attestation included)."""
        out: set[Digest] = set()
        for p in self.all_parts():
            out.add(p.config_digest)
            out.update(layer.digest for layer in p.layers)
        return out


class Catalog(dict[str, CatalogImage]):
    """``name -> CatalogImage`` for the images pushed into one registry (``.host``)."""

    def __init__(self, images: Iterable[CatalogImage], host: str) -> None:
        super().__init__((img.name, img) for img in images)
        self.host = host


# --------------------------------------------------------------------------- content


def prng_bytes(seed: str, n: int) -> bytes:
    """``n`` pseudo-random bytes, the same for the same seed (random.Random str seeding is stable)."""
    return random.Random(seed).randbytes(n)


_VOCAB_RNG = random.Random("fetchd-vocabulary")
_WORDS = ["".join(_VOCAB_RNG.choices("etaoinshrdlcumwfgypbvkjxqz", k=_VOCAB_RNG.randint(2, 11)))
          for _ in range(3000)]
_SEPS = [" "] * 12 + ["\n", "=", "/", ", ", "(", ")", "; ", "\n    "]


def text_bytes(seed: str, n: int) -> bytes:
    """``n`` bytes of word-like text (gzip ratio about 2.3:1)."""
    rng = random.Random(seed)
    k = n // 6 + 16
    words, seps = rng.choices(_WORDS, k=k), rng.choices(_SEPS, k=k)
    out = "".join(w + s for w, s in zip(words, seps, strict=True)).encode()
    while len(out) < n:  # rare: short words
        out += out
    return out[:n]


@dataclass(frozen=True)
class Entry:
    """One tar member: a file (``data``), a directory (``kind='dir'``), a symlink or hard link."""

    path: str
    data: bytes = b""
    kind: Literal["file", "dir", "symlink", "link"] = "file"
    target: str = ""
    mode: int = 0o644


def _tarinfo(e: Entry) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(e.path)
    ti.mtime = MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mode = e.mode
    if e.kind == "dir":
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
    elif e.kind == "symlink":
        ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e.target, 0o777
    elif e.kind == "link":
        ti.type, ti.linkname = tarfile.LNKTYPE, e.target
    else:
        ti.size = len(e.data)
    return ti


def make_tar(entries: Iterable[Entry]) -> bytes:
    """A deterministic PAX tar: fixed mtime, uid/gid 0, members in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = _tarinfo(e)
            tf.addfile(ti, io.BytesIO(e.data) if ti.isreg() else None)
    return buf.getvalue()


def _split(data: bytes, parts: int) -> list[bytes]:
    step = max(1, -(-len(data) // parts))
    return [data[i:i + step] for i in range(0, len(data), step)] or [b""]


def compress(tar: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        c = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip header with mtime 0
        return c.compress(tar) + c.flush()
    if compression == "gzip-multi":
        return b"".join(compress(p, "gzip") for p in _split(tar, 3))
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar)
    if compression == "zstd-multi":
        cctx = zstandard.ZstdCompressor(level=3)
        return b"".join(cctx.compress(p) for p in _split(tar, 3))
    if compression == "none":
        return tar
    raise ValueError(f"unknown compression {compression!r}")


def decompress(data: bytes, compression: str) -> bytes:
    """Across all gzip members / zstd frames."""
    if compression.startswith("gzip"):
        out, d = [], None
        rest = data
        while rest:
            d = zlib.decompressobj(31)
            out.append(d.decompress(rest))
            rest = d.unused_data
        return b"".join(out)
    if compression.startswith("zstd"):
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
        return reader.read()
    return data


def make_layer(
    entries: Iterable[Entry] | bytes,
    compression: Compression = "gzip",
    flavor: Flavor = "oci",
) -> Layer:
    """A layer from tar entries (or ready tar bytes), compressed as asked."""
    tar = entries if isinstance(entries, bytes) else make_tar(entries)
    blob = compress(tar, compression)
    base = compression.split("-")[0]
    media_type = LAYER_TYPES[(flavor, base)]
    return Layer(media_type, Digest.of(blob), len(blob), Digest.of(tar), base, len(tar), data=blob)


def _go_json(obj: Any) -> bytes:
    """Compact JSON escaped like Go's encoding/json (``<>&`` as \\u00XX), as registries serve it."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def make_config(
    platform: Platform,
    layers: Sequence[Layer],
    *,
    cmd: Sequence[str] = ("/bin/sh",),
    history: Sequence[str] | None = None,
    env: Sequence[str] = (PATH_ENV,),
) -> bytes:
    """A realistic image config (Docker/BuildKit shape) for ``layers``."""
    hist = list(history) if history else [f"/bin/sh -c #(nop) ADD file:{layer.diff_id.hex[:16]} in / "
                                         for layer in layers]
    cfg: dict[str, Any] = {"architecture": platform.architecture}
    cfg["config"] = {"Env": list(env), "Cmd": list(cmd), "WorkingDir": "/", "Labels": None}
    cfg["created"] = CREATED
    cfg["history"] = [{"created": CREATED, "created_by": h} for h in hist]
    cfg["os"] = platform.os
    cfg["rootfs"] = {"type": "layers", "diff_ids": [str(layer.diff_id) for layer in layers]}
    if platform.variant:
        cfg["variant"] = platform.variant
    return _go_json(cfg)


def make_image(
    platform: Platform | str,
    layers: Sequence[Layer],
    *,
    flavor: Flavor = "oci",
    config: bytes | None = None,
    **config_args: Any,
) -> PlatformImage:
    """One manifest (OCI or Docker schema2) with its config."""
    plat = platform if isinstance(platform, Platform) else Platform.parse(platform)
    config_bytes = config if config is not None else make_config(plat, layers, **config_args)
    config_type = OCI_CONFIG if flavor == "oci" else DOCKER_CONFIG
    media_type = OCI_MANIFEST if flavor == "oci" else DOCKER_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config_type, "digest": str(Digest.of(config_bytes)),
                   "size": len(config_bytes)},
        "layers": [layer.to_json() for layer in layers],
    }
    raw = json.dumps(manifest, indent=3).encode()  # pretty like docker/buildkit push it
    return PlatformImage(plat, Digest.of(raw), media_type, raw, Digest.of(config_bytes), config_type,
                         config_bytes, tuple(layers))


def _platform_json(p: Platform) -> dict[str, str]:
    out = {"architecture": p.architecture, "os": p.os}
    if p.variant:
        out["variant"] = p.variant
    return out


def make_index(
    name: str,
    repository: str,
    tag: str,
    parts: Sequence[PlatformImage],
    *,
    flavor: Flavor = "oci",
    attestation: PlatformImage | None = None,
) -> CatalogImage:
    media_type = OCI_INDEX if flavor == "oci" else DOCKER_LIST
    entries: list[dict[str, Any]] = [
        {"mediaType": p.manifest_media_type, "digest": str(p.manifest_digest),
         "size": p.manifest_size, "platform": _platform_json(p.platform)}
        for p in parts
    ]
    if attestation is not None:
        entries.append({
            "mediaType": attestation.manifest_media_type, "digest": str(attestation.manifest_digest),
            "size": attestation.manifest_size,
            "annotations": {"vnd.docker.reference.digest": str(parts[0].manifest_digest),
                            "vnd.docker.reference.type": "attestation-manifest"},
            "platform": {"architecture": "unknown", "os": "unknown"},
        })
    raw = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries},
                     indent=2).encode()
    return CatalogImage(name, repository, tag, Digest.of(raw), media_type, raw,
                        {str(p.platform): p for p in parts}, attestation)


def single(name: str, repository: str, tag: str, part: PlatformImage) -> CatalogImage:
    return CatalogImage(name, repository, tag, part.manifest_digest, part.manifest_media_type,
                        part.manifest_bytes, {str(part.platform): part})


# --------------------------------------------------------------------------- catalog


def _base_entries(seed: str, label: str) -> list[Entry]:
    """A tiny root filesystem: dirs, text files, a 'binary', a symlink and a hard link."""
    return [
        Entry("bin", kind="dir"), Entry("etc", kind="dir"), Entry("usr", kind="dir"),
        Entry("usr/bin", kind="dir"), Entry("usr/share", kind="dir"),
        Entry("usr/share/doc", kind="dir"),
        Entry("etc/os-release", f'PRETTY_NAME="fetchd test {label}"\nID=fetchd\n'.encode()),
        Entry("etc/motd", b"welcome\n"),
        Entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry("usr/bin/busybox", prng_bytes(seed + "/busybox", 12_000), mode=0o755),
        Entry("bin/sh", kind="symlink", target="/usr/bin/busybox"),
        Entry("usr/bin/sh", kind="link", target="usr/bin/busybox", mode=0o755),
        Entry("usr/share/doc/README", text_bytes(seed + "/readme", 20_000)),
    ]


def _app_entries(seed: str, label: str, size: int = 16_000) -> list[Entry]:
    return [
        Entry("opt", kind="dir"), Entry("opt/app", kind="dir"),
        Entry("opt/app/app", prng_bytes(seed + "/app", size), mode=0o755),
        Entry("opt/app/platform.txt", label.encode() + b"\n"),
        Entry("opt/app/notes.txt", text_bytes(seed + "/notes", size)),
    ]


def _extra_entries(seed: str, label: str) -> list[Entry]:
    return [
        Entry("etc/app.conf", f"platform={label}\nseed={seed}\n".encode()),
        Entry("etc/.wh.motd"),  # whiteout: removes etc/motd of the base layer
    ]


def _attestation(seed: str) -> PlatformImage:
    statement = _go_json({"_type": "https://in-toto.io/Statement/v0.1", "subject": [],
                          "predicateType": "https://spdx.dev/Document", "predicate": {"seed": seed}})
    layer = Layer(ATTESTATION_LAYER, Digest.of(statement), len(statement), Digest.of(statement),
                  "none", len(statement), data=statement)
    config = _go_json({"architecture": "unknown", "os": "unknown", "config": {},
                       "rootfs": {"type": "layers", "diff_ids": [str(layer.diff_id)]}})
    return make_image(Platform("unknown", "unknown"), [layer], config=config)


def _multi(name: str, platforms: Sequence[str], flavor: Flavor) -> CatalogImage:
    base = make_layer(_base_entries(name + "/base", name), "gzip", flavor)
    parts = []
    for i, plat in enumerate(platforms):
        seed = f"{name}/{plat}"
        layers = [base, make_layer(_app_entries(seed, plat, 8_000 + 2_000 * i), "gzip", flavor)]
        if i < 3:
            layers.append(make_layer(_extra_entries(seed, plat), "gzip", flavor))
        parts.append(make_image(plat, layers, flavor=flavor, cmd=("/opt/app/app",)))
    attestation = _attestation(name) if flavor == "oci" else None
    return make_index(name, f"fetchd-test/{name}", "latest", parts, flavor=flavor,
                      attestation=attestation)


def _simple(name: str, flavor: Flavor, compressions: Sequence[Compression], **kw: Any) -> CatalogImage:
    layers = [make_layer(_base_entries(name + "/base", name), compressions[0], flavor)]
    for i, comp in enumerate(compressions[1:]):
        layers.append(make_layer(_app_entries(f"{name}/{i}", name, 30_000), comp, flavor))
    return single(name, f"fetchd-test/{name}", "v1", make_image("linux/amd64", layers, flavor=flavor, **kw))


def build_catalog() -> list[CatalogImage]:
    """Every small catalog image, not yet pushed. Pure and deterministic; takes well under a second."""
    images = [
        _multi("multi-oci", MULTI_OCI_PLATFORMS, "oci"),
        _multi("multi-docker", MULTI_DOCKER_PLATFORMS, "docker"),
        _simple("single-oci", "oci", ["gzip", "gzip"]),
        # A shell command with && and <>: the raw config has Go's \u0026 escapes (FACTS 5).
        _simple("single-docker", "docker", ["gzip", "gzip"],
                cmd=("/bin/sh", "-c", "test -x /opt/app/app && exec /opt/app/app <in >out"),
                history=["/bin/sh -c #(nop) ADD file:base in / ",
                         "/bin/sh -c apt-get update && apt-get install -y app"]),
        _simple("zstd", "oci", ["zstd", "zstd-multi"]),
        _simple("uncompressed", "oci", ["none", "none"]),
        _simple("multimember", "oci", ["gzip", "gzip-multi"]),
    ]
    layers = [make_layer([Entry(f"layer{i:02d}", kind="dir"),
                          Entry(f"layer{i:02d}/file", text_bytes(f"layers40/{i}", 500 + 37 * i))],
                         "gzip", "docker") for i in range(40)]
    images.append(single("layers40", "fetchd-test/layers40", "v1",
                         make_image("linux/amd64", layers, flavor="docker")))
    # Empty layers (1024 zero bytes of tar) recur in real images, even twice in one list.
    empty = make_layer(b"\0" * 1024, "gzip")
    dup_layers = [make_layer(_base_entries("dup/base", "dup")), empty,
                  make_layer(_app_entries("dup/app", "dup")), empty]
    images.append(single("dup-layer", "fetchd-test/dup-layer", "v1",
                         make_image("linux/amd64", dup_layers)))
    shared = [make_layer(_base_entries("shared/base", "shared")),
              make_layer(_app_entries("shared/mid", "shared", 24_000))]
    for name in ("shared-a", "shared-b"):
        top = make_layer(_extra_entries(name, name))
        images.append(single(name, f"fetchd-test/{name}", "v1",
                             make_image("linux/amd64", [*shared, top])))
    assert [i.name for i in images] == list(CATALOG_NAMES)
    return images


# --------------------------------------------------------------------------- pushing

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


class PushError(RuntimeError):
    pass


def _request(method: str, url: str, data: bytes | BinaryIO | None = None,
             headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(req, timeout=120) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def registry_url(registry: Any) -> str:
    """Accepts a LocalRegistry (``.url``), a ``host:port`` or an ``http://`` URL."""
    url = getattr(registry, "url", registry)
    return url if url.startswith("http") else f"http://{url}"


def push_blob(registry: Any, repository: str, digest: Digest, size: int,
              data: bytes | None = None, path: Path | None = None) -> bool:
    """Upload one blob (POST, then monolithic PUT). Returns False when it already existed."""
    base = registry_url(registry)
    status, _, _ = _request("HEAD", f"{base}/v2/{repository}/blobs/{digest}")
    if status == 200:
        return False
    status, headers, body = _request("POST", f"{base}/v2/{repository}/blobs/uploads/", b"")
    if status != 202:
        raise PushError(f"POST upload {repository}: {status} {body[:300]!r}")
    location = urllib.parse.urljoin(base + "/", headers["Location"])
    sep = "&" if "?" in location else "?"
    put_headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    if path is not None:
        with open(path, "rb") as f:
            status, _, body = _request("PUT", f"{location}{sep}digest={digest}", f, put_headers)
    else:
        status, _, body = _request("PUT", f"{location}{sep}digest={digest}", data, put_headers)
    if status != 201:
        raise PushError(f"PUT blob {repository}@{digest}: {status} {body[:300]!r}")
    return True


def put_manifest(registry: Any, repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
    base = registry_url(registry)
    status, headers, body = _request("PUT", f"{base}/v2/{repository}/manifests/{reference}", raw,
                                     {"Content-Type": media_type})
    if status != 201:
        raise PushError(f"PUT manifest {repository}:{reference}: {status} {body[:500]!r}")
    digest = Digest.parse(headers["Docker-Content-Digest"])
    if digest != Digest.of(raw):
        raise PushError(f"registry stored {repository}:{reference} as {digest}, expected {Digest.of(raw)}")
    return digest


def push_image(registry: Any, image: CatalogImage, *, repository: str | None = None,
               tag: str | None = None) -> CatalogImage:
    """Push blobs, then platform manifests by digest, then the top manifest by tag.

    Returns the image bound to the registry's host (and to ``repository``/``tag`` when given,
    which is how a tag is moved: push another image under the same repository and tag).
    """
    repo = repository or image.repository
    the_tag = tag or image.tag
    for part in image.all_parts():
        push_blob(registry, repo, part.config_digest, part.config_size, data=part.config_bytes)
        for layer in part.layers:
            push_blob(registry, repo, layer.digest, layer.size, data=layer.data, path=layer.path)
    if image.is_index:
        for part in image.all_parts():
            put_manifest(registry, repo, str(part.manifest_digest), part.manifest_bytes,
                         part.manifest_media_type)
    put_manifest(registry, repo, the_tag, image.raw, image.media_type)
    host = registry_url(registry).split("://", 1)[1]
    return dataclasses.replace(image, repository=repo, tag=the_tag, host=host)


def push_custom(registry: Any, repository: str, tag: str, layers: Sequence[Layer], *,
                platform: str | Platform = "linux/amd64", flavor: Flavor = "oci",
                config: bytes | None = None, **config_args: Any) -> CatalogImage:
    """Build a single-manifest image from ``layers`` (and optional raw ``config``) and push it."""
    part = make_image(platform, layers, flavor=flavor, config=config, **config_args)
    return push_image(registry, single(f"{repository}:{tag}", repository, tag, part))


def move_tag(registry: Any, image: CatalogImage, to: CatalogImage) -> CatalogImage:
    """Point ``image``'s repository:tag at ``to``'s content. Returns the moved-tag image."""
    return push_image(registry, to, repository=image.repository, tag=image.tag)


def push_catalog(registry: Any, images: Iterable[CatalogImage] | None = None) -> Catalog:
    """Push every image (in parallel: they live in distinct repositories)."""
    todo = list(images if images is not None else build_catalog())
    with ThreadPoolExecutor(8) as pool:
        pushed = list(pool.map(lambda img: push_image(registry, img), todo))
    return Catalog(pushed, registry_url(registry).split("://", 1)[1])


# --------------------------------------------------------------------------- big image

BIG_VERSION = 2
BIG_TAR_TARGET = 560 * 1024 * 1024


def default_cache_dir() -> Path:
    env = os.environ.get("FETCHD_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fetchd-tests"


class GzipSink(io.RawIOBase):
    """Tar output -> (hash tar) -> gzip -> (hash blob) -> file.

    ``compressor`` defaults to zlib level 6, like Go's gzip default (what registries hold):
    isal output would inflate noticeably slower with zlib than real layers do.
    """

    def __init__(self, out: BinaryIO, compressor: Any = None) -> None:
        self.out = out
        self.tar_hash, self.blob_hash = hashlib.sha256(), hashlib.sha256()
        self.tar_size = self.blob_size = 0
        self.comp = compressor if compressor is not None else zlib.compressobj(6, zlib.DEFLATED, 31)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.tar_hash.update(data)
        self.tar_size += len(data)
        self._emit(self.comp.compress(data))
        return len(data)

    def _emit(self, chunk: bytes) -> None:
        if chunk:
            self.blob_hash.update(chunk)
            self.blob_size += len(chunk)
            self.out.write(chunk)

    def finish(self) -> None:
        self._emit(self.comp.flush())


def rootfs_bytes(rng: random.Random, pool: bytes, size: int, *, random_share: float = 0.03,
                 text_share: float = 0.30, run: int = 120) -> bytes:
    """A rootfs-like file: mostly ELF-ish blocks (short random runs among zeros) and text from
    ``pool``, with ``random_share`` of incompressible blocks (compressed docs, images)."""
    parts, left = [], size
    while left > 0:
        n = min(left, 16384)
        kind = rng.random()
        if kind < random_share:
            parts.append(rng.randbytes(n))
        elif kind < text_share:
            off = rng.randrange(0, len(pool) - n)
            parts.append(pool[off:off + n])
        else:
            chunk = bytearray(n)
            for pos in range(0, n, 1024):
                length = min(run, n - pos)
                chunk[pos:pos + length] = rng.randbytes(length)
            parts.append(bytes(chunk))
        left -= n
    return b"".join(parts)


def build_big_layer(cache_dir: Path | None = None) -> Layer:
    """The big gzip layer (~575 MB tar, ~3:1), generated once and cached on disk.

    Invariant: the returned layer's ``path`` holds exactly ``size`` bytes hashing to ``digest``;
    a cache entry is written to a temporary name and renamed, under a lock, so concurrent test
    sessions never see a partial file.
    """
    root = (cache_dir or default_cache_dir()) / f"big-v{BIG_VERSION}"
    root.mkdir(parents=True, exist_ok=True)
    blob, meta_path = root / "layer.tar.gz", root / "meta.json"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if meta_path.exists() and blob.exists():
            meta = json.loads(meta_path.read_text())
            if blob.stat().st_size == meta["size"]:
                return _big_from_meta(blob, meta)
        tmp = root / "layer.tar.gz.tmp"
        with open(tmp, "wb") as out:
            sink = GzipSink(out)
            _write_big_tar(sink)
            sink.finish()
            out.flush()
            os.fsync(out.fileno())
        meta = {"digest": f"sha256:{sink.blob_hash.hexdigest()}", "size": sink.blob_size,
                "diff_id": f"sha256:{sink.tar_hash.hexdigest()}", "tar_size": sink.tar_size}
        os.replace(tmp, blob)
        meta_path.write_text(json.dumps(meta))
        return _big_from_meta(blob, meta)


def _big_from_meta(blob: Path, meta: dict[str, Any]) -> Layer:
    return Layer(LAYER_TYPES[("docker", "gzip")], Digest.parse(meta["digest"]), meta["size"],
                 Digest.parse(meta["diff_id"]), "gzip", meta["tar_size"], path=blob)


def _write_big_tar(sink: GzipSink) -> None:
    rng = random.Random("fetchd-big-v1")
    pool = text_bytes("fetchd-big-pool", 8 * 1024 * 1024)
    buffered = io.BufferedWriter(sink, 1 << 20)
    with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        total, d = 0, 0
        while total < BIG_TAR_TARGET:
            dirname = f"usr/lib/pkg{d:03d}"
            tf.addfile(_tarinfo(Entry(dirname, kind="dir")))
            for f in range(rng.randint(5, 40)):
                # Log-uniform sizes 512 B .. 2 MB, a few large ones (like libLLVM, locales).
                size = int(2 ** rng.uniform(9, 21)) if rng.random() > 0.01 else rng.randint(8, 30) << 20
                data = rootfs_bytes(rng, pool, size)
                tf.addfile(_tarinfo(Entry(f"{dirname}/file{f:03d}", data, mode=0o755 if f % 3 else 0o644)),
                           io.BytesIO(data))
                total += size + 512
            d += 1
    buffered.flush()


def make_big_image(layer: Layer) -> CatalogImage:
    """The ``big`` catalog image: a Docker schema2 linux/amd64 manifest with the one big layer."""
    part = make_image("linux/amd64", [layer], flavor="docker",
                      cmd=("/bin/bash",), history=["/bin/sh -c #(nop) ADD file:rootfs in / "])
    return single("big", "fetchd-test/big", "latest", part)
