"""Model updates, SoF current/voltage limits and balancing decisions."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimators.balancing import BalanceConfig, Balancer, BalanceStatus
from estimators.ecm import NMC, EcmParams
from estimators.limits import Governor, Lut, SofLimiter, sof_preset
from estimators.model_update import UpdateLimits, apply_ecm_update
from estimators.soc_ekf import SocEkf

# ---------------------------------------------------------------- model updates


def good_update(**kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"cell": 3, "voltage_v": 3.73, "r0_ohm": 1.8e-3, "r1_ohm": 0.7e-3, "c1_f": 15000.0,
                         "r2_ohm": 0.9e-3, "c2_f": 400000.0}
    d.update(kw)
    return {k: v for k, v in d.items() if v is not None}


def test_update_accepted_and_scaled_to_reference() -> None:
    params = EcmParams.uniform(NMC, 8)
    res = apply_ecm_update(params, good_update(), NMC)
    assert res.accepted, res.reason
    assert res.params is not None and res.params is not params
    # 3.73 V is about 50 % SoC where the shape factor is 1: values kept
    assert res.params.r0_ohm[3] == pytest.approx(1.8e-3, rel=1e-6)
    assert res.params.tau_s[3] == pytest.approx([10.5, 360.0])
    assert params.r0_ohm[3] == NMC.r0_ohm  # the input is untouched
    np.testing.assert_array_equal(res.params.r0_ohm[:3], params.r0_ohm[:3])
    # at a low voltage point (high shape factor) the reference value is smaller
    low = apply_ecm_update(params, good_update(voltage_v=3.3), NMC)
    assert low.accepted and low.params is not None and low.params.r0_ohm[3] < 1.8e-3
    # a cold measurement is scaled back to 25 degC
    cold = apply_ecm_update(params, good_update(temperature_c=0.0), NMC)
    assert cold.accepted and cold.params is not None and cold.params.r0_ohm[3] < 1.8e-3


def test_four_pairs_grow_the_model_and_the_filter() -> None:
    params = EcmParams.uniform(NMC, 4)
    upd = good_update(r3_ohm=0.2e-3, c3_f=10.0, r4_ohm=0.3e-3, c4_f=1e6)
    res = apply_ecm_update(params, upd, NMC)
    assert res.accepted and res.params is not None and res.params.n_rc == 4
    assert np.all(np.diff(res.params.tau_s[3]) > 0.0)  # sorted by time constant
    assert np.all(res.params.r_ohm[0, 2:] == 0.0)  # other cells: unused branches
    ekf = SocEkf(NMC, params, soc0=0.5)
    ekf.set_params(res.params)
    assert ekf.n_rc == 4


@pytest.mark.parametrize("upd,reason", [
    (good_update(r0_ohm=-1e-3), "R0"),
    (good_update(r0_ohm=float("nan")), "finite"),
    (good_update(r0_ohm=True), "number"),
    (good_update(r0_ohm="1e-3"), "number"),
    (good_update(cell=8), "out of range"),
    (good_update(cell=1.0), "integer"),
    (good_update(voltage_v=4.5), "voltage point"),
    (good_update(r1_ohm=-1e-4), "R1"),
    (good_update(c1_f=0.0), "C1"),
    (good_update(c2_f=1e9), "C2"),
    (good_update(r2_ohm=0.5, c2_f=1e6), "R2*C2"),
    (good_update(c2_f=None), "give both"),
    (good_update(colour="red"), "unknown keys"),
    (good_update(r0_ohm=0.05), "factor"),
    (good_update(r1_ohm=0.6, c1_f=16.0), "R1"),  # 0.6 mohm sent as ohm (the time constant still plausible)
    (good_update(r2_ohm=0.9e-6), "R2"),  # a thousand times too small
    (good_update(c1_f=150000.0), "C1"),
    (good_update(r1_ohm=0.02, c1_f=500.0, r2_ohm=None, c2_f=None), "total RC resistance"),  # one branch for two
    (good_update(temperature_c=200.0), "temperature"),
    ({"cell": 1}, "missing"),
    ([1, 2, 3], "mapping"),
])
def test_update_refused_with_a_reason(upd: Any, reason: str) -> None:
    params = EcmParams.uniform(NMC, 8)
    res = apply_ecm_update(params, upd, NMC)
    assert not res.accepted and res.params is None
    assert reason in res.reason


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["cell", "voltage_v", "r0_ohm", "r1_ohm", "c1_f", "r4_ohm", "c4_f", "x"]),
                       st.one_of(st.floats(allow_nan=True), st.integers(-5, 20), st.booleans(), st.text(max_size=3),
                                 st.none())))
def test_update_never_raises_and_never_accepts_nonsense(upd: dict[str, Any]) -> None:
    params = EcmParams.uniform(NMC, 8)
    res = apply_ecm_update(params, upd, NMC, UpdateLimits(max_change_factor=0.0))
    if res.accepted:
        assert res.params is not None
        assert np.all(np.isfinite(res.params.r0_ohm)) and np.all(res.params.r0_ohm > 0.0)
        assert np.all(res.params.r_ohm >= 0.0) and np.all(res.params.c_f > 0.0)


@settings(max_examples=150, deadline=None)
@given(st.floats(1e-5, 0.9), st.floats(1e-3, 1e7), st.floats(1e-5, 0.9), st.floats(1e-3, 1e7))
def test_an_accepted_update_moves_no_rc_value_beyond_the_change_factor(r1: float, c1: float, r2: float,
                                                                        c2: float) -> None:
    params = EcmParams.uniform(NMC, 4)
    res = apply_ecm_update(params, good_update(r1_ohm=r1, c1_f=c1, r2_ohm=r2, c2_f=c2), NMC)
    if res.accepted:
        assert res.params is not None
        k = UpdateLimits().max_change_factor
        for new, old in ((res.params.r_ohm[3], params.r_ohm[3]), (res.params.c_f[3], params.c_f[3]),
                         (res.params.r_ohm[3].sum(), params.r_ohm[3].sum())):
            ratio = np.asarray(new) / np.asarray(old)
            assert np.all(ratio <= k * (1 + 1e-9)) and np.all(ratio >= 1 / k * (1 - 1e-9))


# ---------------------------------------------------------------------- limits


def test_lut_and_limiter_minimum() -> None:
    lut = Lut((0.0, 10.0), (0.0, 100.0))
    assert lut(5.0) == 50.0 and lut(-5.0) == 0.0 and lut(50.0) == 100.0 and lut(float("nan")) == 0.0
    with pytest.raises(ValueError):
        Lut((1.0, 0.0), (1.0, 1.0))
    sof = SofLimiter(sof_preset("NMC", 60.0, 224))
    v = np.full(224, 3.7)
    t = np.full(224, 25.0)
    s = np.full(224, 0.5)
    free = sof.targets(v, t, s)
    assert free.charge_current_a == pytest.approx(30.0) and free.discharge_current_a == pytest.approx(60.0)
    assert free.charge_limited_by == "max"
    hot = sof.targets(v, np.where(np.arange(224) == 7, 47.0, 25.0), s)
    assert hot.charge_limited_by == "temperature" and hot.charge_current_a < 30.0
    cold = sof.targets(v, np.full(224, 2.0), s)
    assert cold.charge_current_a < 0.2 * 30.0 and cold.discharge_current_a > cold.charge_current_a
    full = sof.targets(np.where(np.arange(224) == 0, 4.12, 3.7), t, s)
    assert full.charge_limited_by == "cell_voltage" and full.charge_current_a < 30.0 * 0.3
    empty = sof.targets(v, t, np.where(np.arange(224) == 3, 0.02, 0.5))
    assert empty.discharge_limited_by == "soc" and empty.discharge_current_a < 60.0 * 0.3
    nan = sof.targets(np.where(np.arange(224) == 0, np.nan, 3.7), t, s)
    assert nan.charge_current_a == 0.0 and nan.discharge_current_a == 0.0
    assert nan.charge_limited_by == nan.discharge_limited_by == "no_data"


def test_start_up_without_data_is_not_a_restriction_to_recover_from() -> None:
    sof = SofLimiter(sof_preset("NMC", 60.0, 4))
    v, t, s = np.full(4, 3.7), np.full(4, 25.0), np.full(4, 0.5)
    for _ in range(10):  # the first cycles run before the first frames (or the first SoC)
        waiting = sof.step(0.1, v, t, np.full(4, np.nan), derate=0.5)
        assert (waiting.charge_current_a, waiting.discharge_current_a) == (0.0, 0.0)
        assert waiting.charge_limited_by == "no_data"
    first = sof.step(0.1, v, t, s)
    assert (first.charge_current_a, first.discharge_current_a) == pytest.approx((30.0, 60.0))
    lost = sof.step(0.1, np.full(4, np.nan), t, s, derate=0.5)  # data lost later: zero at once...
    assert (lost.charge_current_a, lost.charge_limited_by) == (0.0, "no_data")
    back = sof.step(0.1, v, t, s)  # ... and back only after the recovery delay, ramped
    assert back.charge_current_a == 0.0


def test_voltage_limits_follow_the_extreme_cells() -> None:
    cfg = sof_preset("NMC", 60.0, 4)
    sof = SofLimiter(cfg)
    v = np.array([3.9, 3.9, 3.9, 4.0])
    lim = sof.targets(v, np.full(4, 25.0), np.full(4, 0.7))
    # pack may rise by 4 x (4.15 - 4.0) before the highest cell reaches 4.15
    assert lim.charge_voltage_v == pytest.approx(v.sum() + 4 * 0.15)
    assert lim.charge_voltage_v < 4 * cfg.cell_charge_v
    balanced = sof.targets(np.full(4, 3.7), np.full(4, 25.0), np.full(4, 0.5))
    assert balanced.charge_voltage_v == pytest.approx(4 * cfg.cell_charge_v)
    assert balanced.discharge_voltage_v == pytest.approx(4 * cfg.cell_discharge_v)
    low = sof.targets(np.array([3.2, 3.6, 3.6, 3.6]), np.full(4, 25.0), np.full(4, 0.3))
    assert low.discharge_voltage_v == pytest.approx(14.0 - 4 * (3.2 - cfg.cell_discharge_v))


def test_governor_reduces_at_once_recovers_late_and_ramped() -> None:
    g = Governor(delay_s=10.0, ramp_per_s=2.0)
    assert g.step(100.0, 1.0) == 100.0
    assert g.step(40.0, 1.0) == 40.0  # immediately
    for _ in range(9):
        assert g.step(100.0, 1.0) == 40.0  # waits
    assert g.step(100.0, 1.0) == 42.0  # then ramps 2 A/s
    assert g.step(100.0, 1.0) == 44.0
    assert g.step(30.0, 1.0) == 30.0  # a new reduction resets the wait
    assert g.step(100.0, 1.0) == 30.0
    floor = Governor(delay_s=0.0, ramp_per_s=1.0, lower_is_safer=False)
    floor.step(700.0, 1.0)
    assert floor.step(720.0, 1.0) == 720.0  # a higher floor is the safer direction
    assert floor.step(700.0, 1.0) == 719.0


def test_limits_do_not_flap_on_a_noisy_cell_voltage() -> None:
    sof = SofLimiter(sof_preset("NMC", 60.0, 16))
    rng = np.random.default_rng(1)
    out = []
    for _ in range(600):
        v = np.full(16, 3.7)
        v[0] = 4.10 + rng.normal(0.0, 0.004)  # sits in the taper, noisy
        out.append(sof.step(0.1, v, np.full(16, 25.0), np.full(16, 0.9)).charge_current_a)
    steps = np.diff(out)
    turns = np.sum(np.diff(np.sign(steps[np.abs(steps) > 1e-9])) != 0)
    targets = [sof.targets(np.r_[4.10 + rng.normal(0.0, 0.004), np.full(15, 3.7)], np.full(16, 25.0),
                           np.full(16, 0.9)).charge_current_a for _ in range(600)]
    raw = np.diff(targets)
    raw_turns = np.sum(np.diff(np.sign(raw[np.abs(raw) > 1e-9])) != 0)
    assert raw_turns > 200  # the raw target flaps
    assert turns <= 4  # the output: down steps, then at most a late slow ramp


# ------------------------------------------------------------------- balancing


def spread_v(mv: float, n: int = 28) -> np.ndarray:
    v = np.full(n, 3.60)
    v[5] += mv / 1000.0
    v[20] += 0.6 * mv / 1000.0
    return v


def test_balancing_starts_only_with_enough_spread_at_rest() -> None:
    cfg = BalanceConfig(cells_per_module=14, settle_s=60.0)
    b = Balancer(28, cfg)
    d = b.step(0.0, spread_v(150), 0.0, 25.0, False)
    assert d.status is BalanceStatus.IDLE and not d.bleed.any()
    b.request()
    d = b.step(1.0, spread_v(80), 0.0, 25.0, False)
    assert d.status is BalanceStatus.WAITING
    d = b.step(100.0, spread_v(80), 0.0, 25.0, False)
    assert d.status is BalanceStatus.WAITING and "spread" in d.reason
    d = b.step(101.0, spread_v(120), 50.0, 25.0, False)
    assert d.status is BalanceStatus.WAITING and "rest" in d.reason
    d = b.step(130.0, spread_v(120), 0.0, 25.0, False)
    assert d.status is BalanceStatus.WAITING  # not settled yet (60 s)
    d = b.step(200.0, spread_v(120), 0.0, 50.0, False)
    assert "temperature" in d.reason
    d = b.step(201.0, spread_v(120), 0.0, 25.0, True)
    assert "alarm" in d.reason and not d.bleed.any()
    d = b.step(202.0, spread_v(120), 0.0, 25.0, False)
    assert d.status is BalanceStatus.ACTIVE
    assert d.bleed[5] and d.bleed[20] and d.bleeding == 2 and d.spread_v == pytest.approx(0.12)


def test_balancing_pauses_stops_and_aborts() -> None:
    b = Balancer(28, BalanceConfig(settle_s=0.0, time_budget_s=100.0))
    b.request()
    assert b.step(0.0, spread_v(120), 0.0, 25.0, False).status is BalanceStatus.ACTIVE
    d = b.step(1.0, spread_v(120), 10.0, 25.0, False)
    assert d.status is BalanceStatus.PAUSED and not d.bleed.any()
    assert b.step(2.0, spread_v(60), 0.0, 25.0, False).status is BalanceStatus.ACTIVE  # resumes below start
    d = b.step(3.0, spread_v(25), 0.0, 25.0, False)
    assert d.status is BalanceStatus.DONE and not d.bleed.any()
    b.request()
    b.step(10.0, spread_v(120), 0.0, 25.0, False)
    assert b.step(11.0, spread_v(120), 0.0, 25.0, True).status is BalanceStatus.ABORTED
    b.request()
    b.step(20.0, spread_v(120), 0.0, 25.0, False)
    d = b.step(130.0, spread_v(120), 0.0, 25.0, False)
    assert d.status is BalanceStatus.TIMEOUT and "budget" in d.reason
    b.request()
    b.cancel()
    assert b.status is BalanceStatus.ABORTED


def test_balancing_request_with_its_own_budget_and_stop_spread() -> None:
    b = Balancer(28, BalanceConfig(settle_s=0.0, time_budget_s=100.0))
    b.request(stop_spread_v=0.050)
    b.step(0.0, spread_v(120), 0.0, 25.0, False)
    d = b.step(1.0, spread_v(45), 0.0, 25.0, False)  # above the configured 30 mV, below this run's 50
    assert d.status is BalanceStatus.DONE and "50 mV" in d.reason
    b.request(time_budget_s=10.0)
    b.step(2.0, spread_v(120), 0.0, 25.0, False)
    d = b.step(13.0, spread_v(120), 0.0, 25.0, False)
    assert d.status is BalanceStatus.TIMEOUT and "10 s" in d.reason
    b.request()  # the next run is back on the configured values
    b.step(20.0, spread_v(120), 0.0, 25.0, False)
    assert b.step(40.0, spread_v(120), 0.0, 25.0, False).status is BalanceStatus.ACTIVE
    with pytest.raises(ValueError, match="stop spread"):
        b.request(stop_spread_v=0.150)  # above the start spread: the run would end as it starts


def test_balancing_limits_bleeders_per_module_and_hysteresis() -> None:
    cfg = BalanceConfig(settle_s=0.0, max_per_module=2, cells_per_module=14)
    b = Balancer(28, cfg)
    v = np.full(28, 3.60)
    v[0:5] = [3.75, 3.70, 3.72, 3.65, 3.69]
    b.request()
    d = b.step(0.0, v, 0.0, 25.0, False)
    assert list(np.flatnonzero(d.bleed)) == [0, 2]  # the two highest of module 0
    b = Balancer(28, BalanceConfig(settle_s=0.0))
    b.request()
    assert b.step(0.0, v, 0.0, 25.0, False).bleed[0]
    v2 = v.copy()
    v2[0] = 3.607  # 7 mV above the lowest: inside the hysteresis, keeps bleeding
    d = b.step(1.0, v2, 0.0, 25.0, False)
    assert d.bleed[0]
    v2[0] = 3.604
    d = b.step(2.0, v2, 0.0, 25.0, False)
    assert not d.bleed[0]


def test_balancing_run_on_a_simple_pack_ends_done() -> None:
    """Bleeding lowers the bled cells (rest: voltage tracks charge) until spread < 30 mV."""
    b = Balancer(28, BalanceConfig(settle_s=0.0, auto=True, auto_interval_s=0.0))
    v = 3.6 + np.random.default_rng(2).uniform(0.0, 0.15, 28)
    statuses = []
    for k in range(5000):
        d = b.step(float(k), v, 0.0, 25.0, False)
        statuses.append(d.status)
        v = v - d.bleed * 5e-5  # 50 uV per second per bled cell
        if d.status is BalanceStatus.DONE:
            break
    assert statuses[0] is BalanceStatus.ACTIVE and statuses[-1] is BalanceStatus.DONE
    assert v.max() - v.min() < 0.03


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 0.2), st.floats(-50.0, 50.0), st.floats(0.0, 70.0), st.booleans()),
                min_size=1, max_size=40))
def test_balancing_never_bleeds_when_it_must_not(steps: list[tuple[float, float, float, bool]]) -> None:
    b = Balancer(28, BalanceConfig(settle_s=0.0, auto=True, auto_interval_s=0.0))
    for k, (spread, cur, temp, alarm) in enumerate(steps):
        d = b.step(float(k), spread_v(spread * 1000.0), cur, temp, alarm)
        if d.bleed.any():
            assert not alarm and abs(cur) <= 2.0 and temp <= 45.0 and not math.isnan(d.spread_v)
            assert d.status is BalanceStatus.ACTIVE
