"""frame_check: a frame from elsewhere is used only when it is exactly the one fetchd writes.

The frames are real: made by ``layer_frame.make_layer_frame`` from catalog-style layers.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
import zstandard
from support.images import Entry, make_layer, prng_bytes, text_bytes

from fetchd.compress_budget import MAX_LEVEL, MIN_LEVEL, compressor
from fetchd.config import Config
from fetchd.digest import Digest
from fetchd.errors import ConfigError
from fetchd.fleet_cache import (
    FRAME_LAYER_TYPE,
    FetchFailed,
    FrameDownload,
    FrameKey,
    _entry,
    _manifest,
)
from fetchd.frame_check import (
    HEADER_PREFIX,
    FrameRejected,
    check_frame,
    content_frame_header,
    max_frame_size,
    member_size,
)
from fetchd.layer_frame import LayerJob, make_layer_frame
from fetchd.pack import FRAME_MEDIA_TYPE


def _layer(seed: str, size: int = 300_000):  # type: ignore[no-untyped-def]
    return make_layer([Entry("etc/a", data=text_bytes(seed, size)),
                       Entry("usr/b", data=prng_bytes(seed, size // 3))])


def _frame(tmp_path: Path, layer, level: int = 3, name: str = "f.zst") -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path / name
    make_layer_frame(io.BytesIO(layer.read()), out, LayerJob(layer.descriptor(), layer.diff_id, 0),
                     level, 1)
    return out


def test_a_frame_made_here_passes_and_records_its_size(tmp_path: Path) -> None:
    layer = _layer("a")
    frame = _frame(tmp_path, layer)
    check_frame(frame, layer.diff_id, 3, layer.tar_size)
    assert member_size(frame.read_bytes()[:HEADER_PREFIX], layer.diff_id) == layer.tar_size
    assert frame.stat().st_size <= max_frame_size(layer.tar_size)


@pytest.mark.parametrize("damage", ["flip", "truncate", "trailing", "drop-checksum"])
def test_damaged_frames_are_rejected(tmp_path: Path, damage: str) -> None:
    layer = _layer("b")
    frame = _frame(tmp_path, layer)
    data = bytearray(frame.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[-1000:]
    elif damage == "trailing":
        data += b"\0" * 7
    else:
        del data[-4:]
    frame.write_bytes(bytes(data))
    with pytest.raises(FrameRejected):
        check_frame(frame, layer.diff_id, 3, layer.tar_size)


def test_a_frame_of_another_layer_or_size_is_rejected(tmp_path: Path) -> None:
    one, other = _layer("c"), _layer("d")
    frame = _frame(tmp_path, other)
    with pytest.raises(FrameRejected, match="header"):
        check_frame(frame, one.diff_id, 3, other.tar_size)
    with pytest.raises(FrameRejected):
        check_frame(frame, other.diff_id, 3, other.tar_size + 512)
    with pytest.raises(ValueError):
        member_size(frame.read_bytes()[:HEADER_PREFIX], one.diff_id)


@pytest.mark.parametrize("fail", [False, True])
def test_a_frame_is_checked_while_it_is_being_written(tmp_path: Path, fail: bool) -> None:
    """check_frame reading a FrameDownload as it grows (the writer in another thread): the
    same verdict as on the complete file; a download that fails ends the check, no hang."""
    layer = _layer("h", 600_000)
    data = _frame(tmp_path, layer).read_bytes()
    download = FrameDownload(tmp_path / "growing.zst")
    reader = download.reader()

    def write() -> None:
        for i in range(0, len(data) // 2 if fail else len(data), 4096):
            download.write(data[i:i + 4096])
        download.finish(failed=fail)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        if fail:
            with pytest.raises(FetchFailed):
                check_frame(download.path, layer.diff_id, 3, layer.tar_size, source=reader,
                            complete=download.wait_done)
        else:
            check_frame(download.path, layer.diff_id, 3, layer.tar_size, source=reader,
                        complete=download.wait_done)
            assert download.digest == Digest.of(data)
    finally:
        writer.join()
        reader.close()


def test_a_frame_of_another_level_is_rejected(tmp_path: Path) -> None:
    layer = _layer("e")
    frame = _frame(tmp_path, layer, level=1)
    with pytest.raises(FrameRejected, match="level 3"):
        check_frame(frame, layer.diff_id, 3, layer.tar_size)
    check_frame(frame, layer.diff_id, 1, layer.tar_size)


def test_the_right_header_with_wrong_content_is_rejected(tmp_path: Path) -> None:
    """A hand-made frame: this layer's header frame, then another content at this level."""
    layer, other = _layer("f"), _layer("g")
    good = _frame(tmp_path, layer).read_bytes()
    bad_content = _frame(tmp_path, other, name="o.zst").read_bytes()
    header_len = 522
    forged = tmp_path / "forged.zst"
    forged.write_bytes(good[:header_len] + bad_content[header_len:])
    with pytest.raises(FrameRejected):
        check_frame(forged, layer.diff_id, 3, layer.tar_size)


@pytest.mark.parametrize("level", range(MIN_LEVEL, MAX_LEVEL + 1))
def test_content_frame_header_is_what_the_compressor_writes(level: int) -> None:
    # the check relies on it: every content frame at a level starts with these bytes
    for threads in (1, 2):
        out = io.BytesIO()
        w = compressor(level, threads).stream_writer(out, closefd=False)
        w.write(b"x" * 70_000)
        w.flush(zstandard.FLUSH_FRAME)
        assert out.getvalue().startswith(content_frame_header(level))


def test_frame_key_tags_fit_the_tag_grammar() -> None:
    key = FrameKey(Digest("sha256", "ab" * 32), 19, "1.5.7", 1)
    assert key.tag == "ab" * 32 + ".l19.z1.5.7.f1" and len(key.tag) <= 128
    with pytest.raises(ValueError):
        _ = FrameKey(Digest("sha512", "ab" * 64), 3, "1.5.7", 1).tag
    assert FRAME_LAYER_TYPE == FRAME_MEDIA_TYPE


def test_entries_must_name_their_key_exactly() -> None:
    key = FrameKey(Digest("sha256", "cd" * 32), 3, "1.5.7", 1)
    frame = Digest("sha256", "ef" * 32)
    entry = _entry(key, _manifest(key, frame, 1234, 999))
    assert (entry.digest, entry.size, entry.layer_size) == (frame, 1234, 999)
    other = FrameKey(key.diff_id, 3, "1.5.8", 1)
    with pytest.raises(Exception, match="zstd"):
        _entry(other, _manifest(key, frame, 1234, 999))
    with pytest.raises(Exception, match="JSON"):
        _entry(key, b"[" * 100_000)


def test_fleet_config() -> None:
    cfg = Config.from_dict({"fleet": {"frame_cache": "http://127.0.0.1:5000/ci/fetchd-frames",
                                      "push": True, "push_bandwidth": "8MiB"}})
    assert cfg.fleet.repository == "ci/fetchd-frames" and cfg.fleet.host == "127.0.0.1:5000"
    assert cfg.fleet.push_bandwidth == 8 << 20 and cfg.fleet.push is True
    assert Config.from_dict({}).fleet.frame_cache is None
    for bad in ("ftp://h/r", "http://h", "http://h/UPPER", "http://u:p@h/r"):
        with pytest.raises(ConfigError, match="frame_cache"):
            Config.from_dict({"fleet": {"frame_cache": bad}})
    with pytest.raises(ConfigError, match="unknown key"):
        Config.from_dict({"fleet": {"frame_cache": "http://h/r", "pushh": True}})
