"""decompress: every gzip member, every zstd frame, plain passthrough; damage is reported."""

from __future__ import annotations

import gzip
import io
import random
import struct

import pytest
import zstandard

from fetchd.decompress import CorruptLayer, decompressed_chunks

DATA = random.Random(7).randbytes(300_000) + b"text " * 400_000  # ~2.3 MB, two kinds of bytes


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def _skippable(payload: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A50, len(payload)) + payload


def _run(blob: bytes, media_type: str = "", chunk_size: int = 65536) -> bytes:
    chunks = list(decompressed_chunks(io.BytesIO(blob), media_type, chunk_size=chunk_size))
    assert all(len(c) <= chunk_size for c in chunks)
    return b"".join(chunks)


@pytest.mark.parametrize("name,blob", [
    ("gzip", _gz(DATA)),
    ("gzip, 3 members", _gz(DATA[:10]) + _gz(DATA[10:1_000_000]) + _gz(DATA[1_000_000:])),
    ("gzip, empty member inside", _gz(DATA[:5]) + _gz(b"") + _gz(DATA[5:])),
    ("gzip + zero padding", _gz(DATA) + b"\0" * 100),
    ("zstd", _zst(DATA)),
    ("zstd, 3 frames", _zst(DATA[:7]) + _zst(DATA[7:2_000_000]) + _zst(DATA[2_000_000:])),
    ("zstd + skippable frame", _zst(DATA[:100]) + _skippable(b"meta") + _zst(DATA[100:])),
    ("plain", DATA),
])
def test_whole_content_comes_out(name: str, blob: bytes) -> None:
    assert _run(blob) == DATA


def test_magic_wins_over_media_type() -> None:
    assert _run(DATA, "application/vnd.oci.image.layer.v1.tar+gzip") == DATA
    assert _run(_gz(DATA), "application/vnd.oci.image.layer.v1.tar") == DATA


def test_empty_blob() -> None:
    assert _run(b"") == b""


@pytest.mark.parametrize("name,blob,match", [
    ("truncated gzip", _gz(DATA)[:-100], "truncated"),
    ("gzip crc", _gz(DATA)[:-8] + b"\0\0\0\0" + _gz(DATA)[-4:], "corrupt"),
    ("garbage after gzip", _gz(DATA) + b"PK\3\4", "after the last gzip member"),
    ("corrupt zstd", _zst(DATA)[:4] + b"\xff" * 64, "corrupt"),
    ("zstd checksum", zstandard.ZstdCompressor(write_checksum=True).compress(DATA)[:-1] + b"?",
     "corrupt"),
])
def test_damage_is_reported(name: str, blob: bytes, match: str) -> None:
    with pytest.raises(CorruptLayer, match=match):
        _run(blob)


# --------------------------------------------------------------------------- bombs


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_bomb_stops_at_its_bound(kind: str) -> None:
    """Issue 13: a small layer expanding to gigabytes cost seconds of CPU. With ``max_size``
    the decompression stops as soon as the output passes it: no byte beyond it is yielded."""
    from fetchd.errors import LayerTooLarge

    zeros = bytes(64 << 20)  # 64 MiB of zeros: ~64 KiB as gzip, a few KiB as zstd
    blob = _gz(zeros) if kind == "gzip" else _zst(zeros)
    assert len(blob) < 128 << 10
    out = 0
    with pytest.raises(LayerTooLarge) as err:
        for chunk in decompressed_chunks(io.BytesIO(blob), max_size=3 << 20, what="layer x",
                                         limit=" (the test's bound)"):
            out += len(chunk)
    assert out <= 3 << 20
    assert err.value.code == "layer-too-large"
    assert err.value.message == f"layer x: expands to more than {3 << 20} bytes (the test's bound)"


def test_a_layer_within_its_bound_is_whole() -> None:
    blob = _gz(DATA)
    chunks = decompressed_chunks(io.BytesIO(blob), max_size=len(DATA))
    assert b"".join(chunks) == DATA
