"""The test infrastructure itself: the catalog really is in the registry, as skopeo sees it."""

from __future__ import annotations

import json
import subprocess

import pytest
from support.images import CATALOG_NAMES, MULTI_OCI_PLATFORMS, Catalog, decompress

from fetchd.digest import Digest
from fetchd.manifest import (
    DOCKER_LIST,
    OCI_INDEX,
    ImageIndex,
    ImageManifest,
    parse_config,
    parse_manifest,
)


def skopeo(*args: str) -> str:
    r = subprocess.run(["skopeo", *args], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_catalog_has_every_image(images: Catalog) -> None:
    assert sorted(images) == sorted(CATALOG_NAMES)
    for img in images.values():
        assert img.reference == f"{images.host}/{img.repository}:{img.tag}"


@pytest.mark.parametrize("name", ["multi-oci", "multi-docker", "single-docker", "zstd"])
def test_raw_manifest_matches_skopeo(images: Catalog, name: str) -> None:
    img = images[name]
    raw = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{img.reference}")
    assert Digest.of(raw.encode()) == img.digest
    assert json.loads(raw)["mediaType"] == img.media_type


@pytest.mark.parametrize("platform", MULTI_OCI_PLATFORMS)
def test_multi_oci_platforms_as_skopeo_selects_them(images: Catalog, platform: str) -> None:
    part = images["multi-oci"].platform(platform)
    args = ["--override-arch", part.platform.architecture]
    if part.platform.variant:
        args += ["--override-variant", part.platform.variant]
    out = json.loads(skopeo("inspect", "--tls-verify=false", *args, f"docker://{images['multi-oci'].reference}"))
    assert out["Architecture"] == part.platform.architecture
    assert out["Layers"] == [str(layer.digest) for layer in part.layers]
    config = json.loads(skopeo("inspect", "--tls-verify=false", "--config", *args,
                               f"docker://{images['multi-oci'].reference}"))
    assert config["rootfs"]["diff_ids"] == [str(d) for d in part.diff_ids]


def test_catalog_is_consistent_with_fetchd_parsers(images: Catalog) -> None:
    for img in images.values():
        top = parse_manifest(img.raw, img.media_type, img.name)
        if img.media_type in (OCI_INDEX, DOCKER_LIST):
            assert isinstance(top, ImageIndex)
            assert {str(p) for p in top.platforms()} == set(img.platforms)
        for part in img.platforms.values():
            m = parse_manifest(part.manifest_bytes, part.manifest_media_type, img.name)
            assert isinstance(m, ImageManifest)
            assert m.config.digest == part.config_digest == Digest.of(part.config_bytes)
            assert [d.digest for d in m.layers] == [layer.digest for layer in part.layers]
            config = parse_config(part.config_bytes, img.name)
            assert config.diff_ids == part.diff_ids
            assert config.platform == part.platform
            for layer in part.layers:
                assert Digest.of(layer.read()) == layer.digest and layer.size == len(layer.read())
                assert Digest.of(decompress(layer.read(), layer.compression)) == layer.diff_id


def test_multi_oci_shares_base_and_has_attestation(images: Catalog) -> None:
    img = images["multi-oci"]
    bases = {p.layers[0].digest for p in img.platforms.values()}
    assert len(bases) == 1
    tops = {p.layers[-1].digest for p in img.platforms.values()}
    assert len(tops) == len(img.platforms)
    index = json.loads(img.raw)
    att = [m for m in index["manifests"] if m.get("annotations", {}).get("vnd.docker.reference.type")]
    assert len(att) == 1 and att[0]["platform"] == {"architecture": "unknown", "os": "unknown"}


def test_special_layers(images: Catalog) -> None:
    zstd_layer = images["zstd"].only.layers[1]
    assert zstd_layer.read().count(b"\x28\xb5\x2f\xfd") >= 3
    mm = images["multimember"].only.layers[1]
    assert mm.read().count(b"\x1f\x8b\x08") >= 3
    assert len(images["layers40"].only.layers) == 40
    assert len({layer.digest for layer in images["layers40"].only.layers}) == 40
    dup = images["dup-layer"].only.layers
    assert dup[1].digest == dup[3].digest
    a, b = images["shared-a"].only.layers, images["shared-b"].only.layers
    assert a[:2] == b[:2] and a[2] != b[2]
