"""The estimator loops on the live process image (the simulated pack through the real pipeline)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.safety as safety_module
from estimators.limits import sof_preset
from estimators.sos import SafetyReason
from gateway.config import load_config, shipped_config
from gateway.estimation import Estimation, EstimatorSection
from gateway.image import ProcessImage, Quality
from gateway.limits import HARDWARE_DEFAULTS, HardwareLimits, LimitTable
from gateway.pipeline import Layout
from gateway.safety import SafetyIndicators, safety_families, safety_slots
from tests.test_ingest import alternating_writer
from tests.test_protection import Rig


def make(rig: Rig, tmp: Path) -> Estimation:
    cfg = rig.loaded.config
    return Estimation(EstimatorSection(), cfg.site.chemistry, rig.image, cfg.site.cells_per_module, tmp / "est",
                      cfg.limit_table().deep_discharge_v, cfg.hardware())


def test_soc_follows_the_simulated_pack_and_limits_come_up(tmp_path: Path) -> None:
    rig = Rig(tmp_path, start_hour=12.0, initial_soc=0.6)
    est = make(rig, tmp_path)
    rig.run(0.5)
    for _ in range(600):  # 60 s of 100 ms steps, the pack charging from the PV
        rig.run(0.1)
        est.step_soc(rig.t)
        est.step_limits(derate=False, now=rig.t)
    truth = rig.sim.pack.soc
    assert est.initialised and est.steps > 500
    assert np.abs(est.ekf.soc - truth).max() < 0.05
    snap = est.snapshot()
    assert 0.5 < snap["soc"] < 0.7
    assert est.limits is not None and est.limits.charge_current_a > 1.0  # recovered from the cautious start
    derated = est.limits.charge_current_a
    est.step_limits(derate=True, now=rig.t + 0.1)
    assert est.limits.charge_current_a <= 0.5 * derated + 1e-9
    assert snap["passport"]["charge_ah"] > 0


def test_no_current_means_no_estimate_and_zero_limits(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    est = make(rig, tmp_path)
    est.step_soc(1.0)
    est.step_limits(derate=False, now=1.0)
    assert not est.initialised and est.skipped == 1
    assert est.limits is not None and est.limits.charge_current_a == 0 and est.limits.discharge_current_a == 0


def test_state_survives_a_restart_and_bad_ecm_updates_are_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path, initial_soc=0.4)
    est = make(rig, tmp_path)
    rig.run(0.5)
    for _ in range(50):
        rig.run(0.1)
        est.step_soc(rig.t)
    est.persist()
    again = make(rig, tmp_path)
    assert again.initialised
    assert np.allclose(again.ekf.soc, est.ekf.soc, atol=1e-6)
    ok, reason = est.update_ecm({"cell": 3, "voltage_v": 3.7, "r0_ohm": -0.001, "r1_ohm": 0.001, "c1_f": 5000.0})
    assert not ok and "r0" in reason.lower()
    ok, reason = est.update_ecm({"cell": 3, "voltage_v": 3.7, "r0_ohm": 0.0016, "r1_ohm": 0.0007, "c1_f": 15000.0,
                                 "r2_ohm": 0.0009, "c2_f": 300000.0})
    assert ok, reason


def test_tunable_settings_apply_and_refuse(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    est = make(rig, tmp_path)
    ok, reason = est.apply_settings({"max_charge_c": 0.25, "rsl_derate": 0.3})
    assert ok, reason
    assert est.section.max_charge_c == 0.25 and est.limiter.config.max_charge_a == 0.25 * 60.0
    ok, reason = est.apply_settings({"capacity_ah": 10.0})
    assert not ok and "not a tunable" in reason
    ok, reason = est.apply_settings({"rsl_derate": 2.0})
    assert not ok and "rsl_derate" in reason
    assert est.section.rsl_derate == 0.3  # a refused change leaves the settings as they were


def test_inputs_are_read_once_per_image_change_and_equal_a_fresh_read(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    est = make(rig, tmp_path)
    reads = {"n": 0}
    read = est._read_inputs

    def counted(now: float) -> Any:
        reads["n"] += 1
        return read(now)

    est._read_inputs = counted  # type: ignore[method-assign]
    rig.run(0.5)
    for step in range(200):
        rig.run(0.01)
        if step == 50:
            rig.sim.inject("silent", 4)  # module 4 goes quiet: its cells turn stale 300 ms later, between frames
        before = reads["n"]
        for dt in (0.0, 0.0005, 0.001, 0.025, 0.05, 0.29, 0.31, 3.5):  # later times: sources go stale, no new frame
            now = rig.t + dt
            got, fresh = est.inputs(now), read(now)
            assert (got is None) == (fresh is None)
            if got is None or fresh is None:
                continue
            assert np.array_equal(got[0], fresh[0], equal_nan=True)
            assert np.array_equal(got[1], fresh[1]) and np.array_equal(got[2], fresh[2], equal_nan=True)
            assert got[3] == fresh[3] and (got[4] == fresh[4] or (np.isnan(got[4]) and np.isnan(fresh[4])))
            got[0][:] = -1.0  # callers get copies: what they do with them changes no later answer
            got[1][:] = False
            if dt == 0.025 and step < 50:  # the loops asking within a few ms (nothing going stale): one read
                assert reads["n"] == before + 1
    assert not est.inputs(rig.t)[1][4 * 14:5 * 14].any()  # the silent module's cells are not good


# -- a small site written directly into a process image (each input has its own source) ---------------

SMALL = Layout(strings=1, modules_per_string=2, cells_per_module=14, sensors_per_module=2)
PERIODS = {"cell.voltage": 0.1, "module.temperature": 1.0, "string.current": 0.01, "pack.current": 0.01,
           "pack.voltage": 0.01}


def site(tmp: Path, layout: Layout = SMALL, section: EstimatorSection | None = None,
         hardware: HardwareLimits = HARDWARE_DEFAULTS["NMC"],
         periods: dict[str, float] = PERIODS) -> tuple[Estimation, ProcessImage]:
    """An Estimation over an image of ``layout`` with the safety signals; inputs come through :func:`feed`."""
    img = ProcessImage(layout.families() | safety_families(layout), ["pack.current", "pack.voltage",
                                                                     "pack.safety_level"])
    for name, period in periods.items():
        slot = img.add_slot(name, period)
        for k in _indices(img, name):
            img.bind(k, slot)
    for name, (period, signals) in safety_slots(layout).items():
        slot = img.add_slot(name, period)
        for signal in signals:
            img.bind(img.index(signal), slot)
    img.freeze()
    est = Estimation(section or EstimatorSection(), "NMC", img, layout.cells_per_module, tmp / "est", 2.5, hardware)
    return est, img


def _indices(img: ProcessImage, name: str) -> range:
    if name in img.families:
        span = img.span(name)
        return range(span.start, span.stop)
    return range(img.index(name), img.index(name) + 1)


def put(img: ProcessImage, name: str, values: Any, now: float) -> None:
    """Write a family (or scalar) and mark its source as received at ``now``."""
    idx = _indices(img, name)
    img.value[idx.start:idx.stop] = np.ravel(np.asarray(values, dtype=np.float64))
    slot = int(img.slot_of[idx.start])
    img.rx_mono[slot] = now
    img.seq[slot] += 1


def feed(img: ProcessImage, now: float, cell_v: Any = 3.7, temps: Any = 25.0, current: float | None = 0.0,
         strings: Any = None) -> None:
    """One frame of each source (None: that source sends nothing); the pack voltage is one string's."""
    n = img.families["cell.voltage"].size
    v = np.broadcast_to(np.asarray(cell_v, dtype=np.float64), (n,))
    put(img, "cell.voltage", v, now)
    put(img, "pack.voltage", float(v.sum()) / img.families["string.current"].size, now)
    if temps is not None:
        put(img, "module.temperature", np.broadcast_to(temps, img.families["module.temperature"].shape), now)
    if current is not None:
        put(img, "pack.current", current, now)
    if strings is not None:
        put(img, "string.current", strings, now)


def test_unknown_temperatures_mean_zero_current_and_no_balancing(tmp_path: Path) -> None:
    """Missing data is a fault: no temperature is made up (the limiter's NaN gives zero current)."""
    est, img = site(tmp_path)
    v = np.full(28, 3.7)
    v[3] += 0.15
    est.balancer.request()
    t = 100.0
    for _ in range(80):  # the temperatures are never received; the pack rests long enough to balance
        t += 1.0
        feed(img, t, cell_v=v, temps=None)
        est.step_soc(t)
        est.step_limits(False, t)
        d = est.step_balancing(False, t)
    assert np.isnan(est.inputs(t)[2]).all()
    assert est.limits is not None and est.limits.charge_current_a == 0.0 and est.limits.discharge_current_a == 0.0
    assert d.bleeding == 0 and "temperature" in d.reason
    assert est.initialised and np.isfinite(est.ekf.soc).all()  # the SoC keeps going all the same
    # a module whose sensors both report invalid values does not borrow the other module's temperature
    est, img = site(tmp_path / "one")
    feed(img, t, temps=[[math.nan, math.nan], [20.0, 20.0]])
    cell_t = est.inputs(t)[2]
    assert np.isnan(cell_t[:14]).all() and (cell_t[14:] == 20.0).all()
    est.step_limits(False, t)
    assert est.limits is not None and est.limits.charge_current_a == 0.0 and est.limits.discharge_current_a == 0.0


def test_per_cell_temperatures_feed_the_limits_and_the_status(tmp_path: Path) -> None:
    """A map that binds cell[i].temperature instead of module sensors (protection checks them): the
    estimators and `bmsgw status` read them too, instead of seeing no temperature at all."""
    from gateway.daemon import temperature_extremes

    periods = {("cell.temperature" if k == "module.temperature" else k): v for k, v in PERIODS.items()}
    est, img = site(tmp_path, periods=periods)
    temps = np.full(28, 25.0)
    temps[17] = 2.0  # one cold cell: charging is limited by it
    feed(img, 100.0, temps=None)
    put(img, "cell.temperature", temps, 100.0)
    cell_t = est.inputs(100.0)[2]
    assert cell_t[17].tolist() == [2.0, 2.0] and (cell_t[:17] == 25.0).all()
    est.step_soc(100.0)
    est.step_limits(False, 100.0)
    assert est.limits is not None and 0.0 < est.limits.charge_current_a < est.limits.discharge_current_a
    t = temperature_extremes(img, 100.0)
    assert (t["min"], t["min_at"], t["max"], t["not_good"]) == (2.0, "cell[17].temperature", 25.0, 0)  # unbound sensors not counted
    est, img = site(tmp_path / "modules")  # the usual map: module sensors, named by module
    feed(img, 100.0, temps=[[20.0, 21.0], [30.0, 19.0]])
    t = temperature_extremes(img, 100.0)
    assert (t["min_at"], t["max_at"], t["not_good"]) == ("module[1].temperature[1]", "module[1].temperature[0]", 0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-30.0, 70.0), min_size=4, max_size=4))
def test_limits_and_balancing_see_every_sensor_not_a_module_mean(tmp_path_factory: pytest.TempPathFactory,
                                                                 temps: list[float]) -> None:
    est, img = site(tmp_path_factory.mktemp("est"))
    feed(img, 100.0, temps=np.reshape(temps, (2, 2)))
    est.step_soc(100.0)
    est.step_limits(False, 100.0)
    sof = sof_preset("NMC", 60.0, 28)
    assert est.limits is not None
    assert est.limits.charge_current_a <= min(sof.charge_vs_temp(x) for x in temps) + 1e-9
    assert est.limits.discharge_current_a <= min(sof.discharge_vs_temp(x) for x in temps) + 1e-9
    assert float(np.max(est.inputs(100.0)[2])) == max(temps)  # what the balancer compares with its limit


def test_current_ceilings_stay_within_the_hardware(tmp_path: Path) -> None:
    est, img = site(tmp_path)
    section, limiter = est.section, est.limiter
    ok, reason = est.apply_settings({"max_charge_c": 20.0, "max_discharge_c": 50.0})  # 1200 A against 120 A
    assert not ok and "max_charge_c" in reason and "pack_current_charge_max" in reason
    ok, reason = est.apply_settings({"max_discharge_c": -1.0})
    assert not ok and reason.startswith("max_discharge_c:")
    ok, reason = est.apply_settings({"max_charge_c": 0.0})
    assert not ok and reason.startswith("max_charge_c:")
    assert est.section is section and est.limiter is limiter  # a refused change changes nothing
    ok, reason = est.apply_settings({"max_discharge_c": 2.5})  # 150 A: exactly the hardware's
    assert ok, reason
    # the hardware limits hold whatever the settings (a second line of defence)
    hw = replace(HARDWARE_DEFAULTS["NMC"], pack_current_charge_max=20.0, pack_current_discharge_max=40.0)
    est, img = site(tmp_path / "hw", hardware=hw)
    ok, reason = est.apply_settings({"max_charge_c": 0.5})  # 30 A
    assert not ok and "pack_current_charge_max" in reason
    for k in range(3):
        feed(img, 100.0 + k)
        est.step_soc(100.0 + k)
        est.step_limits(False, 100.0 + k)
    assert est.limits is not None and est.limits.charge_current_a == 20.0 and est.limits.discharge_current_a == 40.0


def test_parallel_strings_split_the_current_and_keep_the_string_voltage(tmp_path: Path) -> None:
    layout = Layout(strings=2, modules_per_string=1, cells_per_module=14, sensors_per_module=2)
    est, img = site(tmp_path, layout)
    feed(img, 100.0)  # 3.7 V cells: the pack (either string) is at 14 x 3.7 V
    est.step_soc(100.0)
    est.step_limits(False, 100.0)
    c, lim = est.limiter.config, est.limits
    assert c.n_series == 14
    assert c.max_charge_a == 2 * 0.5 * 60.0 and c.max_discharge_a == 2 * 1.0 * 60.0  # two strings carry twice
    assert lim is not None and lim.charge_voltage_v == pytest.approx(14 * c.cell_charge_v)
    assert lim.discharge_voltage_v == pytest.approx(14 * c.cell_discharge_v)
    assert lim.charge_current_a == 60.0 and lim.discharge_current_a == 120.0
    est, img = site(tmp_path / "soc", layout)
    cells = img.span("cell.voltage")
    img.valid[cells.start + 1:cells.stop] = 0  # voltages say nothing: these cells count charge only
    t = 100.0
    for _ in range(900):  # 120 A out of the pack for 15 min; string 0 measures its 90 A, string 1 sends nothing
        t += 1.0
        feed(img, t, current=-120.0, strings=[-90.0, math.nan])
        est.step_soc(t)
    soc = est.ekf.soc  # counted from the first frame (the start) on
    np.testing.assert_allclose(soc[1:14], 0.5 - 90.0 * 899 / 3600 / 60, atol=1e-9)  # its own string's current
    np.testing.assert_allclose(soc[14:], 0.5 - 60.0 * 899 / 3600 / 60, atol=1e-9)  # half the pack's


def test_data_gaps_and_stalls_are_counted_and_widen_the_soc(tmp_path: Path) -> None:
    est, img = site(tmp_path)
    t = 100.0
    for _ in range(60):
        t += 1.0
        feed(img, t)
        est.step_soc(t)
    std = float(est.ekf.soc_std.max())
    for _ in range(600):  # the current frames stop for 10 min
        t += 1.0
        feed(img, t, current=None)
        est.step_soc(t)
    assert est.skipped == 600
    t += 1.0
    feed(img, t, current=-60.0)
    est.step_soc(t)
    assert est.passport.gap_s == pytest.approx(601.0)
    assert est.ekf.soc_std.min() > 3.0 * std  # what moved meanwhile is unknown
    # the loop stalls for 30 s at 1C: a gap, not 5 s of counted charge
    ah, seen = est.passport.discharge_ah, est.passport.observed_s
    t += 30.0
    feed(img, t, current=-60.0)
    est.step_soc(t)
    assert est.passport.gap_s == pytest.approx(631.0)
    assert est.passport.discharge_ah == ah and est.passport.observed_s == seen


@pytest.mark.parametrize("current, wide", [(-60.0, True), (0.2, False)])
def test_first_start_under_load_does_not_trust_the_voltage(tmp_path: Path, current: float, wide: bool) -> None:
    est, img = site(tmp_path)
    feed(img, 100.0, cell_v=3.62, current=current)
    est.step_soc(100.0)
    assert est.initialised
    init_std = est.ekf.config.init_soc_std
    if wide:
        assert est.ekf.soc_std.min() == pytest.approx(init_std)
    else:
        assert est.ekf.soc_std.max() < 0.1 * init_std


def test_rsl_derate_goes_through_the_anti_flapping(tmp_path: Path) -> None:
    est, img = site(tmp_path)
    out = []
    t = 100.0
    for k in range(12):
        t += 0.1
        feed(img, t)
        if k == 0:
            est.step_soc(t)
        est.step_limits(derate=k % 2 == 1, now=t)
        assert est.limits is not None
        out.append(est.limits.charge_current_a)
    assert out[0] == 30.0 and out[1:] == [15.0] * 11  # restricted at once, relaxed only after the delay


def test_inputs_never_pair_a_cell_value_with_another_frames_quality(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """P0 rewrites the cells while the estimators read: an invalid frame's impossible 99 V is never a good input
    (one read of value and quality, not the value then a quality() that may already see the next frame)."""
    for name in PERIODS:
        monkeypatch.setitem(PERIODS, name, math.inf)  # nothing goes stale: qualities come from the flags alone
    est, img = site(tmp_path)
    feed(img, time.monotonic())
    cells = range(img.span("cell.voltage").start, img.span("cell.voltage").stop)
    good = {i: (3.7, True) for i in cells}
    bad = good | {cells.start: (99.0, False)}  # the first cell's sensor flagged invalid, with an impossible value
    lies = whole_bad = 0
    with alternating_writer(img, int(img.slot_of[cells.start]), [good, bad]):
        for n in range(200_000):  # bounded; on a busy box read on until the writer was seen at work
            if n >= 5_000 and whole_bad:
                break
            got = est.inputs(time.monotonic())
            if got is not None and got[0][0] == 99.0:
                lies += bool(got[1][0])
                whole_bad += not got[1][0]
    assert whole_bad and not lies, (whole_bad, lies)


# -- restarts: what the state file restores, and what it must not -------------------------------------------


def test_the_configured_capacity_wins_over_the_saved_one(tmp_path: Path) -> None:
    """A corrected [estimators] capacity_ah holds after a restart; the learnt R and C stay (E4)."""
    est, img = site(tmp_path)
    for k in range(5):
        feed(img, 100.0 + k)
        est.step_soc(100.0 + k)
    ok, reason = est.update_ecm({"cell": 3, "voltage_v": 3.7, "r0_ohm": 0.0016, "r1_ohm": 0.0007, "c1_f": 15000.0,
                                 "r2_ohm": 0.0009, "c2_f": 300000.0})
    assert ok, reason
    learnt = est.ekf.params.copy()
    est.persist()
    again, _ = site(tmp_path, section=EstimatorSection(capacity_ah=30.0))
    assert again.initialised
    np.testing.assert_array_equal(again.ekf.params.capacity_ah, 30.0)
    np.testing.assert_array_equal(again.params.capacity_ah, 30.0)
    np.testing.assert_array_equal(again.ekf.params.r0_ohm, learnt.r0_ohm)
    np.testing.assert_array_equal(again.ekf.params.r_ohm, learnt.r_ohm)
    np.testing.assert_array_equal(again.ekf.params.c_f, learnt.c_f)
    soc = again.ekf.soc.copy()
    again.ekf.step(3600.0, 1.0, np.full(again.n_cells, np.nan))  # 1 Ah in, no voltages: counted with 30 Ah
    rise = again.ekf.soc - soc
    np.testing.assert_allclose(rise, 1.0 / 30.0, rtol=0.1)


def test_the_passport_survives_a_filter_state_that_no_longer_fits(tmp_path: Path) -> None:
    """The filter and the passport are restored each on its own (E8)."""
    est, img = site(tmp_path)
    for k in range(30):
        feed(img, 100.0 + k, current=-30.0)
        est.step_soc(100.0 + k)
    ah = est.passport.discharge_ah
    assert ah > 0.0
    est.persist()
    state = json.loads(est.path.read_text())
    state["ekf"]["version"] = -1  # e.g. saved by another release
    est.path.write_text(json.dumps(state))
    again, _ = site(tmp_path)
    assert not again.initialised  # the filter starts fresh...
    assert again.passport.discharge_ah == ah  # ...the lifetime counters do not
    again.persist()
    assert json.loads(again.path.read_text())["passport"]["discharge_ah"] == ah


def test_a_clock_behind_the_saved_state_widens_the_soc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """No RTC: the boot clock behind the save time means the time offline is unknown (E10)."""
    est, img = site(tmp_path)
    for k in range(60):
        feed(img, 100.0 + k)
        est.step_soc(100.0 + k)
    est.persist()
    saved = json.loads(est.path.read_text())["saved"]
    again, _ = site(tmp_path)
    assert again.ekf.soc_std.max() < 0.1  # an ordinary restart: the SoC is still known
    monkeypatch.setattr(time, "time", lambda: saved - 3600.0)
    with caplog.at_level(logging.WARNING, logger="gateway.estimation"):
        behind, _ = site(tmp_path)
    assert behind.initialised
    np.testing.assert_allclose(behind.ekf.soc_std, behind.ekf.config.init_soc_std)
    np.testing.assert_allclose(behind.ekf.soc, est.ekf.soc)  # the estimate stays, its confidence does not
    assert "behind" in caplog.text


# -- the plating indicator in the safety loop ----------------------------------------------------------------


def charge_and_rest(est: Estimation, img: ProcessImage, safety: SafetyIndicators, volts: np.ndarray,
                    limits: LimitTable, t: float = 100.0) -> float:
    """20 A for 30 min (10 Ah), then the rest ``volts`` (samples x cells), every 5 s through the safety loop."""
    n = volts.shape[1]
    for _ in range(360):
        t += 5.0
        feed(img, t, cell_v=np.full(n, 4.1), current=20.0)
        safety.step(limits, [], t)
    for row in volts:
        t += 5.0
        feed(img, t, cell_v=row, current=0.0)
        safety.step(limits, [], t)
    return t


def plated_rest(n: int, plated: list[int]) -> np.ndarray:
    """An hour's relaxation sampled every 5 s; the ``plated`` cells with the stripping plateau."""
    t = np.arange(0.0, 3601.0, 5.0)[:, None]
    v = 4.0 + 0.03 * np.exp(-t / 30.0) + 0.02 * np.exp(-t / 600.0) + np.zeros((1, n))
    v[:, plated] += 0.025 * (1.0 - 1.0 / (1.0 + np.exp(-(t - 900.0) / 120.0)))
    return np.round(v / 0.001) * 0.001


def test_an_unknown_plating_score_is_missing_data_not_a_good_value(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell whose rest the detector could not read counts as missing data, and its score reads INVALID (E3)."""
    monkeypatch.setattr(safety_module, "PLATING_EVERY", 1)
    est, img = site(tmp_path)
    limits = load_config(shipped_config()).config.limit_table()
    safety = SafetyIndicators(img, SMALL, est.inputs, est.plating)
    volts = plated_rest(28, [5, 12])
    volts[1:, 9] = np.nan  # cell 9's channel invalid for the whole rest
    volts[300, 12] = np.nan  # plated cell 12's for one sample only
    t = charge_and_rest(est, img, safety, volts, limits)
    t += 5.0
    feed(img, t, cell_v=np.full(28, 3.7))  # every channel good again
    safety.step(limits, [], t)
    level, reason = img.array("cell.safety_level"), img.array("cell.safety_reason").astype(int)
    assert level[5] == level[12] == 2 and reason[5] == reason[12] == SafetyReason.PLATING
    assert level[9] == 2 and reason[9] == SafetyReason.DATA_MISSING
    assert (np.delete(level, [5, 9, 12]) == 0).all()
    score = img.snapshot(img.span("cell.plating"), t)
    assert score.quality[9] == Quality.INVALID
    assert (score.quality[[5, 12]] == Quality.GOOD).all() and (score.value[[5, 12]] > 0.05).all()


def test_plating_flags_survive_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last rest's flags persist with the estimator state: a flagged cell stays at warning (E9)."""
    monkeypatch.setattr(safety_module, "PLATING_EVERY", 1)
    est, img = site(tmp_path)
    limits = load_config(shipped_config()).config.limit_table()
    safety = SafetyIndicators(img, SMALL, est.inputs, est.plating)
    volts = plated_rest(28, [5])
    volts[1:, 9] = np.nan
    t = charge_and_rest(est, img, safety, volts, limits)
    before = img.array("cell.plating").copy()
    est.persist()
    again, img2 = site(tmp_path)
    safety2 = SafetyIndicators(img2, SMALL, again.inputs, again.plating)
    feed(img2, t + 5.0, cell_v=np.full(28, 3.7))
    safety2.step(limits, [], t + 5.0)
    level, reason = img2.array("cell.safety_level"), img2.array("cell.safety_reason").astype(int)
    assert level[5] == 2 and reason[5] == SafetyReason.PLATING
    assert level[9] == 2 and reason[9] == SafetyReason.DATA_MISSING
    assert (np.delete(level, [5, 9]) == 0).all()
    score = img2.snapshot(img2.span("cell.plating"), t + 5.0)
    np.testing.assert_array_equal(score.value, before)
    assert score.quality[9] == Quality.INVALID and score.quality[5] == Quality.GOOD
    assert safety2.plating is again.plating  # the daemon's wiring: the Estimation's detector, which it persists
