"""The per-frame hot path (gateway.ingest): what it refuses is counted by kind, and never raises."""

from __future__ import annotations

import functools
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import can
import cantools
import numpy as np
from cantools.database.can import Database
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.image import ProcessImage, Quality, Reading
from gateway.ingest import BAD_MUX, REMOTE, UNKNOWN_ID, Ingest
from gateway.pipeline import BusSource, build, covering_families
from gateway.signalmap import resolve
from tests.test_decode import FLOAT_MUX_DBC

REPO = Path(__file__).resolve().parents[1]


def test_remote_frames_are_counted_apart_from_decode_errors() -> None:
    """An RTR frame asks for data and carries none: not a bad length, and no refresh of the message."""
    db = cantools.database.load_file(str(REPO / "dbc/bmsgw_pack.dbc"), database_format="dbc")
    assert isinstance(db, Database)
    sm = resolve(REPO / "dbc/maps/bmsgw_pack.toml", db.messages)
    image, ingests = build(covering_families(sm.targets()), [BusSource("b", db.messages, sm)])
    ing = ingests["b"]
    for msg in (can.Message(arbitration_id=0x100, is_extended_id=False, is_remote_frame=True, dlc=8),
                can.Message(arbitration_id=0x100, is_extended_id=False, is_remote_frame=True, dlc=0),
                can.Message(arbitration_id=0x7AB, is_extended_id=False, is_remote_frame=True, dlc=2)):
        assert ing.on_frame(msg) == REMOTE
    assert ing.counters.remote == {0x100: 2, 0x7AB: 1}
    assert ing.counters.total() == {"unknown": 0, "bad_length": 0, "bad_mux": 0, "failed": 0}
    assert image.seq.sum() == 0  # nothing was refreshed
    assert ing.on_frame(can.Message(arbitration_id=0x7AB, is_extended_id=False, data=b"\x01")) == UNKNOWN_ID


def test_a_float_multiplexer_value_without_a_page_is_counted_as_bad_mux(tmp_path: Path) -> None:
    db = cantools.database.load_string(FLOAT_MUX_DBC, database_format="dbc")
    assert isinstance(db, Database)
    path = tmp_path / "m.toml"
    path.write_text("[[signal]]\nmessage = 'FM'\nsignal = 'B'\nto = 'fm.b'\n", encoding="utf-8")
    sm = resolve(path, db.messages)
    image, ingests = build(covering_families(sm.targets()), [BusSource("b", db.messages, sm)])
    ing = ingests["b"]
    for value in (float("inf"), float("nan"), 1e30):
        msg = can.Message(arbitration_id=291, is_extended_id=False, data=struct.pack("<f", value) + bytes(4))
        assert ing.on_frame(msg) == BAD_MUX
    assert ing.counters.total() == {"unknown": 0, "bad_length": 0, "bad_mux": 3, "failed": 0}
    assert ing.on_frame(can.Message(arbitration_id=291, is_extended_id=False,
                                    data=struct.pack("<f", 1.0) + bytes([9, 0, 0, 0]))) >= 0
    assert image.read("fm.b", 0.0).value == 9.0


# a frame with a mapped top-level signal (Top) and mapped signals on page 0 (P0) and on a page nested in page 2
TOP_AND_PAGE_DBC = '''VERSION ""

BU_: N

BO_ 292 TP: 8 N
 SG_ Top : 0|16@1+ (1,0) [0|65535] "" N
 SG_ Page M : 16|8@1+ (1,0) [0|255] "" N
 SG_ P0 m0 : 24|16@1+ (1,0) [0|65535] "" N
 SG_ P1 m1 : 24|16@1+ (1,0) [0|65535] "" N
 SG_ Sub m2M : 24|8@1+ (1,0) [0|255] "" N
 SG_ S2 m2 : 40|16@1+ (1,0) [0|65535] "" N
 SG_ Deep m5 : 32|8@1+ (1,0) [0|255] "" N

SG_MUL_VAL_ 292 P0 Page 0-0;
SG_MUL_VAL_ 292 P1 Page 1-1;
SG_MUL_VAL_ 292 Sub Page 2-2;
SG_MUL_VAL_ 292 S2 Page 2-2;
SG_MUL_VAL_ 292 Deep Sub 5-5;
'''


def test_a_multiplexed_frame_reports_every_slot_it_refreshes(tmp_path: Path) -> None:
    """Protection checks what on_frame returns and what on_also receives: together, every refreshed slot."""
    db = cantools.database.load_string(TOP_AND_PAGE_DBC, database_format="dbc")
    assert isinstance(db, Database)
    path = tmp_path / "m.toml"
    path.write_text("".join(f"[[signal]]\nmessage = 'TP'\nsignal = '{s}'\nto = 'tp.{s.lower()}'\n\n"
                            for s in ("Top", "P0", "S2", "Deep")), encoding="utf-8")
    sm = resolve(path, db.messages)
    image, ingests = build(covering_families(sm.targets()), [BusSource("b", db.messages, sm)])
    ing = ingests["b"]
    also: list[int] = []
    ing.on_also = also.append
    slot = {s: int(image.slot_of[image.index(f"tp.{s}")]) for s in ("top", "p0", "s2", "deep")}
    assert len(set(slot.values())) == 4

    def frame(page: int, sub: int = 0) -> int:
        also.clear()
        data = struct.pack("<HBBBBH", 7, page, sub, 5, 0, 0)
        return ing.on_frame(can.Message(arbitration_id=292, is_extended_id=False, data=data))

    assert (frame(0), also) == (slot["p0"], [slot["top"]])
    assert (frame(1), also) == (slot["top"], [])  # page 1 maps nothing: the top level's slot alone
    assert (frame(2, 5), sorted(also)) == (slot["deep"], sorted([slot["top"], slot["s2"]]))
    # both were stored before the bad nested page value
    assert (frame(2, 9), sorted(also)) == (BAD_MUX, sorted([slot["top"], slot["s2"]]))
    assert (frame(3), also) == (BAD_MUX, [slot["top"]])  # the top level was stored before the bad page value
    assert image.read("tp.top", 0.0).value == 7.0
    assert ing.counters.bad_mux == {292: 2}


# -- a reader racing the writer --------------------------------------------------------------------------

GOOD_A, BAD_A = 10.0, -8000.0  # the valid frame's current, and the one of a frame with CurrentValid = 0
NOW = 1000.0  # the ingest's clock in these tests: nothing ever goes stale, quality comes from the flags


@functools.cache
def _pack() -> tuple[ProcessImage, Ingest, Callable[[float, int, float], can.Message]]:
    """The reference pack's image and ingest, and a PACK_Measurement frame maker (current, valid, ts)."""
    db = cantools.database.load_file(str(REPO / "dbc/bmsgw_pack.dbc"), database_format="dbc")
    assert isinstance(db, Database)
    sm = resolve(REPO / "dbc/maps/bmsgw_pack.toml", db.messages)
    image, ingests = build(covering_families(sm.targets()), [BusSource("b", db.messages, sm)])
    ing = ingests["b"]
    ing.clock = lambda: NOW
    m = db.get_message_by_name("PACK_Measurement")

    def frame(current: float, valid: int, ts: float) -> can.Message:
        data = m.encode({"PackCurrent": current, "PackVoltage": 800, "LinkVoltage": 800, "CurrentValid": valid,
                         "VoltageValid": 1, "AliveCounter": 0})
        return can.Message(arbitration_id=m.frame_id, data=data, is_extended_id=False, timestamp=ts)
    return image, ing, frame


def _race(read: Callable[[ProcessImage], Reading], reads: int = 20_000) -> set[tuple[float, Quality, float]]:
    """(value, quality, timestamp) of every read while a forked writer alternates a good and a bad frame."""
    image, ing, frame = _pack()
    good, bad = frame(GOOD_A, 1, 1.0), frame(BAD_A, 0, 2.0)
    slot = ing.on_frame(good)
    assert slot >= 0
    start = int(image.seq[slot])
    pid = os.fork()
    if pid == 0:  # P0's receive thread, decoding as fast as it can until killed
        try:
            while True:
                ing.on_frame(bad)
                ing.on_frame(good)
        finally:
            os._exit(0)
    try:
        for _ in range(10_000):  # until the writer runs (bounded: a dead writer fails the assert below)
            if image.seq[slot] > start + 2:
                break
            time.sleep(0.001)
        assert image.seq[slot] > start + 2, "the forked writer never wrote"
        seen: set[tuple[float, Quality, float]] = set()
        whole_bad = (BAD_A, Quality.INVALID, 2.0)
        # on a busy box the writer may get no CPU for a while: read on (bounded) until it was seen at work
        for n in range(50 * reads):
            if n >= reads and whole_bad in seen:
                break
            r = read(image)
            seen.add((r.value, r.quality, r.timestamp))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return seen


def _consistent(seen: set[tuple[float, Quality, float]]) -> None:
    """Every read that is not STALE is one whole frame: its own value, flag and time."""
    whole = {(GOOD_A, Quality.GOOD, 1.0), (BAD_A, Quality.INVALID, 2.0)}
    assert {r for r in seen if r[1] != Quality.STALE} <= whole
    assert (BAD_A, Quality.INVALID, 2.0) in seen  # the race was run: the reader saw the writer's frames


def test_read_never_pairs_a_value_with_another_frames_quality() -> None:
    """The main process reads while P0 decodes: the invalid frame's -8000 A is never GOOD (nor the
    valid frame's value INVALID, nor either with the other's timestamp)."""
    _consistent(_race(lambda img: img.read("pack.current", NOW)))


def _snapshot_reading(img: ProcessImage) -> Reading:
    """pack.current as the vectorised read gives it (read together with pack.voltage and a cell)."""
    sel = np.array([img.index("cell[3].voltage"), img.index("pack.current"), img.index("pack.voltage")])
    s = img.snapshot(sel, NOW)
    return Reading("pack.current", float(s.value[1]), Quality(int(s.quality[1])), float(s.timestamp[1]),
                   float(s.age_s[1]))


def test_array_reads_never_pair_a_value_with_another_frames_quality() -> None:
    """The same for the vectorised read of OPC UA, the estimators and the recorder (per signal)."""
    _consistent(_race(_snapshot_reading, reads=10_000))


@contextmanager
def alternating_writer(image: ProcessImage, slot: int,
                       frames: Sequence[dict[int, tuple[float, bool]]]) -> Iterator[None]:
    """A forked writer (P0's receive thread) rewriting ``slot`` with each of ``frames`` ((value, valid) by
    position) in turn, flat out, the way the generated handlers do (seqlock), until the block ends."""
    start = int(image.seq[slot])
    pid = os.fork()
    if pid == 0:
        try:
            seq, begun = image.w_seq, image.w_begun
            while True:
                for frame in frames:
                    begun[slot] = seq[slot] + 1
                    for i, (v, ok) in frame.items():
                        image.w_value[i] = v
                        image.w_valid[i] = ok
                    image.w_rx_time[slot] = time.time()
                    image.w_rx_mono[slot] = time.monotonic()
                    seq[slot] = begun[slot]
        finally:
            os._exit(0)
    try:
        for _ in range(10_000):  # until the writer runs (bounded)
            if image.seq[slot] > start + 2:
                break
            time.sleep(0.001)
        assert image.seq[slot] > start + 2, "the forked writer never wrote"
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


class _Paused(Exception):
    """The writer stops here: what it stored so far is what any reader finds until its next frame."""


class _Stores:
    """One writer buffer that lets a shared budget of stores through, then pauses the writer."""

    def __init__(self, buf: Any, budget: list[int]) -> None:  # Any: typeshed's memoryview takes ints only
        self.buf, self.budget = buf, budget

    def __getitem__(self, k: int) -> Any:
        return self.buf[k]

    def __setitem__(self, k: int, v: float) -> None:
        if self.budget[0] == 0:
            raise _Paused
        self.budget[0] -= 1
        self.buf[k] = v


@settings(max_examples=60, deadline=None)
@given(frames=st.lists(st.tuples(st.booleans(), st.integers(0, 14)), min_size=1, max_size=6))
def test_a_writer_stopped_after_any_store_is_never_read_as_good(frames: list[tuple[bool, int]]) -> None:
    """Frames whose writer stops after any number of its stores (preempted, or failed in the handler):
    a GOOD read is always the last whole frame, and the next whole frame is read back exactly."""
    image, ing, frame = _pack()
    real = {k: v for k, v in vars(image).items() if isinstance(v, memoryview)}
    budget = [-1]  # below zero: no limit
    try:
        for k, v in real.items():
            setattr(image, k, _Stores(v, budget))
        ing.compile()  # the generated handlers now store through the budget
        assert ing.on_frame(frame(GOOD_A, 1, 0.5)) >= 0
        whole = (GOOD_A, Quality.GOOD, 0.5)
        for n, (ok, stores) in enumerate(frames):
            budget[0] = stores
            current, ts = (GOOD_A if ok else BAD_A), float(n + 1)
            finished = ing.on_frame(frame(current, int(ok), ts)) >= 0
            if finished:
                whole = (current, Quality.GOOD if ok else Quality.INVALID, ts)
            budget[0] = -1
            for r in (image.read("pack.current", NOW), _snapshot_reading(image)):
                got = (r.value, r.quality, r.timestamp)
                # a frame stopped half-way is not current data; the frame after it is whole again
                assert got == whole or (not finished and r.quality == Quality.STALE), (n, got, whole)
    finally:
        for k, v in real.items():
            setattr(image, k, v)
        ing.compile()
