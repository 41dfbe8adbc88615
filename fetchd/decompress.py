"""Streaming decompression of layer blobs: gzip (all members), zstd (all frames) or plain.

The format is decided by magic bytes (``manifest.layer_compression``), never by media type
alone: registries mislabel layers. Output comes in chunks of at most ``chunk_size`` bytes, so
memory stays flat however large the layer is. isal and python-zstandard release the GIL while
they work, so several layers decompress in parallel threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, BinaryIO, Protocol, cast

import zstandard
from isal import igzip_lib

from .errors import LayerTooLarge, ManifestInvalid
from .manifest import layer_compression

CHUNK = 1 << 20
# the stubs do not say IsalError is an exception class; it is one
_ISAL_ERROR = cast(type[Exception], igzip_lib.IsalError)
_GZIP_MAGIC = b"\x1f\x8b"


class CorruptLayer(ManifestInvalid):
    """A layer blob whose compressed stream is damaged or truncated."""

    code = "corrupt-layer"


def decompressed_chunks(src: BinaryIO, media_type: str = "", *, what: str = "layer",
                        chunk_size: int = CHUNK, max_size: int | None = None,
                        limit: str = "") -> Iterator[bytes]:
    """The uncompressed bytes of ``src`` (read from its current position), chunk by chunk.

    Gzip: every member, in order (eStargz and pigz write several); trailing zero bytes after
    the last member are ignored, any other trailing data is an error. Zstd: every frame
    (zstd:chunked), skippable frames skipped. Anything else passes through unchanged.

    ``max_size``: LayerTooLarge (its message ends with ``limit``, what the bound is and what
    to do) as soon as the output would pass it; no more than ``max_size`` bytes are yielded
    and at most one chunk beyond them is made (a decompression bomb costs no more than that).
    """
    chunks = _chunks(src, media_type, what, chunk_size)
    if max_size is None:
        yield from chunks
        return
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_size:
            raise LayerTooLarge(f"{what}: expands to more than {max_size} bytes{limit}")
        yield chunk


def _chunks(src: BinaryIO, media_type: str, what: str, chunk_size: int) -> Iterator[bytes]:
    head = src.read(4)
    kind = layer_compression(media_type, head) if head else "none"
    if kind == "gzip":
        yield from _gunzip(src, head, what, chunk_size)
    elif kind == "zstd":
        yield from _unzstd(src, head, what, chunk_size)
    else:
        if head:
            yield head
        while chunk := src.read(chunk_size):
            yield chunk


def _gunzip(src: BinaryIO, head: bytes, what: str, chunk_size: int) -> Iterator[bytes]:
    data = head
    member = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)
    try:
        while True:
            out = member.decompress(data, chunk_size)
            data = b""
            if out:
                yield out
            if member.eof:
                rest = member.unused_data
                while len(rest) < len(_GZIP_MAGIC) and (more := src.read(chunk_size)):
                    rest += more
                if not rest:
                    return
                if not rest.startswith(_GZIP_MAGIC):
                    _check_trailing_zeros(src, rest, what, chunk_size)
                    return
                member = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)
                data = rest
            elif member.needs_input:
                data = src.read(chunk_size)
                if not data:
                    raise CorruptLayer(f"{what}: gzip stream ends before its end marker (truncated)")
    except _ISAL_ERROR as e:
        raise CorruptLayer(f"{what}: gzip stream is corrupt ({e})") from e


def _check_trailing_zeros(src: BinaryIO, rest: bytes, what: str, chunk_size: int) -> None:
    while rest:
        if rest.count(0) != len(rest):
            raise CorruptLayer(f"{what}: unexpected data after the last gzip member")
        rest = src.read(chunk_size)


class Readable(Protocol):
    """Anything read as a stream: ``read(n)`` returns at most ``n`` bytes, b"" at the end."""

    def read(self, n: int = -1, /) -> bytes: ...


class Prefixed:
    """A reader that first returns ``head``, then the rest of ``src``: bytes already taken
    from a stream, put back in front of it."""

    def __init__(self, head: bytes, src: Readable) -> None:
        self.head = head
        self.src = src

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                out, self.head = self.head + self.src.read(), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            return out if len(out) == n else out + self.src.read(n - len(out))
        return self.src.read(n)


def _unzstd(src: BinaryIO, head: bytes, what: str, chunk_size: int) -> Iterator[bytes]:
    # Layers made with ``zstd --long`` need windows beyond the 128 MiB default; 512 MiB covers
    # --long=29 while keeping a hostile layer from making us allocate gigabytes.
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << 29)
    reader = dctx.stream_reader(cast(IO[bytes], Prefixed(head, src)), read_size=chunk_size, read_across_frames=True,
                                closefd=False)
    try:
        while chunk := reader.read(chunk_size):
            yield chunk
    except zstandard.ZstdError as e:
        raise CorruptLayer(f"{what}: zstd stream is corrupt ({e})") from e
