"""Real BitBake builds: the vendored runner on a minimal Isar-like core layer plus bitbake-client/.

Unlike tests/test_bitbake_e2e.py (``bb.fetch2`` called directly), these tests run
``bitbake/bin/bitbake`` itself: cooker, parser processes, runqueue, forked task workers,
multiconfig, ``BB_NUMBER_THREADS = "8"``. The build tree is made in a temporary directory:

- layers: ``tests/isar-core`` (Isar's DL_DIR/WORKDIR/STAMP names, do_fetch/do_unpack
  semantics, the dpkg-base stand-in that appends Isar's own docker:// fetcher on every
  parse, four container recipes) and ``bitbake-client`` (``INHERIT += "fetchd"``);
- three machines by multiconfig (amd64, arm64, armhf), twelve ``mc:...:container-*`` targets;
- a ``fetchd serve`` per scenario; every registry request passes a counting proxy.

BitBake comes from ``../shared/vendor/isar-bitbake-2.8.tar.xz`` (next to the repository, as
in CI; for a git worktree also next to its main checkout), unpacked once per session, or
from ``FETCHD_BITBAKE_DIR`` (an Isar checkout's ``bitbake/``). Without either the tests
are skipped with that reason; with ``FETCHD_REQUIRE_BITBAKE=1`` (set by .ci/run) they fail.

One build's results serve several tests (module fixtures): a full build takes ~10-30 s.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.activation import activated
from support.images import (
    Catalog,
    CatalogImage,
    PlatformImage,
    make_image,
    make_index,
    make_layer,
    push_image,
    text_bytes,
)
from support.images import Entry as TarEntry
from support.proxy import RegistryProxy

pytestmark = pytest.mark.registry

ROOT = Path(__file__).resolve().parent.parent
CORE_LAYER = ROOT / "tests" / "isar-core"
FETCHD_LAYER = ROOT / "bitbake-client"
TARBALL = Path("shared") / "vendor" / "isar-bitbake-2.8.tar.xz"

# Isar's multiconfigs (conf/multiconfig/<mc>.conf of tests/isar-core) -> DISTRO_ARCH.
MACHINES = {"qemuamd64-bookworm": "amd64", "qemuarm64-bookworm": "arm64",
            "qemuarm-bookworm": "armhf"}
# Debian arch -> the platforms (architecture, variant) an image may offer for it.
PLATFORMS = {"amd64": {("amd64", None)}, "arm64": {("arm64", "v8"), ("arm64", None)},
             "armhf": {("arm", "v7")}}
# Debian arch -> Isar's DL_DIR directory below container-images/.
ISAR_ARCH_DIR = {"amd64": "amd64", "arm64": "arm64", "armhf": "arm/v7"}
DISTRO = "debian-bookworm"


# --- the runner ---------------------------------------------------------------------------


def _tarball_candidates() -> list[Path]:
    """``../shared`` of the repository; for a git worktree also that of its main checkout."""
    found = [ROOT.parent / TARBALL]
    dotgit = ROOT / ".git"
    if dotgit.is_file():  # a worktree: "gitdir: <main>/.git/worktrees/<name>"
        text = dotgit.read_text().strip()
        if text.startswith("gitdir:"):
            gitdir = Path(text.split(":", 1)[1].strip())
            if gitdir.parent.name == "worktrees" and gitdir.parent.parent.name == ".git":
                found.append(gitdir.parent.parent.parent.parent / TARBALL)
    return found


def _no_bitbake(reason: str) -> None:
    if os.environ.get("FETCHD_REQUIRE_BITBAKE") == "1":
        pytest.fail(f"{reason}; FETCHD_REQUIRE_BITBAKE=1 says these builds must run")
    pytest.skip(reason)


def _has_en_us_utf8() -> bool:
    out = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout
    return any(line.strip().lower() in ("en_us.utf8", "en_us.utf-8") for line in out.splitlines())


@pytest.fixture(scope="session")
def bitbake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runnable BitBake tree (``bin/bitbake``, ``lib/bb``)."""
    env_dir = os.environ.get("FETCHD_BITBAKE_DIR")
    if env_dir:
        tree = Path(env_dir)
        if not (tree / "bin" / "bitbake").is_file() or not (tree / "lib" / "bb").is_dir():
            pytest.fail(f"FETCHD_BITBAKE_DIR={env_dir} has no bin/bitbake and lib/bb: point it at "
                        "an Isar checkout's bitbake/ directory")
    else:
        candidates = _tarball_candidates()
        tarball = next((p for p in candidates if p.is_file()), None)
        if tarball is None:
            _no_bitbake("no BitBake to run: neither " + " nor ".join(map(str, candidates))
                        + " exists, and FETCHD_BITBAKE_DIR (an Isar checkout's bitbake/) is not set")
        assert tarball is not None
        dest = tmp_path_factory.mktemp("bitbake-release")
        subprocess.run(["tar", "-xJf", str(tarball), "-C", str(dest)], check=True)
        tree = dest / "bitbake"
        assert (tree / "bin" / "bitbake").is_file(), f"{tarball} holds no bitbake/bin/bitbake"
    if not _has_en_us_utf8():
        pytest.fail("BitBake needs the en_US.UTF-8 locale and `locale -a` does not list it: "
                    "run scripts/setup.sh (it installs `locales` and generates it)")
    return tree


def _build_python() -> str:
    """BitBake runs on the system's Python, as on a build host (the layer may use only the
    standard library and bb); this venv's interpreter only when there is none."""
    system = "/usr/bin/python3"
    if os.path.exists(system):
        r = subprocess.run([system, "-c", "import sys; print(sys.version_info >= (3, 8))"],
                           capture_output=True, text=True)
        if r.stdout.strip() == "True":
            return system
    return sys.executable


# --- the daemon ----------------------------------------------------------------------------


class Serve:
    """``python -m fetchd serve`` on a fixed socket and store, which can be stopped and started
    again (a restart keeps both, as systemd's restart does). Output is appended to ``log_path``.

    ``activated``: started as systemd starts fetchd.service behind fetchd.socket. This object
    holds the listening socket (systemd's part) and hands it to each daemon as fd 3 with
    ``LISTEN_PID``/``LISTEN_FDS``; it stays open across restarts, so connections made while no
    daemon runs wait in its backlog for the next one instead of being refused.
    """


    def __init__(self, tmp: Path, registry_hosts: list[str], extra_config: str = "", *,
                 activated: bool = False) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.socket = str(tmp / "fetchd.sock")
        self.store = tmp / "store"
        self.config = tmp / "config.toml"
        self.config.write_text(extra_config + "".join(
            f'[registries."{h}"]\ninsecure = true\n' for h in registry_hosts))
        self.log_path = tmp / "fetchd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.listener: socket.socket | None = None
        if activated:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.socket)
            self.listener.listen(64)
        self.starts = 0
        self.start()

    def start(self) -> None:
        from fetchd_client import Client, FetchdClientError

        assert self.proc is None or self.proc.poll() is not None
        args = ["--store", str(self.store), "--config", str(self.config)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("FETCHD_SOCKET", None)
        with open(self.log_path, "ab") as log:
            log.write(f"=== start {self.starts + 1}\n".encode())
            log.flush()
            if self.listener is None:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "fetchd", "serve", "--socket", self.socket, *args],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True)
            else:
                fd = self.listener.fileno()
                self.proc = subprocess.Popen(
                    activated(sys.executable, fd, [sys.executable, "-m", "fetchd", "serve", *args]),
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + 60
        while True:  # readiness: the socket answers /health
            if self.proc.poll() is not None:
                raise RuntimeError(f"fetchd serve exited: {self.log_tail()}")
            try:
                Client(self.socket, timeout=10).health()
                return
            except FetchdClientError:
                if time.monotonic() > deadline:
                    self.stop(signal.SIGKILL)
                    raise RuntimeError(f"fetchd serve did not answer within 60 s: {self.log_tail()}") from None
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the daemon and wait until it has exited; returns its exit status. An
        activation socket stays open (``close()`` closes it)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


# --- images --------------------------------------------------------------------------------


def _app_images() -> tuple[CatalogImage, CatalogImage]:
    """Two OCI indexes that share each platform's base layer (a shared Debian base, as in real
    images): a blob wanted by two recipes at once must still cross the network once."""
    parts_a: list[PlatformImage] = []
    parts_b: list[PlatformImage] = []
    for plat_a, plat_b in (("linux/amd64", "linux/amd64"), ("linux/arm64/v8", "linux/arm64"),
                           ("linux/arm/v7", "linux/arm/v7"), ("linux/riscv64", "linux/riscv64")):
        label = plat_a.replace("/", "-")
        base = make_layer([TarEntry("etc", kind="dir"),
                           TarEntry("etc/os-release", f"ID=bbbase\nPLATFORM={plat_a}\n".encode()),
                           TarEntry("usr", kind="dir"),
                           TarEntry("usr/lib", kind="dir"),
                           TarEntry("usr/lib/base.txt", text_bytes(f"bb-base/{label}", 60_000))])
        for parts, name, plat in ((parts_a, "app-a", plat_a), (parts_b, "app-b", plat_b)):
            app = make_layer([TarEntry("opt", kind="dir"),
                              TarEntry(f"opt/{name}", text_bytes(f"bb-{name}/{label}", 20_000))])
            parts.append(make_image(plat, [base, app], cmd=(f"/opt/{name}",)))
    return (make_index("bb-app-a", "fetchd-bb/app-a", "v1", parts_a),
            make_index("bb-app-b", "fetchd-bb/app-b", "v1", parts_b))


@dataclass(frozen=True)
class Recipe:
    pn: str
    image: CatalogImage
    pinned: bool  # SRC_URI has ;digest=

    def platform(self, arch: str) -> PlatformImage:
        found = [p for p in self.image.platforms.values()
                 if (p.platform.architecture, p.platform.variant) in PLATFORMS[arch]]
        assert len(found) == 1, (self.image.name, arch, sorted(self.image.platforms))
        return found[0]


@dataclass
class World:
    """What every build of this module shares: the registry behind a counting proxy, the
    images, the recipes of tests/isar-core and the BitBake tree."""

    proxy: RegistryProxy
    recipes: list[Recipe]
    bitbake: Path
    python: str

    @property
    def registry_host(self) -> str:
        return self.proxy.host

    def local_conf_vars(self) -> dict[str, str]:
        out = {"FETCHD_TEST_REGISTRY": self.registry_host}
        for r in self.recipes:
            if r.pinned:
                out["FETCHD_TEST_DIGEST_" + r.pn.removeprefix("container-").replace("-", "_")] = \
                    str(r.image.digest)
        return out

    def blobs(self) -> dict[str, int]:
        """digest -> size of every blob the 4 recipes x 3 machines need (configs and layers)."""
        out: dict[str, int] = {}
        for r in self.recipes:
            for arch in MACHINES.values():
                p = r.platform(arch)
                out[str(p.config_digest)] = p.config_size
                out.update({str(layer.digest): layer.size for layer in p.layers})
        return out


@pytest.fixture(scope="module")
def world(registry: Any, images: Catalog, bitbake_dir: Path) -> Iterator[World]:
    app_a, app_b = (push_image(registry, img) for img in _app_images())
    recipes = [Recipe("container-multi-oci", images["multi-oci"], True),
               Recipe("container-multi-docker", images["multi-docker"], False),
               Recipe("container-app-a", app_a, True),
               Recipe("container-app-b", app_b, True)]
    proxy = RegistryProxy(registry)
    try:
        yield World(proxy, recipes, bitbake_dir, _build_python())
    finally:
        proxy.stop()


# --- builds --------------------------------------------------------------------------------


@dataclass
class Build:
    """One BitBake build directory (TOPDIR) and the result of running bitbake in it."""

    topdir: Path
    world: World
    returncode: int | None = None
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)  # the proxy's, per path

    @property
    def log_path(self) -> Path:
        return self.topdir / "bitbake.log"

    @property
    def dl_dir(self) -> Path:
        return self.topdir / "downloads"

    @property
    def tmpdir(self) -> Path:
        return self.topdir / "tmp"

    def log_tail(self, n: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"
        return f"bitbake in {self.topdir} exited {self.returncode}; log tail:\n{text[-n:]}"

    def workdir(self, recipe: Recipe, arch: str) -> Path:
        return self.tmpdir / "work" / f"{DISTRO}-{arch}" / recipe.pn / "1.0-r0"

    def dl_file(self, recipe: Recipe, arch: str) -> Path:
        """Isar's DL_DIR name, computed here from its rules (FACTS 1), not by the layer."""
        name = f"{self.world.registry_host}/{recipe.image.repository}".replace("/", ".")
        ref = str(recipe.image.digest).replace(":", "-") if recipe.pinned else recipe.image.tag
        return self.dl_dir / "container-images" / ISAR_ARCH_DIR[arch] / f"{name}_{ref}.zst"

    def work_file(self, recipe: Recipe, arch: str) -> Path:
        name = f"{self.world.registry_host}/{recipe.image.repository}".replace("/", ".")
        return self.workdir(recipe, arch) / f"{name}:{recipe.image.tag}.zst"

    def outputs(self) -> dict[str, bytes]:
        """Every container file of DL_DIR and every WORKDIR image, relative path -> bytes."""
        out = {}
        for recipe in self.world.recipes:
            for arch in MACHINES.values():
                for path in (self.dl_file(recipe, arch), self.work_file(recipe, arch)):
                    out[str(path.relative_to(self.topdir))] = path.read_bytes()
        return out

    def warnings(self) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if line.startswith(("WARNING:", "ERROR:"))]


def write_build_dir(topdir: Path, world: World, socket: str, layers: list[Path],
                    inherit: str = "fetchd fetch-audit", **conf: str) -> None:
    (topdir / "conf").mkdir(parents=True, exist_ok=True)
    (topdir / "conf" / "bblayers.conf").write_text(
        'BBPATH = "${TOPDIR}"\nBBFILES ?= ""\n'
        f'BBLAYERS = "{" ".join(str(p) for p in layers)}"\n')
    values = {
        "MACHINE": "qemuamd64", "DISTRO": DISTRO,
        "BBMULTICONFIG": " ".join(MACHINES),
        "BB_NUMBER_THREADS": "8",
        "FETCHD_SOCKET": socket,
        **world.local_conf_vars(),
        **conf,
    }
    lines = [f'INHERIT += "{inherit}"'] if inherit else []
    for key, value in values.items():
        op = "??=" if key in ("MACHINE", "DISTRO") else "="
        lines.append(f'{key} {op} "{value}"')
    (topdir / "conf" / "local.conf").write_text("\n".join(lines) + "\n")


def run_bitbake(world: World, topdir: Path, targets: list[str],
                on_start: Callable[[subprocess.Popen[bytes]], None] | None = None) -> Build:
    """``bitbake TARGETS`` in ``topdir`` (output to ``topdir/bitbake.log``); waits until the
    BitBake server has let go of the build directory too."""
    build = Build(topdir, world)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": str(topdir), "LANG": "en_US.UTF-8", "LC_ALL": "en_US.UTF-8"}
    started = time.monotonic()
    with open(build.log_path, "wb") as log:
        proc = subprocess.Popen([world.python, str(world.bitbake / "bin" / "bitbake"), *targets],
                                cwd=topdir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            if on_start is not None:
                on_start(proc)
            build.returncode = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    # The server (a daemon of its own) holds bitbake.lock until it has shut down.
    lock = topdir / "bitbake.lock"
    if lock.exists():
        with open(lock, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
    build.seconds = time.monotonic() - started
    return build


def all_targets(recipes: list[Recipe]) -> list[str]:
    return [f"mc:{mc}:{r.pn}" for mc in MACHINES for r in recipes]


def archive(path: Path, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decompress a .zst as Isar's loader does (pzstd) -> (manifest.json entry, image config)."""
    with open(out, "wb") as dst:
        r = subprocess.run(["pzstd", "-q", "-c", "-d", str(path)], stdout=dst, stderr=subprocess.PIPE)
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as t:
        member = t.extractfile("manifest.json")
        assert member is not None
        (entry,) = json.loads(member.read())
        config = t.extractfile(entry["Config"])
        assert config is not None
        return dict(entry), dict(json.loads(config.read()))


# --- the first build, shared by the tests below ----------------------------------------------


@pytest.fixture(scope="module")
def daemon(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    dmn = Serve(tmp_path_factory.mktemp("bb-fetchd"), [world.registry_host])
    try:
        yield dmn
    finally:
        dmn.close()


@pytest.fixture(scope="module")
def first_build(world: World, daemon: Serve, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """4 recipes x 3 machines, BB_NUMBER_THREADS = 8, a daemon with an empty store."""
    topdir = tmp_path_factory.mktemp("bb-first")
    write_build_dir(topdir, world, daemon.socket, [CORE_LAYER, FETCHD_LAYER])
    world.proxy.reset_stats()
    build = run_bitbake(world, topdir, all_targets(world.recipes))
    build.stats = world.proxy.stats()
    assert build.returncode == 0, build.log_tail() + "\n" + daemon.log_tail()
    return build


def test_twelve_images_isar_names_right_platforms_each_blob_once(
        first_build: Build, world: World, tmp_path: Path) -> None:
    build = first_build
    assert build.warnings() == [], build.log_tail()
    for recipe in world.recipes:
        for arch in MACHINES.values():
            dl, work = build.dl_file(recipe, arch), build.work_file(recipe, arch)
            assert dl.is_file(), (dl, sorted(p.name for p in dl.parent.glob("*")) if dl.parent.exists()
                                  else "no such directory")
            assert Path(str(dl) + ".done").is_file()
            # do_unpack: only the image in WORKDIR (and BitBake's temp/), a hard link to DL_DIR's.
            assert sorted(p.name for p in work.parent.iterdir()) == sorted([work.name, "temp"])
            assert not work.is_symlink() and work.stat().st_ino == dl.stat().st_ino
            entry, config = archive(dl, tmp_path / "image.tar")
            want = recipe.platform(arch)
            assert (config["architecture"], config.get("variant")) == (
                want.platform.architecture, want.platform.variant), (recipe.pn, arch)
            assert config["rootfs"]["diff_ids"] == [str(x) for x in want.diff_ids]
            assert entry["RepoTags"] == [f"{world.registry_host}/{recipe.image.repository}"
                                         f":{recipe.image.tag}"]
    # The format oracle: skopeo reads one archive per machine as an image of that machine.
    for arch in MACHINES.values():
        recipe = world.recipes[0]
        archive(build.dl_file(recipe, arch), tmp_path / "oracle.tar")
        r = subprocess.run(["skopeo", "inspect", f"docker-archive:{tmp_path / 'oracle.tar'}"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["Architecture"] == recipe.platform(arch).platform.architecture
        assert info["Layers"] == [str(x) for x in recipe.platform(arch).diff_ids]
    # Across the network: each needed blob exactly once and whole, nothing for other platforms.
    stats = build.stats
    fetched = {path.rsplit("/", 1)[1]: (st.requests, st.bytes_sent)
               for path, st in stats.items() if "/blobs/" in path}
    assert fetched == {digest: (1, size) for digest, size in world.blobs().items()}


def test_isar_container_fetcher_registered_and_fetchd_wins_every_task(
        first_build: Build, world: World) -> None:
    pids = set()
    for recipe in world.recipes:
        for arch in MACHINES.values():
            for task in ("fetch", "unpack"):
                path = first_build.workdir(recipe, arch) / "temp" / f"fetch-audit.do_{task}.json"
                record = json.loads(path.read_text())
                methods = record["methods"]
                # Isar's fetcher is in the list (appended by dpkg-base on the recipe's parse)...
                assert "container_fetcher.Container" in methods, methods
                # ...after fetchd's, which is the one method chosen for the URL.
                assert methods[0] == "fetchd_bitbake.fetcher.Fetchd", methods
                assert methods.count("fetchd_bitbake.fetcher.Fetchd") == 1, methods
                (url,) = record["urls"].values()
                assert url["method"] == "fetchd_bitbake.fetcher.Fetchd"
                assert url["localpath"] == str(first_build.dl_file(recipe, arch))
                pids.add(record["pid"])
    assert len(pids) == 24  # every task in a process of its own (forked by bitbake-worker)


def test_isar_container_stand_in_fails_loudly_without_fetchd(
        world: World, daemon: Serve, tmp_path: Path) -> None:
    """The control for the test above: without ``INHERIT += "fetchd"`` Isar's (stand-in)
    fetcher is the one chosen, and the build fails naming it."""
    write_build_dir(tmp_path, world, daemon.socket, [CORE_LAYER, FETCHD_LAYER],
                    inherit="fetch-audit", BBMULTICONFIG="")
    build = run_bitbake(world, tmp_path, ["container-app-a"])
    assert build.returncode != 0, build.log_tail()
    assert "Isar's container fetcher (the test stand-in) was chosen" in build.log_path.read_text(), \
        build.log_tail()
    assert not build.dl_dir.exists() or not list(build.dl_dir.rglob("*.zst"))


def test_offline_rebuild_fresh_tmpdir_and_dl_dir_asks_no_registry(
        first_build: Build, world: World, daemon: Serve, tmp_path: Path) -> None:
    write_build_dir(tmp_path, world, daemon.socket, [CORE_LAYER, FETCHD_LAYER], BB_NO_NETWORK="1")
    world.proxy.reset_stats()
    build = run_bitbake(world, tmp_path, all_targets(world.recipes))
    assert build.returncode == 0, build.log_tail() + "\n" + daemon.log_tail()
    assert world.proxy.log == []  # not one request, not even a HEAD for the tag
    assert build.warnings() == [], build.log_tail()
    assert build.outputs() == first_build.outputs()



# --- the daemon restarted during a build -------------------------------------------------------


def test_daemon_restarted_twice_during_a_build(first_build: Build, world: World, tmp_path: Path) -> None:
    """A fresh daemon (empty store: everything must be downloaded), socket-activated as the
    systemd units run it, is stopped and started again twice while the build's 12 fetches are
    downloading: once with SIGTERM (an upgrade, ``systemctl restart fetchd``; grace 0, so
    running jobs are parked at once, not finished) and once with SIGKILL (a crash, then
    systemd's restart). The build succeeds; its files are byte-identical to the undisturbed
    first build's."""
    dmn = Serve(tmp_path / "fetchd", [world.registry_host], "[server]\nshutdown_grace = 0\n",
                activated=True)
    topdir = tmp_path / "build"
    write_build_dir(topdir, world, dmn.socket, [CORE_LAYER, FETCHD_LAYER])
    blobs = world.blobs()
    total = sum(blobs.values())
    restarts: list[dict[str, Any]] = []

    def restart_twice(proc: subprocess.Popen[bytes]) -> None:
        def give_up() -> str | None:
            if proc.poll() is not None:
                return f"bitbake exited {proc.returncode} first"
            return None

        for sig, share in ((signal.SIGTERM, 0.25), (signal.SIGKILL, 0.6)):
            # Triggered by the download's own progress (bytes through the proxy), not by time.
            sent = world.proxy.wait_sent(int(total * share), "/blobs/", give_up)
            status = dmn.stop(sig)
            # What had crossed the network when the daemon was gone: not everything yet.
            done = {r.path.rsplit("/", 1)[1] for r in world.proxy.log
                    if "/blobs/" in r.path and r.method == "GET" and r.complete}
            restarts.append({"signal": sig.name, "sent": sent, "blobs_done": len(done & blobs.keys()),
                             "bitbake_running": proc.poll() is None, "exit": status})
            dmn.start()

    world.proxy.reset_stats()
    # Slow links (every connection of the daemon at 24 kB/s) keep the downloads in flight long
    # enough for both restarts to land in the middle of them.
    world.proxy.set_link(rate=24_000)
    try:
        try:
            build = run_bitbake(world, topdir, all_targets(world.recipes), on_start=restart_twice)
        except RuntimeError as e:
            raise AssertionError(f"{e}\n{Build(topdir, world).log_tail()}\n{dmn.log_tail()}") from e
    finally:
        world.proxy.set_link(None)
        dmn.close()
    assert build.returncode == 0, build.log_tail() + "\n" + dmn.log_tail()
    assert [r["signal"] for r in restarts] == ["SIGTERM", "SIGKILL"]
    for r in restarts:  # both in the middle of the downloads, with the build running
        assert r["bitbake_running"] and r["blobs_done"] < len(blobs), restarts
    assert dmn.starts == 3
    # The fetches in flight felt it: their clients said so in the tasks' logs.
    noticed = [p for p in topdir.glob("tmp/work/*/*/*/temp/log.do_fetch.*")
               if "daemon restarted" in p.read_text(errors="replace")]
    assert noticed, f"no do_fetch log says the daemon restarted: {restarts}"
    assert build.outputs() == first_build.outputs()
