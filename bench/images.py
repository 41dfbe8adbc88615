"""Benchmark images that the test catalog does not have, built with its helpers.

- ``multi5``: an OCI index of 5 linux platforms (amd64, arm64/v8, arm/v7, 386, riscv64),
  3 gzip layers each (~55 + 15 + 5 MB of tar, ~75 MB per platform). As in real multi-arch
  images, no layer is shared between platforms (each arch has its own binaries).
- ``shared-base-a`` / ``shared-base-b``: two single-platform images that share two base layers
  (~60 + 30 MB of tar) and differ in their top layer (~8 MB and ~12 MB).
- ``big``: the infra catalog's big image (one ~163 MB gzip layer, ~588 MB tar).

Layers are generated once, deterministically, and cached as files under
``$FETCHD_TEST_CACHE`` (default ``~/.cache/fetchd-tests``) next to the big layer; a cache
entry is written under a temporary name, then renamed, under a lock.

``tiny_set()`` returns the same roles filled with small catalog images, for the harness test.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isal import isal_zlib

from fetchd.digest import Digest
from tests.support import images as ti

BENCH_VERSION = 1
MiB = 1024 * 1024
MULTI5_PLATFORMS = ("linux/amd64", "linux/arm64/v8", "linux/arm/v7", "linux/386", "linux/riscv64")
MULTI5_LAYER_SIZES = (55 * MiB, 15 * MiB, 5 * MiB)
SHARED_BASE_SIZES = (60 * MiB, 30 * MiB)
SHARED_TOP_SIZES = {"shared-base-a": 8 * MiB, "shared-base-b": 12 * MiB}


@dataclass(frozen=True)
class BenchImages:
    """The images of one benchmark run, by role, not yet pushed.

    ``cold``: one platform, the big image; ``multi``: the all-platforms image (``arches``
    are its platforms); ``shared_first`` then ``shared_second``: share their base layers;
    ``fanin``/``fanin_arch``: what 16 clients ask for at once.
    """

    cold: ti.CatalogImage
    multi: ti.CatalogImage
    arches: tuple[str, ...]
    shared_first: ti.CatalogImage
    shared_second: ti.CatalogImage
    fanin: ti.CatalogImage
    fanin_arch: str

    def all(self) -> list[ti.CatalogImage]:
        seen: dict[str, ti.CatalogImage] = {}
        for img in (self.cold, self.multi, self.shared_first, self.shared_second, self.fanin):
            seen.setdefault(img.name, img)
        return list(seen.values())


def _write_tar(out: io.RawIOBase, seed: str, target: int, pool: bytes) -> None:
    rng = random.Random(seed)
    buffered = io.BufferedWriter(out, MiB)
    with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        total, d = 0, 0
        while total < target:
            dirname = f"usr/lib/{seed.rsplit('/', 1)[-1]}/d{d:03d}"
            tf.addfile(ti._tarinfo(ti.Entry(dirname, kind="dir")))
            for f in range(rng.randint(5, 40)):
                size = min(int(2 ** rng.uniform(9, 21)), max(512, target - total))
                data = ti.rootfs_bytes(rng, pool, size, random_share=0.06, text_share=0.40, run=200)
                tf.addfile(ti._tarinfo(ti.Entry(f"{dirname}/f{f:03d}", data, mode=0o755)),
                           io.BytesIO(data))
                total += size + 512
            d += 1
    buffered.flush()


def cache_dir() -> Path:
    return ti.default_cache_dir() / f"bench-v{BENCH_VERSION}"


def generated_layer(seed: str, tar_target: int) -> ti.Layer:
    """A gzip layer of about ``tar_target`` bytes of tar, cached on disk by ``seed``."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{seed}/{tar_target}".encode()).hexdigest()[:16]
    blob, meta_path = root / f"{key}.tar.gz", root / f"{key}.json"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if meta_path.exists() and blob.exists():
            meta = json.loads(meta_path.read_text())
            if blob.stat().st_size == meta["size"]:
                return _layer(blob, meta)
        tmp = blob.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            # Level 2: about the ratio of gzip -6 on this content, and fast to generate.
            sink = ti.GzipSink(out, isal_zlib.compressobj(2, isal_zlib.DEFLATED, 31))
            _write_tar(sink, seed, tar_target, _pool())
            sink.finish()
            out.flush()
            os.fsync(out.fileno())
        meta = {"seed": seed, "digest": f"sha256:{sink.blob_hash.hexdigest()}",
                "size": sink.blob_size, "diff_id": f"sha256:{sink.tar_hash.hexdigest()}",
                "tar_size": sink.tar_size}
        os.replace(tmp, blob)
        meta_path.write_text(json.dumps(meta))
        return _layer(blob, meta)


_POOL: list[bytes] = []


def _pool() -> bytes:
    if not _POOL:
        _POOL.append(ti.text_bytes("fetchd-bench-pool", 8 * MiB))
    return _POOL[0]


def _layer(blob: Path, meta: dict[str, Any]) -> ti.Layer:
    return ti.Layer(ti.LAYER_TYPES[("oci", "gzip")], Digest.parse(meta["digest"]), meta["size"],
                    Digest.parse(meta["diff_id"]), "gzip", meta["tar_size"], path=blob)


def multi5() -> ti.CatalogImage:
    parts = []
    for plat in MULTI5_PLATFORMS:
        layers = [generated_layer(f"multi5/{plat}/{i}", size)
                  for i, size in enumerate(MULTI5_LAYER_SIZES)]
        parts.append(ti.make_image(plat, layers, cmd=("/bin/bash",)))
    return ti.make_index("multi5", "fetchd-bench/multi5", "latest", parts)


def shared_pair() -> tuple[ti.CatalogImage, ti.CatalogImage]:
    base = [generated_layer(f"shared/base{i}", size) for i, size in enumerate(SHARED_BASE_SIZES)]
    out = []
    for name, size in SHARED_TOP_SIZES.items():
        top = generated_layer(f"{name}/top", size)
        part = ti.make_image("linux/amd64", [*base, top], cmd=("/bin/bash",))
        out.append(ti.single(name, f"fetchd-bench/{name}", "latest", part))
    return out[0], out[1]


def _big_image() -> ti.CatalogImage:
    layer = ti.build_big_layer()
    return ti.make_big_image(layer)


def full_set() -> BenchImages:
    big = _big_image()
    multi = multi5()
    first, second = shared_pair()
    return BenchImages(big, multi, MULTI5_PLATFORMS, first, second, multi, "linux/amd64")


def tiny_set() -> BenchImages:
    """Small catalog images in the same roles: seconds, not minutes (for the harness test)."""
    cat = {img.name: img for img in ti.build_catalog()}
    multi = cat["multi-oci"]
    return BenchImages(cat["single-oci"], multi, ti.MULTI_OCI_PLATFORMS[:5], cat["shared-a"],
                       cat["shared-b"], multi, "linux/amd64")


def image_bytes(img: ti.CatalogImage, platforms: tuple[str, ...] | None = None) -> dict[str, int]:
    """Distinct blob bytes (config + layers) and tar bytes of ``platforms`` (default: all)."""
    parts = [img.platform(p) for p in platforms] if platforms else list(img.platforms.values())
    blobs: dict[Digest, tuple[int, int]] = {}
    for part in parts:
        blobs[part.config_digest] = (part.config_size, 0)
        for layer in part.layers:
            blobs[layer.digest] = (layer.size, layer.tar_size)
    return {"blob_bytes": sum(s for s, _ in blobs.values()),
            "tar_bytes": sum(t for _, t in blobs.values())}
