"""Garbage collection and verification of the layer store (``LayerStore.gc/verify``).

gc invariants:
- A blob under a live lease is never removed: the lease check and the unlink happen
  inside one write transaction of the index, so a lease taken concurrently either
  sees the blob gone (and its ensure_blob fetches it again) or protects it.
- A blob whose digest lock is held (an ingest or commit in progress) is skipped.
- Eviction is least-recently-used first; the ``blobs`` table is reconciled with the
  directory first, so files committed by a crashed process are accounted too.
- Only one gc runs at a time on the host (``locks/gc.lock``).
- Partial downloads (``ingest/*.part``) count in the store's size. Under pressure (a target
  size) the idle ones (no flight holds their digest's lock) go first, oldest first, before
  any complete blob; one uid's idle partials are kept within ``max_ingest_per_uid``
  (``cap_partials``), oldest reaped first. A partial being written is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .digest import Digest
from .ingest import FileLock, hash_file
from .store_index import StoreIndex


class GcSettings(Protocol):
    @property
    def max_size(self) -> int | None: ...
    @property
    def high_watermark(self) -> float: ...
    @property
    def low_watermark(self) -> float: ...
    @property
    def stale_ingest_age(self) -> float: ...
    @property
    def tag_cache_max_age(self) -> float: ...


class GcStore(Protocol):
    """What gc and verify need of ``LayerStore`` (kept structural: no import cycle)."""

    @property
    def settings(self) -> GcSettings: ...
    @property
    def index(self) -> StoreIndex: ...
    @property
    def ingest_dir(self) -> Path: ...
    @property
    def tmp_dir(self) -> Path: ...
    @property
    def locks_dir(self) -> Path: ...
    @property
    def quarantine_dir(self) -> Path: ...
    def blob_path(self, digest: Digest) -> Path: ...


@dataclass(frozen=True)
class GcReport:
    removed: int
    freed_bytes: int
    remaining_bytes: int
    remaining_count: int
    skipped_leased: int
    reaped_ingests: int
    reaped_tmp: int
    dropped_tags: int
    dropped_aliases: int
    dropped_images: int
    reaped_partial_bytes: int = 0


@dataclass(frozen=True)
class Partial:
    """A partial download in ingest/: its file, size on disk, age and the uid it was for."""

    path: Path
    digest: Digest
    size: int
    mtime: float
    uid: int | None


def scan_partials(store: GcStore) -> list[Partial]:
    """Every ``.part`` file in ingest/ with its owner (from its sidecar), oldest first."""
    found = []
    for entry in os.scandir(store.ingest_dir):
        if not entry.name.endswith(".part"):
            continue
        alg, _, hexpart = entry.name[: -len(".part")].partition("-")
        try:
            d = Digest.parse(f"{alg}:{hexpart}")
            st = entry.stat()
        except (ValueError, OSError):
            continue
        uid = None
        try:
            state = json.loads(Path(entry.path).with_suffix(".state").read_text())
            uid = state.get("uid") if isinstance(state.get("uid"), int) else None
        except (OSError, ValueError, AttributeError):
            pass
        found.append(Partial(Path(entry.path), d, st.st_blocks * 512 or st.st_size, st.st_mtime, uid))
    found.sort(key=lambda p: p.mtime)
    return found


def reap_partials(store: GcStore, partials: list[Partial], need: int) -> tuple[int, int]:
    """Remove idle ``partials`` in the order given until ``need`` bytes are freed;
    (count, bytes) removed. A partial whose digest lock is held (being written) is skipped."""
    count = freed = 0
    for partial in partials:
        if freed >= need:
            break
        lock = _lock_of(store, partial.digest)
        if not lock.try_acquire():
            continue
        try:
            for p in (partial.path, partial.path.with_suffix(".state")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        finally:
            lock.release(unlink=True)
        count += 1
        freed += partial.size
    return count, freed


def cap_partials(store: GcStore, partials: list[Partial], uid: int | None,
                 cap: int | None) -> tuple[int, int]:
    """Keep ``uid``'s idle ones of ``partials`` (``scan_partials``) within ``cap`` bytes,
    oldest reaped first."""
    if cap is None or uid is None:
        return 0, 0
    mine = [p for p in partials if p.uid == uid]
    over = sum(p.size for p in mine) - cap
    return reap_partials(store, mine, over) if over > 0 else (0, 0)


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    bytes_checked: int
    corrupt: tuple[Digest, ...]
    quarantined: tuple[Path, ...]


def scan_blobs(store: GcStore) -> dict[Digest, os.stat_result]:
    """Every file under blobs/<alg>/ whose name is a valid digest."""
    found: dict[Digest, os.stat_result] = {}
    base = store.blob_path(Digest("sha256", "0" * 64)).parent.parent
    for alg_dir in os.scandir(base):
        if not alg_dir.is_dir():
            continue
        for entry in os.scandir(alg_dir.path):
            try:
                d = Digest.parse(f"{alg_dir.name}:{entry.name}")
                found[d] = entry.stat(follow_symlinks=False)
            except (ValueError, OSError):
                continue  # not ours (or vanished): never touch it
    return found


def _present(store: GcStore, key: str) -> bool:
    try:
        return store.blob_path(Digest.parse(key)).is_file()
    except ValueError:
        return False


def _lock_of(store: GcStore, d: Digest) -> FileLock:
    return FileLock(store.locks_dir / f"{d.algorithm}-{d.hex}.lock")


def collect(store: GcStore, max_size: int | None) -> GcReport:
    """The whole gc, synchronous (runs in a thread)."""
    settings = store.settings
    index = store.index
    gc_lock = FileLock(store.locks_dir / "gc.lock")
    while not gc_lock.try_acquire():
        time.sleep(0.05)
    try:
        now = time.time()
        on_disk = scan_blobs(store)
        rows = index.all_blob_rows()
        with index.transaction() as c:
            for d, st in on_disk.items():
                if str(d) not in rows:
                    c.execute(
                        "INSERT OR IGNORE INTO blobs(digest, size, added, last_used) "
                        "VALUES (?, ?, ?, ?)",
                        (str(d), st.st_size, st.st_mtime, st.st_mtime),
                    )
            keys = {str(d) for d in on_disk}
            for key in rows:
                # A blob committed since the scan has its row but was not seen: look again,
                # or its row (and then its aliases, in drop_dangling) would be dropped.
                if key not in keys and not _present(store, key):
                    index.remove_blob_row(c, key)
        rows = index.all_blob_rows()
        partials = scan_partials(store)
        total = sum(st.st_size for st in on_disk.values()) + sum(p.size for p in partials)

        target: int | None = None
        if max_size is not None:
            target = max_size
        elif settings.max_size is not None and total > settings.max_size * settings.high_watermark:
            target = int(settings.max_size * settings.low_watermark)

        removed = freed = skipped = 0
        pressed_count = pressed_bytes = 0
        if target is not None and total > target:
            # Idle partials first: nobody is resuming them, and they are outside every image.
            pressed_count, pressed_bytes = reap_partials(store, partials, total - target)
            total -= pressed_bytes
        if target is not None and total > target:
            leased = index.live_leased()

            def last_use(d: Digest) -> float:
                row = rows.get(str(d))
                return row.last_used if row else on_disk[d].st_mtime

            for d in sorted(on_disk, key=last_use):
                if total <= target:
                    break
                if str(d) in leased:
                    skipped += 1
                    continue
                size = on_disk[d].st_size
                if _evict(store, d):
                    total -= size
                    removed += 1
                    freed += size
                else:
                    skipped += 1

        reaped_ingests = _reap_ingests(store, now - settings.stale_ingest_age)
        reaped_tmp = _reap_dir(store.tmp_dir, now - settings.stale_ingest_age)
        tags, aliases, images = index.drop_dangling(now - settings.tag_cache_max_age)
        remaining_bytes, remaining_count = index.usage()
        return GcReport(removed, freed, remaining_bytes, remaining_count, skipped,
                        reaped_ingests + pressed_count, reaped_tmp, tags, aliases, images,
                        pressed_bytes)
    finally:
        gc_lock.release()


def _evict(store: GcStore, d: Digest) -> bool:
    lock = _lock_of(store, d)
    if not lock.try_acquire():
        return False  # being ingested or committed right now
    try:
        with store.index.transaction() as c:
            if store.index.is_leased(c, d.__str__()):
                return False
            try:
                os.unlink(store.blob_path(d))
            except FileNotFoundError:
                pass
            store.index.remove_blob_row(c, str(d))
        return True
    finally:
        lock.release(unlink=True)


def _reap_ingests(store: GcStore, cutoff: float) -> int:
    """Remove partials idle since before ``cutoff`` (not one being resumed), then sidecars and
    temporary files of that age left without their partial; the count of partials removed."""
    stale = [p for p in scan_partials(store) if p.mtime < cutoff]
    reaped, _ = reap_partials(store, stale, need=sum(p.size for p in stale) + 1)
    for entry in os.scandir(store.ingest_dir):
        name = entry.name
        if not name.endswith((".state", ".tmp")):
            continue
        try:
            if entry.stat().st_mtime >= cutoff:
                continue
        except FileNotFoundError:
            continue
        if name.endswith(".state") and Path(entry.path).with_suffix(".part").exists():
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
    return reaped


def _reap_dir(directory: Path, cutoff: float) -> int:
    reaped = 0
    for entry in os.scandir(directory):
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                reaped += 1
        except FileNotFoundError:
            continue
    return reaped


async def verify_all(store: GcStore, concurrency: int = 2) -> VerifyReport:
    """Re-hash every blob in threads; move corrupt ones to quarantine/."""
    found = await asyncio.to_thread(scan_blobs, store)
    sem = asyncio.Semaphore(concurrency)
    corrupt: list[Digest] = []
    moved: list[Path] = []
    checked = 0
    nbytes = 0

    async def check(d: Digest, st: os.stat_result) -> None:
        nonlocal checked, nbytes
        path = store.blob_path(d)
        async with sem:
            try:
                actual, size = await asyncio.to_thread(hash_file, path, d.algorithm)
            except FileNotFoundError:
                return  # collected meanwhile
        checked += 1
        nbytes += size
        if actual == d:
            return
        corrupt.append(d)
        lock = _lock_of(store, d)
        await lock.acquire()
        try:
            # Only move the file we hashed: a fresh ingest may have replaced it meanwhile.
            if os.stat(path).st_ino != st.st_ino:
                return
            dest = store.quarantine_dir / f"{d.algorithm}-{d.hex}.{time.time_ns()}"
            os.replace(path, dest)
            moved.append(dest)
            with store.index.transaction() as c:
                store.index.remove_blob_row(c, str(d))
        except FileNotFoundError:
            pass
        finally:
            lock.release()

    await asyncio.gather(*(check(d, st) for d, st in found.items()))
    return VerifyReport(checked, nbytes, tuple(sorted(corrupt)), tuple(moved))
