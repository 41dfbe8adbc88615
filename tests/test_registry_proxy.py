"""Pulls through a fault-injecting proxy in front of the real registry.

The proxy forwards to docker-registry, counts the body bytes it sends per path, and
injects scripted faults (cut mid-body, 500, 429, stall). Every pull must complete and
verify; the tests report how many bytes were sent twice (resume must not re-send).

The proxy here is a small local one; ``tests/support/proxy.py`` (infra) is the shared one.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from registry_sinks import MemorySink

from fetchd.config import Config, NetworkConfig
from fetchd.manifest import ImageIndex, ImageManifest, select_platform
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient

pytestmark = pytest.mark.registry

_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class Inject:
    match: Callable[[web.Request], bool]
    kind: str                 # "cut" | "500" | "429" | "stall"
    at: float = 0.5           # share of the body sent before a cut or stall


class FaultProxy:
    def __init__(self, upstream: str, stall: float = 1.0) -> None:
        self.upstream = upstream
        self.stall = stall
        self.faults: deque[Inject] = deque()
        self.sent: Counter[str] = Counter()        # body bytes sent per path
        self.injected: Counter[str] = Counter()
        self.server: TestServer | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> FaultProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        self.session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.server is not None:
            await self.server.close()

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    def _take(self, request: web.Request) -> Inject | None:
        for fault in self.faults:
            if fault.match(request):
                self.faults.remove(fault)
                self.injected[fault.kind] += 1
                return fault
        return None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        fault = self._take(request)
        if fault is not None and fault.kind == "500":
            return web.Response(status=500, text="injected")
        if fault is not None and fault.kind == "429":
            return web.Response(status=429, text="injected", headers={"Retry-After": "0"})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        assert self.session is not None
        async with self.session.request(request.method, f"{self.upstream}{request.path_qs}",
                                        headers=headers, data=await request.read(),
                                        allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in _HOP})
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            limit = int((up.content_length or 0) * fault.at) if fault else None
            sent = 0
            async for chunk in up.content.iter_chunked(64 * 1024):
                if limit is not None and sent + len(chunk) >= limit:
                    chunk = chunk[:limit - sent]
                    await resp.write(chunk)
                    self.sent[request.path] += len(chunk)
                    if fault is not None and fault.kind == "stall":
                        await asyncio.sleep(self.stall)
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                await resp.write(chunk)
                sent += len(chunk)
                self.sent[request.path] += len(chunk)
            await resp.write_eof()
            return resp


@pytest.fixture
async def proxy(registry) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy(registry.url, stall=1.0).start()
    try:
        yield p
    finally:
        await p.close()


def client(**net: object) -> RegistryClient:
    values = {"backoff_base": 0.001, "backoff_cap": 0.01, "read_timeout": 0.3, **net}
    return RegistryClient(Config(network=replace(NetworkConfig(), **values)))  # type: ignore[arg-type]


def blob_request(request: web.Request) -> bool:
    return "/blobs/" in request.path and request.method == "GET"


async def pull_all(c: RegistryClient, image, host: str) -> dict[str, int]:
    """Every platform's manifest, config and layers, verified; returns layer sizes per path."""
    ref = Reference.parse(image.ref(host))
    top = (await c.get_manifest(ref)).parse()
    sizes: dict[str, int] = {}
    for part in image.platforms.values():
        if isinstance(top, ImageIndex):
            desc = select_platform(top, part.platform, image.name)
            manifest = (await c.get_manifest(ref.with_digest(desc.digest))).parse()
        else:
            manifest = top
        assert isinstance(manifest, ImageManifest)
        assert await c.get_blob_bytes(ref, manifest.config) == part.config_bytes
        for layer in manifest.layers:
            path = f"/v2/{image.repository}/blobs/{layer.digest}"
            if path in sizes:
                continue  # shared base layer: the store would hold it already
            sink = MemorySink()
            await c.fetch_blob(ref, layer, sink)
            sink.verify(layer.digest, layer.size)
            sizes[path] = layer.size
    return sizes


def sent_twice(proxy: FaultProxy, sizes: dict[str, int]) -> int:
    return sum(max(0, proxy.sent[path] - size) for path, size in sizes.items())


async def test_pull_through_cuts_500_429_and_stalls_completes_and_verifies(proxy, images) -> None:
    image = images["multi-oci"]
    proxy.faults.extend([
        Inject(lambda r: "/manifests/" in r.path, "500"),
        Inject(lambda r: "/manifests/" in r.path, "429"),
        Inject(lambda r: "/manifests/" in r.path, "cut", at=0.5),
        *[Inject(blob_request, "cut", at=0.3 + 0.1 * i) for i in range(4)],
        Inject(blob_request, "stall", at=0.6),
        Inject(blob_request, "500"),
        Inject(blob_request, "cut", at=0.9),
    ])
    async with client() as c:
        sizes = await pull_all(c, image, proxy.host)
        stats = c.stats()[proxy.host]
    twice = sent_twice(proxy, sizes)
    print(f"faults injected: {dict(proxy.injected)}; layer bytes sent twice: {twice}; "
          f"retries: {stats['retries']}")
    assert not proxy.faults, "every scripted fault was hit"
    assert stats["retries"] >= 10 and stats["errors"] == 0
    # Resumes start where the data stopped; only bytes still in flight when the client gave
    # up on a stalled connection (a loaded host) may come twice.
    assert twice <= 128 * 1024


@pytest.mark.slow
async def test_big_blob_in_parallel_parts_survives_cuts(proxy, big_image) -> None:
    proxy.faults.extend([
        Inject(lambda r: blob_request(r) and "Range" in r.headers and not
               r.headers["Range"].startswith("bytes=0-"), "cut", at=0.5),
        Inject(blob_request, "cut", at=0.25),
        Inject(blob_request, "500"),
        Inject(blob_request, "stall", at=0.7),
    ])
    layer = big_image.only.layers[0]
    ref = Reference.parse(big_image.ref(proxy.host))
    sink = MemorySink()
    async with client(range_threshold=32 * 1024 * 1024, range_parts=8, read_timeout=0.5) as c:
        await c.fetch_blob(ref, layer.descriptor(), sink)
        stats = c.stats()[proxy.host]
    await asyncio.to_thread(sink.verify, layer.digest, layer.size)
    path = f"/v2/{big_image.repository}/blobs/{layer.digest}"
    twice = proxy.sent[path] - layer.size
    print(f"big blob: faults {dict(proxy.injected)}, bytes sent twice: {twice} "
          f"(the 1-byte range probe included), retries {stats['retries']}")
    assert stats["range_supported"] is True
    assert not proxy.faults
    assert twice <= 128 * 1024 and sink.written == layer.size
