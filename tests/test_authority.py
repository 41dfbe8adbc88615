"""Who may do what over the socket (issue 13): store-wide operations are for admins; an
ordinary user's gc stays within the watermark policy; the config file's protection is checked
at start.

The daemon runs in-process on a socket every user may reach; requests come from child
processes running as ``nobody`` (see ``support.as_user``), so the daemon identifies them
through SO_PEERCRED exactly as it would a build.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.as_user import NOBODY, can_act_as_others, request_as

from fetchd.config import Config, permission_warnings
from fetchd.digest import Digest
from fetchd.layer_store import LayerStore
from fetchd.pull import Puller
from fetchd.registry_async import RegistryClient
from fetchd.server import (
    Services,
    listen_unix,
    make_app,
    store_settings,
    warn_about_config,
    with_overrides,
)

pytestmark = pytest.mark.skipif(not can_act_as_others(),
                                reason="needs root and /usr/bin/python3 to act as nobody")
ADMIN_GID = 4243


@dataclass
class Daemon:
    socket: str
    store: LayerStore

    async def request(self, method: str, url: str, body: Any = None, *,
                      groups: tuple[int, ...] = ()) -> tuple[int, Any]:
        import asyncio

        return await asyncio.to_thread(request_as, self.socket, method, url, body, groups=groups)


async def _start(open_tmp: Path, store_cfg: dict[str, Any],
                 registries: dict[str, Any] | None = None) -> AsyncIterator[Daemon]:
    config = with_overrides(Config.from_dict({"store": store_cfg,
                                              "registries": registries or {}}, env={}),
                            socket_path=str(open_tmp / "fetchd.sock"),
                            store=str(open_tmp / "store"))
    store = LayerStore(Path(config.store.path), store_settings(config))
    client = RegistryClient(config)
    puller = Puller(store, client, config)
    services = Services(puller, store, client, config, socket_path=config.server.socket,
                        admin_gid=ADMIN_GID)
    runner = web.AppRunner(make_app(services), access_log=None)
    await runner.setup()
    await web.SockSite(runner, listen_unix(config.server.socket, 0o666)).start()
    try:
        yield Daemon(config.server.socket, store)
    finally:
        await puller.close()
        await runner.cleanup()
        await client.close()
        store.close()


@pytest.fixture
async def daemon(open_tmp: Path) -> AsyncIterator[Daemon]:
    async for d in _start(open_tmp, {"max_size": 1000, "high_watermark": 0.9,
                                     "low_watermark": 0.5}):
        yield d


@pytest.fixture
async def unbounded(open_tmp: Path) -> AsyncIterator[Daemon]:
    async for d in _start(open_tmp, {}):
        yield d


def _fill(store: LayerStore, n: int = 4, size: int = 200) -> list[Digest]:
    return [store.commit_bytes(bytes([i]) * size) for i in range(n)]  # 800 bytes in all


def _kept(store: LayerStore, digests: list[Digest]) -> int:
    return sum(store.has(d) for d in digests)


async def test_nobody_may_not_evict_everyone_else(daemon: Daemon) -> None:
    """The finding: `gc {"max_size": 0}` from any socket user evicted the whole store."""
    blobs = _fill(daemon.store)
    status, answer = await daemon.request("POST", "/v1/gc", {"max_size": 0})
    assert status == 403, answer
    assert answer["code"] == "permission-refused"
    assert "store-wide" in answer["message"] and f"uid {NOBODY.pw_uid}" in answer["message"]
    assert "server.admin_group" in answer["message"]
    assert _kept(daemon.store, blobs) == 4


@pytest.mark.parametrize("max_size, status, kept", [
    (None, 200, 4),    # 800 <= 0.9 * 1000: the policy evicts nothing
    (499, 403, 4),     # below low_watermark * max_size (500): admins only
    (500, 200, 2),     # down to the policy's own low mark: what the automatic gc would do
    (10_000, 200, 4),  # above the store's size: nothing to do
])
async def test_an_ordinary_users_gc_stays_within_the_watermarks(
        daemon: Daemon, max_size: int | None, status: int, kept: int) -> None:
    blobs = _fill(daemon.store)
    body = {} if max_size is None else {"max_size": max_size}
    got, answer = await daemon.request("POST", "/v1/gc", body)
    assert got == status, answer
    assert _kept(daemon.store, blobs) == kept


async def test_without_store_max_size_only_admins_choose_a_size(unbounded: Daemon) -> None:
    blobs = _fill(unbounded.store)
    got, answer = await unbounded.request("POST", "/v1/gc", {"max_size": 100})
    assert got == 403 and "store.max_size is not set" in answer["message"]
    got, _ = await unbounded.request("POST", "/v1/gc", {})
    assert got == 200 and _kept(unbounded.store, blobs) == 4


async def test_members_of_the_admin_group_may_gc_and_verify(daemon: Daemon) -> None:
    blobs = _fill(daemon.store)
    got, answer = await daemon.request("POST", "/v1/gc", {"max_size": 0}, groups=(ADMIN_GID,))
    assert got == 200, answer
    assert _kept(daemon.store, blobs) == 0
    got, answer = await daemon.request("POST", "/v1/verify", {}, groups=(ADMIN_GID,))
    assert got == 200 and answer["corrupt"] == []


async def test_verify_is_admin_only(daemon: Daemon) -> None:
    got, answer = await daemon.request("POST", "/v1/verify", {})
    assert got == 403 and answer["code"] == "permission-refused"
    assert "verify" in answer["message"]


async def test_ordinary_requests_still_work_for_nobody(daemon: Daemon) -> None:
    got, answer = await daemon.request("GET", "/v1/status")
    assert got == 200 and "jobs" in answer


# -- private registries ----------------------------------------------------------------------------


@pytest.fixture
async def private_setup(open_tmp: Path) -> AsyncIterator[tuple[Daemon, str, str, Any]]:
    """A daemon whose config marks one fake registry private and another not; the same image
    (by content) is on both."""
    from fake_registry import FakeRegistry
    from support.images import make_image, make_layer, text_bytes

    image = make_image("linux/amd64", [make_layer(text_bytes("private-image", 8192), "gzip")])
    secret, public = await FakeRegistry().start(), await FakeRegistry().start()
    try:
        for reg in (secret, public):
            for blob in (image.config_bytes, *(layer.read() for layer in image.layers)):
                reg.add_blob(blob)
            reg.add_manifest("team/app", "1", image.manifest_bytes, image.manifest_media_type)
        async for d in _start(open_tmp, {}, {secret.host: {"private": True}}):
            yield d, f"{secret.host}/team/app:1", f"{public.host}/team/app:1", image
    finally:
        await secret.close()
        await public.close()


def _nobodys_dir(open_tmp: Path) -> Path:
    out = open_tmp / "out"
    out.mkdir()
    os.chown(out, NOBODY.pw_uid, NOBODY.pw_gid)
    return out


async def test_a_private_registrys_image_stays_out_of_world_readable_files(
        private_setup: tuple[Daemon, str, str, Any], open_tmp: Path) -> None:
    """The finding: group members pull private images with the daemon's credentials and the
    result landed world-readable in the store (and as a shared 0444 hard link)."""
    daemon, private_ref, _, image = private_setup
    out = _nobodys_dir(open_tmp)
    got, answer = await daemon.request("POST", "/v1/fetch",
                                       {"reference": private_ref, "dest": str(out / "app.zst")})
    assert got == 200 and "result" in answer, answer
    result = answer["result"]
    assert result["private"] is True and result["delivery"] in ("copy", "reflink")
    st = os.stat(out / "app.zst")
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY.pw_uid, 0o600)  # the caller's own copy
    store = daemon.store
    archive = Digest.parse(result["archive_digest"])
    assert st.st_ino != os.stat(store.blob_path(archive)).st_ino
    for digest in (archive, Digest.parse(result["manifest_digest"]), image.config_digest,
                   *(layer.digest for layer in image.layers)):
        assert os.stat(store.blob_path(digest)).st_mode & 0o777 == 0o400, digest
    # handed back by digest: again a copy of the caller's own
    got, answer = await daemon.request("POST", "/v1/deliver", {
        "archive_digest": str(archive), "dest": str(out / "again.zst")})
    assert got == 200 and answer["delivery"] in ("copy", "reflink"), answer
    assert os.stat(out / "again.zst").st_mode & 0o777 == 0o600


async def test_a_private_image_needs_a_destination(
        private_setup: tuple[Daemon, str, str, Any]) -> None:
    daemon, private_ref, _, _ = private_setup
    got, answer = await daemon.request("POST", "/v1/fetch", {"reference": private_ref})
    assert got == 400 and "configured private" in answer["message"], answer


async def test_a_public_registry_keeps_the_shared_hard_link(
        private_setup: tuple[Daemon, str, str, Any], open_tmp: Path) -> None:
    daemon, _, public_ref, _ = private_setup
    out = _nobodys_dir(open_tmp)
    got, answer = await daemon.request("POST", "/v1/fetch",
                                       {"reference": public_ref, "dest": str(out / "app.zst")})
    assert got == 200 and answer["result"]["delivery"] == "hardlink", answer
    assert "private" not in answer["result"]
    assert os.stat(out / "app.zst").st_mode & 0o777 == 0o444


# -- the config file's protection -----------------------------------------------------------------

SECRET_CONFIG = """
[registries."127.0.0.1:1"]
mirrors = [{url = "http://127.0.0.1:2", credentials = {username = "u", password = "p"}}]
"""


@pytest.mark.parametrize("file_mode, dir_mode, secret, words", [
    (0o600, 0o755, True, []),
    (0o644, 0o755, False, []),  # nothing secret in it: Debian's usual 0644 is fine
    (0o644, 0o755, True, ["every user may read it"]),
    (0o666, 0o755, False, ["config file", "writable by every user"]),
    (0o600, 0o777, True, ["config directory", "writable by every user"]),
    (0o600, 0o1777, True, []),  # sticky: others cannot replace the file
])
def test_config_permission_warnings(tmp_path: Path, file_mode: int, dir_mode: int, secret: bool,
                                    words: list[str]) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "config.toml"
    path.write_text(SECRET_CONFIG if secret else "[server]\nmax_jobs = 4\n")
    path.chmod(file_mode)
    etc.chmod(dir_mode)
    warnings = permission_warnings(Config.load(str(path)))
    assert all(w in " ".join(warnings) for w in words), warnings
    assert bool(warnings) == bool(words), warnings


def test_config_owned_by_another_user_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("")
    path.chmod(0o600)
    os.chown(path, NOBODY.pw_uid, -1)
    (warning,) = permission_warnings(Config.load(str(path)))
    assert f"belongs to uid {NOBODY.pw_uid}" in warning


def test_serve_warns_about_a_readable_config_with_secrets(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "config.toml"
    path.write_text(SECRET_CONFIG)
    path.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="fetchd.server")
    warn_about_config(Config.load(str(path)))  # what serve() does first
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert str(path) in message and "every user may read it" in message
    assert "chmod 0600" in message
    assert "username" not in message and '"p"' not in message  # no secret in the log
