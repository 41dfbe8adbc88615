"""The client follows a daemon that goes away mid-request: it connects again with backoff for
a bounded time, submits the same request again (pinned to the digest the daemon resolved) and
says so ("daemon restarted, resuming"). A daemon never reached is reported at once.

The daemon is the scripted fake of test_client; the client's clock and sleep are replaced, so
backoff and deadlines are checked without waiting.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fetchd_client
import pytest
from fetchd_client import Client, DaemonUnreachable, FetchdClientError
from test_client import FakeDaemon

DIGEST = "sha256:" + "ab" * 32


class Clock:
    """The client's time.monotonic and time.sleep: sleeping advances the clock at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: list[Any] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep:
            self.on_sleep.pop(0)()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(fetchd_client.time, "monotonic", c.monotonic)
    monkeypatch.setattr(fetchd_client.time, "sleep", c.sleep)
    return c


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeDaemon]:
    daemon = FakeDaemon(str(tmp_path / "fake.sock"))
    try:
        yield daemon
    finally:
        daemon.close()


def _result() -> dict[str, Any]:
    return {"result": {"path": "/store/x", "delivery": "store", "store_path": "/store/x",
                       "archive_digest": "sha256:" + "0" * 64, "size": 1}}


def test_a_stream_cut_before_its_result_is_submitted_again_pinned_to_the_resolved_digest(
        fake: FakeDaemon, clock: Clock) -> None:
    fake.script = [(200, [{"event": "resolved", "digest": DIGEST}, {"event": "progress", "bytes": 5}]),
                   (200, [{"event": "resolved", "digest": DIGEST}, _result()])]
    events: list[dict[str, Any]] = []
    got = Client(fake.path).fetch("debian:bookworm", arch="armhf", repo_tag="x:1",
                                  on_event=events.append)
    assert got["archive_digest"] == "sha256:" + "0" * 64
    first, second = (body for _, _, body in fake.requests)
    assert "digest" not in first
    assert second == dict(first, digest=DIGEST)  # the same request, the tag pinned
    kinds = [(e["event"], e.get("state")) for e in events]
    assert kinds == [("resolved", None), ("progress", None), ("reconnect", "lost"),
                     ("reconnect", "resumed"), ("resolved", None)]
    assert events[3]["message"] == "daemon restarted, resuming"
    assert "went away" in events[2]["message"] and "120 s" in events[2]["message"]


@pytest.mark.parametrize("answer", [
    (200, [{"event": "manifest"}, {"error": {"code": "shutting-down", "message": "stopped; retry"}}]),
    (503, [{"code": "shutting-down", "message": "fetchd is shutting down; retry when it is back"}]),
])
def test_a_daemon_saying_it_is_stopping_gets_the_request_again(
        fake: FakeDaemon, clock: Clock, answer: tuple[int, list[dict[str, Any]]]) -> None:
    fake.script = [answer, (200, [_result()])]
    assert Client(fake.path).fetch("debian")["size"] == 1
    assert len(fake.requests) == 2


def test_a_missing_socket_and_refused_connections_are_waited_for_with_backoff(
        tmp_path: Path, clock: Clock) -> None:
    path = str(tmp_path / "d.sock")
    daemons = [FakeDaemon(path)]
    daemons[0].script = [(200, [{"event": "manifest"}])]  # then it goes away

    def stop() -> None:  # the daemon exits and removes its socket
        daemons[0].close()
        os.unlink(path)

    def start() -> None:  # the next daemon binds the socket again
        daemons.append(FakeDaemon(path))
        daemons[-1].script = [(200, [_result()])]

    events: list[dict[str, Any]] = []
    clock.on_sleep = [stop, lambda: None, lambda: None, lambda: None, start]
    try:
        Client(path).fetch("debian", on_event=events.append)
    finally:
        for d in daemons:
            d.close()
    assert clock.sleeps[:5] == [0.05, 0.1, 0.2, 0.4, 0.8]  # doubling backoff
    assert [e.get("state") for e in events if e["event"] == "reconnect"] == ["lost", "resumed"]
    assert len(daemons[1].requests) == 1


def test_a_daemon_that_does_not_come_back_fails_after_the_reconnect_timeout(
        fake: FakeDaemon, clock: Clock, tmp_path: Path) -> None:
    fake.script = [(200, [{"event": "manifest"}])]
    clock.on_sleep = [fake.close]
    start = clock.now
    with pytest.raises(FetchdClientError) as err:
        Client(fake.path, reconnect_timeout=30).fetch("debian")
    assert err.value.code == "daemon-unreachable"
    assert "did not come back within 30 s" in err.value.message
    assert 30 <= clock.now - start <= 30 + 2.0  # the window, not a step more than the cap
    assert max(clock.sleeps) <= 2.0


def test_a_daemon_never_reached_is_reported_at_once(tmp_path: Path, clock: Clock) -> None:
    with pytest.raises(DaemonUnreachable):
        Client(str(tmp_path / "none.sock")).fetch("debian")
    with pytest.raises(DaemonUnreachable):
        Client(str(tmp_path / "none.sock")).resolve("debian")
    assert clock.sleeps == []


def test_a_daemon_crashing_on_every_submission_fails_the_call(fake: FakeDaemon, clock: Clock) -> None:
    fake.script = [(200, [{"event": "manifest"}])] * 50
    with pytest.raises(FetchdClientError, match="went away 11 times"):
        Client(fake.path).fetch("debian")
    assert len(fake.requests) == fetchd_client.MAX_RESUBMITS + 1


def test_resolve_and_deliver_are_sent_again_after_a_stop(fake: FakeDaemon, clock: Clock,
                                                         tmp_path: Path) -> None:
    fake.script = [(503, [{"code": "shutting-down", "message": "stopping"}]),
                   (200, [{"digest": DIGEST, "media_type": "x", "cached": False}])]
    assert Client(fake.path).resolve("debian:12")["digest"] == DIGEST
    assert [p for _, p, _ in fake.requests] == ["/v1/resolve", "/v1/resolve"]


def test_reconnect_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FETCHD_RECONNECT_TIMEOUT", "7.5")
    assert Client(str(tmp_path / "s")).reconnect_timeout == 7.5
    assert Client(str(tmp_path / "s"), reconnect_timeout=3).reconnect_timeout == 3
    monkeypatch.setenv("FETCHD_RECONNECT_TIMEOUT", "soon")
    with pytest.raises(FetchdClientError, match="FETCHD_RECONNECT_TIMEOUT='soon'"):
        Client(str(tmp_path / "s"))
    monkeypatch.delenv("FETCHD_RECONNECT_TIMEOUT")
    assert Client(str(tmp_path / "s")).reconnect_timeout == fetchd_client.RECONNECT_TIMEOUT == 120
