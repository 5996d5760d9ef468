#!/usr/bin/env python3
"""Generate the PyBaMM reference cells the SoC estimator is scored against.

For each chemistry (NMC: Chen2020, LFP: Prada2013; SPMe, isothermal 25 degC) this
writes three small files to tests/data/:

* ``pulse_<chem>.npz``: a lab characterisation test (full -> about 5 % in 2-5 % steps,
  each with a 1C discharge pulse, a charge pulse, a C/2 step and a 1 h rest, then
  C/20 to the cut-off and a rest). ``estimators.identify`` fits the ECM from this,
  never from the scoring runs. Dense sampling near current changes, sparse in rests.
* ``ref_<chem>_day.npz``: a stationary-storage day at 1 s (night rest, morning load,
  PV charge under clouds, afternoon rest, evening load with EV-charger bursts, rest).
* ``ref_<chem>_dynamic.npz``: 4 h of random steps between -1.5C and +0.6C with rests.

True values only (no noise: the scorer adds the sensor model). Currents are stored
in mA and voltages in 0.1 mV, delta-encoded, so each file is tens of kB. The true
SoC is ``soc0 + cumulative charge / capacity`` where capacity is PyBaMM's own
(negative electrode capacity times its stoichiometry window between the OCV cut-offs),
the definition PyBaMM's ``initial_soc`` uses; the generator checks it against
PyBaMM's discharge-capacity variable.

Usage: ``.venv/bin/python scripts/make_reference.py [--out tests/data] [--only NMC]``.
PyBaMM is a development dependency only; nothing at run time imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
CHEMISTRIES = {"NMC": "Chen2020", "LFP": "Prada2013"}
DAY_S = 86400
DYNAMIC_S = 4 * 3600


def _pybamm() -> Any:
    try:
        import pybamm
    except ImportError:
        sys.exit("PyBaMM is not installed: .venv/bin/pip install pybamm (a dev/test dependency only)")
    return pybamm


# ------------------------------------------------------------------ profiles


def _pieces(rng: np.random.Generator, n: int, lo_s: float, hi_s: float, lo: float, hi: float) -> np.ndarray:
    """Piecewise-constant random levels in [lo, hi] with segment lengths in [lo_s, hi_s] s."""
    out = np.empty(n)
    k = 0
    while k < n:
        seg = int(rng.uniform(lo_s, hi_s))
        out[k:k + seg] = rng.uniform(lo, hi)
        k += seg
    return out


def _soc_guard(c_rate: np.ndarray, soc0: float, lo: float, hi: float, band: float = 0.04) -> np.ndarray:
    """Taper a C-rate request (> 0 charge) to zero as the nominal SoC nears [lo, hi]."""
    out = np.empty_like(c_rate)
    soc = soc0
    for k, c in enumerate(c_rate):
        if c > 0.0:
            c *= float(np.clip((hi - soc) / band, 0.0, 1.0))
        elif c < 0.0:
            c *= float(np.clip((soc - lo) / band, 0.0, 1.0))
        out[k] = c
        soc += c / 3600.0
    return out


def storage_day(seed: int, soc0: float) -> np.ndarray:
    """C-rate (> 0 charge) of a stationary-storage day at 1 s."""
    rng = np.random.default_rng(seed)
    t_h = np.arange(DAY_S) / 3600.0
    c = np.zeros(DAY_S)
    morning = (t_h >= 5.0) & (t_h < 7.0)
    c[morning] = -(0.12 + _pieces(rng, DAY_S, 60, 300, -0.05, 0.08)[morning])
    pv = (t_h >= 8.5) & (t_h < 16.0)
    bell = np.sin(np.pi * (t_h - 8.5) / 7.5) ** 2
    clouds = np.convolve(_pieces(rng, DAY_S, 300, 1200, 0.3, 1.0), np.ones(120) / 120, mode="same")
    c[pv] = (0.32 * bell * clouds)[pv]
    evening = (t_h >= 18.0) & (t_h < 22.5)
    c[evening] = -(0.2 + _pieces(rng, DAY_S, 60, 600, -0.08, 0.1)[evening])
    for start_h in (18.7, 20.9):  # EV fast-charger support bursts, 15 min at 0.8C
        burst = (t_h >= start_h) & (t_h < start_h + 0.25)
        c[burst] = -0.8
    return _soc_guard(c, soc0, 0.10, 0.95, band=0.05)


def dynamic(seed: int, soc0: float) -> np.ndarray:
    """C-rate (> 0 charge) of 4 h load-levelling next to EV fast chargers, at 1 s."""
    rng = np.random.default_rng(seed)
    c = np.zeros(DYNAMIC_S)
    k, soc = 0, soc0
    while k < DYNAMIC_S:
        seg = int(rng.uniform(10, 300))
        u = rng.uniform()
        if soc < 0.25:
            level = rng.uniform(0.1, 0.6)
        elif soc > 0.85:
            level = -rng.uniform(0.2, 1.5)
        elif u < 0.3:
            level = 0.0
        elif u < 0.65:
            level = -rng.uniform(0.2, 1.5)
        else:
            level = rng.uniform(0.1, 0.6)
        seg = min(seg, DYNAMIC_S - k)
        c[k:k + seg] = level
        soc += level * seg / 3600.0
        k += seg
    c[:60] = 0.0  # starts rested
    return _soc_guard(c, soc0, 0.12, 0.8)


# ------------------------------------------------------------------ PyBaMM runs


def _solver(pybamm: Any) -> Any:
    # The default tolerances (rtol 1e-4) let the charge integral drift by ~1e-3 Ah
    # over a day; 1e-8 keeps it within 1e-5 Ah at a few seconds per run.
    return pybamm.IDAKLUSolver(rtol=1e-8, atol=1e-8)


def true_capacity_ah(pybamm: Any, params: Any) -> float:
    """PyBaMM's capacity between SoC 0 and 1 (its ``initial_soc`` definition)."""
    x0, x100, _, _ = pybamm.lithium_ion.get_min_max_stoichiometries(params)
    q_neg = params.evaluate(pybamm.LithiumIonParameters().n.Q_init)
    return float(q_neg * (x100 - x0))


def run_profile(pybamm: Any, pset: str, current_a: np.ndarray, soc0: float) -> dict[str, Any]:
    """Solve SPMe for a current profile (> 0 charge) at 1 s; returns true series."""
    params = pybamm.ParameterValues(pset)
    t = np.arange(current_a.size, dtype=np.float64)
    params["Current function [A]"] = pybamm.Interpolant(t, -current_a, pybamm.t)
    sim = pybamm.Simulation(pybamm.lithium_ion.SPMe(), parameter_values=params, solver=_solver(pybamm))
    sol = sim.solve(t_eval=[0.0, t[-1]], t_interp=t, initial_soc=soc0)
    v = sol["Voltage [V]"].entries
    if v.size != t.size:
        raise RuntimeError(f"{pset}: the solve stopped early at {sol.t[-1]:.0f} s (a voltage cut-off?)")
    dc = sol["Discharge capacity [A.h]"].entries
    q = true_capacity_ah(pybamm, params)
    # Interpolant is linear between samples: the trapezoid integral is exact.
    charge_ah = np.concatenate(([0.0], np.cumsum(0.5 * (current_a[1:] + current_a[:-1])))) / 3600.0
    err = float(np.max(np.abs(charge_ah + dc)))
    if err > 1e-4 * q:
        raise RuntimeError(f"{pset}: coulomb count differs from PyBaMM's by {err:.2e} Ah")
    return {"t": t, "i": current_a, "v": v, "capacity_ah": q, "soc0": soc0, "dc_check_ah": err}


def run_pulse_test(pybamm: Any, pset: str) -> dict[str, Any]:
    """A lab characterisation test, sampled at 1 s (see module docstring)."""
    params = pybamm.ParameterValues(pset)
    v_min = params["Lower voltage cut-off [V]"]
    steps: list[str] = ["Rest for 30 minutes"]
    # Finer steps near the ends, where the OCV curve bends.
    step_pct = [2.0] * 5 + [5.0] * 15 + [2.5] * 2  # 100 % -> about 7 % (pulses take 3 %)
    for level, pct in enumerate(step_pct):
        steps += ["Discharge at 1C for 10 seconds", "Rest for 2 minutes"]
        if level > 0:  # no charge pulse on a full cell
            steps += ["Charge at 0.5C for 10 seconds", "Rest for 2 minutes"]
        steps += [f"Discharge at C/2 for {pct * 72:g} seconds", "Rest for 1 hour"]
    steps += [f"Discharge at C/20 until {v_min} V", "Rest for 2 hours"]
    exp = pybamm.Experiment(steps, period="1 second")
    sim = pybamm.Simulation(pybamm.lithium_ion.SPMe(), parameter_values=params, experiment=exp,
                            solver=_solver(pybamm))
    sol = sim.solve(initial_soc=1.0)
    t = sol["Time [s]"].entries
    i = -sol["Current [A]"].entries
    v = sol["Voltage [V]"].entries
    # Step boundaries appear twice: keep the later sample (just after the step).
    keep = np.concatenate((np.diff(t) > 1e-6, [True]))
    t, i, v = t[keep], i[keep], v[keep]
    return {"t": t, "i": i, "v": v, "capacity_ah": true_capacity_ah(pybamm, params)}


def thin(t: np.ndarray, i: np.ndarray, dense_s: float = 300.0, sparse_s: float = 60.0) -> np.ndarray:
    """Indices to keep: every sample within ``dense_s`` of a current change, else every ``sparse_s``."""
    change = np.flatnonzero(np.abs(np.diff(i)) > 1e-6) + 1
    last = np.full(t.size, -np.inf)
    last[change] = t[change]
    last = np.maximum.accumulate(last)
    dense = (t - last) <= dense_s
    sparse = np.concatenate(([True], np.floor(t[1:] / sparse_s) != np.floor(t[:-1] / sparse_s)))
    keep = dense | sparse
    keep[0] = keep[-1] = True
    return np.flatnonzero(keep)


# ------------------------------------------------------------------ storage


def _delta(x: np.ndarray, scale: float) -> np.ndarray:
    q = np.round(x * scale).astype(np.int64)
    return np.diff(q, prepend=0).astype(np.int32)


def save(path: Path, t: np.ndarray, i: np.ndarray, v: np.ndarray, meta: dict[str, Any]) -> None:
    np.savez_compressed(
        path,
        t_ms=_delta(t, 1000.0),
        i_ma=_delta(i, 1000.0),
        v_100uv=_delta(v, 10000.0),
        **{k: np.asarray(val) for k, val in meta.items()},
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data")
    ap.add_argument("--only", choices=sorted(CHEMISTRIES), action="append")
    args = ap.parse_args(argv)
    pybamm = _pybamm()
    args.out.mkdir(parents=True, exist_ok=True)
    for chem, pset in CHEMISTRIES.items():
        if args.only and chem not in args.only:
            continue
        tag = chem.lower()
        base = {"chemistry": chem, "parameter_set": pset, "model": "SPMe", "temperature_c": 25.0,
                "pybamm_version": pybamm.__version__}
        t0 = time.perf_counter()
        pulse = run_pulse_test(pybamm, pset)
        idx = thin(pulse["t"], pulse["i"])
        save(args.out / f"pulse_{tag}.npz", pulse["t"][idx], pulse["i"][idx], pulse["v"][idx],
             {**base, "capacity_ah": pulse["capacity_ah"]})
        print(f"{chem} pulse test: {pulse['t'][-1] / 3600:.1f} h, {idx.size} samples kept ({time.perf_counter() - t0:.1f} s)")
        q_nom = pybamm.ParameterValues(pset)["Nominal cell capacity [A.h]"]
        for name, soc0, c_rate, seed in (
            ("day", 0.5, storage_day, 11),
            ("dynamic", 0.7, dynamic, 12),
        ):
            t0 = time.perf_counter()
            current = np.round(c_rate(seed, soc0) * q_nom, 3)  # stored in mA: keep it exact
            ref = run_profile(pybamm, pset, current, soc0)
            save(args.out / f"ref_{tag}_{name}.npz", ref["t"], ref["i"], ref["v"],
                 {**base, "profile": name, "capacity_ah": ref["capacity_ah"], "soc0": soc0})
            soc = soc0 + np.cumsum(current) / 3600.0 / ref["capacity_ah"]
            print(f"{chem} {name}: SoC {soc.min():.3f}..{soc.max():.3f}, V {ref['v'].min():.3f}..{ref['v'].max():.3f}, "
                  f"capacity {ref['capacity_ah']:.4f} Ah, check {ref['dc_check_ah']:.1e} Ah ({time.perf_counter() - t0:.1f} s)")
    for f in sorted(args.out.glob("*.npz")):
        print(f"  {f.name}: {f.stat().st_size / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
