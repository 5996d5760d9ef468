"""SoS indicators (lithium plating, per-cell safety level) and passport counters."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimators.ecm import NMC
from estimators.passport import PassportConfig, PassportCounters
from estimators.sos import (
    PlatingConfig,
    PlatingDetector,
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
