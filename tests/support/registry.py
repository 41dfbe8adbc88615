"""Run Debian's ``docker-registry`` (distribution 2.8) as a subprocess on loopback.

Invariant: when ``LocalRegistry(...)`` returns, ``GET /v2/`` answers 200 at ``.url``;
after ``stop()`` the process is gone and its temporary storage removed (unless the
caller passed its own ``root``).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

REGISTRY_BINARY = "/usr/bin/docker-registry"


class RegistryError(RuntimeError):
    """The test registry could not be started or did not answer."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the registry binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even by SIGKILL (atexit never runs
    then). Only for children of the main thread: the signal follows the forking thread's exit."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _config_yaml(root: Path, addr: str, proxy_remote: str | None,
                 htpasswd: Path | None = None) -> str:
    # YAML written by hand: the structure is tiny and fixed, and PyYAML is not a dependency.
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {root}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: {addr}",
        # A fixed secret only silences the "random secret" warning; nothing here is secret.
        "  secret: fetchd-test-registry",
        "  headers:",
        "    X-Content-Type-Options: [nosniff]",
    ]
    if proxy_remote:
        lines += ["proxy:", f"  remoteurl: {proxy_remote}"]
    if htpasswd is not None:  # basic auth (distribution allows it on plain HTTP, with a warning)
        lines += ["auth:", "  htpasswd:", "    realm: fetchd-test", f"    path: {htpasswd}"]
    return "\n".join(lines) + "\n"


class LocalRegistry:
    """A ``docker-registry`` process on ``127.0.0.1:<free port>`` with its own storage.

    ``proxy_remote`` turns it into a pull-through cache of that registry URL
    (read-only for pushes, as distribution's proxy mode is). The remote must be
    up when this starts: distribution pings it at start-up and exits otherwise.
    ``htpasswd`` (``user:bcrypt-hash`` lines) requires basic auth for every request.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        proxy_remote: str | None = None,
        binary: str = REGISTRY_BINARY,
        start_timeout: float = 20.0,
        htpasswd: str | None = None,
    ) -> None:
        if not os.path.exists(binary):
            raise RegistryError(f"{binary} not found: run scripts/setup.sh (apt package docker-registry)")
        self._tmp = Path(tempfile.mkdtemp(prefix="fetchd-registry-"))
        self._own_root = root is None
        self.root = root if root is not None else self._tmp / "storage"
        self.root.mkdir(parents=True, exist_ok=True)
        self.proxy_remote = proxy_remote
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.config_path = self._tmp / "config.yml"
        self.auth = htpasswd is not None
        users = None
        if htpasswd is not None:
            users = self._tmp / "htpasswd"
            users.write_text(htpasswd)
        self.config_path.write_text(_config_yaml(self.root, self.host, proxy_remote, users))
        self.log_path = self._tmp / "registry.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own process group: a Ctrl-C on pytest must not kill it before we stop it cleanly.
            start_new_session=True,
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
        )
        # Backstop for interrupted sessions; stop() is idempotent.
        atexit.register(self.stop)
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RegistryError(
                    f"docker-registry exited with {self._proc.returncode}: {self.log_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                if e.code == 401 and self.auth:  # up, and asking for the credentials
                    return
                last = e
            except (urllib.error.URLError, OSError) as e:
                last = e
            time.sleep(0.02)
        raise RegistryError(f"docker-registry at {self.url} did not answer /v2/ within {timeout}s: {last}")

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 5 s) and remove temp storage."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if not self._log.closed:
            self._log.close()
        if self._own_root or not self.root.is_relative_to(self._tmp):
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalRegistry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalRegistry({self.url}, root={self.root})"
