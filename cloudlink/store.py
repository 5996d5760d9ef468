"""The durable buffer: one SQLite row per batch (WAL mode), a byte quota, a free-disk floor, recovery.

Durability (the fsync window)
-----------------------------
Every ``put`` is one transaction.  With ``fsync_window_s > 0`` the database runs
``synchronous = NORMAL``: a commit is appended to the WAL without an fsync, so it
survives a crash of the process at once and a power cut once the next
checkpoint has synced the WAL; the store checkpoints (and so fsyncs) at most
``fsync_window_s`` after a commit.  With ``fsync_window_s = 0`` every commit
fsyncs (``synchronous = FULL``).  Rows are deleted only after the broker's
PUBACK; deletes are batched, and a delete lost in a crash only means the batch
is sent again (the cloud de-duplicates by boot, stream and sequence number).

Pressure
--------
Before a put would take the stored payload bytes over ``quota_bytes`` or the
disk's free space under ``min_free_bytes``, the oldest telemetry is first
*thinned* (replaced by min/max/mean per window, same stream and sequence
number), then the oldest telemetry is *dropped*; events, trips, flight and EIS
records are kept as long as any telemetry is left, and beyond the quota until
the free-disk floor.  Every loss is counted by reason and written as a gap
record (stream ``gaps``) that goes to the cloud like any other batch.

Recovery
--------
On open the file is checked (``PRAGMA quick_check``, schema version).  A
damaged file is moved aside (``<name>.corrupt``), every row that can still be
read and whose content hash verifies is copied into a fresh database (when the
file is not even recognisable as SQLite, envelopes are carved out of its raw
bytes, again verified by hash), and what is missing is reported: in
:attr:`Store.recovery` and as gap records.  If no file can be written at all,
the store runs in memory and says so.

Recovery survives a crash of its own: the fresh database is built as
``<name>.recovering``, synced, marked complete by ``<name>.corrupt.done`` and
only then renamed to ``<name>``.  A damaged copy without that marker is an
unfinished recovery and is salvaged again on the next open; a damaged copy is
deleted only when it is complete (marker present) and a newer damage takes its
place.  Seqs that left the store for good (acknowledged and deleted, or
reported in a gap record) are remembered as ranges per (boot, stream), so a
recovery reports as lost only seqs that were still stored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from cloudlink.batch import (
    ENVELOPE_SIGNATURE,
    KIND_GAP,
    KIND_TELEMETRY,
    KIND_THINNED,
    PRIO_KEEP,
    PRIO_TELEMETRY,
    BatchError,
    Chain,
    Sealed,
    Sealer,
    compress,
    decode,
    read_envelope,
    thin,
    thinned_body,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PAGE_SIZE = 8192  # most telemetry batches fit in one page (fewer overflow pages, carvable after damage)
GAP_STREAM = "gaps"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    prio INTEGER NOT NULL,
    kind TEXT NOT NULL,
    boot TEXT NOT NULL,
    seq INTEGER NOT NULL,
    t0 INTEGER NOT NULL,
    t1 INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    created REAL NOT NULL,
    thin INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_prio ON batches (prio, id);
CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, expires REAL NOT NULL, ack BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS losses (
    reason TEXT NOT NULL, stream TEXT NOT NULL, batches INTEGER NOT NULL, samples INTEGER NOT NULL,
    bytes INTEGER NOT NULL, PRIMARY KEY (reason, stream));
CREATE TABLE IF NOT EXISTS settled (
    boot TEXT NOT NULL, stream TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (boot, stream, first));
"""

_COLS = "id, stream, prio, kind, boot, seq, t0, t1, samples, created, size, payload"


@dataclass(frozen=True)
class Row:
    """One stored batch."""

    id: int
    stream: str
    prio: int
    kind: str
    boot: str
    seq: int
    t0: int
    t1: int
    samples: int
    created: float
    size: int
    payload: bytes


@dataclass
class Recovery:
    """What opening the store found."""

    state: str = "new"  # new | ok | recovered | memory
    detail: str = ""
    moved_to: str = ""
    salvaged_rows: int = 0
    corrupt_rows: int = 0  # rows found whose content did not verify
    lost_seqs: int = 0  # sequence numbers known to be lost (between salvaged ones)
    unknown_tail: bool = False  # rows after the damage may be missing without a trace
    damaged_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Gap:
    """Losses of one stream of one boot for one reason (becomes one gap record)."""

    reason: str
    stream: str
    boot: str
    seqs: list[int] = field(default_factory=list)
    samples: int = 0
    bytes: int = 0
    t0: int = 0
    t1: int = 0

    def add(self, seq: int | None, samples: int, size: int, t0: int, t1: int) -> None:
        if seq is not None:
            self.seqs.append(seq)
        self.samples += samples
        self.bytes += size
        self.t0 = t0 if not self.t0 else min(self.t0, t0)
        self.t1 = max(self.t1, t1)

    def record(self) -> dict[str, Any]:
        return {"reason": self.reason, "stream": self.stream, "boot": self.boot, "seqs": ranges(self.seqs),
                "batches": len(self.seqs), "samples": self.samples, "bytes": self.bytes, "t0": self.t0,
                "t1": self.t1, "time": time.time()}


def ranges(seqs: Iterable[int]) -> list[list[int]]:
    """Sorted integers as inclusive [first, last] ranges."""
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class Store:
    """The SQLite buffer.  Thread-safe: every method takes the store's lock (call them via a worker thread)."""

    def __init__(self, path: Path | None, sealer: Sealer, *, quota_bytes: int, min_free_bytes: int,
                 fsync_window_s: float, thin_window_ms: int, hints: Callable[[Sequence[str]], list[Chain | None]]
                 | None = None, free_bytes: Callable[[Path], int] = _free_bytes,
                 busy: Callable[[], Iterable[int]] | None = None) -> None:
        self.path = path
        self.sealer = sealer
        self.quota_bytes = quota_bytes
        self.min_free_bytes = min_free_bytes
        self.fsync_window_s = fsync_window_s
        self.thin_window_ms = thin_window_ms
        self.hints = hints or (lambda names: [None] * len(names))
        self.free_bytes = free_bytes
        self.busy = busy or (lambda: ())
        self.lock = threading.RLock()
        self.con: sqlite3.Connection | None = None
        self.recovery = Recovery()
        self.memory = False
        # cached figures for status() (read without the lock)
        self.rows_by_kind: dict[str, int] = {}
        self.bytes_by_kind: dict[str, int] = {}
        self.total_bytes = 0
        self.oldest_created: float | None = None
        self.loss_totals: dict[str, dict[str, int]] = {}
        self.commits_since_sync = 0
        self.last_sync = time.monotonic()
        self.last_error = ""
        self._pending: dict[tuple[str, str, str], Gap] = {}  # losses whose gap record the disk refused so far

    # -- opening and recovery ------------------------------------------------------------------

    def open(self) -> Recovery:
        """Open (creating, checking or recovering) the database; never raises for a damaged file."""
        with self.lock:
            salvaged: list[tuple[Row, bool]] = []
            settled: list[tuple[str, str, int, int]] = []
            rec = Recovery()
            if self.path is None:
                self._open_memory("no state directory")
                rec.state, rec.detail = "memory", "no state directory: batches are kept in memory only"
                self.recovery = rec
                return rec
            moved = self.path.with_name(self.path.name + ".corrupt")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                marker = self._done_marker(moved)
                completed = marker.exists() and self._recovering_path().exists() and not self.path.exists()
                problem = self._unfinished_recovery(moved)
                if problem is None:
                    problem = self._check_existing()
                    if problem is not None:
                        self._move_aside(moved)
                if problem is None:
                    rec.state = "ok" if self.path.exists() and self.path.stat().st_size > 0 else "new"
                    if completed:  # the recovery was complete but not yet in place when the process died
                        rec.state, rec.moved_to = "recovered", str(moved)
                        rec.detail = marker.read_text(encoding="utf-8").strip() + " (completed on restart)"
                    self._connect(self.path)
                    self._prune_settled()
                else:
                    rec.state, rec.detail = "recovered", problem
                    rec.moved_to = str(moved)
                    rec.damaged_bytes = sum(p.stat().st_size for p in _family(moved) if p.exists())
                    salvaged, settled, rec = self._salvage(moved, rec)
                    self._rebuild(salvaged, settled, rec)
                    salvaged = []  # restored (into the file)
            except (OSError, sqlite3.Error) as exc:
                log.error("cloud store %s unusable (%s); keeping batches in memory", self.path, exc)
                if self.con is not None:
                    with contextlib.suppress(sqlite3.Error):
                        self.con.close()
                    self.con = None
                self._open_memory(str(exc))
                rec.state, rec.detail = "memory", f"cannot use {self.path}: {exc}; batches are kept in memory only"
                if salvaged:  # what was read from the damaged copy is kept in memory (the copy stays on disk)
                    self._load_figures()
                    self._restore(salvaged, settled, rec)
            self._load_figures()
            self.recovery = rec
            return rec

    def _recovering_path(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".recovering")

    @staticmethod
    def _done_marker(moved: Path) -> Path:
        return moved.with_name(moved.name + ".done")

    def _unfinished_recovery(self, moved: Path) -> str | None:
        """Finish or undo what a crash interrupted in an earlier recovery; a reason to resume it, or None.

        A complete rebuild (marker present) that was not yet renamed is renamed now; an incomplete
        one is deleted.  A damaged copy without its marker while the store file is absent was not
        fully salvaged yet: it is salvaged again (the rows are only in that copy).
        """
        assert self.path is not None
        tmp, marker = self._recovering_path(), self._done_marker(moved)
        if marker.exists() and tmp.exists() and not self.path.exists():
            _rename_family(tmp, self.path)
        for p in _family(tmp):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if moved.exists() and not marker.exists() and not self.path.exists():
            # a move aside cut short leaves the WAL (moved after the main file) behind: it belongs to the copy
            for src, dst in zip(_family(self.path)[1:], _family(moved)[1:], strict=True):
                if src.exists() and not dst.exists():
                    os.replace(src, dst)
            _fsync_dir(self.path.parent)
            return f"resumed the recovery of {moved.name}, interrupted before it was complete"
        return None
    def _check_existing(self) -> str | None:
        """None when the file is absent or sound, else what is wrong with it."""
        assert self.path is not None
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        try:
            con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            return f"cannot open: {exc}"
        try:
            res = [r[0] for r in con.execute("PRAGMA quick_check(20)").fetchall()]
            if res != ["ok"]:
                return "integrity check failed: " + "; ".join(str(r) for r in res[:5])
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"meta", "batches", "commands", "losses"} <= tables:
                return f"not a cloud store (tables: {', '.join(sorted(tables)) or 'none'})"
            row = con.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None or row[0] != SCHEMA_VERSION:
                return f"schema version {row[0] if row else 'missing'} (this gateway writes {SCHEMA_VERSION})"
            return None
        except sqlite3.Error as exc:
            return f"damaged: {exc}"
        finally:
            con.close()

    def _move_aside(self, moved: Path) -> None:
        """The damaged file (and its WAL) becomes the damaged copy; an older complete copy is dropped first.

        The older copy goes before its marker, and the marker before the move: at no moment is the
        new damaged copy paired with a marker that says it was salvaged.
        """
        assert self.path is not None
        for old in _family(moved):  # keep only the latest damaged copy
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._done_marker(moved).unlink()
        _fsync_dir(self.path.parent)
        _rename_family(self.path, moved)

    def _rebuild(self, salvaged: list[tuple[Row, bool]], settled: list[tuple[str, str, int, int]],
                 rec: Recovery) -> None:
        """Build the fresh database beside the store, sync it, mark the recovery complete, then rename it."""
        assert self.path is not None
        tmp = self._recovering_path()
        self._connect(tmp)
        self._load_figures()
        self._restore(salvaged, settled, rec)
        assert self.con is not None
        self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self.con.close()
        self.con = None
        _fsync_file(tmp)
        marker = self._done_marker(Path(rec.moved_to))
        with open(marker, "w", encoding="utf-8") as f:
            f.write(f"{rec.detail}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.path.parent)
        _rename_family(tmp, self.path)
        self._connect(self.path)

    def _connect(self, path: Path | str) -> None:
        con = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        con.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        con.execute("PRAGMA auto_vacuum = INCREMENTAL")
        if str(path) != ":memory:":
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"WAL mode refused (journal_mode = {mode})")
        con.execute(f"PRAGMA synchronous = {'NORMAL' if self.fsync_window_s > 0 else 'FULL'}")
        con.execute("PRAGMA journal_size_limit = 16777216")
        con.executescript(_SCHEMA)
        con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('session', ?)", (int(time.time()),))
        self.con = con

    def _open_memory(self, reason: str) -> None:
        self.memory = True
        self.last_error = reason
        self._connect(":memory:")

    def _salvage(self, moved: Path, rec: Recovery) -> tuple[list[tuple[Row, bool]], list[tuple[str, str, int, int]],
                                                            Recovery]:
        """Rows that can still be read from a damaged file, each with whether its hash verified, and the
        settled seq ranges (empty when that table cannot be read: every gap is then reported)."""
        found: list[tuple[Row, bool]] = []
        settled: list[tuple[str, str, int, int]] = []
        readable = True
        try:
            con = sqlite3.connect(moved, isolation_level=None, check_same_thread=False)
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error:
            readable = False
        if readable:
            pos, step, hi = 0, 1, self._max_id(con)
            while True:
                try:
                    rows = con.execute(f"SELECT {_COLS} FROM batches WHERE id >= ? ORDER BY id LIMIT 64",
                                       (pos,)).fetchall()
                except sqlite3.Error:
                    rows = None
                    try:  # one at a time past the damage
                        rows = con.execute(f"SELECT {_COLS} FROM batches WHERE id >= ? ORDER BY id LIMIT 1",
                                           (pos,)).fetchall()
                    except sqlite3.Error:
                        rec.unknown_tail = True
                        pos += step
                        step *= 2
                        if pos > max(hi, 1) * 2 + 1_000_000:
                            break
                        continue
                if not rows:
                    break
                step = 1
                for r in rows:
                    try:
                        row = Row(*r)
                        ok = isinstance(row.payload, bytes) and _verifies(row.payload)
                    except (TypeError, ValueError):
                        continue
                    found.append((row, ok))
                pos = int(rows[-1][0]) + 1
            try:
                settled = [(str(b), str(st), int(f), int(la)) for b, st, f, la in
                           con.execute("SELECT boot, stream, first, last FROM settled").fetchall()]
            except (sqlite3.Error, TypeError, ValueError):
                settled = []
            with contextlib.suppress(sqlite3.Error):
                con.close()
        if not readable or not found:
            carved = _carve(moved)
            if carved:
                rec.unknown_tail = True
                found = carved
        return found, settled, rec

    @staticmethod
    def _max_id(con: sqlite3.Connection) -> int:
        try:
            r = con.execute("SELECT seq FROM sqlite_sequence WHERE name='batches'").fetchone()
            return int(r[0]) if r else 0
        except sqlite3.Error:
            return 0

    def _restore(self, salvaged: list[tuple[Row, bool]], settled: Sequence[tuple[str, str, int, int]],
                 rec: Recovery) -> None:
        """Copy verified rows into the fresh database; report the rest as gap records.

        A seq missing between salvaged ones is lost only if it had not left the store before the
        damage (``settled``: acknowledged and deleted, or already reported in a gap record).
        """
        assert self.con is not None
        good = [r for r, ok in salvaged if ok]
        bad = [r for r, ok in salvaged if not ok]
        rec.salvaged_rows = len(good)
        rec.corrupt_rows = len(bad)
        gaps: dict[tuple[str, str], Gap] = {}
        kept: dict[tuple[str, str], set[int]] = {}
        for r in good:
            kept.setdefault((r.boot, r.stream), set()).add(r.seq)
        for r in bad:
            g = gaps.setdefault((r.boot, r.stream), Gap("corrupt", r.stream, r.boot))
            g.add(r.seq, r.samples, r.size, r.t0, r.t1)
        spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for boot, stream, first, last in settled:
            spans.setdefault((boot, stream), []).append((first, last))
        for (boot, stream), seqs in kept.items():
            missing = set(range(min(seqs), max(seqs) + 1)) - seqs
            known_bad = set(gaps[(boot, stream)].seqs) if (boot, stream) in gaps else set()
            gone = spans.get((boot, stream), [])
            for seq in sorted(missing - known_bad):
                if not any(f <= seq <= la for f, la in gone):
                    gaps.setdefault((boot, stream), Gap("corrupt", stream, boot)).add(seq, 0, 0, 0, 0)
        rec.lost_seqs = sum(len(g.seqs) for g in gaps.values())
        with self._transaction():
            carried: dict[tuple[str, str], list[int]] = {}
            for key, rs in spans.items():
                if key in kept:  # only boots with rows left need them (the rest is pruned anyway)
                    for first, last in rs:
                        self._settle(key, first, last)
            for g in gaps.values():
                carried.setdefault((g.boot, g.stream), []).extend(g.seqs)
            self._mark_settled(carried)
            for r in sorted(good, key=lambda r: r.id):
                self._insert_row(r.stream, r.prio, r.kind, r.boot, r.seq, r.t0, r.t1, r.samples, r.created,
                                 r.payload, thinned=r.kind == KIND_THINNED)
            records = [g.record() for g in gaps.values()]
            if rec.unknown_tail or rec.detail:
                records.append({"reason": "corrupt", "stream": "*", "boot": "*", "seqs": [], "batches": 0,
                                "samples": 0, "bytes": rec.damaged_bytes, "t0": 0, "t1": 0, "time": time.time(),
                                "note": f"store recovered after damage ({rec.detail}); {len(good)} batches kept, "
                                        f"{len(bad)} failed their hash"
                                        + ("; batches after the damage may be missing" if rec.unknown_tail else "")})
            for g in gaps.values():
                self._count_loss(g.reason, g.stream, len(g.seqs), g.samples, g.bytes)
            for sealed in self.sealer.records(GAP_STREAM, KIND_GAP, records, PRIO_KEEP):
                self._insert_sealed(sealed)
        self._load_figures()

    # -- transactions --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite transaction. On an error it rolls back, keeps the error for status(), and
        re-reads the cached figures before re-raising: the statements that ran before the error
        had already counted their rows in memory."""
        assert self.con is not None
        try:
            self.con.execute("BEGIN IMMEDIATE")
            yield
            self.con.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.con.execute("ROLLBACK")
            self.last_error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(sqlite3.Error):
                self._load_figures()
            raise
        self.commits_since_sync += 1

    def _load_figures(self) -> None:
        assert self.con is not None
        self.rows_by_kind, self.bytes_by_kind = {}, {}
        for kind, n, b in self.con.execute("SELECT kind, count(*), coalesce(sum(size), 0) FROM batches GROUP BY kind"):
            self.rows_by_kind[kind] = int(n)
            self.bytes_by_kind[kind] = int(b)
        self.total_bytes = sum(self.bytes_by_kind.values())
        self._update_oldest()
        self.loss_totals = {}
        for reason, _stream, nb, ns, by in self.con.execute("SELECT reason, stream, batches, samples, bytes FROM losses"):
            t = self.loss_totals.setdefault(reason, {"batches": 0, "samples": 0, "bytes": 0})
            t["batches"] += nb
            t["samples"] += ns
            t["bytes"] += by

    def _update_oldest(self) -> None:
        assert self.con is not None
        r = self.con.execute("SELECT created FROM batches ORDER BY id LIMIT 1").fetchone()
        self.oldest_created = float(r[0]) if r else None

    def _account(self, kind: str, rows: int, size: int) -> None:
        self.rows_by_kind[kind] = self.rows_by_kind.get(kind, 0) + rows
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + size
        self.total_bytes += size

    def _insert_row(self, stream: str, prio: int, kind: str, boot: str, seq: int, t0: int, t1: int, samples: int,
                    created: float, payload: bytes, thinned: bool = False) -> int:
        assert self.con is not None
        cur = self.con.execute(
            "INSERT INTO batches (stream, prio, kind, boot, seq, t0, t1, samples, created, thin, size, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (stream, prio, kind, boot, seq, t0, t1, samples, created, int(thinned), len(payload), payload))
        self._account(kind, 1, len(payload))
        if self.oldest_created is None:
            self.oldest_created = created
        rowid = cur.lastrowid
        assert rowid is not None
        return int(rowid)

    def _insert_sealed(self, s: Sealed) -> Row:
        created = time.time()
        rid = self._insert_row(s.stream, s.prio, s.kind, s.boot, s.seq, s.t0_ms, s.t1_ms, s.samples, created,
                               s.payload)
        return Row(rid, s.stream, s.prio, s.kind, s.boot, s.seq, s.t0_ms, s.t1_ms, s.samples, created,
                   len(s.payload), s.payload)

    def _count_loss(self, reason: str, stream: str, batches: int, samples: int, size: int) -> None:
        assert self.con is not None
        self.con.execute(
            "INSERT INTO losses (reason, stream, batches, samples, bytes) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (reason, stream) DO UPDATE SET batches = batches + excluded.batches, "
            "samples = samples + excluded.samples, bytes = bytes + excluded.bytes",
            (reason, stream, batches, samples, size))
        t = self.loss_totals.setdefault(reason, {"batches": 0, "samples": 0, "bytes": 0})
        t["batches"] += batches
        t["samples"] += samples
        t["bytes"] += size

    def _settle(self, key: tuple[str, str], first: int, last: int) -> None:
        """Add one range to the settled seqs of (boot, stream), merged with overlapping or adjacent ones."""
        assert self.con is not None
        boot, stream = key
        where = "boot = ? AND stream = ? AND first <= ? AND last >= ?"
        args = (boot, stream, last + 1, first - 1)
        for f, la in self.con.execute(f"SELECT first, last FROM settled WHERE {where}", args).fetchall():
            first, last = min(first, int(f)), max(last, int(la))
        self.con.execute(f"DELETE FROM settled WHERE {where}", args)
        self.con.execute("INSERT INTO settled (boot, stream, first, last) VALUES (?, ?, ?, ?)",
                         (boot, stream, first, last))

    def _mark_settled(self, seqs: dict[tuple[str, str], list[int]]) -> None:
        """Seqs that left the store for good (acknowledged, or reported lost) as compact ranges.

        The ranges of one (boot, stream) stay few: a hole between two of them is a batch still
        stored, so they are bounded by the stored rows; boots without rows are pruned on open.
        """
        for key, xs in seqs.items():
            for first, last in ranges(xs):
                self._settle(key, first, last)

    def _prune_settled(self) -> None:
        """Forget the settled seqs of boots with no row left (a recovery only looks between stored seqs)."""
        assert self.con is not None
        with contextlib.suppress(sqlite3.Error), self._transaction():
            self.con.execute("DELETE FROM settled WHERE boot NOT IN (SELECT DISTINCT boot FROM batches)")

    # -- the data path -------------------------------------------------------------------------

    def put(self, sealed: Sequence[Sealed]) -> list[Row]:
        """Store batches in one transaction (relieving pressure first); returns every row committed.

        The result may include gap records written by the relief, and lacks telemetry refused
        because only events and other kept records fill the store (counted as ``quota_full``).
        """
        with self.lock:
            assert self.con is not None
            with self._transaction():
                gaps = self._pending_copy()
                accepted = self._relieve(list(sealed), gaps)
                rows = [self._insert_sealed(s) for s in accepted]
                rows += self._write_gaps(gaps)
            self._pending.clear()  # written by this transaction
            if self.fsync_window_s <= 0:
                self.commits_since_sync = 0
            return rows

    def note_loss(self, reason: str, items: Sequence[Sealed] = (), stream: str = "", samples: int = 0,
                  t0: int = 0, t1: int = 0) -> list[Row]:
        """Count a loss that happened outside the store and write its gap record.

        When the disk refuses that too, the loss is kept as pending: it counts in :meth:`stats` and is
        written with the next transaction that succeeds (a put, a loss or a relief), never forgotten
        by a rollback.
        """
        gaps: dict[tuple[str, str, str], Gap] = {}
        for s in items:
            gaps.setdefault((reason, s.stream, s.boot), Gap(reason, s.stream, s.boot)).add(
                s.seq, s.samples, len(s.payload), s.t0_ms, s.t1_ms)
        if stream:
            gaps.setdefault((reason, stream, self.sealer.boot), Gap(reason, stream, self.sealer.boot)).add(
                None, samples, 0, t0, t1)
        with self.lock:
            try:
                with self._transaction():
                    rows = self._write_gaps(_merged(self._pending_copy(), gaps.values()))
            except sqlite3.Error:
                self._pending = _merged(self._pending, gaps.values())
                return []
            self._pending.clear()
            return rows

    def _pending_copy(self) -> dict[tuple[str, str, str], Gap]:
        """The pending losses as a new dict of copies (a rollback must leave the pending ones unchanged)."""
        return _merged({}, self._pending.values())

    def _write_gaps(self, gaps: dict[tuple[str, str, str], Gap]) -> list[Row]:
        if not gaps:
            return []
        for g in gaps.values():
            self._count_loss(g.reason, g.stream, len(g.seqs), g.samples, g.bytes)
        # thinned batches are still stored; every other reason lists seqs that are gone for good
        settled: dict[tuple[str, str], list[int]] = {}
        for g in gaps.values():
            if g.reason != "thinned" and g.seqs:
                settled.setdefault((g.boot, g.stream), []).extend(g.seqs)
        self._mark_settled(settled)
        return [self._insert_sealed(s)
                for s in self.sealer.records(GAP_STREAM, KIND_GAP, [g.record() for g in gaps.values()], PRIO_KEEP)]

    def _free_effective(self) -> int:
        assert self.con is not None
        if self.memory or self.path is None:
            return 1 << 62
        free_pages = int(self.con.execute("PRAGMA freelist_count").fetchone()[0])
        return self.free_bytes(self.path.parent) + free_pages * PAGE_SIZE

    def _over(self, extra: int) -> str:
        if self.total_bytes + extra > self.quota_bytes:
            return "quota"
        if self._free_effective() - extra < self.min_free_bytes:
            return "disk"
        return ""

    def _relieve(self, items: list[Sealed], gaps: dict[tuple[str, str, str], Gap]) -> list[Sealed]:
        """Make room for ``items``: thin, then drop the oldest telemetry, then refuse telemetry (never kept records)."""
        assert self.con is not None
        need = sum(len(s.payload) + 64 for s in items)
        busy = set(self.busy())
        while (why := self._over(need + _gap_reserve(gaps))):
            rows = self._oldest(PRIO_TELEMETRY, True, 16, busy)
            if rows:
                for r in rows:  # thin the oldest, one at a time, until there is room
                    self._thin_row(r, gaps)
                    if not self._over(need + _gap_reserve(gaps)):
                        break
                continue
            rows = self._oldest(PRIO_TELEMETRY, False, 16, busy)
            if rows:
                self._drop(self._enough(rows, need + _gap_reserve(gaps) + 512), "dropped", gaps)
                continue
            tele = [s for s in items if s.prio == PRIO_TELEMETRY]
            if tele:
                for s in tele:
                    gaps.setdefault(("quota_full", s.stream, s.boot), Gap("quota_full", s.stream, s.boot)).add(
                        s.seq, s.samples, len(s.payload), s.t0_ms, s.t1_ms)
                items = [s for s in items if s.prio != PRIO_TELEMETRY]
                need = sum(len(s.payload) + 64 for s in items)
                continue
            if why == "disk":
                # telemetry being published goes before any kept record (its PUBACK then deletes nothing)
                rows = self._oldest(PRIO_TELEMETRY, False, 16, set())
                if rows:
                    self._drop(self._enough(rows, need + _gap_reserve(gaps) + 512), "dropped", gaps)
                    continue
                # the last resort, and only at the free-disk floor: the oldest kept records
                rows = [r for r in self._oldest(PRIO_KEEP, False, 16, busy) if r.stream != GAP_STREAM]
                if rows:
                    self._drop(self._enough(rows, need + _gap_reserve(gaps) + 512), "dropped_kept", gaps)
                    continue
            break  # kept records beyond the quota are accepted (they are never dropped for telemetry's sake)
        if gaps:
            with contextlib.suppress(sqlite3.Error):
                self.con.execute("PRAGMA incremental_vacuum")
        return items

    def _enough(self, rows: Sequence[Row], need: int) -> list[Row]:
        """The oldest of ``rows`` whose removal makes room for ``need`` bytes (at least one)."""
        quota_short = self.total_bytes + need - self.quota_bytes
        disk_short = self.min_free_bytes - (self._free_effective() - need)
        short = max(quota_short, disk_short)
        out, freed = [], 0
        for r in rows:
            out.append(r)
            freed += r.size
            if freed >= short:
                break
        return out

    def _oldest(self, prio: int, thinnable: bool, limit: int, exclude: set[int]) -> list[Row]:
        """The oldest rows of a priority, skipping rows that are being published."""
        assert self.con is not None
        extra = f" AND thin = 0 AND kind = '{KIND_TELEMETRY}'" if thinnable else ""
        rows = [Row(*r) for r in self.con.execute(
            f"SELECT {_COLS} FROM batches WHERE prio = ?{extra} ORDER BY id LIMIT ?", (prio, limit + len(exclude)))]
        return [r for r in rows if r.id not in exclude][:limit]

    def _drop(self, rows: Sequence[Row], reason: str, gaps: dict[tuple[str, str, str], Gap]) -> None:
        assert self.con is not None
        for r in rows:
            self.con.execute("DELETE FROM batches WHERE id = ?", (r.id,))
            self._account(r.kind, -1, -r.size)
            gaps.setdefault((reason, r.stream, r.boot), Gap(reason, r.stream, r.boot)).add(
                r.seq, r.samples, r.size, r.t0, r.t1)
        self._update_oldest()

    def _thin_row(self, r: Row, gaps: dict[tuple[str, str, str], Gap]) -> None:
        assert self.con is not None
        try:
            b = decode(r.payload)
            if b.telemetry is None:
                raise BatchError("not telemetry")
            th = thin(b.telemetry, self.thin_window_ms)
            comp = compress(thinned_body(th, self.hints(th.signals)))
            new = self.sealer.reseal(r.payload, KIND_THINNED, comp, th.orig_samples,
                                     {"thin": {"window_ms": self.thin_window_ms, "orig_samples": th.orig_samples}})
        except BatchError:
            self._drop([r], "corrupt", gaps)
            return
        if len(new) >= r.size:  # nothing to gain: mark it so it is not tried again
            self.con.execute("UPDATE batches SET thin = 1 WHERE id = ?", (r.id,))
            return
        self.con.execute("UPDATE batches SET thin = 1, kind = ?, size = ?, payload = ? WHERE id = ?",
                         (KIND_THINNED, len(new), new, r.id))
        self._account(r.kind, -1, -r.size)
        self._account(KIND_THINNED, 1, len(new))
        gaps.setdefault(("thinned", r.stream, r.boot), Gap("thinned", r.stream, r.boot)).add(
            r.seq, r.samples, r.size - len(new), r.t0, r.t1)

    def relieve(self) -> list[Row]:
        """Check the quota and free-disk floor without a put (the disk may fill from elsewhere)."""
        with self.lock:
            assert self.con is not None
            if not self._pending and not self._over(0):
                return []
            try:
                with self._transaction():
                    gaps = self._pending_copy()  # losses the disk refused earlier, written now if it can
                    self._relieve([], gaps)
                    rows = self._write_gaps(gaps)
            except sqlite3.Error:
                return []
            self._pending.clear()
            return rows

    def fetch(self, prio: int, after_id: int, limit: int = 64, max_bytes: int = 4 << 20) -> list[Row]:
        """Oldest rows of one priority with id > after_id (the backfill lane's page).

        A row whose content no longer verifies is removed and reported (reason ``corrupt``).
        """
        with self.lock:
            assert self.con is not None
            out: list[Row] = []
            size = 0
            bad: list[Row] = []
            for r in self.con.execute(f"SELECT {_COLS} FROM batches WHERE prio = ? AND id > ? ORDER BY id LIMIT ?",
                                      (prio, after_id, limit)):
                row = Row(*r)
                if not _verifies(row.payload):
                    bad.append(row)
                    continue
                out.append(row)
                size += row.size
                if size >= max_bytes:
                    break
            if bad:
                with contextlib.suppress(sqlite3.Error), self._transaction():
                    gaps: dict[tuple[str, str, str], Gap] = {}
                    self._drop(bad, "corrupt", gaps)
                    self._write_gaps(gaps)
            return out

    def delete(self, ids: Sequence[int]) -> None:
        """Remove acknowledged rows (one transaction)."""
        if not ids:
            return
        with self.lock:
            assert self.con is not None
            with self._transaction():
                for chunk in _chunks(list(ids), 500):
                    q = ",".join("?" * len(chunk))
                    settled: dict[tuple[str, str], list[int]] = {}
                    for kind, boot, stream, seq, size in self.con.execute(
                            f"SELECT kind, boot, stream, seq, size FROM batches WHERE id IN ({q})", chunk).fetchall():
                        self._account(kind, -1, -int(size))
                        settled.setdefault((boot, stream), []).append(int(seq))
                    self._mark_settled(settled)  # delivered: a later recovery must not call them lost
                    self.con.execute(f"DELETE FROM batches WHERE id IN ({q})", chunk)
            self._update_oldest()

    def discard(self, ids: Sequence[int], reason: str) -> list[Row]:
        """Remove rows that can never be delivered and report them lost; returns the gap record rows."""
        with self.lock:
            assert self.con is not None
            with self._transaction():
                q = ",".join("?" * len(ids))
                rows = [Row(*r) for r in self.con.execute(f"SELECT {_COLS} FROM batches WHERE id IN ({q})", list(ids))]
                gaps = self._pending_copy()
                self._drop(rows, reason, gaps)
                out = self._write_gaps(gaps)
            self._pending.clear()
            return out

    def sync(self, force: bool = False) -> bool:
        """Checkpoint the WAL (an fsync) when commits are pending and the window has passed."""
        with self.lock:
            if self.con is None or self.memory:
                return False
            if not self.commits_since_sync:
                return False
            if not force and time.monotonic() - self.last_sync < self.fsync_window_s:
                return False
            try:
                self.con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.con.execute("PRAGMA incremental_vacuum(256)").fetchall()
            except sqlite3.Error as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                return False
            self.commits_since_sync = 0
            self.last_sync = time.monotonic()
            return True

    def count(self) -> int:
        with self.lock:
            assert self.con is not None
            return int(self.con.execute("SELECT count(*) FROM batches").fetchone()[0])

    def all_rows(self) -> list[Row]:
        with self.lock:
            assert self.con is not None
            return [Row(*r) for r in self.con.execute(f"SELECT {_COLS} FROM batches ORDER BY id")]

    # -- meta and the command log --------------------------------------------------------------

    def next_session(self) -> int:
        """The session counter for the next connection (persisted)."""
        with self.lock:
            assert self.con is not None
            row = self.con.execute("SELECT value FROM meta WHERE key='session'").fetchone()
            n = int(row[0]) + 1 if row else int(time.time())
            try:
                self.con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('session', ?)", (n,))
                self.commits_since_sync += 1
            except sqlite3.Error as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            return n

    def command_ack(self, cmd_id: str) -> bytes | None:
        with self.lock:
            assert self.con is not None
            r = self.con.execute("SELECT ack FROM commands WHERE id = ?", (cmd_id,)).fetchone()
            return bytes(r[0]) if r else None

    def remember_command(self, cmd_id: str, expires: float, ack: bytes) -> None:
        with self.lock:
            assert self.con is not None
            self.con.execute("INSERT OR REPLACE INTO commands (id, expires, ack) VALUES (?, ?, ?)",
                             (cmd_id, expires, ack))
            self.commits_since_sync += 1

    def forget_commands(self, before: float) -> int:
        with self.lock:
            assert self.con is not None
            n = self.con.execute("DELETE FROM commands WHERE expires < ?", (before,)).rowcount
            return int(n)

    def stats(self) -> dict[str, Any]:
        """Cached figures (no database access)."""
        losses = {k: dict(v) for k, v in dict(self.loss_totals).items()}  # C-level copies: safe while a worker adds
        for g in list(self._pending.values()):  # refused by the disk so far, counted all the same
            t = losses.setdefault(g.reason, {"batches": 0, "samples": 0, "bytes": 0})
            t["batches"] += len(g.seqs)
            t["samples"] += g.samples
            t["bytes"] += g.bytes
        return {"rows": dict(self.rows_by_kind), "bytes": dict(self.bytes_by_kind), "total_bytes": self.total_bytes,
                "quota_bytes": self.quota_bytes, "oldest_created": self.oldest_created,
                "losses": losses, "memory_only": self.memory,
                "path": str(self.path) if self.path else None, "last_error": self.last_error,
                "recovery": self.recovery.as_dict()}

    def close(self) -> None:
        with self.lock:
            if self.con is not None:
                if self._pending:  # a last try: stored, they go to the cloud after the next start
                    with contextlib.suppress(sqlite3.Error):
                        with self._transaction():
                            self._write_gaps(self._pending_copy())
                        self._pending.clear()
                with contextlib.suppress(sqlite3.Error):
                    if not self.memory:
                        self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    self.con.close()
                self.con = None


def _gap_reserve(gaps: dict[tuple[str, str, str], Gap]) -> int:
    """Room for the gap records a relief will write (their uncompressed size bounds the payload)."""
    if not gaps:
        return 0
    return 400 + sum(len(msgpack.packb(g.record(), use_bin_type=True)) for g in gaps.values())


def _family(p: Path) -> list[Path]:
    return [p, p.with_name(p.name + "-wal"), p.with_name(p.name + "-shm")]


def _merged(into: dict[tuple[str, str, str], Gap], gaps: Iterable[Gap]) -> dict[tuple[str, str, str], Gap]:
    """``into`` with copies of ``gaps`` added (same reason, stream and boot: one gap)."""
    for g in gaps:
        key = (g.reason, g.stream, g.boot)
        if key not in into:
            into[key] = Gap(g.reason, g.stream, g.boot)
        t = into[key]
        t.seqs.extend(g.seqs)
        t.samples += g.samples
        t.bytes += g.bytes
        t.t0 = g.t0 if not t.t0 else min(t.t0, g.t0) if g.t0 else t.t0
        t.t1 = max(t.t1, g.t1)
    return into


def _rename_family(src: Path, dst: Path) -> None:
    """Rename a database with its WAL and shared-memory files (the main file first), then sync the directory."""
    for a, b in zip(_family(src), _family(dst), strict=True):
        if a.exists():
            os.replace(a, b)
    _fsync_dir(dst.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames and unlinks in ``path`` durable (not every platform can sync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _chunks(xs: list[int], n: int) -> Iterable[list[int]]:
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def _verifies(payload: Any) -> bool:
    try:
        read_envelope(bytes(payload), verify=True)
        return True
    except BatchError:
        return False


def _carve(moved: Path) -> list[tuple[Row, bool]]:
    """Envelopes found anywhere in the raw bytes of a damaged file (and its WAL), verified by hash."""
    found: dict[tuple[str, str, int], Row] = {}
    fake_id = 0
    for part in _family(moved)[:2]:
        try:
            data = part.read_bytes()
        except OSError:
            continue
        pos = data.find(ENVELOPE_SIGNATURE)
        while pos >= 1:
            start = pos - 1
            try:
                unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(data))
                unpacker.feed(data[start:])
                env = unpacker.unpack()
                end = start + unpacker.tell()
                payload = data[start:end]
                env = read_envelope(payload, verify=True)
            except Exception:  # noqa: BLE001 - anything that does not decode is not an envelope
                pos = data.find(ENVELOPE_SIGNATURE, pos + 1)
                continue
            key = (str(env["boot"]), str(env["stream"]), int(env["seq"]))
            if key not in found:
                fake_id += 1
                kind = str(env["kind"])
                prio = PRIO_TELEMETRY if kind in (KIND_TELEMETRY, KIND_THINNED) else PRIO_KEEP
                found[key] = Row(fake_id, key[1], prio, kind, key[0], key[2], int(env.get("t0", 0)),
                                 int(env.get("t1", 0)), int(env.get("n", 0)), time.time(), len(payload), payload)
            pos = data.find(ENVELOPE_SIGNATURE, end)
    rows = sorted(found.values(), key=lambda r: (r.boot, r.stream, r.seq))
    return [(Row(i + 1, *tuple(vars(r).values())[1:]), True) for i, r in enumerate(rows)]
