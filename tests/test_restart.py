"""Restart-proof requests: builds survive SIGTERM (restarts, upgrades) and SIGKILL (crashes).

On SIGTERM the daemon stops listening and taking jobs, gives running jobs
``server.shutdown_grace`` seconds, parks the rest (partials kept) and exits. Clients
(``fetchd_client``: the CLI and the BitBake layer) follow: they connect again, submit the same
request pinned to the digest the first daemon resolved, and the next daemon resumes from the
store's partial downloads.

The daemons are real ``fetchd serve`` processes on a socket the test owns; the registry is the
session's, behind the counting proxy. Disruptions are triggered by the bytes the proxy has
sent, never by sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fetchd_client import Client, DaemonUnreachable
from support.images import CatalogImage, Entry, make_layer, prng_bytes, push_custom
from support.proxy import Record, RegistryProxy
from support.registry import LocalRegistry
from test_server_process import DaemonProcess, _finish

from fetchd.config import Config
from fetchd.errors import ShuttingDown
from fetchd.layer_store import LayerStore
from fetchd.platform import Platform
from fetchd.pull import FetchRequest, FetchResult, Job, Puller
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient

MiB = 1 << 20


class Daemon(DaemonProcess):
    """``fetchd serve`` with a shutdown grace; one blob stream per layer (near host), so the
    proxy's records of a blob are its resumes in order."""

    def __init__(self, base: Path, store: Path, grace: float) -> None:
        super().__init__(base, store)
        self.config.write_text(f"[server]\nsocket_mode = 0o666\nshutdown_grace = {grace}\n"
                               "[network]\nnear_latency = 1.0\n")


@pytest.fixture
def daemons(open_tmp: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(store: Path, grace: float = 0.0) -> Daemon:
        daemon = Daemon(open_tmp, store, grace)
        started.append(daemon)
        return daemon.start()  # type: ignore[return-value]

    try:
        yield start
    finally:
        for d in started:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()


@pytest.fixture(scope="module")
def four_images(registry: LocalRegistry) -> list[CatalogImage]:
    """Four images of two random layers each (5 MiB and 3 MiB: gzip keeps their size)."""
    return [push_custom(registry, f"fetchd-test/restart{n}", "v1",
                        [make_layer([Entry(f"data/{n}-{i}", prng_bytes(f"restart/{n}/{i}", size))])
                         for i, size in enumerate((5 * MiB + 11 * n, 3 * MiB + 7 * n))])
            for n in range(4)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _wait_jobs(daemon: Daemon, n: int, gone: Callable[[], str | None]) -> None:
    """Until the daemon runs ``n`` jobs (its clients have all submitted)."""
    event = threading.Event()
    while len(Client(daemon.socket).status()["jobs"]) < n:
        reason = gone()
        assert reason is None, reason
        event.wait(0.02)  # polling the daemon's own answer, not a stand-in for an event


@dataclass
class Pull:
    """One build: a ``fetchd pull`` process or a client-library call in a thread."""

    image: CatalogImage
    level: int
    output: Path
    proc: Any = None
    thread: threading.Thread | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: BaseException | None = None

    def running(self) -> bool:
        if self.proc is not None:
            return bool(self.proc.poll() is None)
        return self.thread is not None and self.thread.is_alive()


def _start(pull: Pull, daemon: Daemon, reference: str, cli: bool) -> None:
    if cli:
        pull.proc = daemon.pull(reference, pull.output, "--zstd-level", str(pull.level))
        return

    def run() -> None:
        try:
            pull.result = Client(daemon.socket).fetch(reference, level=pull.level,
                                                      dest=str(pull.output),
                                                      on_event=pull.events.append)
        except BaseException as e:  # reported by the test
            pull.error = e

    pull.thread = threading.Thread(target=run, name=f"pull {pull.output.name}")
    pull.thread.start()


def _start_of(record: Record) -> int:
    if record.range is None:
        return 0
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", record.range)
    assert m, record.range
    return int(m.group(1))


def test_eight_pulls_survive_three_restarts_and_a_crash_byte_identical(
    daemons: Callable[..., Daemon], proxy: RegistryProxy, four_images: list[CatalogImage],
    open_tmp: Path,
) -> None:
    """The issue's acceptance: 8 concurrent pulls (CLI and library mixed), the daemon
    SIGTERMed and restarted 3 times and SIGKILLed once while they run: all succeed, archives
    byte-identical to an undisturbed run, and no blob byte is fetched twice beyond what was in
    flight when a daemon stopped (each transfer after the first resumes where the store's
    partial ends, counted at the proxy)."""
    plan = [(image, level) for image in four_images for level in (3, 4)]

    # The undisturbed run: the archives every build must get.
    calm = daemons(open_tmp / "calm-store")
    want = {}
    for image, level in plan:
        result = Client(calm.socket).fetch(image.ref(proxy.host), level=level)
        want[(image.name, level)] = result["archive_digest"]
    assert calm.stop() == 0
    proxy.reset_stats()

    # The disturbed run, on a store of its own.
    store = open_tmp / "store"
    daemon = daemons(store)
    held = proxy.hold("/blobs/")
    outs = open_tmp / "outs"
    outs.mkdir()
    pulls = [Pull(image, level, outs / f"{image.repository.rsplit('/', 1)[1]}-{level}.zst")
             for image, level in plan]
    for i, pull in enumerate(pulls):
        _start(pull, daemon, pull.image.ref(proxy.host), cli=i % 2 == 0)

    def gone() -> str | None:
        ended = [p.output.name for p in pulls if not p.running()]
        return f"pulls ended early: {ended}" if ended else None

    _wait_jobs(daemon, len(pulls), gone)
    blobs = {layer.digest: layer.size for image in four_images for layer in image.only.layers}
    total = sum(blobs.values())
    proxy.set_link(rate=3e6)  # each blob stream at 3 MB/s: ~2 s undisturbed for all
    held.release()

    # The proxy pauses the transfers at each point, so the stop lands exactly there however
    # slowly this test is scheduled; each daemon's requests carry its number (proxy epoch).
    stops = (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM)
    for n, (share, sig) in enumerate(zip((0.12, 0.25, 0.40, 0.55), stops, strict=True)):
        resume = proxy.pause_at(int(share * total), "/blobs/")
        proxy.wait_sent(int(share * total), "/blobs/", give_up=gone)
        code = daemon.stop(sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), daemon.log.read_text()
        proxy.epoch = n + 1
        daemon = daemons(store)
        resume()
    proxy.set_link(None)

    for pull in pulls:
        if pull.proc is not None:
            code, out, err = _finish(pull.proc)
            assert code == 0, err
            assert "fetchd: daemon restarted, resuming" in err, err
            assert "(hardlink)" in out
        else:
            assert pull.thread is not None
            pull.thread.join()
            assert pull.error is None, repr(pull.error)
            assert pull.result is not None
            said = [e["message"] for e in pull.events if e.get("event") == "reconnect"]
            assert "daemon restarted, resuming" in said
        assert _sha256(pull.output) == want[(pull.image.name, pull.level)], pull.output
    assert daemon.stop() == 0

    # Every blob crossed the network once, plus only what was in flight at each stop.
    log = proxy.log
    resumes = 0
    for digest, size in blobs.items():
        # (a new daemon's first big blob probes Range support with one byte: not a transfer)
        records = [(i, r) for i, r in enumerate(log)
                   if r.method == "GET" and r.path.endswith(f"/blobs/{digest}")
                   and r.status in (200, 206) and r.range != "bytes=0-0"]
        resumes += len(records) - 1
        reached = 0
        overlaps: list[str] = []
        for n, (_i, r) in enumerate(records):
            start = _start_of(r)
            if n:
                # What the store lost at the stop that cut the previous transfer: a SIGTERM
                # keeps every byte that reached the daemon (only the sockets' buffers are
                # lost); a SIGKILL also loses the bytes written since the last record of the
                # partial (2 MiB) and those not yet written (1 MiB).
                killed = stops[records[n - 1][1].epoch] == signal.SIGKILL
                bound = (4 if killed else 1) * MiB
                assert reached - start <= bound, (digest, n, start, reached, killed)
                overlaps.append(f"{'KILL' if killed else 'TERM'} {reached - start}")
                assert start <= reached  # never a gap
            reached = max(reached, start + r.bytes_sent)
        assert reached == size and records[-1][1].complete
        refetched = sum(r.bytes_sent for _, r in records) - size
        assert refetched <= (len(records) - 1) * 4 * MiB, (digest, refetched)
        print(f"{digest}: {size} bytes, {len(records)} transfers, {refetched} bytes fetched twice ({', '.join(overlaps)})")
    assert resumes >= len(stops)  # every stop cut a transfer short, and it was resumed


def test_sigterm_lets_a_running_job_finish_within_the_grace_and_refuses_new_connections(
    daemons: Callable[..., Daemon], proxy: RegistryProxy, four_images: list[CatalogImage],
    open_tmp: Path,
) -> None:
    image = four_images[0]
    daemon = daemons(open_tmp / "store", grace=300.0)
    held = proxy.hold("/blobs/")
    pull = Pull(image, 3, open_tmp / "out.zst")
    _start(pull, daemon, image.ref(proxy.host), cli=False)
    _wait_jobs(daemon, 1, lambda: None if pull.running() else "the pull ended early")
    proxy.set_link(rate=2e6)
    resume = proxy.pause_at(MiB, "/blobs/")  # the job is mid-download when the signal comes
    held.release()
    proxy.wait_sent(MiB, "/blobs/")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    # The daemon says it stopped listening before it waits for the job.
    stopping = threading.Event()
    while "stopping: no new connections" not in daemon.log.read_text():
        assert daemon.proc.poll() is None, daemon.log.read_text()
        stopping.wait(0.02)
    with pytest.raises(DaemonUnreachable):  # no new connection is accepted meanwhile
        Client(daemon.socket).health()
    proxy.set_link(None)
    resume()
    assert pull.thread is not None
    pull.thread.join()
    assert pull.error is None, repr(pull.error)
    assert pull.result is not None and pull.result["delivery"] == "hardlink"
    assert not [e for e in pull.events if e.get("event") == "reconnect"]  # the same daemon
    assert daemon.proc.wait() == 0
    log = daemon.log.read_text()
    assert "parking" not in log and "stopped" in log


def test_a_second_sigterm_parks_at_once_and_the_build_resumes_on_the_next_daemon(
    daemons: Callable[..., Daemon], proxy: RegistryProxy, four_images: list[CatalogImage],
    open_tmp: Path,
) -> None:
    """An impatient operator (or Ctrl-C twice): the second signal ends the grace; the build
    is parked, follows the next daemon and completes."""
    image = four_images[1]
    store = open_tmp / "store"
    daemon = daemons(store, grace=3600.0)
    held = proxy.hold("/blobs/")
    pull = Pull(image, 3, open_tmp / "out.zst")
    _start(pull, daemon, image.ref(proxy.host), cli=True)
    _wait_jobs(daemon, 1, lambda: None if pull.running() else "the pull ended early")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    waiting = threading.Event()
    while "stopping: no new connections" not in daemon.log.read_text():
        assert daemon.proc.poll() is None, daemon.log.read_text()
        waiting.wait(0.02)
    assert daemon.stop(signal.SIGTERM) == 0  # the second one: no hour-long grace
    assert "second signal: parking the running jobs now" in daemon.log.read_text()
    held.release()
    daemons(store)
    code, out, err = _finish(pull.proc)
    assert code == 0, err
    assert "fetchd: daemon restarted, resuming" in err
    assert _sha256(pull.output) == out.split()[-1]


# -- the grace in the Puller itself ------------------------------------------------------------


class _Slow(Puller):
    """A Puller whose jobs end when the test says so."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gates: dict[str, asyncio.Event] = {}

    async def _fetch(self, job: Job) -> FetchResult:
        gate = self.gates.setdefault(str(job.request.reference), asyncio.Event())
        await gate.wait()
        raise RuntimeError("not reached in these tests")


@pytest.fixture
async def slow_puller(tmp_path: Path) -> Any:
    config = Config.from_dict({}, env={"FETCHD_STORE": str(tmp_path)})
    store = LayerStore(tmp_path)
    client = RegistryClient(config)
    puller = _Slow(store, client, config)
    try:
        yield puller
    finally:
        await puller.close()
        await client.close()
        store.close()


def _submit(puller: Puller, name: str) -> Job:
    return puller.submit(FetchRequest(Reference.parse(f"r.example/{name}:1"), Platform.parse("linux/amd64")))


async def test_close_waits_for_jobs_within_the_grace_and_takes_no_new_ones(slow_puller: _Slow) -> None:
    jobs = [_submit(slow_puller, "a"), _submit(slow_puller, "b")]
    closing = asyncio.ensure_future(slow_puller.close(grace=3600))
    slow_puller.stop_taking()
    with pytest.raises(ShuttingDown, match="shutting down"):
        _submit(slow_puller, "late")
    slow_puller.gates.setdefault("r.example/a:1", asyncio.Event()).set()
    with pytest.raises(Exception, match="internal error"):  # its own outcome, not a park
        await jobs[0].wait()
    assert not closing.done() and not jobs[1].done()
    slow_puller.gates.setdefault("r.example/b:1", asyncio.Event()).set()
    await closing  # returns once the last job ended, long before the grace
    with pytest.raises(Exception, match="internal error"):
        await jobs[1].wait()


async def test_close_parks_the_jobs_still_running_after_the_grace(slow_puller: _Slow) -> None:
    job = _submit(slow_puller, "never")
    await slow_puller.close(grace=0.01)  # the job never ends by itself
    with pytest.raises(ShuttingDown, match="stopped before the job finished"):
        await job.wait()
