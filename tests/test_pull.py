"""pull.Puller against the session registry: what a job holds in the store while it runs.

A gc may run at any moment (automatically after a commit, or `fetchd gc` from another
process); these tests run one with ``max_size=0`` (evict everything not leased) at the
worst moment of a job and check that the job still completes with the right archive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.images import Catalog

from fetchd.config import Config
from fetchd.digest import Digest
from fetchd.layer_store import LayerStore
from fetchd.pack import frame_key
from fetchd.platform import Platform
from fetchd.pull import FetchRequest, Puller
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient

pytestmark = pytest.mark.registry

AMD64 = Platform.parse("linux/amd64")


@pytest.fixture
async def puller(tmp_path: Path) -> AsyncIterator[Puller]:
    config = Config.from_dict({"network": {"retries": 1, "backoff_base": 0.001}},
                              env={"FETCHD_STORE": str(tmp_path / "store")})
    store = LayerStore(tmp_path / "store")
    client = RegistryClient(config)
    p = Puller(store, client, config)
    try:
        yield p
    finally:
        await p.close()
        await client.close()
        store.close()


def _gc_after_layers(puller: Puller, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Run an evict-everything gc right after each layer download (the pack runs meanwhile)."""
    removed: list[int] = []
    original = Puller._download

    async def then_gc(self: Puller, *args: Any) -> None:
        await original(self, *args)
        removed.append((await self.store.gc(max_size=0)).removed)

    monkeypatch.setattr(Puller, "_download", then_gc)
    return removed


def _gc_before_pack(puller: Puller, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Run an evict-everything gc right before the job downloads and packs."""
    removed: list[int] = []
    original = Puller._download_and_pack

    async def gc_then(self: Puller, *args: Any) -> Any:
        removed.append((await self.store.gc(max_size=0)).removed)
        return await original(self, *args)

    monkeypatch.setattr(Puller, "_download_and_pack", gc_then)
    return removed


async def _pull(puller: Puller, reference: str, repo_tag: str | None = None) -> Digest:
    job = puller.submit(FetchRequest(Reference.parse(reference), AMD64, repo_tag=repo_tag))
    result = await job.wait()
    assert puller.store.has(Digest.parse(result.archive_digest))
    return Digest.parse(result.archive_digest)


async def test_gc_between_download_and_pack_keeps_the_jobs_layers(
    images: Catalog, puller: Puller, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = images["single-oci"]
    removed = _gc_after_layers(puller, monkeypatch)
    await _pull(puller, image.reference)
    assert removed[0] > 0  # the gc did evict something (the manifest), just not what pack needs
    for layer in image.only.layers:
        assert puller.store.has(layer.digest)


async def test_gc_before_pack_keeps_the_cached_frames_that_stand_in_for_layers(
    images: Catalog, puller: Puller, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = images["single-oci"]
    store = puller.store
    first = await _pull(puller, image.reference)
    frames = [store.get_frame(frame_key(d, 3)) for d in image.only.diff_ids]
    assert all(f is not None and f.digest == first for f in frames)  # spans of the archive
    # Only the archive that holds the frames stays: the next job (another RepoTags name, so
    # no cached archive) does not download the layers, it relies on the frames.
    with store.lease([first]):
        await store.gc(max_size=0)
    assert not any(store.has(layer.digest) for layer in image.only.layers)
    removed = _gc_before_pack(puller, monkeypatch)
    second = await _pull(puller, image.reference, repo_tag="example.org/other:1")
    assert len(removed) == 1  # the gc ran, and could not take the archive holding the frames
    assert second != first and store.has(first)
    assert not any(store.has(layer.digest) for layer in image.only.layers)


async def test_a_download_failing_while_the_pack_follows_it_leaves_no_archive(
        puller: Puller) -> None:
    from fake_registry import FakeRegistry, Fault
    from support.images import make_image, make_layer, text_bytes

    from fetchd.errors import RegistryError

    base = make_layer(text_bytes("pull-base", 1 << 20), "gzip")
    top = make_layer(text_bytes("pull-top", 2 << 20), "gzip")
    part = make_image("linux/amd64", [base, top])
    fake = await FakeRegistry().start()
    store = puller.store
    try:
        for blob in (part.config_bytes, base.read(), top.read()):
            fake.add_blob(blob)
        fake.add_manifest("x/y", "1", part.manifest_bytes, part.manifest_media_type)
        # the config and the base are in the store: the only blob request is the top layer's,
        # cut half-way, then the registry fails for good
        store.commit_bytes(part.config_bytes, part.config_digest)
        store.commit_bytes(base.read(), base.digest)
        fake.fault("blob", Fault(cut_after=top.size // 2), *[Fault(status=500)] * 20)
        job = puller.submit(FetchRequest(Reference.parse(f"{fake.host}/x/y:1"), AMD64))
        with pytest.raises(RegistryError):
            await job.wait()
        events = [e async for e in job.events()]
        assert [e["state"] for e in events if e["event"] == "pack"][:1] == ["start"]
        assert not store.has(top.digest)
        assert store.get_frame(frame_key(top.diff_id, 3)) is None
        assert not [e for e in events if e["event"] == "pack" and e.get("state") == "done"]
        assert store.list_images() == []
        assert list((store.root / "tmp").iterdir()) == []
    finally:
        await fake.close()


async def test_another_images_layer_list_cannot_change_how_a_pinned_manifest_is_read(
        puller: Puller) -> None:
    """issue 13: an image naming a victim's manifest digest as a 'layer' of index type
    rewrote the stored media type; the victim's digest-pinned pulls (a manifest without
    mediaType, as OCI allows) were then read as an index and failed for everyone."""
    import json

    from fake_registry import FakeRegistry
    from support.images import make_image, make_layer, text_bytes

    from fetchd.manifest import OCI_INDEX, OCI_MANIFEST

    layer = make_layer(text_bytes("pinned-victim", 4096), "gzip")
    victim = make_image("linux/amd64", [layer])
    manifest = json.loads(victim.manifest_bytes)
    manifest.pop("mediaType", None)  # optional in OCI
    victim_body = json.dumps(manifest).encode()
    victim_digest = Digest.of(victim_body)
    # The attacker's image lists the victim's manifest digest as a layer "of index type".
    attacker_config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [str(layer.diff_id)]}}).encode()
    attacker_body = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": str(Digest.of(attacker_config)), "size": len(attacker_config)},
        "layers": [{"mediaType": OCI_INDEX, "digest": str(victim_digest), "size": len(victim_body)}],
    }).encode()
    fake = await FakeRegistry().start()
    try:
        for blob in (victim.config_bytes, layer.read(), attacker_config, victim_body):
            fake.add_blob(blob)
        fake.add_manifest("v/img", None, victim_body, OCI_MANIFEST)
        fake.add_manifest("evil/img", "1", attacker_body, OCI_MANIFEST)
        pinned = f"{fake.host}/v/img@{victim_digest}"
        first = await _pull(puller, pinned)
        attack = puller.submit(FetchRequest(Reference.parse(f"{fake.host}/evil/img:1"), AMD64))
        await attack.wait()  # the "layer" is frame-cached under the victim's diff_id: it packs
        assert await _pull(puller, pinned) == first
        offline = puller.submit(FetchRequest(Reference.parse(pinned), AMD64, offline=True))
        assert Digest.parse((await offline.wait()).archive_digest) == first
        resolved = await puller.resolve(Reference.parse(pinned), offline=True)
        assert resolved["media_type"] == OCI_MANIFEST
    finally:
        await fake.close()
