"""SoS indicators (lithium plating, per-cell safety level) and passport counters."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimators.ecm import NMC
from estimators.passport import PassportConfig, PassportCounters
from estimators.sos import (
    PlatingConfig,
    PlatingDetector,
    PlatingResult,
    SafetyConfig,
    SafetyReason,
    plating_score,
    safety_levels,
    worst,
)

# --------------------------------------------------------------------- plating


def relaxation(t: np.ndarray, plated: bool) -> np.ndarray:
    """Post-charge rest voltage: two exponentials; with plating, a stripping plateau that
    ends around 15 min (a sigmoid drop of 25 mV)."""
    v = 4.0 + 0.03 * np.exp(-t / 30.0) + 0.02 * np.exp(-t / 600.0)
    if plated:
        v = v + 0.025 * (1.0 - 1.0 / (1.0 + np.exp(-(t - 900.0) / 120.0)))
    return v


def feed(det: PlatingDetector, plated: np.ndarray, seed: int = 0) -> object:
    rng = np.random.default_rng(seed)
    for _ in range(1800):  # 30 min charge at 20 A: 10 Ah
        assert det.step(1.0, 20.0, np.full(plated.size, 4.1)) is None
    t = np.arange(0.0, 3601.0)
    volts = np.stack([relaxation(t, bool(p)) for p in plated], axis=1)
    # 2 mV noise, 1 mV steps: a cell-voltage channel of the module electronics
    volts = np.round((volts + rng.normal(0.0, 0.002, volts.shape)) / 0.001) * 0.001
    result = None
    for k in range(t.size):
        result = det.step(1.0, 0.0, volts[k]) or result
    return result


def test_plating_detector_flags_only_the_plated_cells() -> None:
    plated = np.array([False, True, False, True, False, False])
    det = PlatingDetector(plated.size, PlatingConfig())
    res = feed(det, plated)
    assert res is not None and det.last is res
    assert res.charge_ah == pytest.approx(10.0)
    np.testing.assert_array_equal(res.flagged, plated)
    assert np.all(res.score_mv_per_min[plated] > 3 * res.score_mv_per_min[~plated].max())


def test_plating_needs_a_charge_before_the_rest() -> None:
    det = PlatingDetector(2)
    for _ in range(4000):
        assert det.step(1.0, 0.0, np.full(2, 3.7)) is None
    for _ in range(60):  # a tiny charge is not enough
        det.step(1.0, 2.0, np.full(2, 3.7))
    for _ in range(4000):
        assert det.step(1.0, 0.0, np.full(2, 3.7)) is None


def test_plating_score_of_a_plain_relaxation_is_small() -> None:
    t = np.arange(0.0, 3600.0)
    assert plating_score(t, relaxation(t, False))[0] == 0.0
    assert plating_score(t, relaxation(t, True))[0] > 0.3


def rest_after_charge(det: PlatingDetector, volts: np.ndarray, taper: Sequence[float] = (), dt: float = 5.0) -> object:
    """A 10 Ah charge at 20 A, the end of the charge (``taper``, A), then the rest ``volts`` (samples x cells),
    sampled every ``dt`` as the gateway's safety loop does; the last result."""
    n = volts.shape[1]
    for _ in range(int(1800 / dt)):
        det.step(dt, 20.0, np.full(n, 4.1))
    for current in taper:
        assert det.step(dt, current, np.full(n, 4.15)) is None
    result = None
    for row in volts:
        result = det.step(dt, 0.0, row) or result
    return result


def test_plating_is_analysed_after_a_charge_that_tapers_off() -> None:
    """A CV taper or a ramp-down through rest_current_a..charge_current_a continues the charge (E1)."""
    t = np.arange(0.0, 3601.0, 5.0)
    volts = np.stack([relaxation(t, True), relaxation(t, False)], axis=1)
    for taper in ([5.0, 2.0, 0.8], list(np.linspace(3.0, 0.6, 120))):
        res = rest_after_charge(PlatingDetector(2), volts, taper)
        assert isinstance(res, PlatingResult), taper
        assert res.flagged.tolist() == [True, False]
        assert res.charge_ah == pytest.approx(10.0 + sum(taper) * 5.0 / 3600.0)
    # a small charge with no charge before it starts nothing; a discharge still discards the charge
    det = PlatingDetector(2)
    for _ in range(720):
        assert det.step(5.0, 0.8, np.full(2, 4.0)) is None
    for row in volts:
        assert det.step(5.0, 0.0, row) is None
    assert rest_after_charge(PlatingDetector(2), volts, [3.0, 0.8, -2.0]) is None


def quantised_rest(n: int, noise_v: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Times, 1 mV voltages (every 8th cell plated) and the plated mask of one rest sampled every 5 s."""
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, 3601.0, 5.0)
    a1, a2 = rng.uniform(0.02, 0.04, n), rng.uniform(0.01, 0.03, n)
    plated = np.arange(n) % 8 == 0
    v = 4.0 + a1 * np.exp(-t[:, None] / 30.0) + a2 * np.exp(-t[:, None] / 600.0)
    v = v + np.where(plated, 0.025 * (1.0 - 1.0 / (1.0 + np.exp(-(t[:, None] - 900.0) / 120.0))), 0.0)
    return t, np.round((v + rng.normal(0.0, noise_v, v.shape)) / 0.001) * 0.001, plated


def test_quantised_quiet_voltages_are_not_read_as_plating() -> None:
    """With 1 mV steps and little noise the noise estimate is floored at the rounding's (E2)."""
    for noise in (0.0003, 0.002):
        t, v, plated = quantised_rest(112, noise)
        np.testing.assert_array_equal(plating_score(t, v) > 0.05, plated)
        res = rest_after_charge(PlatingDetector(112), v)
        assert isinstance(res, PlatingResult)
        np.testing.assert_array_equal(res.flagged, plated)
    assert PlatingConfig().quantum_v == 0.001  # the pack DBC's cell-voltage resolution
    with pytest.raises(ValueError):
        PlatingConfig(quantum_v=-0.001)


@pytest.mark.parametrize(("noise_mv", "seed"), [(0.4, 1), (0.4, 4), (0.5, 0), (0.5, 1)])
def test_rounded_voltages_with_a_little_noise_are_not_read_as_plating(noise_mv: float, seed: int) -> None:
    """A site's 224 unplated cells after one rest, 1 mV rounding: a median-based noise estimate
    flagged one of them in each of these draws."""
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, 3601.0, 5.0)
    a1, a2 = rng.uniform(0.02, 0.04, 224), rng.uniform(0.01, 0.03, 224)
    v = 4.0 + a1 * np.exp(-t[:, None] / 30.0) + a2 * np.exp(-t[:, None] / 600.0)
    v = np.round((v + rng.normal(0.0, noise_mv * 1e-3, v.shape)) / 1e-3) * 1e-3
    assert not (plating_score(t, v) > PlatingConfig().threshold_mv_per_min).any()


def test_invalid_samples_do_not_blind_a_cell_and_too_few_are_unknown() -> None:
    """One NaN sample is left out; a cell with too few valid samples scores NaN, which is missing data (E3)."""
    t = np.arange(0.0, 3601.0, 5.0)
    v = np.stack([relaxation(t, True)] * 3 + [relaxation(t, False)], axis=1)
    v[400, 1] = np.nan  # one invalid sample
    v[1:, 2] = np.nan  # the whole rest invalid but its first sample
    v[100, 3] = np.nan
    res = rest_after_charge(PlatingDetector(4), v)
    assert isinstance(res, PlatingResult)
    assert res.flagged.tolist() == [True, True, False, False]
    assert np.isfinite(res.score_mv_per_min[[0, 1, 3]]).all() and np.isnan(res.score_mv_per_min[2])
    assert res.score_mv_per_min[1] == pytest.approx(res.score_mv_per_min[0], rel=0.05)
    np.testing.assert_array_equal(res.plating, [1.0, 1.0, np.nan, 0.0])
    lvl, why = safety_levels(np.full(4, 3.7), np.full(4, 25.0), plating=res.plating)
    assert lvl.tolist() == [2, 2, 2, 0]
    assert why[2] == SafetyReason.DATA_MISSING and why[0] == why[1] == SafetyReason.PLATING and why[3] == 0


def test_plating_result_round_trips_through_plain_data() -> None:
    t = np.arange(0.0, 3601.0, 5.0)
    v = np.stack([relaxation(t, True), relaxation(t, False), np.full(t.size, np.nan)], axis=1)
    det = PlatingDetector(3)
    assert det.export_state() is None
    res = rest_after_charge(det, v)
    assert isinstance(res, PlatingResult)
    again = PlatingDetector(3)
    again.import_state(json.loads(json.dumps(det.export_state())))
    assert again.last is not None
    np.testing.assert_array_equal(again.last.score_mv_per_min, res.score_mv_per_min)
    np.testing.assert_array_equal(again.last.flagged, res.flagged)
    assert again.last.charge_ah == res.charge_ah and again.last.rest_s == res.rest_s
    with pytest.raises(ValueError):
        PlatingDetector(4).import_state(det.export_state())


def test_safety_levels_combine_the_inputs() -> None:
    cfg = SafetyConfig(v_max=4.2, v_min=3.0, t_max_c=55.0, t_min_c=-20.0)
    v = np.array([3.7, 4.16, 4.19, 4.25, 3.7, 3.7, 3.7, np.nan])
    t = np.array([25.0, 25.0, 25.0, 25.0, 48.0, 25.0, 25.0, 25.0])
    prot = np.array([0, 0, 0, 0, 0, 2, 0, 0])
    plating = np.array([0, 0, 0, 0, 0, 0, 1, 0], dtype=bool)
    lvl, why = safety_levels(v, t, prot, plating, config=cfg)
    assert list(lvl) == [0, 1, 2, 3, 1, 2, 2, 2]
    assert why[3] & SafetyReason.VOLTAGE_NEAR_LIMIT and why[5] & SafetyReason.PROTECTION
    assert why[6] & SafetyReason.PLATING and why[7] & SafetyReason.DATA_MISSING
    assert worst(lvl) == 3
    eis = np.array([25.0, np.nan, np.nan, np.nan, np.nan, np.nan, 36.0, 52.0])
    lvl2, why2 = safety_levels(v, t, eis_temp_c=eis, config=cfg)
    assert why2[6] & SafetyReason.EIS_SENSOR_MISMATCH and lvl2[6] == 2
    assert why2[7] & SafetyReason.EIS_TEMPERATURE and lvl2[7] >= 2
    assert lvl2[0] == 0


# -------------------------------------------------------------------- passport


def make(n: int = 4, **kw: float) -> PassportCounters:
    return PassportCounters(n, PassportConfig(rated_capacity_ah=50.0, deep_discharge_v=3.0, deep_release_v=3.3, **kw),
                            ocv=NMC.ocv)


def test_throughput_cycles_and_efficiency() -> None:
    p = make()
    for _ in range(3600):
        p.update(1.0, 25.0, 400.0, np.full(4, 3.9), np.full(4, 25.0))
    for _ in range(3600):
        p.update(1.0, -25.0, 380.0, np.full(4, 3.7), np.full(4, 25.0))
    assert p.charge_ah == pytest.approx(25.0) and p.discharge_ah == pytest.approx(25.0)
    assert p.energy_in_wh == pytest.approx(10_000.0) and p.energy_out_wh == pytest.approx(9_500.0)
    assert p.full_equivalent_cycles == pytest.approx(0.5)
    assert p.round_trip_efficiency == pytest.approx(0.95)
    assert p.observed_s == 7200.0
    assert p.charge_a_max == 25.0 and p.discharge_a_max == 25.0


def test_temperature_bins_and_charging_at_extremes() -> None:
    p = make()
    temps = np.array([-5.0, 20.0, 20.0, 50.0])
    for _ in range(100):
        p.update(1.0, 10.0, 400.0, np.full(4, 3.8), temps)
    for _ in range(50):
        p.update(1.0, -10.0, 400.0, np.full(4, 3.8), temps)
    assert p.charging_cold_s == 100.0 and p.charging_hot_s == 100.0
    edges = p.config.temp_edges_c
    assert p.time_by_max_temp_s[int(np.searchsorted(edges, 50.0, side="right"))] == 150.0
    assert p.time_by_min_temp_s[int(np.searchsorted(edges, -5.0, side="right"))] == 150.0
    assert p.time_by_max_temp_s.sum() == p.observed_s
    assert p.temp_min_c == -5.0 and p.temp_max_c == 50.0


def test_deep_discharge_events_latch_and_rearm() -> None:
    p = make()
    v = np.full(4, 3.6)
    for volts in (3.6, 2.9, 2.8, 3.1, 2.9, 3.4, 2.9):
        v[1] = volts
        p.update(1.0, -1.0, 400.0, v, np.full(4, 25.0))
    assert p.deep_discharge_events == 2  # 3.1 is below the release: still the same event
    assert p.cell_v_min == 2.8


def test_gaps_and_bad_samples_integrate_nothing() -> None:
    p = make()
    p.update(30.0, 10.0, 400.0, np.full(4, 3.7), np.full(4, 25.0))
    p.update(-1.0, 10.0, 400.0, np.full(4, 3.7), np.full(4, 25.0))
    p.update(float("nan"), 10.0, 400.0, np.full(4, 3.7), np.full(4, 25.0))
    p.update(1.0, float("nan"), 400.0, np.full(4, 3.7), np.full(4, 25.0))
    assert p.charge_ah == 0.0 and p.observed_s == 0.0 and p.gap_s == 31.0


def test_capacity_between_two_rested_ocv_points() -> None:
    p = make(n=3, rest_time_s=600.0)
    q = np.array([48.0, 50.0, 52.0])
    soc = np.full(3, 0.9)

    def run(seconds: int, current: float) -> None:
        nonlocal soc
        for _ in range(seconds):
            soc = soc + current / 3600.0 / q
            p.update(1.0, current, 400.0, NMC.ocv.ocv(soc), np.full(3, 25.0))

    run(700, 0.0)
    run(3600, -25.0)  # takes 25 Ah: about half of each cell
    run(700, 0.0)
    assert p.capacity_updates == 1
    np.testing.assert_allclose(p.capacity_ah, q, rtol=0.01)


@pytest.mark.parametrize("gap", ["long step", "invalid current", "invalid time step"])
def test_no_capacity_spans_a_gap_in_the_data(gap: str) -> None:
    """The Ah moved during a gap are not counted: the rest before it is no capacity anchor (E5)."""
    p = make(n=2)
    soc = 0.9

    def run(seconds: int, current: float) -> None:
        nonlocal soc
        for _ in range(seconds):
            soc += current / 3600.0 / 50.0
            p.update(1.0, current, 7.4, NMC.ocv.ocv(np.full(2, soc)), np.full(2, 25.0))

    run(1900, 0.0)
    run(900, -50.0)
    soc += -50.0 * 900 / 3600.0 / 50.0  # 12.5 Ah the gateway did not see
    dt, i = {"long step": (900.0, -50.0), "invalid current": (1.0, math.nan),
             "invalid time step": (math.nan, -50.0)}[gap]
    p.update(dt, i, 7.4, NMC.ocv.ocv(np.full(2, soc)), np.full(2, 25.0))
    run(1900, 0.0)
    assert p.capacity_updates == 0 and np.isnan(p.capacity_ah).all()
    run(1200, 50.0)  # the rest after the gap anchors the next estimate
    run(1900, 0.0)
    assert p.capacity_updates == 1
    np.testing.assert_allclose(p.capacity_ah, 50.0, rtol=0.02)


def test_resistance_from_current_steps() -> None:
    p = make(n=2, step_min_a=5.0, step_max_dt_s=0.2)
    r = np.array([1.0e-3, 2.0e-3])
    i_prev = 0.0
    for k in range(200):
        i = 20.0 if (k // 20) % 2 else 0.0
        p.update(0.1, i, 400.0, 3.7 + r * i, np.full(2, 25.0))
        i_prev = i
    assert i_prev in (0.0, 20.0)
    np.testing.assert_allclose(p.resistance_ohm, r, rtol=1e-6)
    assert p.resistance_updates >= 9
    q = make(n=2, step_min_a=5.0, step_max_dt_s=0.2)
    for k in range(200):  # the same steps seen at 1 s: too slow to be ohmic, ignored
        i = 20.0 if (k // 20) % 2 else 0.0
        q.update(1.0, i, 400.0, 3.7 + r * i, np.full(2, 25.0))
    assert q.resistance_updates == 0 and np.all(np.isnan(q.resistance_ohm))


def test_parallel_strings_share_the_pack_current() -> None:
    """Two strings in parallel: each cell carries half the pack current, the pack twice a cell's capacity."""
    p = make(n=2, strings=2, step_min_a=5.0, step_max_dt_s=0.2, rest_time_s=600.0)
    r = np.array([1.0e-3, 2.0e-3])
    for k in range(200):
        i = 40.0 if (k // 20) % 2 else 0.0  # 20 A per string
        p.update(0.1, i, 400.0, 3.7 + r * i / 2, np.full(2, 25.0))
    np.testing.assert_allclose(p.resistance_ohm, r, rtol=1e-6)
    q = make(n=1, strings=2, rest_time_s=600.0)
    soc = 0.9
    for current, seconds in ((0.0, 700), (-50.0, 3600), (0.0, 700)):  # 50 Ah out of the pack: 25 Ah per string
        for _ in range(seconds):
            soc += current / 2 / 3600.0 / 50.0
            q.update(1.0, current, 400.0, NMC.ocv.ocv(np.array([soc])), np.full(1, 25.0))
    assert q.full_equivalent_cycles == pytest.approx(50.0 / 100.0)
    np.testing.assert_allclose(q.capacity_ah, [50.0], rtol=0.01)


def test_per_sensor_temperatures_count_their_extremes() -> None:
    """Each cell's coldest and hottest sensor (NaN: unknown) are what the bins and extremes see."""
    p = make(n=2, rest_time_s=1.0)
    for _ in range(10):
        p.update(1.0, 10.0, 400.0, np.full(2, 3.8), np.array([[20.0, 56.0], [np.nan, np.nan]]))
    edges = p.config.temp_edges_c
    assert p.time_by_max_temp_s[int(np.searchsorted(edges, 56.0, side="right"))] == 10.0
    assert p.temp_max_c == 56.0 and p.temp_min_c == 20.0 and p.charging_hot_s == 10.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rest with every temperature unknown: the capacity point reads 25 degC
        for _ in range(5):
            p.update(1.0, 0.0, 400.0, np.full(2, 3.8), np.full((2, 2), np.nan))


def test_state_round_trip_and_validation() -> None:
    p = make()
    for k in range(100):
        p.update(1.0, 10.0 if k % 3 else -5.0, 400.0, np.full(4, 3.7 + 0.001 * k), np.full(4, 20.0 + 0.1 * k))
    state = json.loads(json.dumps(p.export_state()))
    q = make()
    q.import_state(state)
    assert q.summary() == p.summary()
    np.testing.assert_array_equal(q.time_by_max_temp_s, p.time_by_max_temp_s)
    empty = json.loads(json.dumps(make().export_state()))
    r = make()
    r.import_state(empty)
    assert math.isinf(r.cell_v_min)
    bad = dict(state, charge_ah=-1.0)
    with pytest.raises(ValueError):
        q.import_state(bad)
    with pytest.raises(ValueError):
        q.import_state(dict(state, n_cells=5))
    with pytest.raises(ValueError):
        q.import_state({k: v for k, v in state.items() if k != "energy_in_wh"})
    assert q.charge_ah == p.charge_ah  # unchanged by the refused imports


COUNTERS = ("charge_ah", "discharge_ah", "energy_in_wh", "energy_out_wh", "observed_s", "gap_s",
            "charging_cold_s", "charging_hot_s", "deep_discharge_events")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.floats(-5.0, 40.0), st.just(math.nan)),
                          st.one_of(st.floats(-200.0, 200.0), st.just(math.nan)),
                          st.one_of(st.floats(2.0, 4.5), st.just(math.nan)),
                          st.one_of(st.floats(-40.0, 80.0), st.just(math.nan))),
                min_size=1, max_size=60))
def test_counters_never_decrease(samples: list[tuple[float, float, float, float]]) -> None:
    p = make()
    before = {k: 0.0 for k in COUNTERS}
    for dt, cur, volt, temp in samples:
        p.update(dt, cur, 400.0, np.full(4, volt), np.full(4, temp))
        now = {k: float(getattr(p, k)) for k in COUNTERS}
        for k in COUNTERS:
            assert now[k] >= before[k] and math.isfinite(now[k])
        before = now
