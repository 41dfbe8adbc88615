"""Peak resident memory of a running process (the fetchd daemon), per measured step.

Two sources, the larger wins:
- ``VmHWM`` from ``/proc/PID/status``, the kernel's exact peak. It is reset at the start of
  each step by writing ``5`` to ``/proc/PID/clear_refs`` (Linux >= 4.0, needs ownership of
  the process); when that fails, VmHWM is the peak since the daemon started.
- ``VmRSS`` polled every ``interval`` seconds from a thread, summed over the process and its
  descendants (a worker process pool would otherwise hide its memory), which also catches the
  peak where the reset is refused, to within the polling period.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (from /proc/PID/task/TID/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def tree_rss_kb(pid: int) -> int:
    return sum(_status_kb(p, "VmRSS") for p in [pid, *descendants(pid)])


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (all its threads) and of its reaped children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the ")": state=0, ..., utime=11, stime=12, cutime=13, cstime=14
    return sum(int(x) for x in fields[11:15]) / _TICK


def reset_peak(pid: int) -> bool:
    """Reset the kernel's VmHWM of ``pid``; False when not allowed or not supported."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """``with PeakRss(pid) as p: ...``; then ``p.peak_kb`` is the peak during the block."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.reset_ok = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kb = max(self.peak_kb, tree_rss_kb(self.pid))

    def __enter__(self) -> PeakRss:
        self.reset_ok = reset_peak(self.pid)
        self.peak_kb = tree_rss_kb(self.pid)
        self._thread = threading.Thread(target=self._poll, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmHWM") if self.reset_ok else 0,
                           tree_rss_kb(self.pid))
