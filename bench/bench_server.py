"""Daemon overhead for warm requests (archive already packed), through the stdlib client.

Starts a local docker-registry with a generated image, the daemon as a real process
(``python -m fetchd serve``) with a temporary store and socket, packs the archive once, then:

- ``warm_fetch_ms``: p50/p90/p99 of one warm ``Client.fetch(..., dest=...)`` (a hard link each
  time), sequential; target p50 <= 10 ms.
- ``concurrent``: 16 client processes doing warm fetches at once; requests/s, target >= 500.
- ``health_ms``: p50 of ``/v1/health`` (the floor: HTTP over the socket, no work).
- ``rss_mb``: the daemon's resident memory idle after start and after the runs; target <= 60 MB.

Prints one JSON object. Usage: ``python bench/bench_server.py [--requests N] [--clients N]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT), str(ROOT / "client")]

from fetchd_client import Client, DaemonUnreachable  # noqa: E402
from support.images import build_catalog, push_image  # noqa: E402
from support.registry import LocalRegistry  # noqa: E402


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": round(statistics.mean(ordered) * 1000, 3)}


def _client_worker(args: tuple[str, str, str, int, int]) -> tuple[int, float, float]:
    socket_path, reference, out_dir, index, count = args
    client = Client(socket_path)
    dest = os.path.join(out_dir, f"c{index}.zst")
    start = time.perf_counter()
    for _ in range(count):
        client.fetch(reference, dest=dest)
    return count, start, time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=60)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fetchd-bench-"))
    registry = LocalRegistry()
    daemon: subprocess.Popen[bytes] | None = None
    try:
        image = push_image(registry, next(i for i in build_catalog() if i.name == "multi-oci"))
        socket_path = str(work / "run" / "fetchd.sock")
        (work / "config.toml").write_text("")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "client")]))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "fetchd", "serve", "--socket", socket_path,
             "--store", str(work / "store"), "--config", str(work / "config.toml"),
             "--log-level", "warning"],
            env=env, stderr=subprocess.DEVNULL,
        )
        client = Client(socket_path)
        for _ in range(300):
            try:
                client.health()
                break
            except DaemonUnreachable:
                time.sleep(0.05)
        time.sleep(0.5)
        rss_start = _rss_mb(daemon.pid)

        out = work / "out"
        out.mkdir()
        cold_start = time.perf_counter()
        client.fetch(image.reference, arch="armhf", dest=str(out / "cold.zst"))
        cold = time.perf_counter() - cold_start

        health = []
        for _ in range(args.requests):
            t = time.perf_counter()
            client.health()
            health.append(time.perf_counter() - t)

        warm = []
        for _ in range(args.requests):
            t = time.perf_counter()
            client.fetch(image.reference, arch="armhf", dest=str(out / "warm.zst"))
            warm.append(time.perf_counter() - t)

        # The default platform is the host's; make sure that archive is packed too.
        client.fetch(image.reference, dest=str(out / "host.zst"))
        jobs = [(socket_path, image.reference, str(out), i, args.per_client) for i in range(args.clients)]
        with multiprocessing.get_context("fork").Pool(args.clients) as pool:
            started = time.perf_counter()
            results = pool.map(_client_worker, jobs)
            elapsed = time.perf_counter() - started
        total = sum(r[0] for r in results)

        time.sleep(1.0)
        report: dict[str, Any] = {
            "benchmark": "bench_server",
            "image": "multi-oci (3 layers per platform), archive already packed",
            "cold_fetch_s": round(cold, 3),
            "health_ms": _percentiles(health),
            "warm_fetch_ms": _percentiles(warm),
            "warm_fetch_target_p50_ms": 10,
            "concurrent": {
                "clients": args.clients,
                "requests": total,
                "seconds": round(elapsed, 3),
                "requests_per_s": round(total / elapsed, 1),
                "target_requests_per_s": 500,
            },
            "rss_mb": {"idle_after_start": round(rss_start, 1),
                       "after_runs": round(_rss_mb(daemon.pid), 1), "target": 60},
            "cpus": os.cpu_count(),
        }
        print(json.dumps(report, indent=2))
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
