"""Hand an archive from the store to a build: hard link, else reflink, else copy; always atomic.

Invariants:

* The destination is an absolute path without ``..``; its last component is never followed
  when it is a symlink (a symlink already there is refused, never replaced or written through).
* The file appears at the destination only complete: it is made under a temporary name in the
  destination directory and renamed over the destination.
* The daemon acts for a peer (the process at the other end of the Unix socket, identified by
  ``SO_PEERCRED``). It writes only where that peer may create files itself: write and search
  permission on the destination directory, search permission on every ancestor, and the sticky
  bit rule. Root may write anywhere. (POSIX ACLs are not consulted: a directory writable only
  through an ACL is refused, which errs on the safe side.)
* Store files are never modified: a hard link shares the store's read-only (0444) inode.
* When the daemon itself cannot write the destination directory (another user's home, a
  read-only view under systemd's ``ProtectSystem``, a directory it does not see because of
  ``PrivateTmp``), nothing is written and the result says ``client-copy``: the client copies
  the read-only store file itself, with its own rights.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import socket
import stat
import struct
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
    """Check that ``peer`` may create ``dest``; return it as a Path.

    Raises ``InvalidRequest`` for a malformed path or a missing directory and
    ``PermissionRefused`` when the peer could not create the file itself. A directory
    the daemon cannot even inspect passes here: the daemon will not write there either
    (``client-copy``), so the client's own rights decide. This is an early answer only:
    ``deliver`` checks again on the directory it actually opened.
    """
    path = check_path(dest)
    try:
        dfd = _open_dir(path.parent)
    except (FileNotFoundError, PermissionError):
        # Perhaps only this daemon cannot see it (PrivateTmp, another mount namespace):
        # the client copies itself and reports a directory that is really missing.
        return path
    except NotADirectoryError:
        raise InvalidRequest(f"destination {path}: {path.parent} is not a directory") from None
    except OSError as e:
        raise InvalidRequest(f"destination directory {path.parent}: {e.strerror}") from None
    try:
        _check_directory(path, dfd, peer)
        _check_final(path, dfd, peer)
    finally:
        os.close(dfd)
    return path


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


def deliver(source: Path, dest: object, peer: Peer) -> Delivery:
    """Place the store file ``source`` at ``dest`` for ``peer``. Blocking: run it in a thread.

    Tries a hard link, then (on EXDEV or EPERM) a reflink, then a copy. Returns
    ``client-copy`` without writing anything when the daemon may not write the directory.
    Every check and every write is relative to one opened directory, and the final rename
    neither follows nor replaces anything but the entry that was checked.
    """
    path = check_path(dest)
    try:
        dfd = _open_dir(path.parent)
    except NotADirectoryError:
        raise InvalidRequest(f"destination {path}: {path.parent} is not a directory") from None
    except OSError as e:
        if e.errno in _NO_WRITE or e.errno == errno.ENOENT:
            return Delivery(path, CLIENT_COPY, source)
        raise StoreError(f"cannot open destination directory {path.parent}: {e.strerror}") from e
    try:
        _check_directory(path, dfd, peer)
        existing = _check_final(path, dfd, peer)
        src_st = os.stat(source)
        if existing is not None and (existing.st_dev, existing.st_ino) == (src_st.st_dev, src_st.st_ino):
            return Delivery(path, HARDLINK, source)
        return _place(source, path, dfd, peer, existing)
    finally:
        os.close(dfd)


def _place(source: Path, path: Path, dfd: int, peer: Peer, existing: os.stat_result | None) -> Delivery:
    tmp = f".{path.name}.{secrets.token_hex(6)}.fetchd-tmp"
    try:
        mode = _stage(source, path, tmp, dfd, peer)
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


def _stage(source: Path, path: Path, tmp: str, dfd: int, peer: Peer) -> str:
    """Make ``tmp`` in the directory: a hard link, else a reflink or copy (or ``client-copy``)."""
    try:
        os.link(source, tmp, dst_dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.EACCES or e.errno == errno.EROFS:
            return CLIENT_COPY
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise StoreError(f"cannot link {source} into {path.parent}: {e.strerror}") from e
    else:
        return HARDLINK
    try:
        return _clone_or_copy(source, tmp, dfd, peer)
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


def _clone_or_copy(source: Path, tmp: str, dfd: int, peer: Peer) -> str:
    with open(source, "rb") as src:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dfd)
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
