"""The two pieces of the systemd protocol the daemon uses, without libsystemd.

* Socket activation (sd_listen_fds(3)): systemd passes listening sockets from fd 3 on and sets
  ``LISTEN_PID`` to our pid and ``LISTEN_FDS`` to their count. The variables are removed after
  reading so that child processes do not believe the sockets are theirs.
* Readiness (sd_notify(3)): one datagram such as ``READY=1`` to the Unix socket named by
  ``$NOTIFY_SOCKET``; a leading ``@`` names an abstract socket.

Both are no-ops outside systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

SD_LISTEN_FDS_START = 3


def listen_fds(environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> list[int]:
    """File descriptors passed by socket activation for this process (empty when none)."""
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(n, 0)))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def notify(state: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; True when a notify socket took it."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError:
        # Readiness is advisory: a vanished notify socket must not stop the daemon.
        return False
    return True
