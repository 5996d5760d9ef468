"""The durable buffer: WAL, quota pressure (thin, drop, never events), free-disk floor, recovery."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cloudlink.batch import KIND_EVENTS, KIND_GAP, KIND_THINNED, PRIO_KEEP, Sealer, Telemetry, decode
from cloudlink.store import PAGE_SIZE, Store

T0 = 1_700_000_000_000


def tel(rows: int = 50, cols: int = 32, seed: int = 0, t0: int = T0) -> Telemetry:
    rng = np.random.default_rng(seed)
    values = np.round(3.7 + np.cumsum(rng.normal(0, 0.002, (rows, cols)), axis=0), 3)
    return Telemetry([f"cell[{i}].voltage" for i in range(cols)], t0 + np.arange(rows, dtype=np.int64) * 100, values,
                     np.zeros((rows, cols), np.int8), 10.0)


def make(path: Path | None, quota: int = 1 << 30, free: int | None = None, sealer: Sealer | None = None,
         boot: str = "b0") -> Store:
    kw = {"free_bytes": (lambda p: free)} if free is not None else {}
    s = Store(path, sealer or Sealer("gw", boot, 128 * 1024), quota_bytes=quota, min_free_bytes=1 << 20,
              fsync_window_s=0.5, thin_window_ms=5_000, **kw)  # type: ignore[arg-type]
    s.open()
    return s


def test_wal_rows_per_batch_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "cloud.db"
    s = make(path)
    assert s.con is not None
    assert s.con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.con.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL, synced by checkpoints
    assert s.con.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
    rows = s.put(s.sealer.telemetry("cells", tel()))
    rows += s.put(s.sealer.records("events", KIND_EVENTS, [{"kind": "trip", "time": 1.7e9}]))
    assert s.count() == 2 == len(rows)  # one row per batch, not per sample
    assert s.sync(force=True)
    first_session = s.next_session()
    s.close()
    s = make(path)
    assert s.recovery.state == "ok"
    assert [r.id for r in s.all_rows()] == [r.id for r in rows]
    assert s.next_session() == first_session + 1
    assert s.fetch(PRIO_KEEP, 0)[0].kind == KIND_EVENTS
    s.delete([r.id for r in rows])
    assert s.count() == 0 and s.total_bytes == 0 and s.oldest_created is None


def test_quota_thins_first_then_drops_oldest_and_never_events(tmp_path: Path) -> None:
    sealer = Sealer("gw", "b0", 128 * 1024)
    s = make(tmp_path / "cloud.db", quota=100_000, sealer=sealer)
    accepted: list = []
    n_events = 0
    for i in range(400):
        accepted += s.put(sealer.telemetry("cells", tel(seed=i, t0=T0 + i * 5000)))
        if i % 10 == 0:
            accepted += s.put(sealer.records("events", KIND_EVENTS, [{"kind": "trip", "n": i, "time": 1.7e9 + i}]))
            n_events += 1
        assert s.total_bytes <= 100_000
    rows = s.all_rows()
    kinds = [r.kind for r in rows]
    # every event is still there
    assert sum(1 for r in rows if r.kind == KIND_EVENTS) == n_events
    assert KIND_THINNED in kinds
    # thinning comes first: the thinned rows are older than the full ones still stored
    thinned_ids = [r.id for r in rows if r.kind == KIND_THINNED]
    full_ids = [r.id for r in rows if r.kind == "telemetry"]
    assert max(thinned_ids) < min(full_ids)
    # the gap records account for every telemetry batch no longer stored in full, by sequence number
    gaps = [rec for r in rows if r.kind == KIND_GAP for rec in decode(r.payload).records]
    dropped = {q for g in gaps if g["reason"] == "dropped" for a, b in g["seqs"] for q in range(a, b + 1)}
    thinned = {q for g in gaps if g["reason"] == "thinned" for a, b in g["seqs"] for q in range(a, b + 1)}
    stored_full = {r.seq for r in rows if r.stream == "cells" and r.kind == "telemetry"}
    stored_thin = {r.seq for r in rows if r.stream == "cells" and r.kind == KIND_THINNED}
    all_cells = {r.seq for r in accepted if r.stream == "cells"}
    assert dropped, "the quota must have forced drops as well"
    assert stored_thin <= thinned
    assert all_cells == stored_full | stored_thin | dropped
    assert not (stored_full | stored_thin) & dropped
    losses = s.stats()["losses"]
    assert losses["dropped"]["batches"] == len(dropped)
    assert losses["dropped"]["samples"] == 50 * 32 * len(dropped)
    # a thinned batch keeps its identity and summarises the window
    th = next(r for r in rows if r.kind == KIND_THINNED)
    b = decode(th.payload)
    assert b.thinned is not None and b.seq == th.seq and b.thinned.orig_samples == 50 * 32


def test_only_kept_records_left_refuses_telemetry_but_takes_events(tmp_path: Path) -> None:
    sealer = Sealer("gw", "b0", 128 * 1024)
    s = make(tmp_path / "cloud.db", quota=3 * 128 * 1024 // 2 * 16 // 16 * 1, sealer=sealer)
    s.quota_bytes = 20_000
    big = [{"kind": "limit", "blob": os.urandom(3000).hex(), "time": 1.7e9 + i} for i in range(10)]
    for rec in big:
        s.put(sealer.records("events", KIND_EVENTS, [rec]))
    assert s.total_bytes > 20_000  # kept records beyond the quota are accepted
    rows = s.put(sealer.telemetry("cells", tel()))
    assert all(r.stream == "gaps" for r in rows)
    gap = decode(rows[0].payload).records[0]
    assert gap["reason"] == "quota_full" and gap["seqs"] == [[0, 0]]
    assert sum(1 for r in s.all_rows() if r.kind == KIND_EVENTS) == 10
    assert s.stats()["losses"]["quota_full"]["samples"] == 50 * 32


def test_free_disk_floor_drops_telemetry_then_oldest_events_never_gaps(tmp_path: Path) -> None:
    sealer = Sealer("gw", "b0", 128 * 1024)
    free = {"bytes": 100 << 20}
    s = Store(tmp_path / "cloud.db", sealer, quota_bytes=1 << 30, min_free_bytes=1 << 20, fsync_window_s=0.5,
              thin_window_ms=5000, free_bytes=lambda p: free["bytes"])
    s.open()
    for i in range(20):
        s.put(sealer.telemetry("cells", tel(seed=i)))
        s.put(sealer.records("events", KIND_EVENTS, [{"kind": "trip", "n": i, "time": 1.7e9 + i}]))
    free["bytes"] = (1 << 20) - 1  # the disk is at the floor: only freed pages can be reused
    s.relieve()
    left = s.all_rows()
    assert not [r for r in left if r.stream == "cells" and r.kind == "telemetry"]
    losses = s.stats()["losses"]
    assert "dropped_kept" in losses or "dropped" in losses
    assert any(r.stream == "gaps" for r in left)  # gap records are never dropped
    if "dropped_kept" in losses:  # events go only after every telemetry batch
        assert losses["dropped"]["batches"] + losses.get("thinned", {}).get("batches", 0) >= 20


def _filled(path: Path, n: int = 60) -> tuple[Store, list]:
    sealer = Sealer("gw", "b0", 128 * 1024)
    s = make(path, sealer=sealer)
    rows = []
    for i in range(n):
        rows += s.put(sealer.telemetry("cells", tel(seed=i, cols=200, t0=T0 + i * 5000)))
    s.sync(force=True)
    s.close()
    return s, rows


@pytest.mark.parametrize("damage", ["truncate", "garbage_pages", "header"])
def test_damaged_database_is_recovered_what_is_whole_is_kept(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "cloud.db"
    _, rows = _filled(path)
    size = path.stat().st_size
    data = bytearray(path.read_bytes())
    if damage == "truncate":  # a torn file: the second half is gone
        path.write_bytes(data[: size // 2])
    elif damage == "garbage_pages":  # some pages in the middle overwritten
        rng = np.random.default_rng(1)
        for p in (size // PAGE_SIZE // 3, size // PAGE_SIZE // 2):
            data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
    else:  # the header and the schema page destroyed: SQLite does not recognise the file at all
        data[:PAGE_SIZE] = b"\x00" * PAGE_SIZE
        path.write_bytes(bytes(data))
    s = make(path)
    rec = s.recovery
    assert rec.state == "recovered", rec
    assert Path(rec.moved_to).exists()
    kept = [r for r in s.all_rows() if r.stream == "cells"]
    original = {r.seq: r.payload for r in rows}
    assert kept, "whole batches must survive the damage"
    if damage == "header":  # page 1 held only the schema: every batch is carved out whole
        assert len(kept) == len(rows)
    else:
        assert len(rows) - 40 <= len(kept) < len(rows) if damage == "garbage_pages" else len(kept) < len(rows)
    for r in kept:  # what is kept is exactly what was stored
        assert original[r.seq] == r.payload
        decode(r.payload)
    gaps = [g for r in s.all_rows() if r.kind == KIND_GAP for g in decode(r.payload).records]
    assert gaps and all(g["reason"] == "corrupt" for g in gaps)
    assert any("recovered" in g.get("note", "") for g in gaps)
    # the store works on
    s.put(s.sealer.telemetry("cells", tel()))
    assert s.count() == len(kept) + len([r for r in s.all_rows() if r.kind == KIND_GAP]) + 1
    s.close()
    assert make(path).recovery.state == "ok"


def test_a_corrupted_row_is_found_when_sent_and_reported(tmp_path: Path) -> None:
    s = make(tmp_path / "cloud.db")
    rows = s.put(s.sealer.telemetry("cells", tel()))
    rows += s.put(s.sealer.telemetry("cells", tel(seed=1)))
    assert s.con is not None
    blob = bytearray(rows[0].payload)
    blob[-10] ^= 0xFF
    s.con.execute("UPDATE batches SET payload = ? WHERE id = ?", (bytes(blob), rows[0].id))
    got = s.fetch(1, 0)
    assert [r.id for r in got] == [rows[1].id]
    gaps = [g for r in s.fetch(PRIO_KEEP, 0) for g in decode(r.payload).records]
    assert gaps[0]["reason"] == "corrupt" and gaps[0]["seqs"] == [[rows[0].seq, rows[0].seq]]


def test_unusable_state_directory_runs_in_memory(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file where the state directory should be")
    s = make(not_a_dir / "cloud.db")
    assert s.recovery.state == "memory" and s.memory
    assert "memory" in s.recovery.detail
    assert s.put(s.sealer.telemetry("cells", tel()))  # it still buffers (until a restart)
    assert s.stats()["memory_only"]


def test_command_log_survives_restart(tmp_path: Path) -> None:
    s = make(tmp_path / "cloud.db")
    s.remember_command("c-1", 2e9, b'{"status":"accepted"}')
    s.close()
    s = make(tmp_path / "cloud.db")
    assert s.command_ack("c-1") == b'{"status":"accepted"}'
    assert s.forget_commands(3e9) == 1 and s.command_ack("c-1") is None


def test_put_failure_raises_and_keeps_figures(tmp_path: Path) -> None:
    s = make(tmp_path / "cloud.db")
    s.put(s.sealer.telemetry("cells", tel()))
    before = s.total_bytes
    assert s.con is not None
    s.con.execute("CREATE TRIGGER boom BEFORE INSERT ON batches BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(sqlite3.Error):
        s.put(s.sealer.telemetry("cells", tel(seed=2)))
    assert s.total_bytes == before and s.count() == 1


def test_failed_relief_and_corrupt_row_removal_keep_figures(tmp_path: Path) -> None:
    """Relief and the removal of a corrupt row count in memory as they go; a rollback must undo that."""
    s = make(tmp_path / "cloud.db")
    rows = [r for seed in range(4) for r in s.put(s.sealer.telemetry("cells", tel(seed=seed)))]
    assert s.con is not None
    blob = bytearray(rows[0].payload)
    blob[-10] ^= 0xFF
    s.con.execute("UPDATE batches SET payload = ? WHERE id = ?", (bytes(blob), rows[0].id))
    s.con.execute("CREATE TRIGGER boom BEFORE INSERT ON batches BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    before = (s.total_bytes, dict(s.rows_by_kind), s.oldest_created)
    assert [r.id for r in s.fetch(1, 0)] == [r.id for r in rows[1:]]  # the gap record cannot be written
    s.quota_bytes = s.total_bytes // 2
    assert s.relieve() == []
    assert (s.total_bytes, s.rows_by_kind, s.oldest_created) == before
    assert s.count() == len(rows) and "disk says no" in s.last_error


def test_cli_decode_and_status_text(tmp_path: Path) -> None:
    import json

    from mqtt_broker import make_image

    from cloudlink.batch import BatchError
    from cloudlink.cli import decode_file, format_batches, format_status
    from cloudlink.config import CloudSection, CommandSettings
    from cloudlink.link import CloudLink

    s = make(tmp_path / "cloud.db")
    rows = s.put(s.sealer.telemetry("cells", tel()))
    rows += s.put(s.sealer.records("events", KIND_EVENTS, [{"kind": "trip", "name": "ov", "time": 1.7e9}]))
    s.sync(force=True)
    (tmp_path / "one.bin").write_bytes(rows[0].payload)
    one = decode_file(tmp_path / "one.bin")
    assert one[0]["stream"] == "cells" and one[0]["rows"] == 50 and len(one[0]["first_rows"]) == 5
    json.dumps(one)
    items = decode_file(tmp_path / "cloud.db")  # a gateway's whole buffer
    assert [i["row"] for i in items] == [r.id for r in rows]
    text = format_batches(items)
    assert "cells#0 telemetry: 1600 samples" in text and "'kind': 'trip'" in text
    (tmp_path / "junk.bin").write_bytes(b"\x93not a batch")
    with pytest.raises(BatchError):
        decode_file(tmp_path / "junk.bin")
    link = CloudLink(CloudSection(enabled=True, host="127.0.0.1", commands=CommandSettings(enabled=False)),
                     make_image(4), None, {}, tmp_path / "state", "gw-1", "site-1")
    st = link.status()
    json.dumps(st)
    out = format_status(st)
    assert "cloud link of gw-1" in out and "buffer" in out and "lost        nothing" in out


def _fill_to_page_limit(s: Store) -> Callable[[], None]:
    """Cap the database at its present size and fill its pages: every new batch then fails with
    SQLITE_FULL, as on a full disk.  Returns what undoes it (room again)."""
    assert s.con is not None
    con = s.con
    con.execute(f"PRAGMA max_page_count = {con.execute('PRAGMA page_count').fetchone()[0]}")
    for size in (4000, 1000, 200, 50, 10, 1):  # inert rows (a priority no relief looks at) in every gap
        while True:
            try:
                con.execute("INSERT INTO batches (stream, prio, kind, boot, seq, t0, t1, samples, created, size, "
                            "payload) VALUES ('filler', 9, 'filler', '', 0, 0, 0, 0, 0, 0, ?)", (b"x" * size,))
            except sqlite3.OperationalError as exc:
                assert "full" in str(exc)
                break

    def undo() -> None:
        con.execute("DELETE FROM batches WHERE stream = 'filler'")
        con.execute("PRAGMA max_page_count = 1073741823")

    return undo


def test_a_loss_the_full_disk_refused_is_written_later_and_survives_restart(tmp_path: Path) -> None:
    """docs: every loss is written as a gap record (store_error) -- also when the disk refused even that."""
    path = tmp_path / "cloud.db"
    sealer = Sealer("gw", "b0", 128 * 1024)
    s = make(path, sealer=sealer)
    stored = [r for i in range(3) for r in s.put(sealer.telemetry("cells", tel(seed=i)))]
    room = _fill_to_page_limit(s)
    lost = []
    for i in range(2):
        batch = sealer.telemetry("cells", tel(seed=10 + i))
        with pytest.raises(sqlite3.OperationalError, match="full"):
            s.put(batch)
        assert s.note_loss("store_error", batch) == []  # the gap record cannot be written either
        lost += batch
        # counted, and not forgotten by the rollback of the next failed transaction
        assert s.stats()["losses"]["store_error"]["batches"] == len(lost)
    room()
    rows = s.put(sealer.telemetry("cells", tel(seed=20)))
    gaps = [g for r in rows if r.kind == KIND_GAP for g in decode(r.payload).records]
    assert [(g["reason"], g["seqs"], g["batches"]) for g in gaps] == \
        [("store_error", [[lost[0].seq, lost[-1].seq]], len(lost))]
    assert s.stats()["losses"]["store_error"]["batches"] == len(lost)  # once, not twice
    s.close()
    s = make(path)
    assert s.stats()["losses"]["store_error"]["batches"] == len(lost)
    cells = {r.seq for r in s.all_rows() if r.stream == "cells"}
    assert cells | {b.seq for b in lost} == set(range(len(stored) + len(lost) + 1))


def test_disk_floor_drops_telemetry_being_published_before_any_event(tmp_path: Path) -> None:
    """docs: events are dropped only after all telemetry -- rows claimed by the link (in flight) included."""
    sealer = Sealer("gw", "b0", 128 * 1024)
    free = {"bytes": 100 << 20}
    claimed: set[int] = set()
    s = Store(tmp_path / "cloud.db", sealer, quota_bytes=1 << 30, min_free_bytes=1 << 20, fsync_window_s=0.5,
              thin_window_ms=5000, free_bytes=lambda p: free["bytes"], busy=lambda: frozenset(claimed))
    s.open()
    for i in range(20):
        s.put(sealer.records("events", KIND_EVENTS, [{"kind": "trip", "n": i, "time": 1.7e9 + i}]))
    tele = [r for i in range(40) for r in s.put(sealer.telemetry("cells", tel(seed=i, t0=T0 + i * 5000)))]
    claimed |= {r.id for r in tele}  # every telemetry row is in the link's lanes or awaiting its PUBACK
    free["bytes"] = (1 << 20) - sum(r.size for r in tele) // 3  # at the floor; the telemetry is enough room
    s.relieve()
    left = s.all_rows()
    assert sum(r.kind == KIND_EVENTS for r in left) == 20
    assert sum(r.stream == "cells" for r in left) < len(tele)
    assert "dropped_kept" not in s.stats()["losses"] and s.stats()["losses"]["dropped"]["batches"] >= 1
    s.delete([r.id for r in tele])  # the PUBACKs of rows dropped meanwhile delete nothing
    assert s.total_bytes == sum(r.size for r in s.all_rows())


def test_recovery_does_not_call_delivered_batches_lost(tmp_path: Path) -> None:
    """Seqs acknowledged and deleted long before the damage are not missing: only stored ones can be lost."""
    path = tmp_path / "cloud.db"
    sealer = Sealer("gw", "b0", 128 * 1024)
    s = make(path, sealer=sealer)
    rows = [r for i in range(10) for r in s.put(sealer.telemetry("cells", tel(seed=i, t0=T0 + i * 5000)))]
    s.delete([r.id for r in rows if 5 <= r.seq <= 7])  # PUBACKs, out of order
    s.delete([r.id for r in rows if 2 <= r.seq <= 4])
    s.sync(force=True)
    s.close()
    con = sqlite3.connect(path)
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'batches_prio'").fetchone()[0]
    con.close()
    data = bytearray(path.read_bytes())
    data[(root - 1) * PAGE_SIZE:root * PAGE_SIZE] = b"\xff" * PAGE_SIZE  # the index page only
    path.write_bytes(bytes(data))
    s = make(path)
    assert s.recovery.state == "recovered" and s.recovery.lost_seqs == 0
    assert sorted(r.seq for r in s.all_rows() if r.stream == "cells") == [0, 1, 8, 9]
    gaps = [g for r in s.all_rows() if r.kind == KIND_GAP for g in decode(r.payload).records]
    assert all(g["stream"] == "*" and g["seqs"] == [] for g in gaps)  # the damage is reported, no false loss
    assert "corrupt" not in s.stats()["losses"]
    assert s.con is not None  # what is remembered stays compact: one range for seqs deleted out of order
    assert s.con.execute("SELECT first, last FROM settled WHERE stream = 'cells'").fetchall() == [(2, 7)]
    # a batch still stored when the damage struck is reported lost, as before
    s.delete([r.id for r in s.all_rows() if r.stream == "cells" and r.seq == 0])
    assert s.con is not None
    s.con.execute("DELETE FROM batches WHERE stream = 'cells' AND seq = 8")  # vanished without a trace
    s.close()
    con = sqlite3.connect(path)
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'batches_prio'").fetchone()[0]
    con.close()
    data = bytearray(path.read_bytes())
    data[(root - 1) * PAGE_SIZE:root * PAGE_SIZE] = b"\xff" * PAGE_SIZE
    path.write_bytes(bytes(data))
    s = make(path)
    gaps = [g for r in s.all_rows() if r.kind == KIND_GAP for g in decode(r.payload).records]
    assert [g["seqs"] for g in gaps if g["stream"] == "cells"] == [[[8, 8]]]
