"""Mirrors and the per-host budget against scripted fake registries (no real registry needed):
cooldown of a dead mirror, resume from upstream after a mirror cut, quick give-up on a slow
mirror, credentials that stay where they belong, Harbor-style repository prefixes, wrong
bytes blamed on the mirror that sent them, connection budget and Docker Hub quota in stats()."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fake_registry import Clock, FakeRegistry, Fault, Sleeps, one_layer_manifest
from registry_sinks import MemorySink

from fetchd.auth import Credentials
from fetchd.config import BasicCredentials, Config, MirrorConfig, NetworkConfig, RegistryConfig
from fetchd.digest import Digest
from fetchd.errors import ConfigError, DigestMismatch
from fetchd.manifest import Descriptor
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient

REPO = "x/y"
BLOB = os.urandom(2 * 1024 * 1024 + 5)
MANIFEST = one_layer_manifest(BLOB)
DESC = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", Digest.of(BLOB), len(BLOB))


async def _fake(**kwargs: Any) -> FakeRegistry:
    reg = await FakeRegistry(**kwargs).start()
    reg.add_blob(BLOB)
    reg.add_blob(b"{}")
    reg.add_manifest(REPO, "v1", MANIFEST)
    return reg


@pytest.fixture
async def upstream() -> AsyncIterator[FakeRegistry]:
    reg = await _fake()
    try:
        yield reg
    finally:
        await reg.close()


@pytest.fixture
async def mirror() -> AsyncIterator[FakeRegistry]:
    reg = await _fake()
    try:
        yield reg
    finally:
        await reg.close()


def client_for(upstream: FakeRegistry, *mirrors: MirrorConfig, clock: Clock | None = None,
               sleeps: Sleeps | None = None, env: dict[str, str] | None = None,
               auth_file: str | None = None, **net: Any) -> RegistryClient:
    # near_latency 0: ranges as on a far link; a long mirror timeout except where a test
    # sets one (a loaded machine may take seconds to answer: not a fault under test)
    network = replace(NetworkConfig(), **{"backoff_base": 0.001, "backoff_cap": 0.01,
                                          "near_latency": 0, "mirror_timeout": 120.0, **net})
    reg = RegistryConfig(host=upstream.host, mirrors=mirrors, auth_file=auth_file)
    return RegistryClient(
        Config(network=network, registries=(reg,)),
        credentials=Credentials(env=env or {"HOME": "/nonexistent"}),
        sleep=sleeps if sleeps is not None else Sleeps(),
        **({"clock": clock} if clock else {}),
    )


def ref(reg: FakeRegistry, tag: str = "v1") -> Reference:
    return Reference.parse(f"{reg.host}/{REPO}:{tag}")


# --------------------------------------------------------------------------- failing mirrors


async def test_dead_mirror_is_skipped_for_the_cooldown_then_tried_again(upstream) -> None:
    gone = await _fake()
    dead = gone.host
    await gone.close()                                 # connection refused from now on
    clock = Clock()
    async with client_for(upstream, MirrorConfig(url=f"http://{dead}"), clock=clock,
                          mirror_cooldown=30.0) as client:
        await client.get_manifest(ref(upstream))
        assert client.stats()[dead]["requests"] == 1 and client.stats()[dead]["down"] is True
        await client.get_manifest(ref(upstream))       # in cooldown: not asked at all
        assert client.stats()[dead]["requests"] == 1
        clock.now += 31
        assert client.stats()[dead]["down"] is False
        await client.get_manifest(ref(upstream))       # cooldown over: asked again
        assert client.stats()[dead]["requests"] == 2
    assert len(upstream.requests("manifest")) == 3


async def test_mirror_cut_mid_blob_is_resumed_from_upstream_not_retried(upstream, mirror) -> None:
    cut = 1024 * 1024
    mirror.fault("blob", Fault(cut_after=cut))
    sink = MemorySink()
    async with client_for(upstream, MirrorConfig(url=mirror.url)) as client:
        sources = await client.fetch_blob(ref(upstream), DESC, sink)
    assert sources == (mirror.host, upstream.host)
    assert len(mirror.requests("blob")) == 1          # a mirror is not retried
    (resumed,) = upstream.requests("blob")
    assert resumed.headers["Range"].startswith("bytes=") and resumed.headers["Range"] != "bytes=0-"
    assert sink.written == len(BLOB)                  # no byte fetched twice
    sink.verify(DESC.digest, DESC.size)


async def test_slow_mirror_is_given_up_after_mirror_timeout(upstream, mirror) -> None:
    mirror.blob_delay = 30.0                          # holds its answer far beyond the timeout
    sink = MemorySink()
    async with client_for(upstream, MirrorConfig(url=mirror.url, timeout=0.2)) as client:
        sources = await client.fetch_blob(ref(upstream), DESC, sink)
        stats = client.stats()[mirror.host]
    assert sources == (upstream.host,)
    assert stats["timeouts"] == 1 and stats["fallbacks"] == 1 and stats["down"] is True
    sink.verify(DESC.digest, DESC.size)


async def test_mirror_429_falls_through_at_once(upstream, mirror) -> None:
    mirror.fault("manifest", Fault(status=429, headers={"Retry-After": "30"}))
    sleeps = Sleeps()
    async with client_for(upstream, MirrorConfig(url=mirror.url), sleeps=sleeps) as client:
        fetched = await client.get_manifest(ref(upstream))
        assert client.stats()[mirror.host]["fallbacks"] == 1
    assert fetched.body == MANIFEST and sleeps == []  # never waited on the mirror's Retry-After


async def test_wrong_manifest_from_a_mirror_is_counted_and_fetched_upstream(
        upstream, mirror, caplog: pytest.LogCaptureFixture) -> None:
    mirror.fault("manifest", Fault(corrupt=True))
    pinned = ref(upstream).with_digest(Digest.of(MANIFEST))
    with caplog.at_level(logging.WARNING):
        async with client_for(upstream, MirrorConfig(url=mirror.url)) as client:
            fetched = await client.get_manifest(pinned)
            assert client.stats()[mirror.host]["corrupt"] == 1
    assert fetched.body == MANIFEST and len(upstream.requests("manifest")) == 1
    assert any(mirror.host in r.getMessage() and "wrong content" in r.getMessage()
               for r in caplog.records)


async def test_blame_names_the_mirror_and_exclude_skips_it(upstream, mirror) -> None:
    mirror.fault("blob", Fault(corrupt=True))
    async with client_for(upstream, MirrorConfig(url=mirror.url)) as client:
        sink = MemorySink()
        sources = await client.fetch_blob(ref(upstream), DESC, sink)
        with pytest.raises(DigestMismatch):
            sink.verify(DESC.digest, DESC.size)       # what the store's commit does
        bad = client.blame(ref(upstream), DESC, sources)
        assert bad == {mirror.host} and client.stats()[mirror.host]["corrupt"] == 1
        assert client.blame(ref(upstream), DESC, (upstream.host,)) == frozenset()
        again = MemorySink()
        assert await client.fetch_blob(ref(upstream), DESC, again, exclude=bad) == (upstream.host,)
    again.verify(DESC.digest, DESC.size)
    assert len(mirror.requests("blob")) == 1


@pytest.mark.parametrize("ranges", [False, True])
async def test_mirror_gets_one_stream_unless_ranges_are_enabled(upstream, mirror, ranges: bool) -> None:
    sink = MemorySink()
    async with client_for(upstream, MirrorConfig(url=mirror.url, ranges=ranges),
                          range_threshold=1024, range_parts=4) as client:
        await client.fetch_blob(ref(upstream), DESC, sink)
    sink.verify(DESC.digest, DESC.size)
    with_range = [s for s in mirror.requests("blob") if "Range" in s.headers]
    if ranges:
        assert len(with_range) >= 3              # the probe, then two parts or more
    else:
        assert len(mirror.requests("blob")) == 1 and with_range == []


# --------------------------------------------------------------------------- credentials, paths


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_upstream_credentials_never_reach_a_bearer_mirror(upstream, mirror, tmp_path: Path) -> None:
    upstream.auth = mirror.auth = "bearer"
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {upstream.host: {"auth": base64.b64encode(
        b"up-user:up-secret").decode()}}}))
    mirror.add_manifest(REPO, "v1", MANIFEST)
    async with client_for(upstream, MirrorConfig(url=mirror.url), auth_file=str(auth_file)) as client:
        await client.get_manifest(ref(upstream))
    # the mirror got an anonymous token request and nothing else carrying a password
    for seen in mirror.seen:
        assert seen.headers.get("Authorization", "").startswith("Bearer ") or \
            "Authorization" not in seen.headers
    assert len(upstream.requests("manifest")) == 0

    mirror.seen.clear()
    creds = BasicCredentials("mirror-user", "mirror-pass")
    async with client_for(upstream, MirrorConfig(url=mirror.url, credentials=creds),
                          auth_file=str(auth_file)) as client:
        await client.get_manifest(ref(upstream))
    (token_request,) = mirror.requests("token")
    assert token_request.headers["Authorization"] == _basic("mirror-user", "mirror-pass")


async def test_harbor_style_url_prefixes_the_repository_and_its_scope(upstream, mirror) -> None:
    mirror.auth = "bearer"
    mirror.add_manifest(f"hub-proxy/{REPO}", "v1", MANIFEST)
    async with client_for(upstream, MirrorConfig(url=f"{mirror.url}/v2/hub-proxy")) as client:
        fetched = await client.get_manifest(ref(upstream))
    assert fetched.body == MANIFEST
    assert [s.path for s in mirror.requests("manifest")][-1] == f"/v2/hub-proxy/{REPO}/manifests/v1"
    assert mirror.requests("token")[0].query["scope"] == f"repository:hub-proxy/{REPO}:pull"
    assert upstream.requests("manifest") == []


@pytest.mark.parametrize(("url", "base", "prefix"), [
    ("https://m.example.com", "https://m.example.com", ""),
    ("https://m.example.com/cache", "https://m.example.com/cache", ""),
    ("https://harbor.example.com/v2/hub-proxy", "https://harbor.example.com", "hub-proxy"),
    ("https://h.example.com/x/v2/a/b", "https://h.example.com/x", "a/b"),
    ("https://m.example.com/v2", "https://m.example.com", ""),
    ("https://m.example.com/v2x", "https://m.example.com/v2x", ""),
])
def test_mirror_url_base_and_repository_prefix(url: str, base: str, prefix: str) -> None:
    mirror = MirrorConfig(url=url)
    assert (mirror.base, mirror.repository_prefix) == (base, prefix)


def test_mirror_timeouts_in_the_config() -> None:
    config = Config.from_dict({
        "network": {"mirror_timeout": 2, "mirror_cooldown": 0},
        "registries": {"docker.io": {"mirrors": [{"url": "http://127.0.0.1:65001", "timeout": 60}]}},
    }, env={})
    assert config.network.mirror_timeout == 2.0 and config.network.mirror_cooldown == 0.0
    assert config.registry("docker.io").mirrors[0].timeout == 60.0
    assert Config.from_dict({}, env={}).network.mirror_timeout == 5.0
    with pytest.raises(ConfigError, match="mirror_timeout"):
        Config.from_dict({"network": {"mirror_timeout": 0}}, env={})
    with pytest.raises(ConfigError, match="timeout"):
        Config.from_dict({"registries": {"q.io": {"mirrors": [{"url": "https://m", "timeout": -1}]}}},
                         env={})


# --------------------------------------------------------------------------- budget and quota


async def test_connection_budget_is_shared_and_visible(upstream) -> None:
    upstream.blob_delay = 0.05
    seen_in_use: list[int] = []
    seen_waiting: list[int] = []
    config = Config(network=replace(NetworkConfig(), backoff_base=0.001),
                    registries=(RegistryConfig(host=upstream.host, max_connections=2,
                                               requests_per_second=1000),))
    async with RegistryClient(config) as client:

        async def watch() -> None:
            while True:
                stats = client.stats().get(upstream.host)
                if stats:
                    seen_in_use.append(stats["connections_in_use"])
                    seen_waiting.append(stats["connections_waiting"])
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        sinks = [MemorySink() for _ in range(6)]
        await asyncio.gather(*(client.fetch_blob(ref(upstream), DESC, s) for s in sinks))
        watcher.cancel()
        stats = client.stats()[upstream.host]
    assert upstream.max_in_flight <= 2 and max(seen_in_use) == 2 and max(seen_waiting) >= 1
    assert stats["max_connections"] == 2 and stats["requests_per_second"] == 1000
    assert stats["connections_in_use"] == 0 and stats["role"] == "registry"


async def test_docker_hub_quota_is_kept_and_warned_once(
        upstream, caplog: pytest.LogCaptureFixture) -> None:
    upstream.ratelimit_remaining = 7
    with caplog.at_level(logging.WARNING):
        async with client_for(upstream) as client:
            await client.get_manifest(ref(upstream))
            await client.get_manifest(ref(upstream))
            stats = client.stats()[upstream.host]
    assert (stats["ratelimit_remaining"], stats["ratelimit_limit"],
            stats["ratelimit_window_seconds"]) == (7, 100, 21600)
    assert sum("manifest pulls left" in r.getMessage() for r in caplog.records) == 1
