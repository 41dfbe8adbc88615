"""A counting, fault-injecting HTTP/1.1 proxy in front of a registry, on its own thread.

It relays raw HTTP/1.1 between each client connection and its own upstream connection
(keep-alive on both sides; ``Host`` passes through unchanged, so the registry's upload
``Location`` URLs point back at the proxy). Bodies are streamed in large chunks, never
parsed, so it stays fast (hundreds of MB/s) when no rule applies.

Thread model: the proxy owns an event loop in a daemon thread, so sync tests, tests that
run subprocesses (skopeo) and asyncio tests can all use it. Rules and counters are guarded
by a lock and may be changed from any thread while requests are in flight.

Faults (each rule matches a regex against the request path, optionally a method, and fires
for the first ``times`` matching requests, or always when ``times`` is None):

- ``cut(match, after_bytes)``: send ``after_bytes`` of the body, then drop the connection.
- ``corrupt(match, at_byte)``: flip one body byte (same length, wrong digest).
- ``fail(match, status=500)``: answer an error without asking the registry.
- ``rate_limit(match, retry_after=1)``: 429 TOOMANYREQUESTS with ``Retry-After``.
- ``stall(match, seconds)``: wait before the first response byte.
- ``ignore_range(match)``: drop the ``Range`` header, so the registry answers 200 + full body.
- ``every(n, status, retry_after=None)``: every ``n``-th request the proxy gets (of any path,
  counting from its start) is answered ``status`` without asking the registry.
- ``per_transfer(match, [("cut", 1 << 20), ("corrupt", 100)])``: the k-th transfer of each
  matching path (a request that reached the registry, not one answered by a status fault)
  gets the k-th fault of the list: a cut after that many body bytes, or that body byte flipped.
- ``pause_at(n, match)``: transfers to matching paths stop once ``n`` body bytes went to them,
  until ``resume()``; ``epoch`` (set by the test) is stamped on each request's record.
- ``hold(match)``: keep matching requests unanswered until ``rule.release()``; ``rule.reached``
  is set when the first one arrives (a pull held in flight while a test acts, e.g. an upgrade).
- ``set_link(rate=30e6, latency=0.04)``: every connection capped at ``rate`` bytes/s, and
  ``latency`` seconds added before each response's first byte (benchmarks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType

CHUNK = 1 << 20
_HEAD_LIMIT = 1 << 20


@dataclass
class Rule:
    """One fault. ``kind`` is cut | corrupt | status | stall | ignore_range | hold.

    ``after_bytes`` is the body offset where a cut happens or the byte a corrupt flips.
    """

    kind: str
    match: str = ""
    method: str | None = None
    times: int | None = 1
    after_bytes: int = 0
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0
    every: int | None = None                         # kind "status": every n-th request
    sequence: tuple[tuple[str, int], ...] = ()      # kind "sequence": faults by transfer
    fired: int = 0
    reached: threading.Event = field(default_factory=threading.Event, repr=False)
    _rx: re.Pattern[str] = field(init=False, repr=False)
    _released: concurrent.futures.Future[None] = field(
        default_factory=concurrent.futures.Future, init=False, repr=False)

    def __post_init__(self) -> None:
        self._rx = re.compile(self.match)

    def release(self) -> None:
        """A ``hold`` rule: let the requests it keeps, and every later one, through."""
        if not self._released.done():
            self._released.set_result(None)

    def applies(self, method: str, path: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        return self._rx.search(path) is not None


@dataclass(frozen=True)
class Record:
    """One request as the proxy saw and answered it."""

    method: str
    path: str
    status: int
    bytes_sent: int
    range: str | None
    faults: tuple[str, ...]
    complete: bool
    epoch: int = 0  # the proxy's ``epoch`` when the request arrived (a test's phase)


@dataclass
class PathStats:
    requests: int = 0
    bytes_sent: int = 0


class _Tx:
    """The request being answered; recorded exactly once, *before* the client can see its end.

    Recording before the last byte is handed to the socket means a client that has read a
    whole response always finds it in the counters.
    """

    def __init__(self, proxy: RegistryProxy, method: str, path: str, rng: str | None,
                 faults: tuple[str, ...]) -> None:
        self.proxy, self.method, self.path, self.rng, self.faults = proxy, method, path, rng, faults
        self.status = 0
        self.sent = 0
        self.corrupt_at: int | None = None
        self.done = False
        self.epoch = proxy.epoch

    def finish(self, complete: bool) -> None:
        if not self.done:
            self.done = True
            self.proxy._record(Record(self.method, self.path, self.status, self.sent, self.rng,
                                      self.faults, complete, self.epoch))


class _Closed(Exception):
    """A peer closed the connection."""


async def _new_event() -> asyncio.Event:
    return asyncio.Event()


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _build_head(first: str, headers: list[tuple[str, str]]) -> bytes:
    return (first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")


class _NotHttp(Exception):
    """The client opened with a TLS handshake (Go clients try https first on insecure registries)."""


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        # The first byte alone: a TLS ClientHello (0x16) never contains the blank line that
        # ends an HTTP head, so waiting for it would stall the client until its timeout.
        first = await reader.readexactly(1)
        if first == b"\x16":
            raise _NotHttp()
        return first + await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise _Closed() from e


class RegistryProxy:
    """HTTP proxy to ``upstream`` (``host:port`` or ``http://host:port``) on 127.0.0.1:<free port>.

    ``.host``/``.url`` are valid once the constructor returns; ``stop()`` closes every connection.
    """

    def __init__(self, upstream: str | object, *, host: str = "127.0.0.1", port: int = 0) -> None:
        target = getattr(upstream, "host", upstream)
        assert isinstance(target, str)
        target = target.split("://", 1)[-1].rstrip("/")
        up_host, _, up_port = target.rpartition(":")
        self.upstream = (up_host, int(up_port))
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._live: dict[str, int] = {}              # path -> body bytes sent so far (live)
        self._pause: tuple[re.Pattern[str], int, asyncio.Event] | None = None
        # A test's phase, stamped on each request's Record (e.g. which daemon asked).
        self.epoch = 0
        self._rules: list[Rule] = []
        self._requests = 0                           # every request, for ``every`` rules
        self._transfers: dict[str, int] = {}         # path -> transfers, for ``per_transfer``
        self._log: list[Record] = []
        self._rate: float | None = None
        self._latency = 0.0
        self._conns: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="registry-proxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(host, port), self._loop).result(10)
        sock = self._server.sockets[0].getsockname()
        self.host = f"{sock[0]}:{sock[1]}"
        self.url = f"http://{self.host}"

    async def _start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._serve, host, port, limit=_HEAD_LIMIT)

    # ------------------------------------------------------------------ rules (any thread)

    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def cut(self, match: str, after_bytes: int, times: int | None = 1, method: str | None = "GET") -> Rule:
        return self.add_rule(Rule("cut", match, method, times, after_bytes=after_bytes))

    def corrupt(self, match: str, at_byte: int = 0, times: int | None = 1,
                method: str | None = "GET") -> Rule:
        """Flip the body byte at offset ``at_byte`` (size unchanged: only the digest is wrong)."""
        return self.add_rule(Rule("corrupt", match, method, times, after_bytes=at_byte))

    def fail(self, match: str, status: int = 500, times: int | None = 1, method: str | None = None) -> Rule:
        return self.add_rule(Rule("status", match, method, times, status=status))

    def rate_limit(self, match: str, retry_after: float | str | None = 1, times: int | None = 1,
                   method: str | None = None) -> Rule:
        ra = None if retry_after is None else (
            retry_after if isinstance(retry_after, str) else f"{retry_after:g}")
        return self.add_rule(Rule("status", match, method, times, status=429, retry_after=ra))

    def stall(self, match: str, seconds: float, times: int | None = 1, method: str | None = None) -> Rule:
        return self.add_rule(Rule("stall", match, method, times, seconds=seconds))

    def hold(self, match: str, times: int | None = None, method: str | None = "GET") -> Rule:
        return self.add_rule(Rule("hold", match, method, times))

    def ignore_range(self, match: str = "/blobs/", times: int | None = None) -> Rule:
        return self.add_rule(Rule("ignore_range", match, None, times))

    def every(self, n: int, status: int, retry_after: float | str | None = None,
              match: str = "") -> Rule:
        """Answer every ``n``-th request (all paths count) with ``status``."""
        ra = None if retry_after is None else (
            retry_after if isinstance(retry_after, str) else f"{retry_after:g}")
        return self.add_rule(Rule("status", match, None, None, status=status, retry_after=ra,
                                  every=n))

    def per_transfer(self, match: str, faults: list[tuple[str, int]],
                     method: str | None = "GET") -> Rule:
        """The k-th transfer of each path matching ``match`` gets ``faults[k]`` (``("cut",
        after_bytes)`` or ``("corrupt", at_byte)``); later transfers go through untouched."""
        assert all(kind in ("cut", "corrupt") for kind, _ in faults)
        return self.add_rule(Rule("sequence", match, method, None, sequence=tuple(faults)))

    def set_link(self, rate: float | None = None, latency: float = 0.0) -> None:
        """Cap each connection at ``rate`` bytes/s (None: no cap); delay each first byte."""
        with self._lock:
            self._rate, self._latency = rate, latency

    def reset_rules(self) -> None:
        """Remove every fault rule and the link shaping."""
        with self._lock:
            self._rules.clear()
            self._transfers.clear()
            self._rate, self._latency = None, 0.0

    def reset_stats(self) -> None:
        with self._lock:
            self._log.clear()
            self._live.clear()
            self._requests = 0
            self._transfers.clear()

    def _take_rules(self, method: str, path: str) -> list[Rule]:
        """The first applicable rule of each kind fires (and uses up one of its ``times``)."""
        with self._lock:
            self._requests += 1
            hit: dict[str, Rule] = {}
            for r in self._rules:
                if r.kind in hit or r.kind == "sequence" or not r.applies(method, path):
                    continue
                if r.every is not None and self._requests % r.every:
                    continue
                r.fired += 1
                hit[r.kind] = r
            if "status" not in hit:  # the request reaches the registry: a transfer
                for r in self._rules:
                    if r.kind == "sequence" and r.applies(method, path):
                        k = self._transfers.get(path, 0)
                        self._transfers[path] = k + 1
                        if k < len(r.sequence):
                            kind, at = r.sequence[k]
                            if kind not in hit:
                                r.fired += 1
                                hit[kind] = Rule(kind, r.match, r.method, 1, after_bytes=at)
                        break
            return list(hit.values())

    # ------------------------------------------------------------------ counters (any thread)

    @property
    def log(self) -> list[Record]:
        with self._lock:
            return list(self._log)

    def stats(self) -> dict[str, PathStats]:
        """Per request path (no query): requests answered and response body bytes sent."""
        out: dict[str, PathStats] = {}
        for rec in self.log:
            s = out.setdefault(rec.path, PathStats())
            s.requests += 1
            s.bytes_sent += rec.bytes_sent
        return out

    def _select(self, match: str, method: str | None) -> Iterator[Record]:
        rx = re.compile(match)
        return (r for r in self.log if (method is None or r.method == method) and rx.search(r.path))

    def count(self, match: str = "", method: str | None = None) -> int:
        """Requests whose path matches the regex ``match`` (e.g. a digest), optionally by method."""
        return sum(1 for _ in self._select(match, method))

    def bytes_sent(self, match: str = "", method: str | None = None) -> int:
        return sum(r.bytes_sent for r in self._select(match, method))

    def blob_gets(self, digest: object) -> int:
        return self.count(f"/blobs/{digest}$", "GET")

    def sent_live(self, match: str = "") -> int:
        """Body bytes sent so far to paths matching ``match``, transfers in progress included."""
        rx = re.compile(match)
        with self._lock:
            return sum(n for path, n in self._live.items() if rx.search(path))

    def wait_sent(self, n: int, match: str = "",
                  give_up: Callable[[], str | None] = lambda: None) -> int:
        """Block until at least ``n`` body bytes went to paths matching ``match`` (transfers
        in progress included); returns the count. A test's trigger on the transfer's own
        progress, never a sleep. ``give_up`` is asked every second: a message it returns
        (e.g. "the daemon exited") is raised as ``RuntimeError`` instead of waiting on."""
        rx = re.compile(match)

        def sent() -> int:
            return sum(v for path, v in self._live.items() if rx.search(path))

        with self._progress:
            while not self._progress.wait_for(lambda: sent() >= n, 1.0):
                reason = give_up()
                if reason:
                    raise RuntimeError(f"only {sent()} of {n} bytes went to {match!r}: {reason}")
            return sent()

    def pause_at(self, n: int, match: str = "") -> Callable[[], None]:
        """Transfers to paths matching ``match`` stop sending (each within one chunk) once
        ``n`` body bytes went to such paths, until the returned ``resume()`` is called: a test
        acts at an exact point of the transfers, however slowly it gets scheduled."""
        gate = asyncio.run_coroutine_threadsafe(_new_event(), self._loop).result(10)
        with self._lock:
            self._pause = (re.compile(match), n, gate)

        def resume() -> None:
            with self._lock:
                if self._pause is not None and self._pause[2] is gate:
                    self._pause = None
            self._loop.call_soon_threadsafe(gate.set)

        return resume

    def _paused(self, path: str) -> asyncio.Event | None:
        with self._lock:
            if self._pause is None:
                return None
            rx, n, gate = self._pause
            if not rx.search(path) or sum(v for p, v in self._live.items() if rx.search(p)) < n:
                return None
            return gate

    def _sent(self, path: str, n: int) -> None:
        with self._progress:
            self._live[path] = self._live.get(path, 0) + n
            self._progress.notify_all()

    # ------------------------------------------------------------------ relay (loop thread)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                keep, up = await self._one(creader, cwriter, up)
                if not keep:
                    break
        except _NotHttp:
            # What Go's plain-HTTP server answers, so clients fall back to http:// at once.
            cwriter.write(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
        except (_Closed, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a peer went away or spoke garbage: drop this connection only
        except asyncio.CancelledError:
            pass  # stop()
        finally:
            self._conns.discard(task)
            for w in (cwriter, up[1] if up else None):
                if w is not None:
                    w.transport.abort()

    async def _one(
        self,
        creader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
    ) -> tuple[bool, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        """Answer one request. Returns (keep the client connection, upstream connection)."""
        first, headers = _parse_head(await _read_head(creader))
        method, target, _ = first.split(" ", 2)
        path = target.split("?", 1)[0]
        rules = self._take_rules(method, path)
        for rule in rules:
            if rule.kind == "hold":
                rule.reached.set()
                await asyncio.wrap_future(rule._released)
        with self._lock:
            rate, latency = self._rate, self._latency
        tx = _Tx(self, method, path, _get(headers, "Range"), tuple(r.kind for r in rules))
        if any(r.kind == "ignore_range" for r in rules):
            headers = [(k, v) for k, v in headers if k.lower() != "range"]
        client_close = (_get(headers, "Connection") or "").lower() == "close"
        delay = latency + sum(r.seconds for r in rules if r.kind == "stall")

        reply = next((r for r in rules if r.kind == "status"), None)
        if reply is not None:
            # Consume the request body so the connection stays usable.
            await self._relay_body(creader, None, headers, None, None, None)
            if delay:
                await asyncio.sleep(delay)
            await self._send_error(cwriter, reply, tx)
            return not client_close, up

        if up is None or up[0].at_eof():
            if up is not None:
                up[1].transport.abort()
            up = await asyncio.open_connection(*self.upstream, limit=_HEAD_LIMIT)
        ureader, uwriter = up
        uwriter.write(_build_head(first, headers))
        await self._relay_body(creader, uwriter, headers, None, None, None)
        await uwriter.drain()

        while True:
            rfirst, rheaders = _parse_head(await _read_head(ureader))
            tx.status = int(rfirst.split(" ", 2)[1])
            if not 100 <= tx.status < 200:
                break
            cwriter.write(_build_head(rfirst, rheaders))  # 100 Continue and friends
        if delay:
            await asyncio.sleep(delay)
        cut = next((r.after_bytes for r in rules if r.kind == "cut"), None)
        tx.corrupt_at = next((r.after_bytes for r in rules if r.kind == "corrupt"), None)
        has_body = method != "HEAD" and tx.status not in (204, 304)
        if not has_body:
            tx.finish(True)
        cwriter.write(_build_head(rfirst, rheaders))
        up_close = (_get(rheaders, "Connection") or "").lower() == "close"
        until_close = False
        if has_body:
            if _get(rheaders, "Content-Length") is None and "chunked" not in (
                    _get(rheaders, "Transfer-Encoding") or "").lower():
                until_close = up_close = True
            try:
                complete = await self._relay_body(ureader, cwriter, rheaders, rate, cut, tx)
            except BaseException:
                tx.finish(False)  # the client went away mid-body (a daemon stopped): recorded
                raise
            if not complete:
                # A cut: drop both sides; the upstream connection is mid-body and unusable.
                cwriter.transport.abort()
                uwriter.transport.abort()
                return False, None
        await cwriter.drain()
        if up_close:
            uwriter.transport.abort()
            up = None
        return not client_close and not until_close, up

    def _record(self, record: Record) -> None:
        with self._lock:
            self._log.append(record)

    async def _send_error(self, w: asyncio.StreamWriter, rule: Rule, tx: _Tx) -> None:
        code = "TOOMANYREQUESTS" if rule.status == 429 else "UNKNOWN"
        body = json.dumps({"errors": [{"code": code, "message": "fault injected by test proxy",
                                       "detail": None}]}).encode()
        headers = [("Content-Type", "application/json; charset=utf-8"),
                   ("Content-Length", str(len(body))),
                   ("Docker-Distribution-Api-Version", "registry/2.0")]
        if rule.retry_after is not None:
            headers.append(("Retry-After", rule.retry_after))
        if tx.method == "HEAD":
            body = b""  # a HEAD answer carries the length of the body it does not send
        tx.status, tx.sent = rule.status, len(body)
        tx.finish(True)
        w.write(_build_head(f"HTTP/1.1 {rule.status} Fault", headers) + body)
        await w.drain()

    async def _relay_body(self, r: asyncio.StreamReader, w: asyncio.StreamWriter | None,
                          headers: list[tuple[str, str]], rate: float | None, cut: int | None,
                          tx: _Tx | None) -> bool:
        """Relay a body framed by ``headers`` (or up to EOF). False when ``cut`` stopped it."""
        if "chunked" in (_get(headers, "Transfer-Encoding") or "").lower():
            return await self._relay_chunked(r, w, rate, cut, tx)
        length = _get(headers, "Content-Length")
        if length is None and tx is None:
            return True  # a request without a length has no body
        return await self._relay_exact(r, w, None if length is None else int(length), rate, cut,
                                       tx, last=True)

    async def _relay_exact(self, r: asyncio.StreamReader, w: asyncio.StreamWriter | None,
                           length: int | None, rate: float | None, cut: int | None,
                           tx: _Tx | None, last: bool) -> bool:
        """Copy ``length`` bytes (up to EOF when None), counting into ``tx.sent``.

        With ``last``, ``tx`` is recorded before the final bytes are written.
        """
        sent, start = 0, time.monotonic()
        step = CHUNK if rate is None else max(4096, min(CHUNK, int(rate / 50)))
        while length is None or sent < length:
            want = step if length is None else min(step, length - sent)
            if cut is not None and cut - sent < want:
                want = cut - sent
                if want <= 0:
                    if tx is not None:
                        tx.finish(False)
                    return False
            data = await r.read(want)
            if not data:
                if length is None:
                    break
                raise _Closed()
            if rate is not None:
                # Pace before writing, so no byte leaves earlier than ``rate`` allows.
                ahead = (sent + len(data)) / rate - (time.monotonic() - start)
                if ahead > 0:
                    if w is not None:
                        await w.drain()
                    await asyncio.sleep(ahead)
            if tx is not None:
                gate = self._paused(tx.path)
                if gate is not None:
                    await gate.wait()
            if w is not None and w.transport.is_closing():
                raise _Closed()  # the peer is gone: these bytes would not reach it
            sent += len(data)
            if tx is not None:
                at = tx.corrupt_at
                if at is not None and tx.sent <= at < tx.sent + len(data):
                    flipped = bytearray(data)
                    flipped[at - tx.sent] ^= 0xFF
                    data = bytes(flipped)
                tx.sent += len(data)
                self._sent(tx.path, len(data))
                if last and sent == length:
                    tx.finish(True)
            if w is not None:
                w.write(data)
                if w.transport.get_write_buffer_size() > 4 * CHUNK:
                    await w.drain()
        if tx is not None and last:
            tx.finish(True)
        return True

    async def _relay_chunked(self, r: asyncio.StreamReader, w: asyncio.StreamWriter | None,
                             rate: float | None, cut: int | None, tx: _Tx | None) -> bool:
        """Relay a chunked body with its framing; counts payload bytes only."""
        sent = 0
        while True:
            line = await r.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                trailer = b""
                while True:
                    t = await r.readuntil(b"\r\n")
                    trailer += t
                    if t == b"\r\n":
                        break
                if tx is not None:
                    tx.finish(True)
                if w is not None:
                    w.write(line + trailer)
                return True
            if w is not None:
                w.write(line)
            if not await self._relay_exact(r, w, size, rate, None if cut is None else cut - sent,
                                           tx, last=False):
                return False
            sent += size
            crlf = await r.readexactly(2)
            if w is not None:
                w.write(crlf)

    # ------------------------------------------------------------------ lifecycle

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    def stop(self) -> None:
        """Close the listener and every connection, then end the thread. Idempotent."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> RegistryProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RegistryProxy({self.url} -> {self.upstream[0]}:{self.upstream[1]})"
