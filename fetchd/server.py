"""The daemon: an aiohttp application on a Unix socket. Wiring only.

Handlers validate the request strictly, turn it into plain values and call ``pull``,
``deliver`` or the store; they hold no protocol or file logic. Errors are translated in one
place, the error middleware: ``FetchdError`` -> its ``http_status`` with ``{"code",
"message"}``; anything unexpected -> 500 with a message, logged, and the daemon keeps serving.

``/v1/fetch`` answers with NDJSON: progress events while the job runs (a heartbeat every few
seconds when nothing else happens), then exactly one final line, ``{"result": {...}}`` or
``{"error": {"code", "message"}}``. The HTTP status is 200 once the stream has started;
anything refused before the job starts gets a 4xx JSON answer instead. docs/API.md is the
reference for clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import grp
import inspect
import json
import logging
import math
import os
import platform as host_platform
import signal
import socket
import stat
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from . import __version__, sdnotify
from .config import Config, permission_warnings
from .deliver import CLIENT_COPY, Peer, check_destination, check_path, deliver
from .digest import Digest
from .errors import (
    BlobUnknown,
    ConfigError,
    FetchdError,
    InvalidPlatform,
    InvalidRequest,
    Overloaded,
    PermissionRefused,
)
from .fleet_cache import COUNTERS as FLEET_COUNTER_KEYS
from .listener import RESERVE_PATHS, ConnectionCaps, LimitedSite
from .loop_lag import LoopLag
from .platform import Platform
from .pull import FetchRequest, FetchResult, Job
from .reference import Reference
from .registry_http import COUNTERS

log = logging.getLogger("fetchd.server")

API = "/v1"
MAX_BODY = 64 * 1024  # every request body is a small JSON object
HEARTBEAT = 5.0  # seconds of silence on a fetch stream before a heartbeat line
HEARTBEAT_EVENT: dict[str, Any] = {"event": "heartbeat"}
STREAM_BACKLOG = 256  # events queued for one slow client before the job summarizes for it
# Seconds the handlers get, once the jobs ended or were parked, to send their final lines.
SHUTDOWN_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0  # seconds to send a (small) request body: a stalled client is cut off
KEEPALIVE_TIMEOUT = 60.0  # seconds an idle keep-alive connection is kept (aiohttp: an hour)
LINGERING_TIME = 2.0  # seconds spent draining a body the handler did not read (aiohttp: 10)


class PullerLike(Protocol):
    def submit(self, request: FetchRequest) -> Job: ...
    async def resolve(self, reference: Reference, offline: bool = False,
                      max_age: float | None = None) -> dict[str, Any]: ...
    def jobs(self) -> list[dict[str, Any]]: ...
    def stop_taking(self) -> None: ...
    async def close(self, grace: float = ...) -> None: ...
    def fleet_stats(self) -> dict[str, Any] | None: ...


class StoreLike(Protocol):
    def has(self, digest: Digest) -> bool: ...
    def blob_path(self, digest: Digest) -> Path: ...
    def alease(self, digests: Any, reason: str = ...) -> contextlib.AbstractAsyncContextManager[Any]: ...
    def usage(self) -> Any: ...
    def list_images(self) -> Any: ...
    def blob_info(self, digest: Digest) -> Any: ...
    def flush_uses(self) -> None: ...
    def gc(self, *args: Any, **kwargs: Any) -> Any: ...
    def verify(self, *args: Any, **kwargs: Any) -> Any: ...


class RegistryLike(Protocol):
    def stats(self) -> Any: ...


@dataclasses.dataclass
class Services:
    """What the handlers route to; the daemon owns and closes them."""

    puller: PullerLike
    store: StoreLike
    registry: RegistryLike
    config: Config
    socket_path: str = ""
    admin_gid: int | None = None          # server.admin_group, resolved once at start
    started: float = dataclasses.field(default_factory=time.time)
    requests: Counter[tuple[str, int]] = dataclasses.field(default_factory=Counter)
    # the event loop's own lateness; sampling runs while the app runs (make_app)
    loop_lag: LoopLag = dataclasses.field(default_factory=LoopLag)
    site: LimitedSite | None = None       # the accept loop's connection caps (serve)


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)

# -- request validation -------------------------------------------------------------------------

# field -> (accepted type, required)
Schema = Mapping[str, tuple[type, bool]]
FETCH_SCHEMA: Schema = {
    "reference": (str, True), "platform": (str, False), "arch": (str, False),
    "level": (int, False), "repo_tag": (str, False), "dest": (str, False), "offline": (bool, False),
    "digest": (str, False),
}
RESOLVE_SCHEMA: Schema = {"reference": (str, True), "offline": (bool, False), "max_age": (int, False)}
DELIVER_SCHEMA: Schema = {"archive_digest": (str, True), "dest": (str, True)}
GC_SCHEMA: Schema = {"max_size": (int, False)}
VERIFY_SCHEMA: Schema = {}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


async def read_body(request: web.Request, schema: Schema) -> dict[str, Any]:
    """The request's JSON object, checked against ``schema`` (no unknown fields, exact types)."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None
    if not raw.strip():
        obj: Any = {}
    else:
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequest(f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise InvalidRequest("request body is JSON nested too deeply: send a flat object "
                                 "of the documented fields (docs/API.md)") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("request body must be a JSON object")
    unknown = sorted(set(obj) - set(schema))
    if unknown:
        allowed = ", ".join(sorted(schema)) or "none"
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}; allowed: {allowed}")
    out: dict[str, Any] = {}
    for name, (kind, required) in schema.items():
        value = obj.get(name)
        if value is None:
            if required:
                raise InvalidRequest(f"field {name!r} is required")
            continue
        # bool is an int in Python; JSON true is never a number here.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidRequest(f"field {name!r} must be {_TYPE_NAMES[kind]}")
        out[name] = value
    return out


def request_platform(body: Mapping[str, Any]) -> Platform:
    """``platform`` (os/arch[/variant] or a Debian arch) or ``arch`` (Debian); default: this host."""
    if "platform" in body and "arch" in body:
        raise InvalidRequest("give either 'platform' or 'arch', not both")
    if "arch" in body:
        return Platform.from_debian(body["arch"])
    if "platform" in body:
        return Platform.from_user(body["platform"])
    return host_default_platform()


def host_default_platform() -> Platform:
    try:
        return Platform.parse("linux/" + host_platform.machine())
    except InvalidPlatform:
        return Platform("linux", "amd64")


def peer_uid(request: web.Request) -> int | None:
    """The client's uid (SO_PEERCRED), None when it cannot be known (not a Unix socket)."""
    try:
        return peer_of(request).uid
    except PermissionRefused:
        return None


def peer_of(request: web.Request) -> Peer:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        raise PermissionRefused("cannot identify the client: deliveries are served on the Unix socket only")
    try:
        return Peer.of_socket(sock)
    except OSError as e:
        raise PermissionRefused(f"cannot identify the client (SO_PEERCRED: {e.strerror})") from e


# -- handlers -----------------------------------------------------------------------------------


async def handle_fetch(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    body = await read_body(request, FETCH_SCHEMA)
    reference = pinned(Reference.parse(body["reference"]), body.get("digest"))
    fetch_request = FetchRequest(
        reference=reference,
        platform=request_platform(body),
        level=body.get("level", 3),
        repo_tag=body.get("repo_tag"),
        offline=body.get("offline", False),
        uid=peer_uid(request),
    )
    _ = fetch_request.key  # normalizes repo_tag: a malformed one is a 400 before any work
    if "dest" not in body and services.config.registry(reference.registry).private:
        raise InvalidRequest(
            f"{reference.registry} is configured private: its images are handed back only as "
            "your own copy, so give a destination ('dest'; fetchd pull -o FILE)")
    dest, peer = None, None
    if "dest" in body:
        peer = peer_of(request)
        dest = await asyncio.to_thread(check_destination, body["dest"], peer)
    job = services.puller.submit(fetch_request)
    cap = services.config.server.max_waiters_per_job
    if job.clients >= cap:
        raise Overloaded(f"{cap} clients already wait for {reference} (server.max_waiters_per_job); "
                         "retry when that job is done")
    log.info("fetch %s %s level %d%s", reference, fetch_request.platform, fetch_request.level,
             f" for pid {peer.pid} uid {peer.uid}" if peer else "")
    job.clients += 1
    try:
        return await _stream_job(request, services, job, reference, dest, peer)
    finally:
        job.clients -= 1


async def _stream_job(request: web.Request, services: Services, job: Job, reference: Reference,
                      dest: Path | None, peer: Peer | None) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    try:
        # Events are written in batches (all that are ready at once), and the last batch goes
        # out with the final line: a warm request is answered in one write.
        tail = b""
        async with contextlib.aclosing(event_batches(job.events(), HEARTBEAT)) as batches:
            async for batch, ended in batches:
                data = b"".join(_line(event) for event in batch)
                if ended:
                    tail = data
                elif data:
                    await response.write(data)
        try:
            result = await job.wait()
            final = {"result": await _hand_back(services, result, dest, peer)}
        except FetchdError as e:
            final = {"error": e.to_json()}
        except Exception as e:  # the stream has started: report on it, never a half answer
            log.exception("fetch %s failed unexpectedly", reference)
            final = {"error": {"code": "internal", "message": f"internal error: {e!r}; see the daemon log"}}
        await response.write_eof(tail + _line(final))
    except ConnectionError:
        # The client went away. The job goes on for the others (the Puller owns it).
        log.info("client of fetch %s disconnected", reference)
    return response


def pinned(reference: Reference, digest: str | None) -> Reference:
    """``reference`` pinned to ``digest`` (the ``resolved`` event of an earlier submission of
    the same request); its name and tag stay, so the archive's name:tag is the same."""
    if digest is None:
        return reference
    wanted = Digest.parse(digest)
    if reference.digest is not None and reference.digest != wanted:
        raise InvalidRequest(f"the reference pins {reference.digest} but 'digest' says {wanted}: "
                             "give one digest")
    return reference.with_digest(wanted)


async def _hand_back(
    services: Services, result: FetchResult, dest: Path | None, peer: Peer | None
) -> dict[str, Any]:
    out = result.to_json()
    if dest is None or peer is None:
        out.update(path=str(result.archive_path), delivery="store")
        return out
    delivery = await _deliver(services, Digest.parse(result.archive_digest), result.archive_path, dest,
                              peer, private=result.private)
    out.update(delivery)
    return out


async def _deliver(
    services: Services, digest: Digest, source: Path, dest: Path | str, peer: Peer,
    private: bool = False,
) -> dict[str, str]:
    """Hand ``source`` back; a private archive only as the peer's own 0600 copy, made by the
    daemon (never a shared hard link, never a store path for the client to read)."""
    # The lease keeps gc away from the archive between the check and the link.
    async with services.store.alease([digest], f"deliver {dest}"):
        if private:
            delivery = await asyncio.to_thread(deliver, source, str(dest), peer, link=False,
                                               copy_mode=0o600)
        else:
            delivery = await asyncio.to_thread(deliver, source, str(dest), peer)
    if private and delivery.mode == CLIENT_COPY:
        raise PermissionRefused(
            f"refusing to hand back {dest}: the image is private (its registry is configured "
            "private), so the daemon must write your copy itself, and it cannot write there "
            "for you; give a destination in a directory you own")
    log.info("delivered %s to %s (%s) for uid %d", digest, delivery.path, delivery.mode, peer.uid)
    return delivery.to_json()


_END: dict[str, Any] = {}


async def event_batches(
    events: AsyncIterator[dict[str, Any]], interval: float
) -> AsyncGenerator[tuple[list[dict[str, Any]], bool], None]:
    """Group ``events`` into batches of what is ready at once; ``(batch, True)`` comes last.

    After ``interval`` seconds without an event, a batch of one ``{"event": "heartbeat"}`` is
    yielded, so that clients (and proxies) see the stream is alive. One pump task per stream
    reads the events; the consumer never cancels the events iterator mid-step. At most
    ``STREAM_BACKLOG`` events wait for a slow client: then the pump stops reading, and the
    job (``pull.Job``) hands it a summary for what it dropped meanwhile.
    """
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(STREAM_BACKLOG)

    async def pump() -> None:
        with contextlib.suppress(Exception):
            async for event in events:
                await queue.put(event)
        await queue.put(_END)  # not when cancelled: the consumer is gone then

    def heartbeat() -> None:
        if queue.empty():
            queue.put_nowait(HEARTBEAT_EVENT)

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(pump())
    try:
        while True:
            timer = loop.call_later(interval, heartbeat)
            try:
                batch = [await queue.get()]
            finally:
                timer.cancel()
            while not queue.empty():
                batch.append(queue.get_nowait())
            ended = any(e is _END for e in batch)
            # A heartbeat that raced with real events is dropped; so is everything after the end.
            events_only = [e for e in batch if e is not _END and e is not HEARTBEAT_EVENT]
            if not events_only and not ended:
                events_only = [HEARTBEAT_EVENT]
            yield events_only, ended
            if ended:
                return
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def _line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def handle_resolve(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = await read_body(request, RESOLVE_SCHEMA)
    reference = Reference.parse(body["reference"])
    max_age = body.get("max_age")
    if max_age is not None and max_age < 0:
        raise InvalidRequest("field 'max_age' must be >= 0 (seconds; 0 forces a fresh lookup)")
    resolved = await services.puller.resolve(reference, offline=body.get("offline", False),
                                             max_age=max_age)
    return web.json_response(resolved)


async def handle_deliver(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = await read_body(request, DELIVER_SCHEMA)
    digest = Digest.parse(body["archive_digest"])
    peer = peer_of(request)
    dest = check_path(body["dest"])  # deliver checks the directory and the peer's rights
    if not services.store.has(digest):
        raise BlobUnknown(f"archive {digest} is not in the store (collected?): fetch the image again")
    source = services.store.blob_path(digest)
    st = source.stat()
    out = {"archive_digest": str(digest), "size": st.st_size}
    # A file others may not read is a private registry's (LayerStore.restrict).
    out.update(await _deliver(services, digest, source, dest, peer, private=not st.st_mode & 0o004))
    return web.json_response(out)


async def handle_status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    lag_window = _lag_window(request)
    return web.json_response({
        "version": __version__,
        "pid": os.getpid(),
        "uptime": round(time.time() - services.started, 3),
        "socket": services.socket_path,
        "store_path": services.config.store.path,
        "jobs": services.puller.jobs(),
        "completed": getattr(services.puller, "completed", None),
        "failed": getattr(services.puller, "failed", None),
        "store": store_usage(await _call(services.store.usage)),
        "registries": jsonable(services.registry.stats()),
        "connections": services.site.stats() if services.site is not None else None,
        "loop_lag": services.loop_lag.snapshot(last=lag_window).to_json(),
        "fleet": _fleet_stats(services),
    })


def _lag_window(request: web.Request) -> float | None:
    """``?lag_window=SECONDS``: the loop lag of only the last SECONDS (a tool measuring one
    step asks for that step's length; at most the monitor's window)."""
    raw = request.query.get("lag_window")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise InvalidRequest(f"query lag_window must be a positive number of seconds (e.g. "
                             f"lag_window=10), got {raw[:40]!r}")
    return value


async def handle_images(request: web.Request) -> web.Response:
    """The archives in the store with their size and last use, and the store's totals."""
    services = request.app[SERVICES]

    def listing() -> bytes:  # index reads and the (big) JSON encoding: in a thread
        store = services.store
        store.flush_uses()  # the batched last-use times first, so "last_used" is current
        images = [entry.to_json() for entry in store.list_images()]  # plain values already
        return json.dumps({"images": images, "store": store_usage(store.usage())}).encode()

    body = await asyncio.to_thread(listing)
    return web.Response(body=body, content_type="application/json")


def is_admin(services: Services, peer: Peer) -> bool:
    """Root, the daemon's own user, or a member of ``server.admin_group``."""
    return peer.uid in (0, os.geteuid()) or (
        services.admin_gid is not None and services.admin_gid in peer.groups)


def _require_admin(services: Services, peer: Peer, what: str) -> None:
    if not is_admin(services, peer):
        group = services.config.server.admin_group
        who = f"root, uid {os.geteuid()} (the daemon's user)" + (
            f" or members of group {group!r}" if group else "")
        raise PermissionRefused(
            f"{what} is store-wide: only {who} may run it (server.admin_group in the fetchd "
            f"config names the admin group); you are uid {peer.uid}")


def _user_gc_floor(services: Services, peer: Peer, max_size: int | None) -> None:
    """An ordinary user's gc stays within the watermark policy (docs/SECURITY.md).

    Without ``max_size`` it is the automatic gc: evict only above ``high_watermark *
    store.max_size``, down to ``low_watermark * store.max_size``. A ``max_size`` below that
    low mark (or any, when store.max_size is not set) would evict what the policy keeps:
    admins only.
    """
    if max_size is None or is_admin(services, peer):
        return
    store = services.config.store
    if store.max_size is None:
        _require_admin(services, peer, "gc with max_size (store.max_size is not set, so the "
                                       "watermark policy evicts nothing)")
        return
    floor = int(store.max_size * store.low_watermark)
    if max_size < floor:
        _require_admin(services, peer, f"gc below {floor} bytes (store.low_watermark x "
                                       "store.max_size)")


async def handle_gc(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = await read_body(request, GC_SCHEMA)
    max_size = body.get("max_size")
    if max_size is not None and max_size < 0:
        raise InvalidRequest("field 'max_size' must be at least 0")
    _user_gc_floor(services, peer_of(request), max_size)
    kwargs = {} if max_size is None else {"max_size": max_size}
    report = await _call(services.store.gc, **kwargs)
    log.info("gc: %s", _short(report))
    return web.json_response(jsonable(report))


async def handle_verify(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    await read_body(request, VERIFY_SCHEMA)
    _require_admin(services, peer_of(request), "verify (re-hashing the whole store)")
    report = await _call(services.store.verify)
    log.info("verify: %s", _short(report))
    return web.json_response(jsonable(report))


async def handle_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


REGISTRY_COUNTERS = frozenset(COUNTERS)  # registry stats that only grow: Prometheus counters
FLEET_COUNTERS = frozenset(FLEET_COUNTER_KEYS)


async def handle_metrics(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_num(value)}" for labels, value in samples)

    metric("fetchd_up", "gauge", "1 while the daemon serves", [("", 1)])
    metric("fetchd_uptime_seconds", "gauge", "seconds since the daemon started",
           [("", time.time() - services.started)])
    metric("fetchd_http_requests_total", "counter", "HTTP requests by route and status",
           [(f'{{route="{_label(route)}",status="{status}"}}', n)
            for (route, status), n in sorted(services.requests.items())])
    lag = services.loop_lag.snapshot()
    metric("fetchd_loop_lag_max_seconds", "gauge",
           f"largest event loop lag of the last {lag.window_s:g} s", [("", lag.max_s)])
    metric("fetchd_loop_lag_p99_seconds", "gauge",
           f"99th percentile of the event loop lag over the last {lag.window_s:g} s",
           [("", lag.p99_s)])
    metric("fetchd_jobs_running", "gauge", "fetch jobs running or queued",
           [("", len(services.puller.jobs()))])
    for attr in ("completed", "failed"):
        value = getattr(services.puller, attr, None)
        if isinstance(value, (int, float)):
            metric(f"fetchd_jobs_{attr}_total", "counter", f"fetch jobs {attr}", [("", value)])
    usage = store_usage(await _call(services.store.usage))
    for key, value in _numbers(usage):
        metric(f"fetchd_store_{key}", "gauge", f"store {key.replace('_', ' ')}", [("", value)])
    stats = jsonable(services.registry.stats())
    per_key: dict[str, list[tuple[str, float]]] = {}
    if isinstance(stats, dict):
        hosts = stats.get("registries", stats)
        if isinstance(hosts, dict):
            for host, counters in hosts.items():
                for key, value in _numbers(counters):
                    per_key.setdefault(key, []).append((f'{{registry="{_label(str(host))}"}}', value))
    for key, samples in sorted(per_key.items()):
        if key in REGISTRY_COUNTERS:  # cumulative: a counter, named as Prometheus wants it
            metric(f"fetchd_registry_{key}_total", "counter", f"registry {key} so far", samples)
        else:
            metric(f"fetchd_registry_{key}", "gauge", f"registry {key.replace('_', ' ')}", samples)
    fleet = _fleet_stats(services)
    if fleet is not None:
        for key, value in _numbers({k: v for k, v in fleet.items() if k != "push"}):
            if key in FLEET_COUNTERS:
                metric(f"fetchd_fleet_{key}_total", "counter", f"frame cache {key} so far",
                       [("", value)])
            else:
                metric(f"fetchd_fleet_{key}", "gauge", f"frame cache {key.replace('_', ' ')}",
                       [("", value)])
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain",
                        headers={"X-Content-Type-Options": "nosniff"}, charset="utf-8")


# -- helpers ------------------------------------------------------------------------------------


def _fleet_stats(services: Services) -> dict[str, Any] | None:
    """The fleet frame cache's counters (``FrameCache.stats``), None when none is configured."""
    stats = services.puller.fleet_stats()
    return jsonable(stats) if stats is not None else None


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a store method that may be a coroutine function or a plain (quick) function."""
    value = fn(*args, **kwargs)
    if inspect.isawaitable(value):
        value = await value
    return value


def jsonable(value: Any) -> Any:
    """Dataclasses, paths, digests and tuples as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_json = getattr(value, "to_json", None)
        if callable(to_json):
            return jsonable(to_json())
        if type(value).__str__ is not object.__str__:
            return str(value)  # values such as Digest and Reference have a canonical text
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def store_usage(usage: Any) -> Any:
    """The store's usage as a JSON object (the store gives ``(bytes, count)``)."""
    if isinstance(usage, tuple) and len(usage) == 2:
        return {"bytes": usage[0], "blobs": usage[1]}
    return jsonable(usage)


def _numbers(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            name = "".join(c if c.isalnum() else "_" for c in f"{prefix}{key}").strip("_").lower()
            if isinstance(value, bool):
                out.append((name, int(value)))
            elif isinstance(value, (int, float)):
                out.append((name, value))
            elif isinstance(value, dict):
                out.extend(_numbers(value, name + "_"))
    return out


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _short(report: Any) -> str:
    text = json.dumps(jsonable(report))
    return text if len(text) < 300 else text[:300] + "..."


_HTTP_CODES = {408: "request-timeout", 404: "not-found", 405: "method-not-allowed", 413: "request-too-large",
               415: "unsupported-media-type"}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    services = request.app[SERVICES]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "-"
    try:
        if services.site is not None and services.site.is_reserve(request.transport) \
                and request.path not in RESERVE_PATHS:
            raise Overloaded("fetchd is at its connection limit (server.max_connections, "
                             "server.max_connections_per_uid): a connection beyond it may only "
                             f"ask for {', '.join(sorted(RESERVE_PATHS))}; retry shortly")
        response = await handler(request)
    except Overloaded as e:  # not logged per request: the site logs refusals once per interval
        response = web.json_response(e.to_json(), status=e.http_status)
        response.force_close()
    except FetchdError as e:
        if e.http_status >= 500:
            log.warning("%s %s: %s: %s", request.method, request.path, e.code, e.message)
        response = web.json_response(e.to_json(), status=e.http_status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 413:
            message = f"request body too large: at most {MAX_BODY} bytes of JSON"
        elif e.status == 408:
            message = f"the request body did not arrive within {BODY_TIMEOUT:.0f}s"
        elif e.status == 404:
            message = f"no such endpoint {request.path}: see docs/API.md (paths start with {API}/)"
        elif e.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        else:
            message = e.reason
        response = web.json_response(
            {"code": _HTTP_CODES.get(e.status, "http-error"), "message": message}, status=e.status
        )
        if e.status in (408, 413):
            response.force_close()  # do not linger reading the rest of a stalled or huge body
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as e:
        log.exception("unexpected error in %s %s", request.method, request.path)
        response = web.json_response(
            {"code": "internal", "message": f"internal error in {request.path}: {e!r}; see the daemon log"},
            status=500,
        )
    services.requests[(route, response.status)] += 1
    return response


def make_app(services: Services) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[error_middleware])
    app[SERVICES] = services
    app.router.add_post(API + "/fetch", handle_fetch)
    app.router.add_post(API + "/resolve", handle_resolve)
    app.router.add_post(API + "/deliver", handle_deliver)
    app.router.add_get(API + "/status", handle_status)
    app.router.add_get(API + "/images", handle_images)
    app.router.add_post(API + "/gc", handle_gc)
    app.router.add_post(API + "/verify", handle_verify)
    app.router.add_get(API + "/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)

    async def lag_start(app: web.Application) -> None:
        services.loop_lag.start()

    async def lag_stop(app: web.Application) -> None:
        services.loop_lag.stop()

    app.on_startup.append(lag_start)
    app.on_cleanup.append(lag_stop)
    return app


# -- the listening socket -----------------------------------------------------------------------


def listen_unix(path: str, mode: int = 0o660, group: str | None = None) -> socket.socket:
    """Bind a pathname Unix socket: create the parent, remove a stale socket, refuse a live one."""
    target = Path(path)
    if not target.is_absolute():
        raise ConfigError(f"socket path {path!r} must be absolute")
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as e:
        raise ConfigError(f"cannot create the socket's directory {target.parent}: {e.strerror}; "
                          "create it or choose another --socket") from e
    gid = None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"socket group {group!r} does not exist: create it or change server.socket_group") from None
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket: remove it or choose another --socket")
        if _answers(path):
            raise FetchdError(
                f"another fetchd already answers on {path}: stop it first "
                "('systemctl stop fetchd.socket fetchd.service') or choose another --socket"
            )
        log.info("removing stale socket %s", path)
        target.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the socket file with the umask's mode: keep it closed to others until
    # the chmod/chown below (only the startup thread runs here, the umask is process-wide).
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {e.strerror}") from e
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except PermissionError:
            raise ConfigError(f"{path} exists and this user may not connect to it, so it cannot "
                              "tell whether a daemon answers there: remove it as its owner, or "
                              "choose another --socket") from None
        except OSError as e:
            return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    return True


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation), if any."""
    fds = sdnotify.listen_fds()
    if not fds:
        return None
    if len(fds) > 1:
        log.warning("systemd passed %d sockets; using fd %d only", len(fds), fds[0])
    try:
        sock = socket.socket(fileno=fds[0])
    except OSError as e:
        raise ConfigError(f"fd {fds[0]} passed by systemd is not a socket ({e.strerror}): fix fetchd.socket") from e
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ConfigError("the socket passed by systemd is not a Unix stream socket: fix fetchd.socket")
    sock.setblocking(False)
    return sock


# -- the daemon ---------------------------------------------------------------------------------


def with_overrides(config: Config, *, socket_path: str | None = None, store: str | None = None,
                   shutdown_grace: float | None = None) -> Config:
    if socket_path:
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, socket=socket_path))
    if shutdown_grace is not None:
        config = dataclasses.replace(config, server=dataclasses.replace(
            config.server, shutdown_grace=shutdown_grace))
    if store:
        config = dataclasses.replace(config, store=dataclasses.replace(config.store, path=store))
    return config


def store_settings(config: Config) -> Any:
    """The store's settings from the config: the fields both share, by name, and the tag
    cache's lifetime from [network]."""
    from .layer_store import StoreSettings

    return dataclasses.replace(StoreSettings.from_config(config.store),
                               tag_cache_ttl=config.network.tag_cache_ttl,
                               flight_stall_timeout=config.network.stall_timeout)


async def serve(config: Config, *, ready: Callable[[str], None] | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT; then stop listening and taking jobs, give the
    running jobs ``server.shutdown_grace`` seconds to finish, park the rest and return.

    Parked jobs' clients get ``shutting-down`` and submit again to the next daemon
    (``fetchd_client`` does so itself); partial downloads stay in the store's ingest area,
    so the next daemon resumes them.
    """
    from .layer_store import LayerStore
    from .pull import Puller
    from .registry_async import RegistryClient

    warn_about_config(config)
    admin_gid = resolve_group(config.server.admin_group, "server.admin_group")
    sock = inherited_socket()
    activated = sock is not None
    if sock is None:
        sock = listen_unix(config.server.socket, config.server.socket_mode, config.server.socket_group)
    socket_path = str(sock.getsockname())
    stack = contextlib.AsyncExitStack()
    async with stack:
        if not activated:
            stack.callback(_remove_socket, socket_path, os.stat(socket_path).st_ino)
        stack.callback(sock.close)
        store = LayerStore(Path(config.store.path), store_settings(config))
        stack.push_async_callback(_call, store.close)
        registry = RegistryClient(config)
        stack.push_async_callback(_call, registry.close)
        puller = Puller(store, registry, config)
        services = Services(puller, store, registry, config, socket_path=socket_path,
                            admin_gid=admin_gid,
                            loop_lag=LoopLag(interval=config.server.loop_lag_interval))
        runner = web.AppRunner(make_app(services), handle_signals=False, access_log=None,
                               shutdown_timeout=SHUTDOWN_TIMEOUT, keepalive_timeout=KEEPALIVE_TIMEOUT,
                               lingering_time=LINGERING_TIME)
        # Exit order (reverse): the jobs end or are parked first so that waiting handlers
        # answer and end, then the runner closes the connections.
        stack.push_async_callback(runner.cleanup)
        stack.push_async_callback(puller.close)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
            stack.callback(loop.remove_signal_handler, signum)
        await runner.setup()
        site = services.site = LimitedSite(runner, sock, connection_caps(config))
        await site.start()
        log.info("fetchd %s serving on %s%s, store %s", __version__, socket_path,
                 " (socket activation)" if activated else "", config.store.path)
        sdnotify.notify(f"READY=1\nSTATUS=serving on {socket_path}\nMAINPID={os.getpid()}")
        if ready is not None:
            ready(socket_path)
        await stop.wait()
        stop.clear()  # a second signal from now on ends the grace
        grace = config.server.shutdown_grace
        log.info("stopping: no new connections or jobs; running jobs get %.0f s to finish, then "
                 "are parked with their partial downloads kept", grace)
        sdnotify.notify("STOPPING=1")
        # Stop listening: new connections wait in the socket's backlog for the next daemon
        # (socket activation: systemd keeps the socket) or are refused until it binds anew.
        await site.stop()
        sock.close()
        puller.stop_taking()
        await _first(puller.close(grace), stop.wait())
        if stop.is_set():
            log.info("second signal: parking the running jobs now")
            await puller.close()
    log.info("stopped")


def connection_caps(config: Config) -> ConnectionCaps:
    server = config.server
    return ConnectionCaps(server.max_connections, server.max_connections_per_uid,
                          server.reserved_connections)


def warn_about_config(config: Config) -> None:
    """Log (at start) each way the config file is less protected than its content needs."""
    for warning in permission_warnings(config):
        log.warning("%s: others could read its secrets or change where images come from; "
                    "chown it to root or the daemon's user and chmod 0600 (0640 for its group)",
                    warning)


def resolve_group(name: str | None, key: str) -> int | None:
    """The gid of a configured group name (None: none configured); ConfigError if unknown."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"{key}: group {name!r} does not exist: create it or change {key}") from None


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of ``aws`` ends; the others are cancelled (and awaited)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _remove_socket(path: str, inode: int) -> None:
    # Only our own socket: a daemon started after us may already have bound a new one there.
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
            os.unlink(path)
