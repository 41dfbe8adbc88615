"""Many hosts behind one shared tier: fetchd with a pull-through registry or a P2P mirror.

Every test counts at a proxy (tests/support/proxy.py) in front of the upstream registry, so
"no upstream traffic" is what the upstream saw, not what fetchd believes it sent. Each
"host" is an in-process ``Puller`` with its own ``LayerStore`` and ``RegistryClient``.

The shared tier in the first test is the real thing: Debian's docker-registry (distribution
2.8) in proxy mode. The fault tests use a counting proxy in front of the session registry
as the "mirror" (it holds the same repositories, as a warm pull-through cache does), which
lets them stall it, cut it or make it serve wrong bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext
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
from fetchd.errors import RateLimited, RegistryError
from fetchd.layer_store import LayerStore
from fetchd.platform import Platform
from fetchd.pull import FetchRequest, FetchResult, Puller
from fetchd.ranges import range_header
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient
from fetchd.server import Services, make_app

pytestmark = pytest.mark.registry

ARM64 = Platform.parse("linux/arm64")
ARM64_V8 = Platform.parse("linux/arm64/v8")  # multi-oci's arm64 entry names its variant
# A long mirror timeout except where timeouts are tested: on a loaded machine a mirror's
# answer may take seconds, and a timeout turns the planned flow into a fallback.
FAST = {"retries": 1, "backoff_base": 0.001, "backoff_cap": 0.01, "retry_after_cap": 0.01,
        "mirror_timeout": 120.0}


class Host:
    """One build host: its own store, registry client and puller."""

    def __init__(self, root: Path, config: Config) -> None:
        self.store = LayerStore(root / "store")
        self.client = RegistryClient(config)
        self.puller = Puller(self.store, self.client, config)
        self.events: list[dict[str, Any]] = []

    async def pull(self, reference: str, platform: Platform = ARM64) -> FetchResult:
        job = self.puller.submit(FetchRequest(Reference.parse(reference), platform))
        result = await job.wait()
        self.events.extend([e async for e in job.events()])
        return result

    def warnings(self) -> list[str]:
        return [e["message"] for e in self.events if e.get("event") == "warning"]

    def stats(self, host: str) -> dict[str, Any]:
        return self.client.stats().get(host, {})

    async def close(self) -> None:
        await self.puller.close()
        await self.client.close()
        self.store.close()


@pytest.fixture
async def make_host(tmp_path: Path) -> AsyncIterator[Callable[..., Host]]:
    hosts: list[Host] = []

    def make(name: str, upstream: str, mirrors: list[dict[str, Any]] | None = None,
             **network: Any) -> Host:
        data: dict[str, Any] = {"network": {**FAST, **network}}
        if mirrors is not None:
            data["registries"] = {upstream: {"mirrors": mirrors}}
        config = Config.from_dict(data, env={"FETCHD_STORE": str(tmp_path / name)})
        host = Host(tmp_path / name, config)
        hosts.append(host)
        return host

    try:
        yield make
    finally:
        for host in hosts:
            await host.close()


def _blobs(image: CatalogImage, platform: Platform = ARM64) -> list[tuple[Digest, int]]:
    part = image.platform(platform)
    return [(part.config_digest, part.config_size)] + [(lyr.digest, lyr.size) for lyr in part.layers]


def _stored_ok(store: LayerStore, digest: Digest) -> bool:
    return hashlib.sha256(store.blob_path(digest).read_bytes()).hexdigest() == digest.hex


# --------------------------------------------------------------------------- pull-through cache


async def _stored_by_cache(cache: LocalRegistry, blobs: list[tuple[Digest, int]]) -> None:
    """Until the pull-through cache has written every blob to its storage: distribution
    streams a missed blob to its client while it stores it from a fetch of its own, and a
    blob asked for before that ends goes to the upstream again (its cost, not fetchd's)."""
    def data(d: Digest) -> Path:
        return (cache.root / "docker/registry/v2/blobs" / d.algorithm / d.hex[:2] / d.hex
                / "data")

    def stored(d: Digest, size: int) -> bool:
        try:
            return data(d).stat().st_size == size
        except FileNotFoundError:
            return False

    # another process writes them: nothing to await but its files (the test timeout bounds it)
    while not all(stored(d, size) for d, size in blobs):  # noqa: ASYNC110
        await asyncio.sleep(0.01)


@asynccontextmanager
async def _pull_through(registry_factory: Callable[..., LocalRegistry], upstream: RegistryProxy,
                        ) -> AsyncIterator[LocalRegistry]:
    # distribution pings its remote at start-up: the upstream answers before this starts.
    yield registry_factory(proxy_remote=upstream.url)


async def test_pull_through_cache_second_host_adds_no_upstream_traffic(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy],
    registry_factory: Callable[..., LocalRegistry], make_host: Callable[..., Host],
) -> None:
    image = images["multi-oci"]
    upstream = proxy_factory()                     # counts what reaches the upstream registry
    async with _pull_through(registry_factory, upstream) as cache:
        mirror = proxy_factory(cache)              # counts what reaches the pull-through cache
        mirrors = [{"url": mirror.url}]
        blobs = _blobs(image, ARM64_V8)
        blob_bytes = sum(size for _, size in blobs)

        a = make_host("a", upstream.host, mirrors)
        upstream.reset_stats()
        first = await a.pull(image.ref(upstream.host), ARM64_V8)
        # fetchd on host a asked only the cache; the cache went upstream for what it missed
        assert a.stats(upstream.host).get("requests", 0) == 0
        assert a.stats(mirror.host)["requests"] >= len(blobs)
        for digest, _ in blobs:
            assert mirror.blob_gets(digest) == 1
            assert _stored_ok(a.store, digest)
        proxy_gets = sum(upstream.blob_gets(d) for d, _ in blobs)
        proxy_bytes = sum(upstream.bytes_sent(f"/blobs/{d}$", "GET") for d, _ in blobs)
        print(f"cold cache: {len(blobs)} blobs ({blob_bytes} bytes) cost the upstream "
              f"{proxy_gets} blob GETs, {proxy_bytes} bytes, {len(upstream.log)} requests in all")
        # distribution 2.8's proxy fetches a missed blob from its remote at most twice (one
        # stream for the client, one to store); that is its cost, fetchd asked once.
        assert len(blobs) <= proxy_gets <= 2 * len(blobs)

        # host b, same image by tag: the cache only revalidates the tag (a HEAD, free on
        # Docker Hub); no manifest GET and no blob reaches the upstream.
        await _stored_by_cache(cache, blobs)
        b = make_host("b", upstream.host, mirrors)
        upstream.reset_stats()
        second = await b.pull(image.ref(upstream.host), ARM64_V8)
        seen = {(r.method, r.path.split("/")[-2] if "/" in r.path.strip("/") else r.path)
                for r in upstream.log}
        assert seen <= {("GET", "/v2/"), ("HEAD", "manifests")}, upstream.log
        assert upstream.count("/blobs/") == 0
        assert second.archive_digest == first.archive_digest

        # host c, pinned by digest (how a fleet builds reproducibly): zero upstream requests.
        c = make_host("c", upstream.host, mirrors)
        upstream.reset_stats()
        third = await c.pull(image.ref(upstream.host, by_digest=True), ARM64_V8)
        assert upstream.log == []
        assert third.archive_digest == first.archive_digest
        assert c.stats(upstream.host).get("requests", 0) == 0


# --------------------------------------------------------------------------- mirror faults


async def test_mirror_down_falls_back_to_upstream_and_cools_down(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy], make_host: Callable[..., Host],
) -> None:
    image = images["shared-a"]
    upstream = proxy_factory()
    dead = f"127.0.0.1:{free_port()}"              # nothing listens there: connection refused
    host = make_host("h", upstream.host, [{"url": f"http://{dead}"}])
    result = await host.pull(image.ref(upstream.host), Platform.parse("linux/amd64"))
    for digest, _ in _blobs(image, Platform.parse("linux/amd64")):
        assert upstream.blob_gets(digest) == 1 and _stored_ok(host.store, digest)
    stats = host.stats(dead)
    # tried once, then skipped for the cooldown instead of costing every request a failure
    assert stats["requests"] == 1 and stats["down"] is True and stats["fallbacks"] == 1
    assert stats["role"] == "mirror"
    assert result.blobs_downloaded == len(image.only.layers)


async def test_slow_mirror_is_given_up_after_mirror_timeout(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy], make_host: Callable[..., Host],
) -> None:
    image = images["shared-b"]
    upstream = proxy_factory()
    mirror = proxy_factory()
    stall = 30.0
    mirror.stall("/v2/", stall, times=None)        # accepts connections, never answers in time
    host = make_host("h", upstream.host, [{"url": mirror.url}], mirror_timeout=0.3)
    await host.pull(image.ref(upstream.host), Platform.parse("linux/amd64"))
    stats = host.stats(mirror.host)
    assert stats["timeouts"] == 1 and stats["down"] is True
    assert upstream.count("/manifests/") >= 1
    for digest, _ in _blobs(image, Platform.parse("linux/amd64")):
        assert upstream.blob_gets(digest) == 1
    assert not any(r.complete for r in mirror.log)  # it did not wait for the mirror's answer


async def test_mirror_serving_a_corrupt_blob_is_skipped_for_it_and_nothing_bad_is_stored(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy], make_host: Callable[..., Host],
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = images["multi-docker"]
    part = image.platform(ARM64)
    upstream = proxy_factory()
    mirror = proxy_factory()
    layer = max(part.layers, key=lambda lyr: lyr.size)
    mirror.corrupt(f"/blobs/{layer.digest}$", at_byte=layer.size // 2, times=None)
    mirror.corrupt(f"/blobs/{part.config_digest}$", at_byte=3, times=None)
    host = make_host("h", upstream.host, [{"url": mirror.url}])
    with caplog.at_level(logging.WARNING):
        result = await host.pull(image.ref(upstream.host))
    # detected (counter, log line, job warning), fetched from the upstream, stored verified
    assert host.stats(mirror.host)["corrupt"] == 2
    assert any(mirror.host in r.getMessage() and "wrong" in r.getMessage() for r in caplog.records)
    assert any(str(layer.digest) in w for w in host.warnings())
    assert mirror.blob_gets(layer.digest) == 1 and upstream.blob_gets(layer.digest) == 1
    assert mirror.blob_gets(part.config_digest) == 1 and upstream.blob_gets(part.config_digest) == 1
    for digest, _ in _blobs(image):
        assert _stored_ok(host.store, digest)
    # the other layers came from the mirror alone
    for other in part.layers:
        if other.digest != layer.digest:
            assert upstream.blob_gets(other.digest) == 0
    assert list(host.store.ingest_dir.glob("*.part")) == []  # no partial left behind
    assert result.blobs_downloaded == len(part.layers)


async def test_corrupt_blob_over_parallel_ranges_is_fetched_again_from_upstream(
    registry: LocalRegistry, proxy_factory: Callable[..., RegistryProxy],
    make_host: Callable[..., Host],
) -> None:
    # One layer of 3 MiB: parts are at least 1 MiB, so the mirror serves it as three Range
    # requests (a catalog layer is smaller than one part: its "parallel" fetch is a single
    # GET, and whether its host's range probe came with it depended on which layer asked
    # first, so the count of the mirror's GETs did too).
    layer = make_layer([Entry("data.bin", data=prng_bytes("fleet-corrupt-ranges", 3 << 20))])
    image = push_custom(registry, "fetchd-test/corrupt-ranges", "v1", [layer])
    upstream = proxy_factory()
    mirror = proxy_factory()
    # each Range answer gets one byte flipped: the mismatch shows only at the store's commit
    mirror.corrupt(f"/blobs/{layer.digest}$", at_byte=1, times=None)
    host = make_host("h", upstream.host, [{"url": mirror.url, "ranges": True}],
                     range_threshold=1024, range_parts=4, near_latency=0)
    await host.pull(image.ref(upstream.host), Platform.parse("linux/amd64"))
    assert _stored_ok(host.store, layer.digest)
    mirror_ranges = [r.range for r in mirror.log
                     if r.method == "GET" and r.path.endswith(f"/blobs/{layer.digest}")]
    probe = range_header(0, 1)
    parts = [rng for rng in mirror_ranges if rng != probe]
    assert len(parts) >= 2 and None not in parts    # parallel ranges came from the mirror first
    assert upstream.blob_gets(layer.digest) >= 1     # then the upstream served it
    assert host.stats(mirror.host)["corrupt"] == 1


async def test_digest_only_mirror_never_sees_a_tag(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy], make_host: Callable[..., Host],
) -> None:
    image = images["multi-oci"]
    upstream = proxy_factory()
    mirror = proxy_factory()
    host = make_host("h", upstream.host, [{"url": mirror.url, "digest_only": True}])
    await host.pull(image.ref(upstream.host), ARM64_V8)
    assert mirror.count(f"/manifests/{image.tag}$") == 0
    assert mirror.count(f"/manifests/{image.digest}$") == 1   # the index, by digest
    assert upstream.count(f"/manifests/{image.tag}$") == 1    # the tag: upstream, one HEAD
    assert upstream.count(f"/manifests/{image.tag}$", "HEAD") == 1
    assert upstream.count("/blobs/") == 0 and upstream.count("/manifests/sha256:") == 0


# --------------------------------------------------------------------------- tag cache


async def test_a_new_tag_is_one_get_and_a_known_one_is_revalidated_with_a_head(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy], make_host: Callable[..., Host],
) -> None:
    image = images["multi-oci"]
    upstream = proxy_factory()
    host = make_host("h", upstream.host, tag_cache_ttl=0)  # every pull asks the registry
    first = await host.pull(image.ref(upstream.host), ARM64_V8)
    # never resolved: one GET by tag brings the index (not a HEAD, then a GET by digest)
    assert upstream.count(f"/manifests/{image.tag}$", "GET") == 1
    assert upstream.count(f"/manifests/{image.tag}$", "HEAD") == 0
    assert upstream.count(f"/manifests/{image.digest}$") == 0
    upstream.reset_stats()
    second = await host.pull(image.ref(upstream.host), ARM64_V8)
    # known: a HEAD (free on Docker Hub) revalidates it, the index is the stored one
    assert upstream.count(f"/manifests/{image.tag}$", "HEAD") == 1
    assert upstream.count("/manifests/") == 1 and upstream.count("/blobs/") == 0
    assert second.archive_digest == first.archive_digest



@asynccontextmanager
async def _answering(host: str, status: int) -> AsyncIterator[None]:
    """A server on ``host`` (``ip:port``) answering every request with ``status``.

    Stands in for an upstream that is up but refuses (429 quota, 503 outage). aiohttp
    sends no body on HEAD, as HTTP/1.1 requires (tests/support/proxy.py's faults do).
    """
    code = "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE"
    body = json.dumps({"errors": [{"code": code, "message": "test"}]})

    async def answer(request: web.Request) -> web.Response:
        headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "0;w=21600"} \
            if status == 429 else {}
        return web.Response(status=status, text=body, content_type="application/json",
                            headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ip, port = host.rsplit(":", 1)
    site = web.TCPSite(runner, ip, int(port), reuse_address=True)
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()



@pytest.mark.parametrize("failure", ["down", "429", "503"])
async def test_upstream_failing_with_the_tag_cached_pulls_from_the_store_with_a_warning(
    failure: str, images: Catalog, proxy_factory: Callable[..., RegistryProxy],
    make_host: Callable[..., Host], caplog: pytest.LogCaptureFixture,
) -> None:
    image = images["zstd"]
    upstream = proxy_factory()
    # tag_cache_ttl 0: every pull revalidates the tag, so the second one must ask upstream
    host = make_host("h", upstream.host, tag_cache_ttl=0.0)
    first = await host.pull(image.ref(upstream.host), Platform.parse("linux/amd64"))
    upstream.stop()
    async with _answering(upstream.host, int(failure)) if failure != "down" else nullcontext():
        host.events.clear()
        with caplog.at_level(logging.WARNING):
            again = await host.pull(image.ref(upstream.host), Platform.parse("linux/amd64"))
        resolved = await host.puller.resolve(Reference.parse(image.ref(upstream.host)), max_age=0)
    assert again.archive_digest == first.archive_digest and again.blobs_downloaded == 0
    (warning,) = host.warnings()
    assert "last known digest" in warning and str(image.digest) in warning
    assert any("last known digest" in r.getMessage() for r in caplog.records)
    assert resolved["digest"] == str(image.digest) and "warning" in resolved


@pytest.mark.parametrize("failure", ["down", "429"])
async def test_upstream_failing_without_the_tag_cached_is_a_clear_error(
    failure: str, images: Catalog, proxy_factory: Callable[..., RegistryProxy],
    make_host: Callable[..., Host],
) -> None:
    image = images["zstd"]
    upstream = f"127.0.0.1:{free_port()}"
    expected: type[Exception] = RegistryError if failure == "down" else RateLimited
    host = make_host("h", upstream)
    async with _answering(upstream, int(failure)) if failure != "down" else nullcontext():
        with pytest.raises(expected, match="not in fetchd's tag cache.*pin the image by digest"):
            await host.pull(image.ref(upstream), Platform.parse("linux/amd64"))


# --------------------------------------------------------------------------- status and metrics


async def test_budget_and_mirror_state_show_in_status_and_metrics(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy], make_host: Callable[..., Host],
) -> None:
    image = images["shared-a"]
    upstream = proxy_factory()
    dead = f"127.0.0.1:{free_port()}"
    host = make_host("h", upstream.host, [{"url": f"http://{dead}"}])
    await host.pull(image.ref(upstream.host), Platform.parse("linux/amd64"))
    services = Services(host.puller, host.store, host.client, host.puller.config)
    async with TestClient(TestServer(make_app(services))) as http:
        status = await (await http.get("/v1/status")).json()
        metrics = await (await http.get("/metrics")).text()
    mirror, registry = status["registries"][dead], status["registries"][upstream.host]
    assert (mirror["role"], mirror["down"], mirror["fallbacks"]) == ("mirror", True, 1)
    assert registry["role"] == "registry" and registry["max_connections"] == 8
    assert registry["connections_in_use"] == 0 and registry["requests"] >= 1
    assert f'fetchd_registry_fallbacks_total{{registry="{dead}"}} 1' in metrics
    assert f'fetchd_registry_down{{registry="{dead}"}} 1' in metrics
    assert f'fetchd_registry_max_connections{{registry="{upstream.host}"}} 8' in metrics


async def test_wrong_partial_left_by_an_earlier_run_is_dropped_and_fetched_again(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy], make_host: Callable[..., Host],
) -> None:
    image = images["single-docker"]
    layer = max(image.only.layers, key=lambda lyr: lyr.size)
    upstream = proxy_factory()
    host = make_host("h", upstream.host)

    async def bad_then_cut(sink: Any) -> None:
        # what a mirror serving wrong bytes could have left before the daemon stopped
        await sink.write_at(0, b"\0" * (layer.size // 2))
        raise RegistryError("cut (test)")

    with pytest.raises(RegistryError):
        await host.store.ensure_blob(layer.digest, layer.size, bad_then_cut)
    assert list(host.store.ingest_dir.glob("*.part"))  # kept for a resume
    await host.pull(image.ref(upstream.host), Platform.parse("linux/amd64"))
    assert _stored_ok(host.store, layer.digest)
    ranges = [r.range for r in upstream.log if r.path.endswith(f"/blobs/{layer.digest}")]
    assert len(ranges) == 2 and ranges[0] is not None and ranges[1] is None  # resume, then whole


async def test_wrong_part_beyond_the_prefix_left_by_an_earlier_run_is_fetched_again(
    images: Catalog, proxy_factory: Callable[..., RegistryProxy], make_host: Callable[..., Host],
) -> None:
    image = images["single-docker"]
    layer = max(image.only.layers, key=lambda lyr: lyr.size)
    third = layer.size // 3
    upstream = proxy_factory()
    host = make_host("h", upstream.host)

    async def bad_part_then_cut(sink: Any) -> None:
        # a parallel part from a mirror serving wrong bytes; the first part had not started
        await sink.write_at(third, b"\0" * third)
        raise RegistryError("cut (test)")

    with pytest.raises(RegistryError):
        await host.store.ensure_blob(layer.digest, layer.size, bad_part_then_cut)
    await host.pull(image.ref(upstream.host), Platform.parse("linux/amd64"))
    assert _stored_ok(host.store, layer.digest)
    ranges = [r.range for r in upstream.log if r.path.endswith(f"/blobs/{layer.digest}")]
    assert ranges[-1] is None and len(ranges) >= 3  # probe and gaps, then the whole blob
