"""Costs that must follow the work, not the size of the store or of the image (issue 14).

Structure and behaviour only, never wall-clock: which tables a query reads, how many queries
a listing makes, how many sqlite connections and file descriptors stay open, how many index
calls a pull makes on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fetchd.compress_budget import usable_cpus
from fetchd.config import Config
from fetchd.digest import Digest
from fetchd.layer_store import LayerStore, StoreSettings
from fetchd.pack import window_size
from fetchd.platform import Platform
from fetchd.pull import FetchRequest, Puller
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient
from fetchd.store_index import ImageRow, StoreIndex


def _fds(exclude_index: bool = False) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += not (exclude_index and "index.sqlite" in target)
    return count


def _download_fds(store: Path) -> int:
    """Descriptors of the store's download files: digest locks, partials, sidecars."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
        n += target.parent in (store / "ingest", store / "locks")
    return n


def _index_fds(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            pass
    return n


@pytest.fixture
def index(tmp_path: Path) -> Iterator[StoreIndex]:
    idx = StoreIndex(tmp_path / "index.sqlite")
    try:
        yield idx
    finally:
        idx.close()


def _tables_read(conn: sqlite3.Connection, fn: Any) -> set[str]:
    read: set[str] = set()

    def auth(action: int, arg1: str | None, *_: Any) -> int:
        if action == sqlite3.SQLITE_READ and arg1:
            read.add(arg1)
        return sqlite3.SQLITE_OK

    conn.set_authorizer(auth)
    try:
        fn()
    finally:
        conn.set_authorizer(None)
    return read


def test_usage_is_kept_by_triggers_and_never_sums_the_blobs_table(index: StoreIndex) -> None:
    for i in range(50):
        index.add_blob(f"sha256:{i:064x}", 100 + i, 1.0)
    index.add_blob(f"sha256:{3:064x}", 5000, 2.0)  # the same digest again, a new size
    with index.transaction() as c:
        for i in range(10, 20):
            index.remove_blob_row(c, f"sha256:{i:064x}")
    conn = index._conn()
    want = conn.execute("SELECT SUM(size), COUNT(*) FROM blobs").fetchone()
    assert index.usage() == (want[0], want[1]) == (sum(100 + i for i in range(50)) - 103 + 5000
                                                   - sum(100 + i for i in range(10, 20)), 40)
    assert "blobs" not in _tables_read(conn, index.usage)


def test_totals_of_an_index_made_before_them_are_filled_once(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    old = StoreIndex(path)
    old.add_blob("sha256:" + "a" * 64, 7, 1.0)
    old.add_blob("sha256:" + "b" * 64, 8, 1.0)
    with old.transaction() as c:  # as an index of the version before the totals
        c.execute("DROP TRIGGER blobs_totals_insert")
        c.execute("DROP TRIGGER blobs_totals_delete")
        c.execute("DROP TRIGGER blobs_totals_update")
        c.execute("DROP TABLE blob_totals")
    old.close()
    again = StoreIndex(path)
    try:
        assert again.usage() == (15, 2)
        again.add_blob("sha256:" + "c" * 64, 5, 1.0)
        assert again.usage() == (20, 3)
    finally:
        again.close()


def test_connections_of_ended_threads_are_closed(index: StoreIndex, tmp_path: Path) -> None:
    index.usage()  # this thread's connection
    for _ in range(20):  # e.g. a worker thread per compressed layer, one after the other
        t = threading.Thread(target=index.usage)
        t.start()
        t.join()
    assert index.open_connections() == 1
    # the ended threads' files are closed too, not only forgotten: more threads, no more
    # descriptors (sqlite may park a closed connection's descriptor for reuse while another
    # connection of the process holds a lock on the file, hence no exact count)
    parked = _index_fds(tmp_path / "index.sqlite")
    for _ in range(20):
        t = threading.Thread(target=index.usage)
        t.start()
        t.join()
    assert _index_fds(tmp_path / "index.sqlite") <= parked < 20
    live = threading.Event()
    done = threading.Event()

    def hold() -> None:
        index.usage()
        live.set()
        done.wait()

    t = threading.Thread(target=hold)
    t.start()
    live.wait()
    try:
        assert index.open_connections() == 2  # a live thread keeps its own
    finally:
        done.set()
        t.join()
    assert index.open_connections() == 1


def test_the_image_listing_is_one_query_however_many_images(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store", StoreSettings(fsync=False))
    try:
        queries: list[str] = []
        conn = store.index._conn()
        conn.set_trace_callback(queries.append)
        counts = []
        for n in (5, 60):
            for i in range(n):
                archive = store.commit_bytes(f"archive {n} {i}".encode())
                store.record_image(f"example.org/x{n}-{i}:1", "linux/amd64",
                                   Digest.of(b"m%d" % i), archive, 3)
            queries.clear()
            listed = store.list_images()
            counts.append(sum(q.lstrip().upper().startswith("SELECT") for q in queries))
            assert all(e.present and e.size and e.last_used for e in listed)
        assert counts == [1, 1]
        assert len(listed) == 65
        # a collected archive: listed as absent, without size or last use
        gone = listed[0].archive_digest
        os.chmod(store.blob_path(gone), 0o644)
        store.blob_path(gone).unlink()
        entry = next(e for e in store.list_images() if e.archive_digest == gone)
        assert (entry.present, entry.size, entry.last_used) == (False, None, None)
    finally:
        store.close()


def test_images_listing_uses_an_index_on_the_archive(index: StoreIndex) -> None:
    index.put_image(ImageRow("r", "linux/amd64", 3, "sha256:" + "1" * 64, "sha256:" + "2" * 64, 1.0))
    plan = index._conn().execute(
        "EXPLAIN QUERY PLAN SELECT 1 FROM images WHERE archive_digest = ?", ("x",)).fetchall()
    assert any("images_archive" in str(row) for row in plan)


def test_get_frames_answers_as_get_frame_does(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store", StoreSettings(fsync=False))
    try:
        own = store.commit_bytes(b"a frame of its own")
        store.put_alias("frame", "k-own", own)
        archive = store.commit_bytes(b"x" * 100)
        store.index.add_blob(str(archive), 100, 1.0, spans=[("k-span", 10, 20), ("k-gone", 0, 5)])
        gone = store.commit_bytes(b"collected")
        store.index.add_blob(str(gone), 9, 1.0, spans=[("k-gone", 0, 9)])
        os.chmod(store.blob_path(gone), 0o644)
        store.blob_path(gone).unlink()
        keys = ["k-own", "k-span", "k-gone", "k-none", *(f"k{i}" for i in range(1200))]
        got = store.get_frames(keys)
        assert got == {k: f for k in keys if (f := store.get_frame(k)) is not None}
        assert set(got) == {"k-own", "k-span"}
    finally:
        store.close()


async def test_downloads_open_files_only_in_their_turn(tmp_path: Path) -> None:
    """Many blobs asked at once against a slow source: the files open follow the downloads
    in progress (``max_open_ingests``), not the number of blobs asked."""
    slots = 4
    store = LayerStore(tmp_path / "store", StoreSettings(fsync=False, max_open_ingests=slots))
    blobs = [f"blob {i}".encode() * 100 for i in range(120)]
    base = _fds(exclude_index=True)
    running = 0
    peak_running = 0
    peak_fds = 0

    def fetch_of(data: bytes) -> Any:
        async def fetch(sink: Any) -> None:
            nonlocal running, peak_running, peak_fds
            running += 1
            peak_running = max(peak_running, running)
            peak_fds = max(peak_fds, _fds(exclude_index=True) - base)
            await asyncio.sleep(0.001)  # the slow source: each answer takes a moment
            await sink.write_at(0, data)
            running -= 1
        return fetch

    try:
        paths = await asyncio.gather(*(store.ensure_blob(Digest.of(b), len(b), fetch_of(b))
                                       for b in blobs))
        assert all(p.read_bytes() == b for p, b in zip(paths, blobs, strict=True))
        assert peak_running <= slots
        # a lock and a .part per download in progress (+ a sidecar being rewritten), not 2 x 120
        assert peak_fds <= 3 * slots + 4, peak_fds
    finally:
        store.close()


# --------------------------------------------------------------------------- a pull


@pytest.fixture
async def fake() -> AsyncIterator[Any]:
    from fake_registry import FakeRegistry

    registry = await FakeRegistry().start()
    try:
        yield registry
    finally:
        await registry.close()


async def test_a_many_layer_pull_holds_few_files_and_leaves_the_index_to_threads(
        tmp_path: Path, fake: Any) -> None:
    from support.images import make_image, make_layer, text_bytes

    layers = [make_layer(text_bytes(f"many-{i}", 2048), "gzip") for i in range(150)]
    part = make_image("linux/amd64", layers)
    for blob in (part.config_bytes, *(layer.read() for layer in layers)):
        fake.add_blob(blob)
    fake.add_manifest("x/many", "1", part.manifest_bytes, part.manifest_media_type)
    fake.blob_delay = 0.002  # a slow source: connections stay busy, downloads queue
    seen_fds: list[int] = []
    send = fake._send_blob

    async def counting(*args: Any) -> Any:
        seen_fds.append(_download_fds(tmp_path / "store"))
        return await send(*args)

    fake._send_blob = counting
    config = Config.from_dict({"network": {"max_connections": 4}},
                              env={"FETCHD_STORE": str(tmp_path / "store")})
    store = LayerStore(tmp_path / "store", StoreSettings(fsync=False, max_open_ingests=8))
    on_loop: list[str] = []
    loop_thread = threading.current_thread()
    for name in ("set_info", "set_infos", "get_alias", "get_frame_span", "frames", "get_tag"):
        method = getattr(store.index, name)

        def spy(*args: Any, _m: Any = method, _n: str = name) -> Any:
            if threading.current_thread() is loop_thread:
                on_loop.append(_n)
            return _m(*args)

        setattr(store.index, name, spy)
    client = RegistryClient(config)
    puller = Puller(store, client, config)
    try:
        job = puller.submit(FetchRequest(Reference.parse(f"{fake.host}/x/many:1"),
                                         Platform.parse("linux/amd64")))
        result = await job.wait()
        assert result.blobs_downloaded == 150 and store.has(Digest.parse(result.archive_digest))
    finally:
        await puller.close()
        await client.close()
        store.close()
    assert len(seen_fds) >= 150
    # a lock, a .part and its sidecar per download in its turn, and the .part a compression
    # reads while the layer still arrives (only inside the pack's window): not the 300 that
    # a lock and a .part for every layer waiting for a connection took
    window = window_size(config.pack, usable_cpus())
    assert 0 < max(seen_fds) <= 3 * 8 + window, max(seen_fds)
    # the per-layer index work ran in worker threads; what is left on the loop does not
    # grow with the layer count (a lookup of the archive alias, the lease's own rows)
    assert len(on_loop) <= 5, on_loop
    assert "get_tag" not in on_loop  # the tag cache is read in a thread too


async def test_lock_tries_run_off_the_loop_and_a_cancelled_wait_holds_nothing(
        tmp_path: Path) -> None:
    from fetchd.ingest import FileLock

    path = tmp_path / "x.lock"
    holder = FileLock(path)
    assert holder.try_acquire()
    threads: list[threading.Thread] = []
    try_acquire = FileLock.try_acquire
    loop = asyncio.get_running_loop()
    tried_twice = asyncio.Event()

    def recording(self: FileLock) -> bool:
        threads.append(threading.current_thread())
        if len(threads) >= 2:
            loop.call_soon_threadsafe(tried_twice.set)
        return try_acquire(self)

    FileLock.try_acquire = recording  # type: ignore[method-assign]
    try:
        waiter = FileLock(path)
        task = asyncio.ensure_future(waiter.acquire())
        await tried_twice.wait()  # it tried at least twice (and waits between tries)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert threads and all(t is not threading.current_thread() for t in threads)
        holder.release()
        fresh = FileLock(path)
        await fresh.acquire()  # the cancelled wait holds nothing
        fresh.release()
        assert waiter._fd is None
    finally:
        FileLock.try_acquire = try_acquire  # type: ignore[method-assign]
        holder.release()


async def test_a_long_write_transaction_elsewhere_never_stalls_the_loop(tmp_path: Path) -> None:
    """A gc holds the index's write lock for its whole pass; leases and commits taken on
    the loop wait for it in worker threads, while the loop runs on."""
    store = LayerStore(tmp_path / "store", StoreSettings(fsync=False))
    held, release = threading.Event(), threading.Event()

    def hold_write_lock() -> None:  # as a gc's long transaction in its thread
        with store.index.transaction():
            held.set()
            release.wait()

    holder = threading.Thread(target=hold_write_lock)
    holder.start()
    held.wait()
    data = b"a layer" * 1000

    async def fetch(sink: Any) -> None:
        await sink.write_at(0, data)

    async def pull_like() -> Path:
        async with store.alease([Digest.of(data)], "test") as lease_id:
            assert lease_id
            return await store.ensure_blob(Digest.of(data), len(data), fetch)

    try:
        task = asyncio.ensure_future(pull_like())
        await asyncio.sleep(0)  # its first step ran: the lease's write waits in a thread ...
        release.set()  # ... so this line runs on the loop at all (else: stalled until timeout)
        path = await task
        assert path.read_bytes() == data
        assert store.index.live_leased() == set()  # the lease was dropped again
        assert store.blob_info(Digest.of(data)) is not None  # the commit was recorded
    finally:
        release.set()
        holder.join()
        store.close()


async def test_a_cancelled_lease_is_dropped(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store", StoreSettings(fsync=False))
    entered = asyncio.Event()

    async def hold() -> None:
        async with store.alease([Digest.of(b"x")], "test"):
            entered.set()
            await asyncio.Event().wait()

    try:
        task = asyncio.ensure_future(hold())
        await entered.wait()
        assert store.index.live_leased() == {str(Digest.of(b"x"))}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store.index.live_leased() == set()
    finally:
        store.close()
