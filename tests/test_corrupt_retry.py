"""Wrong bytes are retried, not fatal: a layer, manifest or config whose size or digest is
wrong is discarded and fetched again whole, up to ``network.corrupt_retries`` times, each
counted as ``corrupt``; only then the mismatch is the job's error.

The acceptance run goes through the fault proxy in front of the session registry: each blob's
first transfer is cut after 1 MiB, its second has one byte flipped, every 5th request is a 429
with Retry-After and every 7th a 503. A multi-layer image and the ~160 MB big image both come
out byte-identical to a clean pull.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from support.images import CatalogImage, Entry, make_layer, prng_bytes, push_custom
from support.proxy import RegistryProxy
from support.registry import LocalRegistry

from fetchd.config import Config
from fetchd.digest import Digest
from fetchd.errors import DigestMismatch
from fetchd.layer_store import LayerStore
from fetchd.platform import Platform
from fetchd.pull import FetchRequest, FetchResult, Puller
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient

pytestmark = pytest.mark.registry

AMD64 = Platform.parse("linux/amd64")
MiB = 1 << 20
REPO_TAG = "fetchd-test/faulted:v1"  # the same RepoTags through the proxy and directly


@pytest.fixture(scope="module")
def layered(registry: LocalRegistry) -> CatalogImage:
    """Three layers above 1 MiB (random bytes: gzip keeps their size) and one small one."""
    layers = [make_layer([Entry(f"data/part{i}", prng_bytes(f"corrupt-retry/{i}", size))])
              for i, size in enumerate((3 * MiB + 123, 2 * MiB + 7, MiB + 4096 + 1, 40_000))]
    return push_custom(registry, "fetchd-test/layered", "v1", layers)


class Daemon:
    """A Puller on its own store, as the daemon wires it (registry client, store, config)."""

    def __init__(self, root: Path, **network: Any) -> None:
        # near_latency 1 s: the proxy on loopback counts as near however loaded the machine,
        # so each blob is one stream and the proxy's per-transfer faults hit it as planned
        self.config = Config.from_dict({"network": {"backoff_base": 0.01, "backoff_cap": 0.05,
                                                    "near_latency": 1.0, **network}},
                                       env={"FETCHD_STORE": str(root)})
        self.store = LayerStore(root)
        self.registry = RegistryClient(self.config)
        self.puller = Puller(self.store, self.registry, self.config)

    async def pull(self, reference: str, level: int = 3) -> tuple[FetchResult, list[dict[str, Any]]]:
        job = self.puller.submit(FetchRequest(Reference.parse(reference), AMD64, level=level,
                                              repo_tag=REPO_TAG))
        events: list[dict[str, Any]] = []

        async def collect() -> None:
            async for event in job.events():
                events.append(event)

        collecting = asyncio.ensure_future(collect())
        try:
            return await job.wait(), events
        finally:
            await collecting

    def corrupt(self, host: str) -> int:
        return int(self.registry.stats()[host]["corrupt"] or 0)

    async def close(self) -> None:
        await self.puller.close()
        await self.registry.close()
        self.store.close()


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(**network: Any) -> Daemon:
        d = Daemon(tmp_path / f"store{len(made)}", **network)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            await d.close()


def _blob_gets(proxy: RegistryProxy, digest: Digest) -> list[Any]:
    return [r for r in proxy.log if r.method == "GET" and r.path.endswith(f"/blobs/{digest}")
            and r.status in (200, 206)]


async def test_a_layer_with_wrong_bytes_is_fetched_again_whole_and_counted(
        daemons: Callable[..., Daemon], proxy: RegistryProxy, layered: CatalogImage,
        caplog: pytest.LogCaptureFixture) -> None:
    layer = layered.only.layers[0]
    proxy.corrupt(f"/blobs/{layer.digest}$", at_byte=layer.size // 2, times=2)
    clean = await daemons().pull(layered.reference)
    d = daemons()
    with caplog.at_level(logging.WARNING, "fetchd"):
        result, events = await d.pull(layered.ref(proxy.host))
    assert result.archive_digest == clean[0].archive_digest
    assert d.corrupt(proxy.host) == 2
    gets = _blob_gets(proxy, layer.digest)
    assert len(gets) == 3
    assert [r.range for r in gets[1:]] == [None, None]  # again from byte 0, without Range
    warnings = [r.getMessage() for r in caplog.records if "wrong bytes" in r.getMessage()]
    assert len(warnings) == 2
    assert all(proxy.host in w and layered.repository in w and str(layer.digest) in w
               for w in warnings)
    said = [e["message"] for e in events if e.get("event") == "warning"]
    assert len(said) == 2 and all("again from byte 0" in m for m in said)


async def test_wrong_bytes_beyond_the_retries_fail_the_job_and_keep_nothing(
        daemons: Callable[..., Daemon], proxy: RegistryProxy, layered: CatalogImage) -> None:
    layer = layered.only.layers[1]
    proxy.corrupt(f"/blobs/{layer.digest}$", at_byte=10, times=2)
    d = daemons(corrupt_retries=1)
    with pytest.raises(DigestMismatch, match=str(layer.digest)):
        await d.pull(layered.ref(proxy.host))
    assert d.corrupt(proxy.host) == 2
    assert len(_blob_gets(proxy, layer.digest)) == 2
    assert not d.store.has(layer.digest)
    assert not list((d.store.root / "ingest").glob("*")) or all(
        layer.digest.hex not in p.name for p in (d.store.root / "ingest").iterdir())


async def test_manifest_and_config_by_digest_with_wrong_bytes_are_fetched_again(
        daemons: Callable[..., Daemon], proxy: RegistryProxy, layered: CatalogImage) -> None:
    part = layered.only
    proxy.corrupt(f"/manifests/{part.manifest_digest}$", at_byte=5, times=1)
    proxy.corrupt(f"/blobs/{part.config_digest}$", at_byte=5, times=2)
    d = daemons()
    result, _ = await d.pull(f"{proxy.host}/{layered.repository}@{part.manifest_digest}")
    assert result.manifest_digest == str(part.manifest_digest)
    assert d.corrupt(proxy.host) == 3
    assert proxy.count(f"/manifests/{part.manifest_digest}$", "GET") == 2
    assert len(_blob_gets(proxy, part.config_digest)) == 3


def _faulty(proxy: RegistryProxy, every_429: int = 5, every_503: int = 7) -> None:
    """The issue's fault proxy: cut after 1 MiB, then one byte flipped, every 5th request a
    429 (with Retry-After), every 7th a 503."""
    proxy.per_transfer(r"/blobs/sha256:", [("cut", MiB), ("corrupt", 4096)])
    proxy.every(every_429, 429, retry_after=1)
    proxy.every(every_503, 503)


@pytest.mark.parametrize("which", ["layered", "big"])
async def test_pulls_through_cuts_flipped_bytes_429s_and_503s_equal_a_clean_pull(
        daemons: Callable[..., Daemon], proxy: RegistryProxy, request: pytest.FixtureRequest,
        which: str) -> None:
    image: CatalogImage = request.getfixturevalue("layered" if which == "layered" else "big_image")
    level = 1  # the big image packs 560 MB of tar twice here: the fastest level
    clean, _ = await daemons().pull(image.reference, level)
    # The big image takes 6 requests (manifest by tag, config, its one blob three times and a
    # retry): too few for a 7th, so its 429s and 503s come every 3rd and 4th request.
    _faulty(proxy, *((5, 7) if which == "layered" else (3, 4)))
    d = daemons()
    result, _ = await d.pull(image.ref(proxy.host), level)
    assert result.archive_digest == clean.archive_digest
    assert Digest.of(result.archive_path.read_bytes()) == Digest.parse(clean.archive_digest)
    big = [layer for layer in image.only.layers if layer.size > MiB]
    assert big  # the cut and the flip hit every blob above 1 MiB
    assert d.corrupt(proxy.host) == len(big)
    for layer in big:
        gets = _blob_gets(proxy, layer.digest)
        # cut at 1 MiB, resumed from there (flipped byte), then again whole from byte 0
        assert len(gets) == 3, gets
        assert gets[0].range is None and not gets[0].complete
        assert gets[1].range is not None and gets[1].range.startswith("bytes=")
        assert gets[2].range is None and gets[2].complete and gets[2].bytes_sent == layer.size
    statuses = {r.status for r in proxy.log}
    assert {429, 503} <= statuses, [(r.method, r.path, r.status) for r in proxy.log]
