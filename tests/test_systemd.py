"""systemd integration: the unit files, socket activation and sd_notify, as systemd does them."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.activation import activated

from fetchd import sdnotify

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
CLIENT = ROOT / "client"


def _sections(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (keys may repeat in units)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        assert section is not None, f"{path.name}: {line!r} before any section"
        key, eq, value = line.partition("=")
        assert eq, f"{path.name}: not key=value: {line!r}"
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def test_service_unit_has_notify_and_hardening() -> None:
    service = _sections(UNITS / "fetchd.service")["Service"]
    assert service["Type"] == ["notify"]
    assert service["User"] == ["fetchd"]
    assert service["ExecStart"][0].split()[:2] == ["/usr/bin/fetchd", "serve"]
    for key, value in {
        "ProtectSystem": "strict", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CacheDirectory": "fetchd", "StateDirectory": "fetchd", "RuntimeDirectory": "fetchd",
    }.items():
        assert service[key] == [value], key
    assert service["ProtectHome"][0] in ("yes", "read-only", "tmpfs")
    # The socket lives in /run/fetchd: stopping the service must not delete it.
    assert service["RuntimeDirectoryPreserve"] == ["yes"]
    store = re.search(r"--store (\S+)", service["ExecStart"][0])
    assert store and store.group(1) == "/var/cache/" + service["CacheDirectory"][0]


def test_the_shutdown_grace_ends_well_before_systemd_kills() -> None:
    """systemd SIGKILLs a daemon still running TimeoutStopSec after SIGTERM: the grace the
    unit gives jobs (and the config's default) must end well before, with time to park."""
    from fetchd.config import ServerConfig

    service = _sections(UNITS / "fetchd.service")["Service"]
    stop_timeout = float(service["TimeoutStopSec"][0])
    grace = re.search(r"--shutdown-grace (\S+)", service["ExecStart"][0])
    assert grace is not None
    assert float(grace.group(1)) + 30 <= stop_timeout
    assert ServerConfig().shutdown_grace + 30 <= stop_timeout


def test_socket_unit_matches_the_default_socket() -> None:
    sock = _sections(UNITS / "fetchd.socket")["Socket"]
    assert sock["ListenStream"] == ["/run/fetchd/fetchd.sock"]
    assert sock["SocketMode"] == ["0660"]
    assert sock["SocketGroup"] == ["fetchd"]
    sys.path.insert(0, str(CLIENT))
    try:
        import fetchd_client
    finally:
        sys.path.remove(str(CLIENT))
    from fetchd.config import DEFAULT_SOCKET_PATH

    assert fetchd_client.DEFAULT_SOCKET == DEFAULT_SOCKET_PATH == sock["ListenStream"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists: point it at this Python in a copy.
    for name in ("fetchd.service", "fetchd.socket"):
        text = (UNITS / name).read_text()
        if not os.path.exists("/usr/bin/fetchd"):
            text = text.replace("/usr/bin/fetchd", sys.executable)
        (tmp_path / name).write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "fetchd.service"), str(tmp_path / "fetchd.socket")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    # Unknown keys are only warnings (exit 0): none may appear.
    noise = [line for line in proc.stderr.splitlines() if "fetchd." in line]
    assert noise == [], proc.stderr


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_sysusers_and_tmpfiles_create_user_and_store(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(["systemd-sysusers", f"--root={root}", str(UNITS / "fetchd.sysusers")],
                   check=True, capture_output=True, timeout=60)
    passwd = (root / "etc" / "passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("fetchd:"))
    uid = int(entry.split(":")[2])
    assert "fetchd:" in (root / "etc" / "group").read_text()
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(UNITS / "fetchd.tmpfiles")],
                   check=True, capture_output=True, timeout=60)
    store = root / "var" / "cache" / "fetchd"
    assert store.is_dir() and store.stat().st_uid == uid
    assert oct(store.stat().st_mode & 0o777) == oct(0o755)


# -- sd_notify and sd_listen_fds ----------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram(tmp_path: Path, abstract: bool) -> None:
    name = f"@fetchd-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind("\0" + name[1:] if abstract else name)
        sink.settimeout(5)
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": name})
        assert sink.recv(4096) == b"READY=1"


def test_notify_without_systemd_is_a_no_op(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", {})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})


def test_listen_fds_only_for_our_pid() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert sdnotify.listen_fds(env) == []
    assert "LISTEN_PID" not in env  # never handed down to children
    r, w = os.pipe()
    try:
        # fds 3 and 4 exist in any pytest process; only their numbers matter here.
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
        assert sdnotify.listen_fds(env) == [3, 4]
    finally:
        os.close(r)
        os.close(w)


def _recv_state(sink: socket.socket, want: str, deadline: float) -> list[str]:
    seen: list[str] = []
    while time.monotonic() < deadline:
        sink.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = sink.recv(4096).decode()
        except TimeoutError:
            break
        seen.extend(data.splitlines())
        if want in seen:
            return seen
    raise AssertionError(f"no {want} from the daemon; got {seen}")


def test_socket_activation_and_readiness(tmp_path: Path) -> None:
    """Start the daemon as systemd does: listening socket at fd 3, LISTEN_PID/FDS, NOTIFY_SOCKET."""
    sock_path = str(tmp_path / "run" / "fetchd.sock")
    os.makedirs(os.path.dirname(sock_path))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    notify_path = str(tmp_path / "notify")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(notify_path)
    fd = listener.fileno()
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, LISTEN_FDS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(CLIENT)]), FETCHD_CONFIG="/dev/null")
    env.pop("FETCHD_SOCKET", None)
    # LISTEN_PID must be the daemon's own pid: the launcher execs it as systemd does after fork.
    daemon = [sys.executable, "-m", "fetchd", "serve", "--store", str(tmp_path / "store")]
    proc = subprocess.Popen(activated(sys.executable, fd, daemon),
                            env=env, pass_fds=(fd,), stderr=subprocess.PIPE, text=True)
    listener.close()  # the daemon holds the only copy now
    try:
        try:
            states = _recv_state(sink, "READY=1", time.monotonic() + 30)
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate()[1]) from None
        assert f"MAINPID={proc.pid}" in states
        sys.path.insert(0, str(CLIENT))
        try:
            from fetchd_client import Client
        finally:
            sys.path.remove(str(CLIENT))
        status = Client(sock_path).status()
        assert status["pid"] == proc.pid
        assert status["socket"] == sock_path
        proc.send_signal(signal.SIGTERM)
        _recv_state(sink, "STOPPING=1", time.monotonic() + 30)
        assert proc.wait(30) == 0
        assert "socket activation" in (proc.stderr.read() if proc.stderr else "")
        # The socket belongs to systemd's socket unit: the daemon must not remove it.
        assert os.path.exists(sock_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sink.close()
