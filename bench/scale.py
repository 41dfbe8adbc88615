"""How fetchd's costs grow: store size, concurrent clients, layers per image, bytes per layer.

    python -m bench.scale               # the curves of docs/SCALING.md (~10-15 min on 2 cores)
    python -m bench.scale --no-2g       # without the 2 GiB point (the slowest)
    python -m bench.scale --quick       # tiny points (under a minute): checks the harness

One run starts Debian's docker-registry on loopback, pushes synthetic images (built with the
test catalog's helpers, layers generated deterministically) and drives real daemons
(``bench.daemon``) through the stdlib client from this process:

- store size (10, 100, 1000, 3000 images; each image = one of 4 base layers + one of 16
  middle layers + a small layer of its own, so a few layers are shared by many images):
  warm pull latency, ``status``, ``ls``, daemon RSS, sqlite descriptors, index size, and on a
  hard-linked copy of the store: daemon start-up to the first answer, ``verify`` (seconds per
  GB) and a gc down to half the store;
- concurrency (1, 8, 32, 64 clients, each pulling a different uncached image of 3 layers):
  throughput, errors, peak RSS and descriptors, the daemon's loop lag, /v1/health latency;
- layer count (10, 100, 300, 1000 small layers in one image): cold time per layer, peak
  descriptors, loop lag;
- bytes (one 1 GiB and one 2 GiB tar layer, gzip): seconds per GiB against the compute floor
  (``bench.floor``: gunzip + sha256 + zstd of the same blob in-process), peak RSS.

Writes ``bench/scale_results.json`` and ``bench/scale_tables.md`` (the tables of
docs/SCALING.md, ready to paste) for a full run, and, when every section ran, the generated
block of docs/SCALING.md; ``--quick`` writes nothing unless ``--out`` names a directory. A PNG of the curves is written beside them when matplotlib is installed
(``pip install .[bench]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from bench import images as bimages
from bench.daemon import Daemon
from bench.floor import BlobInput, median_floor
from bench.rss import PeakRss, tree_rss_kb
from bench.run import machine_info
from tests.support import images as ti
from tests.support.registry import LocalRegistry

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "scale_results.json"
TABLES = REPO / "bench" / "scale_tables.md"
PLOT = REPO / "bench" / "scale_curves.png"
DOC = REPO / "docs" / "SCALING.md"
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
GiB = 1024 ** 3
MiB = 1024 ** 2
PLATFORM = "linux/amd64"


@dataclasses.dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...] = (10, 100, 1000, 3000)
    clients: tuple[int, ...] = (1, 8, 32, 64)
    layers: tuple[int, ...] = (10, 100, 300, 1000)
    bytes_tar: tuple[int, ...] = (1 * GiB, 2 * GiB)
    base_tar: int = 96 * 1024  # store images: base, middle and own layer sizes (tar bytes)
    middle_tar: int = 32 * 1024
    own_tar: int = 8 * 1024
    client_layer_tar: int = 1024 * 1024  # concurrency images: 3 layers of this
    tiny_layer_tar: int = 2048  # layer-count images
    warm_repeats: int = 20
    fill_clients: int = 8


QUICK = Plan(sizes=(4, 12), clients=(1, 4), layers=(4, 16), bytes_tar=(8 * MiB,),
             client_layer_tar=64 * 1024, warm_repeats=5, fill_clients=4)


# --------------------------------------------------------------------------- images


def _layer(seed: str, size: int) -> ti.Layer:
    return ti.make_layer([ti.Entry("usr", kind="dir"),
                          ti.Entry(f"usr/share/{seed}.txt", ti.text_bytes(seed, size))], "gzip")


def store_images(n: int, plan: Plan) -> list[ti.CatalogImage]:
    """``n`` images in one repository: base i%4, middle (i//4)%16, and a layer of their own."""
    bases = [_layer(f"base{b}", plan.base_tar) for b in range(4)]
    middles = [_layer(f"middle{m}", plan.middle_tar) for m in range(16)]
    out = []
    for i in range(n):
        own = _layer(f"own{i}", plan.own_tar + (i % 7) * 512)
        part = ti.make_image(PLATFORM, [bases[i % 4], middles[(i // 4) % 16], own])
        out.append(ti.single(f"store{i}", "scale/store", f"v{i}", part))
    return out


def client_images(n: int, tag: str, plan: Plan) -> list[ti.CatalogImage]:
    """``n`` images sharing nothing: 3 layers each."""
    out = []
    for i in range(n):
        layers = [_layer(f"{tag}-{i}-{j}", plan.client_layer_tar) for j in range(3)]
        out.append(ti.single(f"{tag}{i}", "scale/clients", f"{tag}-{i}",
                             ti.make_image(PLATFORM, layers)))
    return out


def many_layer_image(n: int, plan: Plan) -> ti.CatalogImage:
    layers = [_layer(f"l{n}-{j}", plan.tiny_layer_tar + (j % 5) * 64) for j in range(n)]
    return ti.single(f"layers{n}", "scale/layers", f"n{n}", ti.make_image(PLATFORM, layers))


def big_layer_image(tar_bytes: int) -> ti.CatalogImage:
    layer = bimages.generated_layer(f"scale/bytes/{tar_bytes}", tar_bytes)
    return ti.single(f"bytes{tar_bytes}", "scale/bytes", f"b{tar_bytes // MiB}",
                     ti.make_image(PLATFORM, [layer]))


def push(reg: LocalRegistry, images: Sequence[ti.CatalogImage], threads: int = 8
         ) -> list[ti.CatalogImage]:
    """Every distinct blob once per repository (in parallel), then the manifests."""
    blobs: dict[tuple[str, str], tuple[Any, ...]] = {}
    for img in images:
        for part in img.all_parts():
            blobs.setdefault((img.repository, str(part.config_digest)),
                             (img.repository, part.config_digest, part.config_size,
                              part.config_bytes, None))
            for layer in part.layers:
                blobs.setdefault((img.repository, str(layer.digest)),
                                 (img.repository, layer.digest, layer.size, layer.data,
                                  layer.path))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda b: ti.push_blob(reg, b[0], b[1], b[2], data=b[3], path=b[4]),
                      blobs.values()))
        list(pool.map(lambda img: ti.put_manifest(reg, img.repository, img.tag, img.raw,
                                                  img.media_type), images))
    return [dataclasses.replace(img, host=reg.host) for img in images]


# --------------------------------------------------------------------------- probes


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    return _ms(statistics.median(_timed(fn)[0] for _ in range(repeats)))


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _index_fds(pid: int) -> int:
    n = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in names:
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").endswith("index.sqlite")
        except OSError:
            pass
    return n


def _rss_mb(pid: int) -> float:
    return round(tree_rss_kb(pid) / 1024, 1)


_HEALTH_PROBE = r"""
import json, select, sys, time
sys.path.insert(0, sys.argv[2])
from fetchd_client import Client
client, interval, out, errors = Client(sys.argv[1], timeout=60), float(sys.argv[3]), [], 0
print("ready", flush=True)
while not select.select([sys.stdin], [], [], interval)[0]:
    start = time.perf_counter()
    try:
        client.health()
        out.append(time.perf_counter() - start)
    except Exception:
        errors += 1
print(json.dumps({"latencies": out, "errors": errors}))
"""


class Watch:
    """While running: the daemon's peak descriptors (polled) and /v1/health latencies, asked
    from a process of its own (the harness's client threads would otherwise share its GIL and
    delay it: the latency would be the harness's)."""

    def __init__(self, daemon: Daemon, interval: float = 0.05) -> None:
        self.daemon, self.interval = daemon, interval
        self.peak_fds = 0
        self.health_s: list[float] = []
        self.health_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probe: subprocess.Popen[str] | None = None

    def _fd_loop(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_fds = max(self.peak_fds, _fds(self.daemon.pid))

    def __enter__(self) -> Watch:
        self.peak_fds = _fds(self.daemon.pid)
        self._thread = threading.Thread(target=self._fd_loop, daemon=True)
        self._thread.start()
        self._probe = subprocess.Popen(
            [sys.executable, "-c", _HEALTH_PROBE, str(self.daemon.socket), str(REPO / "client"),
             str(self.interval)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._probe.stdout is not None
        self._probe.stdout.readline()  # "ready": probing from now on
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._probe is not None:
            out, _ = self._probe.communicate("", timeout=120)  # stdin closes: it reports
            try:
                report = json.loads(out.strip().splitlines()[-1])
                self.health_s, self.health_errors = report["latencies"], report["errors"]
            except (ValueError, IndexError, KeyError):
                self.health_errors += 1

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.health_s)
        p99 = lat[max(0, int(len(lat) * 0.99) - 1)] if lat else 0.0
        return {"peak_fds": self.peak_fds, "health_samples": len(lat),
                "health_p99_ms": _ms(p99), "health_max_ms": _ms(max(lat, default=0.0)),
                "health_errors": self.health_errors}


def _lag(daemon: Daemon) -> dict[str, Any]:
    lag = daemon.client.status().get("loop_lag") or {}
    return {"loop_lag_max_ms": lag.get("max_ms"), "loop_lag_p99_ms": lag.get("p99_ms")}


def _fetch_all(daemon: Daemon, images: Sequence[ti.CatalogImage], clients: int
               ) -> tuple[list[dict[str, Any]], list[str]]:
    errors: list[str] = []

    def one(img: ti.CatalogImage) -> dict[str, Any]:
        try:
            result: dict[str, Any] = daemon.client.fetch(img.ref(), platform=PLATFORM)
            return result
        except Exception as e:  # noqa: BLE001 -- counted and reported
            errors.append(f"{img.name}: {type(e).__name__}: {e}"[:500])
            return {}

    with ThreadPoolExecutor(max(1, clients)) as pool:
        results = list(pool.map(one, images))
    return results, errors


def _copy_store(src: Path, dst: Path) -> None:
    """A copy for destructive measurements: blobs hard-linked, the index by sqlite's backup
    (consistent while the source daemon runs)."""
    (dst / "blobs" / "sha256").mkdir(parents=True)
    for f in (src / "blobs" / "sha256").iterdir():
        os.link(f, dst / "blobs" / "sha256" / f.name)
    with sqlite3.connect(src / "index.sqlite") as a, sqlite3.connect(dst / "index.sqlite") as b:
        a.backup(b)
    a.close()
    b.close()


def _index_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.glob("index.sqlite*") if p.is_file())


# --------------------------------------------------------------------------- sections


def run_store_sizes(reg: LocalRegistry, work: Path, plan: Plan, log: Callable[[str], None]
                    ) -> list[dict[str, Any]]:
    images = push(reg, store_images(max(plan.sizes), plan))
    log(f"store: pushed {len(images)} images")
    points = []
    pulled = 0
    with Daemon(work / "store-daemon") as d:
        for target in plan.sizes:
            t, (_results, errors) = _timed(partial(_fetch_all, d, images[pulled:target],
                                                   plan.fill_clients))
            fill_lag = _lag(d)
            pulled = target
            dests = work / "warm"
            dests.mkdir(exist_ok=True)
            warm_imgs = images[:min(10, target)]
            warm = partial(_warm_pull, d, warm_imgs, dests, iter(range(10 ** 9)))

            warm()  # first touch of the warm set at this size
            point: dict[str, Any] = {
                "images": target, "fill_s": round(t, 2), "fill_errors": errors[:5],
                "fill_error_count": len(errors),
                "warm_pull_ms": _median_ms(warm, plan.warm_repeats),
                "status_ms": _median_ms(d.client.status, plan.warm_repeats),
                "ls_ms": _median_ms(d.client.ls, max(3, plan.warm_repeats // 4)),
            }
            status = d.client.status()
            listed = d.client.ls()["images"]
            point.update({
                "ls_images": len(listed), "blobs": status["store"]["blobs"],
                "store_bytes": status["store"]["bytes"], "rss_mb": _rss_mb(d.pid),
                "sqlite_fds": _index_fds(d.pid), "index_bytes": _index_bytes(d.store),
                "fill_loop_lag_max_ms": fill_lag["loop_lag_max_ms"], **_lag(d),
            })
            point.update(_copy_measures(d, work / f"copy{target}", log))
            points.append(point)
            log(f"store {target}: " + json.dumps({k: v for k, v in point.items()
                                                  if not isinstance(v, list)}))
    return points


def _warm_pull(d: Daemon, images: Sequence[ti.CatalogImage], dests: Path,
               counter: Iterator[int]) -> None:
    """One warm request (the images are in the store) into a fresh destination."""
    n = next(counter)
    dest = dests / f"{n}.zst"
    d.client.fetch(images[n % len(images)].ref(), platform=PLATFORM, dest=str(dest))
    dest.unlink()


def _copy_measures(d: Daemon, where: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Start-up, verify and gc to half, on a hard-linked copy of ``d``'s store."""
    _copy_store(d.store, where / "store")
    try:
        with Daemon(where) as c:
            startup = c.ready_s
            t_verify, report = _timed(c.client.verify)
            gb = report.get("bytes_checked", 0) / 1e9
            total = c.client.status()["store"]["bytes"]
            t_gc, gc = _timed(lambda: c.client.gc(total // 2))
            return {
                "startup_s": round(startup, 3),
                "verify_s": round(t_verify, 3), "verify_checked": report.get("checked"),
                "verify_corrupt": len(report.get("corrupt", [])),
                "verify_s_per_gb": round(t_verify / gb, 2) if gb else None,
                "gc_s": round(t_gc, 3), "gc_removed": gc.get("removed"),
                "gc_freed_bytes": gc.get("freed_bytes"),
                "gc_ms_per_1k_removed": round(t_gc * 1e6 / gc["removed"], 1)
                if gc.get("removed") else None,
            }
    finally:
        shutil.rmtree(where, ignore_errors=True)


def run_concurrency(reg: LocalRegistry, work: Path, plan: Plan, log: Callable[[str], None]
                    ) -> list[dict[str, Any]]:
    points = []
    for n in plan.clients:
        images = push(reg, client_images(n, f"c{n}", plan))
        tar = n * 3 * plan.client_layer_tar
        with Daemon(work / f"conc{n}") as d:
            with PeakRss(d.pid) as rss, Watch(d) as watch:
                t, (_results, errors) = _timed(partial(_fetch_all, d, images, n))
            lag = _lag(d)
        point = {"clients": n, "seconds": round(t, 3), "errors": len(errors),
                 "error_samples": errors[:3],
                 "images_per_s": round(n / t, 2), "tar_mb_per_s": round(tar / 1e6 / t, 1),
                 "peak_rss_mb": round(rss.peak_kb / 1024, 1), **watch.summary(), **lag}
        points.append(point)
        shutil.rmtree(work / f"conc{n}", ignore_errors=True)
        log(f"clients {n}: {json.dumps(point)}")
    return points


def run_layers(reg: LocalRegistry, work: Path, plan: Plan, log: Callable[[str], None]
               ) -> list[dict[str, Any]]:
    points = []
    for n in plan.layers:
        [img] = push(reg, [many_layer_image(n, plan)])
        with Daemon(work / f"layers{n}") as d:
            with PeakRss(d.pid) as rss, Watch(d) as watch:
                t, (_results, errors) = _timed(partial(_fetch_all, d, [img], 1))
            point = {"layers": n, "seconds": round(t, 3), "ms_per_layer": _ms(t / n),
                     "errors": len(errors), "error_samples": errors[:3],
                     "peak_rss_mb": round(rss.peak_kb / 1024, 1), **watch.summary(), **_lag(d)}
        points.append(point)
        shutil.rmtree(work / f"layers{n}", ignore_errors=True)
        log(f"layers {n}: {json.dumps(point)}")
    return points


def run_bytes(reg: LocalRegistry, work: Path, plan: Plan, log: Callable[[str], None]
              ) -> list[dict[str, Any]]:
    points = []
    for size in plan.bytes_tar:
        t0 = time.perf_counter()
        built = big_layer_image(size)
        [img] = push(reg, [built], threads=1)
        layer = img.only.layers[0]
        log(f"bytes {size >> 20} MiB: layer ready and pushed in {time.perf_counter() - t0:.0f}s")
        with Daemon(work / f"bytes{size}") as d:
            with PeakRss(d.pid) as rss, Watch(d) as watch:
                t, (_results, errors) = _timed(partial(_fetch_all, d, [img], 1))
            lag = _lag(d)
        shutil.rmtree(work / f"bytes{size}", ignore_errors=True)
        assert layer.path is not None
        floor = median_floor([BlobInput(layer.path, "gzip")], 3, 1)
        gib = layer.tar_size / GiB
        point = {"tar_bytes": layer.tar_size, "blob_bytes": layer.size,
                 "seconds": round(t, 2), "s_per_gib": round(t / gib, 2),
                 "floor_s": round(floor.seconds, 2), "floor_s_per_gib": round(floor.seconds / gib, 2),
                 "ratio_floor": round(t / floor.seconds, 3), "errors": len(errors),
                 "error_samples": errors[:3],
                 "peak_rss_mb": round(rss.peak_kb / 1024, 1), **watch.summary(), **lag}
        points.append(point)
        log(f"bytes {size >> 20} MiB: {json.dumps(point)}")
    return points


# --------------------------------------------------------------------------- targets


def evaluate(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's scaling targets, each met / missed / not measured, with the figure."""
    out: list[dict[str, Any]] = []

    def add(name: str, wanted: str, measured: Any, met: bool | None) -> None:
        out.append({"target": name, "wanted": wanted, "measured": measured, "met": met})

    st = r.get("store") or []
    if len(st) >= 2:
        first, last = st[0], st[-1]
        for key, label in (("warm_pull_ms", "warm pull"), ("status_ms", "status")):
            ratio = round(last[key] / first[key], 2) if first[key] else None
            add(f"{label}, {first['images']} -> {last['images']} images", "within 2x",
                f"{first[key]} -> {last[key]} ms ({ratio}x)", None if ratio is None else ratio <= 2)
        add(f"start-up at {last['images']} images", "< 1 s", f"{last['startup_s']} s",
            last["startup_s"] < 1)
        big = [p for p in st if p["images"] >= 100 and p.get("gc_ms_per_1k_removed")]
        if len(big) >= 2:
            costs = [p["gc_ms_per_1k_removed"] for p in big]
            add("gc of half the store", "linear (cost per blob removed within 2x)",
                " / ".join(f"{c} ms" for c in costs) + " per 1000 blobs",
                max(costs) <= 2 * min(costs))
        ver = [p["verify_s_per_gb"] for p in st if p["images"] >= 100 and p.get("verify_s_per_gb")]
        if len(ver) >= 2:
            add("verify", "linear (seconds per GB within 2x)",
                " / ".join(f"{v}" for v in ver) + " s/GB", max(ver) <= 2 * min(ver))
    lags = []
    for section, key in (("store", "images"), ("clients", "clients"), ("layers", "layers"),
                         ("bytes", "tar_bytes")):
        for p in r.get(section) or []:
            for field in ("loop_lag_max_ms", "fill_loop_lag_max_ms"):
                if p.get(field) is not None:
                    lags.append((p[field], f"{section} {p[key]}"))
    if lags:
        worst = max(lags)
        add("loop lag", "max < 50 ms in every scenario", f"{worst[0]} ms ({worst[1]})",
            worst[0] < 50)
    cl = {p["clients"]: p for p in r.get("clients") or []}
    if 8 in cl and 64 in cl:
        add("throughput at 64 clients", ">= at 8 clients",
            f"{cl[64]['images_per_s']} vs {cl[8]['images_per_s']} images/s",
            cl[64]["images_per_s"] >= cl[8]["images_per_s"])
    if cl:
        lo, hi = min(cl), max(cl)
        errs = sum(p["errors"] for p in cl.values())
        add("errors under concurrency", "0", errs, errs == 0)
        if hi > lo:
            slope = (cl[hi]["peak_rss_mb"] - cl[lo]["peak_rss_mb"]) / (hi - lo)
            add("RSS in concurrency", "at most linear, small slope (<= 2 MB per client)",
                f"{cl[lo]['peak_rss_mb']} -> {cl[hi]['peak_rss_mb']} MB ({slope:.2f} MB/client)",
                slope <= 2)
    by = r.get("bytes") or []
    if by:
        worst_ratio = max(p["ratio_floor"] for p in by)
        add("time per GB of one huge layer", "<= 1.3x the compute floor",
            " / ".join(f"{p['s_per_gib']} s/GiB ({p['ratio_floor']}x)" for p in by),
            worst_ratio <= 1.3)
        if len(by) >= 2:
            add("RSS in bytes", "flat (largest <= 1.2x smallest)",
                " / ".join(f"{p['peak_rss_mb']} MB" for p in by),
                by[-1]["peak_rss_mb"] <= 1.2 * by[0]["peak_rss_mb"])
    ly = r.get("layers") or []
    if len(ly) >= 2:
        a, b = ly[0], ly[-1]
        slope_ms = (b["seconds"] - a["seconds"]) * 1000 / (b["layers"] - a["layers"])
        add("cold time per layer", "linear, < 10 ms overhead per layer",
            f"{slope_ms:.1f} ms/layer ({a['layers']} -> {b['layers']} layers)", slope_ms < 10)
        add("descriptors vs layer count", "bounded by work in progress",
            f"{a['peak_fds']} fds at {a['layers']} layers, {b['peak_fds']} at {b['layers']}",
            b["peak_fds"] <= a["peak_fds"] + 100)
    return out


# --------------------------------------------------------------------------- output


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_tables(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = [f"Measured {m['date']} at commit {m['commit']} on {m['nproc']} cores "
           f"({m['cpu_model'] or 'unknown CPU'}), load average {r['loadavg_start']} at the start, "
           f"{r['loadavg_end']} at the end; run took {r['total_s']} s"
           + (" (quick mode: tiny points, not a measurement)" if r["settings"]["quick"] else "")
           + ".", ""]
    if r.get("store"):
        out += ["### Store size", "", _table(
            ["images", "blobs", "store MB", "warm pull ms", "status ms", "ls ms", "start-up s",
             "gc half s", "gc ms/1k blobs", "verify s/GB", "index MB", "RSS MB", "sqlite fds",
             "loop lag max ms (fill)"],
            [[p["images"], p["blobs"], round(p["store_bytes"] / 1e6, 1), p["warm_pull_ms"],
              p["status_ms"], p["ls_ms"], p["startup_s"], p["gc_s"], p["gc_ms_per_1k_removed"],
              p["verify_s_per_gb"], round(p["index_bytes"] / 1e6, 2), p["rss_mb"],
              p["sqlite_fds"], p["fill_loop_lag_max_ms"]] for p in r["store"]]), ""]
    if r.get("clients"):
        out += ["### Concurrent clients (each a different uncached image)", "", _table(
            ["clients", "wall s", "images/s", "tar MB/s", "errors", "peak RSS MB", "peak fds",
             "loop lag max ms", "health p99 ms", "health max ms"],
            [[p["clients"], p["seconds"], p["images_per_s"], p["tar_mb_per_s"], p["errors"],
              p["peak_rss_mb"], p["peak_fds"], p.get("loop_lag_max_ms"), p["health_p99_ms"],
              p["health_max_ms"]] for p in r["clients"]]), ""]
    if r.get("layers"):
        out += ["### Layers in one image (cold)", "", _table(
            ["layers", "cold s", "ms per layer", "errors", "peak fds", "peak RSS MB",
             "loop lag max ms", "health max ms"],
            [[p["layers"], p["seconds"], p["ms_per_layer"], p["errors"], p["peak_fds"],
              p["peak_rss_mb"], p["loop_lag_max_ms"], p["health_max_ms"]]
             for p in r["layers"]]), ""]
    if r.get("bytes"):
        out += ["### One big layer (cold, level 3)", "", _table(
            ["tar GiB", "blob MB", "cold s", "s per GiB", "floor s per GiB", "x floor",
             "peak RSS MB", "loop lag max ms"],
            [[round(p["tar_bytes"] / GiB, 2), round(p["blob_bytes"] / 1e6), p["seconds"],
              p["s_per_gib"], p["floor_s_per_gib"], p["ratio_floor"], p["peak_rss_mb"],
              p["loop_lag_max_ms"]] for p in r["bytes"]]), ""]
    if r.get("targets"):
        met = {True: "met", False: "**missed**", None: "not measured"}
        out += ["### Targets", "", _table(
            ["target", "wanted", "measured", ""],
            [[t["target"], t["wanted"], t["measured"], met[t["met"]]] for t in r["targets"]]), ""]
    return "\n".join(out)


def plot(r: dict[str, Any], path: Path) -> bool:
    """The curves as a PNG, when matplotlib is installed; False otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    st, cl, ly, by = (r.get(k) or [] for k in ("store", "clients", "layers", "bytes"))
    if st:
        ax = axes[0][0]
        xs = [p["images"] for p in st]
        for key in ("warm_pull_ms", "status_ms", "ls_ms"):
            ax.plot(xs, [p[key] for p in st], marker="o", label=key)
        ax.set_xscale("log")
        ax.set(title="store size", xlabel="images", ylabel="ms")
        ax.legend()
    if cl:
        ax = axes[0][1]
        ax.plot([p["clients"] for p in cl], [p["images_per_s"] for p in cl], marker="o")
        ax.set(title="concurrent clients", xlabel="clients", ylabel="images/s")
    if ly:
        ax = axes[1][0]
        ax.plot([p["layers"] for p in ly], [p["seconds"] for p in ly], marker="o")
        ax.set(title="layers in one image", xlabel="layers", ylabel="cold s")
    if by:
        ax = axes[1][1]
        xs = [p["tar_bytes"] / GiB for p in by]
        ax.plot(xs, [p["seconds"] for p in by], marker="o", label="fetchd")
        ax.plot(xs, [p["floor_s"] for p in by], marker="x", label="compute floor")
        ax.set(title="one big layer", xlabel="GiB of tar", ylabel="s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


SECTIONS = ("store", "clients", "layers", "bytes")


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else Plan()
    if args.no_2g:
        plan = dataclasses.replace(plan, bytes_tar=tuple(b for b in plan.bytes_tar if b < 2 * GiB))
    t0 = time.perf_counter()
    load = os.getloadavg()
    log = _logger(args.verbose)
    work = Path(tempfile.mkdtemp(prefix="fetchd-scale-", dir=args.workdir))
    results: dict[str, Any] = {"machine": machine_info(), "settings": {
        "quick": args.quick, "sections": args.sections, "plan": dataclasses.asdict(plan)},
        "errors": []}
    runners = {"store": run_store_sizes, "clients": run_concurrency, "layers": run_layers,
               "bytes": run_bytes}
    try:
        with LocalRegistry() as reg:
            for name in args.sections:
                t = time.perf_counter()
                try:
                    results[name] = runners[name](reg, work, plan, log)
                except Exception as e:  # reported; the other sections still run
                    results["errors"].append(f"{name}: {type(e).__name__}: {e}"[:2000])
                    log(results["errors"][-1])
                log(f"section {name} took {time.perf_counter() - t:.0f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["targets"] = evaluate(results)
    results["loadavg_start"] = [round(x, 2) for x in load]
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["total_s"] = round(time.perf_counter() - t0, 1)
    return results


def _logger(verbose: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if verbose:
            print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    return log


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny points: checks the harness only")
    p.add_argument("--no-2g", action="store_true", help="skip the 2 GiB layer (the slowest point)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=None,
                   help="write scale_results.json, scale_tables.md (and the PNG) here")
    p.add_argument("--workdir", default=None, help="scratch parent directory (default $TMPDIR)")
    p.add_argument("-q", "--quiet", dest="verbose", action="store_false")
    a = p.parse_args(argv)
    a.sections = [s for s in a.sections.split(",") if s]
    unknown = set(a.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    tables = render_tables(results)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        paths = (args.out / RESULTS.name, args.out / TABLES.name, args.out / PLOT.name)
    elif not args.quick:
        paths = (RESULTS, TABLES, PLOT)
    else:
        paths = None
    if paths is not None:
        paths[0].write_text(json.dumps(results, indent=1) + "\n")
        paths[1].write_text(tables + "\n")
        if args.out is None and set(args.sections) == set(SECTIONS):
            from bench.report import write_doc

            write_doc(DOC, tables, BEGIN, END)
            print(f"wrote the tables into {DOC}", file=sys.stderr)
        if plot(results, paths[2]):
            print(f"wrote {paths[2]}", file=sys.stderr)
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    else:
        print(json.dumps(results, indent=1))
    print(tables)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
