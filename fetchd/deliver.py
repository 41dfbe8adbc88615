"""Hand an archive from the store to a build: hard link, else reflink, else copy; always atomic.

Invariants:

* The destination is an absolute path without ``..``; its last component is never followed
  when it is a symlink (a symlink already there is refused, never replaced or written through).
* The file appears at the destination only complete: it is made under a temporary name in the
  destination directory and renamed over the destination.
* The daemon acts for a peer (the process at the other end of the Unix socket, identified by
  ``SO_PEERCRED``). It writes only where that peer may create files itself, as the peer sees
  the filesystem: a root daemon opens the destination directory under ``/proc/<pid>/root``
  (the peer's mount namespace and root, so its read-only bind mounts apply; absolute symlinks
  resolve inside that root) on a short-lived thread whose filesystem uid, gid and groups are
  the peer's, and asks the kernel (``faccessat(AT_EACCESS)``) for write and search
  permission. So mode bits, POSIX ACLs, read-only mounts and every ancestor's search
  permission are decided exactly as for the peer's own ``open``; the writes that follow are
  the daemon's, in that opened directory. A daemon that cannot act as the peer (not root, or
  ``/proc`` hidden) checks mode bits in its own view and leaves anything doubtful (an
  extended ACL on the directory or an ancestor, a directory it may not use, a missing one)
  to the client (``client-copy``), which copies with its own rights.
* One answer for "does not exist" and "not yours": a directory the peer cannot reach or may
  not write gets the same refusal (or, in the fallback, the same ``client-copy``), so the
  daemon's answers tell a peer nothing it could not find out itself (no oracle into /root).
* In a sticky directory that the peer does not own, the daemon never hard-links (the link
  would be the daemon's file, which the peer could not delete): it makes the peer's own copy
  (a reflink where the filesystem can), or ``client-copy`` when it cannot give the copy away.
* A directory read-only in the peer's view is refused: nothing there is replaced.
* Store files are never modified: a hard link shares the store's read-only (0444) inode.
* When the daemon itself cannot write the destination directory (another user's home, a
  read-only view under systemd's ``ProtectSystem``, a directory it does not see because of
  ``PrivateTmp``), nothing is written and the result says ``client-copy``: the client copies
  the read-only store file itself, with its own rights.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import secrets
import socket
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import FetchdError, InvalidRequest, PermissionRefused, StoreError

HARDLINK = "hardlink"
REFLINK = "reflink"
COPY = "copy"
CLIENT_COPY = "client-copy"
MODES = (HARDLINK, REFLINK, COPY, CLIENT_COPY)

# linux/fs.h: _IOW(0x94, 9, int)
FICLONE = 0x40049409
_COPY_CHUNK = 8 << 20
# Errors that mean "this daemon may not write there", as opposed to "this cannot work at all".
_NO_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass(frozen=True)
class Peer:
    """The credentials of the process on the other end of a Unix socket."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of_socket(cls, sock: socket.socket) -> Peer:
        """Read ``SO_PEERCRED`` and ``SO_PEERGROUPS`` (Linux): the peer's ids when it connected."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        groups = _peer_groups(sock)
        if groups is None:
            groups = _groups_of(pid, uid, gid)
        return cls(pid, uid, gid, frozenset({gid, *groups}))

    @classmethod
    def current(cls) -> Peer:
        return cls(os.getpid(), os.getuid(), os.getgid(), frozenset({os.getgid(), *os.getgroups()}))

    def may(self, st: os.stat_result, want: int) -> bool:
        """Whether this peer has all of ``want`` (an rwx mask, e.g. 0o3) on a file with ``st``.

        The owner class wins over group, group over other, as the kernel decides it.
        """
        if self.uid == 0:
            return True
        mode = st.st_mode
        if st.st_uid == self.uid:
            bits = (mode >> 6) & 7
        elif st.st_gid in self.groups:
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        return bits & want == want


# linux/asm-generic/socket.h; Python's socket module does not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_PEERGROUPS_BUF = 1024  # CPython's getsockopt limit: 256 groups


def _peer_groups(sock: socket.socket) -> list[int] | None:
    """The peer's supplementary groups as the kernel recorded them at connect (Linux >= 4.13).

    Unlike ``/proc/<pid>``, this cannot name another process that reused the pid after the
    peer exited. None when the kernel does not know the option or the list is too long.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _PEERGROUPS_BUF)
    except OSError:
        return None
    count = len(raw) // 4
    return list(struct.unpack(f"{count}I", raw[: count * 4]))


def _groups_of(pid: int, uid: int, gid: int) -> list[int]:
    # /proc tells the groups the process really has (newgrp, setgroups), provided the pid
    # still belongs to a process of that uid; the user database is the last resort.
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f if b":" in line)
        if int(fields[b"Uid"].split()[1]) == uid:
            return [int(g) for g in fields[b"Groups"].split()]
    except (OSError, KeyError, IndexError, ValueError):
        pass
    try:
        import pwd

        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except (KeyError, OSError):
        return []


@dataclass(frozen=True)
class Delivery:
    """Where the archive was placed and how (``mode`` is one of ``MODES``)."""

    path: Path
    mode: str
    store_path: Path

    def to_json(self) -> dict[str, str]:
        return {"path": str(self.path), "delivery": self.mode, "store_path": str(self.store_path)}


def check_path(dest: object) -> Path:
    """Validate the shape of a destination path (absolute, no ``..``, a file name)."""
    if not isinstance(dest, str) or not dest:
        raise InvalidRequest("destination must be a non-empty absolute path string")
    if "\0" in dest:
        raise InvalidRequest("destination contains a NUL byte")
    if not dest.startswith("/"):
        raise InvalidRequest(
            f"destination {dest!r} is relative: the daemon has no working directory of yours, "
            "give an absolute path"
        )
    parts = dest.split("/")
    if ".." in parts:
        raise InvalidRequest(f"destination {dest!r} contains '..': give a path without it")
    if dest.endswith("/") or parts[-1] in ("", "."):
        raise InvalidRequest(f"destination {dest!r} names a directory: give a file name")
    return Path(dest)


def _refuse(dest: Path, why: str) -> PermissionRefused:
    return PermissionRefused(f"refusing to write {dest}: {why}")


def check_destination(dest: object, peer: Peer) -> Path:
    """Check that ``peer`` may create ``dest``; return it as a Path. Blocking: run it in a thread.

    Raises ``InvalidRequest`` for a malformed path and ``PermissionRefused`` when the peer
    could not create the file itself. What the daemon cannot decide passes here (the client's
    own rights decide at hand-back). An early answer only: ``deliver`` checks again on the
    directory it actually opened.
    """
    path = check_path(dest)
    view = _open_view(path, peer)
    if view is not None:
        try:
            _check_final(path, view.dfd, peer)
        finally:
            view.close()
    return path


@dataclass(frozen=True)
class _View:
    """The destination directory as the daemon may write it for the peer."""

    dfd: int            # O_PATH descriptor of the directory
    link: bool          # a hard link is fine (False: the peer's own copy)
    # The same directory through the daemon's own mounts, when it sees it (None: it does not).
    # A hard link needs the store's mount: through the peer's mount namespace it would be
    # EXDEV (a daemon sandboxed by systemd has mounts of its own), so writes try this first.
    own: int | None = None

    def close(self) -> None:
        os.close(self.dfd)
        if self.own is not None:
            os.close(self.own)


def _refuse_dir(path: Path, peer: Peer) -> PermissionRefused:
    # The same words whether the directory is missing, not a directory, or not the peer's:
    # the answer must not tell a peer what it could not find out itself.
    return _refuse(path, f"{path.parent} does not exist, is not a directory, or uid {peer.uid} "
                         "may not write there")


def _open_view(path: Path, peer: Peer) -> _View | None:
    """Open the destination directory for ``peer`` (None: leave it to the client)."""
    if _acts_as(peer):
        try:
            dfd = _in_peer_view(peer, lambda: _open_as_peer(path, peer))
        except _NoView:
            pass  # the peer's /proc entry is hidden or gone: decide in the daemon's view
        else:
            st = os.fstat(dfd)
            sticky = bool(st.st_mode & stat.S_ISVTX) and peer.uid not in (0, st.st_uid)
            return _View(dfd, link=not sticky, own=_same_dir_own_view(path, st))
    return _open_own_view(path, peer)


def _same_dir_own_view(path: Path, checked: os.stat_result) -> int | None:
    """The directory in the daemon's own view if it is the very one checked (same inode)."""
    try:
        own = _open_dir(path.parent)
    except OSError:
        return None
    st = os.fstat(own)
    if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
        os.close(own)
        return None
    return own


class _NoView(Exception):
    """The peer's view cannot be opened (its /proc entry is hidden, or it is gone)."""


def _open_as_peer(path: Path, peer: Peer) -> int:
    """On a thread with the peer's filesystem credentials: its directory, checked by the kernel."""
    try:
        root = os.open(f"/proc/{peer.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise _NoView(str(e)) from None
    try:
        dfd = _openat_in_root(root, str(path.parent))
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP):
            raise _refuse_dir(path, peer) from None
        raise StoreError(f"cannot open destination directory {path.parent}: {e.strerror}") from e
    finally:
        os.close(root)
    try:
        if not _same_process(peer):
            raise _NoView("the peer's pid now names another process")
        err = _faccessat(dfd, ".", os.W_OK | os.X_OK)
        if err == errno.EROFS:
            raise _refuse(path, f"{path.parent} is on a read-only filesystem in uid {peer.uid}'s "
                                "view (a read-only bind mount?); nothing is replaced there")
        if err:
            raise _refuse_dir(path, peer)
    except BaseException:
        os.close(dfd)
        raise
    return dfd


def _same_process(peer: Peer) -> bool:
    """Whether ``/proc/<pid>`` still belongs to the peer's uid (the pid was not reused by
    another user's process since it connected)."""
    try:
        with open(f"/proc/{peer.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1]) == peer.uid
    except (OSError, ValueError, IndexError):
        pass
    return False


def _open_own_view(path: Path, peer: Peer) -> _View | None:
    """The fallback: the daemon's own view and mode bits; anything doubtful -> None."""
    try:
        dfd = _open_dir(path.parent)
    except OSError:
        return None  # missing here, or not the daemon's to see: the client decides
    try:
        try:
            _check_directory(path, dfd, peer)
        except PermissionRefused:
            os.close(dfd)
            return None  # the client meets the same refusal in its own view (no oracle)
        if _has_acl(f"/proc/self/fd/{dfd}") or _ancestor_has_acl(dfd):
            os.close(dfd)
            return None  # an ACL may deny the peer what the mode bits allow
        st = os.fstat(dfd)
        sticky = bool(st.st_mode & stat.S_ISVTX) and peer.uid not in (0, st.st_uid)
        if sticky and os.geteuid() != 0:
            os.close(dfd)
            return None  # a copy the daemon cannot give away is no better than its link
        return _View(dfd, link=not sticky)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(dfd)
        raise


_ACL_XATTR = "system.posix_acl_access"


def _has_acl(path: str) -> bool:
    """Whether ``path`` carries an extended POSIX ACL (more than the mode bits say)."""
    try:
        os.getxattr(path, _ACL_XATTR)
    except OSError:
        return False  # ENODATA: none; ENOTSUP: the filesystem has no ACLs
    return True


def _ancestor_has_acl(dfd: int) -> bool:
    try:
        real = Path(os.readlink(f"/proc/self/fd/{dfd}"))
    except OSError:
        return True
    return any(_has_acl(str(a)) for a in real.parents)


# -- acting as the peer ------------------------------------------------------------------------

# setgroups(2) as a raw syscall: glibc's wrapper changes every thread's groups, the syscall
# only the calling thread's (as setfsuid/setfsgid do).
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159, "ppc64le": 81, "ppc64": 81,
                  "s390x": 206, "armv7l": 206, "armv6l": 206, "i686": 206, "i386": 206}
_SYS_OPENAT2 = 437  # the same number on every architecture (Linux >= 5.6)
_RESOLVE_IN_ROOT = 0x10


def _acts_as(peer: Peer) -> bool:
    """Whether the daemon can check in the peer's own view with the peer's own rights."""
    if peer.pid <= 0 or _libc is None:
        return False
    if peer.uid == os.geteuid() and peer.uid != 0:
        return True  # its own user: the same rights, only the view may differ
    return os.geteuid() == 0 and platform.machine() in _SYS_SETGROUPS


def _in_peer_view(peer: Peer, fn: Callable[[], int]) -> int:
    """Run ``fn`` on a new thread whose filesystem uid, gid and groups are the peer's.

    The thread ends afterwards, so no pooled thread ever keeps the peer's credentials; the
    daemon's other threads are untouched (these ids are per thread in Linux).
    """
    outcome: list[object] = []

    def run() -> None:
        try:
            if os.geteuid() == 0:
                _become(peer)
            outcome.append(fn())
        except BaseException as e:  # handed to the caller
            outcome.append(e)

    thread = threading.Thread(target=run, name="fetchd-peer-view", daemon=True)
    thread.start()
    thread.join()
    (result,) = outcome
    if isinstance(result, BaseException):
        raise result
    assert isinstance(result, int)
    return result


def _become(peer: Peer) -> None:
    assert _libc is not None
    groups = sorted(peer.groups)
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _libc.syscall(_SYS_SETGROUPS[platform.machine()], len(groups), array) != 0:
        raise StoreError(f"cannot take uid {peer.uid}'s groups to check its rights: "
                         f"{os.strerror(ctypes.get_errno())}")
    _libc.setfsgid(peer.gid)
    _libc.setfsuid(peer.uid)
    if _libc.setfsuid(-1) != peer.uid:  # an invalid id only reports the current
        raise StoreError(f"cannot take uid {peer.uid}'s identity to check its rights")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat_in_root(root: int, directory: str) -> int:
    """Open ``directory`` (absolute) inside the tree whose root is ``root``, as a process
    chrooted there would: absolute symlinks and ``..`` stay inside (openat2 RESOLVE_IN_ROOT)."""
    assert _libc is not None
    how = _OpenHow(os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT)
    rel = directory.lstrip("/") or "."
    fd = _libc.syscall(_SYS_OPENAT2, root, os.fsencode(rel), ctypes.byref(how),
                       ctypes.sizeof(how))
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err not in (errno.ENOSYS, errno.EINVAL, errno.E2BIG):
        raise OSError(err, os.strerror(err), directory)
    # An older kernel: through the magic link (absolute symlinks resolve in the daemon's root).
    return os.open(rel, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)


_AT_EACCESS = 0x200


def _faccessat(dfd: int, name: str, mode: int) -> int:
    """faccessat(2) with the effective (here: filesystem) ids; 0 or the errno."""
    assert _libc is not None
    if _libc.faccessat(dfd, os.fsencode(name), mode, _AT_EACCESS) == 0:
        return 0
    return ctypes.get_errno()


def _open_dir(directory: Path) -> int:
    # O_PATH: enough for fstat and the *at() calls, and needs no read permission on it.
    return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _check_directory(path: Path, dfd: int, peer: Peer) -> None:
    """The peer may write and search the opened directory and search every ancestor."""
    if peer.uid == 0:
        return
    if not peer.may(os.fstat(dfd), 0o3):
        raise _refuse(path, f"uid {peer.uid} may not write the directory {path.parent}")
    # The ancestors of the directory that was opened, not of a path that may have changed since.
    try:
        real = Path(os.readlink(f"/proc/self/fd/{dfd}"))
    except OSError:
        real = Path(os.path.realpath(path.parent))
    for ancestor in reversed(real.parents):
        try:
            st = os.stat(ancestor)
        except OSError:
            continue
        if not peer.may(st, 0o1):
            raise _refuse(path, f"uid {peer.uid} may not enter {ancestor}")


def _check_final(path: Path, dfd: int, peer: Peer) -> os.stat_result | None:
    """What is at the destination now (None: nothing), refused unless the peer may replace it."""
    try:
        st = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except PermissionError:
        return None  # the daemon cannot look: it cannot write either (client-copy)
    refusal = _refusal(path, st, os.fstat(dfd), peer)
    if refusal is not None:
        raise refusal
    return st


def _refusal(path: Path, st: os.stat_result, dst: os.stat_result, peer: Peer) -> FetchdError | None:
    """Why ``peer`` may not replace the entry ``st`` in the directory ``dst`` (None: it may)."""
    if stat.S_ISLNK(st.st_mode):
        return _refuse(path, "a symlink is at the destination; remove it first")
    if stat.S_ISDIR(st.st_mode):
        return InvalidRequest(f"destination {path} is a directory: give a file name")
    if not stat.S_ISREG(st.st_mode):
        return _refuse(path, "something other than a regular file is at the destination")
    if dst.st_mode & stat.S_ISVTX and peer.uid not in (0, st.st_uid, dst.st_uid):
        return _refuse(path, f"the file belongs to uid {st.st_uid} in a sticky directory")
    return None


def deliver(source: Path, dest: object, peer: Peer, *, link: bool = True,
            copy_mode: int = 0o644) -> Delivery:
    """Place the store file ``source`` at ``dest`` for ``peer``. Blocking: run it in a thread.

    Tries a hard link (unless ``link`` is False or the directory is sticky and not the
    peer's), then (on EXDEV or EPERM) a reflink, then a copy (``copy_mode``, the peer's own
    file). Returns ``client-copy`` without writing anything when the daemon may not write the
    directory or cannot decide for the peer. Every check and every write is relative to one
    opened directory, and the final rename neither follows nor replaces anything but the
    entry that was checked.
    """
    path = check_path(dest)
    view = _open_view(path, peer)
    if view is None:
        return Delivery(path, CLIENT_COPY, source)
    try:
        link = link and view.link
        existing = _check_final(path, view.dfd, peer)
        src_st = os.stat(source)
        if link and existing is not None and \
                (existing.st_dev, existing.st_ino) == (src_st.st_dev, src_st.st_ino):
            return Delivery(path, HARDLINK, source)
        if view.own is not None:  # the same directory, through the store's mounts
            placed = _place(source, path, view.own, peer, existing, link, copy_mode)
            if placed.mode != CLIENT_COPY:
                return placed
            # read-only in the daemon's view (e.g. ProtectSystem), not in the peer's: go on
            existing = _check_final(path, view.dfd, peer)
        return _place(source, path, view.dfd, peer, existing, link, copy_mode)
    finally:
        view.close()


def _place(source: Path, path: Path, dfd: int, peer: Peer, existing: os.stat_result | None,
           link: bool, copy_mode: int) -> Delivery:
    tmp = f".{path.name}.{secrets.token_hex(6)}.fetchd-tmp"
    try:
        mode = _stage(source, path, tmp, dfd, peer, link, copy_mode)
        if mode == CLIENT_COPY:
            return Delivery(path, CLIENT_COPY, source)
        def may_replace(st: os.stat_result) -> bool:
            return _refusal(path, st, os.fstat(dfd), peer) is None

        for _ in range(_COMMIT_TRIES):
            if _commit(tmp, path.name, dfd, existing, may_replace):
                return Delivery(path, mode, source)
            # Someone changed the destination after the check: check what is there now.
            existing = _check_final(path, dfd, peer)
        raise _refuse(path, "the destination kept changing while it was being written; retry")
    finally:
        _unlink_quiet(tmp, dfd)


def _stage(source: Path, path: Path, tmp: str, dfd: int, peer: Peer, link: bool = True,
           copy_mode: int = 0o644) -> str:
    """Make ``tmp`` in the directory: a hard link, else a reflink or copy (or ``client-copy``)."""
    if link:
        try:
            os.link(source, tmp, dst_dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.EACCES or e.errno == errno.EROFS:
                return CLIENT_COPY
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise StoreError(f"cannot link {source} into {path.parent}: {e.strerror}") from e
        else:
            return HARDLINK
    if peer.uid != os.geteuid() and os.geteuid() != 0:
        return CLIENT_COPY  # the copy would be the daemon's file, not the peer's
    try:
        return _clone_or_copy(source, tmp, dfd, peer, copy_mode)
    except OSError as e:
        if e.errno in _NO_WRITE:
            return CLIENT_COPY
        raise StoreError(f"cannot copy {source} to {path}: {e.strerror}") from e


def _commit(tmp: str, name: str, dfd: int, existing: os.stat_result | None,
            may_replace: Callable[[os.stat_result], bool]) -> bool:
    """Rename ``tmp`` to ``name``; False when the destination changed since it was checked.

    Nothing there before: the rename must not replace whatever appeared since (for a root
    daemon, another user's file created in a sticky directory meanwhile). A file there
    before: exchange the two atomically, and put back what was there unless the peer may
    replace it (a symlink or another user's file swapped in after the check).
    """
    try:
        if existing is None:
            return _rename_noreplace(tmp, name, dfd)
        return _replace_checked(tmp, name, dfd, may_replace)
    except IsADirectoryError as e:
        raise InvalidRequest(f"destination {name} is a directory: give a file name") from e
    except OSError as e:
        raise StoreError(f"cannot rename into place {name}: {e.strerror}") from e


def _rename_noreplace(tmp: str, name: str, dfd: int) -> bool:
    try:
        _renameat2(dfd, tmp, name, RENAME_NOREPLACE)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in _NO_RENAMEAT2:
            raise
    # No renameat2 here: link() never replaces either; a filesystem without hard links
    # (vfat) gets a plain rename.
    try:
        os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    return True


def _replace_checked(tmp: str, name: str, dfd: int,
                     may_replace: Callable[[os.stat_result], bool]) -> bool:
    try:
        _renameat2(dfd, tmp, name, RENAME_EXCHANGE)
    except FileNotFoundError:
        return False  # removed meanwhile: check again
    except OSError as e:
        if e.errno not in _NO_RENAMEAT2:
            raise
        # No exchange here: compare right before a plain rename (a small window remains).
        try:
            now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not may_replace(now):
            return False
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        return True
    old = os.stat(tmp, dir_fd=dfd, follow_symlinks=False)
    if not may_replace(old):
        _renameat2(dfd, tmp, name, RENAME_EXCHANGE)  # not the peer's to replace: give it back
        return False
    return True  # the old file now sits at tmp, which the caller removes


# linux/fs.h
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_NO_RENAMEAT2 = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP}
_COMMIT_TRIES = 3
_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                ctypes.c_uint]
except (OSError, AttributeError):
    _libc = None


def _renameat2(dfd: int, old: str, new: str, flags: int) -> None:
    """renameat2(2) within one directory fd; ENOSYS when the C library lacks it."""
    if _libc is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _libc.renameat2(dfd, os.fsencode(old), dfd, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), new)


def _unlink_quiet(name: str, dfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def _clone_or_copy(source: Path, tmp: str, dfd: int, peer: Peer, copy_mode: int = 0o644) -> str:
    with open(source, "rb") as src:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            mode = REFLINK
            try:
                fcntl.ioctl(fd, FICLONE, src.fileno())
            except OSError:
                mode = COPY
                copy_fd(src.fileno(), fd)
            os.fsync(fd)
            if os.geteuid() == 0 and peer.uid != 0:
                # A copy is the build's own file, as if it had made it itself.
                os.fchown(fd, peer.uid, peer.gid)
            os.fchmod(fd, copy_mode)  # after the chown, which may clear set-id bits
        finally:
            os.close(fd)
    return mode


def copy_fd(src: int, dst: int) -> None:
    """Copy all of ``src`` (from its start) to ``dst`` in the kernel where it can."""
    offset = 0
    size = os.fstat(src).st_size
    try:
        while offset < size:
            sent = os.sendfile(dst, src, offset, min(_COPY_CHUNK, size - offset))
            if sent == 0:
                break
            offset += sent
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        os.lseek(src, offset, os.SEEK_SET)
        while chunk := os.read(src, _COPY_CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view) :]
        return
    if offset != size:
        raise OSError(errno.EIO, f"short copy: {offset} of {size} bytes")


__all__ = [
    "CLIENT_COPY",
    "COPY",
    "HARDLINK",
    "MODES",
    "REFLINK",
    "Delivery",
    "Peer",
    "check_destination",
    "check_path",
    "deliver",
]
