"""Drive a real fetchd daemon for the benchmarks: start, fetch (one or many at once), stop.

The daemon runs as ``python -m fetchd serve --socket S --store D`` in its own process with a
fresh store; requests go through the stdlib client (``client/fetchd_client``) from threads of
the harness, so N concurrent requests cost N blocking sockets, not N interpreters.

Invariant: after ``stop()`` the daemon process is gone (SIGTERM, then SIGKILL after 10 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "client") not in sys.path:
    sys.path.insert(0, str(REPO / "client"))

from fetchd_client import Client, FetchdClientError  # noqa: E402


class DaemonError(RuntimeError):
    """The daemon did not start or a fetch failed; the message has the daemon's log tail."""


@dataclass(frozen=True)
class FetchSpec:
    """One request: ``reference`` (``host:port/repo:tag``), OCI ``platform``, zstd ``level``."""

    reference: str
    platform: str
    dest: Path
    level: int = 3
    repo_tag: str | None = None


class Daemon:
    """One fetchd daemon with its own store and socket under ``workdir``."""

    def __init__(self, workdir: Path, *, config_text: str | None = None,
                 start_timeout: float = 30.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.socket = workdir / "fetchd.sock"
        self.store = workdir / "store"
        self.log_path = workdir / "daemon.log"
        # always a config file of its own: never the host's /etc/fetchd/config.toml
        cfg = workdir / "config.toml"
        cfg.write_text(config_text or "")
        argv = [sys.executable, "-m", "fetchd", "serve", "--socket", str(self.socket),
                "--store", str(self.store), "--log-level", "warning", "--config", str(cfg)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env.pop("FETCHD_CONFIG", None)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        started = time.perf_counter()
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.client = Client(str(self.socket), timeout=900.0)
        try:
            self._wait_ready(start_timeout)
            # seconds from the start of the process to its first answer (polled every 20 ms)
            self.ready_s = time.perf_counter() - started
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise DaemonError(f"fetchd serve exited with {self.proc.returncode}: {self.log_tail()}")
            if self.socket.exists():
                try:
                    self.client.health()
                    return
                except (FetchdClientError, OSError) as e:
                    last = e
            time.sleep(0.02)
        raise DaemonError(f"fetchd did not answer on {self.socket} within {timeout}s ({last}): "
                          f"{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            self._log.flush()
            return self.log_path.read_text(errors="replace")[-n:]
        except (OSError, ValueError):
            return ""

    def fetch(self, spec: FetchSpec) -> dict[str, Any]:
        """One request; the result dict gets ``_phases``: seconds from the request to the
        first and last time each progress event kind was seen (``layer:done``,
        ``pack:start``, ...), which shows where the time went."""
        spec.dest.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        phases: dict[str, list[float]] = {}

        def on_event(event: dict[str, Any]) -> None:
            kind = f"{event.get('event', '?')}:{event.get('state', '')}"
            if kind.startswith(("progress", "heartbeat")) or kind == "pack:layer-progress":
                return
            t = round(time.perf_counter() - start, 4)
            phases.setdefault(kind, [t, t])[1] = t

        try:
            result: dict[str, Any] = self.client.fetch(
                spec.reference, platform=spec.platform, level=spec.level, repo_tag=spec.repo_tag,
                dest=str(spec.dest), on_event=on_event)
            result["_phases"] = phases
            result["_seconds"] = round(time.perf_counter() - start, 4)
            return result
        except FetchdClientError as e:
            raise DaemonError(f"fetch {spec.reference} {spec.platform} level {spec.level}: "
                              f"[{e.code}] {e}\n{self.log_tail()}") from e

    def fetch_many(self, specs: Sequence[FetchSpec]) -> list[dict[str, Any]]:
        """All at once, one thread each; returns in the order of ``specs``."""
        if len(specs) == 1:
            return [self.fetch(specs[0])]
        with ThreadPoolExecutor(max_workers=len(specs)) as pool:
            return list(pool.map(self.fetch, specs))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
