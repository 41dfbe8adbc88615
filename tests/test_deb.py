"""The Debian package (scripts/build-deb.sh, debian/): built, checked, installed, run, upgraded, purged.

Needs root and Debian's build tools (scripts/setup.sh installs them; CI runs as root). There is no
systemd as PID 1 here, so the tests do what systemd would: they hold the listening socket (as
fetchd.socket does) and start the installed ``fetchd serve`` with the unit's ExecStart, User,
Group, UMask and Environment, the socket at fd 3 (LISTEN_FDS/LISTEN_PID) and NOTIFY_SOCKET; an
upgrade's ``try-restart`` is a SIGTERM and a start of the new files.

The machine is shared: one module-wide lock file serializes these tests across processes (other
checkouts run the suite too), a leftover package is purged first, and every test purges the
package again at its end, also when it fails (a fetchd these tests did not install is never
purged: they fail instead). Built packages are cached per hash of the files that
go into them (``$FETCHD_TEST_CACHE/deb``), so only a change to the package's sources rebuilds.
"""

from __future__ import annotations

import fcntl
import grp
import hashlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.activation import activated
from support.images import Catalog
from support.proxy import RegistryProxy

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "build-deb.sh"
CACHE = Path(os.environ.get("FETCHD_TEST_CACHE") or Path.home() / ".cache" / "fetchd-tests") / "deb"
LOCK = Path(tempfile.gettempdir()) / "fetchd-test-deb.lock"
# Present while a package these tests installed may be on the machine: only such a package is
# purged as a leftover. A fetchd installed otherwise (a real build host's, with its store) makes
# the tests fail instead of deleting it.
MARKER = Path("/var/tmp/fetchd-test-deb.installed")
UNITS = Path("/lib/systemd/system")
# What goes into the package: a change here rebuilds the cached .deb.
PACKAGED = ("fetchd", "client", "bitbake-client", "systemd", "debian", "docs", "README.md",
            "pyproject.toml", "scripts/manpage.py", "scripts/build-deb.sh")
# Paths the package makes outside its file list; after a purge none may be left.
MADE = ("/etc/fetchd", "/var/cache/fetchd", "/var/lib/fetchd", "/run/fetchd", "/usr/lib/fetchd",
        "/usr/share/fetchd", "/usr/share/doc/fetchd")
APT = ["apt-get", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600",
       "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
APT_ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")

# Package builds (pip, dpkg-buildpackage), dpkg runs, and on a shared machine the wait for another
# checkout's run of these tests (the module lock) take longer than the suite's usual 300 s: a build
# took ~45 s and a wait ~8 min with seven checkouts' suites running on 2 cores.
pytestmark = [pytest.mark.registry, pytest.mark.timeout(1800)]


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]


def check(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = run(argv, **kwargs)
    assert proc.returncode == 0, f"{shlex.join(argv)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


# -- building (cached) -----------------------------------------------------------------------------


def base_version() -> str:
    return check(["dpkg-parsechangelog", "-l", str(ROOT / "debian" / "changelog"), "-S", "Version"]).stdout.strip()


def source_hash() -> str:
    """sha256 over the names, modes and contents (or link targets) of the packaged files."""
    names = check(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *PACKAGED],
                  cwd=ROOT).stdout.split("\0")
    h = hashlib.sha256()
    for name in sorted(set(filter(None, names))):
        path = ROOT / name
        if not os.path.lexists(path):
            continue  # deleted in the work tree
        h.update(name.encode() + b"\0")
        if path.is_symlink():
            h.update(b"link:" + os.readlink(path).encode())
        else:
            h.update(oct(path.stat().st_mode & 0o111).encode() + path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def build(version: str) -> Path:
    """fetchd_<version>_<arch>.deb of this tree, built once per source hash."""
    arch = check(["dpkg", "--print-architecture"]).stdout.strip()
    out = CACHE / f"{source_hash()[:20]}-{version}"
    deb = out / f"fetchd_{version}_{arch}.deb"
    if deb.exists():
        os.utime(out)  # in use: kept by the pruning below
        return deb
    CACHE.mkdir(parents=True, exist_ok=True)
    # Builds of older trees (~2 MB each) go after two days unused.
    for old in CACHE.iterdir():
        if old.is_dir() and time.time() - old.stat().st_mtime > 2 * 86400:
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".build-"))
    try:
        # lintian runs in test_package_contents_and_lintian, on the same file.
        proc = run([str(BUILD), "-o", str(tmp), "--version", version, "--no-lintian"])
        assert proc.returncode == 0, f"build-deb.sh failed:\n{proc.stdout}\n{proc.stderr}"
        assert proc.stdout.strip() == str(tmp / deb.name), proc.stdout
        (tmp / "fetchd-build.log").unlink(missing_ok=True)
        try:
            tmp.rename(out)
        except OSError:  # another process cached the same build meanwhile
            assert deb.exists()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return deb


@pytest.fixture(scope="module")
def machine() -> Iterator[None]:
    """Root, the tools, and this machine's package state to ourselves (lock across processes)."""
    assert os.geteuid() == 0, "the Debian package tests install packages: run them as root (CI does)"
    for tool in ("dpkg-buildpackage", "dh", "lintian", "systemd-analyze", "apt-get", "man"):
        assert shutil.which(tool), f"{tool} is missing: run scripts/setup.sh"
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        purge()  # a leftover of an interrupted run
        try:
            yield
        finally:
            purge()


@pytest.fixture(scope="module")
def deb(machine: None) -> Path:
    return build(base_version())


@pytest.fixture(scope="module")
def deb_next(machine: None) -> Path:
    """The same tree as a higher version: the upgrade."""
    return build(base_version() + "+upgrade1")


def installed_version() -> str | None:
    proc = run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", "fetchd"])
    if proc.returncode != 0 or proc.stdout.startswith("not-installed"):
        return None
    status, _, version = proc.stdout.partition(" ")
    return version if status == "installed" else status


def purge() -> None:
    if installed_version() is not None:
        assert MARKER.exists(), (
            "fetchd is installed on this machine, and not by these tests: they would purge it "
            "(and its store). Run them on another machine, or 'apt-get purge fetchd' first.")
        check([*APT, "purge", "fetchd"], env=APT_ENV)
    MARKER.unlink(missing_ok=True)


def install(deb: Path) -> None:
    MARKER.touch()
    check([*APT, "install", str(deb)], env=APT_ENV)


@pytest.fixture
def clean(machine: None) -> Iterator[None]:
    """The test starts without the package and ends with it purged, whatever happens."""
    purge()
    try:
        yield
    finally:
        purge()


# -- the daemon as systemd would run it -------------------------------------------------------------


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """An installed unit file as {section: {key: [values]}}."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(section, {}).setdefault(key.strip(), []).append(value.strip())
    return out




class InstalledDaemon:
    """The installed ``fetchd serve`` started the way fetchd.socket + fetchd.service start it.

    The test holds the listening socket (systemd's part), so it outlives a daemon: clients queue
    on it while one daemon stops and the next starts, as in an upgrade's try-restart.
    """

    def __init__(self, base: Path) -> None:
        (base / "run").mkdir(mode=0o755)
        self.socket = str(base / "run" / "fetchd.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket)
        self.listener.listen(64)
        self.notify_path = str(base / "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        os.chmod(self.notify_path, 0o666)  # the daemon's user sends READY=1 here
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.procs[-1]

    def start(self) -> int:
        service = unit("fetchd.service")["Service"]
        argv = shlex.split(service["ExecStart"][0])
        user = pwd.getpwnam(service["User"][0])
        group = grp.getgrnam(service["Group"][0])
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8", "USER": user.pw_name, "LOGNAME": user.pw_name,
               "HOME": user.pw_dir, "NOTIFY_SOCKET": self.notify_path, "LISTEN_FDS": "1"}
        for assignment in service.get("Environment", []):
            for item in shlex.split(assignment):
                key, _, value = item.partition("=")
                env[key] = value
        fd = self.listener.fileno()
        with open(self.base / f"daemon-{len(self.procs)}.log", "wb") as log:
            proc = subprocess.Popen(
                activated("/usr/bin/python3", fd, argv), env=env, cwd="/", user=user.pw_uid,
                group=group.gr_gid, extra_groups=[], umask=int(service["UMask"][0], 8),
                pass_fds=(fd,), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self._wait_for(f"MAINPID={proc.pid}")
        return proc.pid

    def _wait_for(self, state: str) -> None:
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while state not in seen:
            if self.proc.poll() is not None:
                raise AssertionError(f"fetchd serve exited {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {state} from fetchd serve; got {seen}: {self.log()}")
            self.notify.settimeout(1)
            try:
                seen += self.notify.recv(4096).decode().splitlines()
            except TimeoutError:
                continue

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.base.glob("daemon-*.log")))

    def stop(self) -> int:
        """SIGTERM, as systemctl stop/try-restart sends (KillMode=mixed: the main process)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.listener.close()
        self.notify.close()

    def fetchd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(["/usr/bin/fetchd", *args, "--socket", self.socket], env=CLIENT_ENV, timeout=600)

    def pull(self, reference: str, output: Path, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["/usr/bin/fetchd", "pull", reference, "-o", str(output), "--socket", self.socket, *extra],
            env=CLIENT_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


CLIENT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}


@pytest.fixture
def daemon(open_tmp: Path) -> Iterator[InstalledDaemon]:
    d = InstalledDaemon(open_tmp)
    try:
        yield d
    finally:
        d.close()


def archive_members(path: Path) -> list[str]:
    """Names in a zstd docker-archive, read with the system's zstd (not the code under test)."""
    proc = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True, timeout=300)
    tar = path.with_suffix(".tar")
    tar.write_bytes(proc.stdout)
    with tarfile.open(tar) as tf:
        return tf.getnames()


# -- the tests ----------------------------------------------------------------------------------------


def test_package_contents_and_lintian(deb: Path, tmp_path: Path) -> None:
    fields = check(["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture", "Depends"]).stdout
    assert "Package: fetchd\n" in fields
    assert f"Version: {base_version()}\n" in fields
    assert f"Architecture: {check(['dpkg', '--print-architecture']).stdout.strip()}\n" in fields
    assert "python3.11" in fields and "systemd" in fields

    tree = tmp_path / "tree"
    check(["dpkg-deb", "-x", str(deb), str(tree)])
    control = tmp_path / "control"
    check(["dpkg-deb", "-e", str(deb), str(control)])
    site = tree / "usr/lib/fetchd/lib/python3.11/site-packages"
    for path in ("usr/bin/fetchd", "usr/lib/fetchd/pyvenv.cfg", "usr/lib/fetchd/bin/python3",
                 "lib/systemd/system/fetchd.service", "lib/systemd/system/fetchd.socket",
                 "usr/lib/sysusers.d/fetchd.conf", "usr/lib/tmpfiles.d/fetchd.conf",
                 "etc/fetchd/config.toml", "usr/share/man/man1/fetchd.1.gz",
                 "usr/share/doc/fetchd/README.md", "usr/share/doc/fetchd/INSTALL.md",
                 "usr/share/doc/fetchd/DESIGN.md", "usr/share/doc/fetchd/copyright"):
        assert os.path.lexists(tree / path), path
    assert os.access(tree / "usr/bin/fetchd", os.X_OK)
    # The units, snippets and config are the repository's, byte for byte.
    for packaged, source in (("lib/systemd/system/fetchd.service", "systemd/fetchd.service"),
                             ("lib/systemd/system/fetchd.socket", "systemd/fetchd.socket"),
                             ("usr/lib/sysusers.d/fetchd.conf", "systemd/fetchd.sysusers"),
                             ("usr/lib/tmpfiles.d/fetchd.conf", "systemd/fetchd.tmpfiles"),
                             ("etc/fetchd/config.toml", "systemd/config.toml")):
        assert (tree / packaged).read_bytes() == (ROOT / source).read_bytes(), packaged
    assert (control / "conffiles").read_text().split() == ["/etc/fetchd/config.toml"]

    # The private environment: fetchd, its client, the pinned zstandard; no pip, no byte-code,
    # no trace of the build directory (it would break the installed launcher or leak paths).
    assert (site / "fetchd" / "cli.py").read_bytes() == (ROOT / "fetchd" / "cli.py").read_bytes()
    assert (site / "fetchd_client" / "__init__.py").read_bytes() == \
        (ROOT / "client" / "fetchd_client" / "__init__.py").read_bytes()
    pinned = next(line.split("==")[1].strip('",') for line in (ROOT / "pyproject.toml").read_text().split()
                  if line.startswith('"zstandard=='))
    assert (site / f"zstandard-{pinned}.dist-info").is_dir()
    assert not list(site.glob("pip*")) and not list(site.glob("setuptools*"))
    assert sorted(p.name for p in (tree / "usr/lib/fetchd/bin").iterdir()) == ["python", "python3", "python3.11"]
    everything = [p for p in tree.rglob("*")]
    assert [p for p in everything if p.name == "__pycache__" or p.suffix == ".pyc"] == []
    leaks = run(["grep", "-rlF", "/fetchd-deb.", str(tree)]).stdout.split()
    assert leaks == [], f"files naming the build directory: {leaks}"

    # The BitBake layer: the repository's bitbake-client file for file, as real files (its
    # lib/fetchd_client is a symlink to client/), so BBLAYERS += the installed path works alike.
    layer = tree / "usr/share/fetchd/bitbake-client"
    assert (layer / "conf/layer.conf").is_file() and (layer / "classes/fetchd.bbclass").is_file()
    assert not [p for p in layer.rglob("*") if p.is_symlink()]
    source = ROOT / "bitbake-client"
    want = {str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    want.update({str(Path("lib/fetchd_client") / p.relative_to(ROOT / "client/fetchd_client")): p.read_bytes()
                 for p in (ROOT / "client/fetchd_client").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts})
    got = {str(p.relative_to(layer)): p.read_bytes() for p in layer.rglob("*") if p.is_file()}
    assert got == want

    # The man page renders without warnings and has every command of the parser.
    page = run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                str(tree / "usr/share/man/man1/fetchd.1.gz")], env=dict(CLIENT_ENV, MANWIDTH="80"))
    assert page.returncode == 0 and page.stderr == "", page.stderr
    text = run(["man", "-l", str(tree / "usr/share/man/man1/fetchd.1.gz")],
               env=dict(CLIENT_ENV, MANWIDTH="100", MAN_KEEP_FORMATTING="0")).stdout
    for command in ("serve", "pull", "resolve", "deliver", "status", "ls", "gc", "verify"):
        assert f"fetchd {command} [-h]" in text, command

    # Maintainer scripts: user and dirs, socket enabled and started on install, the daemon
    # restarted only if it runs after an upgrade, stopped on remove, the store gone only on purge.
    postinst = (control / "postinst").read_text()
    for snippet in ("systemd-sysusers", "fetchd.conf", "systemd-tmpfiles", "--create",
                    "deb-systemd-helper enable 'fetchd.socket'", "deb-systemd-invoke start 'fetchd.socket'",
                    "deb-systemd-invoke try-restart 'fetchd.service'", "compileall"):
        assert snippet in postinst, snippet
    # The service is not enabled by the package (the socket starts it), only kept enabled if
    # an admin enabled it.
    assert "if deb-systemd-helper debian-installed 'fetchd.service'; then" in postinst
    prerm = (control / "prerm").read_text()
    assert "stop 'fetchd.socket'" in prerm and "stop fetchd.service" in prerm
    assert not (control / "preinst").exists()  # nothing is stopped before an upgrade
    postrm = (control / "postrm").read_text()
    assert postrm.index("purge)") < postrm.index("rm -rf /var/cache/fetchd")

    # lintian: nothing at any level, pedantic included, but the overrides, each with its reason.
    lint = run(["lintian", "--fail-on", "error,warning,info,pedantic", "--info", "--pedantic", str(deb)])
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert [line for line in lint.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:")] == []
    lines = (ROOT / "debian" / "fetchd.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("#"), f"override without a reason: {line}"


def test_install_run_pull_remove_purge(deb: Path, clean: None, daemon: InstalledDaemon,
                                       images: Catalog, open_tmp: Path) -> None:
    install(deb)
    assert installed_version() == base_version()
    files = check(["dpkg-query", "-L", "fetchd"]).stdout.split("\n")

    # The user, its group and the directories (sysusers, tmpfiles).
    user = pwd.getpwnam("fetchd")
    assert grp.getgrgid(user.pw_gid).gr_name == "fetchd"
    assert user.pw_dir == "/var/lib/fetchd"
    for path, mode in (("/var/cache/fetchd", 0o755), ("/var/lib/fetchd", 0o750)):
        st = os.stat(path)
        assert (st.st_uid, st.st_mode & 0o777) == (user.pw_uid, mode), path
    version = check(["/usr/bin/fetchd", "--version"], env=CLIENT_ENV).stdout
    assert version == f"fetchd {base_version().split('+')[0]}\n"
    assert list(Path("/usr/lib/fetchd/lib/python3.11/site-packages/fetchd/__pycache__").glob("cli.*.pyc"))

    verify = run(["systemd-analyze", "verify", str(UNITS / "fetchd.socket"), str(UNITS / "fetchd.service")],
                 timeout=120)
    assert verify.returncode == 0, verify.stderr
    assert [line for line in verify.stderr.splitlines() if "fetchd." in line] == [], verify.stderr

    pid = daemon.start()
    status = daemon.fetchd("status", "--json")
    assert status.returncode == 0, status.stderr
    assert f'"pid": {pid}' in status.stdout and '"store_path": "/var/cache/fetchd"' in status.stdout

    image = images["single-oci"]
    out = open_tmp / "single.zst"
    pull = daemon.fetchd("pull", image.reference, "-o", str(out))
    assert pull.returncode == 0, pull.stderr + daemon.log()
    assert "manifest.json" in archive_members(out)
    blobs = [p for p in Path("/var/cache/fetchd").rglob("*") if p.is_file()]
    assert blobs and all(p.stat().st_uid == user.pw_uid for p in blobs)
    assert daemon.stop() == 0

    # remove: the program goes, the store and the configuration stay.
    check([*APT, "remove", "fetchd"], env=APT_ENV)
    assert installed_version() == "config-files"
    assert not os.path.exists("/usr/bin/fetchd") and not os.path.exists("/usr/lib/fetchd")
    assert os.path.exists("/etc/fetchd/config.toml")
    assert [p for p in Path("/var/cache/fetchd").rglob("*") if p.is_file()]

    # purge: nothing left but the user and group (Debian keeps system users).
    check([*APT, "purge", "fetchd"], env=APT_ENV)
    assert installed_version() is None
    left = [f for f in files if "fetchd" in f and os.path.lexists(f)]
    left += [p for p in MADE if os.path.lexists(p)]
    for where in ("/etc/systemd", "/var/lib/systemd", "/etc/sysusers.d", "/etc/tmpfiles.d"):
        if os.path.isdir(where):
            left += [str(p) for p in Path(where).rglob("*fetchd*")]
    left += [str(p) for p in Path("/var/lib/dpkg/info").glob("fetchd.*")]
    assert left == [], f"left after purge: {left}"


def test_upgrade_during_a_pull_completes_it(deb: Path, deb_next: Path, clean: None,
                                            daemon: InstalledDaemon, images: Catalog,
                                            proxy: RegistryProxy, open_tmp: Path) -> None:
    install(deb)
    first = daemon.start()
    image = images["multi-oci"]
    layer = image.platform("linux/arm64/v8").layers[-1]
    hold = proxy.hold(f"/blobs/{layer.digest}$")
    out = open_tmp / "multi-arm64.zst"
    pull = daemon.pull(image.ref(proxy.host), out, "--arch", "arm64")
    try:
        assert hold.reached.wait(300), "the pull never asked for its layer"
        assert pull.poll() is None  # in flight: its layer is held

        install(deb_next)
        assert installed_version() == base_version() + "+upgrade1"
        # The postinst's try-restart, as systemd carries it out: stop the running daemon (it
        # parks the job), start the upgraded one on the same socket.
        assert daemon.stop() == 0, daemon.log()
        second = daemon.start()
        assert second != first
        hold.release()

        stdout, stderr = pull.communicate(timeout=600)
        assert pull.returncode == 0, f"the pull did not survive the upgrade: {stderr}\n{daemon.log()}"
        assert str(out) in stdout
        assert "manifest.json" in archive_members(out)
        status = daemon.fetchd("status", "--json")
        assert f'"pid": {second}' in status.stdout, status.stdout + status.stderr
    finally:
        hold.release()
        if pull.poll() is None:
            pull.kill()
            pull.wait()
