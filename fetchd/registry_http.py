"""The HTTP side of talking to registries: endpoints, budgets, auth, redirects, retries.

``Transport`` is owned by ``RegistryClient`` (one per daemon). Per registry host it keeps
ONE connection budget (an ``asyncio.Semaphore``) shared by every pull in the process, the
pacing for ``requests_per_second``, the host's auth challenge, and the counters behind
``stats()``. ``open()`` yields a response with an expected status after auth (bearer or
basic, one refresh), redirects (followed by hand: credentials never leave the origin) and
retries (connection errors, timeouts, 408, 429, 5xx; Retry-After honoured with a cap).
Bodies are the caller's: failures while reading one are not retried here.
"""

from __future__ import annotations

import asyncio
import logging
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
from .errors import FetchdError, InsecureRegistry, RegistryError, Unauthorized
from .reference import Reference
from .registry_errors import error_from_response
from .retry import RetryPolicy, parse_ratelimit, parse_retry_after, retryable_status

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REDIRECTS = 10
# aiohttp's default 64 KiB read buffer caps a stream near 400 MB/s; 2 MiB reaches ~1 GB/s
# on loopback. Memory is only used when the sink is slower than the network.
READ_BUFSIZE = 2 * 1024 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
# Errors of a request or of reading its body that another try may fix.
TRANSIENT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError,
             ConnectionError)


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

    def path(self, ref: Reference, kind: str, target: str) -> str:
        path = f"/v2/{ref.repository}/{kind}/{target}"
        if self.mirror is not None and self.mirror.ns:
            path += f"?ns={self.registry}"
        return path

    @property
    def label(self) -> str:
        return f"mirror {self.key}" if self.mirror else f"registry {self.key}"


@dataclass
class Host:
    """What the client knows about one host; ``semaphore`` is its whole connection budget."""

    semaphore: asyncio.Semaphore
    interval: float = 0.0
    next_slot: float = 0.0
    range_supported: bool | None = None
    challenge: Challenge | None = None
    plain_http: bool = False     # an insecure host whose TLS attempt failed
    stats: dict[str, int | None] = field(default_factory=lambda: {
        "requests": 0, "bytes": 0, "retries": 0, "errors": 0, "ratelimit_remaining": None})

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
        """Per host: requests, bytes, retries, errors, ratelimit_remaining, range_supported."""
        return {key: {**h.stats, "range_supported": h.range_supported} for key, h in self._hosts.items()}

    def host(self, key: str) -> Host:
        host = self._hosts.get(key)
        if host is None:
            reg = self.config.registry(key)
            rps = reg.requests_per_second
            host = Host(asyncio.Semaphore(reg.max_connections or self.net.max_connections),
                         interval=1.0 / rps if rps else 0.0)
            self._hosts[key] = host
        return host

    # ------------------------------------------------------------------ endpoints

    def endpoints(self, ref: Reference, *, tag: bool) -> list[Endpoint]:
        """Mirrors in configured order (digest_only ones skipped for tags), then upstream."""
        reg = self.config.registry(ref.registry)
        out: list[Endpoint] = []
        for mirror in reg.mirrors:
            if tag and mirror.digest_only:
                continue
            parts = urlsplit(mirror.url)
            allow = mirror.insecure or is_loopback(parts.netloc)
            if parts.scheme == "http" and not allow:
                log.warning("skipping plain-HTTP mirror %s of %s: set insecure = true on it to use it",
                            parts.netloc, ref.registry)
                continue
            out.append(Endpoint(parts.netloc, mirror.url, ref.registry, allow, mirror=mirror))
        loopback = is_loopback(ref.api_host)
        # Loopback registries speak plain HTTP (as Docker assumes); hosts marked insecure
        # get HTTPS without certificate checks (self-signed) and plain HTTP if TLS fails.
        scheme = "http" if loopback or self.host(ref.registry).plain_http else "https"
        out.append(Endpoint(ref.registry, f"{scheme}://{ref.api_host}", ref.registry,
                             loopback or reg.insecure, verify_tls=not reg.insecure,
                             auth_file=reg.auth_file))
        return out

    async def each_endpoint(
        self, ref: Reference, tag: bool, op: Callable[[Endpoint], Awaitable[T]]
    ) -> T:
        """Run ``op`` on each endpoint in turn; mirrors' failures fall through to the next."""
        endpoints = self.endpoints(ref, tag=tag)
        for ep in endpoints[:-1]:
            try:
                return await op(ep)
            except FetchdError as e:
                log.info("%s failed for %s (%s); trying the next source", ep.label, ref, e.code)
        return await op(endpoints[-1])

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
        self, ep: Endpoint, method: str, url: str, headers: dict[str, str], auth: str | None
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
        for _ in range(MAX_REDIRECTS + 1):
            host.bump("requests")
            resp = await self.session().request(
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
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a status in ``ok``, after auth, redirects and retries.

        The host's connection slot is held until the caller's block ends, so a body
        being read counts against the budget. Failures the caller meets while reading
        the body are the caller's to handle (they are not retried here).
        """
        host = self.host(ep.key)
        retries = min(1, self.policy.retries) if ep.mirror else self.policy.retries
        scope = pull_scope(ref.repository)
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
                async with host.semaphore:
                    await host.pace(self.sleep)
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
                    except TRANSIENT as e:
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
                raise RegistryError(
                    f"{ep.label}: {what} of {ref.name} failed after {attempt + 1} tries ({failure}); "
                    "check the network or the registry's status and try again")
            host.bump("retries")
            delay = self.policy.delay(attempt, retry_after)
            log.info("%s: %s of %s: %s, retry in %.1fs", ep.label, what, ref.name, failure, delay)
            attempt += 1
            await self.sleep(delay)

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

