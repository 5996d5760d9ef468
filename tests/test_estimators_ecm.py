"""ECM building blocks: OCV curves, presets, per-cell parameters, identification."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimators.ecm import LFP, NMC, CellType, EcmParams, OcvCurve, arrhenius, diffusion_modes, get_cell_type
from estimators.identify import find_rests, fit_ecm_window, identify_cell, rc_responses, rest_asymptote, surface_excess


@pytest.mark.parametrize("cell", [NMC, LFP])
@settings(max_examples=60, deadline=None)
@given(soc=st.floats(0.0, 1.0), temp=st.floats(-20.0, 55.0))
def test_ocv_inverse_round_trips(cell: CellType, soc: float, temp: float) -> None:
    v = cell.ocv.ocv(soc, temp)
    assert cell.ocv.soc_at(v, temp) == pytest.approx(soc, abs=2e-3)


def test_ocv_curve_shape_and_extension() -> None:
    ocv = NMC.ocv
    grid = np.linspace(0.0, 1.0, 501)
    assert np.all(np.diff(ocv.ocv(grid)) > 0.0)
    assert ocv.v_empty == pytest.approx(3.0) and ocv.v_full == pytest.approx(4.2)
    # beyond the table the curve continues with the end slopes (informative for the filter)
    assert ocv.ocv(1.02) > ocv.ocv(1.0) and ocv.ocv(-0.02) < ocv.ocv(0.0)
    assert np.all(ocv.slope(grid) > 0.0)
    # entropic term: NMC loses 0.3 mV/K
    assert ocv.ocv(0.5, 35.0) - ocv.ocv(0.5, 25.0) == pytest.approx(-3e-3)
    # energy integral of a linear curve is exact
    lin = OcvCurve((0.0, 1.0), (3.0, 4.0))
    assert lin.energy_v(1.0) == pytest.approx(3.5)
    assert lin.energy_v(0.5) == pytest.approx(0.5 * 3.25)


def test_ocv_per_point_entropic_and_dict_round_trip() -> None:
    ocv = OcvCurve((0.0, 0.5, 1.0), (3.0, 3.6, 4.1), (0.0, -1e-3, 0.0))
    assert ocv.ocv(0.5, 35.0) == pytest.approx(3.59)
    assert ocv.soc_at(3.59, 35.0) == pytest.approx(0.5, abs=1e-3)
    back = OcvCurve.from_dict(json.loads(json.dumps(ocv.to_dict())))
    assert back == ocv


@pytest.mark.parametrize(
    "soc,ocv",
    [((0.0, 1.0), (3.0,)), ((0.0, 0.5, 0.4), (3.0, 3.5, 3.6)), ((0.0, 0.5, 1.0), (3.0, 3.5, 3.5)),
     ((0.0, 1.0), (3.0, float("nan")))],
)
def test_ocv_curve_rejects_bad_tables(soc: tuple[float, ...], ocv: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        OcvCurve(soc, ocv)


def test_temperature_and_soc_factors() -> None:
    assert arrhenius(25.0, 30_000.0) == pytest.approx(1.0)
    assert arrhenius(0.0, 30_000.0) > 2.0 > 1.0 > arrhenius(45.0, 30_000.0)
    f0, frc = NMC.soc_factors(np.array([0.0, 0.5]))
    assert f0[0] > f0[1] == pytest.approx(1.0) and frc[0] > 1.0
    assert get_cell_type("lfp") is LFP and get_cell_type(NMC) is NMC
    with pytest.raises(ValueError, match="unknown chemistry"):
        get_cell_type("NCA")


def test_ecm_params_shapes_validation_and_resize() -> None:
    p = EcmParams.uniform(NMC, 224)
    assert (p.n_cells, p.n_rc) == (224, 2)
    assert p.tau_s[0] == pytest.approx(NMC.tau_s)
    p4 = p.with_n_rc(4)
    assert p4.n_rc == 4 and np.all(p4.r_ohm[:, 2:] == 0.0) and np.all(p4.r_ohm[:, :2] == p.r_ohm)
    assert EcmParams.from_dict(json.loads(json.dumps(p4.to_dict()))).n_rc == 4
    assert EcmParams.uniform(NMC, 3, n_rc=1).n_rc == 1
    with pytest.raises(ValueError):
        EcmParams(np.array([1e-3, -1e-3]), np.ones((2, 1)) * 1e-3, np.ones((2, 1)), np.ones(2))
    with pytest.raises(ValueError):
        EcmParams(np.array([1e-3]), np.ones((1, 5)) * 1e-3, np.ones((1, 5)), np.ones(1))
    with pytest.raises(ValueError):
        EcmParams.uniform(NMC, 3, n_rc=5)


def test_diffusion_modes() -> None:
    assert diffusion_modes(0.0)[0].size == 0
    tau, lag = diffusion_modes(3000.0)
    # the slowest mode of a sphere: tau_d / 4.4934^2; the lags add up to the
    # constant-current surface excess tau_d / 15, and each mode's lag is 2/3 of its tau
    assert tau[0] == pytest.approx(3000.0 / 4.4934**2, rel=1e-4)
    assert lag.sum() == pytest.approx(200.0) and lag[:3] == pytest.approx(2.0 / 3.0 * tau[:3])
    assert np.all(np.diff(tau) < 0.0)
    # a held current: the excess settles at lag * SoC rate, and relaxes back to 0 at rest
    t = np.arange(0.0, 30000.0, 5.0)
    d = surface_excess(t, np.where(t < 15000.0, 10.0, 0.0), 10.0, 3000.0)
    assert d[2999] == pytest.approx(200.0 * 10.0 / 36000.0, rel=1e-3)
    assert abs(d[-1]) < 1e-5
    with pytest.raises(ValueError, match="diffusion"):
        CellType("x", NMC.ocv, 10.0, 1e-3, (1e-3,), (10.0,), 3.0, 4.2, diffusion_tau_s=-1.0)


# ---------------------------------------------------------------- identification


def _simulate_ecm(t: np.ndarray, i: np.ndarray, ocv: OcvCurve, q_ah: float, soc0: float, r0: float,
                  r: tuple[float, ...], tau: tuple[float, ...], tau_d: float = 0.0) -> np.ndarray:
    """Exact ECM response to a current held at i[j-1] over (t[j-1], t[j]]; with
    ``tau_d`` > 0 the OCV is taken at the surface SoC."""
    resp = rc_responses(t, i, np.array(tau))
    soc = soc0 + np.concatenate(([0.0], np.cumsum(i[:-1] * np.diff(t)))) / 3600.0 / q_ah
    return np.asarray(ocv.ocv(soc + surface_excess(t, i, q_ah, tau_d)) + r0 * i + resp @ np.array(r))


def _pulse_test(step_pct: float = 10.0, rest_s: float = 3600.0) -> tuple[np.ndarray, np.ndarray]:
    t_parts, i_parts = [np.arange(0.0, 1800.0)], [np.zeros(1800)]
    t0 = 1800.0
    q = 10.0

    def seg(dur: float, cur: float) -> None:
        nonlocal t0
        t_parts.append(t0 + np.arange(dur))
        i_parts.append(np.full(int(dur), cur))
        t0 += dur

    for _ in range(int(90 / step_pct)):
        seg(10, -q)
        seg(120, 0.0)
        seg(step_pct / 100 * 3600 * 2, -q / 2)
        seg(rest_s, 0.0)
    seg(0.08 * 3600 * 20, -q / 20)  # the rest to "empty" at C/20
    seg(7200, 0.0)
    t, i = np.concatenate(t_parts), np.concatenate(i_parts)
    # Like a cycler log: dense near current changes, every 30 s otherwise.
    change = np.flatnonzero(np.diff(i) != 0.0) + 1
    near = np.zeros(t.size, dtype=bool)
    for k in change:
        near[max(0, k - 1):k + 300] = True
    keep = near | (t % 30.0 == 0.0)
    keep[-1] = True
    return t[keep], i[keep]


def test_rc_responses_match_analytic_step() -> None:
    t = np.arange(0.0, 200.0, 0.5)
    i = np.where(t < 50.0, 2.0, 0.0)
    resp = rc_responses(t, i, np.array([10.0]))[:, 0]
    # charging: 2 (1 - exp(-t/10)) up to t=50, then decay
    k = 40
    assert resp[k] == pytest.approx(2.0 * (1 - np.exp(-t[k] / 10.0)), rel=1e-9)
    top = 2.0 * (1 - np.exp(-50.0 / 10.0))
    assert resp[200] == pytest.approx(top * np.exp(-(t[200] - 50.0) / 10.0), rel=1e-9)


def test_fit_ecm_window_recovers_known_parameters() -> None:
    ocv = OcvCurve((0.0, 1.0), (3.4, 4.1))
    t = np.arange(0.0, 4000.0)
    i = np.where((t >= 100) & (t < 460), -5.0, 0.0)
    v = _simulate_ecm(t, i, ocv, 10.0, 0.6, 2e-3, (1.5e-3, 2.5e-3), (15.0, 400.0))
    ocv_end, r0, r, tau, rms, _ = fit_ecm_window(t, i, v, 2, grid=24)
    assert r0 == pytest.approx(2e-3, rel=0.05)
    assert sum(r) == pytest.approx(4e-3, rel=0.1)
    assert tau[0] == pytest.approx(15.0, rel=0.3) and tau[1] == pytest.approx(400.0, rel=0.3)
    assert ocv_end == pytest.approx(float(ocv.ocv(0.6 - 0.5 / 10.0)), abs=1e-3)
    assert rms < 1e-3


def test_identify_cell_from_synthetic_pulse_test() -> None:
    t, i = _pulse_test()
    truth_ocv = NMC.ocv
    v = _simulate_ecm(t, i, truth_ocv, 10.0, 1.0, 2e-3, (1e-3, 2e-3), (20.0, 300.0))
    rng = np.random.default_rng(3)
    v_meas = np.round((v + rng.normal(0.0, 1e-3, v.size)) / 1e-4) * 1e-4
    ident = identify_cell(t, i, v_meas, n_rc=2)
    taken = -np.sum(i[:-1] * np.diff(t)) / 3600.0  # the test defines 100 % -> 0 %
    assert ident.capacity_ah == pytest.approx(taken, rel=1e-6)
    assert ident.r0_ohm == pytest.approx(2e-3, rel=0.1)
    assert sum(ident.r_ohm) == pytest.approx(3e-3, rel=0.25)
    mid = np.linspace(0.2, 0.8, 13)
    # The test's "empty" is where it ended: map the identified SoC scale to the true one.
    soc_true = 1.0 - (1.0 - mid) * ident.capacity_ah / 10.0
    assert np.max(np.abs(ident.ocv.ocv(mid) - truth_ocv.ocv(soc_true))) < 0.005
    cell = ident.cell_type("test", 3.0, 4.2)
    assert cell.n_rc == 2 and cell.capacity_ah == ident.capacity_ah
    assert ident.diffusion_tau_s < 500.0  # a plain ECM cell shows no diffusion


def test_identify_cell_finds_the_diffusion_time() -> None:
    t, i = _pulse_test(step_pct=5.0)
    v = _simulate_ecm(t, i, NMC.ocv, 10.0, 1.0, 2e-3, (1e-3, 2e-3), (20.0, 300.0), tau_d=6000.0)
    rng = np.random.default_rng(3)
    v_meas = np.round((v + rng.normal(0.0, 1e-3, v.size)) / 1e-4) * 1e-4
    ident = identify_cell(t, i, v_meas, n_rc=2)
    assert ident.diffusion_tau_s == pytest.approx(6000.0, rel=0.2)
    assert ident.r0_ohm == pytest.approx(2e-3, rel=0.1)
    assert ident.cell_type("test", 3.0, 4.2).diffusion_tau_s == ident.diffusion_tau_s
    fixed = identify_cell(t, i, v_meas, n_rc=2, diffusion_tau_s=0.0)
    assert fixed.diffusion_tau_s == 0.0


def test_find_rests_and_rest_asymptote() -> None:
    t = np.arange(0.0, 5000.0)
    i = np.where((t > 1000) & (t < 1200), 1.0, 0.0)
    assert find_rests(t, i, 600.0) == [(0, 1000), (1200, 4999)]
    v = 3.7 + 0.02 * np.exp(-t / 50.0) + 0.01 * np.exp(-t / 800.0)
    assert rest_asymptote(t, v) == pytest.approx(3.7, abs=5e-4)


def test_identify_rejects_bad_input() -> None:
    t = np.arange(100.0)
    with pytest.raises(ValueError):
        identify_cell(t, np.zeros(100), np.full(100, 3.7))  # nothing taken out
    with pytest.raises(ValueError):
        identify_cell(t[::-1], -np.ones(100), np.full(100, 3.7))
