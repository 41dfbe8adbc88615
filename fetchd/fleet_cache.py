"""The fleet's frame cache: layer frames kept as OCI artifacts in a registry the fleet runs.

Every host of a fleet that meets a layer would gunzip, hash and zstd-compress it again; the
frames are deterministic, so one host's work serves all. ``FrameCache`` keeps them in one
repository of an ordinary registry (distribution, Harbor, zot), configured in ``[fleet]``:

- key: ``FrameKey`` (diff_id, level, zstd library version, fetchd frame format version), as the
  tag ``<diff_id hex>.l<level>.z<zstd>.f<format>`` (it fits ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``);
- value: an OCI image manifest in the OCI 1.1 artifact form (``artifactType``, the empty
  config ``{}``, which distribution 2.8 needs pushed as a blob) with the frame as its one
  layer and the key plus the layer's uncompressed size in its annotations.

This module only moves bytes and checks the entry's form; it knows nothing of zstd. Nothing it
returns is trusted: the caller verifies a frame in full (``frame_check``) before any use, and
reports the outcome (``hit`` / ``reject``).

Invariants:
- a lookup is one GET of the tag's manifest, within ``[fleet] timeout``; a
  fetch reads at most the entry's size, each read within ``timeout``; any failure is a miss
  for the caller (counted, logged), never an error of the pull. A timeout or a connection
  failure takes the cache out of use for ``cooldown`` seconds;
- pushes run in background tasks, at most ``push_concurrency`` at once and ``push_bandwidth``
  bytes/s together; they never raise into a pull, and are cancelled by ``close``;
- credentials come from the auth files for the cache's host and never appear in a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import aiohttp

from .auth import Credentials, is_loopback
from .config import Config, FleetConfig
from .digest import Digest
from .errors import FetchdError, InvalidReference
from .reference import Reference
from .registry_errors import read_capped
from .registry_http import TRANSIENT, Endpoint, Transport

log = logging.getLogger(__name__)

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.fetchd.frame.v1"
FRAME_LAYER_TYPE = "application/vnd.fetchd.tar-member+zstd"  # == pack.FRAME_MEDIA_TYPE
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
EMPTY_DIGEST = Digest("sha256", hashlib.sha256(EMPTY).hexdigest())
ANNOTATION = "dev.fetchd.frame."
MAX_MANIFEST = 64 * 1024
MIN_RATE = 1024 * 1024  # bytes/s a frame download may not fall below (on top of ``timeout``)
MAX_PENDING = 256       # pushes queued at once; beyond, they are dropped (counted)
_CHUNK = 1 << 20
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

COUNTERS = ("lookups", "found", "hits", "misses", "rejected", "errors", "timeouts", "bytes",
            "pushes", "push_bytes", "push_skipped", "push_errors", "push_dropped")
"""``stats()`` keys that only grow (Prometheus counters); the others are levels."""


@dataclass(frozen=True)
class FrameKey:
    """What a frame depends on: the layer, the level, libzstd's version, fetchd's format."""

    diff_id: Digest
    level: int
    zstd: str
    format: int

    @property
    def tag(self) -> str:
        """The registry tag; ValueError for keys that cannot be one (a non-sha256 diff_id)."""
        tag = f"{self.diff_id.hex}.l{self.level}.z{self.zstd}.f{self.format}"
        if self.diff_id.algorithm != "sha256" or not _TAG.match(tag):
            raise ValueError(f"no frame cache tag for {self.diff_id} (level {self.level}, "
                             f"zstd {self.zstd}, format {self.format})")
        return tag

    def annotations(self) -> dict[str, str]:
        return {ANNOTATION + "diff_id": str(self.diff_id), ANNOTATION + "level": str(self.level),
                ANNOTATION + "zstd": self.zstd, ANNOTATION + "format": str(self.format)}


@dataclass(frozen=True)
class FrameEntry:
    """What the cache claims for a key (unverified): the frame blob and the layer's size."""

    key: FrameKey
    digest: Digest      # of the frame blob
    size: int           # the frame's bytes
    layer_size: int     # the layer's uncompressed bytes (the tar member's content)


FrameSource = Callable[[], tuple[BinaryIO, int, int, int] | None]
"""Called in a worker thread when a push starts: ``(open file, offset, length, layer size)``
of a frame this host made, or None when it is gone; the pusher closes the file."""


class EntryInvalid(Exception):
    """The cache's entry for a key is malformed or names another key."""


class FrameCache:
    """The client of one frame cache repository (see the module docstring)."""

    def __init__(self, config: Config, *, zstd: str, format: int,
                 credentials: Credentials | None = None,
                 session: aiohttp.ClientSession | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        fleet = config.fleet
        if fleet.frame_cache is None:
            raise ValueError("no [fleet] frame_cache configured")
        self.fleet: FleetConfig = fleet
        self.zstd, self.format = zstd, format
        self.clock = clock
        # Lookups and downloads on one connection budget, pushes on another: a long upload
        # never holds a connection a lookup is waiting for.
        self._t = Transport(config, session, credentials=credentials, clock=clock)
        self._push_t = Transport(config, session, credentials=credentials, clock=clock)
        parts = urlsplit(fleet.frame_cache)
        loopback = is_loopback(parts.netloc)
        self.usable = parts.scheme == "https" or fleet.insecure or loopback
        if not self.usable:
            log.warning("frame cache %s is plain HTTP: set [fleet] insecure = true to use it",
                        parts.netloc)
        self._ep = Endpoint(parts.netloc, fleet.base, parts.netloc, fleet.insecure or loopback,
                            verify_tls=not fleet.insecure, auth_file=fleet.auth_file,
                            timeout=fleet.timeout)
        # Uploads take as long as their bytes take (paced by push_bandwidth): no per-request
        # limit, one for the whole push instead (``_push``).
        self._push_ep = dataclasses.replace(self._ep, timeout=None)
        self._ref = Reference(parts.netloc, fleet.repository)
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._down_until = 0.0
        self._push_slots = asyncio.Semaphore(fleet.push_concurrency)
        # a lookup's timeout runs from when it has a connection, not while it queues for one
        self._lookup_slots = asyncio.Semaphore(self._t.host(parts.netloc).limit)
        self._pushes: set[asyncio.Task[None]] = set()
        self._bucket = _Bucket(fleet.push_bandwidth, clock)
        self._empty_pushed = False

    @property
    def push(self) -> bool:
        return self.fleet.push

    def key(self, diff_id: Digest, level: int) -> FrameKey:
        return FrameKey(diff_id, level, self.zstd, self.format)

    def available(self) -> bool:
        """Whether to ask the cache now (configured usable, not in its cooldown)."""
        return self.usable and self._down_until <= self.clock()

    def stats(self) -> dict[str, Any]:
        """Counters (``COUNTERS``) and levels: ``pushes_pending``, ``down``, ``down_seconds``,
        ``push`` (pushes enabled), ``url`` (no credentials: they are never in it)."""
        down = max(0.0, self._down_until - self.clock())
        return {**self.counts, "pushes_pending": len(self._pushes), "down": down > 0,
                "down_seconds": round(down, 1), "push": self.fleet.push,
                "url": self.fleet.frame_cache}

    async def close(self) -> None:
        """Cancel pending pushes (a half-sent upload is abandoned; the registry drops it)."""
        tasks = list(self._pushes)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._t.close()
        await self._push_t.close()

    # ------------------------------------------------------------------ outcomes

    def hit(self, key: FrameKey, nbytes: int) -> None:
        """The caller verified the entry's frame and used it."""
        self.counts["hits"] += 1
        log.info("frame cache: layer %s at level %d from %s (%d bytes)", key.diff_id, key.level,
                 self._ep.key, nbytes)

    def reject(self, key: FrameKey, reason: str) -> None:
        """The entry for ``key`` is bad (malformed, another layer's, corrupt, truncated): count
        it and warn; the caller takes the normal path (and may push a good frame over it)."""
        self.counts["rejected"] += 1
        log.warning("frame cache %s: entry %s for layer %s at level %d rejected (%s); "
                    "compressing the layer here instead", self._ep.key, _safe(key), key.diff_id,
                    key.level, reason)

    def _failed(self, what: str, key: FrameKey | None, e: BaseException) -> None:
        """A request failed or timed out: count it, and rest the cache for ``cooldown``."""
        timeout = isinstance(e, TimeoutError)
        self.counts["timeouts" if timeout else "errors"] += 1
        reason = "timed out" if timeout else (e.message if isinstance(e, FetchdError) else
                                              type(e).__name__)
        if self._down_until <= self.clock():
            log.warning("frame cache %s: %s%s failed (%s); not asking it for %.0f s",
                        self._ep.key, what, f" of {key.diff_id}" if key else "", reason,
                        self.fleet.cooldown)
        self._down_until = self.clock() + self.fleet.cooldown

    # ------------------------------------------------------------------ lookups

    async def lookup(self, key: FrameKey) -> FrameEntry | None:
        """The cache's entry for ``key``, or None (a miss, a failure, a malformed entry: each
        counted). One GET of the tag's manifest, within ``timeout``."""
        if not self.available():
            return None
        try:
            tag = key.tag
        except ValueError:
            return None
        try:
            async with self._lookup_slots:
                if not self.available():
                    return None
                self.counts["lookups"] += 1
                async with asyncio.timeout(self.fleet.timeout):
                    body = await self._manifest(tag)
        except EntryInvalid as e:
            self.counts["found"] += 1
            self.reject(key, str(e))
            return None
        except (TimeoutError, FetchdError, *TRANSIENT) as e:
            self._failed("lookup", key, e)
            return None
        if body is None:
            self.counts["misses"] += 1
            log.info("frame cache %s: no frame of layer %s at level %d", self._ep.key,
                     key.diff_id, key.level)
            return None
        self.counts["found"] += 1
        try:
            return _entry(key, body)
        except EntryInvalid as e:
            self.reject(key, str(e))
            return None

    async def _manifest(self, tag: str) -> bytes | None:
        """The manifest under ``tag`` (None: 404), in one round trip: a lookup is on the
        critical path of every layer of a pull. The body is checked against the
        Docker-Content-Digest the same answer names (a sha256 one), as far as that goes:
        nothing in it is trusted, the frame it names is verified in full."""
        async with self._t.open(self._ep, self._ref, "GET",
                                f"/v2/{self._ref.repository}/manifests/{tag}",
                                what="frame lookup", headers={"Accept": MANIFEST_TYPE},
                                ok=(200, 404), retries=0) as resp:
            if resp.status == 404:
                return None
            digest = Digest.from_header(resp.headers.get("Docker-Content-Digest"))
            body = await read_capped(resp.content, MAX_MANIFEST + 1)
        if len(body) > MAX_MANIFEST:
            raise EntryInvalid(f"manifest of more than {MAX_MANIFEST} bytes")
        if digest is not None and digest.algorithm == "sha256" and Digest.of(body) != digest:
            raise EntryInvalid("manifest does not hash to its Docker-Content-Digest")
        return body

    async def fetch(self, entry: FrameEntry, download: FrameDownload) -> None:
        """Write the entry's frame blob into ``download`` (exactly ``entry.size`` bytes, or
        raise FetchFailed; ``download`` is then failed too, so its readers stop).

        Each read within ``timeout``, the whole within ``timeout + size / MIN_RATE``. The
        bytes are unverified: the caller checks them (``frame_check``, reading them while
        they arrive) and their digest (``download.digest``).
        """
        path = f"/v2/{self._ref.repository}/blobs/{entry.digest}"
        got = 0
        try:
            try:
                async with asyncio.timeout(self.fleet.timeout + entry.size / MIN_RATE):
                    async with self._t.open(self._ep, self._ref, "GET", path, what="frame",
                                            retries=0) as resp:
                        pending: list[bytes] = []
                        held = 0
                        async for chunk in _chunks(resp):
                            got += len(chunk)
                            if got > entry.size:
                                raise FetchFailed(f"more than the {entry.size} bytes announced")
                            pending.append(chunk)
                            held += len(chunk)
                            if held >= _CHUNK:  # one thread hop per MiB, not per read
                                await asyncio.to_thread(download.write, *pending)
                                pending.clear()
                                held = 0
                        if pending:
                            await asyncio.to_thread(download.write, *pending)
            except FetchFailed:
                raise
            except (TimeoutError, FetchdError, *TRANSIENT) as e:
                self._failed("frame download", entry.key, e)
                raise FetchFailed(f"download failed after {got} bytes ({type(e).__name__})",
                                  counted=True) from e
            finally:
                self.counts["bytes"] += got
            if got != entry.size:
                raise FetchFailed(f"truncated: {got} of {entry.size} bytes")
        except BaseException:
            download.finish(failed=True)
            raise
        download.finish()

    # ------------------------------------------------------------------ pushes

    def push_later(self, key: FrameKey, source: FrameSource) -> None:
        """Push the frame ``source`` opens under ``key``, in the background (best effort)."""
        if not (self.fleet.push and self.available()):
            return
        if len(self._pushes) >= MAX_PENDING:
            self.counts["push_dropped"] += 1
            return
        task = asyncio.create_task(self._push(key, source), name=f"frame push {key.diff_id}")
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    async def wait_pushes(self) -> None:
        """Until every push started so far has ended (tests, benchmarks)."""
        while self._pushes:
            await asyncio.wait(list(self._pushes))

    async def _push(self, key: FrameKey, source: FrameSource) -> None:
        try:
            async with self._push_slots:
                if not self.available():
                    return
                opened = await asyncio.to_thread(source)
                if opened is None:
                    self.counts["push_skipped"] += 1
                    return
                f, offset, length, layer_size = opened
                if layer_size == 0:
                    # zstd sizes an empty frame's window for its empty input, so its header is
                    # not the one frame_check pins for the level: every host would reject it
                    f.close()
                    self.counts["push_skipped"] += 1
                    return
                rate = min(MIN_RATE, self.fleet.push_bandwidth or MIN_RATE)
                try:
                    # a stalled cache must not hold a push slot for ever
                    async with asyncio.timeout(4 * self.fleet.timeout + length / rate):
                        await self._push_frame(key, f, offset, length, layer_size)
                finally:
                    f.close()
                self.counts["pushes"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- a push never fails anything; counted, logged
            self.counts["push_errors"] += 1
            reason = e.message if isinstance(e, FetchdError) else (
                "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}")
            log.warning("frame cache %s: push of layer %s at level %d failed (%s)", self._ep.key,
                        key.diff_id, key.level, reason)

    async def _push_frame(self, key: FrameKey, f: BinaryIO, offset: int, length: int,
                          layer_size: int) -> None:
        """The blob if the cache lacks it, then the manifest under the key's tag."""
        digest = await asyncio.to_thread(_hash_span, f, offset, length)
        await self._ensure_empty()
        if await self._blob_exists(digest):
            self.counts["push_skipped"] += 1
        else:
            await self._upload(f, offset, length, digest)
            self.counts["push_bytes"] += length
        async with self._push_t.open(
                self._push_ep, self._ref, "PUT",
                f"/v2/{self._ref.repository}/manifests/{key.tag}", what="frame push",
                headers={"Content-Type": MANIFEST_TYPE}, ok=(200, 201), retries=0,
                data=_manifest(key, digest, length, layer_size), push=True):
            pass

    async def _ensure_empty(self) -> None:
        """The empty config blob (OCI 1.1 artifacts name it; distribution 2.8 wants it)."""
        if self._empty_pushed:
            return
        if not await self._blob_exists(EMPTY_DIGEST):
            await self._upload(None, 0, len(EMPTY), EMPTY_DIGEST, data=EMPTY)
        self._empty_pushed = True

    async def _blob_exists(self, digest: Digest) -> bool:
        async with self._push_t.open(self._push_ep, self._ref, "HEAD",
                                f"/v2/{self._ref.repository}/blobs/{digest}", what="frame blob",
                                ok=(200, 404), retries=0, push=True) as resp:
            return resp.status == 200

    async def _upload(self, f: BinaryIO | None, offset: int, length: int, digest: Digest,
                      data: bytes | None = None) -> None:
        """One monolithic upload: POST for a session, PUT the bytes with ``?digest=``."""
        repo = self._ref.repository
        async with self._push_t.open(self._push_ep, self._ref, "POST", f"/v2/{repo}/blobs/uploads/",
                                what="frame upload", ok=(202,), retries=0, push=True,
                                headers={"Content-Length": "0"}) as resp:
            location = resp.headers.get("Location", "")
        path = self._upload_path(location)
        body: Any = data if data is not None else self._paced(f, offset, length)
        sep = "&" if "?" in path else "?"
        async with self._push_t.open(self._push_ep, self._ref, "PUT", f"{path}{sep}digest={digest}",
                                what="frame upload", ok=(201, 204), retries=0, push=True,
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Length": str(length)}, data=body):
            pass

    def _upload_path(self, location: str) -> str:
        """The upload URL's path and query; the cache must not send us to another origin."""
        if not location:
            raise FetchFailed("the registry named no upload location")
        parts = urlsplit(location)
        if parts.netloc and parts.netloc != self._ep.key:
            raise FetchFailed(f"upload location on another host ({parts.netloc})")
        if not parts.path.startswith("/v2/"):
            raise FetchFailed("upload location outside /v2/")
        return parts.path + (f"?{parts.query}" if parts.query else "")

    async def _paced(self, f: BinaryIO | None, offset: int, length: int) -> AsyncIterator[bytes]:
        assert f is not None
        sent = 0
        while sent < length:
            n = min(_CHUNK, length - sent)
            await self._bucket.take(n)
            chunk = await asyncio.to_thread(os.pread, f.fileno(), n, offset + sent)
            if not chunk:
                raise FetchFailed("the frame file ended early")
            sent += len(chunk)
            yield chunk


class FrameDownload:
    """A frame being downloaded into ``path``: written and hashed in worker threads, read by
    another thread while it grows (``reader``), so checking overlaps the transfer.

    ``finish`` ends it (``failed``: readers raise FetchFailed instead of seeing the end).
    ``digest`` is the sha256 of everything written, once finished without failure, and
    ``sha256()`` a copy of that hash's state (to continue it over what follows the frame).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 -- closed by finish()
        self._hash = hashlib.sha256()
        self._cond = threading.Condition()
        self.written = 0
        self.done = False
        self.failed = False
        self.digest: Digest | None = None
        self._writing = False  # a write is between its check of ``done`` and its end

    @classmethod
    async def create(cls, path: Path) -> FrameDownload:
        return await asyncio.to_thread(cls, path)

    def write(self, *chunks: bytes) -> None:
        """In a worker thread, one at a time: append ``chunks`` (one ``writev``: they are not
        joined first). The write and the hash run outside the lock (readers take bytes
        already written meanwhile), but ``finish`` waits for a write in progress: a write
        whose awaiting task was cancelled (its thread runs on) never meets a closed
        descriptor, or another file's that reused its number (FetchFailed once finished)."""
        with self._cond:
            if self.done:
                raise FetchFailed("the download was ended")
            self._writing = True
        wrote = 0
        try:
            fd = self._file.fileno()
            views = [memoryview(c) for c in chunks if c]
            while views:
                n = os.writev(fd, views)
                while views and n >= len(views[0]):
                    n -= len(views.pop(0))
                if views:
                    views[0] = views[0][n:]
            for chunk in chunks:
                self._hash.update(chunk)
            wrote = sum(len(chunk) for chunk in chunks)
        finally:
            with self._cond:
                self._writing = False
                self.written += wrote  # readers see only bytes written and hashed
                self._cond.notify_all()

    def finish(self, failed: bool = False) -> None:
        with self._cond:
            while self._writing:  # at most one write's time (the last one, cancelled)
                self._cond.wait()
            if self.done:
                return
            self.done, self.failed = True, failed
            if not failed:
                self.digest = Digest("sha256", self._hash.hexdigest())
            self._cond.notify_all()
        self._file.close()

    def sha256(self) -> Any:
        """A copy of the hash of everything written (a hashlib object), once finished."""
        assert self.digest is not None, "the download has not finished cleanly"
        return self._hash.copy()

    def wait_done(self) -> int:
        """In a reader's thread: until the download ended; its size (FetchFailed if it failed)."""
        with self._cond:
            while not self.done:
                self._cond.wait()
            if self.failed:
                raise FetchFailed("the download failed", counted=True)
            return self.written

    def reader(self) -> _GrowingReader:
        """A blocking reader of the bytes from the start, for a worker thread: ``read`` waits
        for bytes not yet written; it returns b"" only at the end of a finished download."""
        return _GrowingReader(self)

    def _available(self, pos: int) -> int:
        with self._cond:
            while self.written <= pos and not self.done:
                self._cond.wait()
            if self.failed:
                raise FetchFailed("the download failed", counted=True)
            return self.written - pos


class _GrowingReader:
    """``read(n)``: at most ``n`` bytes (every byte written so far if ``n`` < 0), the bytes of
    one ``pread`` as they are (no copy through a buffer of Python's io)."""

    def __init__(self, download: FrameDownload) -> None:
        self._download = download
        self._fd: int | None = os.open(download.path, os.O_RDONLY | os.O_CLOEXEC)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        if self._fd is None:
            raise ValueError("read of a closed frame reader")
        available = self._download._available(self._pos)
        n = available if n < 0 else min(n, available)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FetchFailed(Exception):
    """A frame could not be read from (or written to) the cache as announced. ``counted``:
    already counted as a failed request (``errors``/``timeouts``), not a bad entry."""

    def __init__(self, reason: str, counted: bool = False) -> None:
        super().__init__(reason)
        self.counted = counted


class _Bucket:
    """``rate`` bytes/s for all pushes together (0: no limit); bursts of one chunk."""

    def __init__(self, rate: int, clock: Callable[[], float]) -> None:
        self.rate, self.clock = rate, clock
        self.tokens = float(_CHUNK)
        self.stamp = clock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = self.clock()
        self.tokens = min(float(_CHUNK), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


async def _chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    while chunk := await resp.content.readany():
        yield chunk


def _hash_span(f: BinaryIO, offset: int, length: int) -> Digest:
    h = hashlib.sha256()
    done = 0
    while done < length:
        chunk = os.pread(f.fileno(), min(_CHUNK, length - done), offset + done)
        if not chunk:
            raise FetchFailed("the frame file ended early")
        h.update(chunk)
        done += len(chunk)
    return Digest("sha256", h.hexdigest())


def _manifest(key: FrameKey, digest: Digest, size: int, layer_size: int) -> bytes:
    """The entry's manifest: deterministic bytes (no timestamps), so two hosts pushing the
    same frame push the same manifest."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": str(EMPTY_DIGEST), "size": len(EMPTY),
                   "data": "e30="},
        "layers": [{"mediaType": FRAME_LAYER_TYPE, "digest": str(digest), "size": size}],
        "annotations": {**key.annotations(), ANNOTATION + "size": str(layer_size)},
    }
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def _entry(key: FrameKey, body: bytes) -> FrameEntry:
    """Parse and check an entry's manifest against ``key`` (EntryInvalid when it does not
    fit). Accepts the plain image-manifest form too (any config): only the one layer and the
    annotations count."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise EntryInvalid("manifest is not JSON") from e
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise EntryInvalid("not an OCI manifest (schemaVersion 2)")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise EntryInvalid("the manifest must have exactly one layer")
    layer = layers[0]
    if layer.get("mediaType") != FRAME_LAYER_TYPE:
        raise EntryInvalid(f"layer media type {str(layer.get('mediaType'))[:80]!r}")
    size = layer.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise EntryInvalid("layer size is not a positive integer")
    try:
        digest = Digest.parse(str(layer.get("digest")))
    except InvalidReference as e:
        raise EntryInvalid("layer digest is not a digest") from e
    if digest.algorithm != "sha256":
        raise EntryInvalid("layer digest is not sha256")
    notes = doc.get("annotations")
    if not isinstance(notes, dict):
        raise EntryInvalid("no annotations")
    for name, want in key.annotations().items():
        if notes.get(name) != want:
            raise EntryInvalid(f"annotation {name} is {str(notes.get(name))[:80]!r}, not {want!r}")
    layer_size = notes.get(ANNOTATION + "size")
    if not isinstance(layer_size, str) or not layer_size.isdigit() or len(layer_size) > 20:
        raise EntryInvalid("annotation size is not a number")
    return FrameEntry(key, digest, size, int(layer_size))


def _safe(key: FrameKey) -> str:
    with contextlib.suppress(ValueError):
        return key.tag
    return "?"
