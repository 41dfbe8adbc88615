"""A TCP proxy that counts the bytes a registry serves and can emulate a WAN link.

Every benchmark request goes through one of these, so "bytes served by the registry" is
measured the same way for fetchd and for the seed pipeline: the bytes that flowed from the
upstream to the clients (HTTP headers included).

WAN emulation (``rate`` and ``delay`` set), per TCP connection:

- a token bucket caps the upstream -> client direction at ``rate`` bytes/s (burst ``burst``);
- each response's first byte is held until ``delay`` seconds after the request that asked for
  it reached the proxy (a request = client bytes arriving while no request was pending).

That is a fair model of a far registry for HTTP/1.1 clients (which never pipeline): every
request pays one round trip, every connection is limited on its own, and more connections
buy more bandwidth, as on a real WAN with per-flow limits.

Invariant: ``stats()`` counts only bytes already written to a client transport.

Run alone: ``python -m bench.wanproxy UPSTREAM_HOST:PORT [--rate MBps] [--delay ms]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

MB = 1_000_000
CHUNK = 64 * 1024  # small enough that the token bucket sleeps are smooth at 30 MB/s


@dataclass(frozen=True)
class ProxyStats:
    bytes_down: int   # upstream -> clients (what the registry served)
    bytes_up: int     # clients -> upstream (requests)
    connections: int  # TCP connections accepted


class _Bucket:
    """Token bucket: ``take(n)`` sleeps just long enough to keep the long-run rate."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class WanProxy:
    """Listens on ``127.0.0.1:<port>`` and forwards every connection to ``upstream``.

    ``rate=None`` and ``delay=0`` make it a plain counting proxy (loopback speed).
    Use ``start()``/``stop()`` (a background thread with its own event loop) or ``serve()``
    inside a running loop.
    """

    def __init__(self, upstream: str, *, rate: float | None = None, delay: float = 0.0,
                 burst: int = 256 * 1024, listen_host: str = "127.0.0.1",
                 log_requests: bool = False) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream_host, self.upstream_port = host, int(port)
        self.rate, self.delay, self.burst = rate, delay, burst
        self.listen_host = listen_host
        self.log_requests = log_requests
        self.requests: list[tuple[float, int, str]] = []  # (monotonic, connection, request line)
        self.port = 0
        self._down = self._up = self._conns = 0
        self._lock = threading.Lock()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: use it as the registry host in image references."""
        return f"{self.listen_host}:{self.port}"

    @property
    def wan(self) -> bool:
        return self.rate is not None or self.delay > 0

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(self._down, self._up, self._conns)

    def reset(self) -> ProxyStats:
        """Return the counters and set them to zero (between measured steps)."""
        with self._lock:
            s = ProxyStats(self._down, self._up, self._conns)
            self._down = self._up = self._conns = 0
            return s

    # ------------------------------------------------------------------ asyncio side

    async def serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.port,
                                                  limit=4 * CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._conns += 1
            conn_id = self._conns
        try:
            ureader, uwriter = await asyncio.open_connection(self.upstream_host, self.upstream_port,
                                                             limit=4 * CHUNK)
        except OSError:
            cwriter.close()
            self._tasks.discard(task)
            return
        # Pending request time: set by the client->upstream pump, consumed by the other one.
        state: dict[str, float | None] = {"request_at": None}
        up = asyncio.ensure_future(self._pump_up(creader, uwriter, state, conn_id))
        down = asyncio.ensure_future(self._pump_down(ureader, cwriter, state))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            for w in (cwriter, uwriter):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            self._tasks.discard(task)

    async def _pump_up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       state: dict[str, float | None], conn_id: int = 0) -> None:
        while data := await reader.read(CHUNK):
            if state["request_at"] is None:
                now = state["request_at"] = time.monotonic()
                if self.log_requests:  # diagnostics: which requests, in what order
                    line = data.split(b"\r\n", 1)[0].decode("latin-1")[:200]
                    with self._lock:
                        self.requests.append((now, conn_id, line))
            writer.write(data)
            with self._lock:
                self._up += len(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await asyncio.sleep(3600)  # half-close: keep relaying the response until it ends

    async def _pump_down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         state: dict[str, float | None]) -> None:
        bucket = _Bucket(self.rate, self.burst) if self.rate else None
        while data := await reader.read(CHUNK):
            asked = state["request_at"]
            if asked is not None:
                state["request_at"] = None
                wait = asked + self.delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            if bucket is not None:
                await bucket.take(len(data))
            writer.write(data)
            with self._lock:
                self._down += len(data)
            await writer.drain()

    # ------------------------------------------------------------------ thread side

    def start(self) -> WanProxy:
        """Serve from a daemon thread; returns when the port is bound."""
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.serve())
            except BaseException as e:  # report bind errors to the caller
                error.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"wanproxy->{self.upstream_port}",
                                        daemon=True)
        self._thread.start()
        ready.wait(10)
        if error:
            raise error[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    def __enter__(self) -> WanProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("upstream", help="HOST:PORT to forward to")
    p.add_argument("--rate", type=float, default=30.0, help="MB/s per connection (0: no cap)")
    p.add_argument("--delay", type=float, default=40.0, help="ms before each response")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    proxy = WanProxy(a.upstream, rate=a.rate * MB if a.rate else None, delay=a.delay / 1000)
    proxy.port = a.port

    async def run() -> None:
        await proxy.serve()
        print(f"listening on {proxy.host} -> {a.upstream}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
