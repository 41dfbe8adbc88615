"""The six scenarios, each for fetchd and for the seed pipeline, on one network.

A *network* is a proxy in front of the registry (``bench.wanproxy``): ``loopback`` counts bytes
only, ``wan`` also caps each connection and delays each response. Image references use the
proxy's ``host:port``, so every registry byte of both sides is counted there.

Each ``run_*`` function performs one run of one side and returns ``{scenario: Sample}``:

fetchd, one fresh daemon + store per group:
- ``cold`` (big, level 3) -> ``level`` (same image, level 9) -> ``warm`` (big, level 3, fresh
  destinations; the median of ``warm_repeats`` requests);
- ``all`` (every platform of the multi image, concurrently);
- ``shared`` (the second image after the first one was fetched unmeasured) -> ``warm-small``;
- ``fanin-one`` (one request, fresh daemon) and ``fanin`` (N concurrent, fresh daemon).

seed: the same requests through skopeo + zstd in fresh directories. It has no cache, so a
"warm" request into a fresh destination costs a full run: ``warm`` repeats ``cold``'s work and
the harness reuses the ``cold`` samples for it instead of spending minutes on it again.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import statistics
import tarfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from bench.daemon import Daemon, FetchSpec
from bench.images import BenchImages
from bench.rss import PeakRss, cpu_seconds
from bench.seed import SeedResult, seed_pull
from bench.wanproxy import WanProxy
from tests.support import images as ti

SCENARIOS = ("cold", "all", "shared", "level", "warm", "warm-small", "fanin-one", "fanin")


@dataclass
class Sample:
    """One measured step of one side."""

    seconds: float
    peak_rss_kb: int
    registry_bytes: int
    outputs: list[Path] = field(default_factory=list)
    cpu_s: float = 0.0  # CPU seconds (user + system) of the side's processes in the step
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What a run needs: pushed images, the network's proxy, a scratch dir, knobs."""

    images: BenchImages
    proxy: WanProxy
    workdir: Path
    fanin: int = 16
    warm_repeats: int = 5
    threads: int | None = None


def plat_arch(platform: str) -> str:
    """``linux/arm/v7`` -> ``arm/v7`` (what the seed passes to --override-arch/variant)."""
    return platform.split("/", 1)[1]


def name_tag(img: ti.CatalogImage) -> str:
    """The name:tag both sides write into RepoTags (no registry host: see bench.seed)."""
    return f"{img.repository}:{img.tag}"


def _measure(ctx: Context, pid: int | None, step: Callable[[], list[Path]]) -> Sample:
    """Time ``step`` with the proxy's byte counter and (for the daemon) its peak RSS."""
    ctx.proxy.reset()
    if pid is None:
        start = time.perf_counter()
        outputs = step()
        seconds = time.perf_counter() - start
        peak, cpu = 0, 0.0
    else:
        with PeakRss(pid) as rss:
            cpu0 = cpu_seconds(pid)
            start = time.perf_counter()
            outputs = step()
            seconds = time.perf_counter() - start
            cpu = cpu_seconds(pid) - cpu0
        peak = rss.peak_kb
    sample = Sample(seconds, peak, ctx.proxy.reset().bytes_down, outputs, cpu_s=cpu)
    if pid is not None and _LAST_PHASES:
        # timelines of up to 5 requests (fan-in would repeat the same one 16 times)
        sample.extra["timeline"] = list(_LAST_PHASES[:5])
        _LAST_PHASES.clear()
    return sample


# --------------------------------------------------------------------------- fetchd


def _spec(ctx: Context, img: ti.CatalogImage, platform: str, dest: Path, level: int = 3
          ) -> FetchSpec:
    return FetchSpec(img.ref(ctx.proxy.host), platform, dest, level, name_tag(img))


def _fetch(daemon: Daemon, specs: Sequence[FetchSpec]) -> list[Path]:
    results = daemon.fetch_many(specs)
    _LAST_PHASES[:] = [{"platform": s.platform, "seconds": r.get("_seconds"),
                        **r.get("_phases", {})} for r, s in zip(results, specs, strict=True)]
    return [Path(r.get("path") or s.dest) for r, s in zip(results, specs, strict=True)]


# The event timeline of the last _fetch (the harness runs one measured step at a time).
_LAST_PHASES: list[dict[str, Any]] = []


def _warm(ctx: Context, daemon: Daemon, img: ti.CatalogImage, platform: str, out: Path
          ) -> Sample:
    def one(i: int) -> Callable[[], list[Path]]:
        return lambda: _fetch(daemon, [_spec(ctx, img, platform, out / f"warm{i}.zst")])

    samples = [_measure(ctx, daemon.pid, one(i)) for i in range(ctx.warm_repeats)]
    samples.sort(key=lambda s: s.seconds)
    mid = samples[len(samples) // 2]
    mid.extra["repeats"] = [round(s.seconds, 4) for s in samples]
    mid.peak_rss_kb = max(s.peak_rss_kb for s in samples)
    mid.registry_bytes = max(s.registry_bytes for s in samples)
    mid.cpu_s = statistics.median(s.cpu_s for s in samples)
    return mid


def run_fetchd(ctx: Context, tag: str) -> dict[str, Sample]:
    """One run of every scenario for fetchd; ``tag`` names this run's scratch dirs."""
    imgs, out = ctx.images, ctx.workdir / f"fetchd-{tag}"
    cold_plat = next(iter(imgs.cold.platforms))
    res: dict[str, Sample] = {}
    with Daemon(out / "d1") as d:
        res["cold"] = _measure(ctx, d.pid, lambda: _fetch(
            d, [_spec(ctx, imgs.cold, cold_plat, out / "cold.zst")]))
        res["level"] = _measure(ctx, d.pid, lambda: _fetch(
            d, [_spec(ctx, imgs.cold, cold_plat, out / "level9.zst", level=9)]))
        res["warm"] = _warm(ctx, d, imgs.cold, cold_plat, out / "warm")
    with Daemon(out / "d2") as d:
        res["all"] = _measure(ctx, d.pid, lambda: _fetch(
            d, [_spec(ctx, imgs.multi, p, out / "all" / f"{plat_arch(p).replace('/', '_')}.zst")
                for p in imgs.arches]))
    with Daemon(out / "d3") as d:
        first_plat = next(iter(imgs.shared_first.platforms))
        second_plat = next(iter(imgs.shared_second.platforms))
        _fetch(d, [_spec(ctx, imgs.shared_first, first_plat, out / "shared-first.zst")])
        res["shared"] = _measure(ctx, d.pid, lambda: _fetch(
            d, [_spec(ctx, imgs.shared_second, second_plat, out / "shared.zst")]))
        res["warm-small"] = _warm(ctx, d, imgs.shared_second, second_plat, out / "warm-small")
    with Daemon(out / "d4") as d:
        res["fanin-one"] = _measure(ctx, d.pid, lambda: _fetch(
            d, [_spec(ctx, imgs.fanin, imgs.fanin_arch, out / "fanin-one.zst")]))
    with Daemon(out / "d5") as d:
        res["fanin"] = _measure(ctx, d.pid, lambda: _fetch(
            d, [_spec(ctx, imgs.fanin, imgs.fanin_arch, out / "fanin" / f"{i}.zst")
                for i in range(ctx.fanin)]))
    return res


# --------------------------------------------------------------------------- seed


def _seed_sample(ctx: Context, runs: Callable[[], list[SeedResult]]) -> Sample:
    holder: list[list[SeedResult]] = []

    def step() -> list[Path]:
        holder.append(runs())
        return [r.output for r in holder[0]]

    sample = _measure(ctx, None, step)
    sample.peak_rss_kb = max(r.maxrss_kb for r in holder[0])
    sample.cpu_s = sum(r.cpu_s for r in holder[0])
    sample.extra["steps_s"] = [[round(s.seconds, 3) for s in r.steps] for r in holder[0]]
    return sample


def _seed_one(ctx: Context, img: ti.CatalogImage, platform: str, where: Path, level: int = 3
              ) -> SeedResult:
    return seed_pull(img.ref(ctx.proxy.host), plat_arch(platform), name_tag(img), where,
                     level=level, threads=ctx.threads)


def run_seed(ctx: Context, tag: str) -> dict[str, Sample]:
    """One run of every scenario for the seed pipeline (``warm`` excepted: see module doc)."""
    imgs, out = ctx.images, ctx.workdir / f"seed-{tag}"
    cold_plat = next(iter(imgs.cold.platforms))
    second_plat = next(iter(imgs.shared_second.platforms))
    res: dict[str, Sample] = {}
    res["cold"] = _seed_sample(ctx, lambda: [_seed_one(ctx, imgs.cold, cold_plat, out / "cold")])
    res["level"] = _seed_sample(ctx, lambda: [_seed_one(ctx, imgs.cold, cold_plat, out / "level9",
                                                        level=9)])
    res["all"] = _seed_sample(ctx, lambda: [
        _seed_one(ctx, imgs.multi, p, out / "all" / plat_arch(p).replace("/", "_"))
        for p in imgs.arches])
    # Isar shares nothing between images: the second image is a full pipeline run.
    res["shared"] = _seed_sample(ctx, lambda: [
        _seed_one(ctx, imgs.shared_second, second_plat, out / "shared")])
    res["warm-small"] = res["shared"]
    res["fanin-one"] = _seed_sample(ctx, lambda: [
        _seed_one(ctx, imgs.fanin, imgs.fanin_arch, out / "fanin-one")])

    def fanin() -> list[SeedResult]:
        with ThreadPoolExecutor(max_workers=ctx.fanin) as pool:
            return list(pool.map(lambda i: _seed_one(ctx, imgs.fanin, imgs.fanin_arch,
                                                     out / "fanin" / str(i)), range(ctx.fanin)))

    res["fanin"] = _seed_sample(ctx, fanin)
    res["warm"] = res["cold"]
    return res


def cleanup(ctx: Context, tag: str) -> None:
    for side in ("fetchd", "seed"):
        shutil.rmtree(ctx.workdir / f"{side}-{tag}", ignore_errors=True)


# --------------------------------------------------------------------------- checking outputs


@dataclass(frozen=True)
class ArchiveCheck:
    """What a .zst docker-archive holds: tar digest, RepoTags, layer members and their check."""

    ok: bool
    tar_sha256: str
    repo_tags: tuple[str, ...]
    layers: int
    error: str = ""


def check_archive(path: Path, expect: ti.PlatformImage | None = None) -> ArchiveCheck:
    """Decompress ``path`` (all frames), read it as a tar, check manifest.json and layers.

    With ``expect``, every layer member must hash to the config's diff_id, in order, and the
    config member must be the registry's exact bytes.
    """
    tar_hash = hashlib.sha256()
    members: dict[str, str] = {}
    manifest: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            hashing = _HashingReader(reader, tar_hash)
            with tarfile.open(fileobj=hashing, mode="r|") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    fobj = tf.extractfile(m)
                    assert fobj is not None
                    if m.name == "manifest.json":
                        manifest = json.loads(fobj.read())
                        continue
                    h = hashlib.sha256()
                    while chunk := fobj.read(1 << 20):
                        h.update(chunk)
                    members[m.name] = h.hexdigest()
            while hashing.read(1 << 20):
                pass
        if len(manifest) != 1:
            raise ValueError(f"manifest.json has {len(manifest)} entries")
        entry = manifest[0]
        layer_names = list(entry["Layers"])
        for name in [entry["Config"], *layer_names]:
            if name not in members:
                raise ValueError(f"manifest.json names {name}, which is not in the archive")
        if expect is not None:
            if members[entry["Config"]] != expect.config_digest.hex:
                raise ValueError("config member differs from the registry's config bytes")
            got = [members[n] for n in layer_names]
            want = [d.hex for d in expect.diff_ids]
            if got != want:
                raise ValueError(f"layer digests {got} != diff_ids {want}")
        return ArchiveCheck(True, tar_hash.hexdigest(), tuple(entry.get("RepoTags") or ()),
                            len(layer_names))
    except Exception as e:  # reported in results, never raised: a bad file is a finding
        return ArchiveCheck(False, tar_hash.hexdigest(), (), 0, f"{type(e).__name__}: {e}")


class _HashingReader(io.RawIOBase):
    def __init__(self, inner: Any, h: Any) -> None:
        self.inner, self.h = inner, h

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.inner.read(len(b))
        n = len(data)
        b[:n] = data
        self.h.update(data)
        return n
