"""The per-frame hot path (gateway.ingest): what it refuses is counted by kind, and never raises."""

from __future__ import annotations

import struct
from pathlib import Path

import can
import cantools
from cantools.database.can import Database

from gateway.ingest import BAD_MUX, REMOTE, UNKNOWN_ID
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
