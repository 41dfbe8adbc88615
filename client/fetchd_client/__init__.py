"""Client of the fetchd daemon: HTTP/1.1 over its Unix socket, standard library only.

Works on Python >= 3.9 and imports nothing from ``fetchd``, so that BitBake fetchers and
scripts can use it as they are. Every failure is a ``FetchdClientError`` with a stable
``code`` (the daemon's codes, plus this side's: ``daemon-unreachable``, ``permission-refused``,
``timeout``, ``daemon-disconnected``, ``protocol``, ``store-not-visible``, ``digest-mismatch``,
``io-error``, ``invalid-request``; docs/API.md) and a message that says what to do.

A daemon that goes away during a request (a restart, an upgrade, a crash followed by
systemd's restart) is waited for: a refused or reset connection, a missing socket, a stream
that ends without its final line, or the daemon's ``shutting-down`` answer make ``fetch``,
``resolve`` and ``deliver`` connect again with backoff, for up to ``reconnect_timeout``
seconds (``$FETCHD_RECONNECT_TIMEOUT``, default 120; 0 turns it off), and submit the same
request again; the new daemon resumes from the store's partial downloads. A fetch that
already saw the daemon resolve the tag pins that digest (request field ``digest``), so the
answer is what the first submission would have given. A daemon never reached at all is
reported at once (``daemon-unreachable``).

Example::

    from fetchd_client import Client
    result = Client().fetch("debian:bookworm", arch="armhf", dest="/abs/path/debian.zst")
    result["path"], result["delivery"], result["archive_digest"]
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "DEFAULT_SOCKET",
    "Client",
    "DaemonUnreachable",
    "FetchdClientError",
    "copy_atomic",
    "parse_size",
    "socket_path_default",
    "verify_file",
]

DEFAULT_SOCKET = "/run/fetchd/fetchd.sock"
API = "/v1"
# Seconds without a line from the daemon before a fetch is given up. The daemon sends a
# heartbeat event every few seconds while a job runs, so this only trips on a hung daemon.
FETCH_IDLE_TIMEOUT = 300.0
CONNECT_TIMEOUT = 10.0
# Seconds to wait for a daemon that went away mid-request (restart, upgrade, crash) before
# giving up; $FETCHD_RECONNECT_TIMEOUT overrides it, 0 turns reconnecting off.
RECONNECT_TIMEOUT = 120.0
RECONNECT_ENV = "FETCHD_RECONNECT_TIMEOUT"
_BACKOFF_FIRST, _BACKOFF_CAP = 0.05, 2.0
# Times one call follows a daemon that took the request and went away again: a daemon that
# crashes on every submission fails the call instead of looping.
MAX_RESUBMITS = 10
_CHUNK = 1 << 20
# Answers that mean "this daemon is going away": connect again and submit again.
_GONE_CODES = frozenset({"daemon-unreachable", "daemon-disconnected", "shutting-down"})
RESUMED_MESSAGE = "daemon restarted, resuming"

Event = dict[str, Any]


class FetchdClientError(Exception):
    """An error reported by the daemon or found by the client; ``code`` is stable."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class DaemonUnreachable(FetchdClientError):
    """Nothing answers on the socket (daemon not running, wrong path)."""

    def __init__(self, socket_path: str, reason: str) -> None:
        super().__init__(
            "daemon-unreachable",
            f"cannot reach the fetchd daemon at {socket_path} ({reason}): start it with "
            "'systemctl start fetchd.socket' or 'fetchd serve', or set FETCHD_SOCKET to its socket",
        )
        self.socket_path = socket_path


def socket_path_default() -> str:
    return os.environ.get("FETCHD_SOCKET") or DEFAULT_SOCKET


def reconnect_timeout_default() -> float:
    """``$FETCHD_RECONNECT_TIMEOUT`` (seconds, >= 0) or ``RECONNECT_TIMEOUT``."""
    text = os.environ.get(RECONNECT_ENV, "").strip()
    if not text:
        return RECONNECT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise FetchdClientError(
            "invalid-request", f"{RECONNECT_ENV}={text!r} is not a number of seconds >= 0: fix or unset it"
        )
    return value


class _Gone(FetchdClientError):
    """The daemon went away mid-request (or said it is stopping): worth submitting again."""


class _Reconnect:
    """Backoff until a deadline for one call; tells ``on_event`` what happens.

    Invariant: ``again(error)`` returns only while the deadline has not passed and fewer than
    ``MAX_RESUBMITS`` losses were followed (after sleeping the next backoff step); otherwise it
    raises ``error``, or a ``daemon-unreachable`` error saying how long it waited. Each loss
    gets its own window: ``answered`` (a daemon took the request again) starts the next.
    """

    def __init__(self, client: Client, on_event: Callable[[Event], None] | None) -> None:
        self.client = client
        self.on_event = on_event
        self.timeout = client.reconnect_timeout
        self.deadline: float | None = None
        self.delay = _BACKOFF_FIRST
        self.lost = False
        self.losses = 0

    def again(self, error: FetchdClientError) -> None:
        now = time.monotonic()
        if self.deadline is None:
            if self.timeout <= 0:
                raise error
            if self.losses >= MAX_RESUBMITS:
                raise FetchdClientError(error.code, f"{error.message} (the daemon went away "
                                        f"{self.losses + 1} times during this request; see its log)")
            self.losses += 1
            self.deadline = now + self.timeout
            self.lost = True
            self._tell({"event": "reconnect", "state": "lost", "message": (
                f"the fetchd daemon went away ({error.message}); reconnecting for up to "
                f"{self.timeout:.0f} s")})
        if now >= self.deadline:
            if error.code == "daemon-unreachable" or error.code not in _GONE_CODES:
                raise FetchdClientError(
                    "daemon-unreachable",
                    f"the fetchd daemon at {self.client.socket_path} went away and did not come back "
                    f"within {self.timeout:.0f} s (last: {error.message}); check 'systemctl status "
                    f"fetchd' or its log, then retry",
                ) from None
            raise error
        time.sleep(min(self.delay, max(0.0, self.deadline - now)))
        self.delay = min(self.delay * 2, _BACKOFF_CAP)

    def answered(self) -> None:
        """A daemon took the request again after a loss: say so, once per loss."""
        if self.lost:
            self.lost = False
            self.deadline = None
            self.delay = _BACKOFF_FIRST
            self._tell({"event": "reconnect", "state": "resumed", "message": RESUMED_MESSAGE})

    def _tell(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        self.sock = sock


class Client:
    """One daemon, one socket path. Each call opens its own connection (thread-safe).

    ``reconnect_timeout``: seconds to wait for a daemon that went away mid-request (default
    ``$FETCHD_RECONNECT_TIMEOUT`` or 120; 0: fail at once, as ``daemon-disconnected``).
    """

    def __init__(self, socket_path: str | None = None, timeout: float | None = 600.0,
                 reconnect_timeout: float | None = None) -> None:
        self.socket_path = socket_path or socket_path_default()
        self.timeout = timeout
        self.reconnect_timeout = (reconnect_timeout_default() if reconnect_timeout is None
                                  else max(0.0, reconnect_timeout))

    # -- the API -------------------------------------------------------------------------

    def fetch(
        self,
        reference: str,
        *,
        platform: str | None = None,
        arch: str | None = None,
        level: int = 3,
        repo_tag: str | None = None,
        dest: str | None = None,
        offline: bool = False,
        on_event: Callable[[Event], None] | None = None,
    ) -> Event:
        """Ask for one platform of an image as a zstd docker-archive, placed at ``dest``.

        Progress events go to ``on_event`` as they arrive. Returns the result dict (path,
        delivery, store_path, reference, platform, index_digest, manifest_digest,
        archive_digest, size, level, repo_tag). When the daemon may not write ``dest``
        (delivery ``client-copy``) this copies the store file itself, atomically, checking
        its digest. A relative ``dest`` is taken relative to this process' directory.

        When the daemon goes away before the result, the request is submitted again (see the
        module docstring); ``on_event`` then gets ``{"event": "reconnect", "state": "lost" |
        "resumed", "message": ...}`` (``"daemon restarted, resuming"``), and the new stream's
        events, which start again from the beginning.
        """
        body: Event = {"reference": reference, "level": level, "offline": offline}
        if platform is not None:
            body["platform"] = platform
        if arch is not None:
            body["arch"] = arch
        if repo_tag is not None:
            body["repo_tag"] = repo_tag
        if dest is not None:
            dest = os.path.abspath(dest)
            body["dest"] = dest
        retry = _Reconnect(self, on_event)
        reached = False
        while True:
            try:
                result: Event | None = None
                for line in self._stream("POST", API + "/fetch", body):
                    reached = True
                    retry.answered()
                    if "result" in line:
                        result = line["result"]
                    elif "error" in line:
                        error = _error_of(line["error"], None)
                        raise _Gone(error.code, error.message) if error.code in _GONE_CODES else error
                    else:
                        if line.get("event") == "resolved" and isinstance(line.get("digest"), str):
                            # Pinned from now on: a resubmission gets what this one would have.
                            body.setdefault("digest", line["digest"])
                        if on_event is not None:
                            on_event(line)
                if not isinstance(result, dict):
                    raise _Gone("daemon-disconnected",
                                "the daemon closed the stream before sending a result")
                return self._finish_delivery(result, dest)
            except FetchdClientError as e:
                if not _went_away(e, reached):
                    raise _plain(e) from None
                reached = True
                retry.again(_plain(e))

    def resolve(self, reference: str, *, offline: bool = False, max_age: int | None = None) -> Event:
        """Tag -> digest: ``{"digest", "media_type", "cached"}``.

        ``max_age`` (seconds) bounds how old a tag-cache answer may be; 0 asks the registry.
        """
        body: Event = {"reference": reference, "offline": offline}
        if max_age is not None:
            body["max_age"] = max_age
        return self._again("POST", API + "/resolve", body)

    def deliver(self, archive_digest: str, dest: str) -> Event:
        """Place an archive the daemon already has at ``dest`` (hard link when possible)."""
        dest = os.path.abspath(dest)
        result = self._again("POST", API + "/deliver", {"archive_digest": archive_digest, "dest": dest})
        return self._finish_delivery(result, dest)

    def status(self, lag_window: float | None = None) -> Event:
        """The daemon's status; ``lag_window``: its ``loop_lag`` over only the last that
        many seconds (e.g. the length of a step a tool measures)."""
        if lag_window is None:
            return self._json("GET", API + "/status")
        return self._json("GET", API + f"/status?lag_window={float(lag_window):g}")

    def ls(self) -> Event:
        return self._json("GET", API + "/images")

    def gc(self, max_size: int | str | None = None) -> Event:
        body: Event = {}
        if max_size is not None:
            body["max_size"] = parse_size(max_size) if isinstance(max_size, str) else max_size
        return self._json("POST", API + "/gc", body, timeout=None)

    def verify(self) -> Event:
        return self._json("POST", API + "/verify", {}, timeout=None)

    def health(self) -> Event:
        return self._json("GET", API + "/health")

    # -- plumbing ------------------------------------------------------------------------

    def _again(self, method: str, path: str, body: Event) -> Event:
        """``_json`` for a request that is the same when sent twice, sent again when the daemon
        went away mid-request (a daemon never reached is reported at once)."""
        retry = _Reconnect(self, None)
        reached = False
        while True:
            try:
                answer = self._json(method, path, body)
            except FetchdClientError as e:
                if not _went_away(e, reached):
                    raise
                reached = True
                retry.again(e)
                continue
            return answer

    def _finish_delivery(self, result: Event, dest: str | None) -> Event:
        """Make sure ``dest`` holds the archive as this process sees the filesystem.

        The daemon may see another filesystem than this process (a build in a container with
        its own mounts, the daemon under ``PrivateTmp``): when its placement is not visible
        here, or it said ``client-copy``, copy the store file here, atomically and verified.
        """
        if dest is None:
            return result
        if result.get("delivery") != "client-copy" and _placed_here(dest, result):
            return result
        store_path = result.get("store_path")
        if not isinstance(store_path, str):
            raise FetchdClientError("protocol", "the daemon's result names no store_path")
        if not os.path.exists(store_path):
            raise FetchdClientError(
                "store-not-visible",
                f"the daemon placed the archive where this process cannot see it, and its store "
                f"file {store_path} is not visible here either: run the build where the "
                "daemon's store is mounted at the same path",
            )
        digest = result.get("archive_digest")
        copy_atomic(store_path, dest, digest if isinstance(digest, str) else None)
        return dict(result, path=dest, delivery="client-copy")

    def _request(
        self, method: str, path: str, body: Event | None, timeout: float | None
    ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        conn = _UnixConnection(self.socket_path, timeout)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Host": "fetchd", "Accept": "application/json, application/x-ndjson"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            return conn, conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            conn.close()
            raise DaemonUnreachable(self.socket_path, e.strerror or type(e).__name__) from None
        except PermissionError:
            conn.close()
            raise FetchdClientError(
                "permission-refused",
                f"not allowed to connect to {self.socket_path}: add your user to the group that "
                "owns the socket (usually 'fetchd'), then log in again",
            ) from None
        except socket.timeout:  # noqa: UP041 - not TimeoutError on Python 3.9
            conn.close()
            raise FetchdClientError(
                "timeout", f"the fetchd daemon at {self.socket_path} did not answer in time"
            ) from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            conn.close()
            raise FetchdClientError(
                "daemon-disconnected",
                f"the fetchd daemon at {self.socket_path} closed the connection: {e}; see its log",
            ) from None

    def _json(
        self, method: str, path: str, body: Event | None = None, timeout: float | None = -1.0
    ) -> Event:
        conn, resp = self._request(method, path, body, self.timeout if timeout == -1.0 else timeout)
        try:
            raw = resp.read()
        finally:
            conn.close()
        try:
            obj = json.loads(raw) if raw else {}
        except ValueError:
            raise FetchdClientError(
                "protocol", f"the daemon answered {resp.status} with something that is not JSON"
            ) from None
        if resp.status >= 400:
            raise _error_of(obj, resp.status)
        if not isinstance(obj, dict):
            raise FetchdClientError("protocol", "the daemon answered with a non-object")
        return obj

    def _stream(self, method: str, path: str, body: Event) -> Iterator[Event]:
        conn, resp = self._request(method, path, body, FETCH_IDLE_TIMEOUT)
        try:
            if resp.status >= 400:
                raw = resp.read()
                try:
                    obj = json.loads(raw)
                except ValueError:
                    obj = {"code": "protocol", "message": raw.decode(errors="replace")[:500]}
                raise _error_of(obj, resp.status)
            while True:
                try:
                    line = resp.readline()
                except socket.timeout:  # noqa: UP041 - not TimeoutError on Python 3.9
                    raise FetchdClientError(
                        "timeout", f"no word from the daemon for {FETCH_IDLE_TIMEOUT:.0f}s"
                    ) from None
                except (ConnectionError, http.client.HTTPException, OSError) as e:
                    raise FetchdClientError(
                        "daemon-disconnected", f"the fetchd daemon went away mid-request: {e}"
                    ) from None
                if not line:
                    return
                if not line.endswith(b"\n"):  # cut off mid-line: the daemon went away
                    raise FetchdClientError(
                        "daemon-disconnected", "the fetchd daemon went away mid-request (stream cut mid-line)"
                    )
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise FetchdClientError("protocol", "the daemon sent a line that is not JSON") from None
                if isinstance(obj, dict):
                    yield obj
        finally:
            conn.close()


def _went_away(error: FetchdClientError, reached: bool) -> bool:
    """Whether ``error`` means a daemon went away mid-request (worth connecting again). A daemon
    never reached is not there at all: that is said at once, not waited for."""
    return error.code in _GONE_CODES and (reached or not isinstance(error, DaemonUnreachable))


def _plain(error: FetchdClientError) -> FetchdClientError:
    """The error a caller sees: never the private ``_Gone``."""
    if type(error) is _Gone:
        return FetchdClientError(error.code, error.message, error.status)
    return error


def _placed_here(path: str, result: Event) -> bool:
    """Whether ``path``, as this process sees it, is what the daemon placed.

    A hard link must be the store file itself whenever the store is visible here: a file of
    the same size left over from an earlier run (the daemon linked into its own private
    ``/tmp``, say) is not it. Otherwise the size must match.
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    store_path = result.get("store_path")
    if result.get("delivery") == "hardlink" and isinstance(store_path, str):
        try:
            store = os.stat(store_path)
        except OSError:
            pass
        else:
            return (st.st_dev, st.st_ino) == (store.st_dev, store.st_ino)
    size = result.get("size")
    return not isinstance(size, int) or st.st_size == size


def _error_of(obj: Any, status: int | None) -> FetchdClientError:
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        obj = obj["error"]
    if isinstance(obj, dict) and isinstance(obj.get("message"), str):
        return FetchdClientError(str(obj.get("code") or "error"), obj["message"], status)
    return FetchdClientError("protocol", f"the daemon answered {status} without an error message", status)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"10G"`` -> bytes (binary units; ``10GiB``, ``512M``, ``1.5T`` and plain bytes work)."""
    m = _SIZE.match(text)
    if not m:
        raise FetchdClientError(
            "invalid-request", f"invalid size {text!r}: give bytes or a number with K, M, G or T"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def verify_file(path: str, digest: str) -> None:
    """Raise ``FetchdClientError("digest-mismatch")`` unless the file at ``path`` hashes to ``digest``."""
    algorithm, _, want = digest.partition(":")
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    if h.hexdigest() != want:
        raise FetchdClientError(
            "digest-mismatch", f"{path} does not match {digest}: it is damaged; fetch it again"
        )


def copy_atomic(source: str, dest: str, digest: str | None = None) -> None:
    """Copy ``source`` to ``dest`` under a temporary name, check ``digest``, then rename.

    ``dest`` is either absent or replaced whole; a symlink at ``dest`` is refused.
    """
    if os.path.islink(dest):
        raise FetchdClientError(
            "permission-refused", f"refusing to write {dest}: a symlink is there; remove it first"
        )
    directory, name = os.path.split(dest)
    if not os.path.isdir(directory):
        raise FetchdClientError(
            "invalid-request", f"destination directory {directory} does not exist: create it first"
        )
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.fetchd-tmp")
    algorithm = digest.partition(":")[0] if digest else "sha256"
    h = hashlib.new(algorithm)
    try:
        with open(source, "rb") as src, open(tmp, "xb") as out:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest and f"{algorithm}:{h.hexdigest()}" != digest:
            raise FetchdClientError(
                "digest-mismatch", f"the store file {source} does not match {digest}: run 'fetchd verify'"
            )
        os.rename(tmp, dest)
    except OSError as e:
        raise FetchdClientError(
            "permission-refused" if isinstance(e, PermissionError) else "io-error",
            f"cannot copy {source} to {dest}: {e.strerror or e}",
        ) from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
