"""The "second host" scenario: a fleet frame cache saves the next host's compression.

Two fresh daemons (own stores), both configured with the same ``[fleet] frame_cache``: a
second Debian docker-registry on loopback (the fleet's LAN registry; it is reached directly,
not through the network proxy, as a cache next to the runners would be). The upstream is
reached through the scenario's network proxy (loopback or WAN-like):

- ``second-host-a``: host A's cold pull of the big image at level 3 (every frame a miss,
  compressed here, then pushed in the background; the push is waited for outside the
  measured step);
- ``second-host``: host B's cold pull of the same image, platform and level: every frame
  comes from the cache, verified, no layer blob from the upstream.

Targets (issue 15): B <= 0.4x A's time and <= 0.35x A's CPU-seconds; ``extra`` records the
frame cache's counters of both hosts and B's registry bytes (index/manifest/config only).

Run alone (noisy on a loaded machine): ``python -m bench.fleet [--networks loopback,wan]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import images as bimages
from bench.daemon import Daemon
from bench.scenarios import Context, Sample, _fetch, _measure, _spec
from bench.wanproxy import WanProxy
from tests.support import images as ti
from tests.support.registry import LocalRegistry

SCENARIOS = ("second-host-a", "second-host")
PUSH_TIMEOUT = 600.0


def _config(cache: LocalRegistry, push: bool) -> str:
    return ("[fleet]\n"
            f'frame_cache = "{cache.url}/fetchd-frames"\n'
            f"push = {'true' if push else 'false'}\n"
            "push_bandwidth = 0\n"
            # the cache is our own registry: a loaded machine must not turn a lookup into
            # a timeout (a miss) and the scenario into another
            "timeout = 30.0\n")


def _fleet(daemon: Daemon) -> dict[str, Any]:
    return dict(daemon.client.status().get("fleet") or {})


def _wait_pushes(daemon: Daemon) -> dict[str, Any]:
    """Until host A's background pushes ended; its frame cache counters."""
    deadline = time.monotonic() + PUSH_TIMEOUT
    while True:
        stats = _fleet(daemon)
        if stats.get("pushes_pending") == 0:
            return stats
        if time.monotonic() > deadline:
            raise RuntimeError(f"host A's frame pushes did not end within {PUSH_TIMEOUT} s: {stats}")
        time.sleep(0.05)


def run_second_host(ctx: Context, tag: str) -> dict[str, Sample]:
    """Host A cold (pushes), then host B cold from the cache; ``{scenario: Sample}``."""
    img = ctx.images.cold
    plat = next(iter(img.platforms))
    out = ctx.workdir / f"fleet-{tag}"
    res: dict[str, Sample] = {}
    with LocalRegistry() as cache:
        with Daemon(out / "a", config_text=_config(cache, push=True)) as a:
            res["second-host-a"] = _measure(ctx, a.pid, lambda: _fetch(
                a, [_spec(ctx, img, plat, out / "a.zst")]))
            res["second-host-a"].extra["fleet"] = _wait_pushes(a)
        with Daemon(out / "b", config_text=_config(cache, push=False)) as b:
            res["second-host"] = _measure(ctx, b.pid, lambda: _fetch(
                b, [_spec(ctx, img, plat, out / "b.zst")]))
            res["second-host"].extra["fleet"] = _fleet(b)
    same = (out / "a.zst").read_bytes() == (out / "b.zst").read_bytes()
    res["second-host"].extra["same_archive_as_a"] = same
    if not same:
        raise RuntimeError("host B's archive differs from host A's")
    return res


def ratios(a: Sample, b: Sample) -> dict[str, float | None]:
    return {"time_b_over_a": round(b.seconds / a.seconds, 3) if a.seconds else None,
            "cpu_b_over_a": round(b.cpu_s / a.cpu_s, 3) if a.cpu_s else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", default="loopback,wan")
    p.add_argument("--tiny", action="store_true", help="a small image: checks the harness only")
    args = p.parse_args(argv)
    from bench.run import WAN_DELAY, WAN_RATE

    imgs = bimages.tiny_set() if args.tiny else bimages.full_set()
    work = Path(tempfile.mkdtemp(prefix="fetchd-bench-fleet-"))
    report: dict[str, Any] = {}
    try:
        with LocalRegistry() as reg:
            imgs = dataclasses.replace(imgs, cold=ti.push_image(reg, imgs.cold))
            for net in [n for n in args.networks.split(",") if n]:
                proxy = (WanProxy(reg.host, rate=WAN_RATE, delay=WAN_DELAY) if net == "wan"
                         else WanProxy(reg.host)).start()
                try:
                    res = run_second_host(Context(imgs, proxy, work), net)
                finally:
                    proxy.stop()
                a, b = res["second-host-a"], res["second-host"]
                for s in (a, b):
                    s.extra.pop("timeline", None)
                report[net] = {
                    "host_a": {"seconds": round(a.seconds, 3), "cpu_s": round(a.cpu_s, 3),
                               "registry_bytes": a.registry_bytes, **a.extra},
                    "host_b": {"seconds": round(b.seconds, 3), "cpu_s": round(b.cpu_s, 3),
                               "registry_bytes": b.registry_bytes, **b.extra},
                    **ratios(a, b)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
