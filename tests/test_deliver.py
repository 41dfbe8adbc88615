"""Hand-back: hard link, copy across filesystems, atomic replace, and the safety checks."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import fetchd.deliver as deliver_module
from fetchd.deliver import (
    CLIENT_COPY,
    COPY,
    HARDLINK,
    REFLINK,
    Peer,
    check_destination,
    check_path,
    deliver,
)
from fetchd.errors import InvalidRequest, PermissionRefused

ROOT = Path(__file__).resolve().parent.parent
NOBODY = pwd.getpwnam("nobody")
ME = Peer.current()
AS_NOBODY = Peer(1, NOBODY.pw_uid, NOBODY.pw_gid, frozenset({NOBODY.pw_gid}))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


@pytest.fixture
def store_file(tmp_path: Path) -> Path:
    """A read-only file as the store keeps it."""
    blobs = tmp_path / "store" / "blobs"
    blobs.mkdir(parents=True)
    path = blobs / "archive"
    path.write_bytes(b"zstd archive bytes " * 1000)
    path.chmod(0o444)
    return path


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="fetchd-test-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _open_store_file(base: Path) -> Path:
    path = base / "store-blob"
    path.write_bytes(b"zstd archive bytes")
    path.chmod(0o444)
    return path


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".fetchd-tmp")]


def test_hard_link_shares_the_store_inode(store_file: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "image.zst"
    dest.parent.mkdir()
    result = deliver(store_file, str(dest), ME)
    assert result.mode == HARDLINK
    assert result.path == dest
    assert os.stat(dest).st_ino == os.stat(store_file).st_ino
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o444  # the store stays read-only
    assert _leftovers(dest.parent) == []


def test_delivering_twice_is_harmless(store_file: Path, tmp_path: Path) -> None:
    dest = tmp_path / "image.zst"
    deliver(store_file, str(dest), ME)
    again = deliver(store_file, str(dest), ME)
    assert again.mode == HARDLINK
    assert os.stat(dest).st_ino == os.stat(store_file).st_ino
    assert _leftovers(tmp_path) == []


def test_an_existing_file_is_replaced_whole(store_file: Path, tmp_path: Path) -> None:
    dest = tmp_path / "image.zst"
    dest.write_bytes(b"stale partial output")
    deliver(store_file, str(dest), ME)
    assert dest.read_bytes() == store_file.read_bytes()


def test_other_filesystem_gets_a_copy_and_says_so(store_file: Path, shm_dir: Path) -> None:
    if os.stat(shm_dir).st_dev == os.stat(store_file).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the temp dir here")
    dest = shm_dir / "image.zst"
    result = deliver(store_file, str(dest), ME)
    assert result.mode in (COPY, REFLINK)
    assert result.mode == COPY  # tmpfs has no reflinks
    assert os.stat(dest).st_dev != os.stat(store_file).st_dev
    assert dest.read_bytes() == store_file.read_bytes()
    assert _leftovers(shm_dir) == []


def test_symlink_at_destination_is_refused(store_file: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "image.zst"
    dest.symlink_to(victim)
    with pytest.raises(PermissionRefused, match="symlink"):
        deliver(store_file, str(dest), ME)
    assert dest.is_symlink()
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize(
    "dest, words",
    [
        ("relative/image.zst", "relative"),
        ("/tmp/../etc/image.zst", "'..'"),
        ("/tmp/dir/", "directory"),
        ("", "non-empty"),
        ("/tmp/a\0b", "NUL"),
    ],
)
def test_malformed_destinations_are_refused(dest: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        check_path(dest)


def test_directory_the_daemon_cannot_see_is_left_to_the_client(store_file: Path, tmp_path: Path) -> None:
    # Under PrivateTmp the daemon does not see the build's /tmp: the client copies itself.
    result = deliver(store_file, str(tmp_path / "nope" / "image.zst"), ME)
    assert result.mode == CLIENT_COPY
    assert not (tmp_path / "nope").exists()


def test_directory_at_destination_is_refused(store_file: Path, tmp_path: Path) -> None:
    (tmp_path / "image.zst").mkdir()
    with pytest.raises(InvalidRequest, match="directory"):
        deliver(store_file, str(tmp_path / "image.zst"), ME)


@needs_root
def test_peer_that_may_not_write_is_refused(store_file: Path, tmp_path: Path) -> None:
    closed = tmp_path / "root-only"
    closed.mkdir(mode=0o755)
    with pytest.raises(PermissionRefused, match=f"uid {NOBODY.pw_uid} may not write"):
        deliver(store_file, str(closed / "image.zst"), AS_NOBODY)
    assert list(closed.iterdir()) == []


@needs_root
def test_peer_needs_search_permission_on_ancestors(store_file: Path, open_tmp: Path) -> None:
    outer = open_tmp / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    inner.chmod(0o777)
    outer.chmod(0o700)  # nobody cannot get through
    with pytest.raises(PermissionRefused, match="may not enter"):
        check_destination(str(inner / "image.zst"), AS_NOBODY)


@needs_root
def test_group_write_permission_counts(store_file: Path, open_tmp: Path) -> None:
    shared = open_tmp / "shared"
    shared.mkdir()
    os.chown(shared, 0, 4242)
    shared.chmod(0o770)
    member = Peer(1, NOBODY.pw_uid, NOBODY.pw_gid, frozenset({NOBODY.pw_gid, 4242}))
    assert deliver(store_file, str(shared / "image.zst"), member).mode == HARDLINK
    with pytest.raises(PermissionRefused):
        deliver(store_file, str(shared / "other.zst"), AS_NOBODY)


@needs_root
def test_sticky_directory_protects_other_users_files(store_file: Path, open_tmp: Path) -> None:
    sticky = open_tmp / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    theirs = sticky / "image.zst"
    theirs.write_bytes(b"someone else's")
    with pytest.raises(PermissionRefused, match="sticky"):
        deliver(store_file, str(theirs), AS_NOBODY)
    assert theirs.read_bytes() == b"someone else's"


@needs_root
def test_copy_belongs_to_the_peer(store_file: Path, shm_dir: Path) -> None:
    shm_dir.chmod(0o777)
    result = deliver(store_file, str(shm_dir / "image.zst"), AS_NOBODY)
    assert result.mode == COPY
    assert os.stat(shm_dir / "image.zst").st_uid == NOBODY.pw_uid


@needs_root
def test_daemon_that_may_not_write_answers_client_copy(open_tmp: Path) -> None:
    """A daemon running as nobody, a root peer, a root-owned directory: nothing is written."""
    closed = open_tmp / "closed"
    closed.mkdir(mode=0o755)
    store_file = _open_store_file(open_tmp)
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from fetchd.deliver import Peer, deliver\n"
        f"os.setgid({NOBODY.pw_gid}); os.setuid({NOBODY.pw_uid})\n"
        f"r = deliver(Path({str(store_file)!r}), {str(closed / 'image.zst')!r}, Peer(1, 0, 0, frozenset({{0}})))\n"
        "print(r.mode, r.store_path)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [CLIENT_COPY, str(store_file)]
    assert list(closed.iterdir()) == []


def test_peer_credentials_of_a_unix_socket() -> None:
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = Peer.of_socket(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert set(os.getgroups()) <= peer.groups


# -- races between the check and the rename ------------------------------------------------------


@pytest.fixture(params=["renameat2", "fallback"])
def rename_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a race test with renameat2 and with the link/compare fallback (no renameat2)."""
    if request.param == "fallback":
        monkeypatch.setattr(deliver_module, "_libc", None)
    return str(request.param)


def _race(monkeypatch: pytest.MonkeyPatch, act: Callable[[], None]) -> None:
    """Run ``act`` after the checks and the staging, just before the rename."""
    real_stage = deliver_module._stage

    def stage(*args: Any) -> str:
        mode = real_stage(*args)
        act()
        return mode

    monkeypatch.setattr(deliver_module, "_stage", stage)


@needs_root
def test_file_created_in_a_sticky_dir_after_the_check_is_not_replaced(
    store_file: Path, open_tmp: Path, monkeypatch: pytest.MonkeyPatch, rename_impl: str
) -> None:
    sticky = open_tmp / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    dest = sticky / "image.zst"
    _race(monkeypatch, lambda: dest.write_bytes(b"root's own file"))  # owned by root, not nobody
    with pytest.raises(PermissionRefused, match="sticky"):
        deliver(store_file, str(dest), AS_NOBODY)
    assert dest.read_bytes() == b"root's own file"
    assert _leftovers(sticky) == []


def test_symlink_swapped_in_after_the_check_is_refused(
    store_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rename_impl: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "image.zst"
    dest.write_bytes(b"my old output")

    def swap() -> None:
        dest.unlink()
        dest.symlink_to(victim)

    _race(monkeypatch, swap)
    with pytest.raises(PermissionRefused, match="symlink"):
        deliver(store_file, str(dest), ME)
    assert dest.is_symlink() and victim.read_bytes() == b"precious"
    assert _leftovers(tmp_path) == []


def test_own_file_appearing_after_the_check_is_replaced(
    store_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rename_impl: str
) -> None:
    # Two deliveries to one path at once: the second replaces the first's file.
    dest = tmp_path / "image.zst"
    _race(monkeypatch, lambda: dest.write_bytes(b"another delivery"))
    assert deliver(store_file, str(dest), ME).mode == HARDLINK
    assert os.stat(dest).st_ino == os.stat(store_file).st_ino
    assert _leftovers(tmp_path) == []


def test_directory_swapped_for_a_symlink_is_checked_where_it_points(
    store_file: Path, open_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The early check saw a writable directory; by delivery time the path leads elsewhere."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another uid")
    mine = open_tmp / "mine"
    mine.mkdir()
    mine.chmod(0o777)
    closed = open_tmp / "closed"
    closed.mkdir(mode=0o755)  # nobody may not write here
    dest = mine / "image.zst"
    check_destination(str(dest), AS_NOBODY)  # what the server does before the job
    mine.rmdir()
    mine.symlink_to(closed)
    with pytest.raises(PermissionRefused, match="may not write"):
        deliver(store_file, str(dest), AS_NOBODY)
    assert list(closed.iterdir()) == []


def test_peer_groups_come_from_the_kernel_not_from_a_reused_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setattr(deliver_module, "_groups_of", lambda *a: pytest.fail("/proc was read"))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = Peer.of_socket(a)
    assert peer.groups == frozenset({os.getgid(), *os.getgroups()})
