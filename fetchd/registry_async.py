"""Manifests and blobs from registries: verification, resume, parallel ranges, mirrors.

One ``RegistryClient`` per daemon. Its ``Transport`` (registry_http) owns, per registry
host, ONE connection budget shared by every pull in the process, the pacing, the bearer
tokens and the counters; this module adds what manifests and blobs need on top.

Invariants:
- ``get_manifest`` / ``get_blob_bytes`` return only bytes whose digest was checked
  (manifests by tag: the digest is computed from the body, never taken from a header).
- ``fetch_blob`` writes the bytes ``[sink.offset, size)`` of the blob into the sink, except
  the ``sink.held_ranges()`` when it can skip them, or raises; it never writes past ``size``. Verifying a streamed blob is the
  sink owner's job (the store hashes on commit); it returns the endpoints that wrote,
  so a caller whose commit fails can ``blame`` them and fetch again with ``exclude``.
- Registry credentials never leave the registry's origin (redirects, foreign URLs)
  and upstream credentials are never sent to a mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from .auth import Credentials
from .config import Config
from .digest import Digest, Verifier
from .errors import (
    DigestMismatch,
    FetchdError,
    ManifestInvalid,
    RegistryError,
    RegistryStalled,
    SizeMismatch,
)
from .manifest import (
    ACCEPT,
    DOCKER_SCHEMA1,
    INLINE_JSON,
    MAX_MANIFEST_SIZE,
    Descriptor,
    ImageIndex,
    ImageManifest,
    parse_manifest,
)
from .ranges import content_range_matches, range_header, split
from .reference import Reference
from .registry_errors import read_capped
from .registry_http import TRANSIENT, Endpoint, Host, ProgressWatch, Transport, foreign_endpoint

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
"""Called with the number of bytes newly held; negative when a restart dropped bytes."""

MAX_SMALL_BLOB = 64 * 1024 * 1024
FLUSH_SIZE = 1024 * 1024
# Range pieces of a big blob are about this big: small enough that the blob arrives roughly in
# order, big enough that a request's first-byte latency (tens of ms on a WAN) stays a small
# share of its transfer time.
ORDERED_SPAN = 8 * 1024 * 1024


class BlobSink(Protocol):
    """Where ``fetch_blob`` writes (the store's ingest file; a buffer in tests)."""

    @property
    def offset(self) -> int:
        """Contiguous bytes already held from the start: the resume point."""
        ...

    def held_ranges(self) -> list[tuple[int, int]]:
        """Ranges beyond ``offset`` already held (parts of an earlier parallel fetch)."""
        ...

    async def write_at(self, offset: int, data: bytes) -> None: ...

    async def truncate(self, size: int) -> None: ...


@dataclass(frozen=True)
class FetchedManifest:
    digest: Digest                        # sha256 of ``body`` (checked against the reference's digest)
    media_type: str
    body: bytes
    size: int = 0
    header_digest: Digest | None = None   # Docker-Content-Digest as sent by the registry, if any

    def parse(self, where: str = "manifest") -> ImageManifest | ImageIndex:
        return parse_manifest(self.body, self.media_type, where)


class _Cut(Exception):
    """A body stopped early; ``pos`` is how far the sink got."""

    def __init__(self, pos: int, reason: str) -> None:
        super().__init__(reason)
        self.pos = pos
        self.reason = reason


class _RangeIgnored(Exception):
    """A part request got the whole blob (200): parallel ranges are off for this host."""


class _Counter:
    """Bytes held by the sink, as reported to the progress callback (in deltas)."""

    def __init__(self, progress: Progress | None, start: int) -> None:
        self.progress, self.done = progress, start
        self.writes = 0

    def add(self, n: int) -> None:
        self.done += n
        self.writes += 1
        if self.progress is not None:
            self.progress(n)

    def set(self, n: int) -> None:
        delta, self.done = n - self.done, n
        if self.progress is not None and delta:
            self.progress(delta)


class _PriorityGate:
    """Up to ``capacity`` turns at once; waiters are served lowest ``priority`` first (in
    arrival order among equals). Range pieces of every blob fetched from one host take turns
    here, so the blob a caller needs first (``fetch_blob(priority=...)``) gets the host's
    connections first instead of sharing them round-robin with every other blob."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.held = 0
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @contextlib.asynccontextmanager
    async def turn(self, priority: int) -> AsyncIterator[None]:
        if self.held < self.capacity and not self._heap:
            self.held += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._heap, (priority, next(self._arrivals), fut))
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release()  # granted just as it was cancelled: pass the turn on
                raise  # a cancelled waiter stays in the heap, done: _release skips it
        try:
            yield
        finally:
            self._release()

    def wanted(self, priority: int) -> bool:
        """Whether a waiter with a lower priority value waits: the holder should yield."""
        while self._heap and self._heap[0][2].done():
            heapq.heappop(self._heap)  # cancelled waiters
        return bool(self._heap) and self._heap[0][0] < priority

    def _release(self) -> None:
        self.held -= 1
        while self._heap:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                self.held += 1
                fut.set_result(None)
                return


class RegistryClient:
    """Talks to registries for the whole daemon (see the module docstring)."""

    def __init__(
        self,
        config: Config | None = None,
        session: aiohttp.ClientSession | None = None,
        *,
        credentials: Credentials | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        trust_env: bool = False,
    ) -> None:
        self.config = config or Config()
        self.net = self.config.network
        self._t = Transport(self.config, session, credentials=credentials, clock=clock,
                            sleep=sleep, trust_env=trust_env)
        self.policy = self._t.policy
        self._gates: dict[str, _PriorityGate] = {}
        self._blobs_started = itertools.count()

    async def close(self) -> None:
        await self._t.close()

    def _watch(self) -> ProgressWatch:
        """The progress deadline of one response body (``network.stall_timeout``)."""
        return ProgressWatch(self.net.stall_timeout, self.net.stall_bytes)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per host (registries and mirrors): counters, budget, quota; see ``Transport.stats``."""
        return self._t.stats()

    def blame(self, ref: Reference, descriptor: Descriptor, sources: tuple[str, ...]) -> frozenset[str]:
        """The blob ``fetch_blob`` wrote from ``sources`` failed verification at commit.

        Counts it as ``corrupt`` against each mirror among ``sources``, logs it, and returns
        those mirrors' keys: pass them as ``exclude`` to fetch the blob from elsewhere.
        The registry itself is never excluded: see ``upstream_corrupt``.
        """
        mirrors = {ep.key for ep in self._t.endpoints(ref, tag=False) if ep.mirror is not None}
        mirrors |= {key for key in sources if self._t.host(key).mirror}
        bad = frozenset(key for key in sources if key in mirrors)
        for key in sorted(bad):
            self._t.host(key).bump("corrupt")
            log.warning("mirror %s served wrong bytes for blob %s of %s; skipping it for this "
                        "blob and fetching it from the next source", key, descriptor.digest, ref.name)
        return bad

    def upstream_corrupt(self, ref: Reference, descriptor: Descriptor, error: FetchdError,
                         again: bool) -> None:
        """The registry itself wrote a blob that failed verification: count it as ``corrupt``
        and log a warning naming registry, repository and digest (``again``: the caller
        fetches it once more, whole)."""
        ep = self._t.endpoints(ref, tag=False)[-1]
        self._t.wrong_bytes(ep, ref, f"blob {descriptor.digest}", error, again)

    # ------------------------------------------------------------------ manifests

    async def get_manifest(self, ref: Reference) -> FetchedManifest:
        """The manifest or index ``ref`` names; by digest it is verified, by tag hashed."""
        return await self._t.each_endpoint(
            ref, ref.digest is None, lambda ep: self._get_manifest(ep, ref),
            corrupt_retries=self.net.corrupt_retries, subject=f"manifest {ref.digest or ref.target}")

    async def _get_manifest(self, ep: Endpoint, ref: Reference) -> FetchedManifest:
        where = f"{ref.name}@{ref.digest}" if ref.digest else f"{ref.name}:{ref.tag_or_default}"
        content_type, header, body = await self._read_manifest(ep, ref, where)
        algorithm = ref.digest.algorithm if ref.digest else "sha256"
        check = (body, ref.digest, algorithm, content_type, where, self.config.server.max_layers)
        if len(body) <= INLINE_JSON:
            actual, parsed = _check_manifest(*check)
        else:  # a big one (tens of ms) is hashed and parsed off the event loop
            actual, parsed = await asyncio.to_thread(_check_manifest, *check)
        if parsed is None:
            raise DigestMismatch(f"{where}: {ep.label} sent a manifest hashing to {actual}; "
                                 "nothing was kept. Retry; if it persists the registry is corrupt")
        header_digest = Digest.from_header(header)
        if ref.digest is None and header_digest is not None and header_digest.algorithm == "sha256" \
                and header_digest != actual:
            log.warning("%s: %s says Docker-Content-Digest %s but the body hashes to %s; using %s",
                        where, ep.label, header_digest, actual, actual)
        if isinstance(parsed, FetchdError):
            raise parsed
        return FetchedManifest(actual, parsed.media_type, body, len(body), header_digest)

    async def _read_manifest(self, ep: Endpoint, ref: Reference, where: str) -> tuple[str, str | None, bytes]:
        """(content type, Docker-Content-Digest, body); a body cut mid-way is fetched again."""
        failures = 0
        watch = self._watch()
        while True:
            try:
                async with self._t.open(ep, ref, "GET", ep.path(ref, "manifests", ref.target),
                                        what="manifest", headers={"Accept": ACCEPT}) as resp:
                    content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
                    header = resp.headers.get("Docker-Content-Digest")
                    if resp.content_length is not None and resp.content_length > MAX_MANIFEST_SIZE:
                        raise ManifestInvalid(
                            f"{where}: manifest of {resp.content_length} bytes exceeds the "
                            f"{MAX_MANIFEST_SIZE} byte limit ({ep.label})")
                    watch = self._watch()
                    async with watch:
                        body = await read_capped(resp.content, MAX_MANIFEST_SIZE + 1, watch.fed)
            except TRANSIENT as e:
                failures += 1
                if failures > (0 if ep.mirror is not None else self.policy.retries):
                    stalled = isinstance(e, asyncio.TimeoutError)
                    reason = watch.describe() if watch.expired() else type(e).__name__
                    raise (RegistryStalled if stalled else RegistryError)(
                        f"{ep.label}: manifest of {where} kept breaking off ({reason}); check "
                        "the network and retry") from e
                self._t.host(ep.key).bump("retries")
                await self._t.sleep(self.policy.delay(failures - 1))
                continue
            if len(body) > MAX_MANIFEST_SIZE:
                raise ManifestInvalid(f"{where}: manifest exceeds the {MAX_MANIFEST_SIZE} byte "
                                      f"limit ({ep.label})")
            self._t.host(ep.key).bump("bytes", len(body))
            return content_type, header, body

    async def head_manifest(self, ref: Reference, *, retries: int | None = None) -> FetchedManifest:
        """Resolve a tag to its digest with HEAD (free on Docker Hub); falls back to GET.

        ``retries`` lowers the configured retry count (a caller with a fallback answer,
        such as a cached digest, should not wait through the whole backoff).
        """
        result = await self._t.each_endpoint(ref, ref.digest is None,
                                             lambda ep: self._head(ep, ref, retries))
        return result if result is not None else await self.get_manifest(ref)

    async def _head(self, ep: Endpoint, ref: Reference, retries: int | None) -> FetchedManifest | None:
        async with self._t.open(ep, ref, "HEAD", ep.path(ref, "manifests", ref.target),
                                what="manifest", headers={"Accept": ACCEPT},
                                retries=retries) as resp:
            digest = Digest.from_header(resp.headers.get("Docker-Content-Digest")) or ref.digest
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            size = resp.content_length or 0
        if digest is None:
            return None
        if content_type in DOCKER_SCHEMA1:
            parse_manifest(b'{"schemaVersion": 1}', content_type, str(ref))
        return FetchedManifest(digest, content_type, b"", size, digest)

    # ------------------------------------------------------------------ blobs

    async def get_blob_bytes(self, ref: Reference, descriptor: Descriptor) -> bytes:
        """A small blob (an image config) in memory, verified against the descriptor."""
        if descriptor.size > MAX_SMALL_BLOB:
            raise SizeMismatch(f"{ref.name}: blob {descriptor.digest} of {descriptor.size} bytes is "
                               "too big to hold in memory; fetch it into the store instead")

        async def one(ep: Endpoint) -> bytes:
            sink = _MemorySink()
            await self._fetch_span(ep, ref, descriptor, sink, 0, descriptor.size,
                                   _Counter(None, 0), restart_ok=True)
            verifier = Verifier(descriptor.digest, descriptor.size, f"{ref.name} blob")
            if len(sink.buf) > FLUSH_SIZE:  # a big one is hashed off the event loop
                await asyncio.to_thread(verifier.feed, memoryview(sink.buf))
            else:
                verifier.feed(memoryview(sink.buf))
            verifier.check()
            return bytes(sink.buf)

        return await self._t.each_endpoint(ref, False, one, corrupt_retries=self.net.corrupt_retries,
                                           subject=f"config {descriptor.digest}")

    async def fetch_blob(
        self, ref: Reference, descriptor: Descriptor, sink: BlobSink, progress: Progress | None = None,
        *, exclude: frozenset[str] = frozenset(), priority: int | None = None, whole: bool = False,
    ) -> tuple[str, ...]:
        """Write the blob's bytes ``[sink.offset, size)`` into ``sink`` (resuming what it holds).

        ``priority``: among blobs fetched as ranges from one host at once, lower goes first
        (default: the order of the calls); the daemon passes the order in which pack will
        read the layers.

        Big blobs (>= range_threshold) go as parallel Range requests where the host
        supports them, unless ``whole``: one stream (a fetch again after wrong bytes, into
        an empty sink, asks from byte 0 without Range; only a cut resumes with one). Foreign layers come from their ``urls`` without credentials,
        then from the mirrors not in ``exclude`` (keys, ``host[:port]``), then from the
        registry. A mirror that fails mid-way leaves what it wrote; the next source
        resumes from there. Returns the keys of the endpoints that wrote into the sink,
        in order (empty when the sink already held everything).
        """
        sources: list[str] = []
        size = descriptor.size
        order = next(self._blobs_started) if priority is None else priority
        if size > self.net.max_blob_size:
            raise SizeMismatch(
                f"{ref.name}: blob {descriptor.digest} claims {size} bytes, more than "
                f"[network] max_blob_size ({self.net.max_blob_size}); raise it if this is expected")
        if sink.offset > size:
            await sink.truncate(0)
        counter = _Counter(progress, size - sum(b - a for a, b in _gaps(sink, size)))
        if sink.offset == size:
            return ()

        async def one(ep: Endpoint, path: str) -> None:
            writes = counter.writes
            try:
                await self._fetch_from(ep, ref, descriptor, sink, counter, path, order, whole)
            finally:
                if counter.writes != writes and (not sources or sources[-1] != ep.key):
                    sources.append(ep.key)

        for url in descriptor.urls:
            foreign = foreign_endpoint(url, ref.registry)
            if foreign is None:
                continue
            try:
                await one(foreign, "")
                return tuple(sources)
            except FetchdError as e:
                log.info("foreign URL of %s failed (%s); trying the next source", descriptor.digest, e.code)
        await self._t.each_endpoint(
            ref, False, lambda ep: one(ep, ep.path(ref, "blobs", str(descriptor.digest))), exclude)
        return tuple(sources)

    async def _fetch_from(
        self, ep: Endpoint, ref: Reference, desc: Descriptor, sink: BlobSink, counter: _Counter,
        path: str, order: int = 0, whole: bool = False,
    ) -> None:
        host = self._t.host(ep.key)
        gaps = _gaps(sink, desc.size)
        remaining = sum(b - a for a, b in gaps)
        ranges_ok = ep.mirror is None or ep.mirror.ranges  # see MirrorConfig.ranges
        # Parts of an earlier parallel fetch are held beyond the prefix: ranges skip them.
        skips = gaps != [(sink.offset, desc.size)]
        if ((remaining >= self.net.range_threshold or skips)
                and self.net.range_parts > 1 and ranges_ok and not whole):
            if host.range_supported is None and (skips or not self._near(host)):
                await self._probe_ranges(ep, ref, desc, path)
            if host.range_supported and (skips or not self._near(host)):
                try:
                    await self._fetch_parallel(ep, ref, desc, sink, counter, path, gaps, order)
                    return
                except _RangeIgnored:
                    host.range_supported = False
                    log.info("%s stopped honouring Range; fetching %s as one stream",
                             ep.label, desc.digest)
        await self._fetch_span(ep, ref, desc, sink, sink.offset, desc.size, counter,
                               restart_ok=True, path=path)

    def _near(self, host: Host) -> bool:
        """Whether ``host`` answers within ``near_latency`` and serves its blobs itself: then
        one stream is as fast as parallel ranges (the flow is not window-limited) and costs
        the host less. Blobs redirected to object storage or a CDN come over a path this
        cannot see: they keep parallel ranges."""
        near = self.net.near_latency
        return (near > 0 and not host.blob_redirects and host.latency is not None
                and host.latency <= near)

    async def _probe_ranges(self, ep: Endpoint, ref: Reference, desc: Descriptor, path: str) -> None:
        async with self._t.open(ep, ref, "GET", path, what="blob", headers={"Range": range_header(0, 1)},
                              ok=(200, 206)) as resp:
            supported = resp.status == 206 and content_range_matches(
                resp.headers.get("Content-Range"), 0, 1, desc.size)
        self._t.host(ep.key).range_supported = supported

    async def _fetch_parallel(
        self, ep: Endpoint, ref: Reference, desc: Descriptor, sink: BlobSink, counter: _Counter,
        path: str, gaps: list[tuple[int, int]], order: int = 0,
    ) -> None:
        """The ``gaps`` as Range requests on up to ``range_parts`` connections at once.

        A big blob is cut into more spans than connections (pieces of ~``ORDERED_SPAN``),
        taken in blob order by whichever connection is free: the bytes arrive roughly front
        to back, so the ingest's verified prefix -- what a reader following the download
        (pack) may use -- grows all along instead of jumping at the end.
        """
        parts, total = self.net.range_parts, sum(b - a for a, b in gaps)
        min_part = max(1024 * 1024, self.net.range_threshold // (2 * parts))
        pieces = max(parts, min(parts * 4, total // ORDERED_SPAN))
        spans = [span for a, b in gaps
                 for span in split(a, b, max(1, round(pieces * (b - a) / total)), min_part)]
        todo = list(reversed(spans))
        host = self._t.host(ep.key)
        gate = self._gates.get(ep.key)
        if gate is None:
            gate = self._gates[ep.key] = _PriorityGate(host.limit)

        async def connection() -> None:
            while todo:
                async with gate.turn(order):
                    # keep the turn from piece to piece unless a blob needed sooner waits
                    while todo:
                        a, b = todo.pop()
                        await self._fetch_span(ep, ref, desc, sink, a, b, counter,
                                               restart_ok=False, path=path)
                        if gate.wanted(order):
                            break

        tasks = [asyncio.create_task(connection()) for _ in range(min(parts, len(spans)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _fetch_span(
        self, ep: Endpoint, ref: Reference, desc: Descriptor, sink: BlobSink, start: int, end: int,
        counter: _Counter, *, restart_ok: bool, path: str | None = None,
    ) -> None:
        """Write ``[start, end)`` of the blob into ``sink``, resuming after cuts.

        ``restart_ok``: when the server ignores Range (200), truncate the sink and take
        the whole body; otherwise raise ``_RangeIgnored``.
        """
        if path is None:
            path = ep.path(ref, "blobs", str(desc.digest))
        size, pos, failures = desc.size, start, 0
        host = self._t.host(ep.key)
        while pos < end:
            ranged = pos > 0 or end < size
            headers = {"Range": range_header(pos, None if end == size else end)} if ranged else {}
            begin = pos
            try:
                async with self._t.open(ep, ref, "GET", path, what="blob", headers=headers,
                                      ok=(200, 206)) as resp:
                    if resp.status == 200 and ranged:
                        if not restart_ok:
                            raise _RangeIgnored()
                        log.info("%s ignored Range for %s; restarting it from 0", ep.label, desc.digest)
                        await sink.truncate(0)
                        pos = begin = 0
                        counter.set(0)
                    elif resp.status == 206 and not content_range_matches(
                            resp.headers.get("Content-Range"), pos, end, size):
                        raise RegistryError(
                            f"{ep.label}: blob {desc.digest}: asked for bytes {pos}-{end - 1}, got "
                            f"Content-Range {resp.headers.get('Content-Range')!r}; retry later")
                    pos = await self._copy(resp, sink, pos, end, counter, host, desc)
                    reason = "body ended early"
            except _Cut as cut:
                pos, reason = cut.pos, cut.reason
            if pos >= end:
                return
            # Progress resets the count, unless the try ended on its progress deadline: a
            # trickle would otherwise be retried for ever, a few bytes each time.
            stalled = reason.startswith("stalled")
            failures = 1 if pos > begin and not stalled else failures + 1
            # A mirror is not retried: the next source resumes from ``pos``.
            if failures > (0 if ep.mirror is not None else self.policy.retries):
                host.bump("errors")
                raise (RegistryStalled if stalled else RegistryError)(
                    f"{ep.label}: blob {desc.digest} of {ref.name}: transfer stopped at byte {pos} "
                    f"of {size} {failures} times ({reason}); check the network and retry")
            host.bump("retries")
            await self._t.sleep(self.policy.delay(failures - 1))

    async def _copy(
        self, resp: aiohttp.ClientResponse, sink: BlobSink, pos: int, end: int, counter: _Counter,
        host: Host, desc: Descriptor,
    ) -> int:
        """Stream the body into the sink from ``pos``; returns the new position."""
        pending: list[bytes] = []
        held = 0
        writing = False

        async def flush() -> None:
            nonlocal pos, held, writing
            if held:
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                writing = True
                await sink.write_at(pos, data)
                writing = False
                pos += held
                counter.add(held)
                held = 0

        watch = self._watch()
        try:
            async with watch:
                while True:
                    chunk = await resp.content.readany()
                    if not chunk:
                        break
                    if pos + held + len(chunk) > end:
                        raise SizeMismatch(
                            f"blob {desc.digest}: the server sent more than the expected "
                            f"{desc.size} bytes; nothing past that was kept")
                    host.bump("bytes", len(chunk))
                    watch.fed(len(chunk))
                    pending.append(chunk)
                    held += len(chunk)
                    if held >= FLUSH_SIZE:
                        await flush()
        except (*TRANSIENT, asyncio.CancelledError) as e:
            if writing:
                # Cancelled inside a write: it counts if the sink's prefix took it (the store's
                # ingest finishes a write it started); else the sink's own state is what counts.
                if sink.offset != pos + held:
                    raise
                writing = False
                pos += held
                counter.add(held)
                held = 0
            # What arrived intact is kept, including what aiohttp still buffered when the
            # connection dropped, so the resume asks only for bytes never received. Also when
            # the fetch is cancelled (the daemon stops, parking its jobs): the partial that
            # the next daemon resumes then holds every byte that reached this process.
            for chunk in _salvage(resp.content):
                if pos + held + len(chunk) > end:
                    break
                pending.append(chunk)
                held += len(chunk)
                host.bump("bytes", len(chunk))
            await flush()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise _Cut(pos, watch.describe() if watch.expired() else type(e).__name__) from e
        await flush()
        return pos


class _MemorySink:
    def __init__(self) -> None:
        self.buf = bytearray()

    @property
    def offset(self) -> int:
        return len(self.buf)

    async def write_at(self, offset: int, data: bytes) -> None:
        if offset > len(self.buf):
            self.buf.extend(b"\0" * (offset - len(self.buf)))
        self.buf[offset:offset + len(data)] = data

    async def truncate(self, size: int) -> None:
        del self.buf[size:]

    def held_ranges(self) -> list[tuple[int, int]]:
        return []




def _salvage(content: Any) -> list[bytes]:
    """Bytes aiohttp received but had not handed out when the connection failed.

    aiohttp's StreamReader raises the connection error before returning buffered data;
    those bytes are valid (TCP delivered them in order), so take them from its buffer.
    Uses a private attribute on purpose, guarded: if it changes, nothing is salvaged and
    the resume simply asks for those bytes again.
    """
    buffer = getattr(content, "_buffer", None)
    if not buffer or not all(isinstance(c, bytes | bytearray | memoryview) for c in buffer):
        return []
    chunks = [bytes(c) for c in buffer]
    skip = getattr(content, "_buffer_offset", 0)
    if isinstance(skip, int) and skip:
        chunks[0] = chunks[0][skip:]
    buffer.clear()
    return chunks


def _gaps(sink: BlobSink, size: int) -> list[tuple[int, int]]:
    """The ranges of ``[sink.offset, size)`` the sink does not hold yet, in order."""
    out: list[tuple[int, int]] = []
    pos = sink.offset
    for a, b in sorted(sink.held_ranges()):
        if a > pos:
            out.append((pos, min(a, size)))
        pos = max(pos, b)
        if pos >= size:
            break
    if pos < size:
        out.append((pos, size))
    return [(a, b) for a, b in out if a < b]


def _check_manifest(body: bytes, expected: Digest | None, algorithm: str, content_type: str,
                    where: str, max_layers: int
                    ) -> tuple[Digest, ImageManifest | ImageIndex | FetchdError | None]:
    """The body's digest and what it parses to, or the error that refuses it (returned: the
    caller reports a wrong digest first), or None when it does not hash to ``expected``
    (then it is not parsed at all). Schema1 is refused by its content type; the layer list
    is checked against ``max_layers`` before any per-layer work."""
    actual = Digest(algorithm, hashlib.new(algorithm, body).hexdigest())
    if expected is not None and actual != expected:
        return actual, None
    try:
        if content_type in DOCKER_SCHEMA1:
            parse_manifest(b'{"schemaVersion": 1}', content_type, where)  # raises UnsupportedManifest
        return actual, parse_manifest(body, content_type, where, max_layers)
    except FetchdError as e:
        return actual, e
