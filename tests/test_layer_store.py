"""The layer store inside one process: ingest, single-flight, following readers, commit_file,
metadata, gc, verify and the failure paths (mismatch, disk full, read-only)."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_sinks import HalfThenWait

from fetchd.digest import Digest
from fetchd.errors import BlobUnknown, DigestMismatch, RegistryError, SizeMismatch, StoreError
from fetchd.layer_store import BlobSink, LayerStore, StoreSettings

MiB = 1 << 20


def blob(size: int, seed: int = 0) -> tuple[bytes, Digest]:
    data = random.Random(seed).randbytes(size)
    return data, Digest.of(data)


class Source:
    """A fetch function over bytes in memory that counts its calls and the bytes it writes."""

    def __init__(self, data: bytes, chunk: int = 256 * 1024, delay: float = 0.0) -> None:
        self.data = data
        self.chunk = chunk
        self.delay = delay
        self.calls = 0
        self.offsets: list[int] = []
        self.written = 0

    async def __call__(self, sink: BlobSink) -> None:
        self.calls += 1
        self.offsets.append(sink.offset)
        for pos in range(sink.offset, len(self.data), self.chunk):
            piece = self.data[pos : pos + self.chunk]
            await sink.write_at(pos, piece)
            self.written += len(piece)
            if self.delay:
                await asyncio.sleep(self.delay)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LayerStore]:
    s = LayerStore(tmp_path / "store")
    yield s
    s.close()


def blob_files(store: LayerStore) -> list[Path]:
    return sorted(p for p in (store.root / "blobs").rglob("*") if p.is_file())


def ingest_files(store: LayerStore) -> list[Path]:
    return sorted(p for p in store.ingest_dir.iterdir())


async def test_ensure_blob_commits_verified_read_only_file(store: LayerStore) -> None:
    data, d = blob(3 * MiB + 17)
    src = Source(data)
    path = await store.ensure_blob(d, len(data), src, media_type="application/x-test")
    assert path == store.root / "blobs" / "sha256" / d.hex
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert store.has(d) and src.calls == 1 and src.written == len(data)
    assert ingest_files(store) == []
    # present -> no fetch at all
    assert await store.ensure_blob(d, len(data), src) == path
    assert src.calls == 1
    info = store.blob_info(d)
    assert info is not None and info.size == len(data) and info.media_type == "application/x-test"
    assert store.usage() == (len(data), 1)
    with store.open_blob(d) as f:
        assert f.read() == data


async def test_empty_blob_and_no_lock_files_left(store: LayerStore) -> None:
    d = Digest.of(b"")
    path = await store.ensure_blob(d, 0, Source(b""))
    assert path.read_bytes() == b"" and store.has(d)
    assert list(store.locks_dir.iterdir()) == []


async def test_fifty_tasks_fetch_each_digest_once(store: LayerStore) -> None:
    blobs = [blob(MiB + i * 1000, seed=i) for i in range(5)]
    sources = [Source(data, chunk=64 * 1024, delay=0.001) for data, _ in blobs]
    seen_bad: list[str] = []
    stop = asyncio.Event()

    def check_blobs_dir() -> None:
        for p in blob_files(store):
            content = p.read_bytes()
            if Digest.of(content).hex != p.name:
                seen_bad.append(p.name)

    async def poll() -> int:
        rounds = 0
        while not stop.is_set():
            await asyncio.to_thread(check_blobs_dir)
            rounds += 1
            await asyncio.sleep(0.002)
        return rounds

    poller = asyncio.create_task(poll())
    paths = await asyncio.gather(*(
        store.ensure_blob(blobs[i % 5][1], len(blobs[i % 5][0]), sources[i % 5])
        for i in range(50)
    ))
    stop.set()
    assert await poller > 1
    assert seen_bad == []
    assert [s.calls for s in sources] == [1] * 5
    assert [s.written for s in sources] == [len(b[0]) for b in blobs]
    for i, p in enumerate(paths):
        assert p.read_bytes() == blobs[i % 5][0]


async def test_out_of_order_parts_hash_by_reading_back(store: LayerStore) -> None:
    data, d = blob(4 * MiB + 3, seed=7)
    offsets_seen: list[int] = []

    async def parallel(sink: BlobSink) -> None:
        bounds = [0, MiB, 2 * MiB + 5, 3 * MiB, len(data)]
        parts = list(zip(bounds, bounds[1:], strict=False))
        # the last parts first: the prefix stays at 0 until part one arrives
        for a, b in reversed(parts[1:]):
            await sink.write_at(a, data[a:b])
            offsets_seen.append(sink.offset)
        a, b = parts[0]
        await sink.write_at(a, data[a:b])
        offsets_seen.append(sink.offset)

    path = await store.ensure_blob(d, len(data), parallel)
    assert offsets_seen == [0, 0, 0, len(data)]
    assert path.read_bytes() == data


@pytest.mark.parametrize("verify", [True, False], ids=["hashed", "unhashed"])
async def test_follower_gets_bytes_before_the_download_ends(store: LayerStore, verify: bool) -> None:
    """Both followers (hashing every byte, or trusting this process's ingest whose commit
    verifies it) get the first half before the download ends, then exactly the committed bytes."""
    data, d = blob(2 * MiB, seed=3)
    half = len(data) // 2
    slow = HalfThenWait(data)
    download = asyncio.create_task(store.ensure_blob(d, len(data), slow))
    got = bytearray()
    reader = store.read_following(d, verify=verify)
    while len(got) < half:
        got += await reader.__anext__()
    assert bytes(got) == data[:half]
    assert not download.done() and not store.has(d)  # still downloading
    slow.release.set()
    async for chunk in reader:
        got += chunk
    assert bytes(got) == data
    assert (await download).read_bytes() == data


async def test_follower_raises_when_the_ingest_fails(store: LayerStore) -> None:
    data, d = blob(MiB, seed=4)
    wrong = bytes([data[0] ^ 1]) + data[1:]
    bad = HalfThenWait(wrong, split=1000)
    download = asyncio.create_task(store.ensure_blob(d, len(data), bad))
    reader = store.read_following(d)
    first = await reader.__anext__()
    assert first == wrong[:1000]
    bad.release.set()
    with pytest.raises(DigestMismatch):
        async for _ in reader:
            pass
    with pytest.raises(DigestMismatch):
        await download


async def test_read_following_complete_blob_and_unknown(store: LayerStore) -> None:
    data, d = blob(100_000, seed=5)
    await store.ensure_blob(d, len(data), Source(data))
    assert b"".join([c async for c in store.read_following(d)]) == data
    _, other = blob(10, seed=6)
    with pytest.raises(BlobUnknown):
        async for _ in store.read_following(other):
            pass


async def test_digest_mismatch_keeps_nothing_and_waiters_share_the_error(store: LayerStore) -> None:
    data, d = blob(MiB, seed=8)
    src = Source(data[:-1] + bytes([data[-1] ^ 0xFF]), delay=0.001)
    results = await asyncio.gather(
        *(store.ensure_blob(d, len(data), src) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, DigestMismatch) for r in results)
    assert len({str(r) for r in results}) == 1 and str(d) in str(results[0])
    assert src.calls == 1
    assert blob_files(store) == [] and ingest_files(store) == []
    # the next request fetches again, from the start
    good = Source(data)
    assert (await store.ensure_blob(d, len(data), good)).read_bytes() == data
    assert good.offsets == [0]


@pytest.mark.parametrize("case", ["too-long", "too-short"])
async def test_size_mismatch(store: LayerStore, case: str) -> None:
    data, d = blob(300_000, seed=9)
    size = len(data) - 1 if case == "too-long" else len(data) + 1
    with pytest.raises(SizeMismatch):
        await store.ensure_blob(d, size, Source(data))
    assert blob_files(store) == [] and ingest_files(store) == []


async def test_resume_after_a_failed_fetch_writes_only_the_rest(store: LayerStore) -> None:
    data, d = blob(5 * MiB + 11, seed=10)
    cut = 3 * MiB + 100

    async def dies(sink: BlobSink) -> None:
        await sink.write_at(0, data[:cut])
        raise RegistryError("connection reset (test)")

    with pytest.raises(RegistryError):
        await store.ensure_blob(d, len(data), dies)
    assert not store.has(d) and len(ingest_files(store)) == 2  # .part + .state
    src = Source(data)
    path = await store.ensure_blob(d, len(data), src)
    assert src.offsets == [cut] and src.written == len(data) - cut
    assert path.read_bytes() == data


async def test_resume_from_a_reopened_store(tmp_path: Path) -> None:
    data, d = blob(2 * MiB, seed=11)
    first = LayerStore(tmp_path / "s")

    async def dies(sink: BlobSink) -> None:
        await sink.write_at(0, data[:MiB])
        raise RegistryError("cut (test)")

    with pytest.raises(RegistryError):
        await first.ensure_blob(d, len(data), dies)
    first.close()
    second = LayerStore(tmp_path / "s")
    src = Source(data)
    assert (await second.ensure_blob(d, len(data), src)).read_bytes() == data
    assert src.offsets == [MiB] and src.written == MiB
    second.close()


async def test_truncate_restarts_cleanly(store: LayerStore) -> None:
    data, d = blob(MiB, seed=12)

    async def restart(sink: BlobSink) -> None:
        await sink.write_at(0, b"garbage" * 1000)  # a wrong start, then Range was ignored
        await sink.truncate(0)
        assert sink.offset == 0
        await sink.write_at(0, data)

    assert (await store.ensure_blob(d, len(data), restart)).read_bytes() == data


async def test_overlapping_rewrites_never_change_hashed_bytes(store: LayerStore) -> None:
    data, d = blob(MiB, seed=13)

    async def retries(sink: BlobSink) -> None:
        await sink.write_at(0, data[:600_000])
        await sink.write_at(500_000, data[500_000:])  # a retry re-sends 100 kB it already holds

    assert (await store.ensure_blob(d, len(data), retries)).read_bytes() == data


async def test_cancelled_waiter_does_not_cancel_the_fetch(store: LayerStore) -> None:
    data, d = blob(MiB, seed=14)
    src = Source(data, chunk=64 * 1024, delay=0.002)
    first = asyncio.create_task(store.ensure_blob(d, len(data), src))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(store.ensure_blob(d, len(data), src))
    first.cancel()
    assert (await second).read_bytes() == data
    assert src.calls == 1


async def test_close_during_a_download_keeps_the_partial_for_resume(tmp_path: Path) -> None:
    data, d = blob(4 * MiB, seed=15)
    first = LayerStore(tmp_path / "s")
    started = asyncio.Event()

    async def slow(sink: BlobSink) -> None:
        for pos in range(0, len(data), 512 * 1024):
            await sink.write_at(pos, data[pos : pos + 512 * 1024])
            if pos >= MiB:
                started.set()
            await asyncio.sleep(0.005)

    task = asyncio.create_task(first.ensure_blob(d, len(data), slow))
    await started.wait()
    first.close()  # cancels the download
    with pytest.raises(asyncio.CancelledError):
        await task
    second = LayerStore(tmp_path / "s")
    again = Source(data)
    assert (await second.ensure_blob(d, len(data), again)).read_bytes() == data
    assert again.offsets[0] >= MiB and again.written == len(data) - again.offsets[0]
    second.close()


# -- commit_file, aliases, tags, images ----------------------------------------------------


def test_commit_file_alias_and_mismatch(store: LayerStore) -> None:
    tmp = store.temp_path(".zst")
    assert tmp.parent == store.tmp_dir and not tmp.exists()
    assert store.temp_path(".zst") != tmp
    tmp.write_bytes(b"frame bytes")
    d = store.commit_file(tmp, alias=("frame", "sha256:ab@3"), media_type="application/zstd")
    assert d == Digest.of(b"frame bytes") and not tmp.exists()
    assert store.blob_path(d).read_bytes() == b"frame bytes"
    assert stat.S_IMODE(store.blob_path(d).stat().st_mode) == 0o444
    assert store.get_alias("frame", "sha256:ab@3") == d
    assert store.get_alias("frame", "other") is None
    # the same content again: success, no error on the existing read-only file
    again = store.temp_path()
    again.write_bytes(b"frame bytes")
    assert store.commit_file(again, digest=d) == d and not again.exists()
    bad = store.temp_path()
    bad.write_bytes(b"not it")
    with pytest.raises(DigestMismatch):
        store.commit_file(bad, digest=d)
    assert not bad.exists()


async def test_alias_is_none_once_its_blob_is_gone(store: LayerStore) -> None:
    tmp = store.temp_path()
    tmp.write_bytes(b"archive")
    d = store.commit_file(tmp, alias=("archive", "k"))
    report = await store.gc(max_size=0)
    assert report.removed == 1 and not store.has(d)
    assert store.get_alias("archive", "k") is None
    assert report.dropped_aliases == 1


def test_tags_images_and_blob_info(store: LayerStore) -> None:
    _, d = blob(10, seed=1)
    _, diff = blob(10, seed=2)
    assert store.lookup_tag("docker.io/library/debian", "bookworm") is None
    before = time.time()
    store.record_tag("docker.io/library/debian", "bookworm", d, "application/vnd.oci.image.index.v1+json")
    entry = store.lookup_tag("docker.io/library/debian", "bookworm")
    assert entry is not None and entry.digest == d and entry.resolved_at >= before
    assert entry.media_type == "application/vnd.oci.image.index.v1+json"
    store.record_blob_info(d, diff_id=diff)
    store.record_blob_info(d, media_type="m")  # keeps the diff_id
    info = store.blob_info(d)
    assert info is not None and info.diff_id == diff and info.media_type == "m" and info.size is None
    assert store.digests_with_diff_id(diff) == [d]
    tmp = store.temp_path()
    tmp.write_bytes(b"archive!")
    archive = store.commit_file(tmp)
    store.record_image("docker.io/library/debian:bookworm", "linux/arm/v7", d, archive, 3)
    [img] = store.list_images()
    assert (img.reference, img.platform, img.level, img.archive_digest, img.present) == (
        "docker.io/library/debian:bookworm", "linux/arm/v7", 3, archive, True)


def test_settings_from_a_config_object(tmp_path: Path) -> None:
    class Cfg:
        max_size = 123
        low_watermark = 0.5
        path = "/ignored"

    s = LayerStore(tmp_path / "s", Cfg())
    assert s.settings == StoreSettings(max_size=123, low_watermark=0.5)
    s.close()


# -- gc -------------------------------------------------------------------------------------


async def _fill(store: LayerStore, n: int, size: int) -> list[Digest]:
    digests = []
    for i in range(n):
        data, d = blob(size, seed=100 + i)
        await store.ensure_blob(d, size, Source(data))
        digests.append(d)
    return digests


async def test_gc_lru_watermarks_and_leases(tmp_path: Path) -> None:
    size = 100_000
    store = LayerStore(tmp_path / "s", StoreSettings(max_size=100 * size))  # no auto gc yet
    ds = await _fill(store, 10, size)
    # last use: ds[0] oldest ... ds[9] newest, but ds[1] used just now
    base = time.time() - 1000
    store.index.touch([(str(d), base + i) for i, d in enumerate(ds)])
    with store.open_blob(ds[1]):
        pass
    store = _with_settings(store, StoreSettings(max_size=10 * size, high_watermark=0.9,
                                                low_watermark=0.5))
    with store.lease([ds[0]], holder="test"):
        report = await store.gc()
        assert store.has(ds[0])  # leased: kept although the oldest
    gone = [i for i, d in enumerate(ds) if not store.has(d)]
    assert gone == [2, 3, 4, 5, 6]  # LRU order, down to the low watermark (5 blobs)
    assert report.removed == 5 and report.freed_bytes == 5 * size and report.skipped_leased == 1
    assert report.remaining_bytes == 5 * size and store.usage() == (5 * size, 5)
    # under the high watermark: nothing more goes
    assert (await store.gc()).removed == 0
    # the lease ended: an explicit max_size evicts it first
    assert (await store.gc(max_size=4 * size)).removed == 1 and not store.has(ds[0])
    store.close()


def _with_settings(store: LayerStore, settings: StoreSettings) -> LayerStore:
    store.flush_uses()
    store.close()
    return LayerStore(store.root, settings)


async def _settled(store: LayerStore) -> None:
    """Until the store's background work (recounts of ingest/ after flights, gc) is done."""
    while True:
        pending: set[asyncio.Future[Any]] = set(store._background)
        if store._gc_task is not None and not store._gc_task.done():
            pending.add(store._gc_task)
        if not pending:
            return
        await asyncio.wait(pending)


async def test_automatic_gc_after_commits(tmp_path: Path) -> None:
    size = 100_000
    store = LayerStore(tmp_path / "s", StoreSettings(max_size=5 * size, high_watermark=0.9,
                                                    low_watermark=0.5))
    await _fill(store, 6, size)
    assert store._gc_task is not None  # the 5th commit passed the high watermark
    await _settled(store)  # the gc ends only below the high watermark (it re-checks)
    # evicted to the low watermark (2 blobs), plus at most the commit that landed during it
    assert store.usage()[0] <= int(2.5 * size) + size
    store.close()


async def test_commit_in_a_worker_thread_triggers_automatic_gc(tmp_path: Path) -> None:
    # a pack commits its archive from a worker thread: the watermark check must still run
    size = 100_000
    # 4 blobs, plus a partial counted by a scan during a flight (4 KiB blocks), stay below the
    # high watermark (5.4 blobs); the commit of 2 more from a thread passes it
    store = LayerStore(tmp_path / "s", StoreSettings(max_size=6 * size, high_watermark=0.9,
                                                    low_watermark=0.5))
    await _fill(store, 4, size)
    await _settled(store)
    assert store._gc_task is None
    tmp = store.temp_path()
    tmp.write_bytes(blob(2 * size, seed=7)[0])
    await asyncio.to_thread(store.commit_file, tmp)
    for _ in range(3):  # the check was handed to the loop: let it run
        await asyncio.sleep(0)
    assert store._gc_task is not None
    report = await store._gc_task
    await _settled(store)
    assert report.removed > 0 and store.usage()[0] <= 3 * size
    store.close()


async def test_gc_reaps_stale_ingests_and_tmp(store: LayerStore) -> None:
    old, fresh = blob(MiB, seed=20), blob(MiB, seed=21)
    for data, d in (old, fresh):
        async def dies(sink: BlobSink, data: bytes = data) -> None:
            await sink.write_at(0, data[:1000])
            raise RegistryError("cut (test)")
        with pytest.raises(RegistryError):
            await store.ensure_blob(d, len(data), dies)
    stale_tmp = store.temp_path()
    stale_tmp.write_bytes(b"x")
    week_ago = time.time() - 8 * 24 * 3600
    for p in (*store.ingest_dir.glob(f"*{old[1].hex}*"), stale_tmp):
        os.utime(p, (week_ago, week_ago))
    fresh_tmp = store.temp_path()
    fresh_tmp.write_bytes(b"y")
    report = await store.gc()
    assert report.reaped_ingests == 1 and report.reaped_tmp == 1
    assert [p.name for p in ingest_files(store)] == [
        f"sha256-{fresh[1].hex}.part", f"sha256-{fresh[1].hex}.state"]
    assert fresh_tmp.exists() and not stale_tmp.exists()


async def test_gc_drops_dead_leases_and_old_tags(store: LayerStore) -> None:
    [d] = await _fill(store, 1, 1000)
    store.index.add_lease("x", "gone", [str(d)], time.time())
    with store.index.transaction() as c:
        c.execute("UPDATE leases SET pid = 999999999")  # no such process
    store.record_tag("n", "t", d, "m")
    with store.index.transaction() as c:
        c.execute("UPDATE tags SET resolved_at = 0")
    report = await store.gc(max_size=0)
    assert report.removed == 1 and report.dropped_tags == 1
    assert store.lookup_tag("n", "t") is None


def flip_byte(path: Path, pos: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))


# -- verify ---------------------------------------------------------------------------------


async def test_verify_quarantines_a_flipped_byte_and_it_is_fetched_again(store: LayerStore) -> None:
    data, d = blob(MiB, seed=30)
    other, d2 = blob(1000, seed=31)
    await store.ensure_blob(d, len(data), Source(data))
    await store.ensure_blob(d2, len(other), Source(other))
    flip_byte(store.blob_path(d), 12345)
    report = await store.verify()
    assert report.checked == 2 and report.corrupt == (d,)
    assert not store.has(d) and store.has(d2)
    [moved] = report.quarantined
    assert moved.parent == store.quarantine_dir and moved.read_bytes() != data
    src = Source(data)
    assert (await store.ensure_blob(d, len(data), src)).read_bytes() == data
    assert src.calls == 1
    assert (await store.verify()).corrupt == ()


# -- disk full, read-only -------------------------------------------------------------------


async def test_enospc_injected_gives_store_error_and_the_store_recovers(
    store: LayerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, d = blob(2 * MiB, seed=40)
    real_pwrite = os.pwrite
    calls = 0

    def full(fd: int, buf: bytes, off: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, buf, off)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StoreError) as info:
        await store.ensure_blob(d, len(data), Source(data))
    assert str(store.root) in str(info.value) and "full" in str(info.value)
    assert blob_files(store) == [] and ingest_files(store) == []
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    src = Source(data)
    assert (await store.ensure_blob(d, len(data), src)).read_bytes() == data
    assert src.offsets == [0]


def _can_mount() -> bool:
    return os.geteuid() == 0 and os.path.exists("/proc/filesystems") and \
        "tmpfs" in Path("/proc/filesystems").read_text()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if not _can_mount():
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_real_full_filesystem(small_fs: Path) -> None:
    store = LayerStore(small_fs / "store")
    data, d = blob(3 * MiB, seed=41)
    with pytest.raises(StoreError) as info:
        await store.ensure_blob(d, len(data), Source(data))
    assert str(store.root) in str(info.value) and "full" in str(info.value)
    assert blob_files(store) == [] and ingest_files(store) == []
    small, ds = blob(200_000, seed=42)
    assert (await store.ensure_blob(ds, len(small), Source(small))).read_bytes() == small
    store.close()


def remount_read_only(mnt: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)


async def test_read_only_store(small_fs: Path) -> None:
    store = LayerStore(small_fs / "store")
    data, d = blob(1000, seed=43)
    await store.ensure_blob(d, len(data), Source(data))
    store.close()
    remount_read_only(small_fs)
    ro = LayerStore(small_fs / "store")
    with ro.open_blob(d) as f:  # reading still works
        assert f.read() == data
    new, dn = blob(1000, seed=44)
    with pytest.raises(StoreError) as info:
        await ro.ensure_blob(dn, len(new), Source(new))
    assert "read-only" in str(info.value) and str(ro.root) in str(info.value)
    ro.close()
    with pytest.raises(StoreError) as info2:
        LayerStore(small_fs / "elsewhere")
    assert "read-only" in str(info2.value)


async def test_gc_keeps_the_row_and_alias_of_a_blob_committed_during_its_scan(
    store: LayerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fetchd import store_gc

    tmp = store.temp_path()
    tmp.write_bytes(b"archive committed while gc scanned blobs/")
    d = store.commit_file(tmp, alias=("archive", "k"))
    monkeypatch.setattr(store_gc, "scan_blobs", lambda _store: {})  # the scan ran just before
    report = await store.gc()
    assert report.dropped_aliases == 0
    assert store.get_alias("archive", "k") == d and store.usage()[1] == 1


def _open_part_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [p for p in out if p.endswith(".part")]


async def test_cancel_while_a_partial_is_rehashed_waits_and_leaks_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from fetchd.ingest import Ingest

    store = LayerStore(tmp_path / "s")
    data, d = blob(MiB, seed=50)
    started, finished, real = threading.Event(), threading.Event(), Ingest._hash_range

    def slow_rehash(self: Ingest, start: int, end: int) -> None:
        started.set()
        time.sleep(0.3)
        real(self, start, end)
        finished.set()

    monkeypatch.setattr(Ingest, "_hash_range", slow_rehash)
    task = asyncio.create_task(store.ensure_blob(d, len(data), Source(data)))
    await asyncio.to_thread(started.wait)
    store.close()  # cancels the flight while Ingest.open re-hashes in its thread
    with pytest.raises(asyncio.CancelledError):
        await task
    # The digest's lock is released only after the thread let go of the file, and the
    # file was closed after it (not under it, and not never).
    assert finished.is_set() and _open_part_files() == []


def test_commit_bytes_and_disk_full(store: LayerStore, monkeypatch: pytest.MonkeyPatch) -> None:
    d = store.commit_bytes(b'{"config": 1}', Digest.of(b'{"config": 1}'), "application/json")
    assert store.blob_path(d).read_bytes() == b'{"config": 1}'
    # bytes that are not what their digest says are refused, and nothing is kept
    with pytest.raises(DigestMismatch):
        store.commit_bytes(b"other", Digest.of(b"manifest"))
    assert list(store.tmp_dir.iterdir()) == [] and not store.has(Digest.of(b"manifest"))

    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(StoreError) as info:
        store.commit_bytes(b"manifest", Digest.of(b"manifest"))
    assert str(store.root) in info.value.message and "full" in info.value.message
    assert list(store.tmp_dir.iterdir()) == [] and not store.has(Digest.of(b"manifest"))


async def test_gc_on_a_store_that_refuses_writes_is_a_store_error(
    store: LayerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fetchd import store_gc

    await _fill(store, 2, 1000)

    def read_only(path: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(store_gc.os, "unlink", read_only)
    with pytest.raises(StoreError) as info:
        await store.gc(max_size=0)
    assert "read-only" in info.value.message and str(store.root) in info.value.message


async def test_unhashed_follower_raises_when_the_download_starts_over(store: LayerStore) -> None:
    """Without its own hash, a follower must notice that the prefix it read was cut back and
    written again (a source that ignored Range): those bytes are not what was committed."""
    data, d = blob(2 * MiB, seed=32)
    wrong = bytes(1000)
    release = asyncio.Event()

    async def restarts(sink: BlobSink) -> None:
        await sink.write_at(0, wrong)  # bytes that will not be the blob's
        await release.wait()
        await sink.truncate(0)
        await sink.write_at(0, data)

    download = asyncio.create_task(store.ensure_blob(d, len(data), restarts))
    reader = store.read_following(d, verify=False)
    assert await reader.__anext__() == wrong
    release.set()
    with pytest.raises(DigestMismatch):
        async for _ in reader:
            pass
    assert (await download).read_bytes() == data  # the blob itself is fine


async def test_close_waits_for_a_gc_thread_that_uses_the_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gc runs in a thread on the index: closing the store under it crashed the process."""
    import threading

    import fetchd.layer_store as layer_store

    store = LayerStore(tmp_path / "s")
    started, finished = threading.Event(), threading.Event()
    real = layer_store.collect

    def slow(st: LayerStore, max_size: int | None) -> object:
        started.set()
        time.sleep(0.2)  # close() comes meanwhile
        report = real(st, max_size)
        finished.set()
        return report

    monkeypatch.setattr(layer_store, "collect", slow)
    gc = asyncio.create_task(store.gc())
    await asyncio.to_thread(started.wait)
    store.close()
    assert finished.is_set()  # the index was closed only after the gc thread was done
    assert (await gc).removed == 0
    with pytest.raises(StoreError):
        await store.gc()  # a closed store collects nothing


async def test_a_committed_file_joins_the_lease_before_it_is_visible(store: LayerStore,
                                                                    tmp_path: Path) -> None:
    data, d = blob(100_000, seed=44)
    with store.lease([], "pack") as lease:
        tmp = store.temp_path()
        tmp.write_bytes(data)
        assert store.commit_file(tmp, lease=lease) == d
        await store.gc(max_size=0)
        assert store.has(d)  # the caller's lease keeps what it committed
    await store.gc(max_size=0)
    assert not store.has(d)


async def test_thread_follower_reads_the_ingest_from_a_worker_thread(store: LayerStore) -> None:
    import threading

    data, d = blob(3 * MiB, seed=41)
    half = len(data) // 2
    slow = HalfThenWait(data)
    download = asyncio.create_task(store.ensure_blob(d, len(data), slow))
    await asyncio.sleep(0.01)
    reader = store.open_following(d, threading.Event())
    assert reader is not None
    first = await asyncio.to_thread(reader.read, half)
    assert first == data[:half] and not store.has(d)  # before the commit
    rest = asyncio.create_task(asyncio.to_thread(reader.read, -1))  # blocks until more comes
    slow.release.set()
    assert first + await rest == data
    reader.close()
    await download
    # a complete blob: its file; an unknown one: None (use read_following)
    with store.open_following(d, threading.Event()) as f:  # type: ignore[union-attr]
        assert f.read() == data
    assert store.open_following(blob(10, seed=42)[1], threading.Event()) is None


async def test_thread_follower_errors_restart_and_stop(store: LayerStore) -> None:
    import threading

    from fetchd.store_follow import FollowStopped

    data, d = blob(MiB, seed=43)
    release = asyncio.Event()

    async def restarts(sink: BlobSink) -> None:
        await sink.write_at(0, bytes(1000))
        await release.wait()
        await sink.truncate(0)
        await sink.write_at(0, data)

    download = asyncio.create_task(store.ensure_blob(d, len(data), restarts))
    await asyncio.sleep(0.01)
    reader = store.open_following(d, threading.Event())
    assert reader is not None
    assert await asyncio.to_thread(reader.read, 1000) == bytes(1000)
    release.set()
    with pytest.raises(DigestMismatch):
        await asyncio.to_thread(reader.read, -1)
    reader.close()
    await download

    _, other = blob(MiB, seed=44)
    stall = asyncio.Event()

    async def stalls(sink: BlobSink) -> None:
        await sink.write_at(0, b"x" * 10)
        await stall.wait()
        raise RegistryError("the registry went away")

    failing = asyncio.create_task(store.ensure_blob(other, MiB, stalls))
    await asyncio.sleep(0.01)
    stop = threading.Event()
    stopped = store.open_following(other, stop)
    failed = store.open_following(other, threading.Event())
    assert stopped is not None and failed is not None
    assert await asyncio.to_thread(stopped.read, 10) == b"x" * 10
    waiting = asyncio.create_task(asyncio.to_thread(stopped.read, 10))
    stop.set()
    with pytest.raises(FollowStopped):
        await waiting
    stall.set()
    with pytest.raises(RegistryError):
        await asyncio.to_thread(failed.read, -1)  # the ingest's own error
    with pytest.raises(RegistryError):
        await failing
    stopped.close()
    failed.close()


async def test_restricted_blobs_are_never_readable_by_others(store: LayerStore) -> None:
    """A private registry's blobs (LayerStore.restrict): 0600 while downloading, 0400 once
    committed, also one that was in the store before it was restricted."""
    data, d = blob(1 * MiB + 3)
    seen: list[int] = []

    async def fetch(sink: BlobSink) -> None:
        await sink.write_at(0, data[:1000])
        seen.extend(p.stat().st_mode & 0o777 for p in ingest_files(store) if p.suffix == ".part")
        await sink.write_at(1000, data[1000:])

    store.restrict([d])
    path = await store.ensure_blob(d, len(data), fetch)
    assert seen == [0o600]
    assert path.stat().st_mode & 0o777 == 0o400
    older = store.commit_bytes(b"committed before the restriction")
    assert store.blob_path(older).stat().st_mode & 0o777 == 0o444
    store.restrict([older])
    assert store.blob_path(older).stat().st_mode & 0o777 == 0o400
    with store.lease([], "private pack") as lease:
        store.restrict([], lease)
        archive = store.commit_bytes(b"an archive made under the lease")
        assert store.blob_path(archive).stat().st_mode & 0o777 == 0o444  # not under the lease
        tmp = store.temp_path()
        tmp.write_bytes(b"an archive committed under the lease")
        made = store.commit_file(tmp, lease=lease)
        assert store.blob_path(made).stat().st_mode & 0o777 == 0o400
        store.end_restriction(lease)


async def test_a_failed_foreign_flight_not_yet_forgotten_does_not_use_up_the_fallbacks(
        store: LayerStore) -> None:
    """Another source's flight has failed, but its done-callback (which forgets it) has not run
    yet when a caller of its own source arrives: the caller fetches from its own source (it
    used to find the same ended flight three times without a turn of the loop, and fail with
    the other source's error)."""
    from fetchd.store_follow import Flight

    data, d = blob(300 * 1024, seed=7)

    async def attacker() -> Path:
        raise RegistryError("evil.example stalled")

    ended = asyncio.ensure_future(attacker())
    await asyncio.wait([ended])
    flight = Flight()
    flight.source, flight.task = "evil.example/x", ended
    store._flights[d] = flight  # as between the task's end and its done-callback
    own = Source(data)
    path = await store.ensure_blob(d, len(data), own, source="registry.example/real")
    assert path.read_bytes() == data and own.calls == 1
    assert isinstance(ended.exception(), RegistryError)
