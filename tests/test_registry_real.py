"""The registry client against the real docker-registry (distribution 2.8) on loopback."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from registry_sinks import MemorySink

from fetchd.config import Config, NetworkConfig
from fetchd.digest import Digest
from fetchd.errors import BlobUnknown, DigestMismatch, ManifestUnknown, NameUnknown
from fetchd.manifest import ImageIndex, ImageManifest, select_platform
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient

pytestmark = pytest.mark.registry


def _client(**net: object) -> RegistryClient:
    net = {"near_latency": 0, **net}  # parallel ranges even on loopback, as on a far link
    network = replace(NetworkConfig(), backoff_base=0.001, backoff_cap=0.01, **net)  # type: ignore[arg-type]
    return RegistryClient(Config(network=network))


async def test_every_image_and_platform_resolves_and_every_blob_verifies(images) -> None:
    async with _client() as client:
        for image in images.values():
            ref = Reference.parse(image.reference)
            head = await client.head_manifest(ref)
            assert head.digest == image.digest, image.name
            top = await client.get_manifest(ref)
            assert top.digest == image.digest and top.body == image.raw
            parsed = top.parse()
            for key, part in image.platforms.items():
                if isinstance(parsed, ImageIndex):
                    desc = select_platform(parsed, part.platform, image.name)
                    assert desc.digest == part.manifest_digest, (image.name, key)
                    fetched = await client.get_manifest(ref.with_digest(desc.digest))
                    manifest = fetched.parse()
                else:
                    manifest = parsed
                assert isinstance(manifest, ImageManifest)
                config = await client.get_blob_bytes(ref, manifest.config)
                assert config == part.config_bytes
                for layer in manifest.layers:
                    sink = MemorySink()
                    await client.fetch_blob(ref, layer, sink)
                    assert sink.verify(layer.digest, layer.size) == part_layer(part, layer.digest)
        stats = client.stats()[images.host]
        assert stats["requests"] > 0 and stats["errors"] == 0 and stats["bytes"] > 0


def part_layer(part, digest: Digest) -> bytes:
    return next(layer for layer in part.layers if layer.digest == digest).read()


async def test_by_digest_reference_is_verified(images) -> None:
    image = images["multi-oci"]
    async with _client() as client:
        fetched = await client.get_manifest(Reference.parse(image.reference_by_digest))
    assert fetched.digest == image.digest
    assert fetched.header_digest == image.digest


async def test_unknown_tag_repository_and_blob_fail_at_once_with_clear_errors(images) -> None:
    image = images["single-oci"]
    ref = Reference.parse(image.reference)
    async with _client() as client:
        with pytest.raises(ManifestUnknown, match="no-such-tag"):
            await client.get_manifest(ref.with_tag("no-such-tag"))
        # distribution 2.8 answers MANIFEST_UNKNOWN for an unknown repository, others NAME_UNKNOWN
        with pytest.raises((NameUnknown, ManifestUnknown), match="no/such/repo"):
            await client.get_manifest(Reference.parse(f"{images.host}/no/such/repo:1"))
        desc = replace(image.only.layers[0].descriptor(), digest=Digest.of(b"absent"))
        with pytest.raises(BlobUnknown, match=image.repository):
            await client.fetch_blob(ref, desc, MemorySink())
        assert client.stats()[images.host]["retries"] == 0


async def test_wrong_descriptor_digest_is_caught_by_the_sink_owner(images) -> None:
    layer = images["single-oci"].only.layers[0]
    ref = Reference.parse(images["single-oci"].reference)
    sink = MemorySink()
    async with _client() as client:
        await client.fetch_blob(ref, layer.descriptor(), sink)
    with pytest.raises(DigestMismatch):
        sink.verify(Digest.of(b"something else"), layer.size)
    assert sink.accepted is None


@pytest.mark.slow
async def test_big_blob_in_parallel_ranges_has_the_right_digest(big_image) -> None:
    ref = Reference.parse(big_image.reference)
    layer = big_image.only.layers[0]
    sink = MemorySink()
    seen: list[int] = []
    async with _client(range_threshold=8 * 1024 * 1024, range_parts=8) as client:
        await client.fetch_blob(ref, layer.descriptor(), sink, progress=seen.append)
        stats = client.stats()[big_image.host]
    assert stats["range_supported"] is True
    assert stats["requests"] >= 9  # probe + 8 parts
    assert sink.written == layer.size and sum(seen) == layer.size
    await asyncio.to_thread(sink.verify, layer.digest, layer.size)
