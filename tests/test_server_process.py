"""The daemon as a real process (``python -m fetchd serve``) and builds as real ``fetchd pull``
processes: job sharing across 16 clients, hand-back per filesystem and per uid, crash + resume.

Blob downloads are counted at the proxy between the daemon and the registry.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.images import Catalog, CatalogImage
from support.proxy import RegistryProxy

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(CLIENT)]))
ENV.pop("FETCHD_SOCKET", None)
ENV.pop("FETCHD_STORE", None)
if str(CLIENT) not in sys.path:
    sys.path.append(str(CLIENT))

from fetchd_client import Client, DaemonUnreachable  # noqa: E402

pytestmark = pytest.mark.registry


# Starts the daemon as another uid: the interpreter may live where that uid cannot read
# (a pyenv under /root), so everything is imported first and the privileges dropped after.
AS_USER = (
    "import os, sys\n"
    "import fetchd.cli, fetchd.server, fetchd.pull, fetchd.layer_store, fetchd.registry_async\n"
    "import fetchd.pack, aiohttp.web, asyncio, logging, sqlite3, zstandard, json, tomllib\n"
    "import concurrent.futures.thread, encodings.ascii, encodings.idna, encodings.latin_1\n"
    "uid, gid = int(sys.argv[1]), int(sys.argv[2])\n"
    "os.setgroups([]); os.setgid(gid); os.setuid(uid)\n"
    "sys.exit(fetchd.cli.main(sys.argv[3:]))\n"
)


class DaemonProcess:
    """``fetchd serve`` in a subprocess with its own socket and store under ``base``."""

    def __init__(self, base: Path, store: Path | None = None, user: pwd.struct_passwd | None = None,
                 server_config: str = "") -> None:
        self.user = user
        self.base = base
        self.socket = str(base / "run" / "fetchd.sock")
        self.store = store or base / "store"
        self.config = base / "config.toml"
        # Builds of every uid may connect in these tests (the unit uses 0660 + group fetchd).
        self.config.write_text("[server]\nsocket_mode = 0o666\n" + server_config)
        self.log = base / f"daemon-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        serve = ["serve", "--socket", self.socket, "--store", str(self.store), "--config", str(self.config)]
        if self.user is None:
            argv = [sys.executable, "-m", "fetchd", *serve]
        else:
            argv = [sys.executable, "-c", AS_USER, str(self.user.pw_uid), str(self.user.pw_gid), *serve]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                Client(self.socket).health()
                return self
            except DaemonUnreachable:
                time.sleep(0.05)
        raise AssertionError(f"daemon did not answer: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def pull(self, reference: str, output: Path | str, *extra: str,
             env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "fetchd", "pull", reference, "-o", str(output),
             "--socket", self.socket, *extra],
            env=dict(ENV, **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )


@pytest.fixture
def start_daemon(open_tmp: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(store: Path | None = None, user: pwd.struct_passwd | None = None,
              server_config: str = "") -> DaemonProcess:
        daemon = DaemonProcess(open_tmp, store, user, server_config).start()
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_sixteen_concurrent_pulls_download_each_blob_once(
    start_daemon: Callable[..., DaemonProcess], proxy: RegistryProxy, images: Catalog, open_tmp: Path
) -> None:
    image = images["multi-oci"]
    part = image.platform("linux/arm/v7")
    daemon = start_daemon()
    out_dir = open_tmp / "outs"
    out_dir.mkdir()
    outputs = [out_dir / f"build{i}.zst" for i in range(16)]
    procs = [daemon.pull(image.ref(proxy.host), out, "--arch", "armhf") for out in outputs]
    finished = [_finish(p) for p in procs]
    for code, _out, err in finished:
        assert code == 0, err
    assert all("(hardlink)" in out for _code, out, _err in finished)
    for digest in [part.config_digest, *(layer.digest for layer in part.layers)]:
        assert proxy.blob_gets(digest) == 1, f"{digest} fetched {proxy.blob_gets(digest)} times"
    # Nothing of the other platforms was downloaded.
    others = image.blob_digests() - {part.config_digest, *(layer.digest for layer in part.layers)}
    assert sum(proxy.blob_gets(d) for d in others) == 0
    inodes = {os.stat(out).st_ino for out in outputs}
    assert len(inodes) == 1
    status = Client(daemon.socket).status()
    assert status["completed"] >= 1
    ls = Client(daemon.socket).ls()["images"]
    archive = Path(daemon.store) / "blobs" / "sha256" / ls[0]["archive_digest"].split(":")[1]
    assert inodes == {os.stat(archive).st_ino}
    assert len({out.read_bytes() for out in outputs}) == 1
    assert daemon.stop() == 0


def _run_as(uid: int, gid: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the fetchd CLI as another uid. The interpreter lives where that uid may not read,
    so the child imports what it needs first and then drops its privileges."""
    code = (
        "import os, sys, json, hashlib, http.client, socket, argparse\n"
        "import fetchd_client, fetchd.cli, shutil, email.parser, encodings.idna\n"
        "fetchd.cli._parser().format_help()  # loads argparse's lazy imports\n"
        f"os.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
        "sys.exit(fetchd.cli.main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], env=ENV, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_hand_back_per_uid_and_filesystem(
    start_daemon: Callable[..., DaemonProcess], images: Catalog, open_tmp: Path
) -> None:
    nobody = pwd.getpwnam("nobody")
    image = images["single-oci"]
    daemon = start_daemon()
    pull = ["pull", image.reference, "--socket", daemon.socket, "-o"]

    closed = open_tmp / "root-only"
    closed.mkdir(mode=0o755)
    refused = _run_as(nobody.pw_uid, nobody.pw_gid, [*pull, str(closed / "x.zst")])
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fetchd: error: refusing to write"), refused.stderr
    assert f"uid {nobody.pw_uid} may not write" in lines[0]
    assert "Traceback" not in refused.stderr
    assert list(closed.iterdir()) == []

    theirs = open_tmp / "nobody-owns"
    theirs.mkdir()
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    ok = _run_as(nobody.pw_uid, nobody.pw_gid, [*pull, str(theirs / "x.zst")])
    assert ok.returncode == 0, ok.stderr
    assert "(hardlink)" in ok.stdout

    link = open_tmp / "link.zst"
    link.symlink_to("/etc/passwd")
    sym = daemon.pull(image.reference, link)
    code, _out, err = _finish(sym)
    assert code == 1 and "symlink" in err
    assert link.is_symlink()

    shm = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="fetchd-proc-"))
    try:
        if os.stat(shm).st_dev == os.stat(daemon.store).st_dev:
            pytest.skip("/dev/shm is on the store's filesystem here")
        code, out, err = _finish(daemon.pull(image.reference, shm / "x.zst"))
        assert code == 0, err
        assert "(copy)" in out
        assert os.stat(shm / "x.zst").st_dev != os.stat(daemon.store).st_dev
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as another uid")
def test_daemon_that_may_not_write_hands_back_a_client_copy(
    start_daemon: Callable[..., DaemonProcess], images: Catalog, open_tmp: Path
) -> None:
    """The daemon runs as nobody (like the unit's fetchd user); the build (root) asks for a
    file in a directory only root may write: the daemon writes nothing there, the client
    copies the read-only store file itself, atomically and verified."""
    nobody = pwd.getpwnam("nobody")
    (open_tmp / "run").mkdir()
    os.chown(open_tmp / "run", nobody.pw_uid, nobody.pw_gid)
    (open_tmp / "store").mkdir()
    os.chown(open_tmp / "store", nobody.pw_uid, nobody.pw_gid)
    daemon = start_daemon(user=nobody)
    closed = open_tmp / "root-only"
    closed.mkdir(mode=0o755)
    code, out, err = _finish(daemon.pull(images["single-docker"].reference, closed / "x.zst"))
    assert code == 0, err + daemon.log.read_text()
    assert "(client-copy)" in out
    result = Client(daemon.socket).fetch(images["single-docker"].reference, dest=str(closed / "y.zst"))
    assert result["delivery"] == "client-copy"
    assert os.stat(closed / "y.zst").st_uid == 0  # the client's own file
    assert os.stat(closed / "y.zst").st_ino != os.stat(result["store_path"]).st_ino
    assert (closed / "y.zst").read_bytes() == Path(result["store_path"]).read_bytes()
    assert sorted(p.name for p in closed.iterdir()) == ["x.zst", "y.zst"]
    assert daemon.stop() == 0


def _ingested(daemon: DaemonProcess) -> int:
    """The resumable prefix of the partial downloads, as the store records it on disk (the
    proxy counts a response only at its end). Parallel ranges beyond the contiguous prefix
    are not resumable and not counted."""
    held = 0
    for state in (Path(daemon.store) / "ingest").rglob("*.state"):
        try:
            held += int(json.loads(state.read_text())["offset"])
        except (OSError, ValueError, KeyError):
            pass
    return held


@pytest.mark.slow
def test_sigkill_mid_pull_then_resume(
    start_daemon: Callable[..., DaemonProcess], proxy: RegistryProxy, big_image: CatalogImage,
    open_tmp: Path,
) -> None:
    layer = big_image.only.layers[0]
    # Slow enough to be caught mid-body even on a busy host: each connection at 2 MB/s
    # (~10 s for the whole blob over parallel ranges; it is killed after ~2-3 s).
    proxy.set_link(rate=2e6)
    daemon = start_daemon()
    # This build does not wait for the daemon to come back (test_restart.py: those that do).
    first = daemon.pull(big_image.ref(proxy.host), open_tmp / "big.zst",
                        env={"FETCHD_RECONNECT_TIMEOUT": "0"})
    deadline = time.monotonic() + 60
    while _ingested(daemon) < 4 << 20:
        assert time.monotonic() < deadline, "the big blob never started downloading"
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    seen = _ingested(daemon)
    daemon.stop(signal.SIGKILL)
    code, _out, err = _finish(first)
    assert code != 0 and err.startswith("fetchd: error:"), err
    assert "Traceback" not in err
    sent_before = proxy.bytes_sent(f"/blobs/{layer.digest}")
    assert sent_before < layer.size, (seen, daemon.log.read_text())

    proxy.reset_rules()
    # The killed transfer is recorded when the proxy notices the closed connection, which may
    # be after this point: count the second daemon's requests by the phase they arrived in.
    proxy.epoch = 1
    daemon = start_daemon(daemon.store)
    code, out, err = _finish(daemon.pull(big_image.ref(proxy.host), open_tmp / "big.zst"))
    assert code == 0, err  # the CLI re-hashed the output against the archive digest
    resumed = sum(r.bytes_sent for r in proxy.log
                  if r.epoch == 1 and r.path.endswith(f"/blobs/{layer.digest}"))
    # Only what the store did not hold was fetched again (a range probe may add a few bytes).
    assert 0 < resumed <= layer.size - seen + 1024, (resumed, layer.size, seen)
    assert "(hardlink)" in out
    assert daemon.stop() == 0


@pytest.mark.slow
def test_sigterm_mid_pull_parks_the_job_and_exits_zero(
    start_daemon: Callable[..., DaemonProcess], proxy: RegistryProxy, big_image: CatalogImage,
    open_tmp: Path,
) -> None:
    proxy.set_link(rate=2e6)
    daemon = start_daemon(server_config="shutdown_grace = 0\n")  # park at once
    pull = daemon.pull(big_image.ref(proxy.host), open_tmp / "big.zst",
                       env={"FETCHD_RECONNECT_TIMEOUT": "0"})
    deadline = time.monotonic() + 60
    while _ingested(daemon) < 2 << 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert daemon.stop(signal.SIGTERM) == 0
    code, _out, err = _finish(pull)
    assert code == 1
    assert "fetchd: error:" in err and "retry" in err, err
    log = daemon.log.read_text()
    assert "partial downloads are kept" in log and "stopped" in log
    ingest = Path(daemon.store) / "ingest"
    assert any(p.stat().st_size > 0 for p in ingest.rglob("*") if p.is_file())
