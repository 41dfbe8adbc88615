"""Table tests for manifest parsing and platform selection in indexes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fetchd.digest import Digest
from fetchd.errors import ManifestInvalid, PlatformNotFound, UnsupportedManifest
from fetchd.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INLINE_JSON,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageIndex,
    ImageManifest,
    layer_compression,
    loads,
    parse_config,
    parse_manifest,
    select_platform,
)
from fetchd.platform import Platform


def d(n: int) -> str:
    return str(Digest.of(str(n).encode()))


def entry(n: int, platform: str | None, annotations: dict[str, str] | None = None,
          media_type: str = OCI_MANIFEST) -> dict[str, Any]:
    obj: dict[str, Any] = {"mediaType": media_type, "digest": d(n), "size": 100 + n}
    if platform:
        os_name, arch, *variant = platform.split("/")
        obj["platform"] = {"os": os_name, "architecture": arch, **({"variant": variant[0]} if variant else {})}
    if annotations:
        obj["annotations"] = annotations
    return obj


def index(*entries: dict[str, Any], media_type: str = OCI_INDEX) -> ImageIndex:
    body = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": list(entries)}).encode()
    parsed = parse_manifest(body, media_type, "test")
    assert isinstance(parsed, ImageIndex)
    return parsed


ATTESTATION = {"vnd.docker.reference.type": "attestation-manifest",
               "vnd.docker.reference.digest": d(1)}

SELECT = [
    # wanted, entries (n, platform[, annotations]), chosen n
    ("linux/amd64", [(1, "linux/amd64"), (2, "linux/arm64/v8")], 1),
    ("linux/arm/v7", [(1, "linux/amd64"), (2, "linux/arm/v6")], 2),             # v7 -> v6 fallback
    ("linux/arm/v7", [(1, "linux/arm/v6"), (2, "linux/arm/v7")], 2),
    ("linux/arm64/v8", [(1, "linux/arm64")], 1),                                # arm64 without v8
    ("linux/arm64/v8", [(1, "linux/arm64/v8")], 1),                             # arm64 with v8
    ("linux/amd64", [(9, "unknown/unknown", ATTESTATION), (1, "linux/amd64")], 1),
    ("linux/amd64", [(9, "linux/amd64", ATTESTATION), (1, "linux/amd64")], 1),  # annotated only
    ("linux/386", [(1, "linux/amd64"), (2, "linux/386")], 2),
]


@pytest.mark.parametrize("want,entries,chosen", SELECT)
def test_select_platform(want: str, entries: list[tuple[Any, ...]], chosen: int) -> None:
    idx = index(*(entry(*e) for e in entries))
    assert select_platform(idx, Platform.parse(want), "img").digest == Digest.parse(d(chosen))


def test_no_match_lists_the_offered_platforms_but_not_attestations() -> None:
    idx = index(entry(1, "linux/amd64"), entry(2, "linux/arm64/v8"), entry(3, "unknown/unknown", ATTESTATION))
    with pytest.raises(PlatformNotFound) as info:
        select_platform(idx, Platform.parse("linux/s390x"), "quay.io/x/y:1")
    message = info.value.message
    assert "quay.io/x/y:1" in message and "linux/s390x" in message
    assert "linux/amd64, linux/arm64/v8" in message and "unknown" not in message


def test_docker_list_and_nested_entries_parse() -> None:
    idx = index(entry(1, "linux/amd64", media_type=DOCKER_MANIFEST),
                entry(2, None, media_type=OCI_INDEX), media_type=DOCKER_LIST)
    assert idx.media_type == DOCKER_LIST
    assert [m.media_type for m in idx.manifests] == [DOCKER_MANIFEST, OCI_INDEX]


def manifest_body(media_type: str | None = OCI_MANIFEST, **extra: Any) -> bytes:
    obj: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d(1), "size": 5},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d(2),
                    "size": 7, "urls": ["https://example.com/l"]}],
    }
    if media_type:
        obj["mediaType"] = media_type
    obj.update(extra)
    return json.dumps(obj).encode()


@pytest.mark.parametrize("media_type,content_type", [
    (OCI_MANIFEST, None), (DOCKER_MANIFEST, None), (None, DOCKER_MANIFEST), (None, None),
])
def test_manifest_parses_from_body_or_header_type(media_type: str | None, content_type: str | None) -> None:
    parsed = parse_manifest(manifest_body(media_type), content_type, "m")
    assert isinstance(parsed, ImageManifest)
    assert parsed.media_type == (media_type or content_type or OCI_MANIFEST)
    assert parsed.config.size == 5 and parsed.layers[0].urls == ("https://example.com/l",)


SCHEMA1 = [
    (json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode(), None),
    (b'{"schemaVersion": 1}', "application/vnd.docker.distribution.manifest.v1+prettyjws"),
    (b'{"schemaVersion": 2}', "application/vnd.docker.distribution.manifest.v1+json"),
]


@pytest.mark.parametrize("body,content_type", SCHEMA1)
def test_schema1_is_refused(body: bytes, content_type: str | None) -> None:
    with pytest.raises(UnsupportedManifest, match="schema1"):
        parse_manifest(body, content_type, "old/image:1")


BAD = [
    (b"not json", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX}).encode(), "manifests"),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}}).encode(), "layers"),
    (manifest_body(layers=[{"digest": "sha256:short", "size": 1}]), "bad descriptor"),
    (manifest_body(layers=[{"digest": d(3), "size": -1}]), "invalid size"),
    (manifest_body(layers=[{"digest": d(3), "size": True}]), "invalid size"),
    (manifest_body("application/x-unknown"), "unsupported manifest media type"),
    (b" " * (MAX_MANIFEST_SIZE + 1), "limit"),
    # issue 13: RecursionError escaped as a 500 with a traceback
    (b"[" * 100_000, "nested too deeply"),
    (b'{"schemaVersion": 2, "layers": ' + b"[" * 100_000, "nested too deeply"),
    (b'{"manifests": [{"annotations": {"a": ' + b'{"b": ' * 50_000, "nested too deeply"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m for _, m in BAD])
def test_bad_manifests(body: bytes, message: str) -> None:
    with pytest.raises((ManifestInvalid, UnsupportedManifest), match=message):
        parse_manifest(body, None, "img")


def test_config_gives_diff_ids_and_platform_and_keeps_raw_bytes() -> None:
    raw = json.dumps({"architecture": "arm", "variant": "v7", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": [d(1), d(2)]}}).encode()
    config = parse_config(raw, "c")
    assert config.raw == raw and config.diff_ids == (Digest.parse(d(1)), Digest.parse(d(2)))
    assert config.platform == Platform("linux", "arm", "v7")
    with pytest.raises(ManifestInvalid):
        parse_config(b'{"rootfs": {}}', "c")


@pytest.mark.parametrize("raw", [
    b"[" * 100_000,
    b'{"rootfs": {"diff_ids": ' + b"[" * 100_000,
    b'{"config": ' + b'{"a": ' * 100_000,
], ids=["array", "diff_ids", "object"])
def test_deeply_nested_config_is_a_clear_error(raw: bytes) -> None:
    with pytest.raises(ManifestInvalid, match="nested too deeply"):
        parse_config(raw, "c")


def test_annotations_keep_only_strings() -> None:
    body = manifest_body(layers=[{"digest": d(3), "size": 1,
                                  "annotations": {"a": "x", "b": [[["deep"]]], "c": 1}}])
    image = parse_manifest(body, None, "img")
    assert isinstance(image, ImageManifest)
    assert image.layers[0].annotations == (("a", "x"),)


@pytest.mark.parametrize("media_type,head,want", [
    ("application/vnd.oci.image.layer.v1.tar", b"\x1f\x8b\x08", "gzip"),   # magic wins
    ("application/vnd.oci.image.layer.v1.tar+gzip", b"\x28\xb5\x2f\xfd", "zstd"),
    ("application/vnd.oci.image.layer.v1.tar+gzip", b"ustar", "none"),
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", b"", "gzip"),
    ("application/vnd.oci.image.layer.v1.tar+zstd", b"", "zstd"),
    ("application/vnd.oci.image.layer.v1.tar", b"", "none"),
])
def test_layer_compression(media_type: str, head: bytes, want: str) -> None:
    assert layer_compression(media_type, head) == want


def _many_layers(n: int, **extra: Any) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST, **extra,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d(0),
                       "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": d(i), "size": i, "annotations": {"n": f"\u00e9{i}\ud83d"}}
                       for i in range(1, n + 1)]}


BIG = {
    "utf-8": json.dumps(_many_layers(3000)).encode(),
    "utf-8 unescaped, floats and constants": json.dumps(
        _many_layers(3000, x=[1.5e300, -0.0, True, None, "\u00e9"]), ensure_ascii=False
    ).encode("utf-8", "surrogatepass"),
    "utf-8 with BOM": b"\xef\xbb\xbf" + json.dumps(_many_layers(3000)).encode(),
    "utf-16": json.dumps(_many_layers(3000)).encode("utf-16-le"),
}


@pytest.mark.parametrize("body", BIG.values(), ids=BIG.keys())
def test_a_big_document_decodes_as_json_loads_does(body: bytes) -> None:
    """Bigger than INLINE_JSON: decoded with a callback per object (where a worker thread
    lets the GIL go), with the same result as json.loads."""
    assert len(body) > INLINE_JSON
    assert loads(body) == json.loads(body)
    image = parse_manifest(body, None, "img", max_layers=4096)
    assert isinstance(image, ImageManifest) and len(image.layers) == 3000


@pytest.mark.parametrize("body,message", [
    (json.dumps(_many_layers(3000)).encode()[:-1], "not valid JSON"),
    (b" " * INLINE_JSON + b"[" * 50_000, "nested too deeply"),
    (json.dumps(_many_layers(5000)).encode(), "5000 layers, more than the 4096"),
], ids=["cut", "deep", "too many layers"])
def test_a_big_bad_document_is_a_clear_error(body: bytes, message: str) -> None:
    assert len(body) > INLINE_JSON
    with pytest.raises(ManifestInvalid, match=message):
        parse_manifest(body, None, "img", max_layers=4096)


# Cheap to send, costly to decode: hundreds of thousands of JSON values in a few MB.
FLOODS = {
    "nested arrays": json.dumps({"schemaVersion": 2, "layers": [[1]] * 600_000}).encode(),
    "strings": json.dumps({"schemaVersion": 2, "layers": ["ab"] * 600_000}).encode(),
    "objects": json.dumps({"schemaVersion": 2, "layers": [{}] * 600_000}).encode(),
}


@pytest.mark.parametrize("body", FLOODS.values(), ids=FLOODS.keys())
def test_a_flood_of_json_values_is_refused_before_it_is_decoded(
        body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    import fetchd.manifest

    decoded: list[int] = []
    monkeypatch.setattr(fetchd.manifest, "loads", lambda raw: decoded.append(len(raw)))
    with pytest.raises(ManifestInvalid, match="JSON values .* more than one of at most 4096 "
                                              r"layers needs \(\[server\] max_layers\)"):
        parse_manifest(body, None, "img", max_layers=4096)
    with pytest.raises(ManifestInvalid, match="the image config holds about"):
        parse_config(body, "img", max_layers=4096)
    assert decoded == []


def test_the_value_bound_follows_max_layers() -> None:
    """A 20000-layer manifest passes the value bound (its layer count is the error), and so
    does any manifest once max_layers admits its layers."""
    body = json.dumps(_many_layers(20000)).encode()
    with pytest.raises(ManifestInvalid, match="20000 layers, more than the 4096"):
        parse_manifest(body, None, "img", max_layers=4096)
    image = parse_manifest(body, None, "img", max_layers=20000)
    assert isinstance(image, ImageManifest) and len(image.layers) == 20000
