"""The registry client against a scripted fake registry: auth, redirects, faults, retries."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import pytest
from fake_registry import Clock, FakeRegistry, Fault, Sleeps, one_layer_manifest
from registry_sinks import MemorySink

from fetchd.auth import Credentials
from fetchd.config import BasicCredentials, Config, MirrorConfig, NetworkConfig, RegistryConfig
from fetchd.digest import Digest
from fetchd.errors import (
    Denied,
    DigestMismatch,
    InsecureRegistry,
    ManifestInvalid,
    ManifestUnknown,
    RateLimited,
    RegistryError,
    SizeMismatch,
    Unauthorized,
    UnsupportedManifest,
)
from fetchd.manifest import DOCKER_MANIFEST, Descriptor
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient

REPO = "x/y"
BLOB = os.urandom(3 * 1024 * 1024 + 17)
MANIFEST = one_layer_manifest(BLOB)


@pytest.fixture
async def fake() -> AsyncIterator[FakeRegistry]:
    reg = await FakeRegistry().start()
    reg.add_blob(BLOB)
    reg.add_blob(b"{}")
    reg.add_manifest(REPO, "v1", MANIFEST)
    try:
        yield reg
    finally:
        await reg.close()


@pytest.fixture
async def storage() -> AsyncIterator[FakeRegistry]:
    """Another origin (another port) playing object storage."""
    reg = await FakeRegistry().start()
    reg.add_blob(BLOB)
    try:
        yield reg
    finally:
        await reg.close()


def make_client(*, sleeps: Sleeps | None = None, clock: Clock | None = None,
                env: dict[str, str] | None = None, registries: tuple[RegistryConfig, ...] = (),
                **net: Any) -> RegistryClient:
    # near_latency=0: parallel ranges whatever the (loopback) latency, as on a far link;
    # the near-host rule has its own test
    network = replace(NetworkConfig(), **{"backoff_base": 0.01, "backoff_cap": 0.05,
                                          "near_latency": 0, **net})
    return RegistryClient(
        Config(network=network, registries=registries),
        credentials=Credentials(env=env or {"HOME": "/nonexistent"}),
        sleep=sleeps if sleeps is not None else Sleeps(),
        **({"clock": clock} if clock else {}),
    )


def ref(reg: FakeRegistry, tag: str = "v1") -> Reference:
    return Reference.parse(f"{reg.host}/{REPO}:{tag}")


def blob_desc(data: bytes = BLOB) -> Descriptor:
    return Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", Digest.of(data), len(data))


# ---------------------------------------------------------------------- auth


async def test_bearer_token_is_fetched_once_reused_and_refreshed_before_expiry(fake) -> None:
    fake.auth = "bearer"
    fake.expires_in = 60
    clock = Clock()
    async with make_client(clock=clock) as client:
        first = await client.get_manifest(ref(fake))
        await client.get_manifest(ref(fake))
        assert fake.tokens_issued == 1
        token_request = fake.requests("token")[0]
        assert token_request.query == {"service": "fake-registry", "scope": f"repository:{REPO}:pull"}
        assert "Authorization" not in token_request.headers  # anonymous
        clock.now += 50  # inside the refresh margin of a 60 s token, before it expires
        await client.get_manifest(ref(fake))
        assert fake.tokens_issued == 2
        # the refreshed token was used proactively: no new 401 round trip
        statuses = [s.headers.get("Authorization") for s in fake.requests("manifest")]
    assert first.digest == Digest.of(MANIFEST)
    assert statuses == [None, "Bearer token-1", "Bearer token-1", "Bearer token-2"]


async def test_expires_in_defaults_to_60_seconds(fake) -> None:
    fake.auth, fake.expires_in = "bearer", None
    clock = Clock()
    async with make_client(clock=clock) as client:
        await client.get_manifest(ref(fake))
        clock.now += 40
        await client.get_manifest(ref(fake))
        assert fake.tokens_issued == 1
        clock.now += 15
        await client.get_manifest(ref(fake))
        assert fake.tokens_issued == 2


async def test_invalid_token_is_refetched_once(fake) -> None:
    fake.auth = "bearer"
    async with make_client() as client:
        await client.get_manifest(ref(fake))
        fake.valid_tokens.clear()  # revoked server-side
        await client.get_manifest(ref(fake))
        assert fake.tokens_issued == 2


async def test_401_after_a_refresh_fails_with_a_clear_message(fake) -> None:
    fake.auth = "bearer"
    fake.valid_tokens = _NeverValid()
    async with make_client() as client:
        with pytest.raises(Unauthorized, match="podman login") as info:
            await client.get_manifest(ref(fake))
    assert fake.tokens_issued == 1
    assert "token-1" not in info.value.message


class _NeverValid(set[str]):
    def add(self, item: str) -> None:
        pass


@pytest.mark.parametrize("right", [True, False], ids=["valid", "revoked"])
async def test_identity_token_login_uses_the_refresh_token_grant(fake, tmp_path: Path,
                                                                 right: bool) -> None:
    """`docker login` against an OAuth2 registry stores an identity token: it goes only in
    the POST body of the refresh-token grant to the token realm, never to the registry."""
    fake.auth, fake.password = "bearer", "identity-token-xyz"
    auth_file = tmp_path / "auth.json"
    stored = "identity-token-xyz" if right else "revoked-token"
    auth_file.write_text(json.dumps({"auths": {fake.host: {"identitytoken": stored}}}))
    async with make_client(env={"REGISTRY_AUTH_FILE": str(auth_file),
                                "HOME": str(tmp_path)}) as client:
        if right:
            assert (await client.get_manifest(ref(fake))).body == MANIFEST
        else:
            with pytest.raises(Unauthorized) as info:
                await client.get_manifest(ref(fake))
            assert "revoked-token" not in str(info.value)
    grants = [s for s in fake.requests("token") if s.method == "POST"]
    assert len(grants) == 1
    assert grants[0].query["grant_type"] == "refresh_token"
    assert grants[0].query["refresh_token"] == stored
    assert grants[0].query["scope"] == "repository:x/y:pull"
    assert grants[0].query["service"] == "fake-registry"
    assert "Authorization" not in grants[0].headers  # the token is in the body only
    for seen in fake.seen:
        if seen is not grants[0]:
            assert stored not in json.dumps([seen.path, seen.query, seen.headers])
    if right:
        assert fake.requests("manifest")[-1].headers["Authorization"] == "Bearer token-1"


async def test_basic_auth_from_the_users_auth_file(fake, tmp_path: Path) -> None:
    fake.auth = "basic"
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {fake.host: {
        "auth": base64.b64encode(b"user:secret").decode()}}}))
    async with make_client(env={"REGISTRY_AUTH_FILE": str(auth_file), "HOME": str(tmp_path)}) as client:
        fetched = await client.get_manifest(ref(fake))
    assert fetched.body == MANIFEST
    assert fake.requests("manifest")[-1].headers["Authorization"].startswith("Basic ")


async def test_basic_auth_without_credentials_is_unauthorized(fake) -> None:
    fake.auth = "basic"
    async with make_client() as client:
        with pytest.raises(Unauthorized, match=f"podman login {fake.host}"):
            await client.get_manifest(ref(fake))


async def test_redirect_to_another_origin_carries_no_authorization(fake, storage) -> None:
    fake.auth = "bearer"
    fake.fault("blob", Fault(redirect=storage.url))
    sink = MemorySink()
    async with make_client() as client:
        await client.fetch_blob(ref(fake), blob_desc(), sink)
    sink.verify(Digest.of(BLOB), len(BLOB))
    assert fake.requests("blob")[-1].headers["Authorization"] == "Bearer token-1"
    (storage_request,) = storage.seen
    assert "Authorization" not in storage_request.headers
    assert storage_request.headers["Accept-Encoding"] == "identity"  # bytes as stored, not gzip


async def test_storage_refusing_a_redirect_is_asked_again_via_the_registry(fake, storage) -> None:
    fake.fault("blob", Fault(redirect=storage.url), Fault(redirect=storage.url))
    storage.fault("blob", Fault(status=403))  # e.g. an expired signed URL
    sink = MemorySink()
    async with make_client() as client:
        await client.fetch_blob(ref(fake), blob_desc(), sink)
    sink.verify(Digest.of(BLOB), len(BLOB))
    assert len(fake.requests("blob")) == 2 and len(storage.seen) == 2


async def test_foreign_layer_urls_get_no_credentials(fake, storage) -> None:
    fake.auth = "bearer"
    desc = replace(blob_desc(), urls=(f"{storage.url}/storage/{Digest.of(BLOB)}",))
    sink = MemorySink()
    async with make_client() as client:
        await client.get_manifest(ref(fake))  # holds a token for the registry by now
        await client.fetch_blob(ref(fake), desc, sink)
    sink.verify(Digest.of(BLOB), len(BLOB))
    assert len(storage.seen) == 1 and "Authorization" not in storage.seen[0].headers
    assert fake.requests("blob") == []


# ---------------------------------------------------------------------- digests, sizes


async def test_corrupt_blob_body_is_a_digest_mismatch_and_nothing_is_accepted(fake) -> None:
    fake.fault("blob", Fault(corrupt=True), Fault(corrupt=True))
    sink = MemorySink()
    async with make_client() as client:
        await client.fetch_blob(ref(fake), blob_desc(), sink)
        with pytest.raises(DigestMismatch):
            sink.verify(Digest.of(BLOB), len(BLOB))
        assert sink.accepted is None
    small = blob_desc(BLOB[:1000])
    fake.add_blob(BLOB[:1000])
    fake.fault("blob", Fault(corrupt=True))
    async with make_client(corrupt_retries=0) as client:
        with pytest.raises(DigestMismatch, match="nothing was kept"):
            await client.get_blob_bytes(ref(fake), small)
        assert client.stats()[fake.host]["corrupt"] == 1


async def test_manifest_by_digest_is_verified(fake) -> None:
    digest = Digest.of(MANIFEST)
    fake.fault("manifest", Fault(corrupt=True))
    async with make_client(corrupt_retries=0) as client:
        with pytest.raises(DigestMismatch, match=str(digest)):
            await client.get_manifest(ref(fake).with_digest(digest))


@pytest.mark.parametrize("kind", ["manifest", "config"])
async def test_wrong_bytes_from_the_registry_are_fetched_again_whole_and_counted(
        fake, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    """corrupt_retries (default 2) more whole transfers, each counted and logged as a warning
    naming registry, repository and digest; one more wrong answer is the error."""
    small = BLOB[:1000]
    fake.add_blob(small)
    digest = Digest.of(MANIFEST if kind == "manifest" else small)

    async def get(client: RegistryClient) -> bytes:
        if kind == "manifest":
            return (await client.get_manifest(ref(fake).with_digest(digest))).body
        return await client.get_blob_bytes(ref(fake), blob_desc(small))

    fault = "manifest" if kind == "manifest" else "blob"
    fake.fault(fault, Fault(corrupt=True), Fault(corrupt=True))
    async with make_client() as client:
        with caplog.at_level(logging.WARNING, "fetchd"):
            body = await get(client)
        assert Digest.of(body) == digest
        assert client.stats()[fake.host]["corrupt"] == 2
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert all(fake.host in w and REPO in w and str(digest) in w and "again from byte 0" in w
                   for w in warnings)
        gets = [r for r in fake.requests(fault) if r.method == "GET"]
        assert len(gets) == 3 and not any("Range" in r.headers for r in gets)

        fake.fault(fault, Fault(corrupt=True), Fault(corrupt=True), Fault(corrupt=True))
        with pytest.raises(DigestMismatch, match=str(digest)):
            await get(client)
        assert client.stats()[fake.host]["corrupt"] == 5


async def test_disagreeing_docker_content_digest_is_flagged_not_trusted(fake, caplog) -> None:
    wrong = Digest.of(b"not the manifest")
    fake.fault("manifest", Fault(headers={"Docker-Content-Digest": str(wrong)}))
    with caplog.at_level(logging.WARNING, logger="fetchd.registry_async"):
        async with make_client() as client:
            fetched = await client.get_manifest(ref(fake))
    assert fetched.digest == Digest.of(MANIFEST)
    assert fetched.header_digest == wrong
    assert "Docker-Content-Digest" in caplog.text


async def test_manifest_cut_mid_body_is_fetched_again(fake) -> None:
    fake.fault("manifest", Fault(cut_after=100))
    async with make_client() as client:
        fetched = await client.get_manifest(ref(fake))
        assert client.stats()[fake.host]["retries"] == 1
    assert fetched.body == MANIFEST and len(fake.requests("manifest")) == 2


async def test_head_resolves_a_tag_without_a_body(fake) -> None:
    async with make_client() as client:
        head = await client.head_manifest(ref(fake))
    assert head.digest == Digest.of(MANIFEST) and head.body == b""
    assert [s.method for s in fake.requests("manifest")] == ["HEAD"]


async def test_head_without_a_digest_header_falls_back_to_get(fake) -> None:
    fake.fault("manifest", Fault(headers={"Docker-Content-Digest": ""}))
    async with make_client() as client:
        head = await client.head_manifest(ref(fake))
    assert head.digest == Digest.of(MANIFEST)
    assert [s.method for s in fake.requests("manifest")] == ["HEAD", "GET"]


async def test_schema1_is_refused_clearly(fake) -> None:
    schema1 = json.dumps({"schemaVersion": 1, "name": REPO, "tag": "old", "fsLayers": []}).encode()
    fake.add_manifest(REPO, "old", schema1, "application/vnd.docker.distribution.manifest.v1+prettyjws")
    async with make_client() as client:
        with pytest.raises(UnsupportedManifest, match="schema1"):
            await client.get_manifest(ref(fake, "old"))


async def test_manifest_size_is_capped(fake) -> None:
    huge = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                       "pad": "x" * (4 * 1024 * 1024)}).encode()
    fake.add_manifest(REPO, "huge", huge, DOCKER_MANIFEST)
    async with make_client() as client:
        with pytest.raises(ManifestInvalid, match="limit"):
            await client.get_manifest(ref(fake, "huge"))


async def test_blob_bigger_than_its_descriptor_is_cut_off(fake) -> None:
    desc = replace(blob_desc(), size=len(BLOB) - 10)
    async with make_client() as client:
        with pytest.raises(SizeMismatch):
            await client.fetch_blob(ref(fake), desc, MemorySink())


# ---------------------------------------------------------------------- resume, ranges


async def test_range_resume_after_a_cut_sends_no_byte_twice(fake) -> None:
    fake.fault("blob", Fault(cut_after=1024 * 1024 + 5))
    sink = MemorySink()
    async with make_client() as client:
        await client.fetch_blob(ref(fake), blob_desc(), sink)
        assert client.stats()[fake.host]["retries"] == 1
    sink.verify(Digest.of(BLOB), len(BLOB))
    ranges = [s.headers.get("Range") for s in fake.requests("blob")]
    assert ranges == [None, f"bytes={1024 * 1024 + 5}-"]
    assert sink.written == len(BLOB)


class SlowSink(MemorySink):
    async def write_at(self, offset: int, data: bytes) -> None:
        await asyncio.sleep(0.05)  # the connection drops while aiohttp still buffers data
        await super().write_at(offset, data)


async def test_bytes_buffered_when_the_connection_drops_are_kept(fake) -> None:
    cut = 1024 * 1024 + 300_000
    fake.fault("blob", Fault(cut_after=cut))
    sink = SlowSink()
    async with make_client() as client:
        await client.fetch_blob(ref(fake), blob_desc(), sink)
    sink.verify(Digest.of(BLOB), len(BLOB))
    assert [s.headers.get("Range") for s in fake.requests("blob")] == [None, f"bytes={cut}-"]


async def test_resume_starts_at_the_sinks_offset(fake) -> None:
    sink = MemorySink(BLOB[:5000])
    seen: list[int] = []
    async with make_client() as client:
        await client.fetch_blob(ref(fake), blob_desc(), sink, progress=seen.append)
    sink.verify(Digest.of(BLOB), len(BLOB))
    assert fake.requests("blob")[0].headers["Range"] == "bytes=5000-"
    assert sum(seen) == len(BLOB) - 5000


async def test_range_ignored_restarts_cleanly_from_zero(fake) -> None:
    fake.fault("blob", Fault(cut_after=700_000), Fault(ignore_range=True))
    sink = MemorySink()
    seen: list[int] = []
    async with make_client() as client:
        await client.fetch_blob(ref(fake), blob_desc(), sink, progress=seen.append)
    assert sink.truncations == [0]
    assert sum(seen) == len(BLOB)
    sink.verify(Digest.of(BLOB), len(BLOB))


async def test_parallel_ranges_with_a_cut_part_complete_and_verify(fake) -> None:
    fake.fault("blob", Fault(), Fault(cut_after=100_000))  # probe, then one part is cut
    sink = MemorySink()
    async with make_client(range_threshold=1024 * 1024, range_parts=3) as client:
        await client.fetch_blob(ref(fake), blob_desc(), sink)
        assert client.stats()[fake.host]["range_supported"] is True
    sink.verify(Digest.of(BLOB), len(BLOB))
    parts = [s.headers["Range"] for s in fake.requests("blob")[1:]]
    assert len(parts) == 4  # three parts and one resume
    assert sink.written == len(BLOB)


async def test_a_near_host_gets_one_stream_per_blob_and_a_far_one_ranges(fake) -> None:
    """Parallel ranges pay off on far (window-limited) paths; a host whose blob responses
    start within near_latency (here: loopback) gets each blob as one stream."""
    from support.proxy import RegistryProxy

    big = os.urandom(6 * 1024 * 1024)
    fake.add_blob(big)
    # thresholds far from the measured latencies, so a busy test host cannot flip them
    async with make_client(range_threshold=1024 * 1024, range_parts=4,
                           near_latency=0.25) as client:
        await client.get_blob_bytes(ref(fake), blob_desc(b"{}"))  # the config, as a pull does
        sink = MemorySink()
        await client.fetch_blob(ref(fake), blob_desc(big), sink)
        latency = client.stats()[fake.host]["latency_ms"]
    sink.verify(Digest.of(big), len(big))
    assert [s.headers.get("Range") for s in fake.requests("blob")] == [None, None]
    assert latency is not None and 0 < latency <= 250
    # the same blob behind 50 ms of latency: probed, then parallel pieces
    fake.seen.clear()
    proxy = RegistryProxy(fake)
    try:
        proxy.set_link(latency=0.05)
        sink = MemorySink()
        async with make_client(range_threshold=1024 * 1024, range_parts=4,
                               near_latency=0.01) as client:
            await client.fetch_blob(Reference.parse(f"{proxy.host}/{REPO}:v1"), blob_desc(big),
                                    sink)
            assert client.stats()[proxy.host]["latency_ms"] >= 50
        sink.verify(Digest.of(big), len(big))
        assert proxy.count("/blobs/", "GET") >= 5  # the probe and the pieces on 4 connections
        assert sink.written == len(big)
    finally:
        proxy.stop()


async def test_blobs_redirected_to_another_origin_keep_parallel_ranges(fake, storage) -> None:
    """A near registry that hands blobs to object storage or a CDN: that path is unknown,
    so blobs keep parallel ranges."""
    big = os.urandom(6 * 1024 * 1024)
    for data in (big, b"{}"):
        fake.add_blob(data)
        storage.add_blob(data)
    fake.fault("blob", *[Fault(redirect=storage.url) for _ in range(20)])
    sink = MemorySink()
    async with make_client(range_threshold=1024 * 1024, range_parts=4,
                           near_latency=0.25) as client:
        await client.get_blob_bytes(ref(fake), blob_desc(b"{}"))
        await client.fetch_blob(ref(fake), blob_desc(big), sink)
        assert client.stats()[fake.host]["blob_redirects"] is True
    sink.verify(Digest.of(big), len(big))
    ranged = [s for s in storage.seen if "/storage/" in s.path and "Range" in s.headers]
    assert len(ranged) >= 4  # the probe and the pieces on 4 connections
    assert sink.written == len(big)


async def test_parts_held_beyond_the_prefix_are_not_fetched_again(fake) -> None:
    """A resume after a crash mid-parallel-fetch asks only for the gaps between held parts."""
    held = [(1_000_000, 1_500_000), (2_000_000, len(BLOB) - 1000)]
    sink = MemorySink(BLOB[:300_000])
    for a, b in held:
        await sink.write_at(a, BLOB[a:b])
    before = sink.written
    seen: list[int] = []
    # far below the range threshold: the held parts alone make ranges worth it
    async with make_client(range_threshold=1 << 30, range_parts=4) as client:
        await client.fetch_blob(ref(fake), blob_desc(), sink, progress=seen.append)
    sink.verify(Digest.of(BLOB), len(BLOB))
    ranges = {s.headers["Range"] for s in fake.requests("blob")[1:]}  # after the probe
    assert ranges == {"bytes=300000-999999", "bytes=1500000-1999999", f"bytes={len(BLOB) - 1000}-"}
    assert len(fake.requests("blob")) == 4
    assert sink.written - before == 700_000 + 500_000 + 1000 == sum(seen)


async def test_a_held_tail_is_not_fetched_again(fake) -> None:
    sink = MemorySink(BLOB[:100_000])
    await sink.write_at(1_000_000, BLOB[1_000_000:])  # every part but the first finished
    async with make_client(range_threshold=1 << 30) as client:
        await client.fetch_blob(ref(fake), blob_desc(), sink)
    sink.verify(Digest.of(BLOB), len(BLOB))
    assert [s.headers["Range"] for s in fake.requests("blob")] == ["bytes=0-0", "bytes=100000-999999"]


async def test_host_without_range_support_is_probed_once_and_streamed(fake) -> None:
    fake.fault("blob", Fault(ignore_range=True))
    async with make_client(range_threshold=1024 * 1024, range_parts=4) as client:
        for _ in range(2):
            sink = MemorySink()
            await client.fetch_blob(ref(fake), blob_desc(), sink)
            sink.verify(Digest.of(BLOB), len(BLOB))
        assert client.stats()[fake.host]["range_supported"] is False
    assert [s.headers.get("Range") for s in fake.requests("blob")] == ["bytes=0-0", None, None]


async def test_connections_per_host_are_bounded_across_pulls(fake) -> None:
    fake.blob_delay = 0.02
    blobs = [os.urandom(1000 + i) for i in range(12)]
    for b in blobs:
        fake.add_blob(b)
    async with make_client(max_connections=3) as client:
        async def pull(data: bytes) -> None:
            sink = MemorySink()
            await client.fetch_blob(ref(fake), blob_desc(data), sink)
            sink.verify(Digest.of(data), len(data))
        await asyncio.gather(*(pull(b) for b in blobs))
    assert fake.max_in_flight == 3


# ---------------------------------------------------------------------- retries and errors


async def test_429_with_retry_after_seconds_is_honoured(fake) -> None:
    fake.fault("manifest", Fault(status=429, headers={"Retry-After": "7"}))
    sleeps = Sleeps()
    async with make_client(sleeps=sleeps) as client:
        await client.get_manifest(ref(fake))
        assert client.stats()[fake.host]["retries"] == 1
    assert sleeps == [7.0]


async def test_429_with_retry_after_date_is_capped(fake) -> None:
    import time
    fake.fault("manifest", Fault(status=429, headers={"Retry-After": formatdate(time.time() + 3600, usegmt=True)}))
    sleeps = Sleeps()
    async with make_client(sleeps=sleeps, retry_after_cap=12.0) as client:
        await client.get_manifest(ref(fake))
    assert sleeps == [12.0]


async def test_quota_429_fails_at_once_and_ratelimit_is_kept(fake) -> None:
    fake.ratelimit_remaining = 0
    fake.fault("manifest", Fault(status=429, body=b'{"errors":[{"code":"TOOMANYREQUESTS"}]}'))
    sleeps = Sleeps()
    async with make_client(sleeps=sleeps) as client:
        with pytest.raises(RateLimited, match="mirror"):
            await client.get_manifest(ref(fake))
        assert client.stats()[fake.host]["ratelimit_remaining"] == 0
    assert sleeps == []


async def test_5xx_is_retried_with_growing_backoff(fake) -> None:
    fake.fault("manifest", Fault(status=503), Fault(status=500), Fault(status=502))
    sleeps = Sleeps()
    async with make_client(sleeps=sleeps, backoff_base=1.0, backoff_cap=100.0) as client:
        await client.get_manifest(ref(fake))
        assert client.stats()[fake.host]["retries"] == 3
    assert 0.5 <= sleeps[0] <= 1 and 1 <= sleeps[1] <= 2 and 2 <= sleeps[2] <= 4


async def test_5xx_beyond_the_retries_fails_naming_the_registry(fake) -> None:
    fake.fault("manifest", *[Fault(status=500)] * 3)
    async with make_client(retries=2) as client:
        with pytest.raises(RegistryError, match=f"registry {fake.host}.*HTTP 500"):
            await client.get_manifest(ref(fake))
        assert client.stats()[fake.host]["errors"] == 1


async def test_404_fails_at_once_with_a_clear_error(fake) -> None:
    sleeps = Sleeps()
    async with make_client(sleeps=sleeps) as client:
        with pytest.raises(ManifestUnknown, match=f"{fake.host}/{REPO} has no manifest nope"):
            await client.get_manifest(ref(fake, "nope"))
    assert sleeps == [] and len(fake.requests("manifest")) == 1


async def test_connection_refused_is_retried_then_reported(fake) -> None:
    port = fake.server.port  # type: ignore[union-attr]
    await fake.close()
    sleeps = Sleeps()
    async with make_client(sleeps=sleeps, retries=2) as client:
        with pytest.raises(RegistryError, match="3 tries"):
            await client.get_manifest(Reference.parse(f"127.0.0.1:{port}/{REPO}:v1"))
    assert len(sleeps) == 2


# ---------------------------------------------------------------------- mirrors


async def test_mirror_404_falls_back_to_upstream_without_upstream_credentials(fake, storage, tmp_path) -> None:
    fake.auth = "basic"
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {fake.host: {"username": "user", "password": "secret"}}}))
    mirror = MirrorConfig(url=storage.url, ns=True, headers=(("X-Mirror", "1"),))
    registries = (RegistryConfig(host=fake.host, auth_file=str(auth_file), mirrors=(mirror,)),)
    async with make_client(registries=registries) as client:
        fetched = await client.get_manifest(ref(fake))
        sink = MemorySink()
        await client.fetch_blob(ref(fake), blob_desc(), sink)
    assert fetched.body == MANIFEST
    mirror_manifest = storage.requests("manifest")[0]
    assert mirror_manifest.query == {"ns": fake.host}
    assert mirror_manifest.headers["X-Mirror"] == "1"
    assert all("Authorization" not in s.headers for s in storage.seen)
    # the mirror had the blob: the registry was never asked for it
    assert fake.requests("blob") == [] and len(storage.requests("blob")) == 1
    sink.verify(Digest.of(BLOB), len(BLOB))


async def test_digest_only_mirror_never_gets_tag_requests(fake, storage) -> None:
    storage.add_manifest(REPO, None, MANIFEST)
    mirror = MirrorConfig(url=storage.url, digest_only=True,
                          credentials=BasicCredentials("mirror-user", "mirror-pass"))
    async with make_client(registries=(RegistryConfig(host=fake.host, mirrors=(mirror,)),)) as client:
        tagged = await client.get_manifest(ref(fake))
        pinned = await client.get_manifest(ref(fake).with_digest(tagged.digest))
    assert pinned.body == MANIFEST
    assert [s.path.rsplit("/", 1)[1] for s in storage.requests("manifest")] == [str(tagged.digest)]
    assert [s.path.rsplit("/", 1)[1] for s in fake.requests("manifest")] == ["v1"]


# ---------------------------------------------------------------------- pacing, token server, TLS


async def test_requests_per_second_spaces_request_starts(fake) -> None:
    sleeps = Sleeps()
    registries = (RegistryConfig(host=fake.host, requests_per_second=10),)
    async with make_client(sleeps=sleeps, registries=registries) as client:
        for _ in range(3):
            await client.get_manifest(ref(fake))
    assert len(sleeps) == 2
    assert 0.05 < sleeps[0] <= 0.1 and 0.15 < sleeps[1] <= 0.2


async def test_token_server_failure_is_retried(fake) -> None:
    fake.auth = "bearer"
    fake.fault("token", Fault(status=503))
    sleeps = Sleeps()
    async with make_client(sleeps=sleeps) as client:
        await client.get_manifest(ref(fake))
        assert client.stats()[fake.host]["retries"] == 1
    assert fake.tokens_issued == 1 and len(sleeps) == 1


@pytest.mark.parametrize("body", [b"[" + b"[1]," * 200_000 + b"1]",
                                  b'{"token": "t", "x": [' + b"{}," * 200_000 + b"1]}"],
                         ids=["arrays", "objects"])
async def test_a_token_answer_flooded_with_json_values_is_not_decoded(fake, body: bytes) -> None:
    """Issue 13: decoding cost follows the number of JSON values (1 MiB of nested arrays: ~50
    ms holding the event loop); a token answer has a few, so one with hundreds is refused
    unread, naming the token server."""
    fake.auth = "bearer"
    fake.fault("token", Fault(status=200, body=body))
    async with make_client(retries=0) as client:
        with pytest.raises(RegistryError, match=r"answered with about \d+ JSON values .a "
                                                "token answer has a few; at most 256 are read"):
            await client.get_manifest(ref(fake))
    assert fake.tokens_issued == 0


class _Loopback(aiohttp.abc.AbstractResolver):
    """Resolves every name to 127.0.0.1: a 'remote' registry that stays on this machine."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[Any]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


@pytest.fixture
async def remote_session() -> AsyncIterator[aiohttp.ClientSession]:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=_Loopback()),
                                    auto_decompress=False)
    try:
        yield session
    finally:
        await session.close()


async def test_plain_http_registry_needs_insecure(fake, remote_session) -> None:
    name = f"registry.test:{fake.server.port}"  # type: ignore[union-attr]
    remote = Reference.parse(f"{name}/{REPO}:v1")
    async with RegistryClient(Config(), remote_session) as client:
        with pytest.raises(InsecureRegistry, match=f'registries."{name}"'):
            await client.get_manifest(remote)
    assert fake.seen == []  # nothing was sent in clear text
    insecure = Config(registries=(RegistryConfig(host=name, insecure=True),))
    async with RegistryClient(insecure, remote_session) as client:
        fetched = await client.get_manifest(remote)
    assert fetched.body == MANIFEST


async def test_failure_messages_and_logs_carry_no_url_secrets(caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp quotes the URL it failed on; a signed storage URL's query is a secret."""
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    signed = URL("https://storage.example/blob?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA")
    info = aiohttp.RequestInfo(signed, "GET", CIMultiDictProxy(CIMultiDict()), signed)

    class BrokenSession:
        async def request(self, *args: Any, **kwargs: Any) -> Any:
            raise aiohttp.ClientResponseError(info, (), status=400, message="Invalid header")

        async def close(self) -> None:
            pass

    client = RegistryClient(Config(network=replace(NetworkConfig(), retries=1)),
                            session=BrokenSession(), sleep=Sleeps())  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG), pytest.raises(RegistryError) as err:
        await client.get_manifest(Reference.parse("127.0.0.1:5000/x/y:v1"))
    assert "storage.example/blob" in err.value.message
    for text in (err.value.message, caplog.text):
        assert "s3cr3t" not in text and "AKIA" not in text



# ---------------------------------------------------------------------- hostile answers (issue 13)

HOSTILE_REDIRECTS = [
    ("file", "file://", "redirected to a file: URL"),
    ("ftp", "ftp://127.0.0.1", "redirected to a ftp: URL"),
    ("data", "data:text/plain,", "redirected to a"),
    ("bad ipv6 host", "http://[1:2:3]", "malformed URL"),
    ("port out of range", "http://127.0.0.1:99999", "malformed URL"),
]


@pytest.mark.parametrize("base, words", [h[1:] for h in HOSTILE_REDIRECTS],
                         ids=[h[0] for h in HOSTILE_REDIRECTS])
async def test_redirects_to_what_is_not_http_are_clear_registry_errors(
        fake: FakeRegistry, base: str, words: str) -> None:
    fake.fault("blob", Fault(redirect=base))
    async with make_client() as client:
        with pytest.raises(RegistryError, match=words) as info:
            await client.fetch_blob(ref(fake), blob_desc(), MemorySink())
    assert fake.host in info.value.message  # names the registry
    assert len(fake.requests("blob")) == 1  # a hostile answer is not retried


ESCAPES = [
    ("CSI colour", "\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("OSC title", "\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),
    ("C1 CSI", "\x9b2J", "\\x9b2J"),
    ("newline into the log", "ok\nFAKE LOG LINE", "ok\\nFAKE LOG LINE"),
    ("bidi override", "abc\u202edcba", "abc\\u202edcba"),
]


@pytest.mark.parametrize("said, shown", [e[1:] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
async def test_registry_error_text_reaches_messages_escaped(
        fake: FakeRegistry, said: str, shown: str) -> None:
    body = json.dumps({"errors": [{"code": "DENIED", "message": said}]}).encode()
    fake.fault("blob", Fault(status=403, body=body))
    async with make_client() as client:
        with pytest.raises(Denied) as info:
            await client.fetch_blob(ref(fake), blob_desc(), MemorySink())
    message = info.value.message
    assert shown in message
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or c == "\u202e" for c in message)
