"""The HTTP side of talking to registries: endpoints, budgets, auth, redirects, retries.

``Transport`` is owned by ``RegistryClient`` (one per daemon). Per registry host it keeps
ONE connection budget (an ``asyncio.Semaphore``) shared by every pull in the process, the
pacing for ``requests_per_second``, the host's auth challenge, and the counters behind
``stats()``. ``open()`` yields a response with an expected status after auth (bearer or
basic, one refresh), redirects (followed by hand: credentials never leave the origin) and
retries (connection errors, timeouts, 408, 429, 5xx; Retry-After honoured with a cap).
Bodies are the caller's: failures while reading one are not retried here.

Mirrors (``[registries."host"] mirrors``) come before the upstream, in configured order.
A mirror is never retried: the next endpoint is the retry. It must send its headers and
each body read within its ``timeout`` (``network.mirror_timeout``); one that cannot be
reached or times out is skipped for ``network.mirror_cooldown`` seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
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
from .errors import (
    BlobUnknown,
    DigestMismatch,
    FetchdError,
    InsecureRegistry,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    RegistryStalled,
    SizeMismatch,
    Unauthorized,
)
from .reference import Reference
from .registry_errors import error_from_response
from .retry import RetryPolicy, parse_ratelimit, parse_retry_after, retryable_status

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REDIRECTS = 10
# aiohttp's default 64 KiB read buffer caps a stream near 400 MB/s; 1 MiB reaches ~2 GB/s on
# loopback (2 MiB was no faster). Memory is only used when the sink is slower than the
# network, but then on every connection at once: 8 connections buffered 2 MiB more each.
READ_BUFSIZE = 1024 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
# Errors of a request or of reading its body that another try may fix.
TRANSIENT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError,
             ConnectionError)
# A mirror answering these simply does not hold the content (Spegel, a cold cache): no warning.
_NOT_THERE = (BlobUnknown, ManifestUnknown, NameUnknown)
# A mirror that sent these sent wrong bytes: counted as corrupt and logged as a warning.
_WRONG_BYTES = (DigestMismatch, SizeMismatch)


@dataclass(frozen=True)
class Endpoint:
    """One place to send requests: the registry itself, a mirror, or a foreign URL."""

    key: str                     # host[:port]: budget, stats, tokens
    base: str                    # scheme://host[:port][/prefix], or the whole URL (foreign)
    registry: str                # the upstream registry, for messages and ?ns=
    allow_http: bool
    mirror: MirrorConfig | None = None
    anonymous: bool = False      # never any credentials (foreign layer URLs)
    verify_tls: bool = True
    auth_file: str | None = None
    timeout: float | None = None  # mirrors: seconds for the headers and for each body read

    def repository(self, ref: Reference) -> str:
        """The repository as this endpoint names it (a mirror may prefix it)."""
        prefix = self.mirror.repository_prefix if self.mirror is not None else ""
        return f"{prefix}/{ref.repository}" if prefix else ref.repository

    def path(self, ref: Reference, kind: str, target: str) -> str:
        path = f"/v2/{self.repository(ref)}/{kind}/{target}"
        if self.mirror is not None and self.mirror.ns:
            path += f"?ns={self.registry}"
        return path

    @property
    def label(self) -> str:
        return f"mirror {self.key}" if self.mirror else f"registry {self.key}"


# The per-host stats that only grow (``Host.bump``); the others are levels.
class ProgressWatch:
    """A progress deadline for a block: at least ``min_bytes`` must be ``fed`` in every
    ``window`` seconds, else the block is cancelled and ends in ``TimeoutError``
    (``expired()`` then tells it was this watch). ``window`` 0 or None: no deadline."""

    def __init__(self, window: float | None, min_bytes: int = 1) -> None:
        self.window = window or None
        self.min_bytes = max(1, min_bytes)
        self._got = 0
        self._cm: asyncio.Timeout | None = None

    def _deadline(self) -> float | None:
        return None if self.window is None else asyncio.get_running_loop().time() + self.window

    async def __aenter__(self) -> ProgressWatch:
        self._cm = asyncio.timeout_at(self._deadline())
        await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._cm is not None
        await self._cm.__aexit__(*exc)  # raises TimeoutError when the deadline passed

    def fed(self, n: int) -> None:
        self._got += n
        if self._got >= self.min_bytes and self._cm is not None and self.window is not None:
            self._got = 0
            self._cm.reschedule(self._deadline())

    def expired(self) -> bool:
        return self._cm is not None and self._cm.expired()

    def describe(self) -> str:
        return (f"stalled: fewer than {self.min_bytes} bytes in {self.window:g} s "
                "([network] stall_timeout, stall_bytes)")


COUNTERS = ("requests", "bytes", "retries", "errors", "fallbacks", "corrupt", "timeouts")


@dataclass
class Host:
    """What the client knows about one host; ``semaphore`` is its whole connection budget.

    ``in_use`` + ``semaphore``'s free slots == ``limit`` at every await point.
    """

    semaphore: asyncio.Semaphore
    limit: int = 1
    interval: float = 0.0
    next_slot: float = 0.0
    range_supported: bool | None = None
    challenge: Challenge | None = None
    plain_http: bool = False     # an insecure host whose TLS attempt failed
    mirror: bool = False
    in_use: int = 0              # connections (requests and bodies being read) holding a slot
    waiting: int = 0             # requests queued for a slot
    down_until: float = 0.0      # mirrors: skipped until then (monotonic clock)
    quota_warned: bool = False   # a low-quota warning was logged; cleared when it recovers
    # The least time from sending a request to its response headers: the path's round trip
    # plus the server's least work. None: no answer yet.
    latency: float | None = None
    blob_redirects: bool = False  # blobs came from another origin (object storage, a CDN)
    stats: dict[str, int | None] = field(default_factory=lambda: {
        **dict.fromkeys(COUNTERS, 0), "ratelimit_remaining": None, "ratelimit_limit": None,
        "ratelimit_window_seconds": None})

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one connection of this host's budget."""
        self.waiting += 1
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self.semaphore.release()

    async def pace(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Space request starts by ``interval`` (requests_per_second)."""
        if not self.interval:
            return
        now = time.monotonic()
        wait = self.next_slot - now
        self.next_slot = max(now, self.next_slot) + self.interval
        if wait > 0:
            await sleep(wait)

    def bump(self, name: str, n: int = 1) -> None:
        self.stats[name] = (self.stats[name] or 0) + n


class Transport:
    """Requests to registries, mirrors and foreign URLs (see the module docstring)."""

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
        self.clock = clock
        self._session = session
        self._own_session = session is None
        self._trust_env = trust_env
        self.sleep = sleep
        self._hosts: dict[str, Host] = {}

    # ------------------------------------------------------------------ lifecycle

    def session(self) -> aiohttp.ClientSession:
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

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per host (registry or mirror, ``host[:port]``), JSON-ready:

        counters ``requests``, ``bytes``, ``retries``, ``errors``, ``fallbacks`` (requests
        this mirror failed, answered by the next endpoint), ``corrupt`` (contents it served
        with a wrong digest or size), ``timeouts``; the budget ``max_connections``,
        ``connections_in_use``, ``connections_waiting``, ``requests_per_second`` (None: no
        pacing); Docker Hub's quota ``ratelimit_remaining``, ``ratelimit_limit``,
        ``ratelimit_window_seconds`` (None until the registry sent them); ``role``
        ("registry" | "mirror"), ``down`` and ``down_seconds`` (mirrors in cooldown), and
        ``range_supported``, ``latency_ms`` (the least time a response took to start; None
        before the first) and ``blob_redirects`` (blobs are served by another origin).
        """
        now = self.clock()
        out: dict[str, dict[str, Any]] = {}
        for key, h in self._hosts.items():
            down = max(0.0, h.down_until - now)
            out[key] = {
                **h.stats,
                "role": "mirror" if h.mirror else "registry",
                "max_connections": h.limit,
                "connections_in_use": h.in_use,
                "connections_waiting": h.waiting,
                "requests_per_second": 1.0 / h.interval if h.interval else None,
                "down": down > 0,
                "down_seconds": round(down, 1),
                "range_supported": h.range_supported,
                "latency_ms": None if h.latency is None else round(h.latency * 1000, 3),
                "blob_redirects": h.blob_redirects,
            }
        return out

    def host(self, key: str, *, mirror: bool = False) -> Host:
        host = self._hosts.get(key)
        if host is None:
            reg = self.config.registry(key)
            rps = reg.requests_per_second
            limit = reg.max_connections or self.net.max_connections
            host = Host(asyncio.Semaphore(limit), limit=limit, interval=1.0 / rps if rps else 0.0,
                        mirror=mirror)
            self._hosts[key] = host
        return host

    # ------------------------------------------------------------------ endpoints

    def endpoints(
        self, ref: Reference, *, tag: bool, exclude: frozenset[str] = frozenset()
    ) -> list[Endpoint]:
        """Mirrors in configured order, then upstream (always last, never excluded).

        Skipped: digest_only mirrors for tags, mirrors in ``exclude`` (keys), mirrors in
        their cooldown, plain-HTTP mirrors not marked insecure.
        """
        reg = self.config.registry(ref.registry)
        out: list[Endpoint] = []
        now = self.clock()
        for mirror in reg.mirrors:
            if tag and mirror.digest_only:
                continue
            parts = urlsplit(mirror.url)
            if parts.netloc in exclude or self.host(parts.netloc, mirror=True).down_until > now:
                continue
            allow = mirror.insecure or is_loopback(parts.netloc)
            if parts.scheme == "http" and not allow:
                log.warning("skipping plain-HTTP mirror %s of %s: set insecure = true on it to use it",
                            parts.netloc, ref.registry)
                continue
            timeout = mirror.timeout if mirror.timeout is not None else self.net.mirror_timeout
            out.append(Endpoint(parts.netloc, mirror.base, ref.registry, allow, mirror=mirror,
                                verify_tls=not mirror.insecure, timeout=timeout))
        loopback = is_loopback(ref.api_host)
        # Loopback registries speak plain HTTP (as Docker assumes); hosts marked insecure
        # get HTTPS without certificate checks (self-signed) and plain HTTP if TLS fails.
        scheme = "http" if loopback or self.host(ref.registry).plain_http else "https"
        out.append(Endpoint(ref.registry, f"{scheme}://{ref.api_host}", ref.registry,
                             loopback or reg.insecure, verify_tls=not reg.insecure,
                             auth_file=reg.auth_file))
        return out

    async def each_endpoint(
        self, ref: Reference, tag: bool, op: Callable[[Endpoint], Awaitable[T]],
        exclude: frozenset[str] = frozenset(), *, corrupt_retries: int = 0, subject: str = "",
    ) -> T:
        """Run ``op`` on each endpoint in turn; mirrors' failures fall through to the next.

        The upstream's error is the one raised. A mirror's wrong bytes are counted
        (``corrupt``) and logged as a warning; its other failures count as ``fallbacks``.
        When the upstream's bytes are wrong (size or digest), ``op`` runs again on it, up to
        ``corrupt_retries`` more times, each counted and logged (``subject`` names the
        content, e.g. ``manifest sha256:...``): ``op`` must start from nothing each time.
        """
        endpoints = self.endpoints(ref, tag=tag, exclude=exclude)
        for ep in endpoints[:-1]:
            try:
                return await op(ep)
            except FetchdError as e:
                self.mirror_failed(ep, ref, e)
        upstream, tries = endpoints[-1], 0
        while True:
            try:
                return await op(upstream)
            except _WRONG_BYTES as e:
                again = tries < corrupt_retries
                self.wrong_bytes(upstream, ref, subject, e, again)
                if not again:
                    raise
                tries += 1

    def wrong_bytes(self, ep: Endpoint, ref: Reference, subject: str, e: FetchdError,
                    again: bool) -> None:
        """The registry ``ep`` sent bytes that failed their check: count and log it (no URL,
        no credentials: the host, the repository and what it was)."""
        self.host(ep.key).bump("corrupt")
        log.warning("%s sent wrong bytes for %s of %s (%s); they were discarded, %s", ep.label,
                    subject or "content", ref.repository, e.code,
                    "fetching it again from byte 0" if again else "giving up on it")

    def mirror_failed(self, ep: Endpoint, ref: Reference, e: FetchdError) -> None:
        host = self.host(ep.key)
        host.bump("fallbacks")
        if isinstance(e, _WRONG_BYTES):
            host.bump("corrupt")
            log.warning("%s served wrong content for %s (%s: %s); skipped for it, trying the "
                        "next source", ep.label, ref, e.code, e.message)
        elif isinstance(e, _NOT_THERE):
            log.info("%s does not have %s (%s); trying the next source", ep.label, ref, e.code)
        else:
            log.warning("%s failed for %s (%s); trying the next source", ep.label, ref, e.code)

    def mark_down(self, ep: Endpoint, reason: str) -> None:
        """A mirror that cannot be reached is skipped for ``mirror_cooldown`` seconds."""
        host = self.host(ep.key)
        if self.net.mirror_cooldown <= 0:
            return
        if host.down_until <= self.clock():
            log.warning("%s of %s unreachable (%s); skipping it for %.0f s", ep.label, ep.registry,
                        reason, self.net.mirror_cooldown)
        host.down_until = self.clock() + self.net.mirror_cooldown

    # ------------------------------------------------------------------ requests

    async def credentials_for(self, ep: Endpoint, ref: Reference) -> BasicCredentials | None:
        if ep.anonymous:
            return None
        if ep.mirror is not None:
            if ep.mirror.credentials is not None:
                return ep.mirror.credentials
            return await self.credentials.lookup(ep.key)
        return await self.credentials.lookup(ref.registry, ref.repository, ep.auth_file)

    async def _authorization(self, ep: Endpoint, ref: Reference, scope: str) -> str | None:
        host = self.host(ep.key)
        challenge = None if ep.anonymous else host.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = await self.credentials_for(ep, ref)
            return basic_authorization(creds) if creds else None
        token = self.tokens.get(ep.key, scope)
        if token is None:
            async with self.tokens.lock(ep.key, scope):
                token = self.tokens.get(ep.key, scope)
                if token is None:
                    creds = await self.credentials_for(ep, ref)
                    value, expires_in = await fetch_token(
                        self.session(), challenge, scope, creds, registry=ep.key,
                        allow_http=ep.allow_http,
                        timeout=self.net.connect_timeout + self.net.read_timeout)
                    token = self.tokens.put(ep.key, scope, value, expires_in)
        return f"Bearer {token.value}"

    async def _send(
        self, ep: Endpoint, method: str, url: str, headers: dict[str, str], auth: str | None,
        data: Any = None,
    ) -> tuple[aiohttp.ClientResponse, bool]:
        """One request, following redirects by hand; returns (response, left the origin)."""
        # identity: aiohttp would otherwise offer gzip, and a CDN that takes it up would hand
        # us bytes that no longer hash to the digest.
        hdrs = {"Accept-Encoding": "identity"}
        if ep.mirror:
            hdrs.update(ep.mirror.headers)
        hdrs.update(headers)
        if auth:
            hdrs["Authorization"] = auth
        target = URL(url, encoded=True)
        origin = target.origin()
        foreign = ep.anonymous
        host = self.host(ep.key)
        extra: dict[str, Any] = {}
        if ep.timeout is not None:
            # Mirrors must answer quickly, headers and every body read: the upstream is the
            # fallback, not a long wait.
            extra["timeout"] = aiohttp.ClientTimeout(
                total=None, sock_connect=min(self.net.connect_timeout, ep.timeout),
                sock_read=ep.timeout)
        for _ in range(MAX_REDIRECTS + 1):
            host.bump("requests")
            # A mirror's own timeout, else the progress deadline for the response headers.
            async with asyncio.timeout(ep.timeout if ep.timeout is not None
                                       else self.net.stall_timeout or None):
                resp = await self.session().request(
                    method, target, headers=hdrs, allow_redirects=False, data=data,
                    ssl=True if ep.verify_tls else False, read_bufsize=READ_BUFSIZE, **extra)
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp, foreign
            resp.close()
            target = _redirect_target(ep, resp.url, location)
            if target.scheme == "http" and not (ep.allow_http or is_loopback(target.raw_authority)):
                raise InsecureRegistry(
                    f"{ep.label} redirected to plain-HTTP {target.host}; refusing. If intended, "
                    f'set [registries."{ep.registry}"] insecure = true in the fetchd config')
            if target.origin() != origin:
                # Object storage (S3, GCS) must never see the registry's credentials or headers.
                hdrs = {k: v for k, v in hdrs.items()
                        if k.lower() in ("range", "accept", "accept-encoding")}
                foreign = True
            if resp.status == 303:
                method = "GET"
        raise RegistryError(f"{ep.label}: more than {MAX_REDIRECTS} redirects for {url}")

    @asynccontextmanager
    async def open(
        self,
        ep: Endpoint,
        ref: Reference,
        method: str,
        path: str,
        *,
        what: str,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        retries: int | None = None,
        data: Any = None,
        push: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a status in ``ok``, after auth, redirects and retries.

        ``data`` is the request body (an uploader passes ``retries=0`` when it can be read
        only once); ``push`` asks for a token with push rights on the repository.

        The host's connection slot is held until the caller's block ends, so a body
        being read counts against the budget. Failures the caller meets while reading
        the body are the caller's to handle (they are not retried here). ``retries``
        lowers the configured count for this request; mirrors get none (the next
        endpoint is their retry) and are put in cooldown when they cannot be reached.
        """
        host = self.host(ep.key)
        if ep.mirror is not None:
            retries = 0
        else:
            retries = self.policy.retries if retries is None else min(retries, self.policy.retries)
        scope = pull_scope(ep.repository(ref)) + (",push" if push else "")
        attempt, refreshed = 0, False
        while True:
            failure, retry_after = "", None
            try:
                auth = await self._authorization(ep, ref, scope)
            except RegistryError as e:  # the token server failed; Unauthorized is not retried
                if attempt >= retries:
                    host.bump("errors")
                    raise
                auth, failure = None, f"token server: {e.message}"
            if not failure:
                async with host.slot():
                    await host.pace(self.sleep)
                    sent = time.monotonic()
                    try:
                        resp, foreign = await self._send(ep, method, ep.base + path, headers or {}, auth,
                                                         data)
                    except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as e:
                        if ep.allow_http and ep.mirror is None and not host.plain_http:
                            log.info("%s: TLS failed, using plain HTTP (insecure registry)", ep.label)
                            host.plain_http = True
                            ep = replace(ep, base="http://" + ep.base.split("://", 1)[1])
                            continue
                        host.bump("errors")
                        raise _tls_error(ep, e) from e
                    except TRANSIENT as e:
                        failure = f"{type(e).__name__}: {redact(str(e))}" if str(e) \
                            else type(e).__name__
                        if isinstance(e, asyncio.TimeoutError):
                            host.bump("timeouts")
                            failure = "no response in time (stalled)"
                        if ep.mirror is not None:
                            self.mark_down(ep, failure)
                    except aiohttp.ClientError as e:  # a malformed answer: maybe a bad proxy
                        first_line = (redact(str(e)).splitlines() or [""])[0]
                        failure = f"{type(e).__name__}: {first_line[:200]}"
                    else:
                        took = time.monotonic() - sent
                        if host.latency is None or took < host.latency:
                            host.latency = took
                        if foreign and what == "blob":
                            host.blob_redirects = True
                        remaining = parse_ratelimit(resp.headers.get("ratelimit-remaining"))
                        if remaining is not None:
                            host.stats["ratelimit_remaining"] = remaining
                            self._note_quota(ep, host, resp.headers.get("ratelimit-limit"))
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
                        # Object storage refusing a redirect target: the signed URL may have
                        # expired; asking the registry again yields a fresh one.
                        expired = foreign and not ep.anonymous and status in (401, 403)
                        if (retryable_status(status) or expired) and attempt < retries and not quota:
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
                kind = RegistryStalled if "stalled" in failure else RegistryError
                raise kind(
                    f"{ep.label}: {what} of {ref.name} failed after {attempt + 1} tries ({failure}); "
                    "check the network or the registry's status and try again")
            host.bump("retries")
            delay = self.policy.delay(attempt, retry_after)
            log.info("%s: %s of %s: %s, retry in %.1fs", ep.label, what, ref.name, failure, delay)
            attempt += 1
            await self.sleep(delay)

    def _note_quota(self, ep: Endpoint, host: Host, limit_header: str | None) -> None:
        """Keep Docker Hub's quota (``ratelimit-limit: 100;w=21600``) for stats()."""
        limit = parse_ratelimit(limit_header)
        if limit is not None:
            host.stats["ratelimit_limit"] = limit
        window = _window(limit_header)
        if window is not None:
            host.stats["ratelimit_window_seconds"] = window
        remaining = host.stats["ratelimit_remaining"]
        low = remaining is not None and bool(limit) and remaining * 10 < (limit or 0)
        if low and not host.quota_warned:
            log.warning("%s: %d of %d manifest pulls left in its quota window; add a mirror or "
                        "log in for a higher quota", ep.label, remaining, limit)
        host.quota_warned = low

    async def _accept_challenge(
        self, ep: Endpoint, ref: Reference, scope: str, challenges: list[Challenge]
    ) -> bool:
        """Learn how the host wants auth; True if another try with new credentials makes sense."""
        if ep.anonymous:
            return False
        host = self.host(ep.key)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            host.challenge = bearer
            self.tokens.drop(ep.key, scope)  # expired, revoked or too narrow: get a new one
            return True
        if any(c.scheme == "basic" for c in challenges):
            host.challenge = Challenge("basic")
            return await self.credentials_for(ep, ref) is not None
        return False

    async def _unauthorized(self, ep: Endpoint, ref: Reference) -> Unauthorized:
        creds = await self.credentials_for(ep, ref)
        how = "the stored credentials were rejected" if creds else "no credentials were found"
        return Unauthorized(
            f"{ep.label} refused {ref.name} (401): {how}. Log in with 'podman login {ep.key}' "
            f"or 'docker login {ep.key}', or set auth_file for it in the fetchd config")


def _redirect_target(ep: Endpoint, base: URL, location: str) -> URL:
    """Where a redirect leads: an absolute http(s) URL with a host, or RegistryError.

    A registry's ``Location`` is untrusted text: ``file://``, ``ftp:``, ``data:``, a host
    that is no host, or a port out of range end here as a clear error naming the registry.
    """
    host: str | None = None
    try:
        target = base.join(URL(location, encoded=True))
        scheme = target.scheme
        if scheme in ("http", "https"):
            host, _ = target.host, target.port  # yarl checks the port when asked
            target.origin()
            if host and ":" in host:  # yarl takes any bracketed text for an IPv6 address
                ipaddress.IPv6Address(host.split("%", 1)[0])
    except (ValueError, TypeError):
        raise RegistryError(f"{ep.label} redirected to a malformed URL {location[:200]!r}; "
                            "refusing. The registry is misconfigured or hostile") from None
    if scheme not in ("http", "https") or not host:
        raise RegistryError(f"{ep.label} redirected to a {scheme or 'relative'}: URL; only http(s) "
                            "redirects are followed. The registry is misconfigured or hostile")
    return target


_URL_SECRETS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?:[^\s/@'\"]*@)?"
                          r"(?P<rest>[^\s?#'\"]*)(?:\?[^\s#'\"]*)?", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with URLs cut to scheme://host/path: no userinfo, no query.

    aiohttp's exceptions quote the URL they failed on; after a redirect that is an object
    storage URL whose query string is a signature, as good as a token while it lasts.
    """
    return _URL_SECRETS.sub(lambda m: f"{m['scheme']}{m['rest']}", text)


def _window(value: str | None) -> int | None:
    """The ``w=<seconds>`` of a rate-limit header; None if absent."""
    for part in (value or "").split(";")[1:]:
        name, _, number = part.strip().partition("=")
        if name.strip().lower() == "w" and number.strip().isdigit():
            return int(number.strip())
    return None


def foreign_endpoint(url: str, registry: str) -> Endpoint | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    if parts.scheme == "http" and not is_loopback(parts.netloc):
        log.warning("skipping plain-HTTP foreign layer URL on %s", parts.hostname)
        return None
    return Endpoint(parts.netloc, url, registry, allow_http=is_loopback(parts.netloc), anonymous=True)


def _tls_error(ep: Endpoint, e: Exception) -> FetchdError:
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

