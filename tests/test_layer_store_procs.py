"""The layer store shared by several processes: single-flight across processes, resume after
SIGKILL, leases held by another process. Workers are subprocesses running WORKER below."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fetchd.digest import Digest
from fetchd.layer_store import BlobSink, LayerStore

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

WORKER = r'''
import asyncio, json, os, random, sys, time
from pathlib import Path
from fetchd.digest import Digest
from fetchd.layer_store import LayerStore

def blob(seed, size):
    data = random.Random(seed).randbytes(size)
    return data, Digest.of(data)

def log(counter, line):
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)

def source(data, counter, d, chunk, delay):
    async def fetch(sink):
        log(counter, f"F {d} {os.getpid()} {sink.offset}")
        written = 0
        for pos in range(sink.offset, len(data), chunk):
            await sink.write_at(pos, data[pos:pos + chunk])
            written += len(data[pos:pos + chunk])
            await asyncio.sleep(delay)
        log(counter, f"D {d} {os.getpid()} {written}")
    return fetch

async def ingest(args):
    store = LayerStore(Path(args["root"]))
    Path(args["ready"]).touch()
    while not os.path.exists(args["go"]):
        await asyncio.sleep(0.005)
    jobs = []
    for seed, size in args["specs"]:
        data, d = blob(seed, size)
        fetch = source(data, args["counter"], d, 64 * 1024, 0.002)
        jobs += [store.ensure_blob(d, size, fetch) for _ in range(args["tasks"])]
    paths = await asyncio.gather(*jobs)
    ok = {p.name: Digest.of(p.read_bytes()).hex == p.name for p in paths}
    store.close()
    print(json.dumps(ok))

async def hang(args):
    store = LayerStore(Path(args["root"]))
    data, d = blob(args["seed"], args["size"])
    async def fetch(sink):
        for a, b in args["parts"]:  # parallel parts, as the registry client writes them
            for pos in range(a, b, 256 * 1024):
                await sink.write_at(pos, data[pos:min(pos + 256 * 1024, b)])
        Path(args["ready"]).touch()
        await asyncio.sleep(3600)
    await store.ensure_blob(d, args["size"], fetch)

async def slow(args):
    store = LayerStore(Path(args["root"]))
    data, d = blob(args["seed"], args["size"])
    async def fetch(sink):
        for pos in range(0, args["cut"], 256 * 1024):
            await sink.write_at(pos, data[pos:min(pos + 256 * 1024, args["cut"])])
        Path(args["ready"]).touch()
        while not os.path.exists(args["go"]):
            await asyncio.sleep(0.01)
        for pos in range(args["cut"], args["size"], 256 * 1024):
            await sink.write_at(pos, data[pos:pos + 256 * 1024])
    await store.ensure_blob(d, args["size"], fetch)
    store.close()

async def lease(args):
    store = LayerStore(Path(args["root"]))
    with store.lease([Digest.parse(args["digest"])], holder="worker"):
        Path(args["ready"]).touch()
        await asyncio.sleep(3600)

args = json.loads(sys.argv[1])
asyncio.run({"ingest": ingest, "hang": hang, "slow": slow, "lease": lease}[args["mode"]](args))
'''


def blob(seed: int, size: int) -> tuple[bytes, Digest]:
    data = random.Random(seed).randbytes(size)
    return data, Digest.of(data)


def spawn(**args: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def poll_until(check: Callable[[], bool]) -> None:
    """Poll a condition another process makes true (no event crosses processes)."""
    while not await asyncio.to_thread(check):  # noqa: ASYNC110 -- the event is in another process
        await asyncio.sleep(0.002)


async def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.stderr.read() if proc.stderr else ''}")
        return path.exists()

    await poll_until(ready)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()


def log(counter: Path, line: str) -> None:
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def test_tasks_and_processes_write_each_digest_once(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    root, counter, go = tmp_path / "store", tmp_path / "counter", tmp_path / "go"
    specs = [(seed, MiB + seed * 4099) for seed in range(1, 7)]
    store = LayerStore(root)
    for i in range(4):
        ready = tmp_path / f"ready{i}"
        # each process wants all digests except one, so the owners differ
        mine = [s for j, s in enumerate(specs) if j != i]
        procs.append(spawn(mode="ingest", root=str(root), counter=str(counter), go=str(go),
                           ready=str(ready), specs=mine, tasks=3))
    for i, p in enumerate(procs):
        await wait_for(tmp_path / f"ready{i}", p)

    bad: list[str] = []
    stop = threading.Event()

    def poll_blobs() -> None:
        while not stop.is_set():
            for path in (root / "blobs" / "sha256").iterdir():
                if Digest.of(path.read_bytes()).hex != path.name:
                    bad.append(path.name)
            time.sleep(0.002)

    poller = threading.Thread(target=poll_blobs)
    poller.start()

    blobs = [blob(seed, size) for seed, size in specs]

    def fetch_for(data: bytes, d: Digest):  # type: ignore[no-untyped-def]
        async def fetch(sink: BlobSink) -> None:
            log(counter, f"F {d} {os.getpid()} {sink.offset}")
            written = 0
            for pos in range(sink.offset, len(data), 64 * 1024):
                await sink.write_at(pos, data[pos : pos + 64 * 1024])
                written += len(data[pos : pos + 64 * 1024])
                await asyncio.sleep(0.002)
            log(counter, f"D {d} {os.getpid()} {written}")
        return fetch

    go.touch()
    # Join once a worker fetches: the digest that worker does not want is then fetched by
    # another process, so the work is shared by at least two processes.
    await poll_until(lambda: counter.exists() and counter.read_text().startswith("F "))
    try:
        paths = await asyncio.gather(*(
            store.ensure_blob(blobs[i % 6][1], len(blobs[i % 6][0]), fetch_for(*blobs[i % 6]))
            for i in range(50)
        ))
        outputs = []
        for p in procs:
            out, err = await asyncio.to_thread(p.communicate)
            assert p.returncode == 0, err
            outputs.append(json.loads(out))
    finally:
        stop.set()
        poller.join()
    assert bad == []
    for i, path in enumerate(paths):
        assert path.read_bytes() == blobs[i % 6][0]
    assert all(all(ok.values()) and len(ok) == 5 for ok in outputs)

    fetches: collections.Counter[str] = collections.Counter()
    written: collections.Counter[str] = collections.Counter()
    pids: set[str] = set()
    for line in counter.read_text().splitlines():
        kind, d, pid, n = line.split()
        if kind == "F":
            fetches[d] += 1
            pids.add(pid)
        else:
            written[d] += int(n)
    assert fetches == {str(d): 1 for _, d in blobs}
    assert written == {str(d): len(data) for data, d in blobs}
    assert len(pids) >= 2  # the work really was shared between processes
    assert list(store.ingest_dir.iterdir()) == []
    assert store.usage() == (sum(len(data) for data, _ in blobs), 6)
    store.close()


async def test_sigkill_mid_ingest_then_resume_fetches_only_the_rest(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    root, ready = tmp_path / "store", tmp_path / "ready"
    size, cut = 6 * MiB + 333, 5 * MiB + 1000
    data, d = blob(77, size)
    procs.append(spawn(mode="hang", root=str(root), seed=77, size=size, parts=[(0, cut)],
                       ready=str(ready)))
    await wait_for(ready, procs[0])
    store = LayerStore(root)
    seen: list[tuple[int, int]] = []

    async def fetch(sink: BlobSink) -> None:
        start = sink.offset
        for pos in range(start, size, MiB):
            await sink.write_at(pos, data[pos : pos + MiB])
        seen.append((start, size - start))

    # the other process holds the digest's lock: this request waits for it ...
    waiter = asyncio.create_task(store.ensure_blob(d, size, fetch))
    await asyncio.sleep(0.2)
    assert not waiter.done() and not store.has(d)
    assert list((root / "blobs" / "sha256").iterdir()) == []
    # ... and takes over from its partial once it dies
    procs[0].send_signal(signal.SIGKILL)
    path = await waiter
    [(offset, written)] = seen
    assert 0 < offset <= cut and written == size - offset
    assert path.read_bytes() == data
    assert list(store.ingest_dir.iterdir()) == []
    store.close()


async def test_sigkill_with_parallel_parts_done_then_resume_fetches_only_the_gaps(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    root, ready = tmp_path / "store", tmp_path / "ready"
    size = 16 * MiB + 77
    data, d = blob(78, size)
    # Four parts in flight when the process dies: the first and third done, the others cut.
    parts = [(0, 4 * MiB), (4 * MiB, 5 * MiB), (8 * MiB, 12 * MiB), (12 * MiB, 13 * MiB)]
    procs.append(spawn(mode="hang", root=str(root), seed=78, size=size, parts=parts,
                       ready=str(ready)))
    await wait_for(ready, procs[0])
    procs[0].send_signal(signal.SIGKILL)
    await asyncio.to_thread(procs[0].wait)
    store = LayerStore(root)
    asked: list[tuple[int, int]] = []

    async def fetch(sink: BlobSink) -> None:
        pos = sink.offset
        for a, b in [*sink.held_ranges(), (size, size)]:
            if a > pos:
                asked.append((pos, a))
                await sink.write_at(pos, data[pos:a])
            pos = max(pos, b)

    path = await store.ensure_blob(d, size, fetch)
    assert path.read_bytes() == data
    # What the dead process recorded (every 2 MiB of progress) is not asked for again:
    # at most the last 2 MiB it wrote are, never the whole of a finished part.
    fetched = sum(b - a for a, b in asked)
    assert fetched <= size - 10 * MiB + 2 * MiB
    assert not any(a <= 8 * MiB and 10 * MiB <= b for a, b in asked)
    assert list(store.ingest_dir.iterdir()) == []
    store.close()


async def test_lease_held_by_another_process(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    store = LayerStore(tmp_path / "store")
    data, d = blob(5, 10_000)

    async def fetch(sink: BlobSink) -> None:
        await sink.write_at(0, data)

    await store.ensure_blob(d, len(data), fetch)
    ready = tmp_path / "ready"
    procs.append(spawn(mode="lease", root=str(store.root), digest=str(d), ready=str(ready)))
    await wait_for(ready, procs[0])
    report = await store.gc(max_size=0)
    assert report.removed == 0 and report.skipped_leased == 1 and store.has(d)
    procs[0].kill()
    await asyncio.to_thread(procs[0].wait)
    report = await store.gc(max_size=0)  # the holder died: its lease no longer counts
    assert report.removed == 1 and not store.has(d)
    store.close()


async def test_reader_follows_an_ingest_of_another_process(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    root, ready, go = tmp_path / "store", tmp_path / "ready", tmp_path / "go"
    size, cut = 5 * MiB, 3 * MiB
    data, d = blob(88, size)
    store = LayerStore(root)
    procs.append(spawn(mode="slow", root=str(root), seed=88, size=size, cut=cut,
                       ready=str(ready), go=str(go)))
    await wait_for(ready, procs[0])
    got = bytearray()
    reader = store.read_following(d)
    while len(got) < 2 * MiB:  # the other process records its progress every 2 MiB
        got += await reader.__anext__()
    assert bytes(got) == data[: len(got)] and not store.has(d)
    go.touch()
    async for chunk in reader:
        got += chunk
    assert bytes(got) == data
    assert await asyncio.to_thread(procs[0].wait) == 0
    store.close()
