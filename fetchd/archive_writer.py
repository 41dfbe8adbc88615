"""The archive file being assembled: frames appended in layer order, shared frame bytes,
early writeback.

A pack appends each layer's zstd frame to one temporary archive file in layer order, while the
frames are still being made: a finished frame is copied in (``ArchiveBuilder.add_ready``), and
the worker of the layer next in line may write its frame straight into the archive
(``ArchiveBuilder.claim``, through a ``FrameSink``). ``FrameBytes`` are finished frames held
by an open file descriptor and reference counted, so the packs sharing a frame and the cache
can read them whatever happens to the path. This module knows files and offsets; it knows
nothing of zstd, layers or the store.

Invariants:
- entry ``i`` is appended only after entries ``0..i-1``; ``spans`` records each entry's
  (offset, length) in the file;
- once ``discard`` ran nothing writes the file again (every use holds the lock and checks),
  so a stale descriptor never names another file;
- a ``FrameBytes`` closes its descriptor with its last reference, exactly once; once its
  bytes are in the archive it reads them there (``relocate``), so the frames of one archive
  share the archive's one descriptor (``SharedFd``), whatever their number;
- the bytes before the end of the last appended entry never change again (a tee writes, and
  patches its header frame, only after it; a failed tee cuts the file back to its start):
  ``PrefixHasher`` hashes them while later entries are still being made, so ``finish``
  knows the archive's digest without reading it again, and frames are read there;
- a ``GivenFrame`` that is the archive's first entry becomes the archive file itself: its
  bytes are neither copied nor hashed again (its writer's hash is continued); a discard
  before ``finish`` leaves it exactly as it was given.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

_WRITEBACK_EVERY = 32 << 20


class Aborted(Exception):
    """The pack stopped (another layer failed, or it was cancelled): stop early, the archive
    will not be made."""


def write_all(f: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view) or 0:]


@dataclass(frozen=True)
class GivenFrame:
    """A finished, verified layer frame in a file of its own, from outside the pack (the
    fleet's frame cache) of ``length`` bytes (verified; a file of another size is refused).
    ``sha256``: a hashlib object holding the hash of exactly those bytes, computed as they
    were written (only ever copied, never updated), or None.

    As an archive's first entry the file *becomes* the archive (``ArchiveBuilder(head=)``):
    appended to and committed, so it is gone afterwards; a pack that fails before the
    archive was finished cuts it back to its own bytes, for a retry."""

    path: Path
    length: int
    sha256: Any = None


class SharedFd:
    """An open descriptor shared by several ``FrameBytes`` (the archive being made, whose
    frames are all spans of it): closed with its last reference, exactly once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._refs = 1
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Another reference (only by a holder of one: it is never closed meanwhile)."""
        with self._lock:
            if self._refs <= 0:
                raise RuntimeError("a shared descriptor acquired after it was closed")
            self._refs += 1

    def shared(self) -> bool:
        """Whether another holder than the caller's one reference holds it."""
        with self._lock:
            return self._refs > 1

    def release(self) -> None:
        with self._lock:
            if self._refs <= 0:
                raise RuntimeError("a shared descriptor released more often than acquired")
            self._refs -= 1
            if self._refs == 0:
                os.close(self.fd)


class FrameBytes:
    """A finished layer frame: ``length`` bytes at an offset of an open file (its own
    temporary file, the archive being made, or a cached frame blob or archive of the store).

    Shared by the packs that use it and reference counted: ``acquire`` (False once closed)
    and ``release``; the file is closed with the last reference. Holding the open file keeps
    the bytes readable whatever happens to the path (a gc, a commit renaming it). Once the
    bytes are also in an archive being made, ``relocate`` reads them there and closes the
    frame's own file: the frames a pack holds until its archive is committed then cost one
    descriptor in all (the archive's), not one each.
    """

    def __init__(self, fd: int | SharedFd, offset: int, length: int) -> None:
        self._file = fd if isinstance(fd, SharedFd) else SharedFd(fd)
        self._offset = offset
        self.length = length
        self._refs = 1
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, offset: int = 0, length: int | None = None) -> FrameBytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if length is None:
            length = os.fstat(fd).st_size - offset
        return cls(fd, offset, length)

    def acquire(self) -> bool:
        with self._lock:
            if self._refs <= 0:
                return False
            self._refs += 1
            return True

    def release(self) -> None:
        with self._lock:
            if self._refs <= 0:
                raise RuntimeError("pack frame released more often than acquired")
            self._refs -= 1
            if self._refs == 0:
                self._file.release()

    def relocate(self, file: SharedFd, offset: int) -> None:
        """The same bytes are at ``offset`` of ``file`` (an archive they were copied into,
        never rewritten there): read them there from now on, and drop the old file."""
        file.acquire()
        with self._lock:
            if self._refs <= 0:
                old = file
            else:
                old, self._file, self._offset = self._file, file, offset
        old.release()

    def _pin(self) -> tuple[SharedFd, int]:
        """The file and offset to read now, the file held (a ``relocate`` meanwhile does not
        close it under the reader)."""
        with self._lock:
            if self._refs <= 0:
                raise RuntimeError("pack frame read after its last release")
            self._file.acquire()
            return self._file, self._offset

    def append_to(self, dst: BinaryIO) -> None:
        """Append the bytes to ``dst`` (an unbuffered file positioned at its end)."""
        file, offset = self._pin()
        try:
            _copy_span(file.fd, offset, self.length, dst)
        finally:
            file.release()


def _copy_span(fd: int, offset: int, length: int, dst: BinaryIO) -> None:
    pos, end = offset, offset + length
    try:
        while pos < end:
            n = os.copy_file_range(fd, dst.fileno(), end - pos, pos)
            if n == 0:
                break
            pos += n
    except OSError:  # no copy_file_range between these files: copy through user space
        pass
    dst.seek(0, os.SEEK_END)
    while pos < end:
        chunk = os.pread(fd, min(1 << 20, end - pos), pos)
        if not chunk:
            raise OSError(errno.EIO, "a pack frame is shorter than recorded")
        write_all(dst, chunk)
        pos += len(chunk)


class Writeback:
    """Starts the disk write of a growing file early: an ``fdatasync`` in a thread of its own
    after every ``_WRITEBACK_EVERY`` bytes, so the fsync of the commit that follows the last
    byte has little left to write (the kernel would otherwise hold it all back until then).
    Does nothing when the store does not fsync. ``close`` before closing the file."""

    def __init__(self, fd: int, enabled: bool) -> None:
        self._fd = fd
        self._pending = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name="fetchd-writeback", daemon=True)
            self._thread.start()

    def wrote(self, n: int) -> None:
        if self._thread is None:
            return
        self._pending += n
        if self._pending >= _WRITEBACK_EVERY:
            self._pending = 0
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            with contextlib.suppress(OSError):  # only a head start: the commit's fsync counts
                os.fdatasync(self._fd)

    def close(self) -> None:
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join()
            self._thread = None


class PrefixHasher:
    """sha256 of a growing file, in a thread of its own, over the prefix declared final.

    ``advance(end)`` says the bytes before ``end`` will not change again; the thread reads
    (``pread``, from the page cache) and hashes them in order, overlapping the work that
    appends the rest. ``result`` waits for everything declared and returns (digest hex,
    size). It reads through a descriptor of its own, so the builder may close its file.
    ``start``: (a hashlib object, n) when the file's first n bytes are already hashed (a
    copy of it is continued from byte n).
    """

    def __init__(self, fd: int, start: tuple[Any, int] | None = None) -> None:
        self._fd = os.dup(fd)
        self._hash = start[0].copy() if start is not None else hashlib.sha256()
        self._hashed = start[1] if start is not None else 0
        self._final = self._hashed
        self._stop = False
        self._abandon = False
        self._error: OSError | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="fetchd-archive-sha256",
                                        daemon=True)
        self._thread.start()

    def advance(self, end: int) -> None:
        with self._cond:
            if end > self._final:
                self._final = end
                self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and self._hashed >= self._final:
                        self._cond.wait()
                    if self._hashed >= self._final or self._abandon:
                        return  # stopped: everything declared is hashed, or nothing more will be
                    pos, end = self._hashed, self._final
                while pos < end and not self._abandon:  # unlocked: advance() never waits on a read
                    chunk = os.pread(self._fd, min(1 << 20, end - pos), pos)
                    if not chunk:
                        raise OSError(errno.EIO, "the archive is shorter than its final prefix")
                    self._hash.update(chunk)
                    pos += len(chunk)
                with self._cond:
                    self._hashed = pos
        except OSError as e:
            self._error = e
        finally:
            os.close(self._fd)

    def result(self) -> tuple[str, int]:
        """(sha256 hex, bytes hashed) once every declared byte is hashed; OSError if a read
        failed."""
        self.close()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest(), self._hashed

    def close(self, abandon: bool = False) -> None:
        """Stop after what is declared, or at once (``abandon``: the file is being thrown
        away). Waits for the thread; idempotent."""
        with self._cond:
            self._stop = True
            self._abandon = self._abandon or abandon
            self._cond.notify()
        self._thread.join()


class ArchiveBuilder:
    """The archive file, appended entry by entry in layer order while frames are being made.

    Entry ``i`` (the i-th distinct layer) gets in either by copying its finished frame
    (``add_ready``), or while it is made: the worker of the entry right after everything
    appended so far may ``claim`` the file and write its frame straight into it (a *tee*:
    the biggest bytes, a single-layer base image, are written once and never copied). One
    tee at a time; copies wait while a tee runs. ``spans`` records where each entry's frame
    lies in the file (the store keeps them as the frame cache). All methods are
    thread-safe; ``write``/``pwrite`` belong to the claiming worker alone. The file is hashed
    as its entries are completed (``PrefixHasher``); after ``finish``, ``digest`` holds the
    (sha256 hex, size) of the whole file.

    ``position`` is the next entry to append; ``on_advance(position)`` is called (from the
    thread that appended, under the lock: it must only hand the value on) each time it
    grows, with strictly increasing values, so a pack can slide its look-ahead window
    without polling.
    """

    def __init__(self, path: Path, count: int, on_complete: Callable[[], object],
                 writeback: bool = False,
                 on_advance: Callable[[int], object] | None = None,
                 head: GivenFrame | None = None) -> None:
        self.count = count
        self._on_complete = on_complete
        self._on_advance = on_advance
        self._announced = 0  # the last position handed to ``on_advance``
        self.digest: tuple[str, int] | None = None  # set by finish
        self._next = 0
        self.spans: dict[int, tuple[int, int]] = {}  # entry -> (offset, length) in the file
        self._head: int | None = None  # with ``head``: its length (discard cuts back to it)
        self._finished = False
        start: tuple[Any, int] | None = None
        if head is None:
            self.path = path
            # read too: spans of it are handed out (end_tee) for other packs and the cache
            self.file: BinaryIO = open(path, "w+b", buffering=0)  # noqa: SIM115 -- closed in finish/discard
        else:
            # the given first frame is the archive's start: appended to, never copied, and
            # its hash continued
            self.path = head.path
            self.file = open(head.path, "r+b", buffering=0)  # noqa: SIM115 -- closed in finish/discard
            length = self.file.seek(0, os.SEEK_END)
            if length != head.length:
                self.file.close()
                raise OSError(errno.EIO, f"the given frame {head.path.name} has {length} "
                                         f"bytes, not the {head.length} verified")
            self._head = length
            self.spans[0] = (0, length)
            self._next = 1
            start = (head.sha256, length) if head.sha256 is not None else None
        # the frames in the file are spans of this one descriptor (``FrameBytes.relocate``),
        # which lives as long as the last of them
        self._shared: SharedFd | None = SharedFd(os.dup(self.file.fileno()))
        self._writeback = Writeback(self.file.fileno(), writeback)
        self._hasher = PrefixHasher(self.file.fileno(), start)
        self._hasher.advance(self._head or 0)  # a head without its hash: read once
        # open files: a frame stays readable after a gc took its blob (commit -> lease window)
        self._ready: dict[int, FrameBytes] = {}
        self._teeing = False
        self._failed = False
        self._lock = threading.Lock()
        if self._next == self.count:
            self._on_complete()  # the given head is the only entry: only the tail is missing

    @property
    def position(self) -> int:
        """The entry to append next (every entry before it is in the file)."""
        return self._next

    def claim(self, entry: int) -> int | None:
        """The offset where ``entry`` starts if its worker may write it here now, else None."""
        with self._lock:
            if self._failed or self._teeing or entry != self._next:
                return None
            self._teeing = True
            return self.file.seek(0, os.SEEK_END)

    # Every use of the file holds the lock (uncontended while a tee runs), so ``discard`` can
    # never close it under a worker that still writes: a stale descriptor number could name
    # another file by then.
    def write(self, data: bytes | memoryview) -> None:
        with self._lock:
            self._check()
            write_all(self.file, data)
            self._writeback.wrote(len(data))

    def pwrite(self, data: bytes, offset: int) -> None:
        with self._lock:
            self._check()
            os.pwrite(self.file.fileno(), data, offset)

    def _check(self) -> None:
        if self._failed:
            raise Aborted

    def copy_out(self, start: int, dst: BinaryIO) -> None:
        """Copy the archive's bytes from ``start`` to its end into ``dst`` (the claiming
        worker, before it gives up its claim)."""
        with self._lock:
            self._check()
            pos, end = start, self.file.seek(0, os.SEEK_END)
            while pos < end:
                chunk = os.pread(self.file.fileno(), min(1 << 20, end - pos), pos)
                if not chunk:
                    raise OSError(errno.EIO, "the archive is shorter than written")
                dst.write(chunk)
                pos += len(chunk)

    def end_tee(self, ok: bool, start: int, entry: int) -> FrameBytes | None:
        """The claiming worker is done: its entry is in (``ok``; returns the frame's bytes,
        shared with the archive file), or is cut off again."""
        with self._lock:
            self._teeing = False
            if self._failed:
                return None
            frame = None
            if ok:
                end = self.file.seek(0, os.SEEK_END)
                self.spans[entry] = (start, end - start)
                shared = self._shared
                assert shared is not None  # released only by finish and discard
                shared.acquire()
                frame = FrameBytes(shared, start, end - start)
                self._next += 1
                self._hasher.advance(end)
            else:
                self.file.truncate(start)
                self.file.seek(start)
            try:
                self._drain()
            except BaseException:
                if frame is not None:
                    frame.release()
                raise
            return frame

    def add_ready(self, entries: dict[int, FrameBytes]) -> None:
        """Finished frames, each copied in when its turn comes; takes over one reference of
        each (released once copied, or on ``discard``)."""
        with self._lock:
            if self._failed:
                for frame in entries.values():
                    frame.release()
                raise Aborted
            self._ready.update(entries)
            self._drain()

    def _drain(self) -> None:
        while not self._teeing and self._next in self._ready:
            frame = self._ready.pop(self._next)
            try:
                before = self.file.seek(0, os.SEEK_END)
                frame.append_to(self.file)
                # whoever else holds it reads it here now: its own file closes (a descriptor
                # per frame made out of turn would otherwise stay open until the commit)
                assert self._shared is not None  # released only by finish and discard
                frame.relocate(self._shared, before)
            finally:
                frame.release()
            size = self.file.seek(0, os.SEEK_END) - before
            self.spans[self._next] = (before, size)
            self._writeback.wrote(size)
            self._next += 1
            self._hasher.advance(before + size)
        if self._next != self._announced and self._on_advance is not None:
            self._announced = self._next
            self._on_advance(self._next)
        if self._next == self.count and not self._teeing:
            self._on_complete()  # every layer entry is in: only the tail is missing

    def finish(self, tail: bytes) -> None:
        with self._lock:
            if self._failed or self._teeing or self._next != self.count:
                raise Aborted
            end = self.file.seek(0, os.SEEK_END) + len(tail)
            write_all(self.file, tail)
            self._writeback.close()
            self._hasher.advance(end)
            self._finished = True
            self.file.close()
            self._release_shared()
        self.digest = self._hasher.result()
        if self.digest[1] != end:
            raise OSError(errno.EIO, f"the archive hashed {self.digest[1]} bytes of {end}")

    def _release_shared(self) -> None:
        if self._shared is not None:
            self._shared.release()  # the frames handed out keep it open while they live
            self._shared = None

    def _cut_back(self) -> None:
        """The given head's path back to the head's own bytes, for its owner's retry. The
        frames handed out past the head (teed or copied in: other packs share them, a failed
        pack keeps them) are spans of this file and must stay readable: while any is held,
        the head is copied to a new file that takes the path, and this one (unlinked) lives
        on for them; else the file is cut in place."""
        assert self._head is not None
        tmp = self.path.with_name(self.path.name + ".head")
        try:
            if self._shared is None or not self._shared.shared():
                self.file.truncate(self._head)
                return
            with open(tmp, "wb", buffering=0) as out:
                _copy_span(self.file.fileno(), 0, self._head, out)
            os.replace(tmp, self.path)
        except OSError:  # best effort: the owner's retry checks the head's length
            with contextlib.suppress(OSError):
                tmp.unlink()

    def discard(self) -> None:
        """Give up: the file is removed, or (a given head, the archive not yet finished)
        cut back to the head's own bytes and left to its owner."""
        with self._lock:
            self._failed = True
            self._writeback.close()
            self._hasher.close(abandon=True)
            keep = self._head is not None and not self._finished
            if keep and not self.file.closed:
                self._cut_back()
            self.file.close()
            self._release_shared()
            for frame in self._ready.values():
                frame.release()
            self._ready.clear()
        if not keep:
            with contextlib.suppress(OSError):
                self.path.unlink()


class FrameSink:
    """The compressor's output: the frame's own file, or (claimed) the archive itself."""

    def __init__(self, frame: BinaryIO | None, archive: ArchiveBuilder | None) -> None:
        self.frame = frame
        self.archive = archive

    def write(self, data: bytes) -> int:
        if self.archive is not None:
            self.archive.write(data)
        else:
            assert self.frame is not None
            self.frame.write(data)
        return len(data)

    def flush(self) -> None:
        if self.frame is not None:
            self.frame.flush()

