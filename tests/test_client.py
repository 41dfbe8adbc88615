"""The stdlib client library: protocol handling against a scripted fake daemon, and its helpers."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import socketserver
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = ROOT / "client"
if str(CLIENT_DIR) not in sys.path:
    sys.path.append(str(CLIENT_DIR))

from fetchd_client import (  # noqa: E402
    Client,
    DaemonUnreachable,
    FetchdClientError,
    copy_atomic,
    parse_size,
    verify_file,
)

CLIENT_FILE = CLIENT_DIR / "fetchd_client" / "__init__.py"


class FakeDaemon:
    """A stdlib HTTP server on a Unix socket answering with scripted lines."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.status = 200
        self.lines: list[dict[str, Any]] = []
        # Answers in turn, one per request, before falling back to status/lines: (status,
        # lines); a fetch stream of a scripted answer may end without a result line.
        self.script: list[tuple[int, list[dict[str, Any]]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                fake.requests.append((self.command, self.path, body))
                status, lines = fake.script.pop(0) if fake.script else (fake.status, fake.lines)
                self.send_response(status)
                ndjson = self.path.endswith("/fetch") and status == 200
                self.send_header("Content-Type", "application/x-ndjson" if ndjson else "application/json")
                self.end_headers()
                if ndjson:
                    for line in lines:
                        self.wfile.write(json.dumps(line).encode() + b"\n")
                else:
                    self.wfile.write(json.dumps(lines[0] if lines else {}).encode())

            do_GET = do_POST = _answer

        self.server = socketserver.UnixStreamServer(path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeDaemon]:
    daemon = FakeDaemon(str(tmp_path / "fake.sock"))
    try:
        yield daemon
    finally:
        daemon.close()


def _archive(tmp_path: Path) -> tuple[Path, str]:
    store = tmp_path / "store-archive"
    store.write_bytes(b"archive" * 5000)
    store.chmod(0o444)
    return store, "sha256:" + hashlib.sha256(store.read_bytes()).hexdigest()


def test_fetch_sends_the_request_and_reports_events(fake: FakeDaemon, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store, digest = _archive(tmp_path)
    result = {"path": str(tmp_path / "out.zst"), "delivery": "hardlink", "store_path": str(store),
              "archive_digest": digest}
    fake.lines = [{"event": "manifest", "layers": 2}, {"event": "heartbeat"}, {"result": result}]
    os.link(store, tmp_path / "out.zst")  # what the daemon did
    events: list[dict[str, Any]] = []
    monkeypatch.chdir(tmp_path)  # dest is relative: the client makes it absolute
    got = Client(fake.path).fetch("debian:bookworm", arch="armhf", level=9, repo_tag="x:1",
                                  dest="out.zst", on_event=events.append)
    assert got == result
    assert [e["event"] for e in events] == ["manifest", "heartbeat"]
    method, path, body = fake.requests[0]
    assert (method, path) == ("POST", "/v1/fetch")
    assert body == {"reference": "debian:bookworm", "arch": "armhf", "level": 9, "repo_tag": "x:1",
                    "dest": str(tmp_path / "out.zst"), "offline": False}


def test_client_copy_is_done_by_the_client_atomically(fake: FakeDaemon, tmp_path: Path) -> None:
    store, digest = _archive(tmp_path)
    dest = tmp_path / "out" / "image.zst"
    dest.parent.mkdir()
    fake.lines = [{"result": {"path": str(dest), "delivery": "client-copy", "store_path": str(store),
                              "archive_digest": digest, "size": store.stat().st_size}}]
    got = Client(fake.path).fetch("debian", dest=str(dest))
    assert got["delivery"] == "client-copy" and got["path"] == str(dest)
    assert dest.read_bytes() == store.read_bytes()
    assert os.stat(dest).st_ino != os.stat(store).st_ino
    assert [p.name for p in dest.parent.iterdir()] == ["image.zst"]


def test_placement_invisible_here_is_copied_here(fake: FakeDaemon, tmp_path: Path) -> None:
    """The daemon linked in its own view of the filesystem (another mount namespace), so
    nothing is at ``dest`` here: the client copies the store file itself."""
    store, digest = _archive(tmp_path)
    dest = tmp_path / "image.zst"
    fake.lines = [{"result": {"path": str(dest), "delivery": "hardlink", "store_path": str(store),
                              "archive_digest": digest, "size": store.stat().st_size}}]
    got = Client(fake.path).fetch("debian", dest=str(dest))
    assert got["delivery"] == "client-copy"
    assert dest.read_bytes() == store.read_bytes()
    fake.lines = [{"result": {"path": str(dest), "delivery": "hardlink",
                              "store_path": str(tmp_path / "not-here"), "archive_digest": digest}}]
    with pytest.raises(FetchdClientError) as err:
        Client(fake.path).fetch("debian", dest=str(tmp_path / "other.zst"))
    assert err.value.code == "store-not-visible"


def test_stale_file_of_the_same_size_is_not_taken_for_the_link(fake: FakeDaemon, tmp_path: Path) -> None:
    """The daemon linked into its own private /tmp; here an old file of the same size sits there."""
    store, digest = _archive(tmp_path)
    dest = tmp_path / "image.zst"
    dest.write_bytes(b"X" * store.stat().st_size)
    fake.lines = [{"result": {"path": str(dest), "delivery": "hardlink", "store_path": str(store),
                              "archive_digest": digest, "size": store.stat().st_size}}]
    got = Client(fake.path).fetch("debian", dest=str(dest))
    assert got["delivery"] == "client-copy"
    assert dest.read_bytes() == store.read_bytes()


def test_error_line_becomes_an_exception(fake: FakeDaemon) -> None:
    fake.lines = [{"event": "manifest"}, {"error": {"code": "platform-not-found", "message": "no s390x"}}]
    with pytest.raises(FetchdClientError) as err:
        Client(fake.path).fetch("debian", arch="s390x")
    assert (err.value.code, err.value.message) == ("platform-not-found", "no s390x")


def test_stream_without_result_without_reconnecting_is_a_disconnect(fake: FakeDaemon) -> None:
    fake.lines = [{"event": "manifest"}]
    with pytest.raises(FetchdClientError) as err:
        Client(fake.path, reconnect_timeout=0).fetch("debian")
    assert err.value.code == "daemon-disconnected"
    assert len(fake.requests) == 1


def test_http_error_carries_code_and_status(fake: FakeDaemon) -> None:
    fake.status = 403
    fake.lines = [{"code": "permission-refused", "message": "refusing to write /x"}]
    with pytest.raises(FetchdClientError) as err:
        Client(fake.path).fetch("debian", dest="/x")
    assert (err.value.code, err.value.status) == ("permission-refused", 403)
    with pytest.raises(FetchdClientError) as err:
        Client(fake.path).status()
    assert err.value.message == "refusing to write /x"


def test_small_calls_use_their_paths(fake: FakeDaemon) -> None:
    fake.lines = [{"ok": True}]
    client = Client(fake.path)
    client.status()
    client.ls()
    client.health()
    client.resolve("debian:12", offline=True)
    client.gc("10G")
    client.verify()
    seen = [(m, p) for m, p, _ in fake.requests]
    assert seen == [("GET", "/v1/status"), ("GET", "/v1/images"), ("GET", "/v1/health"),
                    ("POST", "/v1/resolve"), ("POST", "/v1/gc"), ("POST", "/v1/verify")]
    assert fake.requests[3][2] == {"reference": "debian:12", "offline": True}
    assert fake.requests[4][2] == {"max_size": 10 << 30}


def test_default_socket_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FETCHD_SOCKET", "/somewhere/else.sock")
    assert Client().socket_path == "/somewhere/else.sock"
    monkeypatch.delenv("FETCHD_SOCKET")
    assert Client().socket_path == "/run/fetchd/fetchd.sock"


def test_unreachable_says_how_to_start(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnreachable) as err:
        Client(str(tmp_path / "nothing.sock")).status()
    assert err.value.code == "daemon-unreachable"
    assert str(tmp_path / "nothing.sock") in str(err.value)


@pytest.mark.parametrize("text, size", [
    ("0", 0), ("512", 512), ("10G", 10 << 30), ("10GiB", 10 << 30), ("1.5T", int(1.5 * (1 << 40))),
    ("512m", 512 << 20), ("64K", 64 << 10), ("3 GB", 3 << 30),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "10X", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(FetchdClientError, match="invalid size"):
        parse_size(text)


def test_copy_atomic_checks_the_digest(tmp_path: Path) -> None:
    store, digest = _archive(tmp_path)
    dest = tmp_path / "copy.zst"
    with pytest.raises(FetchdClientError) as err:
        copy_atomic(str(store), str(dest), "sha256:" + "1" * 64)
    assert err.value.code == "digest-mismatch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store-archive"]
    copy_atomic(str(store), str(dest), digest)
    verify_file(str(dest), digest)


def test_copy_atomic_refuses_symlink_and_missing_directory(tmp_path: Path) -> None:
    store, digest = _archive(tmp_path)
    link = tmp_path / "link.zst"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FetchdClientError, match="symlink"):
        copy_atomic(str(store), str(link), digest)
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(FetchdClientError, match="does not exist"):
        copy_atomic(str(store), str(tmp_path / "no" / "x.zst"), digest)


def test_verify_file_detects_damage(tmp_path: Path) -> None:
    store, digest = _archive(tmp_path)
    damaged = tmp_path / "damaged"
    damaged.write_bytes(store.read_bytes()[:-1] + b"X")
    with pytest.raises(FetchdClientError, match="damaged"):
        verify_file(str(damaged), digest)


def test_client_is_stdlib_only_and_python39_syntax() -> None:
    source = CLIENT_FILE.read_text()
    tree = ast.parse(source, feature_version=(3, 9))  # no match statements or other 3.10+ syntax
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    assert "fetchd" not in imported
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported - set(sys.stdlib_module_names)
    assert "from __future__ import annotations" in source  # keeps `X | None` hints lazy on 3.9
