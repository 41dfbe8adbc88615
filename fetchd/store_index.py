"""The layer store's metadata index: one sqlite file shared by threads and processes.

The files under ``blobs/`` are the truth about what the store holds; this index
only adds what files cannot say (sizes for quick accounting, last use for LRU,
media types, diff_ids, aliases, the tag cache, leases, delivered images).
``LayerStore.gc`` reconciles the ``blobs`` table with the directory.

Concurrency: WAL mode and a busy timeout; one connection per thread (sqlite
connections are not shared across threads here); every write is one short
transaction. Only ``layer_store`` uses this module.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    added REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_lru ON blobs(last_used);
CREATE TABLE IF NOT EXISTS blob_info (
    digest TEXT PRIMARY KEY,
    media_type TEXT,
    diff_id TEXT
);
CREATE INDEX IF NOT EXISTS blob_info_diff_id ON blob_info(diff_id);
CREATE TABLE IF NOT EXISTS aliases (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    digest TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS frame_spans (
    key TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    resolved_at REAL NOT NULL,
    PRIMARY KEY (name, tag)
);
CREATE TABLE IF NOT EXISTS images (
    reference TEXT NOT NULL,
    platform TEXT NOT NULL,
    level INTEGER NOT NULL,
    manifest_digest TEXT NOT NULL,
    archive_digest TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (reference, platform, level)
);
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT NOT NULL,
    holder TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL,
    digest TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_digest ON leases(digest);
CREATE INDEX IF NOT EXISTS leases_id ON leases(lease_id);
"""


@dataclass(frozen=True)
class BlobRow:
    digest: str
    size: int
    added: float
    last_used: float


@dataclass(frozen=True)
class ImageRow:
    reference: str
    platform: str
    level: int
    manifest_digest: str
    archive_digest: str
    created: float


def process_start(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot), '' when unknown.

    Together with the pid it names a process across pid reuse.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return ""
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


def process_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return not start or process_start(pid) in ("", start)


class StoreIndex:
    """Thread-safe access to ``index.sqlite``; raises ``sqlite3.Error`` (the store translates)."""

    def __init__(self, path: Path, busy_timeout: float = 30.0, readonly: bool = False) -> None:
        """``readonly`` opens an existing index on a read-only filesystem (writes then fail)."""
        self.path = path
        self.readonly = readonly
        self._busy_ms = int(busy_timeout * 1000)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        conn = self._conn()
        if readonly:
            conn.execute("SELECT COUNT(*) FROM blobs").fetchone()  # fail now if unusable
            return
        with self._tx(conn):
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)

    # -- connections -------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise sqlite3.ProgrammingError("the store index is closed")
            if self.readonly:
                # immutable: sqlite creates no -shm/-wal files (impossible on a read-only fs)
                conn = sqlite3.connect(f"file:{self.path}?immutable=1", uri=True,
                                       check_same_thread=False, isolation_level=None)
                self._local.conn = conn
                with self._all_lock:
                    self._all.append(conn)
                return conn
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_ms / 1000,
                isolation_level=None,  # explicit BEGIN; autocommit otherwise
                check_same_thread=False,  # only close() crosses threads
            )
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode loses at most the last transactions on power loss, never
            # consistency; the blobs directory stays the truth anyway.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _tx(self, conn: sqlite3.Connection, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE) on this thread's connection."""
        with self._tx(self._conn()) as conn:
            yield conn

    def close(self) -> None:
        self._closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    # -- blobs -------------------------------------------------------------------------

    def add_blob(
        self, digest: str, size: int, now: float, alias: tuple[str, str] | None = None,
        spans: Iterable[tuple[str, int, int]] = (),
    ) -> None:
        """Record a committed blob, the alias naming it and the frame spans inside it
        (``(key, offset, length)``), in one transaction."""
        with self.transaction() as c:
            c.execute(
                "INSERT INTO blobs(digest, size, added, last_used) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(digest) DO UPDATE SET size=excluded.size, last_used=excluded.last_used",
                (digest, size, now, now),
            )
            if alias is not None:
                c.execute(
                    "INSERT OR REPLACE INTO aliases(kind, key, digest, created) VALUES (?, ?, ?, ?)",
                    (alias[0], alias[1], digest, now),
                )
            c.executemany(
                "INSERT OR REPLACE INTO frame_spans(key, digest, offset, length, created) "
                "VALUES (?, ?, ?, ?, ?)",
                [(key, digest, offset, length, now) for key, offset, length in spans],
            )

    def remove_blob_row(self, conn: sqlite3.Connection, digest: str) -> None:
        conn.execute("DELETE FROM blobs WHERE digest = ?", (digest,))

    def blob_row(self, digest: str) -> BlobRow | None:
        row = self._conn().execute(
            "SELECT digest, size, added, last_used FROM blobs WHERE digest = ?", (digest,)
        ).fetchone()
        return BlobRow(*row) if row else None

    def all_blob_rows(self) -> dict[str, BlobRow]:
        rows = self._conn().execute("SELECT digest, size, added, last_used FROM blobs")
        return {r[0]: BlobRow(*r) for r in rows}

    def touch(self, uses: Iterable[tuple[str, float]]) -> None:
        items = [(t, d) for d, t in uses]
        if not items:
            return
        with self.transaction() as c:
            c.executemany(
                "UPDATE blobs SET last_used = max(last_used, ?) WHERE digest = ?", items
            )

    def usage(self) -> tuple[int, int]:
        size, count = self._conn().execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM blobs").fetchone()
        return int(size), int(count)

    def set_info(self, digest: str, media_type: str | None, diff_id: str | None) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO blob_info(digest, media_type, diff_id) VALUES (?, ?, ?) "
                "ON CONFLICT(digest) DO UPDATE SET "
                "media_type=COALESCE(excluded.media_type, media_type), "
                "diff_id=COALESCE(excluded.diff_id, diff_id)",
                (digest, media_type, diff_id),
            )

    def info(self, digest: str) -> tuple[str | None, str | None]:
        row = self._conn().execute(
            "SELECT media_type, diff_id FROM blob_info WHERE digest = ?", (digest,)
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def digests_by_diff_id(self, diff_id: str) -> list[str]:
        rows = self._conn().execute("SELECT digest FROM blob_info WHERE diff_id = ?", (diff_id,))
        return [r[0] for r in rows]

    # -- aliases, tags, images ---------------------------------------------------------

    def put_alias(self, kind: str, key: str, digest: str, now: float) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO aliases(kind, key, digest, created) VALUES (?, ?, ?, ?)",
                (kind, key, digest, now),
            )

    def get_alias(self, kind: str, key: str) -> str | None:
        row = self._conn().execute(
            "SELECT digest FROM aliases WHERE kind = ? AND key = ?", (kind, key)
        ).fetchone()
        return str(row[0]) if row else None

    def get_frame_span(self, key: str) -> tuple[str, int, int] | None:
        """``(digest, offset, length)`` of the frame ``key`` inside a blob (an archive)."""
        try:
            row = self._conn().execute(
                "SELECT digest, offset, length FROM frame_spans WHERE key = ?", (key,)
            ).fetchone()
        except sqlite3.OperationalError:  # a read-only index made before frame spans existed
            return None
        return (str(row[0]), int(row[1]), int(row[2])) if row else None

    def put_tag(self, name: str, tag: str, digest: str, media_type: str, now: float) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO tags(name, tag, digest, media_type, resolved_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, tag, digest, media_type, now),
            )

    def get_tag(self, name: str, tag: str) -> tuple[str, str, float] | None:
        row = self._conn().execute(
            "SELECT digest, media_type, resolved_at FROM tags WHERE name = ? AND tag = ?", (name, tag)
        ).fetchone()
        return (str(row[0]), str(row[1]), float(row[2])) if row else None

    def put_image(self, row: ImageRow) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO images(reference, platform, level, manifest_digest, "
                "archive_digest, created) VALUES (?, ?, ?, ?, ?, ?)",
                (row.reference, row.platform, row.level, row.manifest_digest,
                 row.archive_digest, row.created),
            )

    def images(self) -> list[ImageRow]:
        rows = self._conn().execute(
            "SELECT reference, platform, level, manifest_digest, archive_digest, created "
            "FROM images ORDER BY reference, platform, level"
        )
        return [ImageRow(*r) for r in rows]

    def drop_dangling(self, tag_cutoff: float) -> tuple[int, int, int]:
        """Drop tags resolved before ``tag_cutoff`` and aliases, frame spans and images whose
        blob is gone."""
        with self.transaction() as c:
            tags = c.execute("DELETE FROM tags WHERE resolved_at < ?", (tag_cutoff,)).rowcount
            aliases = c.execute(
                "DELETE FROM aliases WHERE digest NOT IN (SELECT digest FROM blobs)"
            ).rowcount
            aliases += c.execute(
                "DELETE FROM frame_spans WHERE digest NOT IN (SELECT digest FROM blobs)"
            ).rowcount
            images = c.execute(
                "DELETE FROM images WHERE archive_digest NOT IN (SELECT digest FROM blobs)"
            ).rowcount
            c.execute(
                "DELETE FROM blob_info WHERE digest NOT IN (SELECT digest FROM blobs) "
                "AND diff_id IS NULL"
            )
        return tags, aliases, images

    # -- leases ------------------------------------------------------------------------

    def add_lease(self, lease_id: str, holder: str, digests: Iterable[str], now: float) -> None:
        pid = os.getpid()
        start = process_start(pid)
        with self.transaction() as c:
            c.executemany(
                "INSERT INTO leases(lease_id, holder, pid, pid_start, digest, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(lease_id, holder, pid, start, d, now) for d in digests],
            )

    def drop_lease(self, lease_id: str) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM leases WHERE lease_id = ?", (lease_id,))

    def live_leased(self, conn: sqlite3.Connection | None = None) -> set[str]:
        """Digests under a lease whose holding process still runs; dead leases are dropped."""
        c = conn or self._conn()
        rows = c.execute("SELECT DISTINCT pid, pid_start FROM leases").fetchall()
        dead = [(pid, start) for pid, start in rows if not process_alive(pid, start)]
        if dead:
            if conn is None:
                with self.transaction() as t:
                    t.executemany("DELETE FROM leases WHERE pid = ? AND pid_start = ?", dead)
            else:
                c.executemany("DELETE FROM leases WHERE pid = ? AND pid_start = ?", dead)
        return {r[0] for r in c.execute("SELECT DISTINCT digest FROM leases")}

    def is_leased(self, conn: sqlite3.Connection, digest: str) -> bool:
        rows = conn.execute(
            "SELECT pid, pid_start FROM leases WHERE digest = ?", (digest,)
        ).fetchall()
        return any(process_alive(pid, start) for pid, start in rows)


def now() -> float:
    return time.time()
