"""Registry authentication: challenges, bearer tokens, and the credentials users already have.

Three pieces, each usable alone:

- ``parse_challenges`` reads ``WWW-Authenticate`` (several challenges, quoted commas).
- ``Credentials`` finds a user's login for a registry in the files podman, skopeo and
  docker write (and runs ``docker-credential-<name> get`` for helpers).
- ``TokenCache`` + ``fetch_token`` get and keep bearer tokens per (host, scope),
  refreshed before they expire.

Invariant: no token, password or auth string ever appears in an exception message,
a log line or a ``repr``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .config import BasicCredentials
from .errors import InsecureRegistry, RegistryError, Unauthorized
from .registry_errors import read_capped

log = logging.getLogger(__name__)

DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/")
DOCKER_HUB_HELPER_URL = "https://index.docker.io/v1/"
IDENTITY_TOKEN_USER = "<token>"  # docker's marker: the password is an OAuth refresh token
DEFAULT_EXPIRES_IN = 60
MAX_TOKEN_BODY = 1024 * 1024
# A token answer is one object of a few strings and numbers. One with more JSON values than
# this (commas and brackets, counted at C speed) is not decoded: decoding follows the number
# of values, not bytes (1 MiB of nested arrays holds the event loop for ~50 ms).
MAX_TOKEN_VALUES = 256
HELPER_TIMEOUT = 30.0

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?=\s|,|$)")
_PARAM_RE = re.compile(rf"\s*({_TOKEN})\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^,\s]*)\s*")
_HELPER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# --------------------------------------------------------------------------- challenges


@dataclass(frozen=True)
class Challenge:
    """One ``scheme param=value, ...`` challenge; parameter names are lowercased."""

    scheme: str
    params: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | None:
        return dict(self.params).get(name)

    @property
    def realm(self) -> str | None:
        return self.get("realm")

    @property
    def service(self) -> str | None:
        return self.get("service")

    @property
    def scope(self) -> str | None:
        return self.get("scope")

    @property
    def error(self) -> str | None:
        return self.get("error")


def parse_challenges(headers: str | list[str]) -> list[Challenge]:
    """All challenges of one or several ``WWW-Authenticate`` values, in order.

    Commas inside quoted strings belong to the value (``scope="repository:a:pull,push"``);
    a bare token followed by a parameter starts the next challenge. Unparseable tails
    are skipped rather than raising: a malformed header just yields fewer challenges.
    """
    values = [headers] if isinstance(headers, str) else headers
    result: list[Challenge] = []
    for text in values:
        pos, n = 0, len(text)
        while pos < n:
            while pos < n and text[pos] in " \t,":
                pos += 1
            m = _SCHEME_RE.match(text, pos)
            if not m:
                break
            scheme, pos = m.group(1), m.end()
            params: list[tuple[str, str]] = []
            while pos < n:
                while pos < n and text[pos] in " \t,":
                    pos += 1
                p = _PARAM_RE.match(text, pos)
                # A token not followed by '=' is the next challenge's scheme.
                if not p or not p.group(0).strip():
                    break
                value = p.group(2)
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                params.append((p.group(1).lower(), value))
                pos = p.end()
            result.append(Challenge(scheme.lower(), tuple(params)))
    return result


def basic_authorization(credentials: BasicCredentials) -> str:
    """The ``Authorization`` value for HTTP basic auth (UTF-8, as docker and podman send it)."""
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # on the cache's clock

    def fresh(self, now: float, expires_in: float) -> bool:
        # Refresh early: a layer queued behind others must not start with a token that
        # dies mid-request. Keep a margin of 20% of the lifetime, at most 30 s.
        margin = min(30.0, 0.2 * expires_in)
        return now < self.expires_at - margin


class TokenCache:
    """Bearer tokens per (host, scope); ``get`` returns only tokens still fresh."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tokens: dict[tuple[str, str], tuple[Token, float]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def get(self, host: str, scope: str) -> Token | None:
        entry = self._tokens.get((host, scope))
        if entry is None:
            return None
        token, lifetime = entry
        return token if token.fresh(self.clock(), lifetime) else None

    def put(self, host: str, scope: str, value: str, expires_in: float) -> Token:
        token = Token(value, self.clock() + expires_in)
        self._tokens[(host, scope)] = (token, expires_in)
        return token

    def drop(self, host: str, scope: str) -> None:
        self._tokens.pop((host, scope), None)

    def lock(self, host: str, scope: str) -> asyncio.Lock:
        """One token request at a time per key: parallel layers share the first answer."""
        return self._locks.setdefault((host, scope), asyncio.Lock())


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    name = urlsplit(f"//{host}").hostname or host
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def fetch_token(
    session: aiohttp.ClientSession,
    challenge: Challenge,
    scope: str,
    credentials: BasicCredentials | None,
    *,
    registry: str,
    allow_http: bool,
    timeout: float,  # noqa: ASYNC109 - passed to aiohttp as a per-request timeout
) -> tuple[str, float]:
    """Ask the challenge's realm for a token: returns (token, expires_in seconds)."""
    realm = challenge.realm
    if not realm:
        raise Unauthorized(f"registry {registry} asked for a bearer token but named no realm")
    try:
        parts = urlsplit(realm)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise Unauthorized(f"registry {registry}: its token realm is not a valid URL") from None
    if parts.scheme == "http" and not (allow_http or is_loopback(parts.netloc)):
        raise InsecureRegistry(
            f"registry {registry} sends its token requests to plain-HTTP {parts.netloc}; "
            f"refusing to send credentials unencrypted. If that is intended, set "
            f'[registries."{registry}"] insecure = true in the fetchd config'
        )
    if parts.scheme not in ("http", "https"):
        raise Unauthorized(f"registry {registry}: token realm is not an http(s) URL")
    params: list[tuple[str, str]] = []
    if challenge.service:
        params.append(("service", challenge.service))
    params.append(("scope", scope))
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        if credentials is not None and credentials.username == IDENTITY_TOKEN_USER:
            form = {"grant_type": "refresh_token", "refresh_token": credentials.password,
                    "client_id": "fetchd", **dict(params)}
            ctx = session.post(realm, data=form, timeout=client_timeout)
        else:
            headers = {"Authorization": basic_authorization(credentials)} if credentials else {}
            ctx = session.get(realm, params=params, headers=headers, timeout=client_timeout)
        async with ctx as resp:
            body = await read_capped(resp.content, MAX_TOKEN_BODY + 1)
            status = resp.status
    except (TimeoutError, aiohttp.ClientError) as e:
        raise RegistryError(
            f"registry {registry}: token server {parts.netloc} failed: {type(e).__name__}; "
            "check the network and retry"
        ) from e
    if status in (401, 403):
        who = "the configured credentials were" if credentials else "anonymous access was"
        raise Unauthorized(
            f"registry {registry}: token server {parts.netloc} refused ({status}); {who} "
            "rejected. Log in with 'podman login' or 'docker login', or fix auth_file in the config"
        )
    if status != 200 or len(body) > MAX_TOKEN_BODY:
        raise RegistryError(f"registry {registry}: token server {parts.netloc} answered {status}")
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > MAX_TOKEN_VALUES:
        raise RegistryError(
            f"registry {registry}: token server {parts.netloc} answered with about {values} "
            f"JSON values (a token answer has a few; at most {MAX_TOKEN_VALUES} are read): "
            "it is not a token server, check the registry")
    try:
        data = json.loads(body)
        token = data.get("token") or data.get("access_token")
        expires_in = data.get("expires_in") or DEFAULT_EXPIRES_IN
    except (ValueError, AttributeError, RecursionError):
        token, expires_in = None, 0
    if not isinstance(token, str) or not token:
        raise RegistryError(f"registry {registry}: token server {parts.netloc} sent no token")
    if not isinstance(expires_in, int | float) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN
    return token, float(expires_in)


# --------------------------------------------------------------------------- credentials


def auth_files(env: Mapping[str, str]) -> list[Path]:
    """Where podman/skopeo/docker keep logins, in the order containers/image reads them."""
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    config_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    files.append(config_home / "containers" / "auth.json")
    docker_dir = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else home / ".docker"
    files.append(docker_dir / "config.json")
    return files


def _key_host(key: str) -> str:
    """docker config keys may be URLs ('https://index.docker.io/v1/'); keep host[/path]."""
    if "://" in key:
        parts = urlsplit(key)
        path = parts.path.strip("/")
        if path in ("v1", "v2", ""):
            return parts.netloc
        return f"{parts.netloc}/{path}"
    return key.rstrip("/")


def _candidates(registry: str, repository: str) -> list[str]:
    """Keys to try, most specific first: host/a/b, host/a, host."""
    hosts = ["docker.io", "index.docker.io", "registry-1.docker.io"] \
        if registry in DOCKER_HUB_KEYS else [registry]
    out: list[str] = []
    for host in hosts:
        parts = repository.split("/") if repository else []
        for i in range(len(parts), 0, -1):
            out.append(f"{host}/{'/'.join(parts[:i])}")
        out.append(host)
    return out


def _decode_entry(entry: object) -> BasicCredentials | None:
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
        return BasicCredentials(IDENTITY_TOKEN_USER, entry["identitytoken"])
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return BasicCredentials(user, password) if sep else None
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return BasicCredentials(entry["username"], entry["password"])
    return None


class Credentials:
    """Looks up logins for a registry; results are cached per (registry, repository).

    ``auth_file`` (from ``[registries."host"] auth_file``) replaces the default list.
    A helper that fails or knows nothing yields None (anonymous), never an exception.
    """

    def __init__(self, env: Mapping[str, str] | None = None, cache_ttl: float = 300.0) -> None:
        self.env = dict(os.environ if env is None else env)
        self.cache_ttl = cache_ttl
        self._cache: dict[tuple[str, str, str | None], tuple[float, BasicCredentials | None]] = {}

    async def lookup(
        self, registry: str, repository: str = "", auth_file: str | None = None
    ) -> BasicCredentials | None:
        key = (registry, repository, auth_file)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.cache_ttl:
            return hit[1]
        creds = await self._lookup(registry, repository, auth_file)
        self._cache[key] = (time.monotonic(), creds)
        return creds

    async def _lookup(
        self, registry: str, repository: str, auth_file: str | None
    ) -> BasicCredentials | None:
        files = [Path(auth_file)] if auth_file else auth_files(self.env)
        candidates = _candidates(registry, repository)
        for path in files:
            data = _read_json(path)
            if data is None:
                continue
            helpers = data.get("credHelpers")
            helpers = helpers if isinstance(helpers, dict) else {}
            auths = data.get("auths")
            auths = auths if isinstance(auths, dict) else {}
            normalized = {_key_host(k): v for k, v in auths.items()}
            for candidate in candidates:
                helper = helpers.get(candidate)
                if isinstance(helper, str):
                    return await self.run_helper(helper, registry)
                creds = _decode_entry(normalized.get(candidate))
                if creds is not None:
                    return creds
            store = data.get("credsStore")
            if isinstance(store, str) and store:
                creds = await self.run_helper(store, registry)
                if creds is not None:
                    return creds
        return None

    async def run_helper(self, name: str, registry: str) -> BasicCredentials | None:
        """``docker-credential-<name> get`` with the server URL on stdin."""
        if not _HELPER_NAME.match(name):
            log.warning("ignoring credential helper with an invalid name %r", name)
            return None
        server = DOCKER_HUB_HELPER_URL if registry in DOCKER_HUB_KEYS else registry
        program = f"docker-credential-{name}"
        try:
            proc = await asyncio.create_subprocess_exec(
                program, "get", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, env=self.env,
            )
        except OSError:
            log.warning("credential helper %s not found for %s; trying anonymous", program, registry)
            return None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(server.encode()), HELPER_TIMEOUT)
        except BaseException as e:  # timed out, or the pull was cancelled: no stray helper
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
            if not isinstance(e, TimeoutError):
                raise
            log.warning("credential helper %s timed out for %s", program, registry)
            return None
        if proc.returncode != 0:
            return None  # "credentials not found" is the common case
        try:
            data: Any = json.loads(out)
            user, secret = data["Username"], data["Secret"]
        except (ValueError, KeyError, TypeError):
            log.warning("credential helper %s gave an unreadable answer for %s", program, registry)
            return None
        if not isinstance(user, str) or not isinstance(secret, str):
            return None
        return BasicCredentials(user, secret)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable auth file %s: %s", path, type(e).__name__)
        return None
    return data if isinstance(data, dict) else None
