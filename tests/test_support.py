"""The test infrastructure itself: the catalog really is in the registry, as skopeo sees it."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from support.images import (
    CATALOG_NAMES,
    MULTI_OCI_PLATFORMS,
    Catalog,
    CatalogImage,
    Entry,
    Layer,
    decompress,
    make_layer,
    move_tag,
    push_custom,
    push_image,
)
from support.proxy import RegistryProxy
from support.registry import LocalRegistry

from fetchd.digest import Digest
from fetchd.manifest import (
    ACCEPT,
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


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=30) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _blob_url(proxy: RegistryProxy, img: CatalogImage, layer: Layer) -> str:
    return f"{proxy.url}/v2/{img.repository}/blobs/{layer.digest}"


def test_proxy_counts_requests_and_body_bytes(images: Catalog, proxy: RegistryProxy) -> None:
    img = images["single-oci"]
    layer = img.only.layers[1]
    for _ in range(2):
        status, _, body = _get(_blob_url(proxy, img, layer))
        assert status == 200 and Digest.of(body) == layer.digest
    assert proxy.blob_gets(layer.digest) == 2
    assert proxy.bytes_sent(str(layer.digest)) == 2 * layer.size
    stats = proxy.stats()[f"/v2/{img.repository}/blobs/{layer.digest}"]
    assert (stats.requests, stats.bytes_sent) == (2, 2 * layer.size)


def test_proxy_serves_skopeo_and_counts_each_blob(images: Catalog, proxy: RegistryProxy,
                                                  tmp_path: Path) -> None:
    img = images["multi-docker"]
    part = img.platform("linux/arm/v7")
    skopeo("copy", "-q", "--src-tls-verify=false", "--override-arch", "arm", "--override-variant", "v7",
           f"docker://{img.ref(proxy.host)}", f"dir:{tmp_path / 'out'}")
    for layer in part.layers:
        assert proxy.blob_gets(layer.digest) == 1
        assert (tmp_path / "out" / layer.digest.hex).read_bytes() == layer.read()


def test_proxy_cut_fault_then_recovers(images: Catalog, proxy: RegistryProxy) -> None:
    img = images["single-oci"]
    layer = img.only.layers[1]
    rule = proxy.cut(layer.digest.hex, after_bytes=1000, times=1)
    with pytest.raises(http.client.IncompleteRead) as info:
        _get(_blob_url(proxy, img, layer))
    assert len(info.value.partial) == 1000
    status, _, body = _get(_blob_url(proxy, img, layer))
    assert status == 200 and len(body) == layer.size
    assert rule.fired == 1
    assert [r.complete for r in proxy.log] == [False, True]
    assert proxy.bytes_sent(layer.digest.hex) == 1000 + layer.size


def test_proxy_error_faults(images: Catalog, proxy: RegistryProxy) -> None:
    img = images["single-oci"]
    layer = img.only.layers[0]
    proxy.fail("/blobs/", status=500, times=1)
    proxy.rate_limit("/blobs/", retry_after=2, times=1)
    status, _, body = _get(_blob_url(proxy, img, layer))
    assert status == 500 and b"UNKNOWN" in body
    status, headers, body = _get(_blob_url(proxy, img, layer))
    assert status == 429 and headers["Retry-After"] == "2" and b"TOOMANYREQUESTS" in body
    status, _, body = _get(_blob_url(proxy, img, layer))
    assert status == 200 and Digest.of(body) == layer.digest
    manifest_url = f"{proxy.url}/v2/{img.repository}/manifests/{img.tag}"
    accept = {"Accept": ACCEPT}
    proxy.fail("/manifests/", status=503, times=None)
    assert _get(manifest_url, accept)[0] == 503
    assert _get(manifest_url, accept)[0] == 503
    proxy.reset_rules()
    status, _, body = _get(manifest_url, accept)
    assert status == 200 and body == img.raw


def test_proxy_range_and_ignore_range(images: Catalog, proxy: RegistryProxy) -> None:
    img = images["single-oci"]
    layer = img.only.layers[1]
    status, headers, body = _get(_blob_url(proxy, img, layer), {"Range": "bytes=100-199"})
    assert status == 206 and body == layer.read()[100:200]
    proxy.ignore_range()
    status, _, body = _get(_blob_url(proxy, img, layer), {"Range": "bytes=100-199"})
    assert status == 200 and body == layer.read()
    assert [r.range for r in proxy.log] == ["bytes=100-199", "bytes=100-199"]


def test_proxy_stall_and_link_shaping(images: Catalog, proxy: RegistryProxy) -> None:
    img = images["single-oci"]
    layer = img.only.layers[1]
    proxy.stall(layer.digest.hex, seconds=0.3)
    t0 = time.monotonic()
    assert _get(_blob_url(proxy, img, layer))[0] == 200
    assert time.monotonic() - t0 >= 0.3
    # Shaping: 200 kB/s + 0.1 s latency, so the ~30 kB layer needs at least 0.1 + 0.1 s.
    proxy.set_link(rate=200_000, latency=0.1)
    t0 = time.monotonic()
    assert _get(_blob_url(proxy, img, layer))[2] == layer.read()
    assert time.monotonic() - t0 >= 0.1 + layer.size / 200_000


def test_proxy_corrupt_flips_one_byte(images: Catalog, proxy: RegistryProxy) -> None:
    img = images["single-oci"]
    layer = img.only.layers[1]
    proxy.corrupt(layer.digest.hex, at_byte=5000)
    status, _, body = _get(_blob_url(proxy, img, layer))
    good = layer.read()
    assert status == 200 and len(body) == len(good) and body != good
    assert [i for i in range(len(good)) if body[i] != good[i]] == [5000]
    assert _get(_blob_url(proxy, img, layer))[2] == good


def test_move_tag_and_push_custom(registry: LocalRegistry, images: Catalog) -> None:
    first = push_image(registry, images["shared-a"], repository="fetchd-test/moving", tag="latest")
    moved = move_tag(registry, first, images["shared-b"])
    raw = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{first.reference}")
    assert moved.reference == first.reference
    assert Digest.of(raw.encode()) == images["shared-b"].digest != first.digest
    layer = make_layer([Entry("hello", b"hi\n")], "zstd")
    custom = push_custom(registry, "fetchd-test/custom", "v1", [layer], platform="linux/arm64/v8")
    out = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{custom.reference}"))
    assert out["Architecture"] == "arm64" and out["Layers"] == [str(layer.digest)]


def test_pull_through_registry_and_clean_stop(registry_factory: Callable[..., LocalRegistry],
                                              registry: LocalRegistry, images: Catalog) -> None:
    cache = registry_factory(proxy_remote=registry.url)
    img = images["single-docker"]
    raw = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{img.ref(cache.host)}")
    assert Digest.of(raw.encode()) == img.digest
    cache.stop()
    assert not cache.running
    with pytest.raises(urllib.error.URLError):
        _OPENER.open(f"{cache.url}/v2/", timeout=5)


def test_proxy_error_answers_to_head_carry_no_body(images: Catalog, proxy: RegistryProxy) -> None:
    """A HEAD that meets an injected 429 gets headers only, so a keep-alive client stays in sync."""
    import socket

    img = images["single-oci"]
    proxy.rate_limit(r"/manifests/", retry_after=1, times=1)
    host, port = proxy.host.split(":")
    request = (f"HEAD /v2/{img.repository}/manifests/{img.tag} HTTP/1.1\r\n"
               f"Host: {proxy.host}\r\nAccept: {img.media_type}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        sock.settimeout(0.5)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            pass
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429"), head
    assert b"Retry-After: 1" in head
    assert rest == b"", f"a HEAD answer must carry no body, got {rest[:80]!r}"


def test_proxy_every_nth_request_and_faults_per_transfer(images: Catalog, proxy: RegistryProxy) -> None:
    img = images["single-oci"]
    layer = img.only.layers[1]
    url = _blob_url(proxy, img, layer)
    proxy.every(3, 429, retry_after=1)
    proxy.per_transfer(r"/blobs/", [("cut", 1000), ("corrupt", 7)])
    good = layer.read()
    answers = []
    for _ in range(5):
        try:
            status, headers, body = _get(url)
        except (http.client.IncompleteRead, ConnectionError) as e:  # the cut first transfer
            answers.append(("cut", type(e).__name__))
            continue
        answers.append((status, headers.get("Retry-After") if status == 429 else body == good))
    # requests 3 (and 6) are 429s and no transfer: the 2nd transfer is corrupt, the 3rd good
    assert answers[0][0] == "cut"
    assert answers[1] == (200, False)
    assert answers[2] == (429, "1")
    assert answers[3:] == [(200, True), (200, True)]
    assert [r.complete for r in proxy.log[:2]] == [False, True]
    assert proxy.log[0].bytes_sent == 1000


def test_proxy_pause_at_stops_transfers_until_resumed(images: Catalog, proxy: RegistryProxy) -> None:
    img = images["single-oci"]
    layer = img.only.layers[1]
    proxy.set_link(rate=200_000)  # chunks of 4 kB
    resume = proxy.pause_at(8000, "/blobs/")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(_get(_blob_url(proxy, img, layer))[2]))
    reader.start()
    assert proxy.wait_sent(8000, "/blobs/") >= 8000
    paused_at = proxy.sent_live("/blobs/")
    assert reader.is_alive() and paused_at < 8000 + 4096 < layer.size
    resume()
    reader.join()
    assert got == [layer.read()]
