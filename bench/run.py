"""The benchmark suite: fetchd against the seed pipeline (skopeo + zstd), in one run.

    python -m bench.run                 # full: 3 runs of everything (~10-15 min on 2 cores)
    python -m bench.run --quick         # 1 run, fewer repeats (a few minutes)
    python -m bench.run --runs 5        # more runs
    python -m bench.run --quick --tiny  # tiny catalog images (seconds): checks the harness

It starts Debian's docker-registry on loopback, pushes the benchmark images, puts a counting
proxy (and a WAN-like one) in front of it, runs every scenario for both sides on both
networks, measures the compute floor, checks the produced .zst files, and writes
``bench/results.json`` and the results block of ``docs/BENCHMARKS.md`` (complete, full runs
only; ``--quick``, ``--tiny``, ``--no-fetchd`` or fewer networks print the JSON instead, and
``--out`` writes elsewhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import images as bimages
from bench.fleet import run_second_host
from bench.floor import BlobInput, median_floor
from bench.scenarios import Context, Sample, check_archive, cleanup, run_fetchd, run_seed
from bench.wanproxy import MB, WanProxy
from tests.support import images as ti
from tests.support.registry import LocalRegistry

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results.json"
DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
COMPONENTS = ("bench_registry", "bench_store", "bench_pack", "bench_server")
WAN_RATE, WAN_DELAY = 30 * MB, 0.040
HEADER_SLACK = 64 * 1024  # HTTP headers and token/ping requests on top of the blob bytes
MiB = 1024 * 1024


# --------------------------------------------------------------------------- setup


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass

    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = bool(out(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "skopeo": out(["skopeo", "--version"]),
        "zstd": out(["zstd", "--version"]).split(",")[0].strip("* "),
        "commit": out(["git", "rev-parse", "--short", "HEAD"]) + ("+dirty" if dirty else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def push_all(reg: LocalRegistry, imgs: bimages.BenchImages) -> bimages.BenchImages:
    bound = {img.name: ti.push_image(reg, img) for img in imgs.all()}
    return dataclasses.replace(
        imgs, cold=bound[imgs.cold.name], multi=bound[imgs.multi.name],
        shared_first=bound[imgs.shared_first.name], shared_second=bound[imgs.shared_second.name],
        fanin=bound[imgs.fanin.name])


def _blobs(layers: Sequence[ti.Layer]) -> list[BlobInput]:
    seen: dict[str, BlobInput] = {}
    for layer in layers:
        src: bytes | Path = layer.data if layer.data is not None else layer.path  # type: ignore[assignment]
        seen.setdefault(str(layer.digest), BlobInput(src, layer.compression))
    return list(seen.values())


def scenario_inputs(imgs: bimages.BenchImages) -> dict[str, dict[str, Any]]:
    """Per scenario: the layers whose work the floor counts, and the registry bytes expected."""
    cold = imgs.cold.only
    multi_parts = [imgs.multi.platform(p) for p in imgs.arches]
    second = imgs.shared_second.only
    first_layers = {layer.digest for layer in imgs.shared_first.only.layers}
    new_layers = [layer for layer in second.layers if layer.digest not in first_layers]
    fan = imgs.fanin.platform(imgs.fanin_arch)

    def part_bytes(p: ti.PlatformImage, layers: Sequence[ti.Layer] | None = None) -> int:
        return p.config_size + p.manifest_size + sum(x.size for x in (layers or p.layers))

    index_bytes = len(imgs.multi.raw) if imgs.multi.is_index else 0
    fan_index = len(imgs.fanin.raw) if imgs.fanin.is_index else 0
    return {
        "cold": {"layers": list(cold.layers), "level": 3, "expect_bytes": part_bytes(cold)},
        "all": {"layers": [x for p in multi_parts for x in p.layers], "level": 3,
                "expect_bytes": index_bytes + sum(part_bytes(p) for p in multi_parts)},
        "shared": {"layers": new_layers, "level": 3,
                   "expect_bytes": part_bytes(second, new_layers)},
        "level": {"layers": list(cold.layers), "level": 9, "expect_bytes": 0},
        "fanin": {"layers": list(fan.layers), "level": 3,
                  "expect_bytes": fan_index + part_bytes(fan)},
        "fanin-one": {"layers": list(fan.layers), "level": 3,
                      "expect_bytes": fan_index + part_bytes(fan)},
    }


def measure_floors(inputs: dict[str, dict[str, Any]], runs: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, spec in inputs.items():
        if name == "fanin-one":
            continue
        r = median_floor(_blobs(spec["layers"]), spec["level"], runs)
        out[name] = {"seconds": round(r.seconds, 4), "cpu_s": round(r.cpu_s, 3), "blob_bytes": r.blob_bytes,
                     "tar_bytes": r.tar_bytes, "zst_bytes": r.zst_bytes, "level": r.level,
                     "threads": r.threads}
    out["fanin-one"] = out["fanin"]
    return out


def combine_floors(floor_runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per scenario: the median run's figures, with the median CPU and every run's seconds."""
    out: dict[str, dict[str, Any]] = {}
    for name in floor_runs[0] if floor_runs else ():
        runs = sorted((r[name] for r in floor_runs), key=lambda f: f["seconds"])
        out[name] = {**runs[len(runs) // 2],
                     "cpu_s": round(statistics.median(f["cpu_s"] for f in runs), 3),
                     "runs_s": [r[name]["seconds"] for r in floor_runs]}  # in run order
    return out


# --------------------------------------------------------------------------- checks


def check_outputs(imgs: bimages.BenchImages, fetchd: dict[str, Sample] | None,
                  seed: dict[str, Sample], full: bool) -> dict[str, Any]:
    """Check the .zst files of both sides; compare their tars (fetchd writes skopeo's format)."""
    expect = {
        "cold": [imgs.cold.only], "level": [imgs.cold.only], "shared": [imgs.shared_second.only],
        "all": [imgs.multi.platform(p) for p in imgs.arches],
        "fanin": [imgs.fanin.platform(imgs.fanin_arch)],
    }
    report: dict[str, Any] = {}
    for scen, parts in expect.items():
        entry: dict[str, Any] = {}
        for side, res in (("fetchd", fetchd), ("seed", seed)):
            if res is None or scen not in res:
                continue
            outs = res[scen].outputs
            if scen == "all":
                pairs = list(zip(outs, parts, strict=False))
            else:  # beyond --tiny, one file of each scenario is enough to prove the format
                pairs = [(o, parts[0]) for o in (outs if full else outs[:1])]
            checks = [check_archive(o, p) for o, p in pairs]
            entry[side] = {
                "files": len(checks), "valid": all(c.ok for c in checks) and bool(checks),
                "errors": [c.error for c in checks if not c.ok][:3],
                "repo_tags": list(checks[0].repo_tags) if checks else [],
                "tar_sha256": [c.tar_sha256 for c in checks],
            }
        if "fetchd" in entry and "seed" in entry:
            n = min(len(entry["fetchd"]["tar_sha256"]), len(entry["seed"]["tar_sha256"]))
            entry["identical_tar"] = (entry["fetchd"]["tar_sha256"][:n]
                                      == entry["seed"]["tar_sha256"][:n]) and n > 0
        report[scen] = entry
    return report


# --------------------------------------------------------------------------- aggregation


def _side_summary(samples: list[Sample]) -> dict[str, Any]:
    secs = [s.seconds for s in samples]
    return {
        "median_s": round(statistics.median(secs), 4),
        "cpu_s": round(statistics.median(s.cpu_s for s in samples), 3),
        "runs_s": [round(x, 4) for x in secs],
        "peak_rss_mb": round(max(s.peak_rss_kb for s in samples) / 1024, 1),
        "registry_bytes": int(statistics.median(s.registry_bytes for s in samples)),
        "extra": sorted(samples, key=lambda s: s.seconds)[len(samples) // 2].extra,
    }


def _per_run_ratio(pairs: list[tuple[float, float]]) -> float | None:
    """Median over runs of a/b: each run's two figures were taken minutes apart at most, so
    this follows a host whose load drifts better than a ratio of medians does."""
    ratios = [a / b for a, b in pairs if b > 0]
    return round(statistics.median(ratios), 3) if ratios else None


def aggregate(per_run: list[dict[str, dict[str, dict[str, Sample]]]], networks: Sequence[str],
              floors: dict[str, dict[str, Any]], inputs: dict[str, dict[str, Any]],
              floor_runs: Sequence[dict[str, dict[str, Any]]] = ()) -> list[dict[str, Any]]:
    """One row per scenario and network. ``ratio_seed``/``ratio_floor`` are medians of the
    per-run ratios (``*_of_medians`` keep the ratio of the medians)."""
    rows = []
    names = ["cold", "all", "shared", "level", "warm", "warm-small", "fanin-one", "fanin",
             "second-host-a", "second-host"]
    for net in networks:
        for scen in names:
            row: dict[str, Any] = {"scenario": scen, "network": net}
            for side in ("fetchd", "seed"):
                samples = [r[net][side][scen] for r in per_run
                           if side in r.get(net, {}) and scen in r[net][side]]
                if samples:
                    row[side] = _side_summary(samples)
            if scen == "warm" and "seed" in row:
                row["seed"]["note"] = "no cache: a fresh destination is a full run (= cold)"
            if scen == "warm-small" and "seed" in row:
                row["seed"]["note"] = "no cache: a fresh destination is a full run (= shared)"
            if "fetchd" in row and "seed" in row:
                row["ratio_seed"] = _per_run_ratio(
                    [(r[net]["fetchd"][scen].seconds, r[net]["seed"][scen].seconds)
                     for r in per_run if "fetchd" in r.get(net, {}) and "seed" in r.get(net, {})])
                row["ratio_seed_of_medians"] = round(
                    row["fetchd"]["median_s"] / row["seed"]["median_s"], 3)
                if row["seed"]["cpu_s"] > 0:
                    row["cpu_ratio_seed"] = round(row["fetchd"]["cpu_s"] / row["seed"]["cpu_s"], 3)
            if scen in floors:
                row["floor_s"] = floors[scen]["seconds"]
                if "fetchd" in row:
                    row["ratio_floor_of_medians"] = round(
                        row["fetchd"]["median_s"] / floors[scen]["seconds"], 3)
                    row["ratio_floor"] = _per_run_ratio(
                        [(r[net]["fetchd"][scen].seconds, fl[scen]["seconds"])
                         for r, fl in zip(per_run, floor_runs, strict=False)
                         if "fetchd" in r.get(net, {}) and scen in fl]
                    ) or row["ratio_floor_of_medians"]
                    if floors[scen]["cpu_s"] > 0:
                        row["cpu_ratio_floor"] = round(
                            row["fetchd"]["cpu_s"] / floors[scen]["cpu_s"], 3)
            if scen in inputs:
                row["expect_registry_bytes"] = inputs[scen]["expect_bytes"]
            if scen == "second-host" and "fetchd" in row:
                pairs = [(r[net]["fetchd"]["second-host"], r[net]["fetchd"]["second-host-a"])
                         for r in per_run if "second-host-a" in r.get(net, {}).get("fetchd", {})
                         and "second-host" in r[net]["fetchd"]]
                row["ratio_host_a"] = _per_run_ratio([(b.seconds, a.seconds) for b, a in pairs])
                row["cpu_ratio_host_a"] = _per_run_ratio([(b.cpu_s, a.cpu_s) for b, a in pairs])
            if "fetchd" in row or not scen.startswith("second-host"):
                rows.append(row)
    return rows


def _row(rows: list[dict[str, Any]], scen: str, net: str) -> dict[str, Any]:
    for r in rows:
        if r["scenario"] == scen and r["network"] == net:
            return r
    return {}


def evaluate_targets(rows: list[dict[str, Any]], networks: Sequence[str]) -> list[dict[str, Any]]:
    """The issue's targets, each met / missed / not measured, with the measured value."""
    out: list[dict[str, Any]] = []

    def add(name: str, target: str, value: Any, met: bool | None) -> None:
        out.append({"target": name, "wanted": target, "measured": value, "met": met})

    def ratio(scen: str, net: str, key: str = "ratio_seed") -> float | None:
        v = _row(rows, scen, net).get(key)
        return None if v is None else float(v)

    def check(v: float | None, limit: float) -> bool | None:
        return None if v is None else v <= limit

    if "loopback" in networks:
        v = ratio("cold", "loopback")
        add("cold, loopback", "<= 0.4x seed", v, check(v, 0.4))
        v = ratio("cold", "loopback", "ratio_floor")
        add("cold, loopback", "<= 1.3x compute floor", v, check(v, 1.3))
    if "wan" in networks:
        v = ratio("cold", "wan")
        add("cold, WAN-like", "<= 0.3x seed", v, check(v, 0.3))
    for net in networks:
        v = ratio("all", net)
        add(f"all platforms, {net}", "<= 0.3x seed", v, check(v, 0.3))
    for net in networks:
        r = _row(rows, "shared", net)
        v = ratio("shared", net)
        add(f"shared layers, {net}", "<= 0.15x seed", v, check(v, 0.15))
        if "fetchd" in r:
            got, want = r["fetchd"]["registry_bytes"], r["expect_registry_bytes"]
            add(f"shared layers, {net}", f"registry bytes = new layers only ({want} B)", got,
                got <= want + HEADER_SLACK)
    for net in networks:
        r = _row(rows, "level", net)
        if "fetchd" in r:
            got = r["fetchd"]["registry_bytes"]
            add(f"level change, {net}", "0 registry bytes", got, got == 0)
            v = ratio("level", net, "ratio_floor")
            add(f"level change, {net}", "<= time to compress the image once (floor at level 9)",
                v, check(v, 1.0))
    for net in networks:
        for scen in ("warm", "warm-small"):
            r = _row(rows, scen, net)
            if "fetchd" in r:
                ms = round(r["fetchd"]["median_s"] * 1000, 1)
                add(f"{scen}, {net}", "<= 50 ms per request", ms, ms <= 50)
    for net in networks:
        r, one = _row(rows, "fanin", net), _row(rows, "fanin-one", net)
        if "fetchd" in r:
            got, want = r["fetchd"]["registry_bytes"], r["expect_registry_bytes"]
            add(f"fan-in, {net}", f"registry bytes = 1x the image ({want} B)", got,
                got <= want + HEADER_SLACK)
            if "fetchd" in one:
                v = round(r["fetchd"]["median_s"] / one["fetchd"]["median_s"], 3)
                add(f"fan-in, {net}", "wall <= 1.3x one request", v, v <= 1.3)
    for net in networks:
        r = _row(rows, "second-host", net)
        if "fetchd" in r:
            v = r.get("ratio_host_a")
            add(f"second host (fleet frame cache), {net}", "<= 0.4x host A's cold pull", v,
                check(v, 0.4))
            v = r.get("cpu_ratio_host_a")
            add(f"second host (fleet frame cache), {net}", "CPU-s <= 0.35x host A's", v,
                check(v, 0.35))
    peaks = [(r["scenario"], r["network"], r["fetchd"]["peak_rss_mb"]) for r in rows if "fetchd" in r]
    if peaks:
        worst = max(peaks, key=lambda p: p[2])
        add("memory", "fetchd daemon peak RSS <= 250 MB in every scenario",
            f"{worst[2]} MB ({worst[0]}, {worst[1]})", worst[2] <= 250)
    return out


# --------------------------------------------------------------------------- components


def run_components() -> dict[str, Any]:
    """Run the component micro-benchmarks, merge their JSON (last JSON on stdout)."""
    out: dict[str, Any] = {}
    for name in COMPONENTS:
        argv = [sys.executable, "-m", f"bench.{name}"]
        try:
            p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            out[name] = {"error": "timed out after 600 s"}
            continue
        out[name] = _last_json(p.stdout) if p.returncode == 0 else \
            {"error": f"exit {p.returncode}: {p.stderr[-1500:]}"}
    return out


def _last_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {"error": "no JSON on stdout", "stdout": text[-1500:]}


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    networks = [n for n in args.networks.split(",") if n]
    imgs = bimages.tiny_set() if args.tiny else bimages.full_set()
    work = Path(tempfile.mkdtemp(prefix="fetchd-bench-", dir=args.workdir))
    log = _logger(args.verbose)
    errors: list[str] = []
    per_run: list[dict[str, dict[str, dict[str, Sample]]]] = []
    checks: dict[str, Any] = {}
    try:
        with LocalRegistry() as reg:
            t = time.perf_counter()
            imgs = push_all(reg, imgs)
            log(f"pushed {len(imgs.all())} images in {time.perf_counter() - t:.1f}s")
            inputs = scenario_inputs(imgs)
            floor_runs: list[dict[str, dict[str, Any]]] = []
            proxies = {"loopback": WanProxy(reg.host).start(),
                       "wan": WanProxy(reg.host, rate=WAN_RATE, delay=WAN_DELAY).start()}
            try:
                for i in range(args.runs):
                    runs: dict[str, dict[str, dict[str, Sample]]] = {}
                    for net in networks:
                        ctx = Context(imgs, proxies[net], work, fanin=args.fanin,
                                      warm_repeats=3 if args.quick else 5)
                        tag = f"{net}-{i}"
                        sides: dict[str, dict[str, Sample]] = {}
                        order = ("fetchd", "seed") if i % 2 == 0 else ("seed", "fetchd")
                        for side in order:
                            if side == "fetchd" and args.no_fetchd:
                                continue
                            t = time.perf_counter()
                            try:
                                sides[side] = (run_fetchd if side == "fetchd" else run_seed)(ctx, tag)
                            except Exception as e:  # reported, the other side still runs
                                errors.append(f"run {i} {net} {side}: {type(e).__name__}: {e}"[:4000])
                                log(errors[-1])
                                continue
                            log(f"run {i} {net} {side}: " + ", ".join(
                                f"{k} {v.seconds:.3f}s" for k, v in sides[side].items())
                                + f" ({time.perf_counter() - t:.0f}s)")
                        if "fetchd" in sides and not args.no_fleet:
                            # the fleet frame cache: host B after host A (fetchd only)
                            t = time.perf_counter()
                            try:
                                sides["fetchd"].update(run_second_host(ctx, tag))
                                log(f"run {i} {net} second host: " + ", ".join(
                                    f"{k} {sides['fetchd'][k].seconds:.3f}s"
                                    for k in ("second-host-a", "second-host"))
                                    + f" ({time.perf_counter() - t:.0f}s)")
                            except Exception as e:  # reported, the rest still runs
                                errors.append(f"run {i} {net} second host: {type(e).__name__}: "
                                              f"{e}"[:4000])
                                log(errors[-1])
                        if i == 0 and net == networks[0] and "seed" in sides:
                            checks = check_outputs(imgs, sides.get("fetchd"), sides["seed"],
                                                   full=args.tiny)
                        runs[net] = sides
                        if not args.keep:
                            cleanup(ctx, tag)
                    per_run.append(runs)
                    # The floor once per run, between the sides' runs: it meets the same load.
                    floor_runs.append(measure_floors(inputs, 1))
                    log("floors: " + ", ".join(f"{k} {v['seconds']:.2f}s"
                                               for k, v in floor_runs[-1].items()))
            finally:
                for p in proxies.values():
                    p.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    floors = combine_floors(floor_runs)
    rows = aggregate(per_run, networks, floors, inputs, floor_runs)
    results: dict[str, Any] = {
        "machine": {**machine_info(), "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"runs": args.runs, "quick": args.quick, "tiny": args.tiny,
                     "networks": networks, "fanin": args.fanin,
                     "wan": {"rate_MBps_per_connection": WAN_RATE / MB, "delay_ms": WAN_DELAY * 1000},
                     "seed_threads": os.cpu_count()},
        "images": {img.name: {"platforms": len(img.platforms), **bimages.image_bytes(img)}
                   for img in imgs.all()},
        "floors": floors,
        "scenarios": rows,
        "targets": evaluate_targets(rows, networks),
        "checks": checks,
        "errors": errors,
        "components": {} if args.tiny or args.no_components else run_components(),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    return results


def _logger(verbose: bool) -> Any:
    def log(msg: str) -> None:
        if verbose:
            print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    return log


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 run (unless --runs), fewer repeats")
    p.add_argument("--runs", type=int, default=None, help="runs of each scenario (default 3, quick 1)")
    p.add_argument("--tiny", action="store_true",
                   help="small catalog images: checks the harness, measures nothing useful")
    p.add_argument("--networks", default="loopback,wan", help="comma list of loopback,wan")
    p.add_argument("--fanin", type=int, default=16, help="concurrent requests in the fan-in scenario")
    p.add_argument("--no-fetchd", action="store_true", help="seed side only")
    p.add_argument("--no-components", action="store_true", help="skip bench/bench_*.py")
    p.add_argument("--no-fleet", action="store_true",
                   help="skip the second-host (fleet frame cache) scenario")
    p.add_argument("--out", type=Path, default=None,
                   help="write results.json and BENCHMARKS.md here instead of bench/ and docs/")
    p.add_argument("--workdir", default=None, help="scratch parent directory (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("-q", "--quiet", dest="verbose", action="store_false")
    a = p.parse_args(argv)
    if a.runs is None:
        a.runs = 1 if a.quick or a.tiny else 3
    return a


def _complete(args: argparse.Namespace) -> bool:
    """A run fit to be recorded in the repository: every scenario, side and network."""
    networks = {n for n in args.networks.split(",") if n}
    return not (args.quick or args.tiny or args.no_fetchd) and networks == {"loopback", "wan"}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    from bench.report import render_markdown, write_doc

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "BENCHMARKS.md").write_text(render_markdown(results) + "\n")
    elif not _complete(args):  # only complete, full runs are recorded in the repository
        print(json.dumps(results, indent=1))
    else:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        write_doc(DOC, render_markdown(results), BEGIN, END)
    printed_json = args.out is None and not _complete(args)
    print(render_markdown(results), file=sys.stderr if printed_json else sys.stdout)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
