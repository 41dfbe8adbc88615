"""Is this file exactly a layer frame fetchd writes? The check for frames from elsewhere.

A frame that comes from outside this host (the fleet's frame cache) is verified in full
before it may enter the store or an archive (``check_frame``):

- it starts with the raw header frame this host writes for (diff_id, size), byte for byte
  (``layer_frame.raw_zstd_frame`` of the ``<diff_id>.tar`` member header);
- then exactly one zstd frame whose header is the one ``compress_budget.compressor(level, n)``
  writes (checksum on, no content size, no dictionary, the level's window); its blocks are
  walked to the end of the file: no truncation, no trailing bytes, no reserved block types,
  no block above zstd's 128 KiB limit;
- it decompresses (checksum verified by zstd; ``decompress.decompressed_chunks``, bounded)
  to exactly ``size`` bytes hashing to the diff_id, followed by the member's zero padding;
  output beyond that is refused at once (no decompression bomb).

What it cannot see: whether another compressor *of the same window* made those bytes. Such a
frame yields the same archive content but not the same archive bytes as other hosts; the
trust model in docs/FLEET.md says who may write the cache for that reason.

``FRAME_FORMAT`` versions what ``layer_frame`` writes (header frame + content frame); the
fleet cache keys frames by it, with the zstd library version and the level. Bump it whenever
the frame bytes for the same (layer, level, zstd) would change.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from .archive_format import layer_member_header, padding
from .compress_budget import check_level
from .decompress import CorruptLayer, Prefixed, Readable, decompressed_chunks
from .digest import Digest
from .errors import LayerTooLarge
from .layer_frame import ZSTD_MAGIC, Sha256Thread, raw_zstd_frame

FRAME_FORMAT = 1
ZSTD_VERSION = ".".join(str(n) for n in zstandard.ZSTD_VERSION)
"""The libzstd version this host compresses with (it decides the frame bytes)."""

_CHECKSUM_ONLY = 0x04  # frame header descriptor: checksum flag; no content size, no dict id
_MAX_BLOCK = 128 * 1024
_CHUNK = 1 << 20


HEADER_PREFIX = 10 + 3 * 512
"""Bytes of a frame's start that hold its raw header frame, also with a PAX size record."""


def member_size(prefix: bytes, diff_id: Digest) -> int:
    """The layer size that a frame of ``diff_id`` starting with ``prefix`` (its first
    ``HEADER_PREFIX`` bytes, or all of a shorter frame) records in its header frame;
    ValueError when the header frame is not exactly the one fetchd writes for that size."""
    data = prefix[10:]
    pax = data[156:157] == b"x"
    if pax:  # "<len> size=<decimal>\n" in the PAX member's content
        text = data[512:1024].split(b"\n", 1)[0].partition(b" size=")[2]
    else:  # ustar: 11 octal digits
        text = data[124:136].rstrip(b"\0 ")
    try:
        size = int(text, 10 if pax else 8)
    except ValueError:
        raise ValueError("no size in the frame's header") from None
    header = raw_zstd_frame(layer_member_header(diff_id, size))
    if prefix[:len(header)] != header:
        raise ValueError("the frame's header is not this layer's member header")
    return size


class FrameRejected(Exception):
    """The file is not the frame this host would write; ``reason`` says what differs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def content_frame_header(level: int) -> bytes:
    """The first bytes of every content frame at ``level``: magic, descriptor, window."""
    window_log = zstandard.ZstdCompressionParameters.from_level(check_level(level)).window_log
    return ZSTD_MAGIC + bytes([_CHECKSUM_ONLY, (window_log - 10) << 3])


def max_frame_size(size: int) -> int:
    """An upper bound of a frame's bytes for a layer of ``size`` uncompressed bytes (a bigger
    one cannot be ours: zstd never expands a block by more than its 3-byte header)."""
    content = size + len(padding(size))
    blocks = content // _MAX_BLOCK + 1
    return 2048 + content + 3 * blocks + 4


def check_frame(path: Path, diff_id: Digest, level: int, size: int, *,
                source: Readable | None = None,
                complete: Callable[[], int] | None = None) -> None:
    """Raise FrameRejected unless ``path`` holds exactly a frame of the layer ``diff_id``
    (``size`` bytes uncompressed) at ``level`` as this host writes it (see the module doc).

    ``source`` reads the same bytes from the start while they are still being written (a
    download), ``complete`` waits until they all are and returns their number: then the
    check runs alongside the transfer. Blocking: decompresses and hashes the whole layer (the
    hash in a second thread); run it in a thread.
    """
    if diff_id.algorithm != "sha256":
        raise FrameRejected(f"diff_id {diff_id} is not sha256")
    if size < 0:
        raise FrameRejected(f"negative layer size {size}")
    header = raw_zstd_frame(layer_member_header(diff_id, size))
    expect = content_frame_header(level)
    with contextlib.ExitStack() as stack:
        src: Readable = source if source is not None else stack.enter_context(open(path, "rb"))
        if _read_exact(src, len(header)) != header:
            raise FrameRejected("the header frame is not this layer's tar member header")
        start = len(header)
        if _read_exact(src, len(expect)) != expect:
            raise FrameRejected(f"the content frame's header is not zstd level {level}'s "
                                "(checksum, no content size, window)")
        _check_content(Prefixed(expect, src), diff_id, size)
    total = complete() if complete is not None else os.path.getsize(path)
    if total > max_frame_size(size):
        raise FrameRejected(f"{total} bytes is more than any frame of a {size}-byte layer")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _walk_blocks(fd, start + len(expect), total)
    finally:
        os.close(fd)


def _read_exact(src: Readable, n: int) -> bytes:
    """``n`` bytes (fewer only at the end of ``src``)."""
    parts: list[bytes] = []
    while n > 0 and (chunk := src.read(n)):
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _walk_blocks(fd: int, pos: int, total: int) -> None:
    """Follow the block headers from ``pos``: the frame must end exactly at ``total``."""
    while True:
        head = os.pread(fd, 3, pos)
        if len(head) < 3:
            raise FrameRejected("truncated: the content frame ends inside a block header")
        value = int.from_bytes(head, "little")
        last, kind, block = value & 1, (value >> 1) & 3, value >> 3
        if kind == 3:
            raise FrameRejected(f"reserved block type at byte {pos}")
        if block > _MAX_BLOCK:
            raise FrameRejected(f"block of {block} bytes at byte {pos} (zstd's limit: {_MAX_BLOCK})")
        pos += 3 + (1 if kind == 1 else block)
        if pos > total:
            raise FrameRejected("truncated: the content frame ends inside a block")
        if last:
            break
    pos += 4  # the checksum
    if pos > total:
        raise FrameRejected("truncated: the content frame's checksum is missing")
    if pos != total:
        raise FrameRejected(f"{total - pos} bytes after the content frame")


def _check_content(f: Prefixed, diff_id: Digest, size: int) -> None:
    """The content frame (``f`` from its magic number on) decompresses to the member's
    content hashing to ``diff_id`` and its zero padding, and to nothing more (the output is
    bounded there; bytes after the frame are the block walk's to refuse)."""
    pad = len(padding(size))
    want = size + pad
    hasher = Sha256Thread()
    seen = 0
    tail = bytearray()
    try:
        for chunk in decompressed_chunks(cast(BinaryIO, f), "application/zstd", what="frame",
                                         chunk_size=_CHUNK, max_size=want):
            content = max(0, min(len(chunk), size - seen))
            if content:
                hasher.update(chunk[:content] if content < len(chunk) else chunk)
            if content < len(chunk):
                tail += chunk[content:]
            seen += len(chunk)
    except LayerTooLarge as e:
        raise FrameRejected(f"decompresses to more than the {want} bytes of the member") from e
    except CorruptLayer as e:
        raise FrameRejected(f"does not decompress: {e.message}") from e
    finally:
        actual = Digest("sha256", hasher.hexdigest())
    if seen != want:
        raise FrameRejected(f"decompresses to {seen} bytes, the member has {want}")
    if any(tail):
        raise FrameRejected("the member's padding is not zeros")
    if actual != diff_id:
        raise FrameRejected(f"the content hashes to {actual}, not the diff_id {diff_id}")
