"""The meeting point: one request, from image reference to a packed archive in the store.

``Puller.submit`` turns a request into a job; identical requests (same reference, platform,
level, name:tag and offline flag) share one job, so a layer crosses the network once however
many builds ask at the same moment. Jobs run as the Puller's own tasks: a client that goes away
never cancels work that others still wait for.

Flow of a job: resolve the tag (tag cache, then HEAD; GET by tag when never seen) -> top manifest
(store first) -> platform
entry of an index -> manifest -> config -> layers whose zstd frame at this level is not cached
yet (each fetched once into the store, single-flight per digest) -> ``pack_image`` under a lease
-> ``FetchResult``. The pack starts as soon as the config is known: a layer still downloading is
compressed while its bytes arrive (``pack_image(follow=...)``); the archive is committed only
once every layer blob it was made from is committed (size and digest verified) and each diff_id
matched. A download that fails abandons the pack: no archive.

Jobs do not wait for each other to download: network work is bounded by the registry client's
connection budget per host, CPU work (and zstd memory) by one ``CompressionBudget`` that every
pack of the daemon shares.

Every manifest and blob is kept in the store by digest, so an offline request can be answered
from the store alone; a miss says exactly what is missing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from .archive_format import qualified_repo_tag
from .archive_writer import GivenFrame
from .compress_budget import CompressionBudget, check_level, usable_cpus
from .config import Config
from .digest import Digest
from .errors import (
    DigestMismatch,
    FetchdError,
    LayerTooLarge,
    NetworkDisabled,
    RateLimited,
    RegistryError,
    RegistryStalled,
    ShuttingDown,
    SizeMismatch,
)
from .fleet_cache import FetchFailed, FrameCache, FrameDownload, FrameKey
from .frame_check import (
    FRAME_FORMAT,
    HEADER_PREFIX,
    ZSTD_VERSION,
    FrameRejected,
    check_frame,
    max_frame_size,
    member_size,
)
from .layer_store import LayerStore, held_bytes
from .manifest import (
    INLINE_JSON,
    Descriptor,
    ImageIndex,
    ImageManifest,
    layer_compression,
    parse_config,
    parse_manifest,
    select_platform,
)
from .pack import STAGGER, PackResult, archive_key, frame_key, pack_image
from .platform import Platform
from .reference import Reference
from .registry_async import RegistryClient

log = logging.getLogger("fetchd.pull")

_T = TypeVar("_T")
_PROGRESS_INTERVAL = 0.25  # seconds between progress events per layer


@dataclass(frozen=True)
class FetchRequest:
    """What a client asks for. ``uid`` is the asking peer's uid (SO_PEERCRED; None in-process):
    it is not part of the job's ``key`` (identical requests of different users share one job),
    it decides whose quotas the job counts against (job slots, compression slots, ingest)."""

    reference: Reference
    platform: Platform
    level: int = 3
    repo_tag: str | None = None
    offline: bool = False
    uid: int | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, str, int, str, bool]:
        return (str(self.reference), str(self.platform), self.level, self.archive_name, self.offline)

    @property
    def archive_name(self) -> str:
        """The fully qualified ``name:tag`` written into RepoTags, as skopeo writes it."""
        if not self.repo_tag:
            return f"{self.reference.name}:{self.reference.tag_or_default}"
        return qualified_repo_tag(self.repo_tag)


@dataclass(frozen=True)
class FetchResult:
    reference: str
    platform: str
    index_digest: str | None
    manifest_digest: str
    archive_digest: str
    archive_path: Path
    size: int
    level: int
    repo_tag: str
    blobs_downloaded: int = 0
    frames_compressed: int = 0
    frames_reused: int = 0
    # From a registry configured private: the store keeps its files 0400 and the archive is
    # handed back only as the caller's own copy (docs/SECURITY.md).
    private: bool = False
    frames_fleet: int = 0  # of frames_reused: verified frames from the fleet's frame cache

    def to_json(self) -> dict[str, Any]:
        return {**({"private": True} if self.private else {}),
            "reference": self.reference,
            "platform": self.platform,
            "index_digest": self.index_digest,
            "manifest_digest": self.manifest_digest,
            "archive_digest": self.archive_digest,
            "store_path": str(self.archive_path),
            "size": self.size,
            "level": self.level,
            "repo_tag": self.repo_tag,
            "blobs_downloaded": self.blobs_downloaded,
            "frames_compressed": self.frames_compressed,
            "frames_reused": self.frames_reused,
            "frames_fleet": self.frames_fleet,
        }


# Failures that say "the registry could not be asked" (down, unreachable, 5xx, throttled),
# as opposed to answers (unknown tag, denied): only these fall back to the tag cache.
_UNREACHABLE = (RegistryError, RateLimited)


@dataclass
class _Resolved:
    top_digest: Digest
    media_type: str
    from_cache: bool
    warning: str | None = None  # set when a stale cache entry stood in for an unreachable registry
    body: bytes | None = None  # the manifest's bytes when a GET by tag resolved it (not stored yet)


class Job:
    """One running fetch. ``events`` gives every event from the start, or, to a reader that
    fell behind (a client joining late), a summary in place of what was dropped; ``wait``
    gives the result.

    The event list is bounded: past ``max_events`` the oldest half is dropped. What a late
    reader gets instead is one ``{"event": "summary", "skipped": n}`` and the latest event
    of each kind per layer (manifest, layer state, download progress, pack progress) and the
    last warnings, so its view ends where everyone else's is. Memory per job is bounded by
    ``max_events`` and the image's layer count (``server.max_layers``).

    Events are pushed from the event loop's thread only (threads use ``call_soon_threadsafe``).
    """

    WARNINGS_KEPT = 8

    def __init__(self, request: FetchRequest, max_events: int = 4096) -> None:
        self.request = request
        self.key = request.key
        self.started = time.time()
        self.progressed = time.monotonic()  # when the last event came (the stall deadline)
        self.state = "queued"
        self._events: list[dict[str, Any]] = []
        self._base = 0  # the absolute index of _events[0]: events dropped so far
        self._max_events = max(2, max_events)
        self._latest: dict[tuple[str, ...], dict[str, Any]] = {}
        self._warnings = 0
        self._wakeups: list[asyncio.Future[None]] = []
        self._done = False
        self._future: asyncio.Future[FetchResult] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self.waiters = 0
        self.slot = False  # holds a network slot (Puller._online)
        self.clients = 0  # connections streaming this job's events (server.max_waiters_per_job)
        self.network = 0  # registry requests and downloads under way (the stall deadline)
        self.seq = 0  # submission order (Puller.submit): earlier jobs' downloads go first

    def push(self, event: dict[str, Any]) -> None:
        self.progressed = time.monotonic()
        self._events.append(event)
        self._remember(event)
        if len(self._events) > self._max_events:
            drop = len(self._events) - self._max_events // 2
            del self._events[:drop]
            self._base += drop
        self._wake()

    def _remember(self, event: dict[str, Any]) -> None:
        kind = str(event.get("event"))
        if kind in ("layer", "progress"):
            key: tuple[str, ...] = (kind, str(event.get("digest")))
        elif kind == "pack" and "diff_id" in event:
            key = (kind, str(event.get("diff_id")))
        elif kind == "warning":
            self._warnings += 1
            self._latest.pop(("warning", str(self._warnings - self.WARNINGS_KEPT)), None)
            key = (kind, str(self._warnings))
        else:
            key = (kind,)
        self._latest[key] = event

    def summary(self) -> list[dict[str, Any]]:
        """The latest event of each kind (see the class docstring), in first-seen order."""
        return list(self._latest.values())

    def _wake(self) -> None:
        wakeups, self._wakeups = self._wakeups, []
        for fut in wakeups:
            if not fut.done():
                fut.set_result(None)

    def _finish(self) -> None:
        self._done = True
        self._wake()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """This job's events until it ends; a summary stands in for those already dropped."""
        index = 0  # absolute
        while True:
            if index < self._base:
                skipped = self._base - index
                index = self._base + len(self._events)  # the summary covers those too
                for event in [{"event": "summary", "skipped": skipped}, *self.summary()]:
                    yield event
                continue
            if index < self._base + len(self._events):
                event = self._events[index - self._base]
                index += 1
                yield event
                continue
            if self._done:
                return
            fut = asyncio.get_running_loop().create_future()
            self._wakeups.append(fut)
            await fut

    async def wait(self) -> FetchResult:
        self.waiters += 1
        try:
            return await asyncio.shield(self._future)
        finally:
            self.waiters -= 1

    def done(self) -> bool:
        return self._future.done()

    def describe(self) -> dict[str, Any]:
        r = self.request
        return {
            "reference": str(r.reference),
            "platform": str(r.platform),
            "level": r.level,
            "repo_tag": r.archive_name,
            "offline": r.offline,
            "state": self.state,
            "age": round(time.time() - self.started, 3),
            "waiters": max(self.waiters, self.clients),
        }




class JobSlots:
    """Network job slots: at most ``total`` held at once, at most ``per_uid`` by one uid.

    Waiters are served in arrival order, except that one whose uid is at its cap is passed
    over (it does not hold up other uids' waiters). ``acquire`` and ``release`` run on the
    event loop; a waiter that is cancelled leaves no slot behind.
    """

    def __init__(self, total: int, per_uid: int) -> None:
        self.total, self.per_uid = total, per_uid
        self.held = 0
        self.by_uid: dict[int | None, int] = {}
        self._waiters: list[tuple[int | None, asyncio.Future[None]]] = []

    def _fits(self, uid: int | None) -> bool:
        return self.held < self.total and self.by_uid.get(uid, 0) < self.per_uid

    def _take(self, uid: int | None) -> None:
        self.held += 1
        self.by_uid[uid] = self.by_uid.get(uid, 0) + 1

    async def acquire(self, uid: int | None) -> None:
        # Any waiter that fits was granted at the last release: no queue jumping here.
        if self._fits(uid):
            self._take(uid)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (uid, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(uid)  # granted just as it was cancelled: pass it on
            else:
                self._waiters.remove(entry)
            raise

    def release(self, uid: int | None) -> None:
        self.held -= 1
        left = self.by_uid.get(uid, 1) - 1
        if left:
            self.by_uid[uid] = left
        else:
            self.by_uid.pop(uid, None)
        for entry in list(self._waiters):
            if self.held >= self.total:
                break
            wuid, fut = entry
            if self.by_uid.get(wuid, 0) < self.per_uid:
                self._waiters.remove(entry)
                self._take(wuid)
                fut.set_result(None)

    def waiting(self) -> int:
        return len(self._waiters)


class Puller:
    """Runs fetch jobs against one store and one registry client (both shared by the daemon).

    ``budget`` bounds the layer compressions of all jobs together (default: one per usable
    CPU, within the zstd memory estimate). Every job starts at once; a job takes one of the
    ``server.max_jobs`` network slots (at most ``server.max_jobs_per_uid`` for one uid) only
    before its first registry request, and keeps it to its end: work answered from the store
    (an offline or fully cached pull) never waits behind jobs that wait on registries.
    """

    def __init__(self, store: LayerStore, registry: RegistryClient, config: Config,
                 budget: CompressionBudget | None = None,
                 fleet: FrameCache | None = None) -> None:
        self.store = store
        self.registry = registry
        self.config = config
        self.budget = budget if budget is not None else CompressionBudget()
        self._jobs: dict[tuple[str, str, int, str, bool], Job] = {}
        self._submitted = itertools.count()
        self._slots = JobSlots(config.server.max_jobs, config.server.max_jobs_per_uid)
        self._closing = False
        self.tag_cache_ttl = config.network.tag_cache_ttl
        self.max_layers = config.server.max_layers
        self.completed = 0
        self.failed = 0
        # The fleet's frame cache ([fleet] frame_cache): frames other hosts made, verified
        # in full before use; frames made here are pushed to it in the background.
        if fleet is None and config.fleet.frame_cache is not None:
            fleet = FrameCache(config, zstd=ZSTD_VERSION, format=FRAME_FORMAT)
        self.fleet = fleet
        # Frame checks decompress and hash whole layers: threads of their own (not the loop's
        # default executor, which the store's small I/O needs), one per usable CPU at most.
        self._checks: concurrent.futures.ThreadPoolExecutor | None = None

    # -- jobs ---------------------------------------------------------------------------------

    def submit(self, request: FetchRequest) -> Job:
        """Join the running job for an identical request, or start one."""
        if self._closing:
            raise ShuttingDown("fetchd is shutting down; retry when it is back")
        check_level(request.level)
        job = self._jobs.get(request.key)
        if job is not None and not job.done():
            return job
        job = Job(request, self.config.server.max_job_events)
        job.seq = next(self._submitted)
        self._jobs[request.key] = job
        job.task = asyncio.create_task(self._run(job), name=f"fetch {request.reference}")
        return job

    def jobs(self) -> list[dict[str, Any]]:
        return [job.describe() for job in self._jobs.values() if not job.done()]

    def stop_taking(self) -> None:
        """From now on ``submit`` refuses with ``ShuttingDown`` (503): the daemon is stopping."""
        self._closing = True

    async def close(self, grace: float = 0.0) -> None:
        """Stop taking jobs; give running ones up to ``grace`` seconds to finish, then cancel
        the rest: their clients get ``shutting-down`` and their partial downloads stay in
        ingest/ for the next daemon to resume."""
        self._closing = True
        tasks = [job.task for job in self._jobs.values() if job.task and not job.task.done()]
        if tasks and grace > 0:
            log.info("waiting up to %.0f s for %d running job(s)", grace, len(tasks))
            await asyncio.wait(tasks, timeout=grace)
        tasks = [task for task in tasks if not task.done()]
        if tasks:
            log.info("parking %d job(s) still running; their partial downloads are kept", len(tasks))
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # The downloads are the store's (shared by jobs, shielded from each one's cancel):
        # stop them too, so their partials are saved before the registry session closes.
        await self.store.stop_downloads()
        if self.fleet is not None:
            await self.fleet.close()
        if self._checks is not None:
            self._checks.shutdown(wait=False, cancel_futures=True)

    def fleet_stats(self) -> dict[str, Any] | None:
        """The frame cache's counters (``FrameCache.stats``); None when none is configured."""
        return self.fleet.stats() if self.fleet is not None else None

    async def _online(self, job: Job | None) -> None:
        """Take a network job slot for ``job`` before its first registry request (once)."""
        if job is None or job.slot:
            return
        job.state = "queued"
        await self._slots.acquire(job.request.uid)
        job.slot = True
        job.state = "running"

    async def _run(self, job: Job) -> None:
        try:
            job.state = "running"
            try:
                result = await self._watched(job)
            finally:
                if job.slot:
                    job.slot = False
                    self._slots.release(job.request.uid)
        except asyncio.CancelledError:
            job.state = "cancelled"
            if not job._future.done():
                job._future.set_exception(ShuttingDown("fetchd stopped before the job finished; retry"))
                job._future.exception()  # retrieved, as below: its clients may all be gone
            job._finish()
            self._forget(job)
            raise
        except FetchdError as e:
            self.failed += 1
            job.state = "failed"
            log.warning("fetch %s for %s failed: %s", job.request.reference, job.request.platform, e.message)
            job._future.set_exception(e)
        except Exception as e:  # keep the daemon alive; report it as an internal error
            self.failed += 1
            job.state = "failed"
            log.exception("fetch %s failed unexpectedly", job.request.reference)
            job._future.set_exception(FetchdError(f"internal error while fetching {job.request.reference}: {e!r}"))
        else:
            self.completed += 1
            job.state = "done"
            job._future.set_result(result)
        job._finish()
        self._forget(job)
        # a failed job's exception counts as retrieved even when every client went away
        if job._future.done() and not job._future.cancelled():
            job._future.exception()

    async def _watched(self, job: Job) -> FetchResult:
        """``_fetch(job)``, failed with RegistryStalled once the job made no progress (no
        event: no bytes, no compression, no step) for ``server.job_stall_timeout`` seconds.
        Only time waiting on registries counts (not a job slot, not compression)."""
        limit = self.config.server.job_stall_timeout
        task = asyncio.ensure_future(self._fetch(job))
        try:
            while True:
                idle = time.monotonic() - job.progressed
                # Only a job waiting on a registry can stall: a queued one, or one waiting
                # for compression slots (busy with other jobs' work), is not.
                if job.state == "queued" or not limit or not job.network:
                    job.progressed, idle = time.monotonic(), 0.0
                if limit and idle >= limit:
                    break
                done, _ = await asyncio.wait([task], timeout=(limit or 60.0) - idle)
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
        if not task.cancelled():
            return task.result()  # it ended (or failed) on its own just then
        ref = job.request.reference
        raise RegistryStalled(
            f"{ref}: no progress for {limit:g} s (nothing downloaded, compressed or done; "
            f"[server] job_stall_timeout) while waiting on {ref.registry}; the registry (or a "
            "mirror) is stalling: retry later")

    def _forget(self, job: Job) -> None:
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]

    # -- one fetch ----------------------------------------------------------------------------

    async def _fetch(self, job: Job) -> FetchResult:
        req = job.request
        ref = req.reference
        where = str(ref)
        resolved = await self.resolve_digest(ref, offline=req.offline, job=job, want_body=True)
        # What the tag means for this request from now on: a client that submits the request
        # again (the daemon restarted) pins this digest, so it gets what it would have got.
        job.push({"event": "resolved", "digest": str(resolved.top_digest)})
        private = self.config.registry(ref.registry).private
        restrict = self._restrict if private else _no_restriction
        await restrict([resolved.top_digest])
        top_body = await self._manifest_bytes(ref, resolved.top_digest, req.offline, job,
                                              fetched=resolved.body,
                                              media_type=resolved.media_type)
        top = await _parse_manifest(top_body, resolved.media_type, where, self.max_layers)
        index_digest: Digest | None = None
        manifest_digest = resolved.top_digest
        chosen = None
        if isinstance(top, ImageIndex):
            index_digest = resolved.top_digest
            entry = select_platform(top, req.platform, where)
            chosen = entry.platform
            manifest_digest = entry.digest
            await restrict([entry.digest])
            body = await self._manifest_bytes(ref, entry.digest, req.offline, job)
            image = await _parse_manifest(body, entry.media_type, where, self.max_layers)
            if isinstance(image, ImageIndex):  # nested index: one more level
                entry = select_platform(image, req.platform, where)
                chosen = entry.platform
                manifest_digest = entry.digest
                await restrict([entry.digest])
                body = await self._manifest_bytes(ref, entry.digest, req.offline, job)
                image = await _parse_manifest(body, entry.media_type, where, self.max_layers)
            if not isinstance(image, ImageManifest):
                from .errors import ManifestInvalid

                raise ManifestInvalid(f"{where}: index nesting deeper than two levels is not supported")
        else:
            image = top
        job.push({"event": "manifest", "index_digest": _s(index_digest),
                        "manifest_digest": str(manifest_digest),
                        "platform": str(chosen or req.platform), "layers": len(image.layers)})

        await restrict([image.config.digest, *(layer.digest for layer in image.layers)])
        config_raw = await self._config_bytes(ref, image, req.offline, job)
        config = await _off_loop(config_raw, parse_config, config_raw, where, self.max_layers)
        if chosen is None:
            chosen = config.platform
            if chosen is not None and req.platform.accepts(chosen) is None:
                from .errors import PlatformNotFound

                raise PlatformNotFound(
                    f"{where} is a single-platform image for {chosen}, not {req.platform}"
                )
        repo_tag = req.archive_name
        key = archive_key(manifest_digest, repo_tag, req.level)
        archive, size = await asyncio.to_thread(self._archive, key)  # index read + stat
        downloaded = 0
        pack_stats = (0, len(image.layers))
        from_fleet = 0
        push: list[FrameKey] = []
        if archive is None or size is None:
            # One lease from the first look at the store to the committed archive: a gc
            # (automatic after any commit, or `fetchd gc` in another process) must not take
            # a layer fetched or found here, nor a cached frame that stands in for a layer
            # this job therefore does not download, before pack has read it.
            # index reads and writes for every layer: one thread call each, off the loop
            found = await asyncio.to_thread(
                self.store.get_frames, [frame_key(d, req.level) for d in config.diff_ids])
            frames = [f.digest for f in found.values()]
            async with self.store.alease(
                    [image.config.digest, *(layer.digest for layer in image.layers), *frames],
                    f"pull {where}") as lease:
                await restrict([], lease)  # the archive committed under it
                fleet_frames: dict[Digest, GivenFrame] = {}
                early = _EarlyDownloads(self, job, ref)
                try:
                    needed = await self._needed_layers(job, ref, image, config.diff_ids, req,
                                                       found)
                    # never for a private registry: its layers must not leave this host
                    if self.fleet is not None and not req.offline and not private:
                        # a layer the cache cannot give starts downloading at once, beside
                        # the lookups and frame downloads still going on
                        early.allow(needed)
                        fleet_frames, push = await self._from_fleet(
                            job, image, config.diff_ids, req.level, found, early.start)
                        from_fleet = len(fleet_frames)
                        ids = dict(zip((layer.digest for layer in image.layers),
                                       config.diff_ids, strict=False))
                        needed = [layer for layer in needed
                                  if ids.get(layer.digest) not in fleet_frames]
                        await early.online()
                    downloaded = len(needed)
                    packed = await self._download_and_pack(job, ref, image, needed, config_raw,
                                                           repo_tag, manifest_digest, lease,
                                                           fleet_frames, early.tasks)
                finally:
                    await early.cancel()
                    self.store.end_restriction(lease)
                    if fleet_frames:  # verified frame files: now in the archive (or not needed)
                        await asyncio.to_thread(_unlink_all, [f.path for f in fleet_frames.values()])
            archive = packed.digest
            size = packed.size
            pack_stats = (packed.frames_compressed, packed.frames_reused)
            self._push_frames(push)
        await restrict([archive])  # also one packed before the registry was configured private
        path = self.store.blob_path(archive)
        await asyncio.to_thread(self.store.record_image, str(ref), str(chosen or req.platform),
                                manifest_digest, archive, req.level)
        return FetchResult(
            reference=str(ref.with_digest(resolved.top_digest)),
            platform=str(chosen or req.platform),
            index_digest=_s(index_digest),
            manifest_digest=str(manifest_digest),
            archive_digest=str(archive),
            archive_path=path,
            size=size,
            level=req.level,
            repo_tag=repo_tag,
            blobs_downloaded=downloaded,
            frames_compressed=pack_stats[0],
            frames_reused=pack_stats[1],
            private=private,
            frames_fleet=from_fleet,
        )

    def _archive(self, key: str) -> tuple[Digest | None, int | None]:
        """The archive committed under ``key`` and its size; (None, None) if there is none
        (or gc took it since it was recorded). Blocking: for a worker thread."""
        archive = self.store.get_alias("archive", key)
        size = _size(self.store.blob_path(archive)) if archive is not None else None
        return archive, size

    async def _restrict(self, digests: list[Digest], lease: str | None = None) -> None:
        await asyncio.to_thread(self.store.restrict, digests, lease)

    async def resolve(self, reference: Reference, offline: bool = False,
                      max_age: float | None = None) -> dict[str, Any]:
        """Tag -> digest for clients (BitBake's checksum logic). ``max_age=0`` forces a HEAD."""
        resolved = await self.resolve_digest(reference, offline=offline, max_age=max_age)
        media_type = resolved.media_type
        if not media_type:  # pinned: the type the stored bytes say, if they are here
            body = await self._stored(resolved.top_digest)
            if body is not None:
                media_type = (await _parse_manifest(body, None, str(reference))).media_type
        out = {"digest": str(resolved.top_digest), "media_type": media_type,
               "cached": resolved.from_cache}
        if resolved.warning is not None:
            out["warning"] = resolved.warning
        return out

    async def resolve_digest(self, ref: Reference, *, offline: bool, job: Job | None = None,
                             max_age: float | None = None, want_body: bool = False) -> _Resolved:
        """The digest a reference means now: pinned, from the tag cache (within its TTL), or
        asked of the registry. Revalidating a tag the cache knows is a HEAD (free on Docker
        Hub, and the manifest is most likely stored already); a tag never resolved before,
        asked ``want_body`` (a pull needs the manifest next), is one GET by tag instead of a
        HEAD and then a GET by digest: its bytes come back in ``body``, hashed, not stored.
        Not with a ``digest_only`` mirror: tags then go upstream, where only a HEAD is free,
        and the manifest comes from the mirror by digest."""
        if ref.digest is not None:
            # No media type from the index: any image's layer list may name this digest with
            # any type (blob_info is a hint, never trusted). parse_manifest takes the type from
            # the verified bytes themselves: their mediaType, else their structure.
            return _Resolved(ref.digest, "", True)
        tag = ref.tag_or_default
        cached = await asyncio.to_thread(self.store.lookup_tag, ref.name, tag)  # index read
        ttl = self.tag_cache_ttl if max_age is None else max_age
        if cached is not None and (offline or time.time() - cached.resolved_at < ttl):
            return _Resolved(cached.digest, cached.media_type, True)
        if offline:
            raise NetworkDisabled(
                f"{ref} is not in the tag cache and network access is disabled; "
                "fetch it once with network access, or pin it by digest"
            )
        await self._online(job)
        try:
            # With a cached answer to fall back on, one quick retry at most: a build should
            # not sit through minutes of backoff (or a 429's Retry-After) for a HEAD.
            with _on_network(job):
                if cached is None and want_body and not any(
                        m.digest_only for m in self.config.registry(ref.registry).mirrors):
                    answer = await self.registry.get_manifest(ref)
                else:
                    answer = await self.registry.head_manifest(
                        ref, retries=None if cached is None else 1)
        except _UNREACHABLE as e:
            if cached is None:
                raise type(e)(
                    f"{e.message}. The tag {ref.name}:{tag} is not in fetchd's tag cache, so "
                    "there is no last known digest to use: retry when the registry answers, "
                    "configure a mirror, or pin the image by digest") from e
            warning = (f"{ref.registry} could not resolve {ref.name}:{tag} ({e.code}); using the "
                       f"last known digest {cached.digest}, resolved {_age(cached.resolved_at)} ago")
            log.warning("%s", warning)
            if job is not None:
                job.push({"event": "warning", "message": warning})
            return _Resolved(cached.digest, cached.media_type, True, warning)
        await asyncio.to_thread(self.store.record_tag, ref.name, tag, answer.digest,
                                answer.media_type)
        return _Resolved(answer.digest, answer.media_type, False, body=answer.body or None)

    async def _stored(self, digest: Digest) -> bytes | None:
        """A small blob's bytes from the store; None when absent (or collected meanwhile)."""
        try:
            return await asyncio.to_thread(_read, self.store.blob_path(digest))
        except FileNotFoundError:
            return None

    async def _manifest_bytes(self, ref: Reference, digest: Digest, offline: bool,
                              job: Job | None = None, fetched: bytes | None = None,
                              media_type: str = "") -> bytes:
        """The manifest ``digest`` from the store, else ``fetched`` (its bytes, hashed to
        ``digest`` by the resolve), else from the registry; committed to the store."""
        if fetched is not None:
            await asyncio.to_thread(self.store.commit_bytes, fetched, digest, media_type or None)
            return fetched
        stored = await self._stored(digest)
        if stored is not None:
            return stored
        if offline:
            raise NetworkDisabled(
                f"manifest {digest} of {ref.name} is not in the store and network access is disabled"
            )
        await self._online(job)
        with _on_network(job):
            got = await self.registry.get_manifest(ref.with_digest(digest))
        await asyncio.to_thread(self.store.commit_bytes, got.body, digest, got.media_type or None)
        return got.body

    async def _config_bytes(self, ref: Reference, image: ImageManifest, offline: bool,
                            job: Job | None = None) -> bytes:
        desc = image.config
        stored = await self._stored(desc.digest)
        if stored is not None:
            return stored
        if offline:
            raise NetworkDisabled(
                f"config {desc.digest} of {ref.name} is not in the store and network access is disabled"
            )
        await self._online(job)
        with _on_network(job):
            body = await self.registry.get_blob_bytes(ref, desc)
        await asyncio.to_thread(self.store.commit_bytes, body, desc.digest, desc.media_type or None)
        return body

    async def _download_and_pack(self, job: Job, ref: Reference, image: ImageManifest,
                                 needed: list[Any], config_raw: bytes, repo_tag: str,
                                 manifest_digest: Digest, lease: str,
                                 frames: dict[Digest, GivenFrame] | None = None,
                                 started: dict[Digest, asyncio.Future[None]] | None = None
                                 ) -> PackResult:
        """Download ``needed`` and pack the image at once; the packed archive. ``started``:
        downloads of some of them already running (taken out of it here).

        The pack follows the downloads (see ``pack_image``). When a download fails, the pack
        is cancelled and the download's error raised: no archive. When the pack fails while
        it followed downloads, it may have read bytes that were never verified (a mirror's
        wrong bytes, fetched again from the next source by ``_download``): the downloads
        decide. If one fails, its error is raised; if all succeed, the image is packed again
        from the store, whose verified blobs make that pack's outcome the answer.
        """
        req = job.request
        where = str(ref)
        if needed:
            await self._online(job)
        # Blobs are fetched in the order pack reads them: this job's before later jobs',
        # its first layer before its second (ranges of one host take turns by this order).
        started = started if started is not None else {}
        running = {layer.digest for layer in needed if layer.digest in started}
        early: list[Awaitable[None]] = [started.pop(digest) for digest in running]
        # the others start 64 per turn of the loop (a thousand at once held it for 18 ms)
        downloads = asyncio.gather(*early, _gather_staggered(
            self._download(job, ref, layer, job.seq * 1024 + i)
            for i, layer in enumerate(needed) if layer.digest not in running))
        follower = _Follower(self.store) if needed else None

        def pack(follow: bool) -> asyncio.Task[PackResult]:
            return asyncio.ensure_future(pack_image(
                self.store, image, config_raw, repo_tag, req.level, progress=_PackProgress(job),
                image_name=where, manifest_digest=manifest_digest, budget=self.budget,
                follow=follower if follow else None, lease=lease, frames=frames,
                owner=req.uid,  # compression slots are shared fairly between uids
                limits=self.config.pack))

        job.push({"event": "pack", "state": "start", "level": req.level})
        packing = pack(True)
        try:
            both: list[asyncio.Future[Any]] = [packing, downloads]
            await asyncio.wait(both, return_when=asyncio.FIRST_EXCEPTION)
            if downloads.done() and downloads.exception() is not None:
                packing.cancel()
                await asyncio.wait([packing])
                if not packing.cancelled():
                    packing.exception()  # retrieved: the download's error is the one to report
                await downloads  # raises it
            bomb = packing.exception() if packing.done() and not packing.cancelled() else None
            if isinstance(bomb, LayerTooLarge):
                # final: the bound is checked on the bytes themselves; the except below
                # stops the downloads at once (their partials stay for a retry)
                raise bomb
            if packing.done() and packing.exception() is not None and needed:
                await downloads  # a download's error, if one failed for good
                log.info("pack of %s failed while it followed downloads (%s); the downloads "
                         "succeeded, packing again from the store", where, packing.exception())
                packing = pack(False)
            await downloads
            return await packing
        except BaseException:
            tasks: list[asyncio.Future[Any]] = [packing, downloads]
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled():
                    task.exception()
            raise

    # -- the fleet's frame cache ---------------------------------------------------------------

    async def _from_fleet(self, job: Job, image: ImageManifest, diff_ids: tuple[Digest, ...],
                          level: int, local: Mapping[str, Any],
                          on_miss: Callable[[Descriptor], object] = lambda layer: None,
                          ) -> tuple[dict[Digest, GivenFrame], list[FrameKey]]:
        """Frames of this image's layers from the fleet's frame cache, before any layer
        download: each found entry is downloaded and verified in full as it arrives
        (``check_frame``; its digest against the entry's). ``local``: the frames the store
        has (``get_frames``; those layers are not looked up). Returns the verified frame
        files by diff_id (temporary files the caller removes; the pack takes them as cached
        frames and those layers are not downloaded), and the keys to push once the pack made
        their frames (misses and rejected entries). ``on_miss(layer)`` as soon as a layer's
        frame is known not to come (a miss, a failure, a rejected entry), while the others
        go on. Never raises for the cache's sake."""
        assert self.fleet is not None
        fleet = self.fleet
        todo: dict[Digest, tuple[FrameKey, Descriptor]] = {}
        for layer, diff_id in zip(image.layers, diff_ids, strict=False):
            if diff_id in todo or diff_id.algorithm != "sha256":
                continue
            if frame_key(diff_id, level) not in local:
                todo[diff_id] = (fleet.key(diff_id, level), layer)
        if not todo or not fleet.available():
            return {}, []
        async def one(key: FrameKey, layer: Descriptor) -> GivenFrame | None:
            got = await self._fleet_frame(job, key, layer)
            if got is None:
                on_miss(layer)
            return got

        results = await asyncio.gather(*(one(key, layer) for key, layer in todo.values()))
        taken = {key.diff_id: path for (key, _), path in zip(todo.values(), results, strict=True)
                 if path is not None}
        return taken, [key for key, _ in todo.values() if key.diff_id not in taken]

    async def _fleet_frame(self, job: Job, key: FrameKey, layer: Descriptor) -> GivenFrame | None:
        """One layer's frame from the cache, verified: its file, or None (a miss, a failure
        or a bad entry; nothing is kept then)."""
        assert self.fleet is not None
        fleet = self.fleet
        entry = await fleet.lookup(key)
        if entry is None:
            return None
        if entry.size > max_frame_size(entry.layer_size):
            fleet.reject(key, f"a frame of {entry.size} bytes for a layer of {entry.layer_size}")
            return None
        # The claimed layer size bounds the decompression: it must fit the layer's blob, or a
        # small frame could make this host decompress for hours before its hash fails.
        bound = _layer_size_bound(layer, self.config.pack.layer_limit)
        if entry.layer_size > bound:
            fleet.reject(key, f"claims a layer of {entry.layer_size} bytes; its {layer.size}-byte "
                              f"blob ({layer.media_type}) holds at most {bound}")
            return None
        if self._checks is None:
            self._checks = concurrent.futures.ThreadPoolExecutor(
                usable_cpus(), thread_name_prefix="fetchd-frame-check")
        tmp = self.store.temp_path(".fleet.zst")
        download = await FrameDownload.create(tmp)
        ok = False
        try:
            reader = download.reader()
            try:
                # the check reads the frame as it arrives: decompression overlaps the transfer
                check = asyncio.get_running_loop().run_in_executor(
                    self._checks, functools.partial(
                        check_frame, tmp, key.diff_id, key.level, entry.layer_size,
                        source=reader, complete=download.wait_done))
                try:
                    await fleet.fetch(entry, download)
                finally:
                    download.finish(failed=True)  # no-op once finished: wakes the check
                    await asyncio.wait([check])
                    if not check.cancelled():
                        check.exception()  # retrieved: fetch's own error comes first
                check.result()
            finally:
                reader.close()
            if download.digest != entry.digest:
                raise FrameRejected(f"the frame hashes to {download.digest}, the entry names "
                                    f"{entry.digest}")
            ok = True
        except (FetchFailed, FrameRejected) as e:
            if not (isinstance(e, FetchFailed) and e.counted):
                fleet.reject(key, str(e))
            return None
        finally:
            download.finish(failed=True)  # no-op once finished; closes the file otherwise
            if not ok:
                await asyncio.to_thread(tmp.unlink, True)
        fleet.hit(key, entry.size)
        job.push({"event": "layer", "digest": str(layer.digest), "diff_id": str(key.diff_id),
                  "size": entry.size, "state": "frame-fleet"})
        # the hash of its bytes goes with it: as the archive's start, it is continued
        return GivenFrame(tmp, entry.size, download.sha256())

    def _push_frames(self, keys: list[FrameKey]) -> None:
        """Hand the frames this pull made for ``keys`` to the cache's background pushes."""
        fleet = self.fleet
        if fleet is None or not fleet.push:
            return
        for key in keys:
            fleet.push_later(key, functools.partial(self._open_frame, key))

    def _open_frame(self, key: FrameKey) -> tuple[BinaryIO, int, int, int] | None:
        """In a worker thread: a frame of the store, opened, with its layer's size."""
        span = self.store.get_frame(frame_key(key.diff_id, key.level))
        if span is None:
            return None
        try:
            f = open(self.store.blob_path(span.digest), "rb")  # noqa: SIM115 -- the pusher closes it
        except FileNotFoundError:
            return None
        try:
            layer_size = member_size(os.pread(f.fileno(), min(HEADER_PREFIX, span.length), span.offset),
                                     key.diff_id)
        except (ValueError, OSError):
            f.close()
            return None
        return f, span.offset, span.length, layer_size

    async def _needed_layers(self, job: Job, ref: Reference, image: ImageManifest,
                             diff_ids: tuple[Digest, ...], req: FetchRequest,
                             frames: Mapping[str, Any],
                             skip: set[Digest] | None = None) -> list[Any]:
        """The distinct layers to download: those whose frame at this level is not cached
        (not in ``frames``, the job's one ``get_frames`` read, whose frames its lease
        holds; nor in ``skip``: diff_ids whose frames came from the fleet's frame cache) and
        whose blob is not in the store. NetworkDisabled if there are any offline.

        The index work for all layers (their diff_ids recorded in one transaction) and the
        presence checks run in one worker thread: a 1000-layer image costs the event loop
        nothing per layer but the events."""
        skip = skip or set()
        pairs = [(layer, diff_ids[i] if i < len(diff_ids) else None)
                 for i, layer in enumerate(image.layers)]
        layers = tuple(layer for layer, diff_id in pairs if diff_id not in skip)
        keys = [frame_key(diff_id, req.level) if diff_id is not None else None
                for layer, diff_id in pairs if diff_id not in skip]

        def look() -> set[Digest]:
            # the diff_id only: a layer list is no authority on any blob's media type
            self.store.record_blob_infos(
                (layer.digest, None, diff_id) for layer, diff_id in pairs if diff_id is not None)
            return {layer.digest for layer, key in zip(layers, keys, strict=True)
                    if key not in frames and self.store.has(layer.digest)}

        present = await asyncio.to_thread(look)
        needed = []
        for layer, key in zip(layers, keys, strict=True):
            if key is not None and key in frames:
                job.push({"event": "layer", "digest": str(layer.digest), "size": layer.size,
                          "state": "frame-cached"})
            elif layer.digest in present:
                job.push({"event": "layer", "digest": str(layer.digest), "size": layer.size,
                          "state": "cached"})
            else:
                needed.append(layer)
        if needed and req.offline:
            missing = ", ".join(str(layer.digest) for layer in needed)
            raise NetworkDisabled(
                f"{ref}: layers not in the store and network access is disabled: {missing}"
            )
        return list({layer.digest: layer for layer in needed}.values())

    async def _download(self, job: Job, ref: Reference, layer: Any, priority: int = 0) -> None:
        """Fetch one layer into the store; wrong bytes are never kept, and fetched again.

        The store verifies on commit and discards a partial that fails, so nothing wrong is
        ever stored. Mirrors that wrote wrong bytes are excluded for the next try of this
        blob. Wrong bytes from the registry itself are fetched again whole (from byte 0,
        one stream) up to ``network.corrupt_retries`` times, each counted as ``corrupt``;
        then the mismatch is the job's error.
        """
        digest, size = layer.digest, layer.size
        job.push({"event": "layer", "digest": str(digest), "size": size, "state": "downloading"})
        progress = _LayerProgress(job, str(digest), size)
        exclude: frozenset[str] = frozenset()
        corrupt_left = self.config.network.corrupt_retries
        unknown_retried = whole = False
        # Each try excludes one more mirror, spends one of the registry's corrupt retries, or
        # is the one repeat allowed when another task's fetch (which we joined) or a resumed
        # partial of unknown origin failed: the count is bounded.
        while True:
            sources: list[str] = []
            resumed: list[bool] = []

            async def fetch(sink: Any, exclude: frozenset[str] = exclude, whole: bool = whole,
                            sources: list[str] = sources, resumed: list[bool] = resumed) -> None:
                progress.done = held_bytes(sink)
                resumed.append(progress.done > 0)  # bytes of unknown origin held
                # Only this job's own transfer is its wait on a registry: joined to another
                # job's flight, or waiting for an ingest turn, it sends no progress events and
                # must not be taken for stalled (that flight has deadlines of its own).
                with _on_network(job):
                    sources.extend(await self.registry.fetch_blob(
                        ref, layer, sink, progress=progress, exclude=exclude, priority=priority,
                        whole=whole))

            try:
                await self.store.ensure_blob(digest, size, fetch, media_type=layer.media_type,
                                             source=f"{ref.registry}/{ref.repository}",
                                             owner=job.request.uid)
                break
            except (DigestMismatch, SizeMismatch) as e:
                bad = self.registry.blame(ref, layer, tuple(sources)) - exclude
                if bad:
                    exclude |= bad
                    job.push({"event": "warning", "message": (
                        f"mirror {', '.join(sorted(bad))} served wrong bytes for layer {digest} "
                        f"({e.code}); nothing was kept, fetching it again from the next source")})
                    continue
                if (not sources or any(resumed)) and not unknown_retried:
                    # Another task's (or process's) fetch failed, or ours resumed a partial
                    # of unknown origin: the store dropped those bytes, so one more try is fair.
                    unknown_retried = True
                    continue
                if ref.registry not in sources:
                    raise
                self.registry.upstream_corrupt(ref, layer, e, again=corrupt_left > 0)
                if corrupt_left <= 0:
                    raise
                corrupt_left -= 1
                whole = True
                job.push({"event": "warning", "message": (
                    f"{ref.registry} sent wrong bytes for layer {digest} of {ref.repository} "
                    f"({e.code}); nothing was kept, fetching it again from byte 0")})
        job.push({"event": "layer", "digest": str(digest), "size": size, "state": "done"})


class _EarlyDownloads:
    """Downloads of the layers the fleet's frame cache cannot give (a miss, a failed request,
    a rejected entry), started as soon as that is known instead of after every lookup and
    frame download of the pull: ``start(layer)``, for layers ``allow``ed (the ones to
    download), once each. The first takes the job's network slot for all (``online``).
    ``tasks`` go to the pack's downloads (``_download_and_pack(started=)``, which takes them
    out); ``cancel`` stops what was not handed on (the pull failed or was cancelled)."""

    def __init__(self, puller: Puller, job: Job, ref: Reference) -> None:
        self._puller, self._job, self._ref = puller, job, ref
        self._allowed: dict[Digest, tuple[int, Descriptor]] = {}
        self.tasks: dict[Digest, asyncio.Future[None]] = {}
        self._online: asyncio.Future[None] | None = None

    def allow(self, needed: list[Descriptor]) -> None:
        self._allowed = {layer.digest: (i, layer) for i, layer in enumerate(needed)}

    def start(self, layer: Descriptor) -> None:
        allowed = self._allowed.pop(layer.digest, None)
        if allowed is None:
            return
        if self._online is None:
            self._online = asyncio.ensure_future(self._puller._online(self._job))
        # the priority _download_and_pack would give it: the order pack reads them
        self.tasks[layer.digest] = asyncio.ensure_future(
            self._run(allowed[1], self._job.seq * 1024 + allowed[0]))

    async def _run(self, layer: Descriptor, priority: int) -> None:
        await self.online()
        await self._puller._download(self._job, self._ref, layer, priority)

    async def online(self) -> None:
        """Once the job holds its network slot (at once if no download started early)."""
        if self._online is not None:
            await asyncio.shield(self._online)  # one waiter cancelled cancels not the others

    async def cancel(self) -> None:
        pending = [*self.tasks.values(), *([self._online] if self._online is not None else [])]
        self.tasks.clear()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for task in pending:
            if not task.cancelled():
                task.exception()  # retrieved: the pull's own error (if any) is the one raised


class _Follower:
    """The store's following readers for pack (``pack.FollowSource``); the store's own ingest
    check stands in for a second hash of every byte (``verify=False``)."""

    def __init__(self, store: LayerStore) -> None:
        self.store = store

    def open_following(self, digest: Digest, stop: threading.Event) -> BinaryIO | None:
        return self.store.open_following(digest, stop)

    def read_following(self, digest: Digest) -> AsyncIterator[bytes]:
        return self.store.read_following(digest, verify=False)

    async def wait_for_bytes(self, digest: Digest, at_least: int) -> None:
        await self.store.wait_for_bytes(digest, at_least)


class _LayerProgress:
    """Turns byte counts from the registry client into throttled progress events."""

    def __init__(self, job: Job, digest: str, total: int) -> None:
        self.job, self.digest, self.total = job, digest, total
        self.done = 0
        self._last = 0.0

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if now - self._last >= _PROGRESS_INTERVAL or self.done >= self.total:
            self._last = now
            self.job.push({"event": "progress", "digest": self.digest,
                           "bytes": self.done, "total": self.total})


async def _gather_staggered(coros: Iterator[Coroutine[Any, Any, _T]]) -> list[_T]:
    """``asyncio.gather`` of ``coros``, started ``STAGGER`` at a time, a turn of the event
    loop apart: a thousand tasks started at once run their first steps in one turn (18 ms of
    the loop for the downloads of a 1000-layer image). Like gather, the first error is
    raised and the other tasks go on; cancelling this cancels every task it started (and
    starts no more: ``coros`` is consumed lazily, nothing is left never awaited)."""
    tasks: list[asyncio.Future[_T]] = []
    try:
        for i, coro in enumerate(coros, 1):
            tasks.append(asyncio.ensure_future(coro))
            if i % STAGGER == 0:
                await asyncio.sleep(0)
    except BaseException:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        raise
    return await asyncio.gather(*tasks)


class _PackProgress:
    """Pack events may come from worker threads: hop onto the loop before touching the job
    (an event from the loop's own thread is pushed at once: a hop costs a write to the
    loop's wake-up socket, one per layer event of a 1000-layer image)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()

    def __call__(self, event: dict[str, Any]) -> None:
        if threading.get_ident() == self.thread:
            self.job.push({"event": "pack", **event})
        else:
            self.loop.call_soon_threadsafe(self.job.push, {"event": "pack", **event})


@contextlib.contextmanager
def _on_network(job: Job | None) -> Iterator[None]:
    """Mark ``job`` as waiting on a registry while the block runs (``Puller._watched``)."""
    if job is not None:
        job.network += 1
    try:
        yield
    finally:
        if job is not None:
            job.network -= 1


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _size(path: Path) -> int | None:
    """The size of a store file, None when gc took it since it was looked up."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


async def _no_restriction(digests: list[Digest], lease: str | None = None) -> None:
    pass


async def _off_loop(body: bytes, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)``, which parses ``body``: at once when it is small, in a worker thread
    when it is bigger than ``INLINE_JSON`` (tens of ms of parsing that the loop never waits
    for; ``manifest.loads`` then leaves the GIL to it every few ms)."""
    if len(body) <= INLINE_JSON:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def _parse_manifest(body: bytes, content_type: str | None, where: str,
                          max_layers: int | None = None) -> ImageManifest | ImageIndex:
    return await _off_loop(body, parse_manifest, body, content_type, where, max_layers)


def _s(digest: Digest | None) -> str | None:
    return None if digest is None else str(digest)


def _age(ts: float) -> str:
    seconds = max(0, int(time.time() - ts))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def _layer_size_bound(layer: Descriptor, limit: Callable[[int], int]) -> int:
    """The most uncompressed bytes the layer blob ``layer`` may hold: its size when it is a
    plain tar, else what the normal path lets it expand to (``[pack]``'s ``layer_limit``). A
    media type that misstates the compression only turns a good frame into a miss."""
    if layer_compression(layer.media_type) == "none":
        return layer.size
    return limit(layer.size)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
