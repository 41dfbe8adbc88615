"""Talk to a daemon's Unix socket as another user (tests that check what a peer may do).

The request runs in a child process under ``uid``/``gid``/``groups`` (needs root), so the
daemon sees that peer through ``SO_PEERCRED`` as it would see a real build. The child runs
the system's Python with the standard library only: a venv under a private directory may not
be readable by that user.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from collections.abc import Sequence
from typing import Any

NOBODY = pwd.getpwnam("nobody")
SYSTEM_PYTHON = "/usr/bin/python3"

_SCRIPT = r"""
import http.client, json, socket, sys
path, method, url, body = sys.argv[1:5]
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
conn = Conn("fetchd", timeout=120)
conn.request(method, url, body=body.encode() if body else None,
             headers={"Content-Type": "application/json"})
resp = conn.getresponse()
data = resp.read().decode()
lines = [l for l in data.splitlines() if l.strip()]
try:
    answer = json.loads(lines[-1]) if lines else None
except ValueError:
    answer = data
print(json.dumps({"status": resp.status, "answer": answer}))
"""


def can_act_as_others() -> bool:
    return os.geteuid() == 0 and os.access(SYSTEM_PYTHON, os.X_OK)


def request_as(socket_path: str, method: str, url: str, body: Any = None, *,
               uid: int = NOBODY.pw_uid, gid: int = NOBODY.pw_gid,
               groups: Sequence[int] = (), cwd: str = "/") -> tuple[int, Any]:
    """``(HTTP status, the last JSON line of the answer)`` for one request made as ``uid``."""
    if isinstance(body, _Raw):
        text = body.body.decode()
    else:
        text = "" if body is None else json.dumps(body)
    proc = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", _SCRIPT, socket_path, method, url, text],
        capture_output=True, text=True, user=uid, group=gid, extra_groups=list(groups),
        cwd=cwd, timeout=180, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    return out["status"], out["answer"]


def request_raw_as(socket_path: str, method: str, url: str, body: bytes, *,
                   uid: int = NOBODY.pw_uid, gid: int = NOBODY.pw_gid) -> tuple[int, Any]:
    """``request_as`` with a body sent byte for byte (malformed JSON included)."""
    return request_as(socket_path, method, url, _Raw(body), uid=uid, gid=gid)


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body
