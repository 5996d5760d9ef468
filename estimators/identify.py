"""ECM identification from a pulse (HPPC/GITT-style) test of one cell.

The test this expects (what a lab cycler runs on a sample cell): start full and
rested, then repeatedly a few short current pulses, a partial discharge and a
long rest, ending with a slow discharge to empty and a last rest. From it:

* capacity: the charge taken out from full to empty;
* OCV table: the rested voltage at the end of each long rest, extrapolated to full
  relaxation by the fitted RC branches, against SoC from coulomb counting;
* R0, R_k, tau_k per level by variable projection: for fixed time constants the
  voltage is linear in (OCV offset, OCV slope, R0, R_1..R_n), so each candidate set of
  time constants costs one linear least-squares solve; the best set on a log grid
  (exhaustive for n <= 2, coordinate descent above) wins;
* reference values at ``soc_ref`` and the resistance shape over SoC.

Samples may be spaced unevenly (dense around current changes, sparse in rests);
the current is taken as held between samples at the value of the earlier sample
(sample ``j`` is logged just after any step at its time). Pure numpy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .ecm import MAX_RC, CellType, OcvCurve

__all__ = ["IdentifiedCell", "LevelFit", "find_rests", "fit_ecm_window", "identify_cell", "rc_responses", "rest_asymptote"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class LevelFit:
    """Fit of one test level: SoC at its end, OCV extrapolated to full rest, ECM values."""

    soc: float
    ocv_v: float
    r0_ohm: float
    r_ohm: tuple[float, ...]
    tau_s: tuple[float, ...]
    rms_v: float


@dataclass(frozen=True)
class IdentifiedCell:
    """Result of :func:`identify_cell`."""

    capacity_ah: float
    ocv: OcvCurve
    r0_ohm: float
    r_ohm: tuple[float, ...]
    tau_s: tuple[float, ...]
    r_soc: tuple[float, ...]
    r0_soc_factor: tuple[float, ...]
    rc_soc_factor: tuple[float, ...]
    levels: tuple[LevelFit, ...]

    def cell_type(self, name: str, v_min: float, v_max: float, **kw: float) -> CellType:
        """A :class:`CellType` with these values (``kw``: e.g. activation energies)."""
        return CellType(
            name=name, ocv=self.ocv, capacity_ah=self.capacity_ah, r0_ohm=self.r0_ohm, r_ohm=self.r_ohm,
            tau_s=self.tau_s, v_min=v_min, v_max=v_max, r_soc=self.r_soc, r0_soc_factor=self.r0_soc_factor,
            rc_soc_factor=self.rc_soc_factor, **kw,
        )


def _f64(x: ArrayLike) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


def find_rests(t: ArrayLike, i: ArrayLike, min_rest_s: float, current_a: float = 1e-3) -> list[tuple[int, int]]:
    """Index ranges [start, end] (inclusive) where |i| <= ``current_a`` for >= ``min_rest_s``."""
    ts, quiet = _f64(t), np.abs(_f64(i)) <= current_a
    edges = np.flatnonzero(np.diff(np.concatenate(([0], quiet.astype(np.int8), [0]))))
    out = []
    for a, b in zip(edges[0::2], edges[1::2] - 1, strict=True):
        if ts[b] - ts[a] >= min_rest_s:
            out.append((int(a), int(b)))
    return out


def rc_responses(t: ArrayLike, i: ArrayLike, taus: ArrayLike) -> FloatArray:
    """Unit-resistance RC voltages, shape (samples, len(taus)), zero at the first sample.

    Exact for a current held at ``i[j-1]`` over (t[j-1], t[j]].
    """
    ts, cur, tau = _f64(t), _f64(i), _f64(taus)
    out = np.zeros((ts.size, tau.size))
    dt = np.diff(ts)
    a = np.exp(-dt[:, None] / tau[None, :])
    gain = (1.0 - a) * cur[:-1, None]
    v = np.zeros(tau.size)
    for j in range(dt.size):
        v = a[j] * v + gain[j]
        out[j + 1] = v
    return out


def rest_asymptote(t: ArrayLike, v: ArrayLike, tau_range_s: tuple[float, float] = (1.0, 3000.0),
                   grid: int = 24) -> float:
    """Voltage a rest relaxes to: best fit of ``v_inf + a1 e^(-t/tau1) + a2 e^(-t/tau2)``."""
    ts, volt = _f64(t), _f64(v)
    x = ts - ts[0]
    taus = np.geomspace(tau_range_s[0], tau_range_s[1], grid)
    best, v_inf = np.inf, float(volt[-1])
    for j1, j2 in itertools.combinations(range(grid), 2):
        A = np.column_stack((np.ones_like(x), np.exp(-x / taus[j1]), np.exp(-x / taus[j2])))
        coef, *_ = np.linalg.lstsq(A, volt, rcond=None)
        res = volt - A @ coef
        cost = float(res @ res)
        if cost < best:
            best, v_inf = cost, float(coef[0])
    return v_inf


def _coulombs_ah(t: FloatArray, i: FloatArray) -> FloatArray:
    """Charge in Ah (> 0 charged) with the current held from the earlier sample."""
    return np.concatenate(([0.0], np.cumsum(i[:-1] * np.diff(t)))) / 3600.0


def fit_ecm_window(t: ArrayLike, i: ArrayLike, v: ArrayLike, n_rc: int = 2, tau_range_s: tuple[float, float] = (1.0, 3000.0),
                   grid: int = 16) -> tuple[float, float, tuple[float, ...], tuple[float, ...], float, float]:
    """Fit ``v = c0 + c1*q + R0*i + sum R_k f_k`` on one window starting at rest.

    Returns (ocv_end, r0, r_k, tau_k, rms, c1): ``ocv_end`` is ``c0 + c1*q_end``, the
    OCV the voltage relaxes to after the window. Time constants come from ``grid``
    log-spaced candidates per branch in consecutive bands of ``tau_range_s``.
    """
    if not 1 <= n_rc <= MAX_RC:
        raise ValueError(f"n_rc must be in 1..{MAX_RC}")
    ts, cur, volt = _f64(t), _f64(i), _f64(v)
    q = _coulombs_ah(ts, cur)
    edges = np.geomspace(tau_range_s[0], tau_range_s[1], n_rc + 1)
    bands = [np.geomspace(edges[k], edges[k + 1], grid) for k in range(n_rc)]
    resp = rc_responses(ts, cur, np.concatenate(bands))
    base = np.column_stack((np.ones_like(ts), q, cur))

    def solve(idx: tuple[int, ...]) -> tuple[float, FloatArray]:
        cols = [resp[:, k * grid + j] for k, j in enumerate(idx)]
        A = np.column_stack((base, *cols))
        coef, *_ = np.linalg.lstsq(A, volt, rcond=None)
        res = volt - A @ coef
        cost = float(res @ res)
        if np.any(coef[2:] < 0.0):  # negative resistances are not physical
            cost = float("inf")
        return cost, _f64(coef)

    if n_rc <= 2:
        cands = list(itertools.product(range(grid), repeat=n_rc))
        costs = [solve(c) for c in cands]
        best = int(np.argmin([c for c, _ in costs]))
        idx = cands[best]
    else:
        idx = tuple(grid // 2 for _ in range(n_rc))
        for _ in range(3):
            for k in range(n_rc):
                trial = [(solve(idx[:k] + (j,) + idx[k + 1:])[0], j) for j in range(grid)]
                idx = idx[:k] + (min(trial)[1],) + idx[k + 1:]
    cost, coef = solve(idx)
    if not np.isfinite(cost):
        raise ValueError("no physical fit (all candidate time constants gave a negative resistance)")
    taus = tuple(float(bands[k][j]) for k, j in enumerate(idx))
    rms = float(np.sqrt(cost / ts.size))
    return float(coef[0] + coef[1] * q[-1]), float(coef[2]), tuple(float(x) for x in coef[3:]), taus, rms, float(coef[1])


def identify_cell(t: ArrayLike, i: ArrayLike, v: ArrayLike, *, n_rc: int = 2, min_rest_s: float = 1200.0,
                  soc_start: float = 1.0, soc_end: float = 0.0, soc_ref: float = 0.5,
                  tau_range_s: tuple[float, float] = (1.0, 3000.0)) -> IdentifiedCell:
    """Identify capacity, OCV curve and ECM parameters from a pulse test (see module doc).

    ``i`` > 0 charges. The test must start at ``soc_start`` (rested) and end at
    ``soc_end`` followed by a rest; every long rest (>= ``min_rest_s``) ends a level.
    """
    ts, cur, volt = _f64(t), _f64(i), _f64(v)
    if not (ts.ndim == 1 and ts.shape == cur.shape == volt.shape and ts.size > 10):
        raise ValueError("t, i, v must be 1-D arrays of equal length")
    if np.any(np.diff(ts) <= 0.0):
        raise ValueError("t must rise strictly")
    q = _coulombs_ah(ts, cur)
    capacity = -(q[-1]) / (soc_start - soc_end)
    if capacity <= 0.0:
        raise ValueError("the test must take charge out of the cell (start full, end empty)")
    soc = soc_start + q / capacity
    rests = find_rests(ts, cur, min_rest_s)
    if len(rests) < 3:
        raise ValueError(f"need at least 3 rests of >= {min_rest_s:g} s, found {len(rests)}")
    # The first rest fixes the full point; each later rest ends one level.
    rest_start = {b: a for a, b in rests}
    first_end = rests[0][1]
    points = [(float(soc[first_end]), float(np.mean(volt[max(0, first_end - 2):first_end + 1])))]
    levels: list[LevelFit] = []
    for (_, prev_end), (_, end) in itertools.pairwise(rests):
        sl = slice(prev_end, end + 1)
        try:
            ocv_end, r0, r, tau, rms, _ = fit_ecm_window(ts[sl], cur[sl], volt[sl], n_rc, tau_range_s)
            levels.append(LevelFit(float(soc[end]), ocv_end, r0, r, tau, rms))
        except ValueError:  # e.g. a slow discharge into the steep end of the OCV curve
            ocv_end = rest_asymptote(ts[rest_start[end]:end + 1], volt[rest_start[end]:end + 1], tau_range_s)
        points.append((float(soc[end]), ocv_end))
    pts = sorted(points)
    s_pts = np.array([p[0] for p in pts])
    v_pts = np.array([p[1] for p in pts])
    s_pts, v_pts = _strictly_rising(s_pts, v_pts)
    ocv = OcvCurve(tuple(s_pts.tolist()), tuple(v_pts.tolist()))

    # Pulse levels only (the final slow discharge to empty is a poor RC experiment).
    lv = sorted(levels[:-1] if len(levels) > 2 else levels, key=lambda f: f.soc)
    l_soc = np.array([f.soc for f in lv])
    l_r0 = np.array([f.r0_ohm for f in lv])
    l_rc = np.array([sum(f.r_ohm) for f in lv])
    r0_ref = float(np.interp(soc_ref, l_soc, l_r0))
    rc_ref = float(np.interp(soc_ref, l_soc, l_rc))
    mid = (l_soc >= 0.2) & (l_soc <= 0.9)
    use = [f for f, m in zip(lv, mid, strict=True) if m] or lv
    r_ref = np.median(np.array([f.r_ohm for f in use]), axis=0)
    tau_ref = np.median(np.array([f.tau_s for f in use]), axis=0)
    r_ref = np.maximum(r_ref, 1e-9)
    r_ref *= rc_ref / r_ref.sum() if rc_ref > 0.0 else 1.0
    return IdentifiedCell(
        capacity_ah=float(capacity),
        ocv=ocv,
        r0_ohm=r0_ref,
        r_ohm=tuple(float(x) for x in r_ref),
        tau_s=tuple(float(x) for x in tau_ref),
        r_soc=tuple(l_soc.tolist()),
        r0_soc_factor=tuple((np.maximum(l_r0, 1e-9) / r0_ref).tolist()),
        rc_soc_factor=tuple((np.maximum(l_rc, 1e-9) / max(rc_ref, 1e-9)).tolist()),
        levels=tuple(levels),
    )


def _strictly_rising(s: FloatArray, v: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Drop repeated SoC points and force a strictly rising OCV (noise can break it)."""
    keep = np.concatenate(([True], np.diff(s) > 1e-6))
    s, v = s[keep], v[keep]
    v = np.maximum.accumulate(v)
    v = v + np.arange(v.size) * 1e-7  # strictly rising for a unique inverse
    return s, v
