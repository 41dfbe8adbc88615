"""pack's look-ahead window: a pack works on at most ``[pack] window`` layers ahead of its
archive's write position, so its descriptors follow the work in progress, not the layer count.

Issue 14: a cold pull of a 1000-layer image peaked at 1035 descriptors: every layer started at
once, and the frames finished out of turn stayed open (``tmp/*.frame.zst (deleted)``) until the
archive, written in layer order, reached them. Each test holds the archive's head (its first
layer still downloading) so that every later layer could run ahead, and counts what is open.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_sinks import HalfThenWait
from support.images import PlatformImage, make_image, make_layer, text_bytes

from fetchd.compress_budget import CompressionBudget
from fetchd.config import PackConfig
from fetchd.digest import Digest
from fetchd.layer_store import LayerStore, StoreSettings
from fetchd.manifest import ImageManifest, parse_manifest
from fetchd.pack import PackResult, pack_image, window_size


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[LayerStore, LayerStore]]:
    """The store under test and a reference store (complete images, packed at once)."""
    s = LayerStore(tmp_path / "s", StoreSettings(fsync=False))
    r = LayerStore(tmp_path / "r", StoreSettings(fsync=False))
    try:
        yield s, r
    finally:
        s.close()
        r.close()


def _image(layers: list[Any]) -> PlatformImage:
    return make_image("linux/amd64", layers)


def _layers(tag: str, n: int) -> list[Any]:
    return [make_layer(text_bytes(f"{tag}{i}", 6000 + 37 * i), "gzip") for i in range(n)]


def _manifest(part: PlatformImage) -> ImageManifest:
    m = parse_manifest(part.manifest_bytes, part.manifest_media_type, "t")
    assert isinstance(m, ImageManifest)
    return m


def _put(store: LayerStore, data: bytes) -> None:
    tmp = store.temp_path(".blob")
    tmp.write_bytes(data)
    store.commit_file(tmp, digest=Digest.of(data))


async def _reference(store: LayerStore, part: PlatformImage, repo_tag: str) -> PackResult:
    _put(store, part.config_bytes)
    for layer in part.layers:
        _put(store, layer.read())
    return await pack_image(store, _manifest(part), part.config_bytes, repo_tag, 3)


def _open_files(matches: Callable[[str], bool]) -> int:
    """This process's descriptors whose target ``matches``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += matches(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return count


class _Follow:
    """The store as pack's FollowSource, counting the layers that waited for bytes."""

    def __init__(self, store: LayerStore) -> None:
        self.store = store
        self.waits = 0

    def open_following(self, digest: Digest, stop: Any) -> Any:
        return self.store.open_following(digest, stop)

    def read_following(self, digest: Digest) -> Any:
        return self.store.read_following(digest)

    async def wait_for_bytes(self, digest: Digest, at_least: int) -> None:
        self.waits += 1
        await self.store.wait_for_bytes(digest, at_least)


async def _until(cond: Callable[[], bool]) -> None:
    """Poll ``cond`` (the test's timeout bounds the wait; no wall-clock assertion)."""
    while not cond():  # noqa: ASYNC110 -- set by worker threads, there is no event to await
        await asyncio.sleep(0.005)


def test_the_default_window_keeps_every_core_busy_and_is_configurable() -> None:
    assert window_size(PackConfig(), 2) == 16
    assert window_size(PackConfig(), 64) == 256
    assert window_size(PackConfig(window=3), 64) == 3


async def test_layers_made_ahead_of_the_archive_stay_within_the_window(
        stores: tuple[LayerStore, LayerStore]) -> None:
    """40 layers; the first still downloads, the 39 others are in the store. Without a
    window all 39 were compressed at once and held open until the first came in."""
    store, reference = stores
    window = 4
    part = _image(_layers("ahead", 40))
    first, *rest = part.layers
    _put(store, part.config_bytes)
    for layer in rest:
        _put(store, layer.read())
    fetch = HalfThenWait(first.read())
    download = asyncio.create_task(store.ensure_blob(first.digest, first.size, fetch))
    await fetch.half_written.wait()
    done: list[str] = []
    open_frames: list[int] = []

    def progress(event: dict[str, Any]) -> None:  # worker threads: as each frame is done
        if event["state"] == "layer-done":
            done.append(event["diff_id"])
            open_frames.append(_open_files(lambda target: ".frame.zst" in target))

    budget = CompressionBudget(workers=2)
    packing = asyncio.create_task(pack_image(
        store, _manifest(part), part.config_bytes, "x:1", 3, follow=_Follow(store),
        budget=budget, progress=progress, limits=PackConfig(window=window)))
    await _until(lambda: len(done) >= window - 1)
    await _until(lambda: budget.active == 0)  # nothing else compresses: the window is full
    assert len(done) == window - 1 and str(first.diff_id) not in done
    assert not packing.done()
    fetch.release.set()
    await download
    result = await packing
    assert len(done) == len(part.layers)
    # Never more frame files open than the window: each layer in it holds at most one (its
    # frame being written, or done and waiting for its turn). The layer at the archive's
    # write position usually writes straight into the archive, but one that starts while its
    # predecessor is still being copied in writes a file of its own (seen under load).
    assert max(open_frames) <= window
    assert result.digest == (await _reference(reference, part, "x:1")).digest
    assert list(store.tmp_dir.iterdir()) == []


async def test_cached_frames_are_opened_only_inside_the_window(
        stores: tuple[LayerStore, LayerStore]) -> None:
    """An image whose 39 later layers have cached frames (spans of another image's archive)
    and whose first layer still downloads: the cached frames are opened as the window
    reaches them, not all at once (a descriptor each on the other archive)."""
    store, reference = stores
    window = 4
    layers = _layers("cached", 40)
    first = layers[0]
    base = _image(layers[1:])
    packed = await _reference(store, base, "base:1")  # frames of layers 1..39 cached
    part = _image(layers)
    _put(store, part.config_bytes)
    fetch = HalfThenWait(first.read())
    download = asyncio.create_task(store.ensure_blob(first.digest, first.size, fetch))
    await fetch.half_written.wait()
    follow = _Follow(store)
    packing = asyncio.create_task(pack_image(
        store, _manifest(part), part.config_bytes, "x:1", 3, follow=follow,
        limits=PackConfig(window=window)))
    await _until(lambda: follow.waits == 1)  # the first layer waits for its bytes
    archive = str(packed.path)
    assert _open_files(lambda target: target == archive) == window - 1
    fetch.release.set()
    await download
    result = await packing
    assert (result.frames_compressed, result.frames_reused) == (1, 39)
    assert result.digest == (await _reference(reference, part, "x:1")).digest
    assert _open_files(lambda target: target == archive) == 0


@pytest.mark.parametrize("window", [1, 2, 5])
async def test_packs_sharing_layers_in_opposite_order_complete(
        stores: tuple[LayerStore, LayerStore], window: int) -> None:
    """Two images of the same 12 layers, one in reverse order, packed at once with a small
    window and one compression slot, their heads still downloading: each waits for frames
    the other makes (single-flight), and neither may wait for a layer outside the other's
    window. Both complete, with the bytes of packs made alone."""
    store, reference = stores
    layers = _layers("both", 12)
    forward, backward = _image(layers), _image(layers[::-1])
    for part in (forward, backward):
        _put(store, part.config_bytes)
    heads = (layers[0], layers[-1])
    for layer in layers:
        if layer not in heads:
            _put(store, layer.read())
    fetches = [HalfThenWait(layer.read()) for layer in heads]
    downloads = [asyncio.create_task(store.ensure_blob(layer.digest, layer.size, fetch))
                 for layer, fetch in zip(heads, fetches, strict=True)]
    for fetch in fetches:
        await fetch.half_written.wait()
    budget = CompressionBudget(workers=1)
    follow = _Follow(store)
    limits = PackConfig(window=window)
    packs = [asyncio.create_task(pack_image(
        store, _manifest(part), part.config_bytes, f"{name}:1", 3, follow=follow,
        budget=budget, limits=limits))
        for name, part in (("forward", forward), ("backward", backward))]
    await _until(lambda: follow.waits >= 2)
    for fetch in fetches:
        fetch.release.set()
    await asyncio.gather(*downloads)
    got = await asyncio.gather(*packs)
    # every layer compressed once or twice in all (twice when a pack came to it after the
    # other's frame was done but not yet committed), never by both at once
    assert 12 <= sum(r.frames_compressed for r in got) <= 24
    for result, (name, part) in zip(got, (("forward", forward), ("backward", backward)),
                                    strict=True):
        assert result.digest == (await _reference(reference, part, f"{name}:1")).digest
    assert (budget.active, budget.parked, budget.used, budget.waiting) == (0, 0, 0, 0)


async def test_frame_workers_are_threads_kept_for_the_next_layer(
        stores: tuple[LayerStore, LayerStore]) -> None:
    """A thread per layer cost the event loop a thread start each (the loop waits until the
    new thread runs: ~1 ms on a loaded host, a second for a 1000-layer image). Frame workers
    are kept: 40 layers, two compressions at once, start at most two threads (none when
    earlier packs left idle ones); none works once the pack returned."""
    import threading

    from fetchd import pack as pack_module

    store, reference = stores
    part = _image(_layers("reuse", 40))
    for data in (part.config_bytes, *(layer.read() for layer in part.layers)):
        _put(store, data)
    workers: list[threading.Thread] = []  # kept alive: no two distinct threads compare equal

    def progress(event: dict[str, Any]) -> None:
        if event["state"] == "layer-done":  # sent by the frame worker itself
            workers.append(threading.current_thread())

    started = pack_module._WORKERS.started
    result = await pack_image(store, _manifest(part), part.config_bytes, "x:1", 3,
                              budget=CompressionBudget(workers=2), progress=progress)
    assert len(workers) == 40
    assert pack_module._WORKERS.started - started <= 2  # at most the compressions at once
    assert not any(t.name == "fetchd-pack" for t in threading.enumerate())
    assert result.digest == (await _reference(reference, part, "x:1")).digest


async def test_only_big_layers_hash_in_a_thread_of_their_own(
        stores: tuple[LayerStore, LayerStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """A hashing thread per layer cost a thread start for every small layer of a many-layer
    image; the bytes are the same either way."""
    import random

    from fetchd import layer_frame

    started: list[int] = []

    class Counted(layer_frame.Sha256Thread):
        def __init__(self) -> None:
            started.append(1)
            super().__init__()

    monkeypatch.setattr(layer_frame, "Sha256Thread", Counted)
    store, reference = stores
    big = make_layer(random.Random(5).randbytes(layer_frame.HASH_THREAD_FROM + 1), "gzip")
    part = _image([*_layers("small", 6), big])
    assert big.size > layer_frame.HASH_THREAD_FROM
    for data in (part.config_bytes, *(layer.read() for layer in part.layers)):
        _put(store, data)
    result = await pack_image(store, _manifest(part), part.config_bytes, "x:1", 3,
                              budget=CompressionBudget(workers=2))
    assert len(started) == 1  # the big layer's (two zstd threads: the hash beside them)
    assert result.digest == (await _reference(reference, part, "x:1")).digest
