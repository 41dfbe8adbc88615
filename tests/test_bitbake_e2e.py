"""The BitBake layer end to end: real bb.fetch2, a running ``fetchd serve``, the local registry.

Each test drives ``bb.fetch2.Fetch([url], d).download()`` / ``.unpack(dir)`` with the
fetchd method in front of ``bb.fetch2.methods`` (as fetchd.bbclass puts it) and checks
what a build would see: Isar's file names, archives skopeo accepts, BitBake's errors.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.images import Catalog, CatalogImage, push_image
from test_bitbake_helpers import (
    ROOT,
    bb,
    fetch,
    fetchd_bitbake,
    make_datastore,
    register,
    unregister,
)

pytestmark = pytest.mark.registry

# Debian arch -> the multi-oci platform it must select.
MULTI_OCI_ARCHES = {
    "amd64": "linux/amd64", "arm64": "linux/arm64/v8", "armhf": "linux/arm/v7",
    "armel": "linux/arm/v6", "i386": "linux/386", "ppc64el": "linux/ppc64le",
    "riscv64": "linux/riscv64", "s390x": "linux/s390x", "mips64el": "linux/mips64le",
}


class Daemon:
    """``python -m fetchd serve`` on a private socket and store; stopped by ``stop()``."""

    def __init__(self, tmp: Path, registry_hosts: list[str], extra_config: str = "") -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.socket = str(tmp / "fetchd.sock")
        self.store = tmp / "store"
        config = tmp / "config.toml"
        config.write_text("".join(f'[registries."{h}"]\ninsecure = true\n' for h in registry_hosts)
                          + extra_config)
        self.log_path = tmp / "fetchd.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fetchd", "serve", "--socket", self.socket,
             "--store", str(self.store), "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
        from fetchd_client import Client, FetchdClientError

        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fetchd serve exited: {self.log_path.read_text()[-2000:]}")
            try:
                Client(self.socket).health()
                break
            except FetchdClientError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fetchd serve did not answer within 30 s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, images: Catalog) -> Iterator[Daemon]:
    dmn = Daemon(tmp_path_factory.mktemp("fetchd"), [images.host])
    try:
        yield dmn
    finally:
        dmn.stop()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(hosts: list[str], extra_config: str = "") -> Daemon:
        dmn = Daemon(tmp_path / f"fetchd{len(started)}", hosts, extra_config)
        started.append(dmn)
        return dmn

    try:
        yield make
    finally:
        for dmn in started:
            dmn.stop()


class Recorder:
    """Wraps the real client to record which daemon calls the fetcher made."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.results: list[dict[str, Any]] = []

    def factory(self, socket_path: str | None) -> Any:
        from fetchd_client import Client

        real = Client(socket_path)
        calls, results = self.calls, self.results

        class Recording:
            def __getattr__(self, name: str) -> Any:
                attr = getattr(real, name)
                if not callable(attr):
                    return attr

                @functools.wraps(attr)
                def call(*args: Any, **kwargs: Any) -> Any:
                    calls.append((name, str(args[0]) if args else ""))
                    result = attr(*args, **kwargs)
                    results.append(result)
                    return result
                return call

        return Recording()

    def ops(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def method() -> Iterator[Any]:
    m = register()
    yield m
    m.client_factory = None
    unregister()


def url_of(img: CatalogImage, host: str | None = None, *, digest: bool = False, tag: bool = True) -> str:
    url = f"docker://{host or img.host}/{img.repository}"
    if digest:
        url += f";digest={img.digest}"
    if tag:
        url += f";tag={img.tag}"
    return url


def decompressed(path: Path | str, out: Path) -> Path:
    """Decompress as Isar's consumer does (``pzstd -c -d FILE | docker load``)."""
    with open(out, "wb") as dst:
        r = subprocess.run(["pzstd", "-q", "-c", "-d", str(path)], stdout=dst, stderr=subprocess.PIPE)
    assert r.returncode == 0, r.stderr
    return out


def skopeo_inspect(tar: Path) -> dict[str, Any]:
    r = subprocess.run(["skopeo", "inspect", f"docker-archive:{tar}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def archive_config(tar: Path) -> dict[str, Any]:
    with tarfile.open(tar) as t:
        manifest = t.extractfile("manifest.json")
        assert manifest is not None
        config = t.extractfile(json.loads(manifest.read())[0]["Config"])
        assert config is not None
        return dict(json.loads(config.read()))


def repo_tags(tar: Path) -> list[str]:
    with tarfile.open(tar) as t:
        member = t.extractfile("manifest.json")
        assert member is not None
        return list(json.loads(member.read())[0]["RepoTags"])


# --- names, platforms, archives ---------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(MULTI_OCI_ARCHES))
def test_every_debian_arch_gets_its_platform_with_isars_names(
        daemon: Daemon, images: Catalog, method: Any, tmp_path: Path, arch: str) -> None:
    img = images["multi-oci"]
    d = make_datastore(tmp_path, arch, FETCHD_SOCKET=daemon.socket)
    work = tmp_path / "work"
    ud = fetch(url_of(img, digest=True), d, work)

    isar_dir = {"armhf": "arm/v7", "armel": "arm/v6"}.get(arch, arch)  # Isar's ud.arch[/variant]
    local = f"{img.host}/{img.repository}".replace("/", ".")
    assert ud.localpath == os.path.join(
        d.getVar("DL_DIR"), "container-images", isar_dir,
        f"{local}_{str(img.digest).replace(':', '-')}.zst")
    out = work / f"{local}:{img.tag}.zst"
    assert sorted(p.name for p in work.iterdir()) == [out.name]
    assert not out.is_symlink() and out.stat().st_ino == os.stat(ud.localpath).st_ino

    tar = decompressed(out, tmp_path / "image.tar")
    want = img.platform(MULTI_OCI_ARCHES[arch])
    info = skopeo_inspect(tar)
    assert info["Architecture"] == want.platform.architecture
    assert archive_config(tar).get("variant") == want.platform.variant
    # A docker-archive holds the layers uncompressed: skopeo lists their diff_ids.
    assert info["Layers"] == [str(diff_id) for diff_id in want.diff_ids]
    assert repo_tags(tar) == [f"{img.host}/{img.repository}:{img.tag}"]


def test_registry_with_a_port_and_no_digest(daemon: Daemon, images: Catalog, method: Any,
                                            tmp_path: Path) -> None:
    img = images["single-docker"]
    d = make_datastore(tmp_path, "amd64", FETCHD_SOCKET=daemon.socket, BB_STRICT_CHECKSUM="ignore")
    ud = fetch(url_of(img), d, tmp_path / "work")
    assert ud.localfile == (f"container-images/amd64/{img.host}.{img.repository.replace('/', '.')}"
                            f"_{img.tag}.zst")
    tar = decompressed(ud.localpath, tmp_path / "image.tar")
    assert skopeo_inspect(tar)["Architecture"] == "amd64"
    assert repo_tags(tar) == [f"{img.host}/{img.repository}:{img.tag}"]


# --- checksums --------------------------------------------------------------------------


def test_mismatching_tag_and_digest(daemon: Daemon, images: Catalog, method: Any, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    img, other = images["multi-oci"], images["multi-docker"]
    d = make_datastore(tmp_path, "amd64", FETCHD_SOCKET=daemon.socket)
    url = f"docker://{img.host}/{img.repository};digest={other.digest};tag={img.tag}"
    line = f'SRC_URI = "docker://{img.host}/{img.repository};digest={img.digest};tag={img.tag}"'
    ud = bb.fetch2.FetchData(url, d)
    with pytest.raises(bb.fetch2.ChecksumError) as e:
        ud.method.download(ud, d)
    assert line in str(e.value)
    with caplog.at_level(logging.WARNING), pytest.raises(bb.fetch2.FetchError):
        fetch(url, d)
    assert line in caplog.text
    assert not os.path.exists(ud.localpath)


@pytest.mark.parametrize("strict", ["1", "0", "ignore"])
def test_missing_digest(daemon: Daemon, images: Catalog, method: Any, tmp_path: Path,
                        caplog: pytest.LogCaptureFixture, strict: str) -> None:
    img = images["multi-docker"]
    d = make_datastore(tmp_path, "arm64", FETCHD_SOCKET=daemon.socket, BB_STRICT_CHECKSUM=strict)
    url = url_of(img)
    line = f'SRC_URI = "docker://{img.host}/{img.repository};digest={img.digest};tag={img.tag}"'
    seen: list[Any] = []
    bb.event.register("fetchd_e2e_missing", lambda e, data: seen.append(e),
                      ["bb.fetch2.MissingChecksumEvent"], data=d)
    try:
        with caplog.at_level(logging.WARNING):
            if strict == "1":
                with pytest.raises(bb.fetch2.BBFetchException, match="missing checksums"):
                    fetch(url, d)
            else:
                ud = fetch(url, d)
    finally:
        bb.event.remove("fetchd_e2e_missing", None, data=d)
    assert (line in caplog.text) is (strict != "ignore")
    if strict == "1":
        assert seen == []
        assert not list(Path(d.getVar("DL_DIR")).rglob("*.zst"))
        return
    assert [(e.url, e.checksums) for e in seen] == [(url, {"sha256sum": str(img.digest).split(":")[1]})]
    assert os.path.exists(ud.localpath + ".done")


# --- BB_NO_NETWORK ----------------------------------------------------------------------


def test_no_network_cached_succeeds_offline(daemon: Daemon, images: Catalog, method: Any,
                                            tmp_path: Path) -> None:
    img = images["shared-a"]
    rec = Recorder()
    method.client_factory = rec.factory
    fetch(url_of(img, digest=True), make_datastore(tmp_path, "amd64", FETCHD_SOCKET=daemon.socket))
    # Same DL_DIR: nothing to ask at all.
    n = len(rec.calls)
    ud = fetch(url_of(img, digest=True), make_datastore(tmp_path, "amd64", FETCHD_SOCKET=daemon.socket,
                                                          BB_NO_NETWORK="1"), tmp_path / "work")
    assert len(rec.calls) == n
    # A fresh DL_DIR, image in the daemon's store: delivered offline.
    d2 = make_datastore(tmp_path / "other", "amd64", FETCHD_SOCKET=daemon.socket, BB_NO_NETWORK="1")
    ud2 = fetch(url_of(img, digest=True), d2)
    assert Path(ud2.localpath).read_bytes() == Path(ud.localpath).read_bytes()


def test_no_network_not_cached_is_network_access(daemon: Daemon, images: Catalog, method: Any,
                                                 tmp_path: Path) -> None:
    img = images["layers40"]  # never fetched by this module's daemon
    for url in (url_of(img, digest=True), url_of(img, tag=True)):
        d = make_datastore(tmp_path, "amd64", FETCHD_SOCKET=daemon.socket, BB_NO_NETWORK="1")
        with pytest.raises(bb.fetch2.NetworkAccess):
            fetch(url, d)
    assert not list(Path(tmp_path / "downloads").rglob("*.zst"))


def test_unreachable_daemon(method: Any, tmp_path: Path, images: Catalog,
                            caplog: pytest.LogCaptureFixture) -> None:
    sock = str(tmp_path / "no-daemon.sock")
    d = make_datastore(tmp_path, "amd64", FETCHD_SOCKET=sock)
    with caplog.at_level(logging.ERROR), pytest.raises(bb.fetch2.FetchError):
        fetch(url_of(images["zstd"], digest=True), d)
    # BitBake logs the first error of the URL before "Unable to fetch URL from any source".
    assert sock in caplog.text and "systemctl start fetchd.socket" in caplog.text


# --- freshness: moved tags, pinned digests, levels ---------------------------------------


def test_moved_tag_is_resolved_again_and_fetched(registry: Any, images: Catalog, method: Any,
                                                 daemon_factory: Callable[..., Daemon],
                                                 tmp_path: Path) -> None:
    first = push_image(registry, images["single-oci"], repository="fetchd-bb/moving", tag="v1")
    # The daemon keeps its default tag cache (minutes); BitBake's need_update asks for a fresh
    # answer (max_age=0), so the moved tag is seen at once all the same.
    dmn = daemon_factory([images.host])
    rec = Recorder()
    method.client_factory = rec.factory
    d = make_datastore(tmp_path, "amd64", FETCHD_SOCKET=dmn.socket, BB_STRICT_CHECKSUM="ignore")
    url = f"docker://{first.host}/fetchd-bb/moving;tag=v1"
    ud = fetch(url, d, tmp_path / "work")
    before = Path(ud.localpath).read_bytes()
    assert fetchd_bitbake.fetcher.read_sidecar(ud.localpath)["resolved"] == str(first.digest)

    fetch(url, d)
    assert rec.ops() == ["resolve", "fetch", "resolve"]  # unchanged: resolved, not fetched

    moved = push_image(registry, images["single-docker"], repository="fetchd-bb/moving", tag="v1")
    fetch(url, d, tmp_path / "work")
    assert rec.ops()[3:] == ["resolve", "fetch"]
    assert fetchd_bitbake.fetcher.read_sidecar(ud.localpath)["resolved"] == str(moved.digest)
    assert Path(ud.localpath).read_bytes() != before
    out = tmp_path / "work" / f"{first.host}.fetchd-bb.moving:v1.zst"
    tar = decompressed(out, tmp_path / "image.tar")
    assert skopeo_inspect(tar)["Layers"] == [str(x) for x in moved.only.diff_ids]
    assert repo_tags(tar) == [f"{first.host}/fetchd-bb/moving:v1"]


def test_pinned_digest_is_never_resolved(images: Catalog, method: Any,
                                         proxy_factory: Callable[..., Any],
                                         daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    img = images["dup-layer"]
    proxy = proxy_factory()
    dmn = daemon_factory([images.host, proxy.host])
    rec = Recorder()
    method.client_factory = rec.factory
    url = url_of(img, proxy.host, digest=True)  # ;tag= too: checked once, at download
    fetch(url, make_datastore(tmp_path, "amd64", FETCHD_SOCKET=dmn.socket))
    proxy.reset_stats()
    for _ in range(2):
        fetch(url, make_datastore(tmp_path, "amd64", FETCHD_SOCKET=dmn.socket))
    assert rec.ops() == ["resolve", "fetch"]
    assert proxy.count() == 0  # not even a HEAD at the registry


def test_level_change_recompresses_without_downloading(
        images: Catalog, method: Any, proxy_factory: Callable[..., Any],
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    img = images["shared-b"]
    proxy = proxy_factory()
    dmn = daemon_factory([images.host, proxy.host])
    url = url_of(img, proxy.host, digest=True)
    ud3 = fetch(url, make_datastore(tmp_path, "amd64", FETCHD_SOCKET=dmn.socket,
                                    ZSTD_DEFAULTS="--threads=2 -3"))
    assert proxy.count("/blobs/", "GET") > 0
    proxy.reset_stats()
    ud9 = fetch(url, make_datastore(tmp_path, "amd64", FETCHD_SOCKET=dmn.socket,
                                    ZSTD_DEFAULTS="--threads=2 -9"), tmp_path / "work")
    assert proxy.count("/blobs/") == 0  # not one blob request for the new level
    assert ud9.localpath == ud3.localpath[: -len(".zst")] + ".level9.zst"
    assert Path(ud9.localpath).read_bytes() != Path(ud3.localpath).read_bytes()
    a = decompressed(ud3.localpath, tmp_path / "l3.tar").read_bytes()
    b = decompressed(ud9.localpath, tmp_path / "l9.tar").read_bytes()
    assert a == b  # the same docker-archive, only compressed harder
    # BitBake notices: level 3 is still done, level 9 has its own stamp.
    assert os.path.exists(ud3.localpath + ".done") and os.path.exists(ud9.localpath + ".done")
    # WORKDIR keeps Isar's name whatever the level.
    assert [p.name for p in (tmp_path / "work").iterdir()] == [
        f"{proxy.host}/{img.repository}".replace("/", ".") + f":{img.tag}.zst"]


# --- many builds at once ---------------------------------------------------------------------

WORKER = r"""
import json, os, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from test_bitbake_helpers import fetch, make_datastore, register
register()
tmp, url, sock, arch = Path(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
d = make_datastore(tmp, arch, FETCHD_SOCKET=sock, BB_STRICT_CHECKSUM="ignore")
work = tmp / ("work-%d" % os.getpid())
ud = fetch(url, d, work)
print(json.dumps({"localpath": ud.localpath, "work": [str(p) for p in work.iterdir()]}))
"""


def run_workers(dirs: list[Path], url: str, sock: str, arch: str) -> list[dict[str, Any]]:
    """One BitBake-like process per entry of ``dirs`` (its DL_DIR parent), all started at once."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(ROOT / "tests"), str(ROOT), str(d),
                               url, sock, arch],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for d in dirs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_eight_builds_with_their_own_dl_dir_share_one_download(
        images: Catalog, method: Any, proxy_factory: Callable[..., Any],
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    img = images["multi-docker"]
    proxy = proxy_factory()
    dmn = daemon_factory([images.host, proxy.host])
    results = run_workers([tmp_path / f"build{i}" for i in range(8)],
                          url_of(img, proxy.host, digest=True), dmn.socket, "armhf")
    want = img.platform("linux/arm/v7")
    blobs = {str(want.config_digest): len(want.config_bytes),
             **{str(layer.digest): layer.size for layer in want.layers}}
    fetched = {path.rsplit("/", 1)[1]: st for path, st in proxy.stats().items() if "/blobs/" in path}
    # Each blob of armhf crossed the network exactly once, whole; no other platform's blob did.
    assert {digest: (st.requests, st.bytes_sent) for digest, st in fetched.items()} == {
        digest: (1, size) for digest, size in blobs.items()}
    archives = {Path(r["localpath"]).read_bytes() for r in results}
    assert len(archives) == 1
    inodes = {os.stat(r["localpath"]).st_ino for r in results}
    assert len(inodes) == 1  # eight hard links to the daemon's single copy
    tar = decompressed(results[0]["localpath"], tmp_path / "image.tar")
    assert skopeo_inspect(tar)["Layers"] == [str(x) for x in want.diff_ids]


def test_four_builds_on_one_dl_dir_do_not_corrupt_each_other(
        images: Catalog, method: Any, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    img = images["layers40"]
    dmn = daemon_factory([images.host])
    results = run_workers([tmp_path] * 4, url_of(img), dmn.socket, "amd64")
    assert len({r["localpath"] for r in results}) == 1
    path = Path(results[0]["localpath"])
    # No temporary or partial file left beside it (bitbake removes its .lock on unlock).
    listing = sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock"))
    base = path.name
    assert listing == [base, base + ".done", base + ".fetchd"]
    tar = decompressed(path, tmp_path / "image.tar")
    assert skopeo_inspect(tar)["Layers"] == [str(x) for x in img.only.diff_ids]
    for r in results:
        (work,) = r["work"]
        assert Path(work).read_bytes() == path.read_bytes()


# --- unpack when the build user may not link the store's file ------------------------------------

UNPACK_AS_USER = r"""
import json, os, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import bb.fetch2
from test_bitbake_helpers import make_datastore, register
from pathlib import Path
register()
tmp, url, sock, work = Path(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
d = make_datastore(tmp, "amd64", FETCHD_SOCKET=sock)
f = bb.fetch2.Fetch([url], d, cache=False)
f.unpack(work)
print(json.dumps({"uid": os.getuid()}))
"""


SYSTEM_PYTHON = "/usr/bin/python3"


def _others_can_read(path: Path) -> bool:
    """Whether another user can reach ``path`` (o+x on every ancestor, o+r on the directory)."""
    import stat

    return bool(path.stat().st_mode & stat.S_IROTH) and all(
        p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def _can_run_as_nobody() -> bool:
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        return False
    if Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "1":
        return False
    same_python = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True).stdout.strip()
    return (same_python == str(sys.version_info[:2]) and _others_can_read(ROOT)
            and _others_can_read(Path(bb.__file__).parent))


@pytest.mark.skipif(not _can_run_as_nobody(),
                    reason="needs root (to run a build as nobody), a system python of this version "
                           "that nobody may run with this bb, and fs.protected_hardlinks=1")
def test_unpack_as_another_user_gets_a_link_from_the_daemon(images: Catalog, method: Any) -> None:
    import tempfile

    img = images["single-oci"]
    shared = Path(tempfile.mkdtemp(prefix="fetchd-bb-shared-"))
    stop: list[Daemon] = []
    try:
        shared.chmod(0o755)
        # The socket where the build user can reach it (pytest's tmp_path is private to root).
        dmn = Daemon(shared / "fetchd", [images.host], '[server]\nsocket_mode = "0666"\n')
        stop.append(dmn)
        url = url_of(img, digest=True)
        ud = fetch(url, make_datastore(shared, "amd64", FETCHD_SOCKET=dmn.socket))  # as root
        for p in [shared / "downloads", *(shared / "downloads").rglob("*")]:
            if p.is_dir():
                p.chmod(0o1777)  # a shared DL_DIR: every build takes its .lock files there
        work = shared / "work"
        work.mkdir()
        os.chown(work, 65534, 65534)
        # The system's python, as BitBake uses it (this venv's may live where nobody cannot go),
        # with only bb added to its path.
        bb_parent = str(Path(bb.__file__).parent.parent)
        r = subprocess.run(
            [SYSTEM_PYTHON, "-c", UNPACK_AS_USER, str(ROOT / "tests"), str(ROOT), str(shared), url,
             dmn.socket, str(work)],
            capture_output=True, text=True, user=65534, group=65534,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": bb_parent, "HOME": str(work)})
        assert r.returncode == 0, (r.stderr[-3000:], dmn.log_path.read_text()[-2000:])
        assert json.loads(r.stdout.strip().splitlines()[-1]) == {"uid": 65534}
        out = work / (f"{img.host}/{img.repository}".replace("/", ".") + f":{img.tag}.zst")
        assert not out.is_symlink()
        # Linked by the daemon: the same inode as the store's copy and DL_DIR's.
        assert out.stat().st_ino == os.stat(ud.localpath).st_ino
    finally:
        for dmn in stop:
            dmn.stop()
        subprocess.run(["rm", "-rf", str(shared)], check=False)


# --- a DL_DIR published as a file:// mirror ---------------------------------------------------


def test_dl_dir_as_file_premirror_serves_each_arch_its_own_file(
        daemon: Daemon, images: Catalog, method: Any, tmp_path: Path) -> None:
    img = images["multi-docker"]
    url = url_of(img, digest=True)
    published = {}
    for arch in ("armhf", "amd64", "i386"):
        ud = fetch(url, make_datastore(tmp_path / "host1", arch, FETCHD_SOCKET=daemon.socket))
        published[arch] = Path(ud.localpath).read_bytes()
    assert len(set(published.values())) == 3
    mirror = tmp_path / "host1" / "downloads"
    # Another host, no daemon at all: everything must come from the mirror.
    for arch in ("armhf", "amd64", "i386"):
        d = make_datastore(tmp_path / "host2" / arch, arch, FETCHD_SOCKET=str(tmp_path / "none.sock"),
                           PREMIRRORS=f"docker://.*/.* file://{mirror}/")
        work = tmp_path / "host2" / arch / "work"
        fetch(url, d, work)
        (out,) = work.iterdir()
        assert not out.is_symlink()
        assert out.read_bytes() == published[arch]
