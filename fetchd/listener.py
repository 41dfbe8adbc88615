"""The daemon's accept loop: connection caps per uid and in total, a reserve for status.

aiohttp's own site (``loop.create_server``) accepts whatever arrives until the process runs
out of file descriptors, and asyncio then logs a traceback per failed accept. ``LimitedSite``
accepts itself, so that:

- at most ``max_connections`` connections are open for ordinary use, at most
  ``max_connections_per_uid`` of them for one peer uid (SO_PEERCRED at accept time), and the
  total is kept ``FD_RESERVE`` below the process's descriptor limit (jobs need files too);
- ``reserved`` more connections are admitted beyond those caps (at most ``RESERVED_PER_UID``
  per uid) for the read-only status endpoints only (``RESERVE_PATHS``): ``fetchd status``
  and health checks still answer while the daemon is full (a reserve connection is closed
  after ``RESERVE_LIFETIME`` seconds, so idle ones cannot keep it);
- a connection over every cap gets a short HTTP 503 (``too-many-connections``) and is closed;
- running out of descriptors (EMFILE and friends) is logged once per ``log_interval`` with a
  count, never per failed accept, and accepting pauses briefly instead of spinning.

Invariant: ``open`` counts exactly the connections accepted and not yet lost (the handler's
``connection_lost`` releases them).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("fetchd.listener")

FD_RESERVE_MIN = 64  # descriptors kept free of connections: store, index, registry sockets
RESERVED_PER_UID = 2
RESERVE_LIFETIME = 10.0  # seconds a reserve connection stays open, so idle ones cannot hog it
RESERVE_PATHS = frozenset({"/v1/status", "/v1/health", "/metrics"})
ACCEPT_PAUSE = 0.25  # seconds without accepting after the process ran out of descriptors
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# The listening socket itself is unusable (shut down or closed under us, e.g. by another holder
# of a socket-activated listener): every accept fails at once until it is fixed from outside.
_LISTENER_BROKEN = (errno.EINVAL, errno.EBADF, errno.ENOTSOCK)


@dataclass(frozen=True)
class ConnectionCaps:
    max_connections: int = 1024
    max_connections_per_uid: int = 128
    reserved: int = 16
    log_interval: float = 60.0


def fd_limit() -> int:
    """The soft limit on open descriptors, raised to the hard limit first (up to 65536)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else 65536, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return 65536 if soft == resource.RLIM_INFINITY else soft


def peer_uid(sock: socket.socket) -> int | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    uid: int = struct.unpack("3i", raw)[1]
    return uid


class _Handler(RequestHandler):
    """aiohttp's handler, telling the site when its connection is gone."""

    __slots__ = ("on_lost",)
    on_lost: Callable[[], None]

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self.on_lost()


class LimitedSite(web.BaseSite):
    """An aiohttp site on a listening Unix socket with the caps of the module docstring."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, caps: ConnectionCaps) -> None:
        super().__init__(runner)
        self._sock = sock
        self.caps = caps
        limit = fd_limit()
        self.fd_limit = limit
        # Connections take at most what the descriptor limit leaves after the reserve.
        room = max(8, limit - max(FD_RESERVE_MIN, limit // 4) - caps.reserved)
        self.max_connections = min(caps.max_connections, room)
        self.open = 0
        self.open_reserve = 0
        self.by_uid: dict[int | None, int] = {}
        self.reserve_by_uid: dict[int | None, int] = {}
        self.reserve_transports: set[asyncio.BaseTransport] = set()
        self.refused = 0
        self.out_of_fds = 0
        self._logged: dict[str, tuple[float, int]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"http://unix:{self._sock.getsockname()}:"

    async def start(self) -> None:
        await super().start()
        self._sock.listen(self._backlog)  # as loop.create_server would (a bound socket may not be listening yet)
        self._sock.setblocking(False)
        self._task = asyncio.create_task(self._accept_loop(), name="fetchd accept")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await super().stop()

    def stats(self) -> dict[str, Any]:
        return {"open": self.open, "open_reserve": self.open_reserve,
                "max": self.max_connections, "max_per_uid": self.caps.max_connections_per_uid,
                "reserved": self.caps.reserved, "fd_limit": self.fd_limit,
                "refused": self.refused, "out_of_fds": self.out_of_fds}

    def is_reserve(self, transport: asyncio.BaseTransport | None) -> bool:
        return transport is not None and transport in self.reserve_transports

    # -- accepting --------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:
                if e.errno in _OUT_OF_FDS:
                    self.out_of_fds += 1
                    self._log_once("fds", "cannot accept connections: %s (fd limit %d, %d open "
                                   "connections); new clients wait in the backlog",
                                   e.strerror, self.fd_limit, self.open + self.open_reserve)
                    await asyncio.sleep(ACCEPT_PAUSE)
                elif e.errno in _LISTENER_BROKEN:
                    self._log_once("listener", "the listening socket accepts nothing: %s; "
                                   "restart fetchd (or its socket unit)", e.strerror)
                    await asyncio.sleep(ACCEPT_PAUSE)
                else:
                    self._log_once("accept", "accept failed: %s", e.strerror)
                    # A failed accept completes without suspending: yield, or a persistent
                    # error would hold the event loop (signals, jobs, shutdown) forever.
                    await asyncio.sleep(0)
                continue
            try:
                await self._admit(loop, conn)
            except OSError as e:  # the peer went away, or no descriptor for the transport
                conn.close()
                self._log_once("admit", "could not set up a connection: %s", e.strerror)

    async def _admit(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if self.open < self.max_connections and \
                self.by_uid.get(uid, 0) < self.caps.max_connections_per_uid:
            reserve = False
        elif self.open_reserve < self.caps.reserved and \
                self.reserve_by_uid.get(uid, 0) < RESERVED_PER_UID:
            reserve = True
        else:
            self._refuse(conn, uid)
            return
        counts = self.reserve_by_uid if reserve else self.by_uid
        counts[uid] = counts.get(uid, 0) + 1
        if reserve:
            self.open_reserve += 1
        else:
            self.open += 1
        conn.setblocking(False)
        server = self._runner.server
        assert server is not None
        transport: list[asyncio.BaseTransport] = []

        def lost() -> None:
            left = counts.get(uid, 1) - 1
            if left:
                counts[uid] = left
            else:
                counts.pop(uid, None)
            if reserve:
                self.open_reserve -= 1
                self.reserve_transports.difference_update(transport)
            else:
                self.open -= 1

        def factory() -> _Handler:
            handler = _Handler(server, loop=loop, **getattr(server, "_kwargs", {}))
            handler.on_lost = lost
            return handler

        try:
            made, _ = await loop.connect_accepted_socket(factory, conn)
        except BaseException:
            lost()
            raise
        transport.append(made)
        if reserve:
            self.reserve_transports.add(made)
            # One status request takes milliseconds: a reserve connection is not for keeping.
            loop.call_later(RESERVE_LIFETIME, made.close)

    def _refuse(self, conn: socket.socket, uid: int | None) -> None:
        self.refused += 1
        over_uid = self.by_uid.get(uid, 0) >= self.caps.max_connections_per_uid
        message = (f"too many connections from uid {uid} (server.max_connections_per_uid = "
                   f"{self.caps.max_connections_per_uid}); close idle ones or wait"
                   if over_uid else
                   f"fetchd is at its connection limit ({self.max_connections}, "
                   "server.max_connections); retry shortly")
        self._log_once("refused", "refused a connection: %s", message)
        body = json.dumps({"code": "too-many-connections", "message": message}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            conn.setblocking(False)
            conn.send(head + body)  # best effort: a few hundred bytes fit any socket buffer
        except OSError:
            pass
        conn.close()

    def _log_once(self, key: str, fmt: str, *args: Any) -> None:
        """Log ``fmt`` at most once per ``log_interval`` per ``key``, with the count since."""
        now = time.monotonic()
        last, count = self._logged.get(key, (-1e9, 0))
        if now - last < self.caps.log_interval:
            self._logged[key] = (last, count + 1)
            return
        suffix = f" ({count} more like this in the last {self.caps.log_interval:.0f} s)" if count else ""
        log.warning(fmt + suffix, *args)
        self._logged[key] = (now, 0)
