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
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


@pytest.fixture(scope="module")
def nobody_pid() -> Iterator[int]:
    """A live process of nobody's: the daemon checks a destination in its peer's own view
    (/proc/<pid>/root), so a peer needs a real process."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another uid")
    proc = subprocess.Popen(["sleep", "infinity"], user=NOBODY.pw_uid, group=NOBODY.pw_gid,
                            extra_groups=[])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def as_nobody(pid: int, *groups: int) -> Peer:
    return Peer(pid, NOBODY.pw_uid, NOBODY.pw_gid, frozenset({NOBODY.pw_gid, *groups}))


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


def test_a_directory_missing_in_the_peers_view_is_refused(store_file: Path, tmp_path: Path) -> None:
    # The daemon looks in the peer's own view (/proc/<pid>/root): missing there is missing.
    with pytest.raises(PermissionRefused, match="does not exist, is not a directory, or uid"):
        deliver(store_file, str(tmp_path / "nope" / "image.zst"), ME)
    assert not (tmp_path / "nope").exists()


def test_directory_at_destination_is_refused(store_file: Path, tmp_path: Path) -> None:
    (tmp_path / "image.zst").mkdir()
    with pytest.raises(InvalidRequest, match="directory"):
        deliver(store_file, str(tmp_path / "image.zst"), ME)


@needs_root
def test_peer_that_may_not_write_is_refused(nobody_pid: int, store_file: Path, tmp_path: Path) -> None:
    closed = tmp_path / "root-only"
    closed.mkdir(mode=0o755)
    with pytest.raises(PermissionRefused, match=f"uid {NOBODY.pw_uid} may not write"):
        deliver(store_file, str(closed / "image.zst"), as_nobody(nobody_pid))
    assert list(closed.iterdir()) == []


@needs_root
def test_peer_needs_search_permission_on_ancestors(nobody_pid: int, store_file: Path, open_tmp: Path) -> None:
    outer = open_tmp / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    inner.chmod(0o777)
    outer.chmod(0o700)  # nobody cannot get through
    with pytest.raises(PermissionRefused, match="may not write there"):
        check_destination(str(inner / "image.zst"), as_nobody(nobody_pid))


@needs_root
def test_group_write_permission_counts(nobody_pid: int, store_file: Path, open_tmp: Path) -> None:
    shared = open_tmp / "shared"
    shared.mkdir()
    os.chown(shared, 0, 4242)
    shared.chmod(0o770)
    member = as_nobody(nobody_pid, 4242)
    assert deliver(store_file, str(shared / "image.zst"), member).mode == HARDLINK
    with pytest.raises(PermissionRefused):
        deliver(store_file, str(shared / "other.zst"), as_nobody(nobody_pid))


@needs_root
def test_sticky_directory_protects_other_users_files(nobody_pid: int, store_file: Path, open_tmp: Path) -> None:
    sticky = open_tmp / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    theirs = sticky / "image.zst"
    theirs.write_bytes(b"someone else's")
    with pytest.raises(PermissionRefused, match="sticky"):
        deliver(store_file, str(theirs), as_nobody(nobody_pid))
    assert theirs.read_bytes() == b"someone else's"


@needs_root
def test_copy_belongs_to_the_peer(nobody_pid: int, store_file: Path, shm_dir: Path) -> None:
    shm_dir.chmod(0o777)
    result = deliver(store_file, str(shm_dir / "image.zst"), as_nobody(nobody_pid))
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
def test_file_created_in_a_sticky_dir_after_the_check_is_not_replaced(nobody_pid: int,
    store_file: Path, open_tmp: Path, monkeypatch: pytest.MonkeyPatch, rename_impl: str
) -> None:
    sticky = open_tmp / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    dest = sticky / "image.zst"
    _race(monkeypatch, lambda: dest.write_bytes(b"root's own file"))  # owned by root, not nobody
    with pytest.raises(PermissionRefused, match="sticky"):
        deliver(store_file, str(dest), as_nobody(nobody_pid))
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


def test_directory_swapped_for_a_symlink_is_checked_where_it_points(nobody_pid: int,
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
    check_destination(str(dest), as_nobody(nobody_pid))  # what the server does before the job
    mine.rmdir()
    mine.symlink_to(closed)
    with pytest.raises(PermissionRefused, match="may not write"):
        deliver(store_file, str(dest), as_nobody(nobody_pid))
    assert list(closed.iterdir()) == []


def test_peer_groups_come_from_the_kernel_not_from_a_reused_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setattr(deliver_module, "_groups_of", lambda *a: pytest.fail("/proc was read"))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = Peer.of_socket(a)
    assert peer.groups == frozenset({os.getgid(), *os.getgroups()})


# -- issue 13: checks in the peer's own view, with its own rights ------------------------------

needs_acl = pytest.mark.skipif(shutil.which("setfacl") is None,
                               reason="setfacl (Debian's acl package; scripts/setup.sh installs it)")


def _as_nobody_run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
                          capture_output=True, text=True)


@needs_acl
def test_an_acl_that_denies_the_peer_is_honored(nobody_pid: int, store_file: Path,
                                                open_tmp: Path) -> None:
    """The finding: mode 0777 plus an ACL entry denying nobody; the daemon linked there anyway."""
    denied = open_tmp / "denied"
    denied.mkdir()
    denied.chmod(0o777)
    subprocess.run(["setfacl", "-m", f"u:{NOBODY.pw_name}:---", str(denied)], check=True)
    assert _as_nobody_run("touch", str(denied / "probe")).returncode != 0  # the kernel agrees
    with pytest.raises(PermissionRefused, match="may not write there"):
        check_destination(str(denied / "image.zst"), as_nobody(nobody_pid))
    with pytest.raises(PermissionRefused, match="may not write there"):
        deliver(store_file, str(denied / "image.zst"), as_nobody(nobody_pid))
    assert list(denied.iterdir()) == []


@needs_acl
def test_an_acl_that_grants_the_peer_is_honored_too(nobody_pid: int, store_file: Path,
                                                    open_tmp: Path) -> None:
    granted = open_tmp / "granted"
    granted.mkdir(mode=0o755)  # the mode bits alone say no
    subprocess.run(["setfacl", "-m", f"u:{NOBODY.pw_name}:rwx", str(granted)], check=True)
    result = deliver(store_file, str(granted / "image.zst"), as_nobody(nobody_pid))
    assert result.mode == HARDLINK


@needs_acl
def test_without_the_peers_view_an_acl_means_client_copy(
        nobody_pid: int, store_file: Path, open_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that cannot act as the peer (not root, /proc hidden) does not trust mode bits
    where an ACL may say otherwise: it writes nothing and lets the client copy."""
    monkeypatch.setattr(deliver_module, "_acts_as", lambda peer: False)
    denied = open_tmp / "denied"
    denied.mkdir()
    denied.chmod(0o777)
    subprocess.run(["setfacl", "-m", f"u:{NOBODY.pw_name}:---", str(denied)], check=True)
    assert deliver(store_file, str(denied / "image.zst"), as_nobody(nobody_pid)).mode == CLIENT_COPY
    assert list(denied.iterdir()) == []


def test_no_hard_link_in_a_sticky_directory_the_peer_can_then_delete_its_file(
        nobody_pid: int, store_file: Path, open_tmp: Path) -> None:
    """The finding: in /tmp-like directories the delivered link was the daemon's file, which
    the user could not delete. Now the peer gets its own copy there."""
    sticky = open_tmp / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    dest = sticky / "image.zst"
    result = deliver(store_file, str(dest), as_nobody(nobody_pid))
    assert result.mode in (COPY, REFLINK)
    st = os.stat(dest)
    assert st.st_ino != os.stat(store_file).st_ino and st.st_uid == NOBODY.pw_uid
    assert dest.read_bytes() == store_file.read_bytes()
    assert _as_nobody_run("rm", "-f", str(dest)).returncode == 0
    assert not dest.exists()


def test_missing_and_not_yours_get_the_same_answer(nobody_pid: int, store_file: Path,
                                                   open_tmp: Path) -> None:
    """The finding: answers to nobody told whether a file or directory exists inside /root."""
    private = open_tmp / "private"
    (private / "exists").mkdir(parents=True)
    (private / "afile").write_bytes(b"")
    private.chmod(0o700)
    answers = set()
    for sub in ("exists", "missing", "afile"):
        dest = private / sub / "image.zst"
        for call in (lambda d: check_destination(str(d), as_nobody(nobody_pid)),
                     lambda d: deliver(store_file, str(d), as_nobody(nobody_pid))):
            with pytest.raises(PermissionRefused) as info:
                call(dest)
            answers.add(info.value.message.replace(sub, "X"))
    assert len(answers) == 1, answers
    assert sorted(p.name for p in (private / "exists").iterdir()) == []


@pytest.fixture
def read_only_view(open_tmp: Path) -> Iterator[tuple[Path, int]]:
    """A directory every user may write, read-only in a process of nobody's in its own mount
    namespace (a sandbox's read-only bind mount); the daemon's view stays writable."""
    yield from _other_namespace(open_tmp, read_only=True)


@pytest.fixture
def own_namespace(open_tmp: Path) -> Iterator[tuple[Path, int]]:
    """A directory every user may write, seen by a process of nobody's in a mount namespace of
    its own (as a build in a sandbox, or a daemon sandboxed by systemd, sees it)."""
    yield from _other_namespace(open_tmp, read_only=False)


def _other_namespace(open_tmp: Path, read_only: bool) -> Iterator[tuple[Path, int]]:
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.skip("needs unshare and setpriv (util-linux)")
    shared = open_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    remount = f"mount -o remount,bind,ro {shared} && " if read_only else ""
    script = (f"mount --bind {shared} {shared} && {remount}"
              f"exec setpriv --reuid={NOBODY.pw_uid} --regid={NOBODY.pw_gid} --clear-groups "
              "sh -c 'echo ready; exec sleep infinity'")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        if proc.stdout.readline().strip() != "ready":  # printed once it runs as nobody
            proc.wait()
            pytest.skip(f"cannot make a private read-only mount here: {proc.stderr.read()}")
        yield shared, proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_read_only_view_gets_nothing_replaced(nobody_pid: int, store_file: Path,
                                                read_only_view: tuple[Path, int]) -> None:
    """The finding: a caller with a read-only view of the path (a sandbox's bind mount) got
    an existing file replaced, because the daemon checked and wrote in its own view."""
    shared, pid = read_only_view
    old = shared / "image.zst"
    old.write_bytes(b"the sandbox's file")
    os.chown(old, NOBODY.pw_uid, NOBODY.pw_gid)
    peer = as_nobody(pid)
    with pytest.raises(PermissionRefused, match="read-only"):
        check_destination(str(old), peer)
    with pytest.raises(PermissionRefused, match="read-only"):
        deliver(store_file, str(old), peer)
    assert old.read_bytes() == b"the sandbox's file"
    assert _leftovers(shared) == []
    # the same directory, for a process in the daemon's own view: writable
    assert deliver(store_file, str(old), as_nobody(nobody_pid)).mode == HARDLINK


def test_a_peer_in_its_own_mount_namespace_still_gets_the_hard_link(
        store_file: Path, own_namespace: tuple[Path, int]) -> None:
    """Checked through the peer's mounts, written through the daemon's: a link made through
    another namespace's mount would be EXDEV (and so a full copy)."""
    shared, pid = own_namespace
    result = deliver(store_file, str(shared / "image.zst"), as_nobody(pid))
    assert result.mode == HARDLINK
    assert os.stat(shared / "image.zst").st_ino == os.stat(store_file).st_ino
