"""The estimator loops on the live process image (the simulated pack through the real pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gateway.estimation import Estimation, EstimatorSection
from tests.test_protection import Rig


def make(rig: Rig, tmp: Path) -> Estimation:
    cfg = rig.loaded.config
    return Estimation(EstimatorSection(), cfg.site.chemistry, rig.image, cfg.site.cells_per_module, tmp / "est",
                      cfg.limit_table().deep_discharge_v)


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
