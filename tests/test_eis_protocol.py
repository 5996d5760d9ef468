"""The EIS CAN protocol: the generated DBC, and frame parsing in the gateway driver."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import can
import cantools
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.eis_driver import Conditions, EisDriver, EisDriverConfig, Phase, SweepSettings, quantize_log_f
from drivers.sim_eis import SimEis
from estimators.spectrum import log_grid
from gateway.dbcfile import load_dbc, merge

ROOT = Path(__file__).resolve().parent.parent
EIS_DBC = ROOT / "dbc" / "bmsgw_eis.dbc"
PACK_DBC = ROOT / "dbc" / "bmsgw_pack.dbc"


def _db() -> cantools.database.can.Database:
    db = cantools.database.load_file(str(EIS_DBC), strict=True)
    assert isinstance(db, cantools.database.can.Database)
    return db


def test_dbc_is_generated_by_the_script() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_eis_dbc.py")], capture_output=True, text=True,
                         check=True).stdout
    assert out == EIS_DBC.read_text(), "dbc/bmsgw_eis.dbc is stale: python scripts/gen_eis_dbc.py > dbc/bmsgw_eis.dbc"


def test_ids_stay_in_their_block_and_clear_of_the_pack_protocol() -> None:
    eis = {m.frame_id for m in _db().messages}
    assert all(0x300 <= i <= 0x33F for i in eis)
    pack = cantools.database.load_file(str(PACK_DBC))
    assert isinstance(pack, cantools.database.can.Database)
    assert not eis & {m.frame_id for m in pack.messages}
    assert not eis & set(range(0x351, 0x35F))  # inverter BMS-CAN
    # the gateway's own loader accepts both on one bus (strict parse, no duplicate IDs)
    merged = merge([load_dbc(PACK_DBC, strict_only=True), load_dbc(EIS_DBC, strict_only=True)], "bus[0].dbc")
    assert len(merged) == len(_db().messages) + len(pack.messages)


def test_message_shapes() -> None:
    db = _db()
    fd = db.get_message_by_name("EIS_ResultPointsFD")
    assert fd.is_fd and fd.length == 64
    assert sum(1 for s in fd.signals if s.is_float) == 15
    classic = db.get_message_by_name("EIS_ResultPoint")
    assert not classic.is_fd and classic.length == 8 and classic.is_multiplexed()
    for m in db.messages:
        assert m.is_fd or m.length == 8
        used = 0
        for s in m.signals:
            assert s.byte_order == "little_endian"
            if s.multiplexer_ids in (None, [0]):
                bits = ((1 << s.length) - 1) << s.start
                assert not used & bits or s.multiplexer_ids, f"{m.name}.{s.name} overlaps"
                used |= bits


def test_worked_examples_of_the_document() -> None:
    db = _db()
    req = db.encode_message("EIS_SweepRequest", {
        "SweepId": 7, "TargetType": 0, "TargetIndex": 17, "StartFreqLog10": 4.0, "StopFreqLog10": -2.0,
        "PointsPerDecade": 10, "ExcitationAmplitude": 1.0, "ResultFormat": 0})
    assert req.hex(" ") == "07 44 c0 da f4 a1 20 03"
    pt = db.encode_message("EIS_ResultPoint", {"Part": 1, "SweepId": 7, "PointIndex": 12, "ZReal": 0.0012345})
    assert pt.hex(" ") == "1d 30 00 00 f2 ce a1 3a"
    assert db.decode_message(0x320, pt)["ZReal"] == pytest.approx(0.0012345, rel=1e-7)
    doc = (ROOT / "docs" / "eis-can-protocol.md").read_text()
    assert "07 44 C0 DA F4 A1 20 03" in doc and "1D 30 00 00 F2 CE A1 3A" in doc


# --- the driver's parser --------------------------------------------------------------------

GRID = SweepSettings(1e4, 1e2, 2).grid()  # the sweep of _driver_in_sweep: 5 points, half a decade apart


def _driver_in_sweep(fd: bool) -> tuple[EisDriver, cantools.database.can.Database, int]:
    """A driver whose 5-point sweep (GRID) has been accepted (Ack fed by hand, no simulator)."""
    db = _db()
    drv = EisDriver(lambda t: Conditions(3.70, 21.5, 0.55), EisDriverConfig(stable_window_s=0.0))
    drv.request_sweep("cell[3]", f_start_hz=1e4, f_stop_hz=1e2, points_per_decade=2, fd=fd)
    out = drv.tick(0.0, 0.0, False)
    assert len(out) == 1 and out[0].arbitration_id == 0x301
    sid = int(db.decode_message(0x301, out[0].data)["SweepId"])
    ack = db.encode_message("EIS_Ack", {"SweepId": sid, "Command": 1, "Result": 0, "PointsTotal": 5,
                                        "EstimatedDuration": 3})
    drv.on_frame(can.Message(arbitration_id=0x308, data=ack, is_extended_id=False), 0.01)
    assert drv.phase is Phase.RUNNING
    return drv, db, sid


f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# where a point is measured relative to its grid frequency, in half grid steps (log f): the module
# may use the nearest frequency its generator makes, but not one nearer another grid point
near = st.floats(min_value=-0.999, max_value=0.999)
point = st.tuples(near, f32, f32, st.integers(0, 3))


def _measured_at(k: int, half_steps: float) -> float:
    return float(np.float32(GRID[k] * 10.0 ** (half_steps * 0.25)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=st.lists(point, min_size=5, max_size=5), fd=st.booleans(), order=st.randoms(use_true_random=False))
def test_result_frames_round_trip_into_the_record(drawn: list[tuple[float, float, float, int]], fd: bool,
                                                   order: object) -> None:
    points = [(_measured_at(k, u), re, im, fl) for k, (u, re, im, fl) in enumerate(drawn)]
    drv, db, sid = _driver_in_sweep(fd)
    frames: list[can.Message] = []
    if fd:
        for first, count in ((0, 3), (3, 2)):  # any split into runs of consecutive points is valid
            values: dict[str, float] = {"SweepId": sid, "FirstPoint": first, "PointCount": count}
            for slot in range(5):
                f, re, im, fl = points[first + slot] if slot < count else (0.0, 0.0, 0.0, 0)
                values |= {f"Point{slot}_Frequency": f, f"Point{slot}_ZReal": re, f"Point{slot}_ZImag": im,
                           f"Point{slot}_Flags": fl}
            frames.append(can.Message(arbitration_id=0x321, data=db.encode_message("EIS_ResultPointsFD", values),
                                      is_fd=True, is_extended_id=False))
    else:
        for k, (f, re, im, fl) in enumerate(points):
            for part, sig, val in ((0, "Frequency", f), (1, "ZReal", re), (2, "ZImag", im)):
                vals = {"Part": part, "SweepId": sid, "PointIndex": k, sig: val}
                if part == 0:
                    vals["PointFlags"] = fl
                frames.append(can.Message(arbitration_id=0x320, data=db.encode_message("EIS_ResultPoint", vals),
                                          is_extended_id=False))
        order.shuffle(frames)  # type: ignore[attr-defined]
    for m in frames:
        drv.on_frame(m, 0.5)
    done = db.encode_message("EIS_Status", {"State": 3, "SweepId": sid, "ErrorCode": 0, "TargetType": 0,
                                            "TargetIndex": 3, "PointsDone": 5, "PointsTotal": 5, "AliveCounter": 1})
    drv.on_frame(can.Message(arbitration_id=0x310, data=done, is_extended_id=False), 0.6)
    recs = drv.pop_records()
    assert len(recs) == 1
    r = recs[0]
    assert r.target == "cell[3]" and r.sweep_id == sid
    np.testing.assert_array_equal(r.frequency_hz, np.float32([p[0] for p in points]).astype(np.float64))
    np.testing.assert_array_equal(r.z_re_ohm, np.float32([p[1] for p in points]).astype(np.float64))
    np.testing.assert_array_equal(r.z_im_ohm, np.float32([p[2] for p in points]).astype(np.float64))
    np.testing.assert_array_equal(r.flags, [p[3] for p in points])
    assert np.all(r.voltage_v == 3.70) and np.all(r.temperature_c == 21.5) and np.all(r.soc == 0.55)
    assert np.all(np.diff(r.frequency_hz) < 0)  # distinct, in sweep order


@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, 4), half_steps=st.floats(min_value=1.001, max_value=8.0), below=st.booleans(),
       fd=st.booleans())
def test_a_point_far_from_its_grid_frequency_ends_the_attempt(k: int, half_steps: float, below: bool,
                                                               fd: bool) -> None:
    """A point half a grid step or more from its requested frequency (the generator stuck, or the
    module measuring another grid) is no point of this spectrum: no record, the sweep is aborted."""
    drv, db, sid = _driver_in_sweep(fd)
    f = _measured_at(k, -half_steps if below else half_steps)
    if fd:
        values: dict[str, float] = {"SweepId": sid, "FirstPoint": k, "PointCount": 1}
        for slot in range(5):
            values |= {f"Point{slot}_Frequency": f if slot == 0 else 0.0, f"Point{slot}_ZReal": 1e-3,
                       f"Point{slot}_ZImag": -1e-4, f"Point{slot}_Flags": 0}
        drv.on_frame(can.Message(arbitration_id=0x321, data=db.encode_message("EIS_ResultPointsFD", values),
                                 is_fd=True, is_extended_id=False), 0.5)
    else:
        data = db.encode_message("EIS_ResultPoint", {"Part": 0, "SweepId": sid, "PointIndex": k, "Frequency": f,
                                                     "PointFlags": 0})
        drv.on_frame(can.Message(arbitration_id=0x320, data=data, is_extended_id=False), 0.5)
    fails = drv.pop_failures()
    assert len(fails) == 1 and fails[0].reason.startswith(f"point {k} measured at")
    out = drv.tick(0.6, 0.0, False)
    assert [m.arbitration_id for m in out] == [0x300]
    assert db.decode_message(0x300, out[0].data)["SweepId"] == sid
    assert drv.phase is Phase.BACKOFF and not drv.pop_records()


@settings(max_examples=300, deadline=None)
@given(frame_id=st.sampled_from([0x300, 0x301, 0x302, 0x308, 0x310, 0x311, 0x320, 0x321, 0x130, 0x7FF]),
       data=st.binary(min_size=0, max_size=64), extended=st.booleans(), fd=st.booleans())
def test_garbage_frames_never_break_driver_or_module(frame_id: int, data: bytes, extended: bool, fd: bool) -> None:
    drv, db, sid = _driver_in_sweep(fd=False)
    msg = can.Message(arbitration_id=frame_id, data=data, is_extended_id=extended, is_fd=fd or len(data) > 8)
    drv.on_frame(msg, 0.2)
    drv.tick(0.3, 0.0, False)
    st_ = drv.status()
    assert st_["phase"] in {p.value for p in Phase}
    assert drv.stats.frames_in >= 0 and drv.stats.bad_frames <= drv.stats.frames_in
    sent: list[can.Message] = []
    sim = SimEis(sent.append, speed=100.0)
    sim.receive(msg)
    sim.tick()
    assert all(m.arbitration_id in (0x308, 0x310, 0x311, 0x320, 0x321) for m in sent)


@given(start=st.floats(min_value=1e-3, max_value=1.5e5), stop=st.floats(min_value=1e-3, max_value=1.5e5),
       ppd=st.integers(1, 63))
@settings(max_examples=300, deadline=None)
def test_request_coding_gives_the_grid_both_sides_compute(start: float, stop: float, ppd: int) -> None:
    """The log10 coding quantises the request; the driver's expected grid must be the one the
    module computes from the decoded frame (same number of points, same frequencies)."""
    db = _db()
    s = SweepSettings(start, stop, ppd)
    data = db.encode_message("EIS_SweepRequest", {
        "SweepId": 1, "TargetType": 0, "TargetIndex": 0, "StartFreqLog10": quantize_log_f(start),
        "StopFreqLog10": quantize_log_f(stop), "PointsPerDecade": ppd, "ExcitationAmplitude": 0,
        "ResultFormat": 0}, strict=False)
    v = db.decode_message(0x301, data)
    assert abs(v["StartFreqLog10"] - math.log10(start)) <= 0.001 + 1e-9
    module_grid = log_grid(10.0 ** v["StartFreqLog10"], 10.0 ** v["StopFreqLog10"], int(v["PointsPerDecade"]))
    np.testing.assert_allclose(s.grid(), module_grid, rtol=1e-12)
