"""A small fake OCI registry (aiohttp.web on 127.0.0.1) whose faults a test scripts.

It serves manifests and blobs, optionally behind bearer or basic auth, and records
every request. Faults are queued per kind (``"manifest"``, ``"blob"``, ``"token"``)
and consumed one per request, so a test says exactly what the next answers are.
A second instance (``auth=None``) serves as "object storage" for redirects.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from fetchd.digest import Digest
from fetchd.manifest import OCI_MANIFEST


@dataclass
class Fault:
    status: int | None = None          # answer this status (with an error body) instead
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    cut_after: int | None = None       # send this many body bytes, then drop the connection
    ignore_range: bool = False         # answer 200 with the whole blob despite Range
    corrupt: bool = False              # flip a byte of the body
    redirect: str | None = None        # 307 to this base URL (+ the same path)


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


class FakeRegistry:
    def __init__(self, auth: str | None = None, *, expires_in: int | None = 300,
                 user: str = "user", password: str = "secret") -> None:
        self.auth = auth                # None | "bearer" | "basic"
        self.expires_in = expires_in
        self.user, self.password = user, password
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.faults: dict[str, deque[Fault]] = {"manifest": deque(), "blob": deque(), "token": deque()}
        self.seen: list[Seen] = []
        self.tokens_issued = 0
        self.valid_tokens: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.ratelimit_remaining: int | None = None
        self.realm_scheme = "http"
        self.blob_delay = 0.0              # seconds each blob answer holds its connection
        self.server: TestServer | None = None

    # ------------------------------------------------------------------ content

    def add_blob(self, data: bytes) -> Digest:
        digest = Digest.of(data)
        self.blobs[str(digest)] = data
        return digest

    def add_manifest(self, repo: str, tag: str | None, body: bytes,
                     media_type: str = OCI_MANIFEST) -> Digest:
        digest = Digest.of(body)
        self.manifests[(repo, str(digest))] = (body, media_type)
        if tag:
            self.manifests[(repo, tag)] = (body, media_type)
        return digest

    def fault(self, kind: str, *faults: Fault) -> None:
        self.faults[kind].extend(faults)

    def requests(self, kind: str) -> list[Seen]:
        part = {"manifest": "/manifests/", "blob": "/blobs/", "token": "/token"}[kind]
        return [s for s in self.seen if part in s.path]

    # ------------------------------------------------------------------ server

    async def start(self) -> FakeRegistry:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_post("/token", self._token_refresh)
        app.router.add_get("/v2/", self._ping)
        app.router.add_route("*", r"/v2/{name:.+}/manifests/{ref}", self._manifest)
        app.router.add_route("*", r"/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get(r"/storage/{digest}", self._storage)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # ------------------------------------------------------------------ handlers

    def _record(self, request: web.Request) -> None:
        self.seen.append(Seen(request.method, request.path, dict(request.query),
                              dict(request.headers)))

    def _challenge(self, error: str | None = None) -> web.Response:
        if self.auth == "basic":
            value = 'Basic realm="fake"'
        else:
            value = (f'Bearer realm="{self.realm_scheme}://{self.host}/token",'
                     f'service="fake-registry",scope="repository:x/y:pull,push"')
            if error:
                value += f',error="{error}"'
        body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]})
        return web.Response(status=401, text=body, content_type="application/json",
                            headers={"WWW-Authenticate": value})

    def _authorized(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if self.auth is None:
            return None
        if self.auth == "basic":
            want = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            return None if header == want else self._challenge()
        if not header.startswith("Bearer "):
            return self._challenge()
        if header[7:] not in self.valid_tokens:
            return self._challenge("invalid_token")
        return None

    async def _ping(self, request: web.Request) -> web.Response:
        self._record(request)
        return self._authorized(request) or web.json_response({})

    async def _token(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.faults["token"]:
            fault = self.faults["token"].popleft()
            return web.Response(status=fault.status or 500, body=fault.body or b"")
        self.tokens_issued += 1
        token = f"token-{self.tokens_issued}"
        self.valid_tokens.add(token)
        answer: dict[str, Any] = {"token": token}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        return web.json_response(answer)

    async def _token_refresh(self, request: web.Request) -> web.Response:
        """OAuth2 refresh-token grant (POST form), as for `docker login` identity tokens."""
        form = dict(await request.post())
        self.seen.append(Seen(request.method, request.path, {k: str(v) for k, v in form.items()},
                              dict(request.headers)))
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != self.password:
            return web.json_response({"error": "invalid_grant"}, status=401)
        self.tokens_issued += 1
        token = f"token-{self.tokens_issued}"
        self.valid_tokens.add(token)
        return web.json_response({"access_token": token, "expires_in": self.expires_in or 300})

    def _error(self, fault: Fault) -> web.Response:
        body = fault.body if fault.body is not None else json.dumps(
            {"errors": [{"code": "UNKNOWN", "message": f"injected {fault.status}"}]}).encode()
        return web.Response(status=fault.status or 500, body=body,
                            headers={**self._extra_headers(), **fault.headers},
                            content_type="application/json")

    def _extra_headers(self) -> dict[str, str]:
        if self.ratelimit_remaining is None:
            return {}
        return {"ratelimit-limit": "100;w=21600",
                "ratelimit-remaining": f"{self.ratelimit_remaining};w=21600"}

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        denied = self._authorized(request)
        if denied is not None:
            return denied
        fault = self.faults["manifest"].popleft() if self.faults["manifest"] else Fault()
        if fault.status:
            return self._error(fault)
        key = (request.match_info["name"], request.match_info["ref"])
        if key not in self.manifests:
            body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]})
            return web.Response(status=404, text=body, content_type="application/json")
        body, media_type = self.manifests[key]
        if fault.corrupt:
            body = body.replace(b"{", b"{ ", 1)
        headers = {"Docker-Content-Digest": "sha256:" + hashlib.sha256(self.manifests[key][0]).hexdigest(),
                   **self._extra_headers(), **fault.headers}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(body))
            return web.Response(status=200, headers=headers, content_type=media_type)
        if fault.cut_after is not None:
            resp = web.StreamResponse(status=200, headers={**headers, "Content-Type": media_type})
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[:fault.cut_after])
            assert request.transport is not None
            request.transport.close()
            return resp
        return web.Response(status=200, body=body, headers=headers, content_type=media_type)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        denied = self._authorized(request)
        if denied is not None:
            return denied
        fault = self.faults["blob"].popleft() if self.faults["blob"] else Fault()
        if fault.status:
            return self._error(fault)
        if fault.redirect:
            # as sent, unchecked: a hostile registry's Location need not be a valid URL
            return web.Response(status=307, headers={
                "Location": f"{fault.redirect}/storage/{request.match_info['digest']}"})
        return await self._send_blob(request, request.match_info["digest"], fault)

    async def _storage(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        fault = self.faults["blob"].popleft() if self.faults["blob"] else Fault()
        if fault.status:
            return self._error(fault)
        return await self._send_blob(request, request.match_info["digest"], fault)

    async def _send_blob(self, request: web.Request, digest: str, fault: Fault) -> web.StreamResponse:
        data = self.blobs.get(digest)
        if data is None:
            body = json.dumps({"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]})
            return web.Response(status=404, text=body, content_type="application/json")
        if fault.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        status, start, end = 200, 0, len(data)
        range_value = request.headers.get("Range")
        if range_value and not fault.ignore_range:
            first, _, last = range_value.removeprefix("bytes=").partition("-")
            start = int(first)
            end = int(last) + 1 if last else len(data)
            status = 206
        resp = web.StreamResponse(status=status, headers=self._extra_headers())
        resp.content_length = end - start
        if status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.blob_delay:
                await asyncio.sleep(self.blob_delay)
            await resp.prepare(request)
            if request.method == "HEAD":
                return resp
            payload = data[start:end]
            if fault.cut_after is not None:
                await resp.write(payload[:fault.cut_after])
                assert request.transport is not None
                request.transport.close()  # the connection drops mid-body
                return resp
            for i in range(0, len(payload), 256 * 1024):
                await resp.write(payload[i:i + 256 * 1024])
            await resp.write_eof()
            return resp
        finally:
            self.in_flight -= 1


class Clock:
    """A monotonic clock a test moves by hand (token expiry, mirror cooldowns)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps(list[float]):
    """Records the client's backoff sleeps instead of sleeping (no slow tests)."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)
        await asyncio.sleep(0)


def one_layer_manifest(blob: bytes) -> bytes:
    """An OCI manifest of config ``{}`` and ``blob`` as its one gzip layer."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": str(Digest.of(b"{}")), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": str(Digest.of(blob)), "size": len(blob)}],
    }).encode()
