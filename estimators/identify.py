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
* the diffusion time R^2/D of the surface-SoC model (:mod:`estimators.ecm`): the
  value that best explains all levels together with RC branches common to all of
  them (:func:`fit_diffusion_time`); the levels' RC branches are then refitted to
  what diffusion leaves;
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

from .ecm import MAX_RC, CellType, OcvCurve, diffusion_modes

__all__ = ["IdentifiedCell", "LevelFit", "diffusion_overpotential", "find_rests", "fit_diffusion_time", "fit_ecm_window",
           "identify_cell", "rc_responses", "rest_asymptote", "surface_excess"]

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
    diffusion_tau_s: float = 0.0

    def cell_type(self, name: str, v_min: float, v_max: float, **kw: float) -> CellType:
        """A :class:`CellType` with these values (``kw``: e.g. activation energies)."""
        return CellType(
            name=name, ocv=self.ocv, capacity_ah=self.capacity_ah, r0_ohm=self.r0_ohm, r_ohm=self.r_ohm,
            tau_s=self.tau_s, v_min=v_min, v_max=v_max, r_soc=self.r_soc, r0_soc_factor=self.r0_soc_factor,
            rc_soc_factor=self.rc_soc_factor, diffusion_tau_s=self.diffusion_tau_s, **kw,
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


def surface_excess(t: ArrayLike, i: ArrayLike, capacity_ah: float, tau_d_s: float) -> FloatArray:
    """Surface-minus-bulk SoC of spherical diffusion (:func:`estimators.ecm.diffusion_modes`),
    zero at the first sample, for a current held at ``i[j-1]`` over (t[j-1], t[j]]."""
    ts, cur = _f64(t), _f64(i)
    taus, lags = diffusion_modes(tau_d_s)
    if taus.size == 0:
        return np.zeros(ts.size)
    return _f64(rc_responses(ts, cur / (3600.0 * capacity_ah), taus) @ lags)


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
                  tau_range_s: tuple[float, float] = (1.0, 3000.0), diffusion_tau_s: float | None = None) -> IdentifiedCell:
    """Identify capacity, OCV curve and ECM parameters from a pulse test (see module doc).

    ``i`` > 0 charges. The test must start at ``soc_start`` (rested) and end at
    ``soc_end`` followed by a rest; every long rest (>= ``min_rest_s``) ends a level.
    ``diffusion_tau_s``: None identifies it (:func:`fit_diffusion_time`), 0 leaves
    diffusion out.
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
    fits, points = _fit_levels(ts, cur, volt, soc, rests, n_rc, tau_range_s)
    pts = sorted(points)
    s_pts = np.array([p[0] for p in pts])
    v_pts = np.array([p[1] for p in pts])
    s_pts, v_pts = _strictly_rising(s_pts, v_pts)
    ocv = OcvCurve(tuple(s_pts.tolist()), tuple(v_pts.tolist()))
    windows = [slice(a, b + 1) for (_, a), (_, b) in itertools.pairwise(rests)]
    if diffusion_tau_s is None:
        # Pulse levels only (the last one is the slow discharge to empty), each weighted
        # by how well its own free fit went: the knees of the OCV table fit worst.
        pulsed = [(w, f) for w, f in zip(windows[:-1], fits[:-1], strict=True) if f is not None]
        diffusion_tau_s = fit_diffusion_time(ts, cur, volt, soc, [w for w, _ in pulsed],
                                             [1.0 / max(f.rms_v, 1e-4) ** 2 for _, f in pulsed], ocv, capacity,
                                             tau_range_s)
    if diffusion_tau_s > 0.0:
        # The RC branches fit what is left once the diffusion overpotential is removed.
        fits, _ = _fit_levels(ts, cur, volt - diffusion_overpotential(ocv, ts, cur, soc, capacity, diffusion_tau_s),
                              soc, rests, n_rc, tau_range_s)
    levels = [f for f in fits if f is not None]

    # Pulse levels only (the final slow discharge to empty is a poor RC experiment).
    lv = sorted([f for f in fits[:-1] if f is not None] or levels, key=lambda f: f.soc)
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
        diffusion_tau_s=float(diffusion_tau_s),
    )


def diffusion_overpotential(ocv: OcvCurve, t: FloatArray, i: FloatArray, soc: FloatArray, capacity_ah: float,
                            tau_d_s: float) -> FloatArray:
    """OCV at the surface SoC minus OCV at the bulk SoC over a test (see :func:`surface_excess`)."""
    return _f64(ocv.ocv(soc + surface_excess(t, i, capacity_ah, tau_d_s)) - ocv.ocv(soc))


def _fit_levels(ts: FloatArray, cur: FloatArray, volt: FloatArray, soc: FloatArray, rests: list[tuple[int, int]],
                n_rc: int, tau_range_s: tuple[float, float]) -> tuple[list[LevelFit | None], list[tuple[float, float]]]:
    """ECM fit of every level (between consecutive rests; None where no physical fit
    exists) and the (SoC, OCV) points: the first rest fixes the full point, each later
    rest ends one level."""
    rest_start = {b: a for a, b in rests}
    first_end = rests[0][1]
    points = [(float(soc[first_end]), float(np.mean(volt[max(0, first_end - 2):first_end + 1])))]
    fits: list[LevelFit | None] = []
    for (_, prev_end), (_, end) in itertools.pairwise(rests):
        sl = slice(prev_end, end + 1)
        try:
            ocv_end, r0, r, tau, rms, _ = fit_ecm_window(ts[sl], cur[sl], volt[sl], n_rc, tau_range_s)
            fits.append(LevelFit(float(soc[end]), ocv_end, r0, r, tau, rms))
        except ValueError:  # e.g. a slow discharge into the steep end of the OCV curve
            ocv_end = rest_asymptote(ts[rest_start[end]:end + 1], volt[rest_start[end]:end + 1], tau_range_s)
            fits.append(None)
        points.append((float(soc[end]), ocv_end))
    return fits, points


def fit_diffusion_time(t: ArrayLike, i: ArrayLike, v: ArrayLike, soc: ArrayLike, windows: list[slice],
                       weights: ArrayLike, ocv: OcvCurve, capacity_ah: float,
                       tau_range_s: tuple[float, float] = (1.0, 3000.0), grid: int = 16,
                       candidates_s: ArrayLike | None = None) -> float:
    """Diffusion time R^2/D (0: none) that best explains all ``windows`` at once.

    Electrolyte and charge-transfer polarisation hardly depend on SoC, so two RC
    branches are shared by every window (each keeps its own OCV offset, OCV slope
    and R0); what varies with the OCV slope from level to level is left to diffusion
    (:func:`diffusion_overpotential`). Weighted least squares over ``candidates_s``
    (default: 0 and a log grid), refined by a parabola in log(tau_d).
    """
    ts, cur, volt, s = _f64(t), _f64(i), _f64(v), _f64(soc)
    w = _f64(weights)
    edges = np.geomspace(tau_range_s[0], tau_range_s[1], 3)
    taus = np.concatenate([np.geomspace(edges[k], edges[k + 1], grid) for k in range(2)])
    # Per window: project out its own (1, q, i) columns once; only the voltage
    # changes with tau_d, so the shared branches' normal equations are reused.
    proj, gram = [], np.zeros((taus.size, taus.size))
    for sl, wk in zip(windows, w, strict=True):
        q_basis, _ = np.linalg.qr(np.column_stack((np.ones(sl.stop - sl.start), _coulombs_ah(ts[sl], cur[sl]), cur[sl])))
        f = rc_responses(ts[sl], cur[sl], taus)
        f -= q_basis @ (q_basis.T @ f)
        gram += wk * (f.T @ f)
        proj.append((sl, q_basis, f))

    def cost(tau_d: float) -> float:
        u = volt - diffusion_overpotential(ocv, ts, cur, s, capacity_ah, tau_d) if tau_d > 0.0 else volt
        b, uu = np.zeros(taus.size), 0.0
        for (sl, q_basis, f), wk in zip(proj, w, strict=True):
            ul = u[sl] - q_basis @ (q_basis.T @ u[sl])
            b += wk * (f.T @ ul)
            uu += wk * float(ul @ ul)
        return uu - _best_two_branch_gain(gram, b, grid)

    cands = np.concatenate(([0.0], np.geomspace(200.0, 40000.0, 24))) if candidates_s is None else _f64(candidates_s)
    costs = np.array([cost(float(c)) for c in cands])
    k = int(np.argmin(costs))
    if 0 < k < cands.size - 1 and cands[k - 1] > 0.0:
        # Parabola through the three log-spaced points around the minimum.
        x = np.log(cands[k - 1:k + 2])
        a, b2, _ = np.polyfit(x, costs[k - 1:k + 2], 2)
        if a > 0.0:
            return float(np.exp(np.clip(-b2 / (2.0 * a), x[0], x[2])))
    return float(cands[k])


def _best_two_branch_gain(gram: FloatArray, b: FloatArray, grid: int) -> float:
    """Largest cost reduction ``r.b`` of one branch from each band with ``r >= 0``
    (normal equations ``gram r = b``); single branches and none are candidates too."""
    ga, gc = np.diag(gram)[:grid], np.diag(gram)[grid:]
    ba, bc = b[:grid], b[grid:]
    g12 = gram[:grid, grid:]
    det = ga[:, None] * gc[None, :] - g12**2
    ok = det > 1e-12 * ga[:, None] * gc[None, :]
    det = np.where(ok, det, 1.0)
    r1 = (gc[None, :] * ba[:, None] - g12 * bc[None, :]) / det
    r2 = (ga[:, None] * bc[None, :] - g12 * ba[:, None]) / det
    pair = np.where(ok & (r1 >= 0.0) & (r2 >= 0.0), r1 * ba[:, None] + r2 * bc[None, :], 0.0)
    diag = np.diag(gram)
    single = np.where(b > 0.0, b**2 / np.maximum(diag, 1e-300), 0.0)
    return float(max(pair.max(), single.max(), 0.0))


def _strictly_rising(s: FloatArray, v: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Drop repeated SoC points and force a strictly rising OCV (noise can break it)."""
    keep = np.concatenate(([True], np.diff(s) > 1e-6))
    s, v = s[keep], v[keep]
    v = np.maximum.accumulate(v)
    v = v + np.arange(v.size) * 1e-7  # strictly rising for a unique inverse
    return s, v
