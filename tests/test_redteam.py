"""Red-team tests: every finding of issue 13 (one daemon, many users: nobody can starve,
fill, evict, poison or trick it for the others), each reproduced against its own evil
registry on loopback and shown fixed.

The evil registries here are small aiohttp apps: ``Tarpit`` holds requests open (sending a
byte now and then, or nothing), ``FakeRegistry`` (tests/fake_registry.py) answers what a
finding's test scripts (redirects anywhere, error bodies with escape sequences, manifests
that name other images' digests).

Two kinds of test:

- in-process (``Daemon``: a Puller with its store), for findings about scheduling and limits;
- against a real ``fetchd serve`` process (``Served``: root daemon, socket open to every user,
  requests made as ``nobody`` through the socket, so SO_PEERCRED, /proc and the kernel's
  permission checks are the real ones), for findings about authority, hand-back and input.

Sections: job slots, layer count and events, deadlines, single-flight hijack (limits);
authority, hand-back, private images, config file, metadata and input (auth); file
descriptors and connections, partials (limits). pack: add each of your findings here as a
test named after the finding (compression slots, decompression bombs), in-process or against
``Served``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fake_registry import FakeRegistry
from support.images import Catalog, PlatformImage, make_image, make_layer, text_bytes

from fetchd.config import Config
from fetchd.digest import Digest
from fetchd.layer_store import LayerStore
from fetchd.platform import Platform
from fetchd.pull import FetchRequest, Job, Puller
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient
from fetchd.server import store_settings

AMD64 = Platform.parse("linux/amd64")
ATTACKER, VICTIM = 6666, 1001  # peer uids as the server would pass them


# -- evil registries and helpers ------------------------------------------------------------


class Tarpit:
    """A registry that answers every manifest and blob request with its headers and one
    byte, then holds the connection until ``release()``; ``holding(n)`` waits until ``n``
    requests are held."""

    def __init__(self) -> None:
        self.held = 0
        self._changed = asyncio.Condition()
        self._released = asyncio.Event()
        self.server: TestServer | None = None

    async def start(self) -> Tarpit:
        app = web.Application()
        app.router.add_get("/v2/", self._ping)
        app.router.add_route("*", r"/v2/{name:.+}/{kind:manifests|blobs}/{ref}", self._hold)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _hold(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        resp.content_length = 1 << 20
        await resp.prepare(request)
        async with self._changed:
            self.held += 1
            self._changed.notify_all()
        try:
            if request.method != "HEAD":
                await resp.write(b"{")
            await self._released.wait()
        finally:
            async with self._changed:
                self.held -= 1
                self._changed.notify_all()
        return resp

    async def holding(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.held >= n)

    async def close(self) -> None:
        self._released.set()
        if self.server is not None:
            await self.server.close()


def small_image(seed: str, layers: int = 2) -> PlatformImage:
    return make_image("linux/amd64", [make_layer(text_bytes(f"{seed}-{i}", 64 << 10), "gzip")
                                      for i in range(layers)])


def serve_image(fake: FakeRegistry, repo: str, tag: str, image: PlatformImage) -> str:
    fake.add_blob(image.config_bytes)
    for layer in image.layers:
        fake.add_blob(layer.read())
    fake.add_manifest(repo, tag, image.manifest_bytes, image.manifest_media_type)
    return f"{fake.host}/{repo}:{tag}"


def request(reference: str, uid: int | None = VICTIM, **kw: Any) -> FetchRequest:
    return FetchRequest(Reference.parse(reference), AMD64, uid=uid, **kw)


@pytest.fixture
async def fake() -> AsyncIterator[FakeRegistry]:
    registry = await FakeRegistry().start()
    try:
        yield registry
    finally:
        await registry.close()


@pytest.fixture
async def tarpit() -> AsyncIterator[Tarpit]:
    pit = await Tarpit().start()
    try:
        yield pit
    finally:
        await pit.close()


class Daemon:
    """A Puller with its store and registry client, configured by the test."""

    def __init__(self, tmp_path: Path, **sections: dict[str, Any]) -> None:
        sections.setdefault("network", {}).setdefault("retries", 1)
        sections["network"].setdefault("backoff_base", 0.001)
        self.config = Config.from_dict(sections, env={"FETCHD_STORE": str(tmp_path / "store")})
        self.store = LayerStore(tmp_path / "store", store_settings(self.config))
        self.registry = RegistryClient(self.config)
        self.puller = Puller(self.store, self.registry, self.config)

    def submit(self, reference: str, uid: int | None = VICTIM, **kw: Any) -> Job:
        return self.puller.submit(request(reference, uid, **kw))

    async def close(self) -> None:
        await self.puller.close()
        await self.registry.close()
        self.store.close()


# -- starvation: job slots ------------------------------------------------------------------


async def test_cached_and_offline_pulls_never_queue_behind_stalled_network_jobs(
        tmp_path: Path, fake: FakeRegistry, tarpit: Tarpit) -> None:
    """Finding: requests whose manifests trickle filled server.max_jobs; then even a fully
    cached --offline pull waited. Now a job takes a network slot only before its first
    registry request: work answered from the store takes none."""
    d = Daemon(tmp_path, server={"max_jobs": 2, "max_jobs_per_uid": 2})
    try:
        reference = serve_image(fake, "app/img", "1", small_image("slots"))
        warm = await d.submit(reference).wait()
        stuck = [d.submit(f"{tarpit.host}/evil/img:{i}", uid=ATTACKER) for i in range(2)]
        await tarpit.holding(2)  # every network slot is held by a trickling request
        offline = await d.submit(reference, offline=True).wait()
        cached = await d.submit(reference).wait()  # tag cache fresh: no registry request
        assert offline.archive_digest == cached.archive_digest == warm.archive_digest
        assert not any(job.done() for job in stuck)
    finally:
        await d.close()


async def test_one_uid_cannot_take_every_network_job_slot(
        tmp_path: Path, fake: FakeRegistry, tarpit: Tarpit) -> None:
    """Finding: one user's trickling requests took every job slot. Now one uid holds at
    most server.max_jobs_per_uid of them; the others stay free for other users."""
    d = Daemon(tmp_path, server={"max_jobs": 4, "max_jobs_per_uid": 2})
    try:
        reference = serve_image(fake, "app/img", "1", small_image("per-uid"))
        stuck = [d.submit(f"{tarpit.host}/evil/img:{i}", uid=ATTACKER) for i in range(4)]
        await tarpit.holding(2)
        # A job is "running" until it asks for a network slot (its tag is looked up in the
        # store first, in a worker thread): until all four asked, with or without a slot.
        slots = d.puller._slots
        while slots.held + slots.waiting() < 4:  # noqa: ASYNC110 -- no event for "asked"
            await asyncio.sleep(0.005)
        assert slots.held == 2 and slots.waiting() == 2
        assert sorted(job.state for job in stuck) == ["queued", "queued", "running", "running"]
        result = await d.submit(reference).wait()  # needs the network: a free slot
        assert result.blobs_downloaded == 2
        assert not any(job.done() for job in stuck)
    finally:
        await d.close()


# -- memory and per-layer work: layer count, job events -------------------------------------


def huge_manifest(n: int = 20000) -> tuple[list[dict[str, Any]], bytes]:
    """An image manifest of ``n`` layers (20000: ~2.5 MB) and its layer list."""
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
               "digest": "sha256:" + f"{i:064x}", "size": 1000} for i in range(n)]
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": "sha256:" + "c" * 64, "size": 2},
                       "layers": layers}).encode()
    return layers, body


async def test_a_huge_layer_list_is_refused_before_any_per_layer_work(
        tmp_path: Path, fake: FakeRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: a 20000-layer manifest blocked the loop with per-layer sqlite writes and
    opened files for every layer. Now the list's length is checked first (server.max_layers)
    and the pull fails with a clear error, having looked at no layer."""
    import fetchd.manifest

    layers, body = huge_manifest()
    fake.add_manifest("huge/img", "1", body)
    described: list[object] = []
    original = fetchd.manifest.Descriptor.from_json

    def counting(obj: object, where: str) -> fetchd.manifest.Descriptor:
        described.append(obj)
        return original(obj, where)

    monkeypatch.setattr(fetchd.manifest.Descriptor, "from_json", staticmethod(counting))
    d = Daemon(tmp_path)
    try:
        job = d.submit(f"{fake.host}/huge/img:1")
        with pytest.raises(fetchd.manifest.ManifestInvalid) as err:
            await job.wait()
        assert "20000 layers" in err.value.message and "max_layers" in err.value.message
        assert described == []  # not one layer descriptor was built
        assert fake.requests("blob") == []
        assert d.store.blob_info(fetchd.manifest.Digest.parse(layers[0]["digest"])) is None
    finally:
        await d.close()


async def test_a_huge_manifest_is_parsed_off_the_event_loop_while_health_answers(
        tmp_path: Path, fake: FakeRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: a 20000-layer manifest (~2.5 MB) was hashed and decoded on the event loop
    (the C JSON decoder holds the GIL for the whole document: tens of ms, once per request).
    Now a body bigger than manifest.INLINE_JSON is hashed and parsed in a worker thread, by
    a decoder that leaves the GIL to the loop. Shown deterministically: the decoding is held
    in its thread until /v1/health on the same daemon has answered; then the pull fails
    with the layer-cap error."""
    import threading

    import aiohttp

    import fetchd.manifest
    from fetchd.server import Services, listen_unix, make_app

    _, body = huge_manifest()
    assert len(body) > fetchd.manifest.INLINE_JSON
    fake.add_manifest("huge/img", "1", body)
    loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()
    parsing, release = asyncio.Event(), threading.Event()
    big_parses: list[int] = []  # the thread of every decoding of the big body
    original = fetchd.manifest.loads

    def held(raw: bytes) -> Any:
        if raw == body:
            big_parses.append(threading.get_ident())
            if threading.get_ident() != loop_thread:  # on the loop it would block it: not held
                loop.call_soon_threadsafe(parsing.set)
                release.wait()
        return original(raw)

    monkeypatch.setattr(fetchd.manifest, "loads", held)
    d = Daemon(tmp_path)
    runner = web.AppRunner(make_app(Services(d.puller, d.store, d.registry, d.config)))
    await runner.setup()
    sock_path = str(tmp_path / "fetchd.sock")
    await web.SockSite(runner, listen_unix(sock_path, 0o600)).start()
    try:
        job = d.submit(f"{fake.host}/huge/img:1")
        failed = asyncio.ensure_future(job.wait())
        entered = asyncio.ensure_future(parsing.wait())
        await asyncio.wait([failed, entered], return_when=asyncio.FIRST_COMPLETED)
        entered.cancel()
        assert parsing.is_set(), "the manifest was decoded on the event loop"
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock_path)) as http:
            async with http.get("http://fetchd/v1/health") as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"
        assert not failed.done()  # health answered while the decoding was still under way
        release.set()
        with pytest.raises(fetchd.manifest.ManifestInvalid) as err:
            await failed
        assert "20000 layers" in err.value.message and "max_layers" in err.value.message
        assert big_parses and loop_thread not in big_parses
    finally:
        release.set()
        await runner.cleanup()
        await d.close()


async def test_a_jobs_event_list_is_bounded_and_late_readers_get_a_summary() -> None:
    """Finding: a job's event list grew for its whole lifetime (progress of every layer,
    every quarter second). Now it keeps at most max_events; a reader that joins late gets
    a summary: the latest event of each layer, then the live events."""
    job = Job(request("example.org/a/b:1"), max_events=16)
    job.push({"event": "manifest", "layers": 2})
    early = job.events()
    first = await anext(early)  # a reader that joined at once, then stopped reading
    for i in range(1, 1001):
        for digest in ("sha256:aa", "sha256:bb"):
            job.push({"event": "progress", "digest": digest, "bytes": i, "total": 1000})
    job.push({"event": "warning", "message": "slow registry"})
    assert len(job._events) <= 16
    late = [e async for e in _until_done(job)]
    assert late[0]["event"] == "summary" and late[0]["skipped"] > 1900
    assert len(late) < 16 + 8
    progress = {e["digest"]: e["bytes"] for e in late if e["event"] == "progress"}
    assert progress == {"sha256:aa": 1000, "sha256:bb": 1000}
    assert any(e["event"] == "manifest" for e in late)
    assert any(e.get("message") == "slow registry" for e in late)
    assert first["event"] == "manifest"
    rest = [e async for e in early]  # the stalled reader resumes: a summary, not the history
    assert rest[0]["event"] == "summary" and len(rest) < 16 + 8


async def _until_done(job: Job) -> AsyncIterator[dict[str, Any]]:
    events = job.events()
    job._finish()
    async for event in events:
        yield event


# -- deadlines ------------------------------------------------------------------------------


class TrickleBlobs(FakeRegistry):
    """Serves manifests and configs normally; every blob answer sends its headers and a few
    bytes, then nothing more (a connection held open forever)."""

    def __init__(self) -> None:
        super().__init__()
        self.stop = asyncio.Event()
        self.trickled = 0

    async def _send_blob(self, request: web.Request, digest: str, fault: Any) -> web.StreamResponse:
        data = self.blobs.get(digest, b"")
        if len(data) < 4096:  # the config: served
            return await super()._send_blob(request, digest, fault)
        resp = web.StreamResponse()
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[:10])
        self.trickled += 1
        await self.stop.wait()
        return resp


async def test_compression_slots_a_tarpit_of_one_uid_does_not_block_another_uids_pull(
        tmp_path: Path, fake: FakeRegistry) -> None:
    """Finding (compression slots): a 2-layer image whose blobs trickle took every
    compression slot before any byte arrived; another user's pull hung until the tarpit
    died. Now a layer asks for a slot only once it has bytes to compress (and gives the CPU
    back while they stall), and slots are shared fairly between uids."""
    from fetchd.compress_budget import CompressionBudget

    evil = await TrickleBlobs().start()
    # no deadlines: the tarpit holds its connections for as long as the test runs
    d = Daemon(tmp_path, network={"stall_timeout": 0}, server={"job_stall_timeout": 0})
    d.puller.budget = budget = CompressionBudget(workers=2)
    try:
        slow = make_image("linux/amd64", [make_layer(text_bytes(f"tarpit-{i}", 256 << 10), "gzip")
                                          for i in range(2)])
        stuck = d.submit(serve_image(evil, "evil/img", "1", slow), uid=ATTACKER)
        while evil.trickled < 2:  # noqa: ASYNC110 -- counted by the registry's handlers
            await asyncio.sleep(0.005)
        reference = serve_image(fake, "app/img", "1", small_image("victim"))
        result = await d.submit(reference).wait()
        assert result.blobs_downloaded == 2
        assert not stuck.done() and budget.active == 0 and budget.waiting == 0
    finally:
        evil.stop.set()
        await d.close()
        await evil.close()


async def test_decompression_bombs_fail_clearly_and_stop_at_their_bound(
        tmp_path: Path, fake: FakeRegistry) -> None:
    """Finding: a 64 KiB layer expanding to 2 GiB (correct diff_id) cost 3.3 s of CPU; 64 MiB
    would be ~2 TiB. Now a layer may expand to [pack] max_layer_ratio times its size (at
    least 64 MiB), at most max_layer_size; past that the pull fails at once."""
    from fetchd.errors import LayerTooLarge

    d = Daemon(tmp_path, pack={"max_layer_ratio": 100})
    try:
        image = make_image("linux/amd64", [make_layer(bytes(80 << 20), "gzip")])  # ~80 KiB
        reference = serve_image(fake, "bomb/img", "1", image)
        with pytest.raises(LayerTooLarge) as err:
            await d.submit(reference).wait()
        assert err.value.code == "layer-too-large" and err.value.http_status == 422
        assert "max_layer_ratio" in err.value.message
        assert not list((tmp_path / "store" / "tmp").iterdir())
    finally:
        await d.close()


async def test_a_trickling_manifest_fails_on_its_progress_deadline_naming_the_registry(
        tmp_path: Path, tarpit: Tarpit) -> None:
    """Finding: nothing bounded how long a download may make no progress. Now each request
    must bring stall_bytes in every stall_timeout seconds; it is retried, then fails."""
    d = Daemon(tmp_path, network={"stall_timeout": 0.2, "stall_bytes": 1024, "retries": 1})
    try:
        from fetchd.errors import RegistryStalled

        with pytest.raises(RegistryStalled) as err:
            await d.submit(f"{tarpit.host}/evil/img:1").wait()
        assert err.value.code == "registry-stalled"
        assert tarpit.host in err.value.message and "stall" in err.value.message
    finally:
        await d.close()


async def test_a_trickling_blob_is_retried_then_fails_naming_the_registry(tmp_path: Path) -> None:
    evil = await TrickleBlobs().start()
    d = Daemon(tmp_path, network={"stall_timeout": 0.2, "stall_bytes": 1024, "retries": 2})
    try:
        from fetchd.errors import RegistryStalled

        image = make_image("linux/amd64", [make_layer(text_bytes("trickle", 256 << 10), "gzip")])
        reference = serve_image(evil, "slow/img", "1", image)
        with pytest.raises(RegistryStalled) as err:
            await d.submit(reference).wait()
        assert evil.host in err.value.message and "stall_timeout" in err.value.message
        assert evil.trickled == 3  # the first try and two retries, each cut by the deadline
    finally:
        evil.stop.set()
        await d.close()
        await evil.close()


async def test_a_job_without_any_progress_fails_on_the_job_deadline(
        tmp_path: Path, tarpit: Tarpit) -> None:
    """The per-request deadline off (0), the job's own deadline still ends a job that waits
    on a registry that never answers."""
    d = Daemon(tmp_path, network={"stall_timeout": 0}, server={"job_stall_timeout": 0.3})
    try:
        from fetchd.errors import RegistryStalled

        job = d.submit(f"{tarpit.host}/evil/img:2")
        with pytest.raises(RegistryStalled) as err:
            await job.wait()
        assert "job_stall_timeout" in err.value.message and tarpit.host in err.value.message
        assert job.state == "failed"
    finally:
        await d.close()



class GatedBlobs(FakeRegistry):
    """Serves manifests and configs at once; each layer blob sends its first bytes, then the
    rest only once ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.held = 0

    async def _send_blob(self, request: web.Request, digest: str, fault: Any) -> web.StreamResponse:
        data = self.blobs.get(digest, b"")
        if len(data) < 4096:  # the config
            return await super()._send_blob(request, digest, fault)
        resp = web.StreamResponse()
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[:10])
        self.held += 1
        self.started.set()
        await self.release.wait()
        await resp.write(data[10:])
        return resp


async def test_a_job_joined_to_another_jobs_download_is_not_counted_as_waiting_on_a_registry(
        tmp_path: Path) -> None:
    """Only a job's own transfers count for its job deadline: one that joined another job's
    flight of a shared layer gets no progress events of its own, and was failed with
    registry-stalled after job_stall_timeout while the bytes kept coming."""
    gate = await GatedBlobs().start()
    d = Daemon(tmp_path, network={"stall_timeout": 0}, server={"job_stall_timeout": 0})
    try:
        shared = make_layer(text_bytes("shared layer", 64 << 10), "gzip")
        first = serve_image(gate, "app/one", "1", make_image("linux/amd64", [shared]))
        second = serve_image(gate, "app/two", "1", make_image(
            "linux/amd64", [shared], cmd=("/bin/true",)))
        a = d.submit(first)
        await gate.started.wait()  # a's own transfer of the shared layer has begun
        b = d.submit(second)
        events = b.events()
        async for event in events:
            if event.get("state") == "downloading":
                break
        await events.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(0)  # b goes on into the store's flight of a's transfer
        assert a.network == 1 and b.network == 0
        gate.release.set()
        for job in (a, b):
            await job.wait()
        assert gate.held == 1  # one transfer of the shared layer, for both jobs
    finally:
        gate.release.set()
        await d.close()
        await gate.close()

# -- single-flight hijack -------------------------------------------------------------------


class HoldingLayers(FakeRegistry):
    """The attacker's registry: serves its manifest and config, and for the layers it names
    (a public image's digests) holds each request until ``release``, then answers 500, or,
    with ``stall``, holds it for ever."""

    def __init__(self, layers: set[str], stall: bool = False) -> None:
        super().__init__()
        self.layers, self.stall = layers, stall
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def _send_blob(self, request: web.Request, digest: str, fault: Any) -> web.StreamResponse:
        if digest not in self.layers:
            return await super()._send_blob(request, digest, fault)
        self.holding.set()
        await self.release.wait()
        if self.stall:
            await asyncio.Event().wait()
        return web.json_response({"errors": [{"code": "UNKNOWN", "message": "evil says no"}]},
                                 status=500)


async def _joined(job: Job, digests: set[str]) -> None:
    """Return once ``job`` asked the store for each of ``digests`` (it then waits on them)."""
    waiting = set(digests)
    async for event in job.events():
        if event.get("event") == "layer" and event.get("state") == "downloading":
            waiting.discard(event["digest"])
        if not waiting:
            return


@pytest.mark.registry
@pytest.mark.parametrize("stall", [False, True], ids=["attacker-fails", "attacker-stalls"])
async def test_a_victim_joining_an_attackers_flight_falls_back_to_its_own_registry(
        tmp_path: Path, images: Catalog, stall: bool) -> None:
    """Finding: an attacker's image on the attacker's registry names a public layer's
    digest; the daemon fetches it from the attacker, and a victim pulling the real image
    joined that flight and then failed with the attacker's error (or hung). Now a waiter
    whose own source differs fetches from its own source when that flight fails or stalls."""
    real = images["single-oci"]
    layers = {str(layer.digest) for layer in real.only.layers}
    evil = await HoldingLayers(layers, stall=stall).start()
    d = Daemon(tmp_path, network={"retries": 0, "stall_timeout": 0.5 if stall else 0})
    try:
        trap = serve_image(evil, "evil/img", "1", real.only)
        attacker = d.submit(trap, uid=ATTACKER)
        await evil.holding.wait()  # the attacker's flight holds the public layers
        victim = d.submit(real.reference, uid=VICTIM)
        await _joined(victim, layers)
        evil.release.set()
        result = await victim.wait()
        assert result.manifest_digest == str(real.only.manifest_digest)
        assert result.blobs_downloaded == len(layers)
        from fetchd.errors import FetchdError

        if not stall:
            with pytest.raises(FetchdError):
                await attacker.wait()  # its own source's failure stays its own
        else:  # it gave up its stalled source; it may share the victim's verified blobs
            await asyncio.gather(attacker.wait(), return_exceptions=True)
    finally:
        evil.release.set()
        await d.close()
        await evil.close()


# == against a real `fetchd serve` (auth: authority, hand-back, private images, input) =======


ROOT = Path(__file__).resolve().parent.parent


class Served:
    """``fetchd serve`` as root in a child process: socket 0666 in ``base`` (every user may
    connect), its own store, config and log. Readiness comes from its sd_notify READY=1."""

    def __init__(self, base: Path, config: str) -> None:
        self.base = base
        self.socket = str(base / "fetchd.sock")
        self.store = base / "store"
        self.log = base / "daemon.log"
        self.config = base / "config.toml"
        self.config.write_text("[server]\nsocket_mode = 0o666\n" + config)
        self.config.chmod(0o600)
        self.proc: Any = None
        self.private: FakeRegistry | None = None  # a registry configured private

    async def start(self) -> Served:
        import os
        import socket
        import subprocess
        import sys

        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.base / "notify.sock"))
        notify.setblocking(False)
        env = dict(os.environ, NOTIFY_SOCKET=str(self.base / "notify.sock"),
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "client")]))
        env.pop("FETCHD_SOCKET", None)
        def spawn() -> Any:
            with open(self.log, "wb") as log:
                return subprocess.Popen(
                    [sys.executable, "-m", "fetchd", "serve", "--socket", self.socket,
                     "--store", str(self.store), "--config", str(self.config)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        self.proc = await asyncio.to_thread(spawn)
        loop = asyncio.get_running_loop()
        try:
            while b"READY=1" not in await loop.sock_recv(notify, 4096):
                pass
        finally:
            notify.close()
        return self

    def stop(self) -> str:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        return self.log.read_text(errors="replace")

    async def as_user(self, method: str, url: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        """One request as ``nobody`` (default) or the uid/gid/groups given."""
        from support.as_user import request_as

        return await asyncio.to_thread(request_as, self.socket, method, url, body, **kw)

    def daemon_log(self) -> str:
        return self.log.read_text(errors="replace")


def _needs_root_and_python() -> None:
    from support.as_user import can_act_as_others

    if not can_act_as_others():
        pytest.skip("needs root and /usr/bin/python3 to act as nobody")


@pytest.fixture
async def served(open_tmp: Path, fake: FakeRegistry) -> AsyncIterator[Served]:
    """A served daemon; ``fake`` is an ordinary registry, ``private`` one configured private."""
    _needs_root_and_python()
    secret = await FakeRegistry().start()
    daemon = Served(open_tmp, f'[registries."{secret.host}"]\nprivate = true\n')
    daemon.private = secret
    try:
        await daemon.start()
        yield daemon
    finally:
        log = daemon.stop()
        await secret.close()
        assert "Traceback" not in log, log  # no finding may end as an unexpected error


def _fetch(reference: str, dest: Path | None = None, **extra: Any) -> dict[str, Any]:
    return {"reference": reference, **({"dest": str(dest)} if dest else {}), **extra}


def _nobodys(directory: Path) -> Path:
    import os

    from support.as_user import NOBODY

    directory.mkdir()
    os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
    return directory


async def test_served_nobody_cannot_evict_the_store_or_verify(served: Served, fake: FakeRegistry,
                                                               open_tmp: Path) -> None:
    """Finding: any socket user's `gc {"max_size": 0}` evicted another user's whole store
    (their --offline pull then failed), and any user could run verify."""
    reference = serve_image(fake, "app/img", "1", small_image("evict"))
    out = _nobodys(open_tmp / "out")
    got, answer = await served.as_user("POST", "/v1/fetch", _fetch(reference, out / "a.zst"))
    assert got == 200 and "result" in answer, answer
    got, answer = await served.as_user("POST", "/v1/gc", {"max_size": 0})
    assert got == 403 and answer["code"] == "permission-refused", answer
    got, answer = await served.as_user("POST", "/v1/verify", {})
    assert got == 403 and answer["code"] == "permission-refused", answer
    # another user's offline pull still works: nothing was evicted
    got, answer = await served.as_user("POST", "/v1/fetch",
                                       _fetch(reference, out / "b.zst", offline=True))
    assert got == 200 and "result" in answer, answer


async def test_served_hand_back_follows_the_callers_rights(served: Served, fake: FakeRegistry,
                                                           open_tmp: Path) -> None:
    """Findings: an ACL denying the caller was ignored; answers told nobody whether a path
    exists inside a private directory; in sticky directories the delivered link was the
    daemon's and the user could not delete it."""
    import os
    import shutil
    import subprocess

    from support.as_user import NOBODY

    reference = serve_image(fake, "app/img", "1", small_image("hand-back"))
    if shutil.which("setfacl"):
        denied = open_tmp / "denied"
        denied.mkdir()
        denied.chmod(0o777)
        await asyncio.to_thread(subprocess.run, ["setfacl", "-m", f"u:{NOBODY.pw_name}:---",
                                                 str(denied)], check=True)
        got, answer = await served.as_user("POST", "/v1/fetch", _fetch(reference, denied / "x.zst"))
        assert got == 403 and answer["code"] == "permission-refused", answer
        assert list(denied.iterdir()) == []
    private = open_tmp / "private"
    (private / "exists").mkdir(parents=True)
    private.chmod(0o700)
    answers = set()
    for sub in ("exists", "missing"):
        got, answer = await served.as_user("POST", "/v1/fetch",
                                           _fetch(reference, private / sub / "x.zst"))
        assert got == 403, answer
        answers.add(answer["message"].replace(sub, "X"))
    assert len(answers) == 1, answers
    sticky = open_tmp / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    got, answer = await served.as_user("POST", "/v1/fetch", _fetch(reference, sticky / "x.zst"))
    assert got == 200 and answer["result"]["delivery"] in ("copy", "reflink"), answer
    assert os.stat(sticky / "x.zst").st_uid == NOBODY.pw_uid
    removed = await asyncio.to_thread(subprocess.run, ["rm", str(sticky / "x.zst")],
                                      user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
                                      capture_output=True)
    assert removed.returncode == 0 and not (sticky / "x.zst").exists()


async def test_served_private_registry_images_are_the_callers_own_copies(
        served: Served, open_tmp: Path) -> None:
    """Finding: group members pull private images with the daemon's credentials and the
    result landed world-readable (store files 0444, a shared 0444 hard link)."""
    import os

    from support.as_user import NOBODY

    secret = served.private
    assert secret is not None
    reference = serve_image(secret, "team/secret", "1", small_image("private"))
    out = _nobodys(open_tmp / "out")
    got, answer = await served.as_user("POST", "/v1/fetch", _fetch(reference, out / "s.zst"))
    assert got == 200 and answer["result"]["private"] is True, answer
    st = os.stat(out / "s.zst")
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY.pw_uid, 0o600)
    archive = answer["result"]["archive_digest"].split(":")[1]
    assert os.stat(served.store / "blobs" / "sha256" / archive).st_mode & 0o777 == 0o400
    got, answer = await served.as_user("POST", "/v1/fetch", _fetch(reference))
    assert got == 400 and "private" in answer["message"], answer


async def test_served_config_with_secrets_readable_by_others_is_warned_about(
        open_tmp: Path, fake: FakeRegistry) -> None:
    """Finding: config.toml holds mirror credentials and headers; nothing warned when others
    could read it."""
    _needs_root_and_python()
    daemon = Served(open_tmp, f'[registries."{fake.host}"]\nmirrors = [{{url = "http://127.0.0.1:9", '
                              'headers = {"X-Token" = "s3cret-value"}}]\n')
    daemon.config.chmod(0o644)
    await daemon.start()
    log = daemon.stop()
    assert f"the config file {daemon.config} holds mirror credentials or headers" in log, log
    assert "s3cret-value" not in log


async def test_served_other_images_cannot_poison_a_pinned_manifest(
        served: Served, fake: FakeRegistry, open_tmp: Path) -> None:
    """Finding: an image listing another image's manifest digest as an index-typed layer
    rewrote its stored media type; everyone's pinned pulls of a manifest without mediaType
    then failed, --offline included."""
    image = small_image("pinned", layers=1)
    manifest = json.loads(image.manifest_bytes)
    manifest.pop("mediaType", None)
    body = json.dumps(manifest).encode()
    fake.add_blob(image.config_bytes)
    fake.add_blob(image.layers[0].read())
    fake.add_blob(body)
    victim = fake.add_manifest("victim/img", None, body)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [str(image.layers[0].diff_id)]}}).encode()
    fake.add_blob(config)
    evil = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": str(Digest.of(config)), "size": len(config)},
                       "layers": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                                   "digest": str(victim), "size": len(body)}]}).encode()
    fake.add_manifest("evil/img", "1", evil)
    out = _nobodys(open_tmp / "out")
    pinned = f"{fake.host}/victim/img@{victim}"
    got, first = await served.as_user("POST", "/v1/fetch", _fetch(pinned, out / "v1.zst"))
    assert got == 200 and "result" in first, first
    await served.as_user("POST", "/v1/fetch", _fetch(f"{fake.host}/evil/img:1", out / "e.zst"))
    got, again = await served.as_user("POST", "/v1/fetch", _fetch(pinned, out / "v2.zst", offline=True))
    assert got == 200 and "result" in again, again
    assert again["result"]["archive_digest"] == first["result"]["archive_digest"]


HOSTILE_INPUT = [
    ("deeply nested body", b'{"reference": ' + b"[" * 60_000, 400, "nested too deeply"),
    ("port 99999", b'{"reference": "localhost:99999/app"}', 400, "not in 1..65535"),
    ("host [1:2:3]", b'{"reference": "[1:2:3]/app"}', 400, "not an IPv6 address"),
]


@pytest.mark.parametrize("body, status, words", [h[1:] for h in HOSTILE_INPUT],
                         ids=[h[0] for h in HOSTILE_INPUT])
async def test_served_hostile_input_is_a_clear_4xx(served: Served, body: bytes, status: int,
                                                   words: str) -> None:
    """Finding: these were 500 'internal' errors with a traceback in the log."""
    from support.as_user import request_raw_as

    got, answer = await asyncio.to_thread(request_raw_as, served.socket, "POST", "/v1/fetch", body)
    assert got == status and words in answer["message"], answer


async def test_served_hostile_registry_answers_are_clear_and_escaped(
        served: Served, fake: FakeRegistry, open_tmp: Path) -> None:
    """Findings: a redirect to file:// ended as an 'internal' error with a traceback; a
    registry's error text reached terminals and the log with ESC/OSC sequences intact."""
    from fake_registry import Fault

    reference = serve_image(fake, "app/img", "1", small_image("hostile", layers=1))
    out = _nobodys(open_tmp / "out")
    fake.fault("blob", Fault(redirect="file://"))
    got, answer = await served.as_user("POST", "/v1/fetch", _fetch(reference, out / "a.zst"))
    assert got == 200 and answer["error"]["code"] == "registry-error", answer
    assert "redirected to a file: URL" in answer["error"]["message"]
    said = "no\x1b]0;owned\x07 \x1b[2Jway\nFAKE LOG LINE"
    fake.fault("blob", Fault(status=403, body=json.dumps(
        {"errors": [{"code": "DENIED", "message": said}]}).encode()))
    got, answer = await served.as_user("POST", "/v1/fetch", _fetch(reference, out / "b.zst"))
    message = answer["error"]["message"]
    assert "\\x1b]0;owned\\x07" in message and "\x1b" not in message and "\n" not in message
    assert "\x1b" not in served.daemon_log() and "\nFAKE LOG LINE" not in served.daemon_log()


# -- file descriptors and connections -------------------------------------------------------

LOW_FDS = (
    "import resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
    "import fetchd.cli\n"
    "sys.exit(fetchd.cli.main(sys.argv[1:]))\n"
)


async def _open_fetch(socket_path: str, reference: str) -> tuple[int, asyncio.StreamWriter, bytes]:
    """One raw fetch request; (HTTP status, the writer, what came with the status line)."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    body = json.dumps({"reference": reference}).encode()
    writer.write(b"POST /v1/fetch HTTP/1.1\r\nHost: fetchd\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    line = await reader.readline()
    status = int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0
    rest = await reader.read(65536) if status == 503 else b""
    return status, writer, rest


@pytest.mark.skipif(not __import__("support.as_user").as_user.can_act_as_others(),
                    reason="acts as nobody: needs root")
async def test_a_connection_flood_on_one_job_leaves_status_and_other_users_served(
        open_tmp: Path, fake: FakeRegistry, tarpit: Tarpit) -> None:
    """Finding: ~250 connections joining one never-ending job held every descriptor (limit
    256); status and pulls timed out, and the accept loop logged a traceback per failed
    accept. Now connections are capped per uid and in total below the descriptor limit,
    a reserve keeps status answering, and refusals are logged once per interval."""
    import sys

    from support.as_user import NOBODY, request_as

    socket_path = str(open_tmp / "run" / "fetchd.sock")
    config = open_tmp / "config.toml"
    config.write_text("[server]\nsocket_mode = 0o666\njob_stall_timeout = 0\n"
                      "[network]\nstall_timeout = 0\n")
    log_path = open_tmp / "daemon.log"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8"}
    proc = await asyncio.to_thread(_start_daemon, [
        sys.executable, "-c", LOW_FDS, "serve", "--socket", socket_path,
        "--store", str(open_tmp / "store"), "--config", str(config)], env, log_path)
    writers: list[asyncio.StreamWriter] = []
    try:
        status, answer = await asyncio.to_thread(_wait_health, proc, socket_path, log_path)
        flood = [await _open_fetch(socket_path, f"{tarpit.host}/evil/never:1") for _ in range(250)]
        writers = [w for _, w, _ in flood]
        statuses = [s for s, _, _ in flood]
        assert statuses.count(200) <= 128  # server.max_connections_per_uid
        assert statuses.count(503) >= 250 - 128 - 2
        assert all(b"too-many-connections" in rest for s, _, rest in flood if s == 503)
        # another user: status, health and a pull of its own are answered
        status, answer = await asyncio.to_thread(request_as, socket_path, "GET", "/v1/status")
        assert status == 200 and answer["connections"]["open"] <= 128 + 1  # the cap, and this one
        assert answer["jobs"] and answer["jobs"][0]["waiters"] == statuses.count(200), (answer, log_path.read_text()[-3000:])
        reference = serve_image(fake, "other/img", "1", small_image("flood"))
        status, answer = await asyncio.to_thread(
            request_as, socket_path, "POST", "/v1/fetch", {"reference": reference},
            uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)
        assert status == 200 and "result" in answer, answer
    finally:
        for writer in writers:
            writer.close()
        proc.terminate()
        await asyncio.to_thread(proc.wait)
    text = log_path.read_text()
    assert "Traceback" not in text
    assert len(text) < 64 * 1024


def _start_daemon(argv: list[str], env: dict[str, str], log_path: Path) -> Any:
    import subprocess

    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _wait_health(proc: Any, socket_path: str, log_path: Path) -> tuple[int, Any]:
    import socket as socketlib
    import time

    from support.as_user import request_as

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # start-up only: the daemon's socket appearing
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited: {log_path.read_text()}")
        try:
            with socketlib.socket(socketlib.AF_UNIX) as probe:
                probe.connect(socket_path)
            return request_as(socket_path, "GET", "/v1/health")
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"daemon did not answer: {log_path.read_text()}")


async def test_connections_over_every_cap_are_refused_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the caps (total, per uid, reserve) a connection gets a 503 at once and is
    closed; the reserve answers status only; running out of descriptors is logged once per
    interval, not per failed accept."""
    import errno
    import logging
    import socket as socketlib

    from fetchd.listener import ConnectionCaps, LimitedSite

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/other", health)
    runner = web.AppRunner(app)
    await runner.setup()
    path = str(tmp_path / "s.sock")
    sock = socketlib.socket(socketlib.AF_UNIX)
    sock.bind(path)
    site = LimitedSite(runner, sock, ConnectionCaps(max_connections=2, max_connections_per_uid=2,
                                                    reserved=1, log_interval=3600))
    await site.start()
    held = []
    try:
        for _ in range(2):  # the ordinary connections, idle
            held.append(await asyncio.open_unix_connection(path))
        caplog.set_level(logging.WARNING, "fetchd.listener")
        reader, writer = await asyncio.open_unix_connection(path)  # the reserve
        held.append((reader, writer))
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        for _ in range(3):  # over every cap: refused at once, logged once
            r, w = await asyncio.open_unix_connection(path)
            answer = await r.read()
            assert answer.startswith(b"HTTP/1.1 503") and b"too-many-connections" in answer
            w.close()
        assert site.stats()["refused"] == 3
        assert len([r for r in caplog.records if "refused a connection" in r.getMessage()]) == 1

        calls = 0
        real_accept = asyncio.get_running_loop().sock_accept

        async def exhausted(s: socketlib.socket) -> Any:
            nonlocal calls
            calls += 1
            if calls <= 5:
                raise OSError(errno.EMFILE, "Too many open files")
            return await real_accept(s)

        monkeypatch.setattr(asyncio.get_running_loop(), "sock_accept", exhausted)
        monkeypatch.setattr("fetchd.listener.ACCEPT_PAUSE", 0)
        for _, w in held[:1]:
            w.close()  # make room, then a connection arrives while fds run out
        await site.stop()
        await site.start()
        r, w = await asyncio.open_unix_connection(path)
        w.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await r.readline()).startswith(b"HTTP/1.1 ")
        w.close()
        assert site.stats()["out_of_fds"] == 5
        assert len([r for r in caplog.records if "cannot accept" in r.getMessage()]) == 1
    finally:
        for _, w in held:
            w.close()
        await runner.cleanup()



async def test_a_listener_that_accepts_nothing_does_not_hold_the_loop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listening socket that is no longer listening (accept fails with EINVAL at once,
    forever) is logged once; the event loop keeps running (a daemon spun on it, never yielding,
    and never saw its SIGTERM) and the site stops."""
    import errno
    import logging
    import socket as socketlib

    from fetchd.listener import ConnectionCaps, LimitedSite

    runner = web.AppRunner(web.Application())
    await runner.setup()
    sock = socketlib.socket(socketlib.AF_UNIX)
    sock.bind(str(tmp_path / "s.sock"))
    site = LimitedSite(runner, sock, ConnectionCaps(max_connections=4, max_connections_per_uid=4,
                                                    reserved=1, log_interval=3600))
    caplog.set_level(logging.WARNING, "fetchd.listener")
    async def not_listening(s: socketlib.socket) -> Any:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(asyncio.get_running_loop(), "sock_accept", not_listening)
    monkeypatch.setattr("fetchd.listener.ACCEPT_PAUSE", 0)
    await site.start()
    try:
        for _ in range(3):  # other tasks run while accept keeps failing
            await asyncio.sleep(0.01)
        await site.stop()
        broken = [r for r in caplog.records if "accepts nothing" in r.getMessage()]
        assert len(broken) == 1 and "restart fetchd" in broken[0].getMessage()
    finally:
        sock.close()
        await runner.cleanup()

# -- partial downloads ----------------------------------------------------------------------


def _all_but_last_byte_then_404(d: Daemon, fake: FakeRegistry, seed: str) -> tuple[str, Any]:
    """An image whose one layer is cut one byte short, then is gone (404) on the resume (its
    config is in the store already: the layer's are the only blob requests)."""
    from fake_registry import Fault

    image = make_image("linux/amd64", [make_layer(text_bytes(seed, 256 << 10), "gzip")])
    reference = serve_image(fake, f"p/{seed}", "1", image)
    d.store.commit_bytes(image.config_bytes, image.config_digest)
    layer = image.layers[0]
    fake.fault("blob", Fault(cut_after=layer.size - 1), Fault(status=404))
    return reference, layer


def _partials(d: Daemon) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (d.store.root / "ingest").glob("*.part")}


async def test_partials_count_in_the_store_size_and_gc_reaps_them_under_pressure(
        tmp_path: Path, fake: FakeRegistry) -> None:
    """Finding: a layer that sent all but its last byte and then 404s leaves its partial in
    ingest/ for a day, outside store.max_size and untouched by gc (3 x 64 MiB survived
    `gc max_size 0`). Now partials count in the store's size and gc reaps idle ones first."""
    from fetchd.errors import BlobUnknown

    d = Daemon(tmp_path)
    try:
        reference, layer = _all_but_last_byte_then_404(d, fake, "short")
        with pytest.raises(BlobUnknown):
            await d.submit(reference).wait()
        assert list(_partials(d).values()) == [layer.size - 1]
        blobs_only = d.store.index.usage()[0]
        assert d.store.usage()[0] >= blobs_only + layer.size - 1
        report = await d.store.gc(max_size=0)
        assert _partials(d) == {} and report.reaped_partial_bytes >= layer.size - 1
        assert d.store.usage()[0] == d.store.index.usage()[0]
    finally:
        await d.close()


async def test_one_uid_cannot_fill_ingest_with_partials(tmp_path: Path, fake: FakeRegistry) -> None:
    """A uid's idle partials stay within store.max_ingest_per_uid: its oldest go first; other
    users' partials (kept for their resume) are not touched."""
    from fetchd.errors import BlobUnknown

    d = Daemon(tmp_path, store={"max_ingest_per_uid": "200KiB"})
    try:
        first, first_layer = _all_but_last_byte_then_404(d, fake, "attacker-1")
        with pytest.raises(BlobUnknown):
            await d.submit(first, uid=ATTACKER).wait()
        theirs, their_layer = _all_but_last_byte_then_404(d, fake, "victim-1")
        with pytest.raises(BlobUnknown):
            await d.submit(theirs, uid=VICTIM).wait()
        second, second_layer = _all_but_last_byte_then_404(d, fake, "attacker-2")
        with pytest.raises(BlobUnknown):
            await d.submit(second, uid=ATTACKER).wait()
        left = {name.split("-", 1)[1].removesuffix(".part") for name in _partials(d)}
        assert left == {their_layer.digest.hex, second_layer.digest.hex}
    finally:
        await d.close()


async def test_a_client_that_does_not_read_holds_a_bounded_backlog() -> None:
    """A client that stops reading its stream does not make the daemon queue the job's every
    event for it: the stream's backlog is bounded, and the client gets a summary."""
    from fetchd.server import STREAM_BACKLOG, event_batches

    job = Job(request("example.org/a/b:1"), max_events=1024)
    job.push({"event": "manifest", "layers": 1})
    batches = event_batches(job.events(), 3600)
    first, _ = await anext(batches)  # the client read once, then stopped
    for i in range(20000):
        job.push({"event": "progress", "digest": "sha256:aa", "bytes": i, "total": 20000})
        if i % 1000 == 0:
            await asyncio.sleep(0)  # the pump runs meanwhile, as it would on a busy loop
    job._finish()
    received = [e for batch, _ in [b async for b in batches] for e in batch]
    assert first[0]["event"] == "manifest"
    assert len(received) < STREAM_BACKLOG + 1024 + 8
    assert any(e["event"] == "summary" for e in received)
    assert received[-1] == {"event": "progress", "digest": "sha256:aa", "bytes": 19999, "total": 20000}


async def test_one_job_streams_to_at_most_max_waiters_per_job_clients(
        tmp_path: Path, tarpit: Tarpit) -> None:
    """Finding: ~250 connections joined one never-ending job. Now a job streams to at most
    server.max_waiters_per_job clients; the next one gets a 503 saying so."""
    from fetchd.server import Services, listen_unix, make_app

    d = Daemon(tmp_path, server={"max_waiters_per_job": 2})
    services = Services(d.puller, d.store, d.registry, d.config)
    runner = web.AppRunner(make_app(services))
    await runner.setup()
    path = str(tmp_path / "run" / "fetchd.sock")
    await web.SockSite(runner, listen_unix(path, 0o600)).start()
    writers = []
    try:
        answers = [await _open_fetch(path, f"{tarpit.host}/evil/img:1") for _ in range(3)]
        writers = [w for _, w, _ in answers]
        assert [s for s, _, _ in answers] == [200, 200, 503]
        assert b"too-many-connections" in answers[2][2] and b"max_waiters_per_job" in answers[2][2]
        assert d.puller.jobs()[0]["waiters"] == 2
    finally:
        for writer in writers:
            writer.close()
        await d.close()
        await runner.cleanup()
