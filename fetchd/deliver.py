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

import errno
import fcntl
import os
import secrets
import socket
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequest, PermissionRefused, StoreError

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
        """Read ``SO_PEERCRED`` (Linux) and the peer's supplementary groups."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid, frozenset({gid, *_groups_of(pid, uid, gid)}))

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


def _groups_of(pid: int, uid: int, gid: int) -> Iterable[int]:
    # /proc tells the groups the process really has (newgrp, setgroups); the user
    # database is only the fallback when /proc is unavailable.
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except OSError:
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
    (``client-copy``), so the client's own rights decide.
    """
    path = check_path(dest)
    parent = path.parent
    try:
        dst = os.stat(parent)
    except FileNotFoundError:
        # Perhaps only this daemon cannot see it (PrivateTmp, another mount namespace):
        # the client copies itself and reports a directory that is really missing.
        return path
    except NotADirectoryError:
        raise InvalidRequest(f"destination {path}: a parent is not a directory") from None
    except PermissionError:
        return path
    if not stat.S_ISDIR(dst.st_mode):
        raise InvalidRequest(f"destination directory {parent} is not a directory")
    _check_peer(path, parent, dst, peer)
    return path


def _check_peer(path: Path, parent: Path, dst: os.stat_result, peer: Peer) -> None:
    if peer.uid == 0:
        _check_final(path, dst, peer)
        return
    if not peer.may(dst, 0o3):
        raise _refuse(path, f"uid {peer.uid} may not write the directory {parent}")
    real = Path(os.path.realpath(parent))
    for ancestor in [*reversed(real.parents)]:
        try:
            st = os.stat(ancestor)
        except OSError:
            continue
        if not peer.may(st, 0o1):
            raise _refuse(path, f"uid {peer.uid} may not enter {ancestor}")
    _check_final(path, dst, peer)


def _check_final(path: Path, dst: os.stat_result, peer: Peer) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except PermissionError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "a symlink is at the destination; remove it first")
    if stat.S_ISDIR(st.st_mode):
        raise InvalidRequest(f"destination {path} is a directory: give a file name")
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, "something other than a regular file is at the destination")
    sticky = dst.st_mode & stat.S_ISVTX
    if sticky and peer.uid not in (0, st.st_uid, dst.st_uid):
        raise _refuse(path, f"the file belongs to uid {st.st_uid} in a sticky directory")


def deliver(source: Path, dest: object, peer: Peer) -> Delivery:
    """Place the store file ``source`` at ``dest`` for ``peer``. Blocking: run it in a thread.

    Tries a hard link, then (on EXDEV or EPERM) a reflink, then a copy. Returns
    ``client-copy`` without writing anything when the daemon may not write the directory.
    """
    path = check_destination(dest, peer)
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _NO_WRITE or e.errno == errno.ENOENT:
            return Delivery(path, CLIENT_COPY, source)
        raise StoreError(f"cannot open destination directory {path.parent}: {e.strerror}") from e
    try:
        # Checked again on the opened directory: the path may have changed since the check.
        _check_peer(path, path.parent, os.fstat(dfd), peer)
        return _place(source, path, dfd, peer)
    finally:
        os.close(dfd)


def _place(source: Path, path: Path, dfd: int, peer: Peer) -> Delivery:
    name = path.name
    try:
        existing = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        src_st = os.stat(source)
        if (existing.st_dev, existing.st_ino) == (src_st.st_dev, src_st.st_ino):
            return Delivery(path, HARDLINK, source)
    except FileNotFoundError:
        pass
    tmp = f".{name}.{secrets.token_hex(6)}.fetchd-tmp"
    try:
        os.link(source, tmp, dst_dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.EACCES or e.errno == errno.EROFS:
            return Delivery(path, CLIENT_COPY, source)
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise StoreError(f"cannot link {source} into {path.parent}: {e.strerror}") from e
    else:
        _commit(tmp, name, dfd)
        return Delivery(path, HARDLINK, source)
    try:
        mode = _clone_or_copy(source, tmp, dfd, peer)
    except OSError as e:
        _unlink_quiet(tmp, dfd)
        if e.errno in _NO_WRITE:
            return Delivery(path, CLIENT_COPY, source)
        raise StoreError(f"cannot copy {source} to {path}: {e.strerror}") from e
    except BaseException:
        _unlink_quiet(tmp, dfd)
        raise
    _commit(tmp, name, dfd)
    return Delivery(path, mode, source)


def _commit(tmp: str, name: str, dfd: int) -> None:
    try:
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError as e:
        _unlink_quiet(tmp, dfd)
        if isinstance(e, IsADirectoryError):
            raise InvalidRequest(f"destination {name} is a directory: give a file name") from e
        raise StoreError(f"cannot rename into place {name}: {e.strerror}") from e
    # rename() between two links of one inode does nothing and leaves the temporary name.
    _unlink_quiet(tmp, dfd)


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
