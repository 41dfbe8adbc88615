"""pack: the zstd docker-archive equals skopeo's, loads in real tools, and reuses layer frames.

Every image and platform of the catalog is packed from a store and compared, decompressed,
byte for byte with ``skopeo copy docker://... docker-archive:OUT:NAME:TAG`` (skopeo outputs are
cached for the session). Tests that need no skopeo fill the store from the catalog directly:
pack never talks to a registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import zstandard
from registry_sinks import HalfThenWait
from support.images import (
    CATALOG_NAMES,
    Catalog,
    PlatformImage,
    build_catalog,
    make_image,
    make_layer,
)

from fetchd.archive_format import docker_archive_chunks
from fetchd.compress_budget import CompressionBudget, check_level, compressor, context_memory
from fetchd.digest import BlobSpan, Digest
from fetchd.errors import CompressionLevelInvalid, DiffIdMismatch, DigestMismatch, StoreError
from fetchd.layer_frame import LayerJob, make_layer_frame, raw_zstd_frame
from fetchd.layer_store import LayerStore, StoreSettings
from fetchd.manifest import ImageManifest, parse_manifest
from fetchd.pack import PackResult, archive_key, frame_key, pack_image

# --------------------------------------------------------------------------- helpers


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LayerStore]:
    s = LayerStore(tmp_path / "store", StoreSettings(fsync=False))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def catalog() -> dict[str, Any]:
    """The catalog, built locally (no registry): enough for every test that needs no skopeo."""
    return {img.name: img for img in build_catalog()}


def put_blob(store: LayerStore, data: bytes) -> Digest:
    tmp = store.temp_path(".blob")
    tmp.write_bytes(data)
    return store.commit_file(tmp, digest=Digest.of(data))


def put_image(store: LayerStore, part: PlatformImage) -> ImageManifest:
    """The platform image's config and layer blobs into the store; its parsed manifest."""
    put_blob(store, part.config_bytes)
    for layer in part.layers:
        put_blob(store, layer.read())
    manifest = parse_manifest(part.manifest_bytes, part.manifest_media_type, "test")
    assert isinstance(manifest, ImageManifest)
    return manifest


async def pack(store: LayerStore, part: PlatformImage, repo_tag: str = "example.com/test:1",
               level: int = 3, **kw: Any) -> PackResult:
    manifest = put_image(store, part)
    return await pack_image(store, manifest, part.config_bytes, repo_tag, level, **kw)


def unzstd(path: Path) -> bytes:
    with open(path, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        return reader.read()


def run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run([str(a) for a in args], capture_output=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{args[0]} failed: {r.stderr.decode(errors='replace')[-2000:]}"
    return r


def all_parts(catalog: dict[str, Any]) -> Iterable[tuple[str, str, PlatformImage]]:
    for name in CATALOG_NAMES:
        for plat, part in catalog[name].platforms.items():
            yield name, plat, part


@pytest.fixture(scope="session")
def skopeo_archive(tmp_path_factory: pytest.TempPathFactory,
                   images: Catalog) -> Callable[[str, PlatformImage, str], bytes]:
    """skopeo 1.9's docker-archive of a pushed platform image (by manifest digest), cached."""
    root = tmp_path_factory.mktemp("skopeo-archives")
    cache: dict[tuple[str, str, str], bytes] = {}

    def get(name: str, part: PlatformImage, repo_tag: str) -> bytes:
        key = (name, str(part.manifest_digest), repo_tag)
        if key not in cache:
            img = images[name]
            out = root / f"{len(cache)}.tar"
            source = f"docker://{images.host}/{img.repository}@{part.manifest_digest}"
            if any(layer.compression == "zstd" for layer in part.layers):
                # skopeo 1.9 refuses zstd layers on the way to docker-archive ("zstd compression
                # is not supported for docker images"): decompress into dir: first.
                plain = root / f"{len(cache)}.dir"
                run("skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-decompress",
                    source, f"dir:{plain}")
                source = f"dir:{plain}"
            run("skopeo", "copy", "-q", "--src-tls-verify=false", source,
                f"docker-archive:{out}:{repo_tag}")
            cache[key] = out.read_bytes()
        return cache[key]

    return get


# --------------------------------------------------------------------------- skopeo equality


@pytest.mark.registry
@pytest.mark.parametrize("name", CATALOG_NAMES)
async def test_archive_equals_skopeo_for_every_platform(
        name: str, images: Catalog, store: LayerStore,
        skopeo_archive: Callable[[str, PlatformImage, str], bytes]) -> None:
    img = images[name]
    repo_tag = f"{images.host}/{img.repository}:{img.tag}"
    for part in img.platforms.values():
        result = await pack(store, part, repo_tag)
        expected = skopeo_archive(name, part, repo_tag)
        got = unzstd(result.path)
        assert got == expected, f"{name} {part.platform}: archive differs from skopeo's"
        # the pure reference writer gives the same bytes from the plain layer tars
        golden = b"".join(docker_archive_chunks(
            part.config_bytes, [io.BytesIO(layer.tar()) for layer in part.layers], repo_tag))
        assert golden == expected


@pytest.mark.registry
@pytest.mark.parametrize("repo_tag", ["debian:bookworm", "foo/bar", "index.docker.io/x/y:2",
                                      "localhost/a:b"])
async def test_repo_tag_normalized_as_skopeo(
        repo_tag: str, images: Catalog, store: LayerStore,
        skopeo_archive: Callable[[str, PlatformImage, str], bytes]) -> None:
    part = images["single-docker"].only
    result = await pack(store, part, repo_tag)
    assert unzstd(result.path) == skopeo_archive("single-docker", part, repo_tag)


# --------------------------------------------------------------------------- real loaders


@pytest.mark.registry
async def test_skopeo_podman_zstd_and_pzstd_accept_the_archive(
        images: Catalog, store: LayerStore, tmp_path: Path) -> None:
    part = images["multi-oci"].platform("linux/arm64/v8")
    repo_tag = f"{images.host}/fetchd-test/loaded:arm64"
    result = await pack(store, part, repo_tag)
    archive = tmp_path / "image.tar.zst"
    shutil.copyfile(result.path, archive)
    plain = unzstd(archive)

    run("skopeo", "copy", "-q", f"docker-archive:{archive}", f"oci:{tmp_path / 'oci'}")
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    assert len(index["manifests"]) == 1

    assert run("zstd", "-d", "-c", "-q", archive).stdout == plain
    assert run("pzstd", "-d", "-c", "-q", archive).stdout == plain

    # podman wants a runroot path under 50 characters: pytest's tmp_path is longer
    runroot = Path(tempfile.mkdtemp(prefix="fetchd-rr-"))
    try:
        podman = ["podman", "--storage-driver", "vfs", "--root", tmp_path / "root",
                  "--runroot", runroot]
        out = run(*podman, "load", "-i", archive).stdout.decode()
        assert f"Loaded image: {repo_tag}" in out
        listed = run(*podman, "images", "--format", "{{.Repository}}:{{.Tag}}").stdout.decode()
        assert repo_tag in listed.split()
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


# --------------------------------------------------------------------------- determinism


async def test_same_input_same_bytes_for_any_thread_count(tmp_path: Path,
                                                          catalog: dict[str, Any]) -> None:
    part = catalog["multimember"].only
    digests = []
    for i, threads in enumerate([1, 2, 4, 2]):
        s = LayerStore(tmp_path / f"s{i}", StoreSettings(fsync=False))
        try:
            result = await pack(s, part, "debian:bookworm", 3, threads=threads)
            digests.append(result.digest)
        finally:
            s.close()
    assert len(set(digests)) == 1


async def test_multi_job_frames_identical_for_any_thread_count(tmp_path: Path) -> None:
    # 24 MiB of text: several zstd jobs per frame at level 3, so the workers really split it
    from support.images import text_bytes

    base = text_bytes("determinism", 1 << 20)
    content = b"".join(base[i * 4099:] + base[:i * 4099] for i in range(24))
    layer = make_layer(content, "none")  # plain: the test is about compression, not gunzip
    part = make_image("linux/amd64", [layer])
    digests = set()
    for threads in (1, 2, 4):
        s = LayerStore(tmp_path / f"s{threads}", StoreSettings(fsync=False))
        try:
            digests.add((await pack(s, part, "x:1", 3, threads=threads)).digest)
        finally:
            s.close()
    assert len(digests) == 1


def test_raw_frame_decodes_with_zstd() -> None:
    data = bytes(range(256)) * 2
    assert zstandard.ZstdDecompressor().decompress(raw_zstd_frame(data)) == data
    assert len(raw_zstd_frame(data)) == 522


# --------------------------------------------------------------------------- incremental


async def test_second_image_compresses_only_its_new_layers(store: LayerStore,
                                                           catalog: dict[str, Any]) -> None:
    a = await pack(store, catalog["shared-a"].only)
    assert (a.frames_compressed, a.frames_reused, a.archive_reused) == (3, 0, False)
    b = await pack(store, catalog["shared-b"].only)
    assert (b.frames_compressed, b.frames_reused) == (1, 2)
    part = catalog["shared-b"].only
    assert unzstd(b.path) == b"".join(docker_archive_chunks(
        part.config_bytes, [io.BytesIO(layer.tar()) for layer in part.layers], "example.com/test:1"))
    again = await pack(store, catalog["shared-b"].only)
    assert again.archive_reused and again.digest == b.digest
    assert (again.frames_compressed, again.frames_reused) == (0, 3)


async def test_concurrent_packs_share_a_frame_in_flight(store: LayerStore,
                                                       catalog: dict[str, Any]) -> None:
    # two images on one base, packed at the same moment: the base is compressed once
    a, b = await asyncio.gather(pack(store, catalog["shared-a"].only),
                                pack(store, catalog["shared-b"].only))
    assert a.frames_compressed + b.frames_compressed == 4
    assert a.frames_compressed + a.frames_reused == 3 == b.frames_compressed + b.frames_reused
    for r, name in ((a, "shared-a"), (b, "shared-b")):
        part = catalog[name].only
        expected = b"".join(docker_archive_chunks(
            part.config_bytes, [io.BytesIO(layer.tar()) for layer in part.layers],
            "example.com/test:1"))
        assert unzstd(r.path) == expected


async def test_level_change_recompresses_from_the_store_alone(store: LayerStore,
                                                              catalog: dict[str, Any]) -> None:
    # No registry anywhere in this test: pack only reads the store.
    part = catalog["single-oci"].only
    r3 = await pack(store, part, level=3)
    r9 = await pack(store, part, level=9)
    assert r9.frames_compressed == len(part.layers) and r9.frames_reused == 0
    assert r9.digest != r3.digest
    assert unzstd(r3.path) == unzstd(r9.path)
    for layer in part.layers:
        # the level-9 frames are cached as spans of the level-9 archive, not stored twice
        frame = store.get_frame(frame_key(layer.diff_id, 9))
        assert frame is not None and frame.digest == r9.digest
        assert store.get_alias("frame", frame_key(layer.diff_id, 9)) is None


async def test_duplicate_layer_is_compressed_once(store: LayerStore, catalog: dict[str, Any]) -> None:
    part = catalog["dup-layer"].only
    result = await pack(store, part)
    assert len(part.layers) == 4
    assert result.frames_compressed == 3


async def test_archive_cached_under_manifest_digest_key(store: LayerStore,
                                                        catalog: dict[str, Any]) -> None:
    part = catalog["single-docker"].only
    result = await pack(store, part, "debian:12", manifest_digest=part.manifest_digest)
    key = archive_key(part.manifest_digest, "docker.io/library/debian:12", 3)
    assert key == archive_key(part.manifest_digest, "debian:12", 3)
    assert store.get_alias("archive", key) == result.digest


async def test_progress_events(store: LayerStore, catalog: dict[str, Any]) -> None:
    events: list[dict[str, Any]] = []
    await pack(store, catalog["shared-a"].only, progress=events.append)
    states = [e["state"] for e in events]
    assert states.count("layer") == 3 and states.count("layer-done") == 3
    assert states[-1] == "done"


# --------------------------------------------------------------------------- refusals


async def test_wrong_diff_id_is_refused_and_nothing_is_delivered(store: LayerStore) -> None:
    good = make_layer(b"\0" * 2048)
    other = make_layer(b"\1" * 2048)
    # a config whose second diff_id names other content than the layer blob holds
    part = make_image("linux/amd64", [good, other])
    lying = json.loads(part.config_bytes)
    wrong = Digest.of(b"something else")
    lying["rootfs"]["diff_ids"][1] = str(wrong)
    bad_part = make_image("linux/amd64", [good, other], config=json.dumps(lying).encode())
    with pytest.raises(DiffIdMismatch) as info:
        await pack(store, bad_part, "victim:1", image_name="example.com/victim:1")
    message = info.value.message
    assert "example.com/victim:1" in message and str(other.digest) in message
    assert str(wrong) in message and str(other.diff_id) in message
    key = archive_key(Digest.of(bad_part.config_bytes), "victim:1", 3)
    assert store.get_alias("archive", key) is None
    assert store.get_frame(frame_key(wrong, 3)) is None
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("level", [0, 20, -1, True, "3", 3.0, None])
async def test_invalid_levels_refused(level: Any, store: LayerStore, catalog: dict[str, Any]) -> None:
    with pytest.raises(CompressionLevelInvalid, match="1 to 19"):
        check_level(level)
    with pytest.raises(CompressionLevelInvalid):
        await pack(store, catalog["single-oci"].only, level=level)


async def test_config_not_of_this_manifest_is_refused(store: LayerStore,
                                                      catalog: dict[str, Any]) -> None:
    part = catalog["single-oci"].only
    manifest = put_image(store, part)
    with pytest.raises(DigestMismatch):
        await pack_image(store, manifest, part.config_bytes + b" ", "x:1", 3)


async def test_disk_full_while_packing_is_a_store_error_and_keeps_nothing(
        store: LayerStore, catalog: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from fetchd import archive_writer

    part = catalog["single-oci"].only
    manifest = put_image(store, part)

    def full(self: object, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(archive_writer.FrameSink, "write", full)
    with pytest.raises(StoreError) as info:
        await pack_image(store, manifest, part.config_bytes, "x:1", 3)
    assert str(store.root) in info.value.message and "full" in info.value.message
    assert list(store.tmp_dir.iterdir()) == []
    monkeypatch.undo()
    result = await pack_image(store, manifest, part.config_bytes, "x:1", 3)
    assert result.frames_compressed == len(part.layers)


# --------------------------------------------------------------------------- the protocol


class FakeStore:
    """The smallest PackStore: blobs in a dict-backed directory; records what pack asks for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.aliases: dict[tuple[str, str], Digest] = {}
        self.spans: dict[str, BlobSpan] = {}
        self.opened: list[Digest] = []
        self.leased: list[Digest] = []
        self._n = 0

    def add(self, data: bytes) -> Digest:
        d = Digest.of(data)
        self.blob_path(d).write_bytes(data)
        return d

    def open_blob(self, digest: Digest) -> BinaryIO:
        self.opened.append(digest)
        return open(self.blob_path(digest), "rb")

    def get_alias(self, kind: str, key: str) -> Digest | None:
        return self.aliases.get((kind, key))

    def temp_path(self, suffix: str = "") -> Path:
        self._n += 1
        return self.root / f"tmp{self._n}{suffix}"

    def commit_file(self, tmp: Path, digest: Digest | None = None,
                    alias: tuple[str, str] | None = None, media_type: str | None = None,
                    frame_spans: Sequence[tuple[str, int, int]] = (),
                    lease: str | None = None,
                    hashed: tuple[Digest, int] | None = None) -> Digest:
        data = tmp.read_bytes()
        d = Digest.of(data)
        if hashed is not None:  # the packer's own hash of what it wrote must be the file's
            assert hashed == (d, len(data))
        tmp.replace(self.blob_path(d))
        if alias:
            self.aliases[alias] = d
        for key, offset, length in frame_spans:
            self.spans[key] = BlobSpan(d, offset, length)
        return d

    def get_frame(self, key: str) -> BlobSpan | None:
        own = self.aliases.get(("frame", key))
        if own is not None:
            return BlobSpan(own, 0, self.blob_path(own).stat().st_size)
        return self.spans.get(key)

    def blob_path(self, digest: Digest) -> Path:
        return self.root / digest.hex

    @asynccontextmanager
    async def alease(self, digests: Iterable[Digest], holder: str = "") -> AsyncIterator[None]:
        self.leased.extend(digests)
        yield


async def test_fake_store_each_layer_read_once_and_reused_frames_not_read(
        tmp_path: Path, catalog: dict[str, Any]) -> None:
    fake = FakeStore(tmp_path / "fake")
    for name in ("shared-a", "shared-b"):
        part = catalog[name].only
        fake.add(part.config_bytes)
        for layer in part.layers:
            fake.add(layer.read())
    a, b = catalog["shared-a"].only, catalog["shared-b"].only

    def manifest(part: PlatformImage) -> ImageManifest:
        m = parse_manifest(part.manifest_bytes, part.manifest_media_type, "t")
        assert isinstance(m, ImageManifest)
        return m

    await pack_image(fake, manifest(a), a.config_bytes, "a:1", 3)
    assert fake.opened == [layer.digest for layer in a.layers]
    fake.opened.clear()
    rb = await pack_image(fake, manifest(b), b.config_bytes, "b:1", 3)
    assert fake.opened == [b.layers[-1].digest]
    assert set(fake.leased) >= {layer.digest for layer in b.layers[-1:]}
    assert rb.frames_compressed == 1


@pytest.mark.parametrize("teed", [True, False], ids=["written-into-the-archive", "own-file"])
def test_pax_sized_header_frame_is_prepended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             teed: bool) -> None:
    # A layer of >= 8 GiB gets a 1536-byte PAX header that does not fit the reserved space:
    # pretend this small layer is one, and check the rewritten unit decodes to header + content.
    from fetchd import archive_writer, layer_frame
    from fetchd.archive_format import padding, tar_header

    content = b"layer bytes " * 100
    diff_id = Digest.of(content)
    huge = tar_header("big.tar", 9 * 1024**3)
    monkeypatch.setattr(layer_frame, "layer_member_header", lambda d, size: huge)
    layer = make_layer(content, "gzip")
    job = LayerJob(layer.descriptor(), diff_id, 0)
    out = tmp_path / "frame.zst"
    completed: list[bool] = []
    archive = archive_writer.ArchiveBuilder(tmp_path / "archive.zst", 1, lambda: completed.append(True))
    size, in_archive = make_layer_frame(io.BytesIO(layer.read()), out, job, 3, 1,
                                                    archive=archive if teed else None)
    assert size == len(content) and in_archive is None
    assert unzstd(out) == huge + content + padding(len(content))
    # the bytes it had written into the archive while compressing were cut off again ...
    assert (tmp_path / "archive.zst").stat().st_size == 0 and not completed
    # ... and the rewritten frame goes in by copy
    archive.add_ready({0: archive_writer.FrameBytes.open(out)})
    archive.finish(b"")
    assert completed and (tmp_path / "archive.zst").read_bytes() == out.read_bytes()
    # hashed while assembled: the cut-off tee bytes are not in the digest
    assert archive.digest == _sha256_of_file(tmp_path / "archive.zst")


def _given(path: Path, data: bytes, hashed: bool = True) -> Any:
    from fetchd import archive_writer

    path.write_bytes(data)
    return archive_writer.GivenFrame(path, len(data), hashlib.sha256(data) if hashed else None)


@pytest.mark.parametrize("hashed", [True, False], ids=["its-hash-continued", "hashed-here"])
def test_a_given_first_frame_becomes_the_archive(tmp_path: Path, hashed: bool) -> None:
    from fetchd import archive_writer

    first, second = b"first frame " * 1000, b"second frame " * 500
    head = _given(tmp_path / "head.zst", first, hashed)
    other = _given(tmp_path / "second.zst", second)
    completed: list[bool] = []
    archive = archive_writer.ArchiveBuilder(tmp_path / "archive.zst", 2,
                                            lambda: completed.append(True), head=head)
    assert archive.path == head.path and not (tmp_path / "archive.zst").exists()
    archive.add_ready({1: archive_writer.FrameBytes.open(other.path, 0, other.length)})
    archive.finish(b"tail")
    want = first + second + b"tail"
    assert completed and head.path.read_bytes() == want
    assert archive.spans == {0: (0, len(first)), 1: (len(first), len(second))}
    assert archive.digest == (Digest.of(want).hex, len(want))
    if hashed:  # the given hash object was copied, not updated
        assert head.sha256.hexdigest() == Digest.of(first).hex


def test_a_given_frame_alone_is_the_whole_archive_but_its_tail(tmp_path: Path) -> None:
    from fetchd import archive_writer

    head = _given(tmp_path / "head.zst", b"the only layer " * 100)
    completed: list[bool] = []
    archive = archive_writer.ArchiveBuilder(tmp_path / "archive.zst", 1,
                                            lambda: completed.append(True), head=head)
    assert completed  # nothing to wait for: the tail may follow at once
    archive.finish(b"tail")
    assert archive.digest == (Digest.of(b"the only layer " * 100 + b"tail").hex, 1504)


def test_a_failed_pack_leaves_its_given_head_as_it_was(tmp_path: Path) -> None:
    from fetchd import archive_writer

    data = b"first frame " * 1000
    head = _given(tmp_path / "head.zst", data)
    archive = archive_writer.ArchiveBuilder(tmp_path / "archive.zst", 3, lambda: None, head=head)
    archive.add_ready({1: archive_writer.FrameBytes.open(_given(tmp_path / "b", b"x" * 99).path)})
    archive.discard()
    assert head.path.read_bytes() == data  # cut back for a retry: its own bytes only
    # a head whose file no longer has the verified length is refused
    head.path.write_bytes(data + b"more")
    with pytest.raises(OSError, match="not the 12000 verified"):
        archive_writer.ArchiveBuilder(tmp_path / "archive.zst", 2, lambda: None, head=head)


def test_frames_past_a_given_head_stay_readable_when_the_pack_fails(tmp_path: Path) -> None:
    """A frame copied into an archive is read from the archive from then on (one descriptor
    for all of them); the pack fails and cuts its given head back: a pack sharing the frame,
    and the failed pack keeping it as a frame blob, still read its bytes."""
    from fetchd import archive_writer

    data, second = b"first frame " * 1000, b"second frame " * 700
    head = _given(tmp_path / "head.zst", data)
    archive = archive_writer.ArchiveBuilder(tmp_path / "archive.zst", 3, lambda: None, head=head)
    frame = archive_writer.FrameBytes.open(_given(tmp_path / "b", second).path)
    assert frame.acquire()  # held by another pack: one reference for it, one for the archive
    archive.add_ready({1: frame})  # copied in: read from the archive from now on
    (tmp_path / "b").unlink()
    archive.discard()
    assert head.path.read_bytes() == data  # cut back for a retry: its own bytes only
    with open(tmp_path / "copy", "wb", buffering=0) as out:
        frame.append_to(out)
    frame.release()
    assert (tmp_path / "copy").read_bytes() == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "head.zst"]


def test_prefix_hasher_hashes_what_was_declared_and_reports_a_short_file(tmp_path: Path) -> None:
    from fetchd import archive_writer

    path = tmp_path / "growing"
    data = bytes(range(256)) * 20000  # 5 MB: several reads of 1 MiB
    with open(path, "w+b", buffering=0) as f:
        hasher = archive_writer.PrefixHasher(f.fileno())
        for end in (1, 4096, 3_000_000, len(data)):  # the file grows, then is declared final
            f.seek(0, 2)
            f.write(data[f.tell():end])
            hasher.advance(end)
        hasher.advance(10)  # never goes back
    assert hasher.result() == (hashlib.sha256(data).hexdigest(), len(data))

    with open(path, "r+b", buffering=0) as f:
        f.truncate(100)
        short = archive_writer.PrefixHasher(f.fileno())
        short.advance(200)  # declared beyond what the file holds
    with pytest.raises(OSError, match="shorter"):
        short.result()


def test_prefix_hasher_abandoned_while_reading_ends(tmp_path: Path) -> None:
    # a pack discarded while its archive's prefix is being hashed: close(abandon=True) must
    # return (the thread used to spin for ever once it stopped mid-read: its loop went on
    # with the prefix still unhashed); a few rounds, so one lands while the thread reads
    from fetchd import archive_writer

    path = tmp_path / "archive"
    path.write_bytes(bytes(range(256)) * (64 << 12))  # 64 MiB: tens of ms of reading
    with open(path, "rb", buffering=0) as f:
        for _ in range(5):
            hasher = archive_writer.PrefixHasher(f.fileno())
            hasher.advance(64 << 20)
            hasher.close(abandon=True)
            assert not hasher._thread.is_alive()


def _sha256_of_file(path: Path, zstd: bool = False) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        reader: Any = (zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
                       if zstd else f)
        while chunk := reader.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


@pytest.mark.slow
@pytest.mark.registry
async def test_big_image_equals_skopeo(big_image: Any, store: LayerStore, tmp_path: Path) -> None:
    part = big_image.only
    repo_tag = "debian:bookworm"
    result = await pack(store, part, repo_tag)
    out = tmp_path / "skopeo.tar"
    run("skopeo", "copy", "-q", "--src-tls-verify=false",
        f"docker://{big_image.host}/{big_image.repository}@{part.manifest_digest}",
        f"docker-archive:{out}:{repo_tag}", timeout=600)
    assert _sha256_of_file(result.path, zstd=True) == _sha256_of_file(out)


async def test_cancelled_pack_leaves_no_archive_and_no_temp_files(store: LayerStore) -> None:
    from support.images import text_bytes

    # level 19 on a few MB of text takes long enough (about a second) to be cancelled mid-layer
    layer = make_layer(text_bytes("cancel-me", 3 << 20), "gzip")
    part = make_image("linux/amd64", [layer])
    started = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        if event["state"] == "layer":
            started.set()

    task = asyncio.create_task(pack(store, part, "victim:1", level=19, progress=on_event))
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.get_alias("archive", archive_key(part.config_digest, "victim:1", 19)) is None
    # a cancelled pack returns only once its worker noticed the abort and removed its files
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.registry
async def test_unusual_config_and_mislabeled_layer_as_skopeo(
        registry: Any, store: LayerStore, tmp_path: Path) -> None:
    """A pretty-printed config with HTML characters, U+2028, non-ASCII, fields missing or null,
    and a layer labelled gzip that is a plain tar: skopeo's bytes still."""
    import dataclasses

    from support.images import Entry, make_tar, push_custom

    gz = make_layer([Entry("a.txt", b"a" * 3000)], "gzip")
    plain_tar = make_tar([Entry("b.txt", b"b" * 700)])
    mislabeled = dataclasses.replace(make_layer(plain_tar, "none"),
                                     media_type="application/vnd.oci.image.layer.v1.tar+gzip")
    config = (
        '{\n  "architecture": "arm",\n  "variant": "v7",\n  "os": "linux",\n'
        '  "config": {"Labels": {"z": "<b>&amp;</b>", "a": "caf\u00e9 \u2028 \\u00e9"},'
        ' "Env": [ ]},\n'
        '  "container_config": null,\n  "docker_version": "20.10.0",\n'
        f'  "rootfs": {{"type": "layers", "diff_ids": ["{gz.diff_id}", "{mislabeled.diff_id}"]}}\n}}\n'
    ).encode()
    img = push_custom(registry, "fetchd-test/unusual", "v1", [gz, mislabeled],
                      platform="linux/arm/v7", config=config)
    part = img.only
    repo_tag = "quay.io/some/thing:1.0"
    out = tmp_path / "skopeo.tar"
    run("skopeo", "copy", "-q", "--src-tls-verify=false",
        f"docker://{img.host}/{img.repository}@{part.manifest_digest}",
        f"docker-archive:{out}:{repo_tag}")
    result = await pack(store, part, repo_tag)
    assert unzstd(result.path) == out.read_bytes()


# --------------------------------------------------------------------------- following downloads


def _layers_image(*contents: bytes) -> PlatformImage:
    return make_image("linux/amd64", [make_layer(c, "gzip") for c in contents])


def _manifest(part: PlatformImage) -> ImageManifest:
    m = parse_manifest(part.manifest_bytes, part.manifest_media_type, "t")
    assert isinstance(m, ImageManifest)
    return m


class _CountingFollow:
    """The store's following readers for pack, counting the bytes pack read of each layer:
    ``threaded`` through ``open_following`` (reads in pack's worker thread), else through
    ``read_following`` (bridged from the event loop)."""

    def __init__(self, store: LayerStore, seen: dict[Digest, int], threaded: bool) -> None:
        self.store, self.seen, self.threaded = store, seen, threaded

    def open_following(self, digest: Digest, stop: Any) -> Any:
        inner = self.store.open_following(digest, stop) if self.threaded else None
        if inner is None:
            return None
        follow = self

        class Counting(io.RawIOBase):
            def read(self, n: int = -1) -> bytes:
                data = inner.read(n)
                follow.seen[digest] = follow.seen.get(digest, 0) + len(data)
                return data

            def close(self) -> None:
                inner.close()
                super().close()

        return Counting()

    async def read_following(self, digest: Digest) -> Any:
        async for chunk in self.store.read_following(digest):
            self.seen[digest] = self.seen.get(digest, 0) + len(chunk)
            yield chunk

    async def wait_for_bytes(self, digest: Digest, at_least: int) -> None:
        await self.store.wait_for_bytes(digest, at_least)


def _counting_follow(store: LayerStore, seen: dict[Digest, int],
                     threaded: bool = True) -> _CountingFollow:
    return _CountingFollow(store, seen, threaded)


async def _until(cond: Callable[[], bool]) -> None:
    """Poll ``cond`` (the test's timeout bounds the wait; no wall-clock assertion)."""
    while not cond():  # noqa: ASYNC110 -- set by worker threads, there is no event to await
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("threaded", [True, False], ids=["thread-reader", "loop-bridge"])
async def test_pack_compresses_a_layer_while_it_downloads(tmp_path: Path, threaded: bool) -> None:
    from support.images import text_bytes

    part = _layers_image(text_bytes("base", 3 << 20), text_bytes("top", 2 << 20))
    store = LayerStore(tmp_path / "s", StoreSettings(fsync=False))
    reference = LayerStore(tmp_path / "r", StoreSettings(fsync=False))
    try:
        put_blob(store, part.config_bytes)
        first, last = part.layers
        put_blob(store, first.read())  # the base is in; the top layer is still downloading
        fetch = HalfThenWait(last.read())
        download = asyncio.create_task(store.ensure_blob(last.digest, last.size, fetch))
        await fetch.half_written.wait()
        seen: dict[Digest, int] = {}
        packing = asyncio.create_task(pack_image(store, _manifest(part), part.config_bytes, "x:1", 3,
                                                 follow=_counting_follow(store, seen, threaded)))
        # pack reads the first half of the last layer before its blob is committed
        await _until(lambda: seen.get(last.digest, 0) >= last.size // 2)
        assert not store.has(last.digest) and not packing.done()
        assert store.get_frame(frame_key(last.diff_id, 3)) is None
        fetch.release.set()
        result = await packing
        assert (await download).is_file()
        assert seen[last.digest] == last.size
        # the same bytes as packing from a complete store
        expected = await pack(reference, part, "x:1", 3)
        assert result.digest == expected.digest
    finally:
        store.close()
        reference.close()


async def test_a_frame_is_stored_once_as_a_span_of_its_archive(tmp_path: Path) -> None:
    from support.images import text_bytes

    part = _layers_image(text_bytes("once-a", 2 << 20), text_bytes("once-b", 1 << 20))
    store = LayerStore(tmp_path / "s", StoreSettings(fsync=False))
    try:
        result = await pack(store, part, "x:1", 3)
        blobs = {p.name for p in (store.root / "blobs" / "sha256").iterdir()}
        # config, two layers, the archive: no frame blob beside it
        assert blobs == {part.config_digest.hex, *(layer.digest.hex for layer in part.layers),
                         result.digest.hex}
        data = result.path.read_bytes()
        for layer in part.layers:
            span = store.get_frame(frame_key(layer.diff_id, 3))
            assert span is not None and span.digest == result.digest
            frame = data[span.offset:span.offset + span.length]
            header = zstandard.ZstdDecompressor().decompressobj().decompress(frame[:600])
            assert header[:512].startswith(f"{layer.diff_id.hex}.tar".encode()[:100])
        # another name reuses both spans: nothing is compressed again, bytes equal
        again = await pack(store, part, "y:2", 3)
        assert (again.frames_compressed, again.frames_reused) == (0, 2)
        reference = LayerStore(tmp_path / "r", StoreSettings(fsync=False))
        try:
            assert again.digest == (await pack(reference, part, "y:2", 3)).digest
        finally:
            reference.close()
        # the spans now point at the newest archive: they live as long as it does
        assert store.get_frame(frame_key(part.layers[0].diff_id, 3)).digest == again.digest  # type: ignore[union-attr]
    finally:
        store.close()


def _files_open() -> int:
    """Open descriptors but the index's: a worker thread that reads the index keeps its
    sqlite connection while it lives (StoreIndex), and is not a frame left open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += "index.sqlite" not in target
    return count


@pytest.mark.parametrize("how", ["download-fails", "pack-cancelled"])
async def test_frames_that_ended_cleanly_stay_cached_when_another_layer_fails(
        tmp_path: Path, how: str) -> None:
    from support.images import text_bytes

    from fetchd.errors import RegistryError

    part = _layers_image(text_bytes("kept-base", 2 << 20), text_bytes("kept-top", 2 << 20))
    store = LayerStore(tmp_path / "s", StoreSettings(fsync=False))
    try:
        put_blob(store, part.config_bytes)
        base, top = part.layers
        put_blob(store, base.read())
        fetch = HalfThenWait(top.read(), RegistryError("connection reset by the test"))
        download = asyncio.create_task(store.ensure_blob(top.digest, top.size, fetch))
        await fetch.half_written.wait()
        done: list[str] = []
        packing = asyncio.create_task(pack_image(
            store, _manifest(part), part.config_bytes, "x:1", 3,
            follow=_counting_follow(store, {}), budget=CompressionBudget(workers=2),
            progress=lambda e: done.append(e["diff_id"]) if e["state"] == "layer-done" else None))
        fds = _files_open()
        await _until(lambda: str(base.diff_id) in done)  # the base frame is finished ...
        if how == "pack-cancelled":  # ... then the pull stops the pack (its download failed)
            packing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await packing
        fetch.release.set()  # ... then the top layer's download fails
        with pytest.raises(RegistryError):
            await download
        if how == "download-fails":
            with pytest.raises(RegistryError):
                await packing
        assert _files_open() <= fds  # no frame left open
        # no archive, but the base frame is kept (as a blob of its own) for the retry
        assert store.get_alias("archive", archive_key(part.config_digest, "x:1", 3)) is None
        kept = store.get_frame(frame_key(base.diff_id, 3))
        assert kept is not None and kept.offset == 0
        assert store.get_frame(frame_key(top.diff_id, 3)) is None
        assert list((store.root / "tmp").iterdir()) == []
        put_blob(store, top.read())
        retry = await pack_image(store, _manifest(part), part.config_bytes, "x:1", 3)
        assert (retry.frames_compressed, retry.frames_reused) == (1, 1)
        reference = LayerStore(tmp_path / "r", StoreSettings(fsync=False))
        try:
            assert retry.digest == (await pack(reference, part, "x:1", 3)).digest
        finally:
            reference.close()
    finally:
        store.close()


async def test_a_frame_finished_just_before_the_cancel_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interleaving of issue 12: the base frame's worker has returned cleanly, but the
    task awaiting it has not resumed yet when the pull cancels the pack. The frame ended
    cleanly, so it is kept whatever the timing."""
    from support.images import text_bytes

    from fetchd import pack as pack_module
    from fetchd.errors import RegistryError

    part = _layers_image(text_bytes("race-base", 1 << 20), text_bytes("race-top", 1 << 20))
    store = LayerStore(tmp_path / "s", StoreSettings(fsync=False))
    try:
        put_blob(store, part.config_bytes)
        base, top = part.layers
        put_blob(store, base.read())
        fetch = HalfThenWait(top.read(), RegistryError("connection reset by the test"))
        download = asyncio.create_task(store.ensure_blob(top.digest, top.size, fetch))
        await fetch.half_written.wait()
        real = pack_module._in_thread
        finished = asyncio.Event()
        gate = asyncio.Event()

        async def late_resume(fn: Any, *args: Any) -> Any:
            result = await real(fn, *args)
            if result is not None:  # a frame, made cleanly: hold it back from its task
                finished.set()
                await gate.wait()
            return result

        monkeypatch.setattr(pack_module, "_in_thread", late_resume)
        packing = asyncio.create_task(pack_image(
            store, _manifest(part), part.config_bytes, "x:1", 3,
            follow=_counting_follow(store, {}), budget=CompressionBudget(workers=2)))
        await finished.wait()  # the base's worker returned its frame ...
        packing.cancel()  # ... and the cancel comes before its task resumed
        await asyncio.sleep(0)  # the pack's task delivers the cancel to its layer tasks
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await packing
        fetch.release.set()
        with pytest.raises(RegistryError):
            await download
        kept = store.get_frame(frame_key(base.diff_id, 3))
        assert kept is not None and kept.offset == 0
        assert store.get_frame(frame_key(top.diff_id, 3)) is None
        assert list((store.root / "tmp").iterdir()) == []
    finally:
        store.close()


@pytest.mark.parametrize("threaded", [True, False], ids=["thread-reader", "loop-bridge"])
@pytest.mark.parametrize("failure", ["registry-error", "wrong-bytes"])
async def test_a_download_failing_mid_pack_leaves_no_archive_nor_frame(
        tmp_path: Path, failure: str, threaded: bool) -> None:
    from support.images import text_bytes

    from fetchd.errors import RegistryError

    part = _layers_image(text_bytes("only", 2 << 20))
    (layer,) = part.layers
    data = layer.read()
    store = LayerStore(tmp_path / "s", StoreSettings(fsync=False))
    try:
        put_blob(store, part.config_bytes)
        if failure == "registry-error":
            fetch = HalfThenWait(data, RegistryError("connection reset by the test"))
            expected: type[Exception] = RegistryError
        else:  # every byte arrives, but the second half is wrong
            fetch = HalfThenWait(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
            expected = DigestMismatch
        download = asyncio.create_task(store.ensure_blob(layer.digest, layer.size, fetch))
        await fetch.half_written.wait()
        seen: dict[Digest, int] = {}
        packing = asyncio.create_task(pack_image(store, _manifest(part), part.config_bytes, "x:1", 3,
                                                 follow=_counting_follow(store, seen, threaded)))
        await _until(lambda: seen.get(layer.digest, 0) >= len(data) // 2)
        fetch.release.set()
        with pytest.raises(expected):
            await download
        with pytest.raises(expected):
            await packing
        assert not store.has(layer.digest)
        assert store.get_frame(frame_key(layer.diff_id, 3)) is None
        assert store.get_alias("archive", archive_key(part.config_digest, "x:1", 3)) is None
        assert list((store.root / "tmp").iterdir()) == []  # no half-made frame or archive left
    finally:
        store.close()


@pytest.mark.parametrize("threaded", [True, False], ids=["thread-reader", "loop-bridge"])
async def test_cancelled_pack_stops_while_waiting_for_bytes(tmp_path: Path, threaded: bool) -> None:
    import threading

    from support.images import text_bytes

    part = _layers_image(text_bytes("stall", 2 << 20))
    (layer,) = part.layers
    store = LayerStore(tmp_path / "s", StoreSettings(fsync=False))
    try:
        put_blob(store, part.config_bytes)
        fetch = HalfThenWait(layer.read())
        download = asyncio.create_task(store.ensure_blob(layer.digest, layer.size, fetch))
        await fetch.half_written.wait()
        seen: dict[Digest, int] = {}
        packing = asyncio.create_task(pack_image(store, _manifest(part), part.config_bytes, "x:1", 3,
                                                 follow=_counting_follow(store, seen, threaded)))
        await _until(lambda: seen.get(layer.digest, 0) >= layer.size // 2)
        packing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await packing
        # the frame worker, blocked on the stalled download, noticed and ended before the
        # cancelled pack returned
        assert not any(t.name == "fetchd-pack" for t in threading.enumerate())
        assert not download.done()  # the download is not the pack's to stop
        fetch.release.set()
        assert (await download).is_file()
        assert store.get_alias("archive", archive_key(part.config_digest, "x:1", 3)) is None
    finally:
        store.close()


# --------------------------------------------------------------------------- the budget


async def test_a_shared_budget_bounds_compressions_across_packs(tmp_path: Path) -> None:
    from support.images import text_bytes

    parts = [_layers_image(text_bytes(f"img{i}a", 1 << 20), text_bytes(f"img{i}b", 1 << 20))
             for i in range(3)]
    budget = CompressionBudget(workers=2)
    store = LayerStore(tmp_path / "s", StoreSettings(fsync=False))
    reference = LayerStore(tmp_path / "r", StoreSettings(fsync=False))
    try:
        manifests = [put_image(store, p) for p in parts]
        running = 0
        most = 0
        original = budget.slot

        @contextlib.asynccontextmanager
        async def counted(level: int, owner: object = None) -> Any:
            nonlocal running, most
            async with original(level, owner) as slot:
                running += 1
                most = max(most, running)
                try:
                    await asyncio.sleep(0.01)  # hold it a little: let the others pile up
                    yield slot
                finally:
                    running -= 1

        budget.slot = counted  # type: ignore[method-assign]
        results = await asyncio.gather(*(
            pack_image(store, m, p.config_bytes, f"x{i}:1", 3, budget=budget)
            for i, (m, p) in enumerate(zip(manifests, parts, strict=True))))
        assert most == 2 and budget.peak_active == 2  # six layers, never more than two at once
        assert budget.active == 0 and budget.used == 0
        for i, (p, r) in enumerate(zip(parts, results, strict=True)):
            assert r.digest == (await pack(reference, p, f"x{i}:1", 3, threads=1)).digest
    finally:
        store.close()
        reference.close()


def test_a_reused_context_makes_the_same_frame_as_a_new_one(tmp_path: Path) -> None:
    # A pooled context compressed another layer (at more threads) before: the frame it makes
    # next must be byte for byte what a fresh context makes, for 1 and 2 threads.
    from support.images import text_bytes

    first, second = text_bytes("reuse-a", 3 << 20), text_bytes("reuse-b", 2 << 20)

    def frame(content: bytes, name: str, threads: int, cctx: Any = None) -> bytes:
        layer = make_layer(content, "gzip")
        job = LayerJob(layer.descriptor(), Digest.of(content), 0)
        out = tmp_path / name
        make_layer_frame(io.BytesIO(layer.read()), out, job, 3, threads, cctx=cctx)
        return out.read_bytes()

    for threads in (1, 2):
        fresh = frame(second, f"fresh{threads}", threads)
        used = compressor(3, threads)
        frame(first, f"before{threads}", threads, used)
        assert frame(second, f"reused{threads}", threads, used) == fresh


async def test_the_budget_reuses_contexts_and_frees_them_when_idle(tmp_path: Path) -> None:
    from support.images import text_bytes

    parts = [_layers_image(text_bytes(f"pool{i}a", 1 << 20), text_bytes(f"pool{i}b", 1 << 20))
             for i in range(3)]
    # keep idle contexts while the packs run (the slots may all be free for a moment
    # between two layers), free them at once later
    budget = CompressionBudget(workers=2, keep_idle=60.0)
    store = LayerStore(tmp_path / "s", StoreSettings(fsync=False))
    reference = LayerStore(tmp_path / "r", StoreSettings(fsync=False))
    try:
        manifests = [put_image(store, p) for p in parts]
        results = await asyncio.gather(*(
            pack_image(store, m, p.config_bytes, f"x{i}:1", 3, budget=budget)
            for i, (m, p) in enumerate(zip(manifests, parts, strict=True))))
        # six layers, at most two at once: at most two contexts were ever made
        assert 1 <= budget.contexts_made <= 2 and budget.peak_active == 2
        for i, (p, r) in enumerate(zip(parts, results, strict=True)):
            assert r.digest == (await pack(reference, p, f"x{i}:1", 3, threads=1)).digest
        # idle contexts are freed once nothing compresses (keep_idle=0: on the next turn)
        assert budget.idle_contexts() > 0
        budget.keep_idle = 0.0
        async with budget.slot(3):
            pass
        for _ in range(5):
            await asyncio.sleep(0)
        assert budget.idle_contexts() == 0
        # a slot at another level frees the idle ones first: memory stays within the budget
        budget.keep_idle = 60.0
        async with budget.slot(3) as slot:
            slot.recycle(slot.compressor())
        assert budget.idle_contexts() == 1
        async with budget.slot(9) as slot:
            assert budget.idle_contexts() == 0
            assert budget.used == context_memory(9, slot.threads) <= budget.memory
        # a context too big to keep beside the budget's memory is not kept
        async with budget.slot(19) as slot:
            slot.recycle(slot.compressor())
        assert budget.idle_contexts() == 0
    finally:
        store.close()
        reference.close()


class _StoreFollow:
    """The store as pack's FollowSource (``threaded``: its thread reader, else
    ``read_following`` bridged from the event loop), counting the waits for bytes."""

    def __init__(self, store: LayerStore, threaded: bool = True) -> None:
        self.store = store
        self.threaded = threaded
        self.waits = 0

    def open_following(self, digest: Digest, stop: Any) -> Any:
        return self.store.open_following(digest, stop) if self.threaded else None

    def read_following(self, digest: Digest) -> Any:
        return self.store.read_following(digest)

    async def wait_for_bytes(self, digest: Digest, at_least: int) -> None:
        self.waits += 1
        await self.store.wait_for_bytes(digest, at_least)


@pytest.mark.parametrize("threaded", [True, False], ids=["thread-reader", "loop-bridge"])
async def test_a_trickling_source_of_one_uid_does_not_block_another_uids_pack(
        tmp_path: Path, threaded: bool) -> None:
    """Issue 13: a 2-layer image whose blobs trickle took every compression slot and held
    them while waiting for bytes; another user's pack waited for the tarpit. Now a layer
    asks for a slot only once it has bytes, and parks (gives back the CPU) when they stop."""
    import random

    rng = random.Random(13)
    # incompressible content: the gzip blobs are as big as the content (3 MiB each)
    slow = _layers_image(rng.randbytes(3 << 20), rng.randbytes(3 << 20))
    fast = _layers_image(rng.randbytes(1 << 20), rng.randbytes(1 << 20))
    budget = CompressionBudget(workers=2)
    store = LayerStore(tmp_path / "s", StoreSettings(fsync=False))
    reference = LayerStore(tmp_path / "r", StoreSettings(fsync=False))
    try:
        put_blob(store, slow.config_bytes)
        # the tarpit sends 1.5 MiB of each layer, then nothing
        fetches = [HalfThenWait(layer.read()) for layer in slow.layers]
        downloads = [asyncio.create_task(store.ensure_blob(layer.digest, layer.size, fetch))
                     for layer, fetch in zip(slow.layers, fetches, strict=True)]
        for fetch in fetches:
            await fetch.half_written.wait()
        follow = _StoreFollow(store, threaded)
        stalled = asyncio.create_task(pack_image(
            store, _manifest(slow), slow.config_bytes, "slow:1", 3, budget=budget,
            follow=follow, owner=1001))
        # both layers compress what arrived, then wait for bytes without a CPU slot
        await _until(lambda: budget.parked == 2)
        assert budget.active == 0 and not stalled.done()
        manifest = put_image(store, fast)
        result = await pack_image(store, manifest, fast.config_bytes, "fast:1", 3,
                                  budget=budget, owner=1002)
        assert not stalled.done() and budget.parked == 2
        assert result.digest == (await pack(reference, fast, "fast:1", 3)).digest
        for fetch in fetches:
            fetch.release.set()  # the tarpit sends the rest after all
        await asyncio.gather(*downloads)
        done = await stalled
        assert done.digest == (await pack(reference, slow, "slow:1", 3)).digest
        assert (budget.active, budget.parked, budget.used, budget.waiting) == (0, 0, 0, 0)
    finally:
        store.close()
        reference.close()


async def test_a_layer_that_has_not_started_downloading_takes_no_slot(tmp_path: Path) -> None:
    import random

    rng = random.Random(14)
    part = _layers_image(rng.randbytes(2 << 20))
    (layer,) = part.layers
    budget = CompressionBudget(workers=1)
    store = LayerStore(tmp_path / "s", StoreSettings(fsync=False))
    try:
        put_blob(store, part.config_bytes)
        fetch = HalfThenWait(layer.read(), split=10_000)  # 10 kB, then nothing for a while
        download = asyncio.create_task(store.ensure_blob(layer.digest, layer.size, fetch))
        await fetch.half_written.wait()
        follow = _StoreFollow(store)
        packing = asyncio.create_task(pack_image(
            store, _manifest(part), part.config_bytes, "x:1", 3, budget=budget, follow=follow))
        await _until(lambda: follow.waits == 1)
        # the pack waits for its first MiB outside the budget: the slot stays free
        assert budget.active == 0 and budget.waiting == 0
        async with budget.slot(3, owner=7) as slot:
            assert slot.threads == 1 and budget.active == 1
        assert not packing.done()
        fetch.release.set()
        await download
        result = await packing
        assert result.frames_compressed == 1
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
async def test_a_decompression_bomb_layer_fails_clearly_and_keeps_nothing(
        store: LayerStore, kind: str) -> None:
    """Issue 13: a small layer that expands enormously (with a correct diff_id) cost seconds
    of CPU per 64 KiB. It now fails as soon as it passes its bound (layer-too-large), naming
    the settings that move the bound; no archive and no frame of it is kept."""
    from fetchd.config import PackConfig
    from fetchd.errors import LayerTooLarge

    bomb = make_layer(bytes(96 << 20), kind)  # 96 MiB of zeros in ~96 KiB (gzip) or less
    assert bomb.size < 128 << 10
    part = make_image("linux/amd64", [make_layer(b"small layer " * 1000, "gzip"), bomb])
    manifest = put_image(store, part)
    with pytest.raises(LayerTooLarge) as err:
        await pack_image(store, manifest, part.config_bytes, "bomb:1", 3)
    message = err.value.message
    assert err.value.code == "layer-too-large" and str(bomb.digest) in message
    assert f"more than {64 << 20} bytes" in message  # the 64 MiB floor: stopped there
    assert "max_layer_ratio" in message and "max_layer_size" in message
    assert store.get_alias("archive", archive_key(part.config_digest, "bomb:1", 3)) is None
    assert store.get_frame(frame_key(bomb.diff_id, 3)) is None
    assert list(store.tmp_dir.iterdir()) == []
    # a daemon configured for such layers packs it; the absolute bound still holds
    roomy = PackConfig(max_layer_ratio=1e6)
    with pytest.raises(LayerTooLarge):
        await pack_image(store, manifest, part.config_bytes, "bomb:1", 3,
                         limits=PackConfig(max_layer_ratio=1e6, max_layer_size=80 << 20))
    result = await pack_image(store, manifest, part.config_bytes, "bomb:1", 3, limits=roomy)
    assert result.frames_compressed >= 1
