"""EIS estimators against the simulated module's known truth: lin-KK, DRT, NNLS, ECM fit, SoT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.sim_eis import CellSpread, ImpedanceModel, add_noise, calibration_set, simulate_spectrum
from estimators.drt import drt
from estimators.eis import analyze_spectrum
from estimators.eis_fit import EcmParams, fit_ecm, parameter_uncertainty
from estimators.kk import lin_kk
from estimators.lsq import nnls
from estimators.sot import (
    SotCalibration,
    SotFeature,
    calibrate_sot,
    default_sot_candidates,
    estimate_temperature,
    sot_mismatch,
)
from estimators.spectrum import EisSpectrum, log_grid

F = log_grid(10_000.0, 0.01, 10)
PHYS = ImpedanceModel("NMC")
ECM = ImpedanceModel("NMC", "ecm")


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- lin-KK -----------------------------------------------------------------------------------

def test_kk_passes_good_spectra_and_flags_drifted_ones() -> None:
    rng = _rng(1)
    good = bad_t = bad_v = 0
    for _ in range(30):
        t, soc, spread = rng.uniform(0, 45), rng.uniform(0.2, 0.85), CellSpread.draw(rng)
        good += lin_kk(F, simulate_spectrum(PHYS, F, t, soc, spread=spread, rng=rng).z).valid
        drifted = simulate_spectrum(PHYS, F, t, soc, spread=spread, rng=rng, temperature_drift_c=6.0)
        bad_t += not lin_kk(F, drifted.z).valid
        dc = simulate_spectrum(PHYS, F, t, soc, spread=spread, rng=rng, voltage_drift_v_per_s=3e-5)
        bad_v += not lin_kk(F, dc.z).valid
    assert good == 30
    assert bad_t >= 28 and bad_v >= 28


def test_kk_residuals_show_where_a_drift_hits() -> None:
    rng = _rng(2)
    sp = simulate_spectrum(PHYS, F, 25.0, 0.5, rng=rng, voltage_drift_v_per_s=3e-5)
    kk = lin_kk(F, sp.z)
    res = np.hypot(kk.residual_re, kk.residual_im)
    assert not kk.valid and "low-frequency" in kk.reason
    assert res[-5:].mean() > 4 * res[:30].mean()  # the lowest frequencies, measured last


@settings(max_examples=60, deadline=None)
@given(top=st.floats(-1.0, 4.0), span=st.floats(0.0, 3.0), k=st.integers(1, 12), n=st.integers(5, 61))
def test_kk_never_passes_a_spectrum_of_too_few_frequencies(top: float, span: float, k: int, n: int) -> None:
    """A module stuck at one frequency, or a sweep over a sliver of a decade, repeated to any number
    of points: the KK fit matches anything there, so such a spectrum is never valid."""
    f = np.resize(10.0 ** np.linspace(top, top - span, k), n)
    kk = lin_kk(f, PHYS.impedance(f, 25.0, 0.5))
    if np.unique(np.round(np.log10(f), 3)).size < 5 or np.ptp(np.log10(f)) < 0.99:
        assert not kk.valid and "distinct frequencies" in kk.reason


def test_one_frequency_repeated_feeds_neither_sot_nor_fits(calibration: SotCalibration) -> None:
    f = np.full(61, 10_000.0)
    sp = EisSpectrum.from_impedance(f, add_noise(PHYS.impedance(f, 25.0, 0.5), _rng(15)), temperature_c=25.0, soc=0.5)
    a = analyze_spectrum(sp, calibration=calibration)
    assert not a.valid and a.sot is None and a.fit is None and a.drt is None
    assert a.kk.reason.startswith("1 distinct frequencies over 0.00 decades")


def test_kk_noise_free_spectrum_is_valid_with_small_residuals() -> None:
    kk = lin_kk(F, PHYS.impedance(F, 20.0, 0.6))
    # mu stops adding elements early, so even a perfect spectrum keeps residuals of a few 0.1 %
    assert kk.valid and kk.rms < 0.006 and kk.max_abs < 0.02 and 0 < kk.mu <= 0.85


# --- NNLS and DRT -----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(3, 30), n=st.integers(1, 12))
def test_nnls_meets_the_kkt_conditions(seed: int, m: int, n: int) -> None:
    rng = _rng(seed)
    a = rng.standard_normal((m, n))
    b = rng.standard_normal(m)
    x = nnls(a, b)
    g = a.T @ (a @ x - b)
    tol = 1e-8 * (1 + np.abs(a).sum() * (np.abs(b).sum() + 1))
    assert np.all(x >= 0)
    assert np.all(g >= -tol)  # no descent direction into the feasible set
    assert np.all(np.abs(g[x > 0]) <= tol)


def test_drt_is_non_negative_and_reproduces_the_spectrum() -> None:
    rng = _rng(3)
    for t in (5.0, 25.0, 40.0):
        sp = simulate_spectrum(PHYS, F, t, 0.5, rng=rng)
        d = drt(F, sp.z)
        assert np.all(d.r_ohm >= 0) and d.r0_ohm >= 0 and d.l_h >= 0
        assert d.rel_rms < 0.01
        # the sum of the relaxations plus R0 is the low-frequency real part (without the capacitance)
        truth = PHYS.parts(t, 0.5)
        assert d.r0_ohm == pytest.approx(truth["r0_ohm"], rel=0.1)
        assert d.l_h == pytest.approx(truth["l_h"], rel=0.1)


def test_drt_finds_the_arcs_of_an_rc_circuit() -> None:
    p = EcmParams(1e-3, (0.5e-3, 1.0e-3, 0.8e-3), (1e-4, 1e-2, 1.0), l_h=2e-8)
    d = drt(F, p.impedance(F), lam=1e-4)
    peaks = d.peaks(3)
    assert len(peaks) == 3
    for (tau, r), tt, rr in zip(peaks, p.tau_s, p.r_ohm, strict=True):
        assert tau == pytest.approx(tt, rel=0.3)
        assert r == pytest.approx(rr, rel=0.1)


# --- ECM fit ----------------------------------------------------------------------------------

def test_fit_recovers_the_ecm_truth_at_half_percent_noise() -> None:
    rng = _rng(4)
    worst = []
    for t, soc in ((0.0, 0.3), (15.0, 0.8), (25.0, 0.5), (35.0, 0.2), (45.0, 0.6)):
        spread = CellSpread.draw(rng)
        truth = ECM.ecm_params(t, soc, spread)
        sp = simulate_spectrum(ECM, F, t, soc, spread=spread, rng=rng)
        fit = fit_ecm(F, sp.z)
        err = np.abs(fit.params.vector() / truth.vector() - 1)
        worst.append(err.max())
        assert fit.rel_rms < 0.0065  # at the noise level: the model fits
        assert np.median(err) < 0.02
        assert fit.params.l_h == pytest.approx(truth.l_h, rel=0.05)
    assert max(worst) < 0.12  # a few percent; the worst is the weakest arc's C (Cramer-Rao bound ~ 3-6 %)


def test_fit_noise_free_is_exact_and_cloud_format() -> None:
    truth = ECM.ecm_params(20.0, 0.55)
    fit = fit_ecm(F, ECM.impedance(F, 20.0, 0.55))
    np.testing.assert_allclose(fit.params.vector(), truth.vector(), rtol=1e-4)
    cloud = fit.params.as_cloud()
    assert set(cloud) == {"R0", "R1", "R2", "R3", "R4", "C1", "C2", "C3", "C4", "L"}
    assert cloud["C2"] == pytest.approx(truth.tau_s[1] / truth.r_ohm[1], rel=1e-4)


@settings(max_examples=15, deadline=None)
@given(perm=st.permutations([0, 1, 2, 3]), seed=st.integers(0, 1000))
def test_labels_are_ordered_whatever_the_start(perm: list[int], seed: int) -> None:
    rng = _rng(seed)
    sp = simulate_spectrum(ECM, F, 20.0, 0.5, rng=rng)
    truth = ECM.ecm_params(20.0, 0.5)
    shuffled = EcmParams(truth.r0_ohm * 1.3, tuple(truth.r_ohm[i] for i in perm),
                         tuple(truth.tau_s[i] * 2.0 for i in perm), l_h=truth.l_h)
    fit = fit_ecm(F, sp.z, use_drt=False, initial=shuffled)
    taus = fit.params.tau_s
    assert list(taus) == sorted(taus)
    # each label sits on its own arc: the n-th fitted tau is the n-th true tau
    np.testing.assert_allclose(taus, truth.tau_s, rtol=0.15)


def test_cpe_fit_of_the_physical_model() -> None:
    rng = _rng(5)
    sp = simulate_spectrum(PHYS, F, 25.0, 0.5, rng=rng)
    rc = fit_ecm(F, sp.z)
    cpe = fit_ecm(F, sp.z, cpe=True)
    assert cpe.rel_rms < rc.rel_rms
    assert all(0.4 <= a <= 1.0 for a in cpe.params.alpha)
    assert "alpha1" in cpe.params.as_cloud()


# --- SoT --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibration() -> SotCalibration:
    spectra, ts, ss, groups = calibration_set("NMC", cells=4, seed=11)
    cands = [SotFeature("log_apex_freq", f, b, smooth=True) for f in (0.1, 0.2, 0.5) for b in (1.0, 1.5)]
    cands += default_sot_candidates(F, kinds=["phase"], smoothing=(False,), f_min_hz=5.0, f_max_hz=50.0)
    return calibrate_sot(spectra, ts, ss, chemistry="NMC", groups=groups, features=cands)


def test_sot_against_the_simulators_truth(calibration: SotCalibration) -> None:
    rng = _rng(6)
    err = []
    for _ in range(60):
        t, soc = rng.uniform(0, 45), rng.uniform(0.2, 0.9)
        sp = simulate_spectrum(PHYS, F, t, soc, spread=CellSpread.draw(rng), rng=rng)  # cells not calibrated on
        est = estimate_temperature(sp, calibration, soc=soc + rng.normal(0, 0.02))
        err.append(est.temperature_c - t)
    e = np.asarray(err)
    assert np.sqrt(np.mean(e**2)) < 1.0 and np.abs(e).max() < 2.0
    assert calibration.feature.kind == "log_apex_freq"  # the phase loses to cell-to-cell spread


def test_sot_is_compensated_for_soc(calibration: SotCalibration) -> None:
    z_lo = simulate_spectrum(PHYS, F, 20.0, 0.25, noise=0.0)
    z_hi = simulate_spectrum(PHYS, F, 20.0, 0.85, noise=0.0)
    x_lo = estimate_temperature(z_lo, calibration, soc=0.25)
    x_hi = estimate_temperature(z_hi, calibration, soc=0.85)
    assert abs(x_lo.feature_value - x_hi.feature_value) > 0.05  # the feature moves with SoC ...
    assert x_lo.temperature_c == pytest.approx(20.0, abs=0.5)  # ... the temperature does not
    assert x_hi.temperature_c == pytest.approx(20.0, abs=0.5)
    wrong = estimate_temperature(z_hi, calibration, soc=0.25)
    assert abs(wrong.temperature_c - 20.0) > abs(x_hi.temperature_c - 20.0)


def test_calibration_serialises(calibration: SotCalibration) -> None:
    again = SotCalibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    sp = simulate_spectrum(PHYS, F, 30.0, 0.4, noise=0.0)
    assert estimate_temperature(sp, again, 0.4).temperature_c == estimate_temperature(sp, calibration, 0.4).temperature_c


def test_mismatch_warns_both_ways() -> None:
    assert sot_mismatch(30.0, 29.0).kind == "ok"
    hot = sot_mismatch(40.0, 30.0, threshold_c=4.0)
    assert hot.warning and hot.kind == "sot_above_sensor" and hot.delta_c == 10.0
    cold = sot_mismatch(20.0, 30.0, threshold_c=4.0, sigma_c=1.0)
    assert cold.warning and cold.kind == "sot_below_sensor" and cold.threshold_c == 6.0
    assert not sot_mismatch(float("nan"), 30.0).warning


def test_analysis_keeps_invalid_spectra_out_of_sot_and_fits(calibration: SotCalibration) -> None:
    rng = _rng(7)
    good = simulate_spectrum(PHYS, F, 30.0, 0.5, rng=rng)
    good = EisSpectrum.from_impedance(F, good.z, temperature_c=22.0, soc=0.5)  # a sensor 8 degC too low
    a = analyze_spectrum(good, calibration=calibration)
    assert a.valid and a.fit is not None and a.drt is not None and a.sot is not None
    assert a.sot.temperature_c == pytest.approx(30.0, abs=2.0)
    assert a.mismatch is not None and a.mismatch.warning and a.mismatch.kind == "sot_above_sensor"
    bad = simulate_spectrum(PHYS, F, 30.0, 0.5, rng=rng, voltage_drift_v_per_s=5e-5)
    b = analyze_spectrum(bad, calibration=calibration)
    assert not b.valid and b.sot is None and b.fit is None and b.drt is None
    assert json.dumps(b.to_dict()) and json.dumps(a.to_dict())


def test_spectrum_record_round_trip() -> None:
    sp = simulate_spectrum(PHYS, F, 10.0, 0.3, rng=_rng(8))
    d = json.loads(json.dumps(sp.to_dict()))
    again = EisSpectrum.from_dict(d)
    np.testing.assert_array_equal(again.z, sp.z)
    assert np.allclose(d["phase_deg"], np.degrees(np.angle(sp.z)))
    assert sp.mean_temperature_c == pytest.approx(10.0) and again.target == sp.target


def test_parameter_uncertainty_matches_the_spread_of_fits() -> None:
    """The Cramer-Rao bound predicts the scatter of repeated fits of the same cell."""
    truth = ECM.ecm_params(25.0, 0.5)
    sd = parameter_uncertainty(truth, F, 0.005)
    assert sd.shape == (9,) and np.all(sd > 0) and np.all(sd < 0.1)
    rng = _rng(9)
    errs = np.asarray([np.log(fit_ecm(F, add_noise(truth.impedance(F), rng)).params.vector() / truth.vector())
                       for _ in range(40)])
    ratio = errs.std(axis=0) / sd
    assert np.all(ratio > 0.5) and np.all(ratio < 1.6)


def test_each_fit_reports_an_uncertainty_that_covers_its_error() -> None:
    """A fit's ``rel_sd`` is the Cramer-Rao bound of its own spectrum (from the residuals, not
    from the truth) and covers the error it makes: ~95 % of errors within 2 sigma."""
    rng = _rng(12)
    errs, sds, crbs = [], [], []
    for _ in range(40):
        t, soc, spread = rng.uniform(0.0, 45.0), rng.uniform(0.2, 0.9), CellSpread.draw(rng)
        truth = ECM.ecm_params(t, soc, spread)
        fit = fit_ecm(F, simulate_spectrum(ECM, F, t, soc, spread=spread, rng=rng).z)
        errs.append(np.abs(fit.params.vector() / truth.vector() - 1.0))
        sds.append(fit.rel_sd)
        crbs.append(parameter_uncertainty(truth, F, 0.005))
    e, s = np.asarray(errs), np.asarray(sds)
    np.testing.assert_allclose(np.median(s / np.asarray(crbs), axis=0), 1.0, atol=0.15)
    assert 0.9 <= float(np.mean(e <= 2.0 * s)) <= 0.99
    assert float(np.mean(e <= s)) < 0.8  # not inflated either


def test_uncertainty_is_in_the_record_and_follows_the_arc_labels() -> None:
    truth = ECM.ecm_params(20.0, 0.5)
    sp = simulate_spectrum(ECM, F, 20.0, 0.5, rng=_rng(13))
    # started from reversed arcs: the sd must be reordered with them
    rev = EcmParams(truth.r0_ohm, truth.r_ohm[::-1], truth.tau_s[::-1], l_h=truth.l_h)
    fit = fit_ecm(F, sp.z, use_drt=False, initial=rev)
    np.testing.assert_allclose(fit.rel_sd, parameter_uncertainty(fit.params, F, 0.005), rtol=0.25)
    d = fit.to_dict()["rel_sd"]
    assert set(d) == {"R0", "R1", "R2", "R3", "R4", "C1", "C2", "C3", "C4"}
    assert all(v is not None and 0.0 < v < 0.2 for v in d.values())
    cpe = fit_ecm(F, simulate_spectrum(PHYS, F, 25.0, 0.5, rng=_rng(14)).z, cpe=True)
    assert np.all(np.isfinite(cpe.rel_sd)) and cpe.rel_sd.shape == (9,)
