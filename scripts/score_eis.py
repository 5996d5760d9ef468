#!/usr/bin/env python3
"""Score the EIS estimators (estimators/kk.py, drt.py, eis_fit.py, sot.py) on simulated spectra,
against impedance.py and PyBaMM.

    .venv/bin/python scripts/score_eis.py --json

What it measures, all on 61-point spectra (10 kHz .. 10 mHz, 10 points per decade) with
0.5 % noise (each of Z_re, Z_im: Gaussian, sigma = 0.5 % of |Z|):

* SoT (``sot_*``): the calibration routine picks feature and frequency from spectra of 6
  calibration cells on a grid 0..45 degC x SoC 20..90 % (drivers/sim_eis.py, physical model);
  then SoT of 200 spectra of *other* cells (second-life spread) at random T in 0..45 degC and
  SoC in 20..90 %, given an SoC with 2 % (absolute) error as an EKF would supply it.
  ``sot_phase_*``: the same with the phase as the only allowed feature, for comparison.
* Fit (``fit_*``): 100 spectra of the simulator's ``ecm`` variant (L + R0 + 4 RC, whose exact
  parameters are known) at random T, SoC and cell; relative error of R0, R1..R4, C1..C4,
  max over parameters and spectra. ``fit_ms`` includes the DRT that gives the initial guess.
  ``fit_crb_max_rel_sd`` is the Cramer-Rao bound (1 sigma) of the worst parameter: the
  spread no unbiased fit can beat at this noise; ``fit_err_over_crb_rms`` ~ 1 means our errors
  are that noise floor; ``fit_optimal_rate`` is the share of fits whose cost is <= the cost of
  the true parameters (the fit found the least-squares minimum). Each fit also reports its
  own uncertainty (``EcmFit.rel_sd``, from its residuals, not the truth):
  ``fit_sd_coverage_2sd`` is the share of errors within twice it (~0.95 when honest),
  ``fit_resolved_5pct_share`` the share of parameters it puts within 5 % at 2 sigma.
* Baseline: impedance.py's CustomCircuit ``L0-R0-p(R1,C1)-...-p(R4,C4)`` fitting the same
  spectra (weighted by modulus) from a generic data-driven initial guess, as a user would;
  ``baseline_drt_init_*`` is the same optimiser started from our DRT's guess.
* KK (``kk_*``): time per spectrum, share of good spectra flagged, share of drifted ones
  flagged (temperature drift of 2 and 5 degC during the sweep, a DC voltage drift of 30 uV/s).
* PyBaMM (``sot_pybamm_*``): the whole SoT procedure again on spectra of PyBaMM's
  ``EISSimulation`` (DFN, "surface form": "differential", Marquis2019 parameters, whose
  electrolyte conductivity/diffusivity, exchange-current densities and solid diffusivities
  follow Arrhenius laws), with the same noise and SoC error: 4 calibration cells on a
  T x SoC grid, tested on other cells at random T and SoC; the cells differ in electrode
  area, lost active material and contact resistance.

Timing uses one BLAS thread (set below before numpy loads): these are small matrices, and a
multi-threaded BLAS only adds latency, more so on a busy machine; the daemon should do the same.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivers.sim_eis import CellSpread, ImpedanceModel, calibration_set, simulate_spectrum  # noqa: E402
from estimators.drt import drt  # noqa: E402
from estimators.eis_fit import EcmParams, fit_ecm, parameter_uncertainty  # noqa: E402
from estimators.kk import lin_kk  # noqa: E402
from estimators.sot import calibrate_sot, default_sot_candidates, estimate_temperature  # noqa: E402
from estimators.spectrum import EisSpectrum, log_grid  # noqa: E402

FREQ = log_grid(10_000.0, 0.01, 10)
NOISE = 0.005
T_RANGE = (0.0, 45.0)
SOC_RANGE = (0.2, 0.9)
SOC_INPUT_ERROR = 0.02


def _stats(err: np.ndarray) -> tuple[float, float]:
    return float(np.sqrt(np.mean(err**2))), float(np.abs(err).max())


def score_sot(n_test: int, seed: int) -> dict[str, Any]:
    spectra, ts, ss, groups = calibration_set("NMC", cells=6, noise=NOISE, frequency_hz=FREQ, seed=seed)
    t0 = time.perf_counter()
    cal = calibrate_sot(spectra, ts, ss, chemistry="NMC", groups=groups)
    cal_s = time.perf_counter() - t0
    cal_phase = calibrate_sot(spectra, ts, ss, chemistry="NMC", groups=groups,
                              features=default_sot_candidates(FREQ, kinds=["phase"]))
    model = ImpedanceModel("NMC")
    rng = np.random.default_rng(seed + 1)
    err, err_phase, ms = [], [], []
    for _ in range(n_test):
        t = rng.uniform(*T_RANGE)
        soc = rng.uniform(*SOC_RANGE)
        sp = simulate_spectrum(model, FREQ, t, soc, spread=CellSpread.draw(rng), noise=NOISE, rng=rng)
        soc_in = soc + rng.normal(0.0, SOC_INPUT_ERROR)
        t1 = time.perf_counter()
        est = estimate_temperature(sp, cal, soc=soc_in)
        ms.append((time.perf_counter() - t1) * 1e3)
        err.append(est.temperature_c - t)
        err_phase.append(estimate_temperature(sp, cal_phase, soc=soc_in).temperature_c - t)
    rmse, mx = _stats(np.asarray(err))
    prmse, pmx = _stats(np.asarray(err_phase))
    return {"sot_rmse_c": round(rmse, 3), "sot_max_c": round(mx, 3), "sot_feature": cal.feature.label(),
            "sot_cv_rmse_c": round(cal.cv_rmse_c, 3), "sot_ms": round(float(np.mean(ms)), 3),
            "sot_calibration_s": round(cal_s, 2), "sot_calibration_spectra": cal.n_samples, "sot_test_spectra": n_test,
            "sot_soc_input_error": SOC_INPUT_ERROR,
            "sot_phase_rmse_c": round(prmse, 3), "sot_phase_max_c": round(pmx, 3),
            "sot_phase_feature": cal_phase.feature.label()}


def _cost(p: EcmParams, sp: EisSpectrum) -> float:
    r = (p.impedance(sp.frequency_hz) - sp.z) / np.abs(sp.z)
    return float(np.sum(r.real**2 + r.imag**2))


def _impedance_py_fit(f: np.ndarray, z: np.ndarray, guess: EcmParams) -> EcmParams:
    from impedance.models.circuits import CustomCircuit

    init = [max(guess.l_h, 1e-12), guess.r0_ohm]
    for r, c in zip(guess.r_ohm, guess.c_f, strict=True):
        init += [r, c]
    circ = CustomCircuit("L0-R0-p(R1,C1)-p(R2,C2)-p(R3,C3)-p(R4,C4)", initial_guess=init)
    circ.fit(f, z, weight_by_modulus=True)
    p = circ.parameters_
    rs = tuple(float(p[2 + 2 * i]) for i in range(4))
    cs = tuple(float(p[3 + 2 * i]) for i in range(4))
    return EcmParams(float(p[1]), rs, tuple(r * c for r, c in zip(rs, cs, strict=True)), l_h=float(p[0]))


def _generic_guess(sp: EisSpectrum) -> EcmParams:
    """What a user would start impedance.py from: R0 from the high-frequency real part, the
    real-axis span shared by four arcs, time constants one per 1.5 decades over the range."""
    f, z = sp.frequency_hz, sp.z
    r0 = float(z.real[np.argmin(np.abs(z.imag))])
    span = float(z.real.max() - r0)
    taus = np.logspace(math.log10(1 / (2 * np.pi * f.max())) + 1, math.log10(1 / (2 * np.pi * f.min())) - 0.5, 4)
    return EcmParams(r0, tuple([max(span, 1e-6) / 4] * 4), tuple(taus.tolist()), l_h=1e-8)


def score_fit(n: int, seed: int, baseline: bool) -> dict[str, Any]:
    model = ImpedanceModel("NMC", "ecm")
    rng = np.random.default_rng(seed + 2)
    cases = []
    for _ in range(n):
        t, soc, spread = rng.uniform(*T_RANGE), rng.uniform(*SOC_RANGE), CellSpread.draw(rng)
        cases.append((model.ecm_params(t, soc, spread), simulate_spectrum(model, FREQ, t, soc, spread=spread,
                                                                          noise=NOISE, rng=rng)))
    errs, sds, ms, drt_ms, crb, opt = [], [], [], [], [], 0
    for truth, sp in cases:
        t0 = time.perf_counter()
        d = drt(sp.frequency_hz, sp.z)
        t1 = time.perf_counter()
        fit = fit_ecm(sp.frequency_hz, sp.z, drt_result=d)
        t2 = time.perf_counter()
        drt_ms.append((t1 - t0) * 1e3)
        ms.append((t2 - t0) * 1e3)
        errs.append(np.abs(fit.params.vector() / truth.vector() - 1.0))
        sds.append(fit.rel_sd)
        crb.append(parameter_uncertainty(truth, FREQ, NOISE))
        opt += _cost(fit.params, sp) <= _cost(truth, sp) * (1 + 1e-9)
    e = np.asarray(errs)
    c = np.asarray(crb)
    s = np.asarray(sds)
    out: dict[str, Any] = {
        "fit_max_rel_err": round(float(e.max()), 4), "fit_p95_rel_err": round(float(np.percentile(e, 95)), 4),
        "fit_median_rel_err": round(float(np.median(e)), 4), "fit_ms": round(float(np.mean(ms)), 2),
        "fit_ms_max": round(float(np.max(ms)), 2), "drt_ms": round(float(np.mean(drt_ms)), 2),
        "fit_crb_max_rel_sd": round(float(c.max()), 4), "fit_err_over_crb_rms": round(float(np.sqrt(np.mean((e / c) ** 2))), 3),
        "fit_optimal_rate": round(opt / n, 3), "fit_spectra": n,
        "fit_sd_coverage_2sd": round(float(np.mean(e <= 2.0 * s)), 3),
        "fit_resolved_5pct_share": round(float(np.mean(2.0 * s <= 0.05)), 3),
        "fit_worst_param": ["R0", "R1", "R2", "R3", "R4", "C1", "C2", "C3", "C4"][int(np.argmax(e.max(axis=0)))],
    }
    if not baseline:
        return out
    try:
        import impedance

        out["baseline"] = f"impedance.py {impedance.__version__}"
    except ImportError as exc:
        out["baseline_skipped"] = f"impedance.py not installed ({exc}); pip install 'impedance==1.7.1'"
        return out
    for key, start in (("baseline", "generic"), ("baseline_drt_init", "drt")):
        berr, bms, fails = [], [], 0
        for truth, sp in cases:
            guess = _generic_guess(sp) if start == "generic" else fit_ecm(sp.frequency_hz, sp.z, max_iter=0).params
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    p = _impedance_py_fit(sp.frequency_hz, sp.z, guess)
            except Exception:  # the baseline's own failures count as a total miss
                fails += 1
                berr.append(np.full(9, np.inf))
                bms.append((time.perf_counter() - t0) * 1e3)
                continue
            bms.append((time.perf_counter() - t0) * 1e3)
            berr.append(np.abs(p.vector() / truth.vector() - 1.0))
        be = np.asarray(berr)
        out[f"{key}_fit_ms"] = round(float(np.mean(bms)), 2)
        out[f"{key}_fit_max_rel_err"] = round(float(be.max()), 4) if np.isfinite(be).all() else "inf"
        out[f"{key}_fit_p95_rel_err"] = round(float(np.percentile(be, 95)), 4)
        out[f"{key}_fit_median_rel_err"] = round(float(np.median(be)), 4)
        out[f"{key}_failures"] = fails
    return out


def score_kk(n: int, seed: int) -> dict[str, Any]:
    model = ImpedanceModel("NMC")
    rng = np.random.default_rng(seed + 3)

    def draw(**kw: float) -> EisSpectrum:
        return simulate_spectrum(model, FREQ, rng.uniform(*T_RANGE), rng.uniform(0.2, 0.85),
                                 spread=CellSpread.draw(rng), noise=NOISE, rng=rng, **kw)

    ms, flagged = [], 0
    for _ in range(n):
        sp = draw()
        t0 = time.perf_counter()
        kk = lin_kk(sp.frequency_hz, sp.z)
        ms.append((time.perf_counter() - t0) * 1e3)
        flagged += not kk.valid
    out: dict[str, Any] = {"kk_ms": round(float(np.mean(ms)), 3), "kk_ms_max": round(float(np.max(ms)), 3),
                           "kk_false_flag_rate": round(flagged / n, 3)}
    for key, kw in (("kk_detect_tdrift_2c", {"temperature_drift_c": 2.0}),
                    ("kk_detect_tdrift_5c", {"temperature_drift_c": 5.0}),
                    ("kk_detect_vdrift_30uv_s", {"voltage_drift_v_per_s": 3e-5})):
        hits = sum(not lin_kk(s.frequency_hz, s.z).valid for s in (draw(**kw) for _ in range(n // 2)))
        out[key] = round(hits / (n // 2), 3)
    return out


def score_pybamm(seed: int, n_test: int, n_cells: int = 4) -> dict[str, Any]:
    """SoT on PyBaMM spectra of cells that differ like second-life cells do: electrode area
    (+-5 %), lost active material in both electrodes (5 +- 3 %) and contact resistance
    (0..1 mOhm); calibrated on ``n_cells`` cells, tested on ``n_test`` other cells."""
    try:
        import pybamm
    except ImportError as exc:
        return {"sot_pybamm_skipped": f"pybamm not installed ({exc})"}
    if not hasattr(pybamm, "EISSimulation"):
        return {"sot_pybamm_skipped": f"pybamm {pybamm.__version__} has no EISSimulation"}
    rng = np.random.default_rng(seed + 4)
    base = pybamm.ParameterValues("Marquis2019")

    def cell() -> dict[str, float]:
        lam = np.clip(rng.normal(0.05, 0.03, 2), 0.0, 0.15)
        return {"Electrode width [m]": base["Electrode width [m]"] * (1 + 0.05 * float(np.clip(rng.normal(), -3, 3))),
                "Negative electrode active material volume fraction":
                    base["Negative electrode active material volume fraction"] * (1 - float(lam[0])),
                "Positive electrode active material volume fraction":
                    base["Positive electrode active material volume fraction"] * (1 - float(lam[1])),
                "Contact resistance [Ohm]": float(rng.uniform(0.0, 1e-3))}

    def spectra(c: dict[str, float], soc: float, temps: list[float]) -> list[EisSpectrum]:
        model = pybamm.lithium_ion.DFN(options={"surface form": "differential", "contact resistance": "true"})
        pv = base.copy()
        pv.update(c, check_already_exists=False)
        pv.update({"Ambient temperature [K]": "[input]", "Initial temperature [K]": "[input]"})
        sim = pybamm.EISSimulation(model, parameter_values=pv)
        out = []
        for t_c in temps:
            tk = t_c + 273.15
            z = np.asarray(sim.solve(FREQ, inputs={"Ambient temperature [K]": tk, "Initial temperature [K]": tk},
                                     initial_soc=soc).impedance, dtype=np.complex128)
            zn = z + NOISE * np.abs(z) * (rng.standard_normal(z.size) + 1j * rng.standard_normal(z.size))
            out.append(EisSpectrum.from_impedance(FREQ, zn, temperature_c=t_c, soc=soc))
        return out

    t0 = time.perf_counter()
    try:
        cal_t: list[float] = []
        cal_s: list[float] = []
        cal_g: list[int] = []
        cal_sp: list[EisSpectrum] = []
        temps = [float(t) for t in np.arange(0.0, 45.1, 5.0)]
        for g in range(n_cells):
            c = cell()
            for s in (0.2, 0.35, 0.5, 0.65, 0.8, 0.9):
                cal_sp += spectra(c, s, temps)
                cal_t += temps
                cal_s += [s] * len(temps)
                cal_g += [g] * len(temps)
        cal = calibrate_sot(cal_sp, cal_t, cal_s, chemistry="Marquis2019", groups=cal_g)
        err = []
        for _ in range(n_test):
            t, s = rng.uniform(*T_RANGE), rng.uniform(*SOC_RANGE)
            sp = spectra(cell(), s, [t])[0]
            err.append(estimate_temperature(sp, cal, soc=s + rng.normal(0.0, SOC_INPUT_ERROR)).temperature_c - t)
    except Exception as exc:  # report, do not hide: the SoT numbers above stand on their own
        return {"sot_pybamm_skipped": f"PyBaMM EIS simulation failed: {type(exc).__name__}: {exc}"}
    rmse, mx = _stats(np.asarray(err))
    return {"sot_pybamm_rmse_c": round(rmse, 3), "sot_pybamm_max_c": round(mx, 3),
            "sot_pybamm_feature": cal.feature.label(), "sot_pybamm_cv_rmse_c": round(cal.cv_rmse_c, 3),
            "sot_pybamm_calibration_spectra": len(cal_sp), "sot_pybamm_test_spectra": n_test,
            "sot_pybamm_s": round(time.perf_counter() - t0, 1),
            "pybamm": f"{pybamm.__version__} DFN (surface form differential, contact resistance), Marquis2019"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="fewer spectra (a smoke test)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-pybamm", action="store_true")
    ap.add_argument("--seed", type=int, default=2024)
    a = ap.parse_args()
    q = a.quick
    res: dict[str, Any] = {}
    res.update(score_sot(60 if q else 200, a.seed))
    res.update(score_fit(20 if q else 100, a.seed, not a.no_baseline))
    res.update(score_kk(40 if q else 200, a.seed))
    if a.no_pybamm:
        res["sot_pybamm_skipped"] = "--no-pybamm"
    else:
        res.update(score_pybamm(a.seed, 10 if q else 30))
    res["points_per_spectrum"] = int(FREQ.size)
    res["noise"] = NOISE
    res["blas_threads"] = os.environ.get("OPENBLAS_NUM_THREADS")
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()
