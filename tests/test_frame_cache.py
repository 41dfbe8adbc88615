"""The fleet's frame cache end to end: Debian's docker-registry as the cache, hosts as Pullers.

Each "host" has its own store, registry client and puller; the upstream is the session
registry behind a counting proxy (tests/support/proxy.py), so "no layer blob from the
upstream" is what the upstream saw. The cache is a second docker-registry (distribution 2.8)
on loopback; the hostile caches are small aiohttp servers serving scripted entries.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support.images import Catalog, CatalogImage, Entry, make_layer, prng_bytes, push_custom
from support.proxy import RegistryProxy
from support.registry import LocalRegistry, free_port

from fetchd.config import Config
from fetchd.digest import Digest
from fetchd.fleet_cache import ARTIFACT_TYPE, MANIFEST_TYPE, FrameCache, FrameKey, _manifest
from fetchd.frame_check import FRAME_FORMAT, ZSTD_VERSION
from fetchd.layer_store import LayerStore
from fetchd.pack import frame_key
from fetchd.platform import Platform
from fetchd.pull import FetchRequest, FetchResult, Puller
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient
from fetchd.server import Services, make_app

pytestmark = pytest.mark.registry

ARM64 = Platform.parse("linux/arm64")
AMD64 = Platform.parse("linux/amd64")
FAST = {"retries": 1, "backoff_base": 0.001, "backoff_cap": 0.01, "retry_after_cap": 0.01}
REPO = "fetchd-frames"


class Host:
    """One build host: its own store, registry client and puller (and frame cache client)."""

    def __init__(self, root: Path, config: Config, zstd: str | None = None) -> None:
        self.store = LayerStore(root / "store")
        self.client = RegistryClient(config)
        fleet = None
        if config.fleet.frame_cache is not None:
            fleet = FrameCache(config, zstd=zstd or ZSTD_VERSION, format=FRAME_FORMAT)
        self.puller = Puller(self.store, self.client, config, fleet=fleet)
        self.config = config

    async def pull(self, reference: str, platform: Platform = ARM64, level: int = 3
                   ) -> FetchResult:
        job = self.puller.submit(FetchRequest(Reference.parse(reference), platform, level))
        return await job.wait()

    @property
    def fleet(self) -> FrameCache:
        assert self.puller.fleet is not None
        return self.puller.fleet

    def store_is_clean(self) -> bool:
        """Every blob in the store hashes to its name: nothing unverified got in."""
        for path in (self.store.root / "blobs" / "sha256").iterdir():
            if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
                return False
        return True

    async def close(self) -> None:
        await self.puller.close()
        await self.client.close()
        self.store.close()


@pytest.fixture
async def make_host(tmp_path: Path) -> AsyncIterator[Callable[..., Host]]:
    hosts: list[Host] = []

    def make(name: str, cache: str | None = None, *, zstd: str | None = None,
             registries: dict[str, Any] | None = None, **fleet: Any) -> Host:
        data: dict[str, Any] = {"network": FAST, "registries": registries or {}}
        if cache is not None:
            # a loaded machine must not turn a lookup into a timeout: only the tests of
            # timeouts ask for a short one
            data["fleet"] = {"frame_cache": cache, "push": True, "timeout": 30.0, **fleet}
        config = Config.from_dict(data, env={"FETCHD_STORE": str(tmp_path / name)})
        host = Host(tmp_path / name, config, zstd)
        hosts.append(host)
        return host

    try:
        yield make
    finally:
        for host in hosts:
            await host.close()


def _archive(result: FetchResult) -> bytes:
    return Path(result.archive_path).read_bytes()


def _layer_gets(upstream: RegistryProxy, image: CatalogImage, platform: Platform) -> int:
    return sum(upstream.blob_gets(layer.digest) for layer in image.platform(platform).layers)


# --------------------------------------------------------------------------- the real cache


async def test_second_host_takes_every_frame_from_the_cache(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy],
    registry_factory: Callable[..., LocalRegistry], make_host: Callable[..., Host],
) -> None:
    image = images["multi-docker"]
    part = image.platform(ARM64)
    layers = {layer.diff_id for layer in part.layers}
    upstream = proxy_factory()
    cache = registry_factory()
    url = f"{cache.url}/{REPO}"

    a = make_host("a", url)
    first = await a.pull(image.ref(upstream.host))
    await a.fleet.wait_pushes()
    assert a.fleet.stats()["misses"] == len(layers) and a.fleet.stats()["hits"] == 0
    assert a.fleet.stats()["pushes"] == len(layers) and a.fleet.stats()["push_errors"] == 0
    assert _layer_gets(upstream, image, ARM64) == len(part.layers)

    # what distribution 2.8 stored: the OCI 1.1 artifact form, the key in the annotations
    key = FrameKey(part.layers[0].diff_id, 3, ZSTD_VERSION, FRAME_FORMAT)
    req = urllib.request.Request(f"{cache.url}/v2/{REPO}/manifests/{key.tag}",
                                 headers={"Accept": MANIFEST_TYPE})

    def read() -> Any:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    stored = await asyncio.to_thread(read)
    assert stored["artifactType"] == ARTIFACT_TYPE
    assert stored["annotations"]["dev.fetchd.frame.diff_id"] == str(key.diff_id)

    b = make_host("b", url)
    upstream.reset_stats()
    second = await b.pull(image.ref(upstream.host))
    assert _archive(second) == _archive(first)
    assert second.archive_digest == first.archive_digest
    assert _layer_gets(upstream, image, ARM64) == 0       # no layer blob from the upstream
    assert upstream.blob_gets(part.config_digest) == 1   # the config still comes from it
    assert second.frames_fleet == len(layers) and second.frames_compressed == 0
    stats = b.fleet.stats()
    assert stats["hits"] == len(layers) and stats["rejected"] == 0 and stats["misses"] == 0
    assert not any(b.store.has(layer.digest) for layer in part.layers)
    assert b.store_is_clean()

    services = Services(b.puller, b.store, b.client, b.config)
    async with TestClient(TestServer(make_app(services))) as http:
        status = await (await http.get("/v1/status")).json()
        metrics = await (await http.get("/metrics")).text()
    assert status["fleet"]["hits"] == len(layers) and status["fleet"]["url"] == url
    assert f"fetchd_fleet_hits_total {len(layers)}" in metrics
    assert "fetchd_fleet_pushes_pending 0" in metrics


async def test_other_level_or_zstd_version_is_a_miss(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy],
    registry_factory: Callable[..., LocalRegistry], make_host: Callable[..., Host],
) -> None:
    image = images["shared-a"]
    part = image.platform(AMD64)
    layers = {layer.diff_id for layer in part.layers}
    upstream = proxy_factory()
    cache = registry_factory()
    url = f"{cache.url}/{REPO}"
    a = make_host("a", url)
    await a.pull(image.ref(upstream.host), AMD64)
    await a.fleet.wait_pushes()
    assert a.fleet.stats()["pushes"] == len(layers)

    b = make_host("b", url, push=False)
    at5 = await b.pull(image.ref(upstream.host), AMD64, level=5)
    assert b.fleet.stats()["misses"] == len(layers) and b.fleet.stats()["hits"] == 0
    assert at5.frames_fleet == 0 and at5.frames_compressed == len(layers)

    c = make_host("c", url, zstd="0.0.1")  # another libzstd: another key
    upstream.reset_stats()
    other = await c.pull(image.ref(upstream.host), AMD64)
    assert c.fleet.stats()["misses"] == len(layers) and c.fleet.stats()["hits"] == 0
    assert other.frames_compressed == len(layers)
    assert _layer_gets(upstream, image, AMD64) == len(part.layers)


async def test_a_push_slower_than_the_lookup_timeout_completes_paced(
    registry: LocalRegistry, proxy_factory: Callable[..., RegistryProxy],
    registry_factory: Callable[..., LocalRegistry], make_host: Callable[..., Host],
) -> None:
    """Uploads are paced by push_bandwidth and are not bound by the (short) lookup timeout."""
    layer = make_layer([Entry("data.bin", data=prng_bytes("fleet-push", 3 << 20))])
    image = await asyncio.to_thread(push_custom, registry, "fetchd-test/fleet-push", "v1", [layer])
    upstream = proxy_factory()
    cache = registry_factory()
    rate = 256 << 10  # the upload takes ~8 s, longer than the timeout
    a = make_host("a", f"{cache.url}/{REPO}", timeout=5.0, push_bandwidth=rate)
    await a.pull(image.ref(upstream.host), AMD64)
    started = time.monotonic()
    await a.fleet.wait_pushes()
    took = time.monotonic() - started
    stats = a.fleet.stats()
    assert (stats["pushes"], stats["push_errors"]) == (1, 0)
    assert stats["push_bytes"] > 3 << 20
    # the token bucket lets one 1 MiB burst through, then holds the rate: longer than timeout
    assert took >= (stats["push_bytes"] - (1 << 20)) / rate * 0.9 > 5.0

    b = make_host("b", f"{cache.url}/{REPO}")
    got = await b.pull(image.ref(upstream.host), AMD64)
    assert got.frames_fleet == 1 and not b.store.has(layer.digest)


# bcrypt of "fleet-secret" at cost 4 (distribution's htpasswd accepts bcrypt only; a low
# cost keeps each authenticated request cheap for the registry)
WRITER_HTPASSWD = "writer:$2b$04$e6OMAnymKW9KuOF9fo8pue59w7/GkSnZ3AAxarIJtz.tNQkJj0Xra\n"


async def test_credentials_for_the_cache_come_from_the_auth_file(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy],
    registry_factory: Callable[..., LocalRegistry], make_host: Callable[..., Host],
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A cache with basic auth: a host with its login in an auth file pushes and another
    takes the frames; a host without credentials is refused, counted, and pulls normally.
    The credentials appear in no log line."""
    caplog.set_level(logging.DEBUG)
    image = images["shared-a"]
    part = image.platform(AMD64)
    layers = {layer.diff_id for layer in part.layers}
    upstream = proxy_factory()
    cache = registry_factory(htpasswd=WRITER_HTPASSWD)
    url = f"{cache.url}/{REPO}"
    auth = tmp_path / "auth.json"
    token = base64.b64encode(b"writer:fleet-secret").decode()
    auth.write_text(json.dumps({"auths": {cache.host: {"auth": token}}}))

    anonymous = make_host("anon", url)
    plain = await anonymous.pull(image.ref(upstream.host), AMD64)
    await anonymous.fleet.wait_pushes()
    stats = anonymous.fleet.stats()
    assert stats["hits"] == 0 and stats["errors"] >= 1 and stats["pushes"] == 0

    a = make_host("a", url, auth_file=str(auth))
    await a.pull(image.ref(upstream.host), AMD64)
    await a.fleet.wait_pushes()
    assert a.fleet.stats()["pushes"] == len(layers) and a.fleet.stats()["push_errors"] == 0

    b = make_host("b", url, auth_file=str(auth), push=False)
    got = await b.pull(image.ref(upstream.host), AMD64)
    assert got.frames_fleet == len(layers) and _archive(got) == _archive(plain)
    assert "fleet-secret" not in caplog.text and token not in caplog.text


async def test_a_private_registry_never_uses_the_cache(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy],
    registry_factory: Callable[..., LocalRegistry], make_host: Callable[..., Host],
) -> None:
    image = images["shared-a"]
    upstream = proxy_factory()
    cache = registry_factory()
    url = f"{cache.url}/{REPO}"
    a = make_host("a", url)
    await a.pull(image.ref(upstream.host), AMD64)
    await a.fleet.wait_pushes()
    assert a.fleet.stats()["pushes"] >= 1
    private = make_host("p", url, registries={upstream.host: {"private": True}})
    got = await private.pull(image.ref(upstream.host), AMD64)
    await private.fleet.wait_pushes()
    stats = private.fleet.stats()
    assert stats["lookups"] == 0 and stats["pushes"] == 0 and got.frames_fleet == 0


# --------------------------------------------------------------------------- hostile caches


class EvilCache:
    """A registry-shaped server that answers every frame lookup with one scripted entry.

    ``mode``: ``corrupt`` (one byte of the frame flipped), ``other-layer`` (another layer's
    frame under this key), ``truncated`` (the frame cut short, manifest consistent with it),
    ``500`` (every request), ``stall`` (holds every request until the test ends),
    ``stall-blob`` (answers lookups, holds every frame download), ``wrong-digest`` (the
    right frame under a manifest naming another digest for it), ``huge-size`` (the right frame,
    its layer claimed 10 TB: decompressing it up to there would take hours),
    ``manifest-digest`` (the right entry, its Docker-Content-Digest naming other bytes),
    ``good`` (the right entries). ``gate``: awaited before any frame blob is served.
    """

    def __init__(self, frames: dict[Digest, tuple[bytes, int]], mode: str,
                 gate: Callable[[], Awaitable[None]] | None = None) -> None:
        self.frames = frames  # diff_id -> (frame bytes, layer size), real frames
        self.mode = mode
        self.gate = gate
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.requests = 0
        self.blob_gets = 0
        self.manifest_reads: list[str] = []  # "METHOD last-path-segment"
        self.release = asyncio.Event()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/{REPO}"

    def _entry(self, tag: str) -> bytes | None:
        if tag in self.manifests:  # by digest, after the HEAD
            return self.manifests[tag]
        diff_hex = tag.split(".", 1)[0]
        diff_id = Digest("sha256", diff_hex)
        if diff_id not in self.frames:
            return None
        frame, size = self.frames[diff_id]
        if self.mode == "corrupt":
            frame = bytearray(frame)
            frame[len(frame) // 2] ^= 0x01
            frame = bytes(frame)
        elif self.mode == "other-layer":
            frame, size = next(v for k, v in self.frames.items() if k != diff_id)
        elif self.mode == "truncated":
            frame = frame[:len(frame) * 2 // 3]
        if self.mode == "huge-size":  # the right frame, claiming a layer its blob cannot hold
            size = 10**13
        digest = Digest.of(frame)
        if self.mode == "wrong-digest":  # the right frame, named by another digest
            digest = Digest.of(frame + b"x")
        self.blobs[str(digest)] = frame
        key = FrameKey(diff_id, 3, ZSTD_VERSION, FRAME_FORMAT)
        body = _manifest(key, digest, len(frame), size)
        self.manifests[str(Digest.of(body))] = body
        return body

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.mode == "stall" or (self.mode == "stall-blob" and "blobs" in request.path):
            await self.release.wait()
        if self.mode == "500":
            return web.Response(status=500, text="boom")
        parts = request.path.split("/")
        if "manifests" in parts and request.method in ("GET", "HEAD"):
            self.manifest_reads.append(f"{request.method} {parts[-1]}")
        if "manifests" in parts:
            body = self._entry(parts[-1])
            if body is None:
                return web.Response(status=404)
            named = body + b" " if self.mode == "manifest-digest" else body
            headers = {"Docker-Content-Digest": str(Digest.of(named)),
                       "Content-Type": MANIFEST_TYPE}
            return web.Response(body=None if request.method == "HEAD" else body,
                                headers=headers)
        if "blobs" in parts:
            self.blob_gets += request.method == "GET"
            if self.gate is not None:
                await self.gate()
        if "blobs" in parts and parts[-1] in self.blobs:
            return web.Response(body=self.blobs[parts[-1]])
        return web.Response(status=404)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[EvilCache]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        try:
            yield self
        finally:
            self.release.set()
            await runner.cleanup()


def _frames_of(host: Host, image: CatalogImage, platform: Platform) -> dict[Digest, tuple[bytes, int]]:
    out = {}
    for layer in image.platform(platform).layers:
        span = host.store.get_frame(frame_key(layer.diff_id, 3))
        assert span is not None
        with open(host.store.blob_path(span.digest), "rb") as f:
            f.seek(span.offset)
            out[layer.diff_id] = (f.read(span.length), layer.tar_size)
    return out


@pytest.mark.parametrize("mode", ["corrupt", "other-layer", "truncated", "wrong-digest",
                                  "huge-size", "manifest-digest", "500", "stall", "stall-blob"])
async def test_a_hostile_cache_costs_a_fallback_never_a_wrong_archive(
    mode: str, images: Catalog, proxy_factory: Callable[..., RegistryProxy],
    make_host: Callable[..., Host],
) -> None:
    image = images["shared-b"]
    part = image.platform(AMD64)
    layers = {layer.diff_id for layer in part.layers}
    upstream = proxy_factory()
    reference = make_host("ref")                  # no cache: the archive as it must be
    want = await reference.pull(image.ref(upstream.host), AMD64)
    evil = EvilCache(_frames_of(reference, image, AMD64), mode)
    async with evil.running():
        # a short timeout only where the cache stalls (elsewhere a loaded machine could turn
        # a bad entry's lookup into a timeout)
        host = make_host("h", evil.url, timeout=0.5 if "stall" in mode else 30.0)
        upstream.reset_stats()
        got = await host.pull(image.ref(upstream.host), AMD64)
        await host.fleet.wait_pushes()
    assert _archive(got) == _archive(want)
    assert got.frames_fleet == 0 and got.frames_compressed == len(layers)
    assert _layer_gets(upstream, image, AMD64) == len(part.layers)  # the normal path
    stats = host.fleet.stats()
    assert stats["hits"] == 0
    if mode in ("500", "stall", "stall-blob"):
        # one failure takes the cache out of use for its cooldown: not one per layer
        assert stats["errors"] + stats["timeouts"] >= 1 and stats["down"] is True
        assert stats["rejected"] == 0
    else:
        assert stats["rejected"] == len(layers) and stats["found"] == len(layers)
        # a lookup is one request: the manifest by its tag
        tags = {FrameKey(d, 3, ZSTD_VERSION, FRAME_FORMAT).tag for d in layers}
        assert sorted(evil.manifest_reads) == sorted(f"GET {tag}" for tag in tags)
    if mode in ("huge-size", "manifest-digest"):  # refused before any byte of the frame
        assert evil.blob_gets == 0
    for diff_id in layers:  # no frame from the cache was kept: the store's own came from the pack
        assert host.store.get_alias("frame", frame_key(diff_id, 3)) is None
    assert host.store_is_clean()
    assert list(host.store.tmp_dir.iterdir()) == []


def test_a_write_that_arrives_after_the_download_ended_is_refused(tmp_path: Path) -> None:
    """A write still in its thread when the download was ended (its task cancelled, the file
    closed) is refused under the same lock: it never writes through a closed or reused
    descriptor, and what was written before stays as it was."""
    from fetchd.fleet_cache import FetchFailed, FrameDownload

    download = FrameDownload(tmp_path / "frame")
    download.write(b"abc")
    download.finish(failed=True)
    with pytest.raises(FetchFailed):
        download.write(b"def")
    assert (tmp_path / "frame").read_bytes() == b"abc" and download.written == 3


def test_readers_take_written_bytes_while_a_write_runs_and_finish_waits_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write (and its hash) runs outside the download's lock: a reader takes the bytes
    already there meanwhile; ``finish`` (the fetch cancelled) waits for the write in its
    thread before it closes the file, so that write never meets a closed descriptor."""
    import os
    import threading

    from fetchd import fleet_cache

    download = fleet_cache.FrameDownload(tmp_path / "frame")
    download.write(b"abc")
    entered, go = threading.Event(), threading.Event()
    writev = os.writev

    def slow_writev(fd: int, buffers: Any) -> int:
        entered.set()
        go.wait(60)
        return writev(fd, buffers)

    monkeypatch.setattr(fleet_cache.os, "writev", slow_writev)
    writer = threading.Thread(target=download.write, args=(b"def",))
    writer.start()
    assert entered.wait(60)
    reader = download.reader()
    assert reader.read(10) == b"abc"  # not held up by the write in progress
    finisher = threading.Thread(target=download.finish, kwargs={"failed": True})
    finisher.start()
    finisher.join(0.2)
    assert finisher.is_alive()  # waits for the write
    go.set()
    writer.join(60)
    finisher.join(60)
    reader.close()
    assert not finisher.is_alive() and download.done and download.written == 6
    assert (tmp_path / "frame").read_bytes() == b"abcdef"


async def test_the_frame_of_an_empty_layer_is_not_pushed(tmp_path: Path) -> None:
    """zstd sizes an empty frame's window for its empty input, so no host would accept it
    (frame_check pins the level's header): it is skipped, not pushed to be rejected by all."""
    import io

    port = free_port()  # nothing listens there: a request would be counted as an error
    config = Config.from_dict({"fleet": {"frame_cache": f"http://127.0.0.1:{port}/frames",
                                         "push": True}}, env={})
    fleet = FrameCache(config, zstd=ZSTD_VERSION, format=FRAME_FORMAT)
    try:
        key = fleet.key(Digest.of(b""), 3)
        fleet.push_later(key, lambda: (io.BytesIO(b"frame"), 0, 5, 0))  # type: ignore[arg-type]
        await fleet.wait_pushes()
        stats = fleet.stats()
        assert stats["push_skipped"] == 1 and stats["pushes"] == 0 and stats["push_errors"] == 0
    finally:
        await fleet.close()


async def test_a_miss_downloads_while_a_hit_is_still_arriving(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy],
    make_host: Callable[..., Host],
) -> None:
    # The cache has the first layer's frame only, and serves it only once the upstream saw
    # the download of a layer it lacks: that download must start as soon as its lookup
    # missed, not after the hit's frame (which would wait for it: the frame download would
    # time out and the hit be lost).
    image = images["shared-b"]
    part = image.platform(AMD64)
    upstream = proxy_factory()
    reference = make_host("ref")
    want = await reference.pull(image.ref(upstream.host), AMD64)
    first, missed = part.layers[0], part.layers[1:]
    held = upstream.hold(f"/blobs/{missed[0].digest}")

    async def gate() -> None:
        await asyncio.to_thread(held.reached.wait, 120)  # bounded: no thread left behind
        held.release()

    evil = EvilCache({first.diff_id: _frames_of(reference, image, AMD64)[first.diff_id]},
                     "good", gate=gate)
    async with evil.running():
        host = make_host("h", evil.url)
        upstream.reset_stats()
        got = await host.pull(image.ref(upstream.host), AMD64)
        held.release()
    assert _archive(got) == _archive(want)
    assert got.frames_fleet == 1 and got.blobs_downloaded == len(missed)
    assert upstream.blob_gets(first.digest) == 0
    assert all(upstream.blob_gets(layer.digest) >= 1 for layer in missed)
    stats = host.fleet.stats()
    assert stats["hits"] == 1 and stats["misses"] == len(missed) and stats["timeouts"] == 0
    assert host.store_is_clean()
