"""The layer store's metadata index: one sqlite file shared by threads and processes.

The files under ``blobs/`` are the truth about what the store holds; this index
only adds what files cannot say (sizes for quick accounting, last use for LRU,
media types, diff_ids, aliases, the tag cache, leases, delivered images).
``LayerStore.gc`` reconciles the ``blobs`` table with the directory.

Concurrency: WAL mode and a busy timeout; one connection per thread (sqlite
connections are not shared across threads here), closed once its thread has ended (so the
open connections are bounded by the live threads, not by the threads ever started); every
write is one short transaction. ``usage`` reads totals kept by triggers, never a sum. Only ``layer_store`` uses this module.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
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
CREATE INDEX IF NOT EXISTS images_archive ON images(archive_digest);
"""

# The blobs table's totals, kept by triggers in the same transaction as every change of it,
# so `usage` reads one row instead of summing the table (thousands of rows on a busy host).
# An index made before the table existed gets it filled from the blobs table once.
_TOTALS = """
CREATE TABLE IF NOT EXISTS blob_totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL,
    count INTEGER NOT NULL
);
INSERT OR IGNORE INTO blob_totals(id, bytes, count)
    SELECT 0, COALESCE(SUM(size), 0), COUNT(*) FROM blobs;
CREATE TRIGGER IF NOT EXISTS blobs_totals_insert AFTER INSERT ON blobs BEGIN
    UPDATE blob_totals SET bytes = bytes + new.size, count = count + 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS blobs_totals_delete AFTER DELETE ON blobs BEGIN
    UPDATE blob_totals SET bytes = bytes - old.size, count = count - 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS blobs_totals_update AFTER UPDATE OF size ON blobs BEGIN
    UPDATE blob_totals SET bytes = bytes + new.size - old.size WHERE id = 0;
END
"""


_CHUNK = 500  # keys per IN (...) query: well below sqlite's limit of bound parameters


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
        self._all: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._own_start: tuple[int, str] = (0, "")  # (pid, its start time) for leases
        conn = self._conn()
        if readonly:
            conn.execute("SELECT COUNT(*) FROM blobs").fetchone()  # fail now if unusable
            return
        with self._tx(conn):
            for stmt in _statements(_SCHEMA + ";" + _TOTALS):
                conn.execute(stmt)

    # -- connections -------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise sqlite3.ProgrammingError("the store index is closed")
            conn = self._connect()
            self._local.conn = conn
            with self._all_lock:
                self._reap_locked()
                self._all.append((threading.current_thread(), conn))
        return conn

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            # immutable: sqlite creates no -shm/-wal files (impossible on a read-only fs)
            return sqlite3.connect(f"file:{self.path}?immutable=1", uri=True,
                                   check_same_thread=False, isolation_level=None)
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_ms / 1000,
            isolation_level=None,  # explicit BEGIN; autocommit otherwise
            check_same_thread=False,  # only close() and the reaping cross threads
        )
        conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode loses at most the last transactions on power loss, never
        # consistency; the blobs directory stays the truth anyway.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _reap_locked(self) -> None:
        """Close the connections of threads that ended (a worker thread per compressed
        layer would otherwise leave one open each until the daemon stops): the open
        connections are at most one per live thread that used the index."""
        alive = []
        for thread, conn in self._all:
            if thread.is_alive():
                alive.append((thread, conn))
            else:
                try:
                    conn.close()  # its thread is gone: nothing else uses it
                except sqlite3.Error:
                    pass
        self._all = alive

    def open_connections(self) -> int:
        """How many sqlite connections this index holds open (after reaping ended threads)."""
        with self._all_lock:
            self._reap_locked()
            return len(self._all)

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
        for _, conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    # -- blobs -------------------------------------------------------------------------

    def add_blob(
        self, digest: str, size: int, now: float, alias: tuple[str, str] | None = None,
        spans: Iterable[tuple[str, int, int]] = (), media_type: str | None = None,
    ) -> None:
        """Record a committed blob, the alias naming it, the frame spans inside it
        (``(key, offset, length)``) and its media type, in one transaction."""
        with self.transaction() as c:
            if media_type:
                c.execute(
                    "INSERT INTO blob_info(digest, media_type) VALUES (?, ?) ON CONFLICT(digest) "
                    "DO UPDATE SET media_type=COALESCE(excluded.media_type, media_type)",
                    (digest, media_type),
                )
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
        """(bytes, count) of the blobs table: one row kept by triggers, not a sum."""
        conn = self._conn()
        try:
            row = conn.execute("SELECT bytes, count FROM blob_totals WHERE id = 0").fetchone()
        except sqlite3.OperationalError:  # a read-only index made before the totals existed
            row = None
        if row is None:
            row = conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM blobs").fetchone()
        return int(row[0]), int(row[1])

    def set_info(self, digest: str, media_type: str | None, diff_id: str | None) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO blob_info(digest, media_type, diff_id) VALUES (?, ?, ?) "
                "ON CONFLICT(digest) DO UPDATE SET "
                "media_type=COALESCE(excluded.media_type, media_type), "
                "diff_id=COALESCE(excluded.diff_id, diff_id)",
                (digest, media_type, diff_id),
            )

    def set_infos(self, items: Iterable[tuple[str, str | None, str | None]]) -> None:
        """``set_info`` for many ``(digest, media_type, diff_id)`` in one transaction."""
        rows = list(items)
        if not rows:
            return
        with self.transaction() as c:
            c.executemany(
                "INSERT INTO blob_info(digest, media_type, diff_id) VALUES (?, ?, ?) "
                "ON CONFLICT(digest) DO UPDATE SET "
                "media_type=COALESCE(excluded.media_type, media_type), "
                "diff_id=COALESCE(excluded.diff_id, diff_id)",
                rows,
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

    def frames(self, keys: Sequence[str]
               ) -> tuple[dict[str, str], dict[str, tuple[str, int, int]]]:
        """For many frame keys at once, in one read transaction: the ``("frame", key)``
        aliases (key -> digest) and the frame spans (key -> ``(digest, offset, length)``)."""
        own: dict[str, str] = {}
        spans: dict[str, tuple[str, int, int]] = {}
        conn = self._conn()
        with self._tx(conn, immediate=False):
            for i in range(0, len(keys), _CHUNK):
                part = list(keys[i:i + _CHUNK])
                marks = ",".join("?" * len(part))
                for key, digest in conn.execute(
                        f"SELECT key, digest FROM aliases WHERE kind = 'frame' AND key IN ({marks})",
                        part):
                    own[str(key)] = str(digest)
                try:
                    rows = conn.execute(
                        f"SELECT key, digest, offset, length FROM frame_spans WHERE key IN ({marks})",
                        part).fetchall()
                except sqlite3.OperationalError:  # a read-only index older than frame spans
                    rows = []
                for key, digest, offset, length in rows:
                    spans[str(key)] = (str(digest), int(offset), int(length))
        return own, spans

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

    def images_with_blobs(self) -> list[tuple[ImageRow, int | None, float | None]]:
        """Every image row with its archive's size and last use (None when the index has no
        such blob): one query, however many images."""
        rows = self._conn().execute(
            "SELECT i.reference, i.platform, i.level, i.manifest_digest, i.archive_digest, "
            "i.created, b.size, b.last_used FROM images AS i "
            "LEFT JOIN blobs AS b ON b.digest = i.archive_digest "
            "ORDER BY i.reference, i.platform, i.level"
        )
        return [(ImageRow(*r[:6]), r[6], r[7]) for r in rows]

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
        if self._own_start[0] != pid:  # once per process (a fork gets its own)
            self._own_start = (pid, process_start(pid))
        start = self._own_start[1]
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


def _statements(script: str) -> list[str]:
    """The complete SQL statements of ``script`` (a trigger's body holds ';' of its own)."""
    out, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                out.append(pending.strip())
            pending = ""
    return out


def now() -> float:
    return time.time()
