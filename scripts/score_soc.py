#!/usr/bin/env python3
"""Score the per-cell SoC estimator against the cached PyBaMM reference cells.

For NMC (Chen2020) and LFP (Prada2013), both SPMe at 25 degC (tests/data/, made by
scripts/make_reference.py):

1. identify the ECM (capacity, OCV curve, R0 + 2 RC, resistance shape over SoC, and
   the solid-diffusion time that moves the OCV to the particle surface SoC) from the
   separate pulse test, logged as a lab cycler would (1 mV noise), with
   ``estimators.identify`` (never from the scoring runs);
2. replay each profile (storage day, dynamic) through a 224-cell filter: every
   "cell" is the reference cell seen through its own voltage channel (5 mV noise,
   1 mV ADC step), all sharing one current sensor (0.5 % gain noise, 50 mA offset);
3. report, per chemistry, the worst profile's figures:

   * ``rmse_pct``: RMS SoC error over all cells and samples, started from the OCV
     of the first (rested) sample as the gateway does at start-up;
   * ``max_pct``: largest absolute error after the first 30 min;
   * ``convergence_min``: from a 30 % initial SoC error (half the cells +30 %, half
     -30 %, clipped to [0, 1]) with the default wide covariance, the time until every
     cell is within 2 % and stays there for at least 10 min;
   * ``us_per_cell_step``: filter wall time per cell and step (224 cells);

   and the same for plain coulomb counting (same start, same capacity) as baseline.

``--json`` prints one JSON object; ``--cells`` and ``--profiles`` shrink the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from estimators.ecm import CellType, EcmParams  # noqa: E402
from estimators.identify import IdentifiedCell, identify_cell  # noqa: E402
from estimators.soc_ekf import EkfConfig, SocEkf  # noqa: E402

DATA = REPO / "tests" / "data"
CHEMISTRIES = ("NMC", "LFP")
PROFILES = ("day", "dynamic")
# Operating window per chemistry (the PyBaMM parameter sets' cut-offs).
V_WINDOW = {"NMC": (2.5, 4.2), "LFP": (2.0, 3.6)}


@dataclass(frozen=True)
class Sensors:
    """The measurement model of the scoring runs."""

    voltage_noise_v: float = 0.005
    voltage_step_v: float = 0.001
    current_gain_noise: float = 0.005
    current_offset_a: float = 0.050


@dataclass
class Reference:
    """One cached reference run: 1 s samples of true current (> 0 charge) and voltage."""

    name: str
    t: np.ndarray
    i: np.ndarray
    v: np.ndarray
    capacity_ah: float
    soc0: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def soc(self) -> np.ndarray:
        """True SoC: PyBaMM's current is linear between samples, so trapezoids are exact."""
        ah = np.concatenate(([0.0], np.cumsum(0.5 * (self.i[1:] + self.i[:-1]) * np.diff(self.t)))) / 3600.0
        return np.asarray(self.soc0 + ah / self.capacity_ah)


def load(path: Path) -> Reference:
    """Decode a file written by scripts/make_reference.py."""
    with np.load(path) as z:
        t = np.cumsum(z["t_ms"].astype(np.int64)) / 1000.0
        i = np.cumsum(z["i_ma"].astype(np.int64)) / 1000.0
        v = np.cumsum(z["v_100uv"].astype(np.int64)) / 10000.0
        meta = {k: z[k].item() for k in z.files if k not in ("t_ms", "i_ma", "v_100uv")}
    return Reference(path.stem, t, i, v, float(meta.get("capacity_ah", np.nan)), float(meta.get("soc0", np.nan)), meta)


def identify(chem: str, data: Path = DATA) -> tuple[CellType, IdentifiedCell]:
    """The chemistry's cell type identified from its cached pulse test."""
    pulse = load(data / f"pulse_{chem.lower()}.npz")
    # A lab cycler's log: 1 mV voltage noise, 0.1 mV steps (the current is exact).
    rng = np.random.default_rng(7)
    v = np.round((pulse.v + 0.001 * rng.standard_normal(pulse.v.size)) / 1e-4) * 1e-4
    ident = identify_cell(pulse.t, pulse.i, v, n_rc=2)
    v_min, v_max = V_WINDOW[chem]
    return ident.cell_type(f"{chem} (identified)", v_min, v_max), ident


def ekf_config(chem: str) -> EkfConfig:
    """Tuning per chemistry: LFP's flat OCV needs longer rests before re-calibration."""
    if chem == "LFP":
        return EkfConfig(rest_current_a=0.1, rest_time_s=3600.0, voltage_noise_v=0.012)
    return EkfConfig(rest_current_a=0.1)


def measure(ref: Reference, n_cells: int, sensors: Sensors, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy current (shared sensor) and per-cell voltages (n_samples, n_cells)."""
    rng = np.random.default_rng(seed)
    i_meas = ref.i * (1.0 + sensors.current_gain_noise * rng.standard_normal(ref.i.size)) + sensors.current_offset_a
    v = ref.v[:, None] + sensors.voltage_noise_v * rng.standard_normal((ref.v.size, n_cells))
    v_meas = np.round(v / sensors.voltage_step_v) * sensors.voltage_step_v
    return i_meas, v_meas


class CoulombCounter:
    """Baseline: plain coulomb counting of the measured current (vectorised like the EKF)."""

    def __init__(self, capacity_ah: np.ndarray, soc0: np.ndarray) -> None:
        self.capacity_ah = capacity_ah
        self.soc = np.asarray(soc0, dtype=np.float64).copy()
        self._i_prev = float("nan")

    def step(self, dt_s: float, current_a: float, voltage_v: np.ndarray) -> None:
        i_mean = current_a if np.isnan(self._i_prev) else 0.5 * (self._i_prev + current_a)
        self._i_prev = current_a
        self.soc += dt_s * i_mean / (3600.0 * self.capacity_ah)


def run(ref: Reference, make: Callable[[np.ndarray], Any], n_cells: int, sensors: Sensors, seed: int,
        every: int = 1) -> tuple[np.ndarray, float]:
    """Replay ``ref`` through the estimator ``make(first_voltages)``; per-sample SoC
    errors in % (n_samples, n_cells) and wall seconds spent in ``step``."""
    i_meas, v_meas = measure(ref, n_cells, sensors, seed)
    est = make(v_meas[0])
    truth = ref.soc
    err = np.empty((ref.t.size, n_cells))
    err[0] = 100.0 * (np.clip(est.soc, 0.0, 1.0) - truth[0])
    spent = 0.0
    step = est.step
    dts = np.diff(ref.t)
    for k in range(1, ref.t.size):
        t0 = time.perf_counter()
        step(dts[k - 1], float(i_meas[k]), v_meas[k])
        spent += time.perf_counter() - t0
        err[k] = 100.0 * (np.clip(est.soc, 0.0, 1.0) - truth[k])
    return err[::every], spent


def figures(err: np.ndarray, t: np.ndarray) -> dict[str, float]:
    """rmse_pct over everything; max_pct after the first 30 min."""
    late = t >= 1800.0
    return {"rmse_pct": float(np.sqrt(np.mean(err**2))), "max_pct": float(np.max(np.abs(err[late])))}


def convergence_min(err: np.ndarray, t: np.ndarray, band_pct: float = 2.0, hold_s: float = 600.0) -> float | None:
    """Minutes until every cell is within ``band_pct`` and stays there for ``hold_s``;
    None when that never happens."""
    inside = np.all(np.abs(err) <= band_pct, axis=1)
    # Index of the next sample outside the band, for every sample.
    nxt = np.where(~inside, np.arange(t.size), t.size)
    nxt = np.minimum.accumulate(nxt[::-1])[::-1]
    end = np.append(t, np.inf)[nxt]
    ok = inside & (end - t >= hold_s) & (t[-1] - t >= hold_s)
    if not ok.any():
        return None
    return float(t[int(np.argmax(ok))] / 60.0)


def score_chemistry(chem: str, n_cells: int = 224, profiles: tuple[str, ...] = PROFILES, seed: int = 1,
                    sensors: Sensors | None = None, data: Path = DATA, config: EkfConfig | None = None,
                    baseline: bool = True) -> dict[str, Any]:
    """Every figure for one chemistry (see module docstring)."""
    sensors = sensors or Sensors()
    cell, ident = identify(chem, data)
    params = EcmParams.uniform(cell, n_cells)
    cfg = config or ekf_config(chem)
    out: dict[str, Any] = {"identified": {
        "capacity_ah": round(ident.capacity_ah, 4), "r0_mohm": round(1e3 * ident.r0_ohm, 3),
        "r_mohm": [round(1e3 * r, 3) for r in ident.r_ohm], "tau_s": [round(x, 1) for x in ident.tau_s],
        "diffusion_tau_s": round(ident.diffusion_tau_s, 1), "ocv_points": len(ident.ocv.soc)}, "profiles": {}}
    worst: dict[str, dict[str, float | None]] = {"ekf": {}, "coulomb": {}} if baseline else {"ekf": {}}

    def ekf_from_ocv(v0: np.ndarray) -> SocEkf:
        f = SocEkf(cell, params, cfg)
        f.init_from_ocv(v0)
        return f

    def cc_from_ocv(v0: np.ndarray) -> CoulombCounter:
        return CoulombCounter(params.capacity_ah, cell.ocv.soc_at(v0))

    for name in profiles:
        ref = load(data / f"ref_{chem.lower()}_{name}.npz")
        truth0 = float(ref.soc[0])
        wrong = np.clip(truth0 + np.where(np.arange(n_cells) % 2 == 0, 0.3, -0.3), 0.0, 1.0)
        res: dict[str, dict[str, float | None]] = {}
        for kind, from_ocv, wrong_start in (
            ("ekf", ekf_from_ocv, lambda v0, w=wrong: SocEkf(cell, params, cfg, soc0=w)),
            ("coulomb", cc_from_ocv, lambda v0, w=wrong: CoulombCounter(params.capacity_ah, w)),
        ):
            if kind == "coulomb" and not baseline:
                continue
            err, spent = run(ref, from_ocv, n_cells, sensors, seed)
            fig: dict[str, float | None] = dict(figures(err, ref.t))
            fig["us_per_cell_step"] = 1e6 * spent / ((ref.t.size - 1) * n_cells)
            err_c, _ = run(ref, wrong_start, n_cells, sensors, seed + 1)
            fig["convergence_min"] = convergence_min(err_c, ref.t)
            res[kind] = fig
        out["profiles"][name] = res
        for kind, fig in res.items():
            for key, val in fig.items():
                prev = worst[kind].get(key, 0.0)
                if key == "us_per_cell_step":
                    worst[kind][key] = max(prev or 0.0, val or 0.0)
                elif val is None or prev is None:
                    worst[kind][key] = None
                else:
                    worst[kind][key] = max(prev, val)
    for kind in worst:
        out[kind] = {k: (None if v is None else round(v, 3)) for k, v in worst[kind].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--cells", type=int, default=224)
    ap.add_argument("--profiles", nargs="+", choices=PROFILES, default=list(PROFILES))
    ap.add_argument("--chemistry", nargs="+", choices=CHEMISTRIES, default=list(CHEMISTRIES))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args(argv)
    result = {chem: score_chemistry(chem, args.cells, tuple(args.profiles), args.seed, data=args.data)
              for chem in args.chemistry}
    if args.json:
        print(json.dumps(result))
        return 0
    for chem, res in result.items():
        print(f"{chem}: identified {res['identified']}")
        for name, prof in res["profiles"].items():
            for kind, fig in prof.items():
                print(f"  {name:8s} {kind:8s} " + "  ".join(
                    f"{k}={'n/a' if v is None else f'{v:.3f}'}" for k, v in fig.items()))
        for kind in ("ekf", "coulomb"):
            print(f"  {'worst':8s} {kind:8s} {res[kind]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
