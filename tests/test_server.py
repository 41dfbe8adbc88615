"""The daemon in-process on a Unix socket in a temp dir, against the session's real registry.

Requests go through the stdlib client library (in a thread, as a build would call it) or,
for malformed requests, through a raw aiohttp client on the same socket.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zstandard
from aiohttp import web
from support.images import Catalog, push_image
from support.registry import LocalRegistry

import fetchd.server as server_module
from fetchd.config import Config
from fetchd.layer_store import LayerStore
from fetchd.pull import FetchRequest, Puller
from fetchd.registry_async import RegistryClient
from fetchd.server import (
    MAX_BODY,
    Services,
    event_batches,
    listen_unix,
    make_app,
    store_settings,
    with_overrides,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "client") not in sys.path:
    sys.path.append(str(ROOT / "client"))

from fetchd_client import Client, DaemonUnreachable, FetchdClientError  # noqa: E402

pytestmark = pytest.mark.registry
CLIENT_THREADS = ThreadPoolExecutor(32, thread_name_prefix="test-client")


@dataclass
class Daemon:
    socket_path: str
    services: Services
    client: Client
    store: LayerStore

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        # Client threads get their own pool: blocked in the default executor they would
        # starve the in-process daemon, which uses it for its file work.
        fn = functools.partial(getattr(self.client, method), *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(CLIENT_THREADS, fn)

    async def raw(self, method: str, path: str, data: bytes | None = None) -> tuple[int, Any]:
        connector = aiohttp.UnixConnector(path=self.socket_path)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.request(method, "http://fetchd" + path, data=data,
                                       headers={"Content-Type": "application/json"}) as resp:
                body = await resp.read()
                try:
                    return resp.status, json.loads(body)
                except ValueError:
                    return resp.status, body.decode()


@pytest.fixture
async def daemon(tmp_path: Path, registry: LocalRegistry) -> AsyncIterator[Daemon]:
    config = with_overrides(Config.from_dict({}, env={}),
                            socket_path=str(tmp_path / "run" / "fetchd.sock"),
                            store=str(tmp_path / "store"))
    store = LayerStore(Path(config.store.path), store_settings(config))
    client = RegistryClient(config)
    puller = Puller(store, client, config)
    services = Services(puller, store, client, config, socket_path=config.server.socket)
    runner = web.AppRunner(make_app(services), access_log=None)
    await runner.setup()
    sock = listen_unix(config.server.socket, 0o660)
    await web.SockSite(runner, sock).start()
    try:
        yield Daemon(config.server.socket, services, Client(config.server.socket), store)
    finally:
        await puller.close()
        await runner.cleanup()
        await client.close()
        store.close()


def _zstd_ok(path: str | Path) -> None:
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    assert data.endswith(b"\0" * 1024)  # a tar's two zero blocks: complete archive


async def test_health_and_status(daemon: Daemon) -> None:
    assert (await daemon.call("health"))["status"] == "ok"
    status = await daemon.call("status")
    assert status["jobs"] == []
    assert status["socket"] == daemon.socket_path
    assert set(status["store"]) >= {"bytes", "blobs"}


async def test_fetch_streams_events_and_hard_links(daemon: Daemon, images: Catalog, tmp_path: Path) -> None:
    image = images["multi-oci"]
    dest = tmp_path / "out" / "multi.zst"
    dest.parent.mkdir()
    events: list[dict[str, Any]] = []
    result = await daemon.call("fetch", image.reference, arch="armhf", dest=str(dest),
                               on_event=events.append)
    assert result["delivery"] == "hardlink"
    assert result["path"] == str(dest)
    assert result["platform"] == "linux/arm/v7"
    assert result["index_digest"] == str(image.digest)
    assert result["manifest_digest"] == str(image.platform("linux/arm/v7").manifest_digest)
    assert os.stat(dest).st_ino == os.stat(result["store_path"]).st_ino
    assert os.stat(dest).st_size == result["size"]
    assert os.stat(dest).st_mode & 0o7777 == 0o444  # a build cannot write the store through it
    kinds = {e["event"] for e in events}
    assert {"manifest", "layer"} <= kinds
    _zstd_ok(dest)


async def test_fetch_without_destination_names_the_store_file(daemon: Daemon, images: Catalog) -> None:
    result = await daemon.call("fetch", images["single-docker"].reference)
    assert result["delivery"] == "store"
    assert result["path"] == result["store_path"]
    assert os.stat(result["path"]).st_size == result["size"]


async def test_deliver_an_archive_again(daemon: Daemon, images: Catalog, tmp_path: Path) -> None:
    first = await daemon.call("fetch", images["single-oci"].reference, platform="linux/amd64")
    dest = tmp_path / "again.zst"
    out = await daemon.call("deliver", first["archive_digest"], str(dest))
    assert out["delivery"] == "hardlink"
    assert os.stat(dest).st_ino == os.stat(first["store_path"]).st_ino
    with pytest.raises(FetchdClientError) as err:
        await daemon.call("deliver", "sha256:" + "0" * 64, str(tmp_path / "x.zst"))
    assert err.value.code == "blob-unknown" and err.value.status == 404


async def test_resolve_tag_then_from_cache_and_offline(daemon: Daemon, images: Catalog) -> None:
    image = images["multi-docker"]
    first = await daemon.call("resolve", image.reference)
    assert first["digest"] == str(image.digest)
    offline = await daemon.call("resolve", image.reference, offline=True)
    assert offline == {**first, "cached": True}
    with pytest.raises(FetchdClientError) as err:
        await daemon.call("resolve", image.ref(tag="never-resolved"), offline=True)
    assert err.value.code == "network-disabled" and err.value.status == 409


async def test_unknown_image_and_platform_are_clear_errors(daemon: Daemon, images: Catalog) -> None:
    with pytest.raises(FetchdClientError) as err:
        await daemon.call("fetch", f"{images.host}/no/such-image:1")
    assert err.value.code in ("name-unknown", "manifest-unknown")
    assert "no/such-image" in err.value.message
    with pytest.raises(FetchdClientError) as err:
        await daemon.call("fetch", images["multi-docker"].reference, arch="s390x")
    assert err.value.code == "platform-not-found"


async def test_ls_gc_verify_metrics(daemon: Daemon, images: Catalog) -> None:
    result = await daemon.call("fetch", images["zstd"].reference)
    answer = await daemon.call("ls")
    item = next(i for i in answer["images"] if i["archive_digest"] == result["archive_digest"])
    assert item["size"] == result["size"] and item["last_used"] > 0
    assert answer["store"]["blobs"] >= 3 and answer["store"]["bytes"] > result["size"]
    report = await daemon.call("verify")
    assert report["checked"] >= 3 and report["corrupt"] == []
    gc = await daemon.call("gc", 0)
    assert gc["remaining_bytes"] >= 0
    status, text = await daemon.raw("GET", "/metrics")
    assert status == 200
    assert "fetchd_up 1" in text
    assert 'fetchd_http_requests_total{route="/v1/fetch",status="200"}' in text
    assert "fetchd_store_bytes" in text
    sample = re.compile(r'^[a-z_][a-z0-9_]*(\{[a-z_]+="[^"\n]*"(,[a-z_]+="[^"\n]*")*\})? -?[0-9.e+-]+$')
    for line in text.splitlines():
        assert line.startswith(("# HELP ", "# TYPE ")) or sample.match(line), line
    # Prometheus conventions: a counter's name ends in _total, and only a counter's does.
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    assert types["fetchd_registry_requests_total"] == "counter"
    assert types["fetchd_registry_bytes_total"] == "counter"
    for name, kind in types.items():
        assert name.endswith("_total") == (kind == "counter"), (name, kind)


BAD_FETCHES: list[tuple[str, bytes, int, str]] = [
    ("invalid json", b"{not json", 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("unknown field", b'{"reference": "debian", "colour": "blue"}', 400, "unknown field(s) colour"),
    ("missing reference", b'{"arch": "armhf"}', 400, "'reference' is required"),
    ("level as string", b'{"reference": "debian", "level": "3"}', 400, "'level' must be an integer"),
    ("level as bool", b'{"reference": "debian", "level": true}', 400, "'level' must be an integer"),
    ("offline as string", b'{"reference": "debian", "offline": "yes"}', 400, "'offline' must be true or false"),
    ("level out of range", b'{"reference": "debian", "level": 99}', 400, "level"),
    ("relative dest", b'{"reference": "debian", "dest": "out/x.zst"}', 400, "relative"),
    ("dotdot dest", b'{"reference": "debian", "dest": "/tmp/../etc/x.zst"}', 400, "'..'"),
    ("unknown arch", b'{"reference": "debian", "arch": "sparc"}', 400, "unknown Debian architecture"),
    ("bad platform", b'{"reference": "debian", "platform": "linux/"}', 400, "invalid platform"),
    ("arch and platform", b'{"reference": "debian", "arch": "armhf", "platform": "linux/arm/v7"}',
     400, "either"),
    ("malformed reference", b'{"reference": "Debian:Bookworm!"}', 400, "invalid image reference"),
    ("bad repo_tag", b'{"reference": "debian", "repo_tag": "Bad Tag"}', 400, "invalid image reference"),
    ("huge body", b'{"reference": "' + b"a" * (MAX_BODY + 10) + b'"}', 413, "too large"),
    # issue 13: these were 500s with a traceback ('internal')
    ("deeply nested body", b'{"reference": ' + b"[" * 60_000, 400, "nested too deeply"),
    ("nested value", b'{"reference": "debian", "repo_tag": ' + b'{"a": ' * 10_000, 400,
     "nested too deeply"),
    ("port out of range", b'{"reference": "localhost:99999/app"}', 400, "not in 1..65535"),
    ("not an IPv6 host", b'{"reference": "[1:2:3]/app"}', 400, "not an IPv6 address"),
]


@pytest.mark.parametrize("body, status, words", [c[1:] for c in BAD_FETCHES],
                         ids=[c[0] for c in BAD_FETCHES])
async def test_bad_fetch_requests_get_4xx_and_daemon_keeps_serving(
    daemon: Daemon, body: bytes, status: int, words: str
) -> None:
    got, answer = await daemon.raw("POST", "/v1/fetch", body)
    assert got == status, answer
    assert isinstance(answer, dict) and set(answer) == {"code", "message"}
    assert words in answer["message"]
    assert (await daemon.call("health"))["status"] == "ok"


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/v1/resolve", b'{"reference": "x", "extra": 1}', 400),
    ("POST", "/v1/deliver", b'{"archive_digest": "sha256:zz", "dest": "/tmp/x"}', 400),
    ("POST", "/v1/deliver", b'{"archive_digest": "sha256:' + b"0" * 64 + b'", "dest": "x"}', 400),
    ("POST", "/v1/gc", b'{"max_size": -1}', 400),
    ("POST", "/v1/gc", b'{"max_size": "10G"}', 400),
    ("GET", "/v1/nothing", None, 404),
    ("GET", "/v1/fetch", None, 405),
])
async def test_other_bad_requests(daemon: Daemon, method: str, path: str, body: bytes | None,
                                  status: int) -> None:
    got, answer = await daemon.raw(method, path, body)
    assert got == status, answer
    assert answer["code"] and answer["message"]


async def test_unexpected_error_is_500_and_daemon_keeps_serving(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(daemon.store, "usage", broken)
    status, answer = await daemon.raw("GET", "/v1/status")
    assert status == 500
    assert answer["code"] == "internal" and "simulated bug" in answer["message"]
    assert (await daemon.call("health"))["status"] == "ok"


async def test_identical_requests_share_one_job(daemon: Daemon, images: Catalog, tmp_path: Path) -> None:
    image = images["layers40"]
    dests = [tmp_path / f"out{i}.zst" for i in range(8)]
    results = await asyncio.gather(*(daemon.call("fetch", image.reference, dest=str(d)) for d in dests))
    assert len({r["archive_digest"] for r in results}) == 1
    inodes = {os.stat(d).st_ino for d in dests}
    assert inodes == {os.stat(results[0]["store_path"]).st_ino}
    assert daemon.services.puller.completed == 1  # type: ignore[attr-defined]


async def test_client_that_goes_away_does_not_cancel_the_job(
    daemon: Daemon, images: Catalog, tmp_path: Path
) -> None:
    image = images["shared-a"]
    reader, writer = await asyncio.open_unix_connection(daemon.socket_path)
    body = json.dumps({"reference": image.reference}).encode()
    writer.write(b"POST /v1/fetch HTTP/1.1\r\nHost: fetchd\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    puller = daemon.services.puller
    tasks = [job.task for job in puller._jobs.values() if job.task]  # type: ignore[attr-defined]
    writer.close()  # gone before the result, while it was the job's only client
    await asyncio.wait(tasks)
    assert (puller.completed, puller.failed) == (1, 0)  # type: ignore[attr-defined]
    result = await daemon.call("fetch", image.reference, dest=str(tmp_path / "a.zst"))
    assert result["delivery"] == "hardlink"
    assert result["blobs_downloaded"] == 0 and result["frames_compressed"] == 0
    _zstd_ok(tmp_path / "a.zst")


async def test_stalled_request_body_is_cut_off(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "BODY_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_unix_connection(daemon.socket_path)
    writer.write(b"POST /v1/fetch HTTP/1.1\r\nHost: fetchd\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"refer")  # and then nothing
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    body = await reader.readexactly(length)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert b"Connection: close" in head
    assert json.loads(body)["code"] == "request-timeout"
    assert (await daemon.call("health"))["status"] == "ok"


async def test_heartbeat_fills_silence_and_ready_events_come_together() -> None:
    async def slow() -> AsyncIterator[dict[str, Any]]:
        yield {"event": "a"}
        yield {"event": "b"}
        await asyncio.sleep(0.35)
        yield {"event": "c"}

    batches = [(
        [e["event"] for e in batch], ended) async for batch, ended in event_batches(slow(), 0.1)]
    assert batches[0] == (["a", "b"], False)  # ready at once: one batch
    assert [ended for _, ended in batches] == [False] * (len(batches) - 1) + [True]
    flat = [name for names, _ in batches for name in names]
    assert flat[:2] == ["a", "b"] and flat[-1] == "c"
    assert flat.count("heartbeat") >= 2


def test_unreachable_daemon_names_socket_and_remedy(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    with pytest.raises(DaemonUnreachable) as err:
        Client(path).health()
    assert path in err.value.message
    assert "systemctl start fetchd.socket" in err.value.message and "fetchd serve" in err.value.message


def test_live_socket_is_not_stolen_and_stale_one_is_replaced(tmp_path: Path) -> None:
    import socket

    from fetchd.errors import FetchdError

    path = str(tmp_path / "d" / "fetchd.sock")
    first = listen_unix(path, 0o660)
    first.listen(1)
    with pytest.raises(FetchdError, match="another fetchd"):
        listen_unix(path, 0o660)
    first.close()  # now stale: the file stays, nobody listens
    assert os.path.exists(path)
    second = listen_unix(path, 0o640)
    with second:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)
        assert second.family == socket.AF_UNIX


def test_socket_is_never_open_to_others_while_it_is_set_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_chmod = os.chmod

    def chmod(path: Any, mode: int, **kwargs: Any) -> None:
        seen.append(os.stat(path).st_mode & 0o777)  # as bind() made it
        real_chmod(path, mode, **kwargs)

    monkeypatch.setattr(os, "chmod", chmod)
    old = os.umask(0)
    try:
        sock = listen_unix(str(tmp_path / "fetchd.sock"), 0o660)
    finally:
        os.umask(old)
    sock.close()
    assert seen and seen[0] & 0o077 == 0, oct(seen[0])
    assert os.stat(tmp_path / "fetchd.sock").st_mode & 0o777 == 0o660


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to probe as another uid")
def test_socket_this_user_may_not_probe_is_not_called_another_daemon() -> None:
    import pwd
    import shutil
    import subprocess
    import tempfile

    nobody = pwd.getpwnam("nobody")
    tmp_path = Path(tempfile.mkdtemp(prefix="fetchd-test-"))  # pytest's tmp_path is root-only
    tmp_path.chmod(0o755)
    listen_unix(str(tmp_path / "fetchd.sock"), 0o600).close()  # root's, stale
    code = ("import os, sys\nfrom fetchd.server import listen_unix\n"
            f"os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n"
            "try:\n    listen_unix(sys.argv[1])\nexcept Exception as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fetchd.sock")],
                         capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    shutil.rmtree(tmp_path)
    assert "may not connect to it" in out.stdout, out.stdout + out.stderr
    assert "another fetchd" not in out.stdout


async def test_fetch_request_carries_the_peer_uid(daemon: Daemon, images: Catalog) -> None:
    """The job's quotas (job slots, compression slots, ingest space) are per uid: the server
    hands the SO_PEERCRED uid to the Puller with every request."""
    seen: list[FetchRequest] = []
    submit = daemon.services.puller.submit

    def recording(request: FetchRequest) -> Any:
        seen.append(request)
        return submit(request)

    daemon.services.puller.submit = recording  # type: ignore[method-assign]
    await daemon.call("fetch", images["single-docker"].reference)
    assert [r.uid for r in seen] == [os.getuid()]


async def test_status_and_metrics_report_the_loop_lag(daemon: Daemon) -> None:
    await daemon.services.loop_lag.next_sample()  # the monitor runs with the app
    status = await daemon.call("status")
    lag = status["loop_lag"]
    assert lag["samples"] >= 1 and lag["max_ms"] >= lag["p99_ms"] >= 0
    assert lag["window_s"] > 0
    code, text = await daemon.raw("GET", "/metrics")
    assert code == 200
    values = dict(line.split() for line in text.splitlines() if line.startswith("fetchd_loop_lag"))
    assert set(values) == {"fetchd_loop_lag_max_seconds", "fetchd_loop_lag_p99_seconds"}
    assert float(values["fetchd_loop_lag_max_seconds"]) >= float(values["fetchd_loop_lag_p99_seconds"]) >= 0


async def test_status_reports_the_loop_lag_of_the_last_seconds_asked(daemon: Daemon) -> None:
    """``?lag_window=`` (a tool measuring one step): the lag of only that many seconds, so a
    stall before the step does not count; a bad value is a clear 400."""
    lag = daemon.services.loop_lag
    await lag.next_sample()
    now = asyncio.get_running_loop().time()
    lag.record(0.5, now - 30)  # a stall 30 s ago: in the 60 s window, not in the last 10 s
    whole = (await daemon.call("status"))["loop_lag"]
    assert whole["max_ms"] >= 500
    code, status = await daemon.raw("GET", "/v1/status?lag_window=10")
    assert code == 200
    assert status["loop_lag"]["window_s"] == 10 and status["loop_lag"]["max_ms"] < 500
    assert status["loop_lag"]["samples"] < whole["samples"]
    for bad in ("0", "-1", "soon", "inf", "nan"):
        code, err = await daemon.raw("GET", f"/v1/status?lag_window={bad}")
        assert code == 400 and err["code"] == "invalid-request"
        assert "lag_window must be a positive number of seconds" in err["message"]


async def test_a_fetch_pinned_to_the_resolved_digest_gives_the_tags_archive(
        daemon: Daemon, images: Catalog, registry: LocalRegistry) -> None:
    """What a client resubmits after a restart: the same request with ``digest`` from the
    first submission's ``resolved`` event. The archive (name:tag included) is the same, even
    after the tag moved; a reference pinning another digest is refused."""
    image = push_image(registry, images["shared-a"], repository="fetchd-test/pinned", tag="v1")
    events: list[dict[str, Any]] = []
    first = await daemon.call("fetch", image.reference, on_event=events.append)
    assert events[0] == {"event": "resolved", "digest": str(image.digest)}
    moved = push_image(registry, images["shared-b"], repository=image.repository, tag=image.tag)
    assert moved.digest != image.digest
    status, body = await daemon.raw("POST", "/v1/fetch", json.dumps(
        {"reference": image.reference, "digest": str(image.digest)}).encode())
    assert status == 200
    final = json.loads(body.strip().splitlines()[-1]) if isinstance(body, str) else body
    assert final["result"]["archive_digest"] == first["archive_digest"]
    assert final["result"]["repo_tag"] == first["repo_tag"]
    status, body = await daemon.raw("POST", "/v1/fetch", json.dumps(
        {"reference": f"{image.reference}@{image.digest}", "digest": str(moved.digest)}).encode())
    assert status == 400 and body["code"] == "invalid-request" and "one digest" in body["message"]
