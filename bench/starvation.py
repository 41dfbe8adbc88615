"""Starvation bench (issue 13): what a tarpit registry and idle connections cost other users.

One run starts Debian's docker-registry on loopback (the healthy registry), a tarpit registry
(an aiohttp app in a thread that answers every manifest request with its headers and one
byte, then holds the connection), and a real ``fetchd serve``. It measures:

- on an idle daemon: a cached pull's latency, and an uncached ~20 MB pull's time;
- with 32 requests for tarpit images sent by another user (``nobody``, through the socket:
  ``server.max_jobs_per_uid`` lets it hold 16 network slots, its other 16 requests queue):
  the same two, as ratios to idle (targets: cached under 100 ms, uncached within 1.5x);
- with 1000 idle connections of ``nobody`` open (its caps admit 128 + 2): how long another
  user's ``fetchd status`` takes to answer.

``python -m bench.starvation [--quick]`` prints a table and writes
``bench/starvation_results.json``. Figures on a loaded machine are noisy: say so when quoting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from bench import images as bimages
from bench.daemon import Daemon, FetchSpec
from tests.support import images as ti
from tests.support.as_user import _SCRIPT, NOBODY, SYSTEM_PYTHON
from tests.support.registry import LocalRegistry

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "starvation_results.json"
PLATFORM = "linux/amd64"


class Tarpit:
    """The evil registry, in a thread of its own; ``held`` counts requests it holds."""

    def __init__(self) -> None:
        self.held = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._release: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tarpit")
        self._thread.start()
        self._ready.wait(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v2/", self._ping)
        app.router.add_route("*", r"/v2/{name:.+}/manifests/{ref}", self._hold)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _hold(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        resp.content_length = 1 << 20
        await resp.prepare(request)
        self.held += 1
        try:
            if request.method != "HEAD":
                await resp.write(b"{")
            assert self._release is not None
            await self._release.wait()
        finally:
            self.held -= 1
        return resp

    def stop(self) -> None:
        async def stop() -> None:
            assert self._release is not None
            self._release.set()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


_HOLD = r"""
import socket, sys
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sys.argv[1])
    except OSError:
        break
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"""


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    repeats = 3 if quick else 7
    tar_target = (4 if quick else 20) * 1024 * 1024
    out: dict[str, Any] = {"quick": quick}
    with LocalRegistry() as reg, tempfile.TemporaryDirectory(prefix="fetchd-starve-") as tmp:
        work = Path(tmp)
        host = ti.registry_url(reg).split("://", 1)[1]
        small = ti.push_custom(reg, "starve/small", "1",
                               [ti.make_layer(ti.text_bytes("starve-small", 64 << 10), "gzip")])
        big = [ti.push_custom(reg, f"starve/big{i}", "1",
                              [bimages.generated_layer(f"starve-big-{i}", tar_target)])
               for i in range(2 * repeats + 1)]
        tarpit = Tarpit()
        # defaults but: no deadlines (the tarpit holds its requests for the whole run), and
        # room for 64 connections to the tarpit host
        config = ("[server]\nsocket_mode = 0o666\njob_stall_timeout = 0\n"
                  "[network]\nstall_timeout = 0\nmax_connections = 64\n")
        work.chmod(0o755)
        (work / "d").mkdir()
        (work / "d").chmod(0o755)
        try:
            with Daemon(work / "d", config_text=config) as daemon:
                def pull(image: ti.CatalogImage, name: str) -> None:
                    daemon.fetch(FetchSpec(f"{host}/{image.repository}:{image.tag}", PLATFORM,
                                           work / "out" / f"{name}.zst"))

                pull(small, "warm")
                idle_cached = [_timed(lambda: pull(small, "c")) for _ in range(repeats)]
                idle_cold = [_timed(lambda i=i: pull(big[i], f"b{i}")) for i in range(repeats)]
                log(f"idle: cached {statistics.median(idle_cached) * 1000:.1f} ms, "
                    f"cold {statistics.median(idle_cold):.2f} s")

                stuck = [subprocess.Popen(
                    [SYSTEM_PYTHON, "-I", "-c", _SCRIPT, str(daemon.socket), "POST", "/v1/fetch",
                     json.dumps({"reference": f"127.0.0.1:{tarpit.port}/evil/img:{i}",
                                 "platform": PLATFORM})],
                    user=NOBODY.pw_uid, group=NOBODY.pw_gid, cwd="/", stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"}) for i in range(32)]
                deadline = time.monotonic() + 60
                while tarpit.held < 16 and time.monotonic() < deadline:
                    time.sleep(0.05)
                held = tarpit.held
                log(f"tarpit holds {held} requests of nobody (32 sent)")
                busy_cached = [_timed(lambda: pull(small, "c")) for _ in range(repeats)]
                busy_cold = [_timed(lambda i=i: pull(big[repeats + i], f"b{repeats + i}"))
                             for i in range(repeats)]
                log(f"tarpit: cached {statistics.median(busy_cached) * 1000:.1f} ms, "
                    f"cold {statistics.median(busy_cold):.2f} s")

                # 1000 idle connections from nobody; status asked by this (another) user
                holder = subprocess.Popen(
                    [SYSTEM_PYTHON, "-I", "-c", _HOLD, str(daemon.socket), "1000"],
                    user=NOBODY.pw_uid, group=NOBODY.pw_gid, cwd="/", stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
                assert holder.stdout is not None and holder.stdin is not None
                opened = int(holder.stdout.readline())
                status = [_timed(daemon.client.status) for _ in range(repeats)]
                connections = daemon.client.status().get("connections") or {}
                log(f"{opened} idle connections of nobody ({connections}): status "
                    f"{statistics.median(status) * 1000:.1f} ms")
                holder.stdin.close()
                holder.wait(30)
                tarpit.stop()
                for proc in stuck:
                    proc.wait(60)
        finally:
            if tarpit._thread.is_alive():
                tarpit.stop()
        out.update({
            "tarpit_requests": 32,
            "tarpit_held": held,
            "cached_idle_ms": round(statistics.median(idle_cached) * 1000, 1),
            "cached_tarpit_ms": round(statistics.median(busy_cached) * 1000, 1),
            "cold_idle_s": round(statistics.median(idle_cold), 3),
            "cold_tarpit_s": round(statistics.median(busy_cold), 3),
            "cold_ratio": round(statistics.median(busy_cold) / statistics.median(idle_cold), 2),
            "cold_bytes": big[0].only.layers[0].size,
            "idle_connections": opened,
            "status_ms_with_idle_connections": round(statistics.median(status) * 1000, 1),
        })
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller images, fewer repeats")
    args = parser.parse_args(argv)
    result = run(args.quick, lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2))
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
