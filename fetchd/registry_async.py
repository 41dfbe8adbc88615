"""Manifests and blobs over HTTP(S): auth, retries, resume, parallel ranges, per-host budgets.

One ``RegistryClient`` per daemon. It owns, per registry host, ONE connection budget
(an ``asyncio.Semaphore``) shared by every pull in the process, the pacing for
``requests_per_second``, the bearer tokens, whether the host honours Range, and the
counters ``stats()`` reports.

Invariants:
- ``get_manifest`` / ``get_blob_bytes`` return only bytes whose digest was checked
  (manifests by tag: the digest is computed from the body, never taken from a header).
- ``fetch_blob`` writes exactly the bytes ``[sink.offset, size)`` of the blob into the
  sink, or raises; it never writes past ``size``. Verifying a streamed blob is the
  sink owner's job (the store hashes on commit).
- Registry credentials never leave the registry's origin (redirects, foreign URLs)
  and upstream credentials are never sent to a mirror.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from .auth import (
    Challenge,
    Credentials,
    TokenCache,
    basic_authorization,
    fetch_token,
    is_loopback,
    parse_challenges,
    pull_scope,
)
from .config import BasicCredentials, Config, MirrorConfig
from .digest import Digest, Verifier
from .errors import (
    DigestMismatch,
    FetchdError,
    InsecureRegistry,
    InvalidReference,
    ManifestInvalid,
    RegistryError,
    SizeMismatch,
    Unauthorized,
)
from .manifest import (
    ACCEPT,
    DOCKER_SCHEMA1,
    MAX_MANIFEST_SIZE,
    Descriptor,
    ImageIndex,
    ImageManifest,
    parse_manifest,
)
from .ranges import content_range_matches, range_header, split
from .reference import Reference
from .registry_errors import error_from_response, read_capped
from .retry import RetryPolicy, parse_ratelimit, parse_retry_after, retryable_status

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[int], None]
"""Called with the number of bytes newly held; negative when a restart dropped bytes."""

MAX_SMALL_BLOB = 64 * 1024 * 1024
MAX_REDIRECTS = 10
FLUSH_SIZE = 1024 * 1024
# aiohttp's default 64 KiB read buffer caps a stream near 400 MB/s; 2 MiB reaches ~1 GB/s
# on loopback. Memory is only used when the sink is slower than the network.
READ_BUFSIZE = 2 * 1024 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
# Errors of a request or of reading its body that another try may fix.
_TRANSIENT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError,
              ConnectionError)


class BlobSink(Protocol):
    """Where ``fetch_blob`` writes (the store's ingest file; a buffer in tests)."""

    @property
    def offset(self) -> int:
        """Contiguous bytes already held from the start: the resume point."""
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


@dataclass(frozen=True)
class _Endpoint:
    """One place to send requests: the registry itself, a mirror, or a foreign URL."""

    key: str                     # host[:port]: budget, stats, tokens
    base: str                    # scheme://host[:port][/prefix], or the whole URL (foreign)
    registry: str                # the upstream registry, for messages and ?ns=
    allow_http: bool
    mirror: MirrorConfig | None = None
    anonymous: bool = False      # never any credentials (foreign layer URLs)
    verify_tls: bool = True
    auth_file: str | None = None

    def path(self, ref: Reference, kind: str, target: str) -> str:
        path = f"/v2/{ref.repository}/{kind}/{target}"
        if self.mirror is not None and self.mirror.ns:
            path += f"?ns={self.registry}"
        return path

    @property
    def label(self) -> str:
        return f"mirror {self.key}" if self.mirror else f"registry {self.key}"


@dataclass
class _Host:
    semaphore: asyncio.Semaphore
    interval: float = 0.0
    next_slot: float = 0.0
    range_supported: bool | None = None
    challenge: Challenge | None = None
    plain_http: bool = False     # an insecure host whose TLS attempt failed
    stats: dict[str, int | None] = field(default_factory=lambda: {
        "requests": 0, "bytes": 0, "retries": 0, "errors": 0, "ratelimit_remaining": None})

    async def pace(self) -> None:
        """Space request starts by ``interval`` (requests_per_second)."""
        if not self.interval:
            return
        now = time.monotonic()
        wait = self.next_slot - now
        self.next_slot = max(now, self.next_slot) + self.interval
        if wait > 0:
            await asyncio.sleep(wait)

    def bump(self, name: str, n: int = 1) -> None:
        self.stats[name] = (self.stats[name] or 0) + n


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

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(n)

    def set(self, n: int) -> None:
        delta, self.done = n - self.done, n
        if self.progress is not None and delta:
            self.progress(delta)


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
        net = self.config.network
        self.net = net
        self.policy = RetryPolicy(net.retries, net.backoff_base, net.backoff_cap, net.retry_after_cap)
        self.credentials = credentials or Credentials()
        self.tokens = TokenCache(clock)
        self._session = session
        self._own_session = session is None
        self._trust_env = trust_env
        self._sleep = sleep
        self._hosts: dict[str, _Host] = {}

    # ------------------------------------------------------------------ lifecycle

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # The per-host semaphores are the budget; the connector must not add its own.
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.net.connect_timeout,
                                              sock_read=self.net.read_timeout),
                auto_decompress=False,  # blobs are hashed as sent
                trust_env=self._trust_env,
            )
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per host: requests, bytes, retries, errors, ratelimit_remaining, range_supported."""
        return {key: {**h.stats, "range_supported": h.range_supported} for key, h in self._hosts.items()}

    def _host(self, key: str) -> _Host:
        host = self._hosts.get(key)
        if host is None:
            reg = self.config.registry(key)
            rps = reg.requests_per_second
            host = _Host(asyncio.Semaphore(reg.max_connections or self.net.max_connections),
                         interval=1.0 / rps if rps else 0.0)
            self._hosts[key] = host
        return host

    # ------------------------------------------------------------------ endpoints

    def _endpoints(self, ref: Reference, *, tag: bool) -> list[_Endpoint]:
        """Mirrors in configured order (digest_only ones skipped for tags), then upstream."""
        reg = self.config.registry(ref.registry)
        out: list[_Endpoint] = []
        for mirror in reg.mirrors:
            if tag and mirror.digest_only:
                continue
            parts = urlsplit(mirror.url)
            allow = mirror.insecure or is_loopback(parts.netloc)
            if parts.scheme == "http" and not allow:
                log.warning("skipping plain-HTTP mirror %s of %s: set insecure = true on it to use it",
                            parts.netloc, ref.registry)
                continue
            out.append(_Endpoint(parts.netloc, mirror.url, ref.registry, allow, mirror=mirror))
        loopback = is_loopback(ref.api_host)
        # Loopback registries speak plain HTTP (as Docker assumes); hosts marked insecure
        # get HTTPS without certificate checks (self-signed) and plain HTTP if TLS fails.
        scheme = "http" if loopback or self._host(ref.registry).plain_http else "https"
        out.append(_Endpoint(ref.registry, f"{scheme}://{ref.api_host}", ref.registry,
                             loopback or reg.insecure, verify_tls=not reg.insecure,
                             auth_file=reg.auth_file))
        return out

    async def _each_endpoint(
        self, ref: Reference, tag: bool, op: Callable[[_Endpoint], Awaitable[T]]
    ) -> T:
        """Run ``op`` on each endpoint in turn; mirrors' failures fall through to the next."""
        endpoints = self._endpoints(ref, tag=tag)
        for ep in endpoints[:-1]:
            try:
                return await op(ep)
            except FetchdError as e:
                log.info("%s failed for %s (%s); trying the next source", ep.label, ref, e.code)
        return await op(endpoints[-1])

    # ------------------------------------------------------------------ requests

    async def _credentials(self, ep: _Endpoint, ref: Reference) -> BasicCredentials | None:
        if ep.anonymous:
            return None
        if ep.mirror is not None:
            if ep.mirror.credentials is not None:
                return ep.mirror.credentials
            return await self.credentials.lookup(ep.key)
        return await self.credentials.lookup(ref.registry, ref.repository, ep.auth_file)

    async def _authorization(self, ep: _Endpoint, ref: Reference, scope: str) -> str | None:
        host = self._host(ep.key)
        challenge = None if ep.anonymous else host.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = await self._credentials(ep, ref)
            return basic_authorization(creds) if creds else None
        token = self.tokens.get(ep.key, scope)
        if token is None:
            async with self.tokens.lock(ep.key, scope):
                token = self.tokens.get(ep.key, scope)
                if token is None:
                    creds = await self._credentials(ep, ref)
                    value, expires_in = await fetch_token(
                        self._http(), challenge, scope, creds, registry=ep.key,
                        allow_http=ep.allow_http,
                        timeout=self.net.connect_timeout + self.net.read_timeout)
                    token = self.tokens.put(ep.key, scope, value, expires_in)
        return f"Bearer {token.value}"

    async def _send(
        self, ep: _Endpoint, method: str, url: str, headers: dict[str, str], auth: str | None
    ) -> tuple[aiohttp.ClientResponse, bool]:
        """One request, following redirects by hand; returns (response, left the origin)."""
        hdrs = dict(ep.mirror.headers) if ep.mirror else {}
        hdrs.update(headers)
        if auth:
            hdrs["Authorization"] = auth
        target = URL(url, encoded=True)
        origin = target.origin()
        foreign = ep.anonymous
        host = self._host(ep.key)
        for _ in range(MAX_REDIRECTS + 1):
            host.bump("requests")
            resp = await self._http().request(
                method, target, headers=hdrs, allow_redirects=False,
                ssl=True if ep.verify_tls else False, read_bufsize=READ_BUFSIZE)
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp, foreign
            resp.close()
            target = resp.url.join(URL(location, encoded=True))
            if target.scheme == "http" and not (ep.allow_http or is_loopback(target.raw_authority)):
                raise InsecureRegistry(
                    f"{ep.label} redirected to plain-HTTP {target.host}; refusing. If intended, "
                    f'set [registries."{ep.registry}"] insecure = true in the fetchd config')
            if target.origin() != origin:
                # Object storage (S3, GCS) must never see the registry's credentials or headers.
                hdrs = {k: v for k, v in hdrs.items() if k.lower() in ("range", "accept")}
                foreign = True
            if resp.status == 303:
                method = "GET"
        raise RegistryError(f"{ep.label}: more than {MAX_REDIRECTS} redirects for {url}")

    @asynccontextmanager
    async def _open(
        self,
        ep: _Endpoint,
        ref: Reference,
        method: str,
        path: str,
        *,
        what: str,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a status in ``ok``, after auth, redirects and retries.

        The host's connection slot is held until the caller's block ends, so a body
        being read counts against the budget. Failures the caller meets while reading
        the body are the caller's to handle (they are not retried here).
        """
        host = self._host(ep.key)
        retries = min(1, self.policy.retries) if ep.mirror else self.policy.retries
        scope = pull_scope(ref.repository)
        attempt, refreshed = 0, False
        while True:
            auth = await self._authorization(ep, ref, scope)
            failure, retry_after = "", None
            async with host.semaphore:
                await host.pace()
                try:
                    resp, foreign = await self._send(ep, method, ep.base + path, headers or {}, auth)
                except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as e:
                    if ep.allow_http and ep.mirror is None and not host.plain_http:
                        log.info("%s: TLS failed, using plain HTTP (insecure registry)", ep.label)
                        host.plain_http = True
                        ep = replace(ep, base="http://" + ep.base.split("://", 1)[1])
                        continue
                    host.bump("errors")
                    raise _tls_error(ep, e) from e
                except _TRANSIENT as e:
                    failure = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                else:
                    remaining = parse_ratelimit(resp.headers.get("ratelimit-remaining"))
                    if remaining is not None:
                        host.stats["ratelimit_remaining"] = remaining
                    status = resp.status
                    if status in ok:
                        try:
                            yield resp
                        finally:
                            if resp.content.at_eof():
                                resp.release()
                            else:
                                resp.close()  # a half-read body must not go back to the pool
                        return
                    if status == 401 and not foreign and not refreshed:
                        challenges = parse_challenges(resp.headers.getall("WWW-Authenticate", []))
                        resp.close()
                        if await self._accept_challenge(ep, ref, scope, challenges):
                            refreshed = True
                            continue
                        host.bump("errors")
                        raise await self._unauthorized(ep, ref)
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    quota = status == 429 and retry_after is None and remaining == 0
                    if retryable_status(status) and attempt < retries and not quota:
                        failure = f"HTTP {status}"
                        resp.close()
                    else:
                        host.bump("errors")
                        try:
                            raise await error_from_response(resp, ep.label, ref, what, retry_after)
                        finally:
                            resp.close()
            if attempt >= retries:
                host.bump("errors")
                raise RegistryError(
                    f"{ep.label}: {what} of {ref.name} failed after {attempt + 1} tries ({failure}); "
                    "check the network or the registry's status and try again")
            host.bump("retries")
            delay = self.policy.delay(attempt, retry_after)
            log.info("%s: %s of %s: %s, retry in %.1fs", ep.label, what, ref.name, failure, delay)
            attempt += 1
            await self._sleep(delay)

    async def _accept_challenge(
        self, ep: _Endpoint, ref: Reference, scope: str, challenges: list[Challenge]
    ) -> bool:
        """Learn how the host wants auth; True if another try with new credentials makes sense."""
        if ep.anonymous:
            return False
        host = self._host(ep.key)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            host.challenge = bearer
            self.tokens.drop(ep.key, scope)  # expired, revoked or too narrow: get a new one
            return True
        if any(c.scheme == "basic" for c in challenges):
            host.challenge = Challenge("basic")
            return await self._credentials(ep, ref) is not None
        return False

    async def _unauthorized(self, ep: _Endpoint, ref: Reference) -> Unauthorized:
        creds = await self._credentials(ep, ref)
        how = "the stored credentials were rejected" if creds else "no credentials were found"
        return Unauthorized(
            f"{ep.label} refused {ref.name} (401): {how}. Log in with 'podman login {ep.key}' "
            f"or 'docker login {ep.key}', or set auth_file for it in the fetchd config")

    # ------------------------------------------------------------------ manifests

    async def get_manifest(self, ref: Reference) -> FetchedManifest:
        """The manifest or index ``ref`` names; by digest it is verified, by tag hashed."""
        return await self._each_endpoint(ref, ref.digest is None, lambda ep: self._get_manifest(ep, ref))

    async def _get_manifest(self, ep: _Endpoint, ref: Reference) -> FetchedManifest:
        where = f"{ref.name}@{ref.digest}" if ref.digest else f"{ref.name}:{ref.tag_or_default}"
        async with self._open(ep, ref, "GET", ep.path(ref, "manifests", ref.target),
                              what="manifest", headers={"Accept": ACCEPT}) as resp:
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            header = resp.headers.get("Docker-Content-Digest")
            if resp.content_length is not None and resp.content_length > MAX_MANIFEST_SIZE:
                raise ManifestInvalid(f"{where}: manifest of {resp.content_length} bytes exceeds "
                                      f"the {MAX_MANIFEST_SIZE} byte limit ({ep.label})")
            body = await read_capped(resp.content, MAX_MANIFEST_SIZE + 1)
            if len(body) > MAX_MANIFEST_SIZE:
                raise ManifestInvalid(f"{where}: manifest exceeds the {MAX_MANIFEST_SIZE} byte "
                                      f"limit ({ep.label})")
            self._host(ep.key).bump("bytes", len(body))
        algorithm = ref.digest.algorithm if ref.digest else "sha256"
        actual = Digest(algorithm, hashlib.new(algorithm, body).hexdigest())
        if ref.digest is not None and actual != ref.digest:
            raise DigestMismatch(f"{where}: {ep.label} sent a manifest hashing to {actual}; "
                                 "nothing was kept. Retry; if it persists the registry is corrupt")
        header_digest = _maybe_digest(header)
        if ref.digest is None and header_digest is not None and header_digest.algorithm == "sha256" \
                and header_digest != actual:
            log.warning("%s: %s says Docker-Content-Digest %s but the body hashes to %s; using %s",
                        where, ep.label, header_digest, actual, actual)
        if content_type in DOCKER_SCHEMA1:
            parse_manifest(b'{"schemaVersion": 1}', content_type, where)  # raises UnsupportedManifest
        parsed = parse_manifest(body, content_type, where)
        return FetchedManifest(actual, parsed.media_type, body, len(body), header_digest)

    async def head_manifest(self, ref: Reference) -> FetchedManifest:
        """Resolve a tag to its digest with HEAD (free on Docker Hub); falls back to GET."""
        result = await self._each_endpoint(ref, ref.digest is None, lambda ep: self._head(ep, ref))
        return result if result is not None else await self.get_manifest(ref)

    async def _head(self, ep: _Endpoint, ref: Reference) -> FetchedManifest | None:
        async with self._open(ep, ref, "HEAD", ep.path(ref, "manifests", ref.target),
                              what="manifest", headers={"Accept": ACCEPT}) as resp:
            digest = _maybe_digest(resp.headers.get("Docker-Content-Digest")) or ref.digest
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

        async def one(ep: _Endpoint) -> bytes:
            sink = _MemorySink()
            await self._fetch_span(ep, ref, descriptor, sink, 0, descriptor.size,
                                   _Counter(None, 0), restart_ok=True)
            verifier = Verifier(descriptor.digest, descriptor.size, f"{ref.name} blob")
            verifier.feed(memoryview(sink.buf))
            verifier.check()
            return bytes(sink.buf)

        return await self._each_endpoint(ref, False, one)

    async def fetch_blob(
        self, ref: Reference, descriptor: Descriptor, sink: BlobSink, progress: Progress | None = None
    ) -> None:
        """Write the blob's bytes ``[sink.offset, size)`` into ``sink`` (resuming what it holds).

        Big blobs (>= range_threshold) go as parallel Range requests where the host
        supports them. Foreign layers come from their ``urls`` without credentials,
        then from the registry.
        """
        size = descriptor.size
        if size > self.net.max_blob_size:
            raise SizeMismatch(
                f"{ref.name}: blob {descriptor.digest} claims {size} bytes, more than "
                f"[network] max_blob_size ({self.net.max_blob_size}); raise it if this is expected")
        if sink.offset > size:
            await sink.truncate(0)
        counter = _Counter(progress, sink.offset)
        if sink.offset == size:
            return
        for url in descriptor.urls:
            ep = _foreign_endpoint(url, ref.registry)
            if ep is None:
                continue
            try:
                await self._fetch_from(ep, ref, descriptor, sink, counter, path="")
                return
            except FetchdError as e:
                log.info("foreign URL of %s failed (%s); trying the next source", descriptor.digest, e.code)
        await self._each_endpoint(
            ref, False, lambda ep: self._fetch_from(
                ep, ref, descriptor, sink, counter, ep.path(ref, "blobs", str(descriptor.digest))))

    async def _fetch_from(
        self, ep: _Endpoint, ref: Reference, desc: Descriptor, sink: BlobSink, counter: _Counter,
        path: str,
    ) -> None:
        host = self._host(ep.key)
        remaining = desc.size - sink.offset
        if remaining >= self.net.range_threshold and self.net.range_parts > 1:
            if host.range_supported is None:
                await self._probe_ranges(ep, ref, desc, path)
            if host.range_supported:
                try:
                    await self._fetch_parallel(ep, ref, desc, sink, counter, path)
                    return
                except _RangeIgnored:
                    host.range_supported = False
                    log.info("%s stopped honouring Range; fetching %s as one stream",
                             ep.label, desc.digest)
        await self._fetch_span(ep, ref, desc, sink, sink.offset, desc.size, counter,
                               restart_ok=True, path=path)

    async def _probe_ranges(self, ep: _Endpoint, ref: Reference, desc: Descriptor, path: str) -> None:
        async with self._open(ep, ref, "GET", path, what="blob", headers={"Range": range_header(0, 1)},
                              ok=(200, 206)) as resp:
            supported = resp.status == 206 and content_range_matches(
                resp.headers.get("Content-Range"), 0, 1, desc.size)
        self._host(ep.key).range_supported = supported

    async def _fetch_parallel(
        self, ep: _Endpoint, ref: Reference, desc: Descriptor, sink: BlobSink, counter: _Counter,
        path: str,
    ) -> None:
        spans = split(sink.offset, desc.size, self.net.range_parts,
                      min_part=max(1024 * 1024, self.net.range_threshold // (2 * self.net.range_parts)))
        tasks = [asyncio.create_task(self._fetch_span(ep, ref, desc, sink, a, b, counter,
                                                      restart_ok=False, path=path))
                 for a, b in spans]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _fetch_span(
        self, ep: _Endpoint, ref: Reference, desc: Descriptor, sink: BlobSink, start: int, end: int,
        counter: _Counter, *, restart_ok: bool, path: str | None = None,
    ) -> None:
        """Write ``[start, end)`` of the blob into ``sink``, resuming after cuts.

        ``restart_ok``: when the server ignores Range (200), truncate the sink and take
        the whole body; otherwise raise ``_RangeIgnored``.
        """
        if path is None:
            path = ep.path(ref, "blobs", str(desc.digest))
        size, pos, failures = desc.size, start, 0
        host = self._host(ep.key)
        while pos < end:
            ranged = pos > 0 or end < size
            headers = {"Range": range_header(pos, None if end == size else end)} if ranged else {}
            begin = pos
            try:
                async with self._open(ep, ref, "GET", path, what="blob", headers=headers,
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
            failures = 1 if pos > begin else failures + 1  # progress resets the count
            if failures > self.policy.retries:
                host.bump("errors")
                raise RegistryError(
                    f"{ep.label}: blob {desc.digest} of {ref.name}: transfer stopped at byte {pos} "
                    f"of {size} {failures} times ({reason}); check the network and retry")
            host.bump("retries")
            await self._sleep(self.policy.delay(failures - 1))

    async def _copy(
        self, resp: aiohttp.ClientResponse, sink: BlobSink, pos: int, end: int, counter: _Counter,
        host: _Host, desc: Descriptor,
    ) -> int:
        """Stream the body into the sink from ``pos``; returns the new position."""
        pending: list[bytes] = []
        held = 0

        async def flush() -> None:
            nonlocal pos, held
            if held:
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                await sink.write_at(pos, data)
                pos += held
                counter.add(held)
                held = 0

        try:
            while True:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                if pos + held + len(chunk) > end:
                    raise SizeMismatch(
                        f"blob {desc.digest}: the server sent more than the expected "
                        f"{desc.size} bytes; nothing past that was kept")
                host.bump("bytes", len(chunk))
                pending.append(chunk)
                held += len(chunk)
                if held >= FLUSH_SIZE:
                    await flush()
        except _TRANSIENT as e:
            # What arrived intact is kept, including what aiohttp still buffered when the
            # connection dropped, so the resume asks only for bytes never received.
            for chunk in _salvage(resp.content):
                if pos + held + len(chunk) > end:
                    break
                pending.append(chunk)
                held += len(chunk)
                host.bump("bytes", len(chunk))
            await flush()
            raise _Cut(pos, type(e).__name__) from e
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


def _maybe_digest(text: str | None) -> Digest | None:
    if not text:
        return None
    try:
        return Digest.parse(text.strip())
    except InvalidReference:
        return None


def _foreign_endpoint(url: str, registry: str) -> _Endpoint | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    if parts.scheme == "http" and not is_loopback(parts.netloc):
        log.warning("skipping plain-HTTP foreign layer URL on %s", parts.hostname)
        return None
    return _Endpoint(parts.netloc, url, registry, allow_http=is_loopback(parts.netloc), anonymous=True)


def _tls_error(ep: _Endpoint, e: Exception) -> FetchdError:
    text = str(e).upper()
    if "WRONG_VERSION_NUMBER" in text or "RECORD_LAYER" in text or "PACKET_LENGTH" in text:
        return InsecureRegistry(
            f"{ep.label} does not speak TLS (it looks like plain HTTP). If that is intended, set "
            f'[registries."{ep.registry}"] insecure = true in the fetchd config')
    if isinstance(e, aiohttp.ClientConnectorCertificateError) or isinstance(
            getattr(e, "os_error", None), ssl.SSLCertVerificationError):
        return RegistryError(
            f"{ep.label}: its TLS certificate is not trusted ({type(e).__name__}); install its CA "
            f'in the system trust store, or set [registries."{ep.registry}"] insecure = true')
    return RegistryError(f"{ep.label}: TLS failed ({type(e).__name__}); check the registry address")
