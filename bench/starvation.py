"""Starvation bench (issue 13): what a tarpit registry and idle connections cost other users.

One run starts Debian's docker-registry on loopback (the healthy registry), a tarpit registry
(an aiohttp app in a thread that answers every manifest request with its headers and one
byte, then holds the connection), and a real ``fetchd serve``. It measures:

- on an idle daemon: a cached pull's latency, and an uncached ~20 MB pull's time;
- with 32 requests for tarpit images sent by another user (``nobody``, through the socket:
  ``server.max_jobs_per_uid`` lets it hold 16 network slots, its other 16 requests queue):
  the same two, as ratios to idle (targets: cached under 100 ms, uncached within 1.5x);
- with 1000 idle connections of ``nobody`` open (its caps admit 128 + 2): how long another
  user's ``fetchd status`` takes to answer;
- the event loop's longest stall (target: under 50 ms), each on a fresh daemon sampling its
  lag every 5 ms (``server.loop_lag_interval``) while another process asks ``/v1/health``
  every 10 ms: while it refuses a 20000-layer manifest (~3 MB, from the tarpit's ``huge/``
  images; ``server.max_layers``) ten times in a row, and during a cold pull of the big image (one
  ~160 MB gzip layer, ~575 MB of tar). The lag figure is the daemon's own, over exactly the
  step (``status?lag_window=``); the health figures are what a client saw.

``python -m bench.starvation [--quick] [--steps tarpit,stall]`` prints the figures and which
targets were met, and (a full run of both steps) writes ``bench/starvation_results.json``
with the machine's load average. Figures on a loaded machine are noisy: say so when quoting.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
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
from fetchd_client import FetchdClientError

from bench import images as bimages
from bench.daemon import Daemon, FetchSpec
from bench.scale import Watch
from tests.support import images as ti
from tests.support.as_user import _SCRIPT, NOBODY, SYSTEM_PYTHON
from tests.support.registry import LocalRegistry

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "starvation_results.json"
PLATFORM = "linux/amd64"


HUGE_LAYERS = 20000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@functools.cache
def huge_manifest() -> bytes:
    """An OCI image manifest naming ``HUGE_LAYERS`` distinct (nonexistent) gzip layers."""
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
               "digest": "sha256:" + hashlib.sha256(b"huge-%d" % i).hexdigest(), "size": 31337 + i}
              for i in range(HUGE_LAYERS)]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": "sha256:" + "c" * 64, "size": 2},
                       "layers": layers}, separators=(",", ":")).encode()


class Tarpit:
    """The evil registry, in a thread of its own; ``held`` counts requests it holds. It also
    serves ``huge/*`` images: a manifest of ``HUGE_LAYERS`` layers, at once."""

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
        app.router.add_route("*", r"/v2/huge/{name}/manifests/{ref}", self._huge)
        app.router.add_route("*", r"/v2/{name:.+}/manifests/{ref}", self._hold)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _huge(self, request: web.Request) -> web.Response:
        """An image manifest of ``HUGE_LAYERS`` layers (~1.3 MB), sent at once."""
        body = huge_manifest()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        headers = {"Docker-Content-Digest": digest, "Content-Type": OCI_MANIFEST}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(body))})
        return web.Response(body=body, headers=headers)

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
        """Release the held requests and stop serving (idempotent)."""
        if not self._thread.is_alive():
            return

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


def run(quick: bool, log: Callable[[str], None], steps: tuple[str, ...] = ("tarpit", "stall")
        ) -> dict[str, Any]:
    """The ``steps`` asked for (``tarpit``: tarpit and idle connections; ``stall``: the loop's
    longest stall), each against its own daemons and tarpit; one registry for all."""
    out: dict[str, Any] = {"quick": quick}
    with LocalRegistry() as reg, tempfile.TemporaryDirectory(prefix="fetchd-starve-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        for step, measure in (("tarpit", run_tarpit), ("stall", run_stall)):
            if step not in steps:
                continue
            tarpit = Tarpit()  # one of its own per step: the tarpit step ends by stopping it
            try:
                figures = measure(reg, tarpit, work, quick, log)
            finally:
                tarpit.stop()
            if step == "stall":
                out["stall"] = figures
            else:
                out.update(figures)
    return out


def run_tarpit(reg: LocalRegistry, tarpit: Tarpit, work: Path, quick: bool,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Cached and uncached pulls, idle and under the tarpit; status with idle connections."""
    repeats = 3 if quick else 7
    tar_target = (4 if quick else 20) * 1024 * 1024
    host = ti.registry_url(reg).split("://", 1)[1]
    small = ti.push_custom(reg, "starve/small", "1",
                           [ti.make_layer(ti.text_bytes("starve-small", 64 << 10), "gzip")])
    big = [ti.push_custom(reg, f"starve/big{i}", "1",
                          [bimages.generated_layer(f"starve-big-{i}", tar_target)])
           for i in range(2 * repeats + 1)]
    # defaults but: no deadlines (the tarpit holds its requests for the whole run), and
    # room for 64 connections to the tarpit host
    config = ("[server]\nsocket_mode = 0o666\njob_stall_timeout = 0\n"
              "[network]\nstall_timeout = 0\nmax_connections = 64\n")
    (work / "d").mkdir()
    (work / "d").chmod(0o755)
    with Daemon(work / "d", config_text=config) as daemon:
        def pull(image: ti.CatalogImage, name: str) -> None:
            daemon.fetch(FetchSpec(f"{host}/{image.repository}:{image.tag}", PLATFORM,
                                   work / "out" / f"{name}.zst"))

        pull(small, "warm")
        idle_cached = [_timed(lambda: pull(small, "c")) for _ in range(repeats)]
        idle_cold = [_timed(functools.partial(pull, big[i], f"b{i}")) for i in range(repeats)]
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
        busy_cold = [_timed(functools.partial(pull, big[repeats + i], f"b{repeats + i}"))
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
        tarpit.stop()  # its clients fail at once (connection refused)
        for proc in stuck:
            proc.wait(60)
    return {
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
    }


STALL_TARGET_MS = 50.0


def _loop_thread_times(pid: int) -> tuple[float, float] | None:
    """(CPU ms, ms runnable but waiting for a CPU) of the daemon's main thread, which runs
    the event loop (``/proc/PID/task/PID/schedstat``); None where the kernel has no such file."""
    try:
        run_ns, wait_ns, _ = map(int, Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split())
    except (OSError, ValueError):
        return None
    return run_ns / 1e6, wait_ns / 1e6


def _step(daemon: Daemon, work: Callable[[], Any]) -> tuple[float, dict[str, Any], Any]:
    """Run ``work`` while /v1/health is probed from another process; (seconds, figures, value).

    Figures: the daemon's loop lag over exactly the step (``status?lag_window=``, sampled
    every ``loop_lag_interval``), the health probe's latencies, the loop thread's CPU time
    and the time it was ready to run but got no CPU, and the machine's 1-minute load average
    before and after."""
    load = os.getloadavg()[0]
    with Watch(daemon, interval=0.01) as watch:
        before = _loop_thread_times(daemon.pid)
        start = time.perf_counter()
        value = work()
        seconds = time.perf_counter() - start
        after = _loop_thread_times(daemon.pid)
        lag = daemon.client.status(lag_window=seconds).get("loop_lag") or {}
    health = watch.summary()
    # How much of the step the loop's thread ran, and how long it was ready to run but had
    # no CPU: on a loaded host that wait, not work on the loop, is where the lag comes from.
    cpu, waited = ((round(after[0] - before[0]), round(after[1] - before[1]))
                   if before is not None and after is not None else (None, None))
    return seconds, {
        "loop_lag_max_ms": lag.get("max_ms"), "loop_lag_p99_ms": lag.get("p99_ms"),
        "loop_lag_samples": lag.get("samples"), "health_samples": health["health_samples"],
        "health_p99_ms": health["health_p99_ms"], "health_max_ms": health["health_max_ms"],
        "health_errors": health["health_errors"],
        "loop_thread_cpu_ms": cpu, "loop_thread_cpu_wait_ms": waited,
        "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}, value


def run_stall(reg: LocalRegistry, tarpit: Tarpit, work: Path, quick: bool,
              log: Callable[[str], None]) -> dict[str, Any]:
    """The event loop's longest stall (a) while the daemon refuses a ``HUGE_LAYERS``-layer
    manifest (``server.max_layers``) ten times in a row (``--quick``: three), and (b) during a cold pull of the
    big image (one ~160 MB gzip layer; ``--quick``: a 20 MB one), each on a daemon of its own
    that samples its lag every 5 ms."""
    host = ti.registry_url(reg).split("://", 1)[1]
    if quick:
        big = ti.push_custom(reg, "stall/big", "1",
                             [bimages.generated_layer("stall-big", 20 * 1024 * 1024)])
    else:
        big = ti.make_big_image(ti.build_big_layer())
        ti.push_image(reg, big)
    config = "[server]\nsocket_mode = 0o666\nloop_lag_interval = 0.005\n"
    out: dict[str, Any] = {"manifest_bytes": len(huge_manifest()), "manifest_layers": HUGE_LAYERS}
    attempts = 3 if quick else 10
    with Daemon(work / "stall-reject", config_text=config) as daemon:
        def reject() -> list[str]:
            codes = []
            for i in range(attempts):
                try:
                    daemon.client.fetch(f"127.0.0.1:{tarpit.port}/huge/img:{i}", platform=PLATFORM)
                    codes.append("accepted")
                except FetchdClientError as e:
                    codes.append(e.code if f"{HUGE_LAYERS} layers" in str(e) else f"{e.code}: {e}")
            return codes

        seconds, figures, codes = _step(daemon, reject)
        out["reject"] = {"attempts": attempts, "seconds": round(seconds, 3), "answers": codes,
                         **figures}
        log(f"reject {HUGE_LAYERS} layers x{attempts}: {json.dumps(out['reject'])}")
    with Daemon(work / "stall-cold", config_text=config) as daemon:
        dest = work / "out" / "stall-big.zst"
        dest.parent.mkdir(parents=True, exist_ok=True)
        seconds, figures, result = _step(daemon, lambda: daemon.fetch(
            FetchSpec(f"{host}/{big.repository}:{big.tag}", PLATFORM, dest)))
        out["cold_big"] = {"blob_bytes": big.only.layers[0].size,
                           "tar_bytes": big.only.layers[0].tar_size,
                           "blobs_downloaded": result.get("blobs_downloaded"),
                           "seconds": round(seconds, 3), **figures}
        log(f"cold pull of {big.name}: {json.dumps(out['cold_big'])}")
    return out


def targets(result: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, wanted, measured, met) for each of the issue's figures in ``result``."""
    rows: list[tuple[str, str, str, bool | None]] = []
    if "cached_tarpit_ms" in result:
        rows.append(("cached pull, tarpit holding 32 requests", "< 100 ms",
                     f"{result['cached_tarpit_ms']} ms", result["cached_tarpit_ms"] < 100))
        rows.append(("uncached pull, tarpit holding 32 requests", "<= 1.5x idle",
                     f"{result['cold_ratio']}x", result["cold_ratio"] <= 1.5))
    if "status_ms_with_idle_connections" in result:
        rows.append((f"status with {result['idle_connections']} idle connections", "answers",
                     f"{result['status_ms_with_idle_connections']} ms", True))
    stall = result.get("stall") or {}
    for key, label in (("reject", f"loop stall, {HUGE_LAYERS}-layer manifest refused"),
                       ("cold_big", "loop stall, cold pull of the big image")):
        step = stall.get(key)
        if not step:
            continue
        lag = step.get("loop_lag_max_ms")
        rows.append((label, f"< {STALL_TARGET_MS:g} ms",
                     f"{lag} ms (health max {step.get('health_max_ms')} ms; the loop's thread "
                     f"ran {step.get('loop_thread_cpu_ms')} ms and waited "
                     f"{step.get('loop_thread_cpu_wait_ms')} ms for a CPU in "
                     f"{round(step['seconds'] * 1000)} ms, load {step.get('load_1min')})",
                     None if lag is None else lag < STALL_TARGET_MS))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller images, fewer repeats")
    parser.add_argument("--steps", default="tarpit,stall",
                        help="comma-separated: tarpit (tarpit and idle connections), stall (the "
                             "event loop's longest stall); the results file is written only "
                             "for a full run of both")
    args = parser.parse_args(argv)
    steps = tuple(step.strip() for step in args.steps.split(",") if step.strip())
    unknown = set(steps) - {"tarpit", "stall"}
    if unknown:
        parser.error(f"unknown step(s) {', '.join(sorted(unknown))}; use tarpit, stall")
    result = run(args.quick, lambda line: print(line, file=sys.stderr, flush=True), steps)
    result["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    result["cpus"] = os.cpu_count()
    print(json.dumps(result, indent=2))
    for name, wanted, measured, met in targets(result):
        verdict = "not measured" if met is None else ("met" if met else "MISSED")
        print(f"{verdict:>12}  {name}: {measured} (target {wanted})", file=sys.stderr)
    if not args.quick and set(steps) == {"tarpit", "stall"}:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
