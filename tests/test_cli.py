"""The ``fetchd`` command as a user runs it: exit codes, one-line errors, output, progress bars."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from support.images import Catalog

from fetchd.cli import Progress, main

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "client")]))
ENV.pop("FETCHD_SOCKET", None)


def fetchd(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fetchd", *argv], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fetchd: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, registry: object) -> Iterator[str]:
    base = tmp_path_factory.mktemp("cli-daemon")
    sock = str(base / "fetchd.sock")
    (base / "config.toml").write_text("")
    log = open(base / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "fetchd", "serve", "--socket", sock, "--store", str(base / "store"),
         "--config", str(base / "config.toml")],
        env=ENV, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while fetchd("status", "--socket", sock).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (base / "daemon.log").read_text()
            time.sleep(0.1)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()


def test_usage_errors_exit_2() -> None:
    assert fetchd().returncode == 2
    no_output = fetchd("pull", "debian")
    assert no_output.returncode == 2 and "-o/--output" in no_output.stderr
    both = fetchd("pull", "debian", "--arch", "armhf", "--platform", "linux/arm/v7", "-o", "/tmp/x")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_serve_caps_malloc_arenas_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    # glibc (Debian): applied; an explicit MALLOC_ARENA_MAX is the user's and wins
    from fetchd.cli import limit_malloc_arenas

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


@pytest.mark.parametrize("seconds,text", [(75, "1:15"), (3 * 3600 + 125, "3 h 02 min"),
                                          (3 * 86400 + 5 * 3600, "3 d 5 h")])
def test_durations_stay_readable_past_an_hour(seconds: float, text: str) -> None:
    from fetchd.cli import _duration

    assert _duration(seconds) == text


def test_version() -> None:
    proc = fetchd("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("fetchd ")


def test_daemon_not_running_is_one_clear_line(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    for argv in (["status"], ["ls"], ["pull", "debian", "-o", str(tmp_path / "x.zst")]):
        proc = fetchd(*argv, "--socket", sock)
        assert proc.returncode == 3
        line = _one_error_line(proc)
        assert sock in line and "fetchd serve" in line and "systemctl start fetchd.socket" in line


def test_serve_refuses_a_socket_another_daemon_answers_on(daemon: str) -> None:
    proc = fetchd("serve", "--socket", daemon, "--store", "/nonexistent-store-never-used")
    assert proc.returncode == 1
    assert "another fetchd already answers" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.registry
def test_pull_writes_a_verified_archive(daemon: str, images: Catalog, tmp_path: Path) -> None:
    out = tmp_path / "multi.zst"
    proc = fetchd("pull", images["multi-docker"].reference, "--arch", "arm64", "--zstd-level", "5",
                  "--tag", "example/name:1.0", "-o", str(out), "--socket", daemon)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # quiet when stderr is not a terminal
    assert str(out) in proc.stdout and "linux/arm64" in proc.stdout and "(hardlink)" in proc.stdout
    assert "docker.io/example/name:1.0" in proc.stdout
    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(out.read_bytes()),
                                                      read_across_frames=True).read()
    assert b'"RepoTags":["docker.io/example/name:1.0"]' in data
    # A relative -o is the caller's directory, not the daemon's.
    rel = subprocess.run([sys.executable, "-m", "fetchd", "pull", images["multi-docker"].reference,
                          "--arch", "arm64", "-o", "rel.zst", "--socket", daemon],
                         env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rel.returncode == 0, rel.stderr
    assert (tmp_path / "rel.zst").is_file()


@pytest.mark.registry
@pytest.mark.parametrize("argv, words", [
    (["{host}/no/such-image:1"], "no/such-image"),
    (["{multi}", "--arch", "s390x"], "s390x"),
    (["{multi}", "--platform", "linux/"], "invalid platform"),
    (["{multi}", "--arch", "sparc"], "unknown Debian architecture"),
    (["{host}/never/fetched:1", "--offline"], "network access is disabled"),
    (["{multi}", "--zstd-level", "99"], "level"),
    (["Not A Reference"], "invalid image reference"),
])
def test_pull_failures_are_one_line(daemon: str, images: Catalog, tmp_path: Path,
                                    argv: list[str], words: str) -> None:
    args = [a.format(host=images.host, multi=images["multi-docker"].reference) for a in argv]
    out = tmp_path / "x.zst"
    proc = fetchd("pull", *args, "-o", str(out), "--socket", daemon)
    assert proc.returncode == 1
    assert words in _one_error_line(proc)
    assert not out.exists()


@pytest.mark.registry
def test_status_ls_gc_verify_resolve(daemon: str, images: Catalog, tmp_path: Path) -> None:
    image = images["single-docker"]
    assert fetchd("pull", image.reference, "-o", str(tmp_path / "s.zst"), "--socket", daemon).returncode == 0
    status = fetchd("status", "--socket", daemon)
    assert status.returncode == 0 and "jobs: 0 running" in status.stdout and "store:" in status.stdout
    assert re.search(r"^event loop lag: max [0-9.]+ ms, p99 [0-9.]+ ms over the last 60 s$",
                     status.stdout, re.M), status.stdout
    ls = fetchd("ls", "--socket", daemon)
    assert ls.returncode == 0 and image.reference in ls.stdout
    assert re.search(r"^store: \d+ blobs, ", ls.stdout, re.M), ls.stdout  # blobs and sizes
    line = next(x for x in ls.stdout.splitlines() if image.reference in x)
    assert re.search(r"\d+\.\d (KiB|MiB) +used \d+:\d\d ago", line), line  # size, last use
    resolved = fetchd("resolve", image.reference, "--socket", daemon)
    assert resolved.returncode == 0 and resolved.stdout.strip().startswith(str(image.digest))
    verify = fetchd("verify", "--socket", daemon)
    assert verify.returncode == 0 and "checked:" in verify.stdout
    gc = fetchd("gc", "--max-size", "10G", "--socket", daemon)
    assert gc.returncode == 0 and "remaining_bytes" in gc.stdout
    bad = fetchd("gc", "--max-size", "lots", "--socket", daemon)
    assert bad.returncode == 1 and "invalid size" in _one_error_line(bad)


@pytest.mark.registry
def test_progress_bars_on_a_terminal(daemon: str, images: Catalog, tmp_path: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fetchd", "pull", images["layers40"].reference,
         "-o", str(tmp_path / "l.zst"), "--socket", daemon],
        env=ENV, stdout=subprocess.PIPE, stderr=slave, text=True,
    )
    os.close(slave)
    screen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    assert proc.wait(60) == 0
    text = screen.decode(errors="replace")
    assert "total" in text and "ETA" in text and "/s" in text
    assert "\x1b[" in text  # redrawn in place


def test_progress_renders_layers_and_total() -> None:
    out = io.StringIO()
    bar = Progress(out, interval=0)
    bar.on_event({"event": "manifest", "platform": "linux/amd64", "layers": 2})
    bar.on_event({"event": "layer", "digest": "sha256:" + "a" * 64, "size": 1000, "state": "downloading"})
    bar.on_event({"event": "progress", "digest": "sha256:" + "a" * 64, "bytes": 500, "total": 1000})
    bar.on_event({"event": "layer", "digest": "sha256:" + "b" * 64, "size": 300, "state": "cached"})
    bar.on_event({"event": "warning", "message": "registry slow"})
    bar.close()
    text = out.getvalue()
    assert "aaaaaaaaaaaa" in text and "cached" in text and "total" in text
    assert "fetchd: warning: registry slow" in text
    last = text.rsplit("\x1b[J", 1)[-1]
    assert "800 B" in last and "1.3 KiB" in last  # 500 + 300 of 1300 bytes


def test_main_returns_code_without_exiting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--socket", str(tmp_path / "none.sock")]) == 3
    assert capsys.readouterr().err.startswith("fetchd: error: cannot reach the fetchd daemon")


@pytest.mark.parametrize("argv, words", [
    (["--socket", "/proc/no-such-dir/fetchd.sock", "--store", "{tmp}/store"], "/proc/no-such-dir"),
    (["--socket", "{tmp}/fetchd.sock", "--store", "/proc/no-such-store"], "/proc/no-such-store"),
    (["--socket", "{tmp}/fetchd.sock", "--config", "{tmp}/none.toml"], "none.toml"),
])
def test_serve_failures_are_one_line(tmp_path: Path, argv: list[str], words: str) -> None:
    proc = fetchd("serve", *[a.format(tmp=tmp_path) for a in argv])
    assert proc.returncode == 1
    assert words in _one_error_line(proc)


def test_output_that_cannot_be_read_back_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon said done, but OUTPUT is gone when the CLI checks it: exit 1, no traceback."""
    import fetchd_client

    def fetch(self: object, *args: object, **kwargs: object) -> dict[str, object]:
        return {"size": 1, "archive_digest": "sha256:" + "0" * 64, "delivery": "hardlink"}

    monkeypatch.setattr(fetchd_client.Client, "fetch", fetch)
    code = main(["pull", "debian", "-o", str(tmp_path / "gone.zst"), "--socket", str(tmp_path / "s")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fetchd: error: ") and "gone.zst" in err[0]


def test_daemon_log_is_one_line_per_event() -> None:
    code = (
        "import logging\n"
        "from fetchd.cli import _setup_logging\n"
        "_setup_logging('info')\n"
        "log = logging.getLogger('fetchd.test')\n"
        "log.warning('first\\nsecond')\n"
        "log.warning('%s', 'esc\\x1b]0;title\\x07 csi\\x1b[2J bidi\\u202e end')\n"
        "try:\n"
        "    raise RuntimeError('boom')\n"
        "except RuntimeError:\n"
        "    log.exception('unexpected')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr
    assert lines[0].endswith("WARNING fetchd.test: first | second")
    assert lines[1].endswith("esc\\x1b]0;title\\x07 csi\\x1b[2J bidi\\u202e end")
    assert "\x1b" not in proc.stderr and "\u202e" not in proc.stderr
    assert "unexpected | Traceback" in lines[2] and "RuntimeError: boom" in lines[2]


def test_verify_with_corrupt_blobs_exits_1(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import fetchd_client

    report = {"checked": 3, "bytes_checked": 10, "corrupt": ["sha256:" + "1" * 64],
              "quarantined": ["/store/quarantine/x"]}
    monkeypatch.setattr(fetchd_client.Client, "verify", lambda self: report)
    assert main(["verify", "--socket", "/nonexistent"]) == 1
    out = capsys.readouterr()
    assert "checked: 3" in out.out
    assert out.err.strip() == ("fetchd: error: 1 corrupt blob(s) moved to quarantine; they are fetched "
                               "again when next needed (check the disk: files under blobs/ are read-only)")
    monkeypatch.setattr(fetchd_client.Client, "verify", lambda self: dict(report, corrupt=[]))
    assert main(["verify", "--socket", "/nonexistent"]) == 0


HOSTILE_TEXT = "denied\x1b]0;pwned\x07\x1b[2J\x9b1m\u202eevil\nfake line"


def _no_controls(text: str) -> bool:
    return not any(c in text for c in ("\x1b", "\x07", "\x9b", "\u202e"))


def test_daemon_text_reaches_the_terminal_escaped(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """issue 13: a registry's error text (through the daemon) kept its ESC/OSC sequences."""
    import fetchd_client

    def fail(self: object) -> None:
        raise fetchd_client.FetchdClientError("denied", HOSTILE_TEXT)

    monkeypatch.setattr(fetchd_client.Client, "verify", fail)
    assert main(["verify", "--socket", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert _no_controls(err) and "\\x1b]0;pwned\\x07" in err
    assert err.count("\n") == 1  # one line: the registry's newline is shown, not obeyed
    monkeypatch.setattr(fetchd_client.Client, "status", lambda self: {
        "version": "1", "jobs": [{"reference": HOSTILE_TEXT, "state": "running"}],
        "store": {"bytes": 1}, "registries": {HOSTILE_TEXT: {"errors": HOSTILE_TEXT}}})
    assert main(["status", "--socket", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    assert _no_controls(out) and "\\u202eevil" in out


def test_progress_escapes_event_text() -> None:
    out = io.StringIO()
    bar = Progress(out, interval=0)
    bar.on_event({"event": "manifest", "platform": HOSTILE_TEXT, "layers": 1})
    bar.on_event({"event": "warning", "message": HOSTILE_TEXT})
    bar.close()
    shown = out.getvalue().replace("\x1b[J", "")
    shown = re.sub(r"\x1b\[[0-9]+F", "", shown)  # the bar's own redraw codes
    assert _no_controls(shown) and "\\x1b[2J" in shown


def test_a_refused_gc_says_who_may_not_where_to_write(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import fetchd_client

    said = "gc below 700 bytes is store-wide: only root ... may run it; you are uid 65534"

    def refuse(self: object, max_size: object = None) -> None:
        raise fetchd_client.FetchdClientError("permission-refused", said)

    monkeypatch.setattr(fetchd_client.Client, "gc", refuse)
    assert main(["gc", "--max-size", "0", "--socket", "/nonexistent"]) == 1
    assert capsys.readouterr().err.strip() == f"fetchd: error: {said}"


def test_json_output_is_json_with_hostile_text_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the daemon's answer as valid (multi-line) JSON; registry text in it cannot
    reach the terminal as ESC/OSC or bidi sequences (json escapes them)."""
    import argparse
    import json

    from fetchd.cli import _printed_as_json

    answer = {"images": [{"reference": "evil/x\x1b]52;c;AAAA\x07\u202e", "size": 3}]}
    assert _printed_as_json(argparse.Namespace(json=True), answer)
    out = capsys.readouterr().out
    assert json.loads(out) == answer
    assert "\n" in out.strip() and not any(c in out for c in "\x1b\x07\u202e")


def test_serve_keeps_the_garbage_collectors_pauses_short() -> None:
    """fetchd serve freezes its start-up objects and collects young objects less often
    (issue 14: a full collection took ~25 ms of the event loop in a 1000-layer pull)."""
    code = ("import gc; from fetchd.cli import tune_garbage_collector, GC_YOUNG_THRESHOLD; "
            "before = gc.get_threshold(); tune_garbage_collector(); "
            # every object of the start-up is frozen, none left for a collection to scan (a
            # fixed count, > 10000, depended on whether the modules' .pyc files existed yet)
            "print(gc.get_freeze_count() > 1000 and len(gc.get_objects()) < 100, "
            "gc.get_threshold()[0] == GC_YOUNG_THRESHOLD, "
            "gc.get_threshold()[1:] == before[1:])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["True", "True", "True"]
