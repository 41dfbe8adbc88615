"""Start a process as systemd's socket activation does, for tests that run the daemon that way."""

from __future__ import annotations

from collections.abc import Sequence

# After systemd's fork: the listening socket becomes fd 3, LISTEN_FDS=1 and LISTEN_PID the
# process's own pid (the daemon ignores LISTEN_FDS otherwise), then exec the command (same pid).
LAUNCHER = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.environ['LISTEN_FDS'] = '1'\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def activated(python: str, listener_fd: int, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` (``argv[0]`` an absolute path) with the listening
    socket ``listener_fd`` passed as systemd passes it; give ``pass_fds=(listener_fd,)``."""
    return [python, "-c", LAUNCHER, str(listener_fd), *argv]
