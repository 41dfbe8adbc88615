"""Benchmark: fetchd's pack of the ~588 MB-tar ``big`` image vs Isar's skopeo + zstd pipeline.

Same machine, same run, same bytes (the big layer of tests/support/images.py, generated once and
cached in ~/.cache/fetchd-tests):

- ``fetchd``: ``pack_image`` at level 3 into an empty store (no cached frames), in a child
  process so its peak RSS is its own;
- ``fetchd_cached_frames``: another name:tag of the same image (layer frame reused);
- ``skopeo_zstd``: ``skopeo copy dir:D docker-archive:T:NAME:TAG`` then ``zstd --threads=N -3``
  (Isar's pipeline after the download);
- ``floor``: the compute floor, isal gunzip feeding python-zstandard level 3 with all cores
  into /dev/null (no hashing, no files), plus the CPU-time floor (gunzip + zstd CPU / cores).

Prints one JSON object. Targets: fetchd >= 2x faster than skopeo_zstd, fetchd / floor <= 1.3.
Usage: ``python bench/bench_pack.py [--level 3] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _big() -> Any:
    from support.images import build_big_layer, make_big_image

    return make_big_image(build_big_layer())


def _fill_store(store_dir: Path) -> None:
    from fetchd.layer_store import LayerStore, StoreSettings

    part = _big().only
    store = LayerStore(store_dir, StoreSettings(fsync=False))
    for data_path, digest in [(None, part.config_digest), (part.layers[0].path, part.layers[0].digest)]:
        tmp = store.temp_path()
        if data_path is None:
            tmp.write_bytes(part.config_bytes)
        else:
            os.link(data_path, tmp) if _same_fs(data_path, tmp) else shutil.copyfile(data_path, tmp)
            tmp.chmod(0o644)
        store.commit_file(tmp, digest=digest)
    store.close()


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b.parent).st_dev


def child_pack(store_dir: str, repo_tag: str, level: int) -> None:
    """Runs in a child process: one pack, prints its JSON result."""
    from fetchd.layer_store import LayerStore, StoreSettings
    from fetchd.manifest import ImageManifest, parse_manifest
    from fetchd.pack import pack_image

    part = _big().only
    manifest = parse_manifest(part.manifest_bytes, part.manifest_media_type, "big")
    assert isinstance(manifest, ImageManifest)
    store = LayerStore(Path(store_dir), StoreSettings(fsync=False))
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    result = asyncio.run(pack_image(store, manifest, part.config_bytes, repo_tag, level))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    store.close()
    print(json.dumps({"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "size": result.size,
                      "frames_compressed": result.frames_compressed,
                      "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def run_child(store_dir: Path, repo_tag: str, level: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child-pack", str(store_dir), repo_tag,
                          str(level)], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def skopeo_pipeline(work: Path, level: int, threads: int) -> dict[str, Any]:
    """skopeo dir: -> docker-archive:, then zstd, as Isar does after its download."""
    part = _big().only
    d = work / "dir"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    (d / "version").write_text("Directory Transport Version: 1.1\n")
    (d / "manifest.json").write_bytes(part.manifest_bytes)
    (d / part.config_digest.hex).write_bytes(part.config_bytes)
    layer = part.layers[0]
    os.link(layer.path, d / layer.digest.hex) if _same_fs(layer.path, d / "x") else shutil.copyfile(
        layer.path, d / layer.digest.hex)
    tar = work / "big.tar"
    tar.unlink(missing_ok=True)
    Path(str(tar) + ".zst").unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run(["skopeo", "copy", "-q", f"dir:{d}", f"docker-archive:{tar}:fetchd-test/big:latest"],
                   check=True)
    t1 = time.perf_counter()
    subprocess.run(["zstd", "-q", "-f", "--rm", f"--threads={threads}", f"-{level}", str(tar)], check=True)
    t2 = time.perf_counter()
    size = Path(str(tar) + ".zst").stat().st_size
    shutil.rmtree(d, ignore_errors=True)
    return {"wall_s": round(t2 - t0, 3), "skopeo_s": round(t1 - t0, 3), "zstd_s": round(t2 - t1, 3),
            "size": size}


def compute_floor(level: int, threads: int) -> dict[str, Any]:
    """isal gunzip -> zstd (all cores) -> /dev/null: the work pack cannot avoid."""
    import zstandard

    from fetchd.decompress import decompressed_chunks

    layer = _big().only.layers[0]
    # pipeline floor: one pass, all cores
    t0, c0 = time.perf_counter(), time.process_time()
    with open(layer.path, "rb") as src, open(os.devnull, "wb") as null:
        cctx = zstandard.ZstdCompressor(level=level, threads=threads)
        with cctx.stream_writer(null, closefd=False) as w:
            for chunk in decompressed_chunks(src):
                w.write(chunk)
    pipeline_wall, pipeline_cpu = time.perf_counter() - t0, time.process_time() - c0
    # gunzip alone (one core)
    t0 = time.perf_counter()
    with open(layer.path, "rb") as src:
        for _ in decompressed_chunks(src):
            pass
    gunzip = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    return {"pipeline_wall_s": round(pipeline_wall, 3), "pipeline_cpu_s": round(pipeline_cpu, 3),
            "gunzip_s": round(gunzip, 3), "cpu_floor_s": round(pipeline_cpu / cores, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--child-pack", nargs=3, metavar=("STORE", "REPO_TAG", "LEVEL"))
    args = parser.parse_args()
    if args.child_pack:
        child_pack(args.child_pack[0], args.child_pack[1], int(args.child_pack[2]))
        return
    cores = os.cpu_count() or 1
    part = _big().only
    work = Path(tempfile.mkdtemp(prefix="fetchd-bench-", dir=os.environ.get("FETCHD_BENCH_DIR")))
    try:
        fetchd_runs, cached_runs, skopeo_runs, floors = [], [], [], []
        for i in range(args.repeat):
            store_dir = work / f"store{i}"
            _fill_store(store_dir)
            fetchd_runs.append(run_child(store_dir, "fetchd-test/big:latest", args.level))
            cached_runs.append(run_child(store_dir, "fetchd-test/big:other", args.level))
            shutil.rmtree(store_dir, ignore_errors=True)
            skopeo_runs.append(skopeo_pipeline(work, args.level, cores))
            floors.append(compute_floor(args.level, cores))
        best = min(fetchd_runs, key=lambda r: r["wall_s"])
        best_skopeo = min(skopeo_runs, key=lambda r: r["wall_s"])
        best_floor = min(floors, key=lambda r: r["pipeline_wall_s"])
        report = {
            "image": {"layer_gzip_bytes": part.layers[0].size, "tar_bytes": part.layers[0].tar_size},
            "level": args.level, "cores": cores,
            "fetchd": best, "fetchd_runs": fetchd_runs,
            "fetchd_cached_frames": min(cached_runs, key=lambda r: r["wall_s"]),
            "skopeo_zstd": best_skopeo, "skopeo_runs": skopeo_runs,
            "floor": best_floor,
            "speedup_vs_skopeo": round(best_skopeo["wall_s"] / best["wall_s"], 2),
            "median_speedup_vs_skopeo": round(
                statistics.median(r["wall_s"] for r in skopeo_runs)
                / statistics.median(r["wall_s"] for r in fetchd_runs), 2),
            "ratio_to_floor": round(best["wall_s"] / best_floor["pipeline_wall_s"], 2),
            "ratio_to_cpu_floor": round(best["wall_s"] / best_floor["cpu_floor_s"], 2),
            # CPU seconds against the floor pipeline's: robust when other work shares the host
            "cpu_ratio_to_floor": round(best["cpu_s"] / best_floor["pipeline_cpu_s"], 2),
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "peak_rss_mb": max(r["maxrss_mb"] for r in fetchd_runs),
            "targets": {"speedup_vs_skopeo": ">= 2", "ratio_to_floor": "<= 1.3",
                        "peak_rss_mb": "< 200"},
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
