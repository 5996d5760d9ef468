"""Impedance spectra: record type, lin-KK validation, DRT, equivalent-circuit fit and SoT.

Pure numpy, no I/O. Conventions used throughout:

* ``Z = Z_re + j Z_im`` in ohm with ``Z_im < 0`` for capacitive behaviour (the usual
  electrochemistry sign: a Nyquist plot shows ``-Z_im`` upwards); phase in degrees,
  ``phase = atan2(Z_im, Z_re)`` (negative for capacitive points).
* Frequencies in Hz, time constants in s, temperatures in degC, SoC as a fraction 0..1.
* Residuals are relative to ``|Z|`` of each point (the noise of an EIS module is roughly
  proportional to ``|Z|``), so every fit here weights points by ``1 / |Z|``.

Contents:

* :class:`EisSpectrum`: one measurement record (points, plus cell voltage, temperature
  and SoC per point at measurement time).
* :func:`lin_kk`: linear Kramers-Kronig test (Schoenleitner et al. 2015): a fit of RC
  elements with fixed, log-spaced time constants, the ``mu`` criterion for their number,
  residuals and a verdict.
* :func:`drt`: distribution of relaxation times, Tikhonov-regularised and non-negative
  (an augmented least-squares system solved by :func:`nnls`, Lawson-Hanson on the Gram
  matrix).
* :func:`fit_ecm`: ``L + R0 + n x (R || C)`` (or ``R || CPE``) fitted by Levenberg-Marquardt
  from the DRT's peaks; arcs are always reported ordered by time constant (R1C1 fastest),
  so labels never swap between fits. :meth:`EcmParams.as_cloud` gives R0, R1..R4, C1..C4.
* SoT: :func:`feature_value` (phase, log magnitude, ... at a frequency, or the apex
  frequency of an arc), :func:`calibrate_sot` (fits the calibration surface
  ``1000 / T_K = P(feature, SoC)`` from spectra at known T and SoC, choosing the feature
  and frequency by cross-validation), :func:`estimate_temperature`, :func:`sot_mismatch`.
* :func:`analyze_spectrum`: KK first; only a valid spectrum feeds SoT and the fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DrtResult",
    "EcmFit",
    "EcmParams",
    "EisAnalysis",
    "EisSpectrum",
    "KKResult",
    "SotCalibration",
    "SotEstimate",
    "SotFeature",
    "SotMismatch",
    "analyze_spectrum",
    "calibrate_sot",
    "default_sot_candidates",
    "drt",
    "estimate_temperature",
    "feature_value",
    "fit_ecm",
    "lin_kk",
    "log_grid",
    "nnls",
    "nnls_gram",
    "parameter_uncertainty",
    "smoothed_spectrum",
    "sot_mismatch",
]

FloatArray = NDArray[np.float64]
ComplexArray = NDArray[np.complex128]
IntArray = NDArray[np.int64]

_T0_K = 273.15


def log_grid(start_hz: float, stop_hz: float, points_per_decade: int) -> FloatArray:
    """The sweep grid of the EIS protocol: from ``start_hz`` towards ``stop_hz``, ``points_per_decade``
    points per decade, ``floor(decades * ppd) + 1`` points (the stop frequency is hit when it lies on the grid)."""
    if start_hz <= 0 or stop_hz <= 0 or points_per_decade < 1:
        raise ValueError("frequencies must be > 0 and points_per_decade >= 1")
    a, b = math.log10(start_hz), math.log10(stop_hz)
    n = int(math.floor(abs(b - a) * points_per_decade + 1e-6)) + 1
    step = (1.0 if b >= a else -1.0) / points_per_decade
    return np.asarray(10.0 ** (a + step * np.arange(n)), dtype=np.float64)


def _arr(x: ArrayLike, n: int, name: str) -> FloatArray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        return np.full(n, float(a))
    a = a.reshape(-1)
    if a.size != n:
        raise ValueError(f"{name}: expected {n} values, got {a.size}")
    return a


# ---------------------------------------------------------------------------------------------
# the record
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EisSpectrum:
    """One EIS measurement record.

    Per point: ``frequency_hz``, ``z_re_ohm``, ``z_im_ohm`` (|Z| and phase derive from them),
    the cell ``voltage_v``, ``temperature_c`` and ``soc`` at the time the point was measured
    (NaN where unknown) and the module's quality ``flags`` (bit 0 clipped, bit 1 low quality).
    ``timestamp`` is wall-clock seconds (Unix) at the start of the sweep; ``target`` the
    canonical name of what was measured (``cell[17]``, ``module[3]``).
    """

    frequency_hz: FloatArray
    z_re_ohm: FloatArray
    z_im_ohm: FloatArray
    voltage_v: FloatArray = field(default_factory=lambda: np.zeros(0))
    temperature_c: FloatArray = field(default_factory=lambda: np.zeros(0))
    soc: FloatArray = field(default_factory=lambda: np.zeros(0))
    flags: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    timestamp: float = math.nan
    target: str = ""
    sweep_id: int = 0
    duration_s: float = math.nan
    pack_current_a: float = math.nan

    def __post_init__(self) -> None:
        f = np.asarray(self.frequency_hz, dtype=np.float64).reshape(-1)
        n = f.size
        if n == 0:
            raise ValueError("a spectrum needs at least one point")
        if not np.all(np.isfinite(f)) or np.any(f <= 0):
            raise ValueError("frequencies must be finite and > 0")
        object.__setattr__(self, "frequency_hz", f)
        object.__setattr__(self, "z_re_ohm", _arr(self.z_re_ohm, n, "z_re_ohm"))
        object.__setattr__(self, "z_im_ohm", _arr(self.z_im_ohm, n, "z_im_ohm"))
        for name in ("voltage_v", "temperature_c", "soc"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            object.__setattr__(self, name, np.full(n, math.nan) if v.size == 0 else _arr(v, n, name))
        fl = np.asarray(self.flags, dtype=np.int64)
        object.__setattr__(self, "flags", np.zeros(n, dtype=np.int64) if fl.size == 0
                           else np.asarray(_arr(fl, n, "flags"), dtype=np.int64))

    @classmethod
    def from_impedance(cls, frequency_hz: ArrayLike, z: ArrayLike, **kwargs: Any) -> EisSpectrum:
        """Build from complex impedances; scalars given for voltage/temperature/soc apply to all points."""
        zc = np.asarray(z, dtype=np.complex128).reshape(-1)
        return cls(np.asarray(frequency_hz, dtype=np.float64), zc.real.copy(), zc.imag.copy(), **kwargs)

    @property
    def n(self) -> int:
        return int(self.frequency_hz.size)

    @property
    def z(self) -> ComplexArray:
        return np.asarray(self.z_re_ohm + 1j * self.z_im_ohm, dtype=np.complex128)

    @property
    def abs_ohm(self) -> FloatArray:
        return np.asarray(np.hypot(self.z_re_ohm, self.z_im_ohm), dtype=np.float64)

    @property
    def phase_deg(self) -> FloatArray:
        return np.asarray(np.degrees(np.arctan2(self.z_im_ohm, self.z_re_ohm)), dtype=np.float64)

    def _mean(self, a: FloatArray) -> float:
        ok = np.isfinite(a)
        return float(a[ok].mean()) if ok.any() else math.nan

    @property
    def mean_temperature_c(self) -> float:
        return self._mean(self.temperature_c)

    @property
    def mean_soc(self) -> float:
        return self._mean(self.soc)

    @property
    def mean_voltage_v(self) -> float:
        return self._mean(self.voltage_v)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (msgpack/JSON), NaN kept as float NaN."""
        return {
            "timestamp": self.timestamp, "target": self.target, "sweep_id": self.sweep_id,
            "duration_s": self.duration_s, "pack_current_a": self.pack_current_a,
            "frequency_hz": self.frequency_hz.tolist(), "z_re_ohm": self.z_re_ohm.tolist(),
            "z_im_ohm": self.z_im_ohm.tolist(), "abs_ohm": self.abs_ohm.tolist(),
            "phase_deg": self.phase_deg.tolist(), "voltage_v": self.voltage_v.tolist(),
            "temperature_c": self.temperature_c.tolist(), "soc": self.soc.tolist(),
            "flags": self.flags.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EisSpectrum:
        keys = ("frequency_hz", "z_re_ohm", "z_im_ohm", "voltage_v", "temperature_c", "soc", "flags",
                "timestamp", "target", "sweep_id", "duration_s", "pack_current_a")
        return cls(**{k: d[k] for k in keys if k in d})


# ---------------------------------------------------------------------------------------------
# linear least squares helpers
# ---------------------------------------------------------------------------------------------


def _weighted_system(omega: FloatArray, z: ComplexArray, columns: ComplexArray) -> tuple[FloatArray, FloatArray]:
    """Stack real and imaginary rows of ``columns @ x ~ z`` weighted by 1/|z|."""
    w = 1.0 / np.abs(z)
    a = np.concatenate([columns.real * w[:, None], columns.imag * w[:, None]], axis=0)
    b = np.concatenate([z.real * w, z.imag * w])
    return a, b


def nnls_gram(gram: FloatArray, atb: FloatArray, *, max_iter: int | None = None,
              tol: float | None = None) -> FloatArray:
    """Non-negative least squares ``min ||A x - b||, x >= 0`` given ``A^T A`` and ``A^T b``.

    Lawson-Hanson active-set algorithm in the Gram form of Bro and De Jong (1997): every
    step solves a small symmetric system of the passive set only. Exact (finite) and fast
    for the few hundred unknowns of a DRT.
    """
    g = np.asarray(gram, dtype=np.float64)
    h = np.asarray(atb, dtype=np.float64)
    n = h.size
    if tol is None:
        tol = 10.0 * np.finfo(np.float64).eps * float(np.abs(g).max(initial=0.0)) * n
    max_iter = 3 * n if max_iter is None else max_iter
    passive = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    w = h.copy()
    it = 0
    while it < max_iter:
        cand = np.where(~passive, w, -np.inf)
        j = int(np.argmax(cand))
        if cand[j] <= tol:
            break
        passive[j] = True
        while True:
            it += 1
            s = np.zeros(n)
            idx = np.flatnonzero(passive)
            s[idx] = _solve_spd(g[np.ix_(idx, idx)], h[idx])
            if s[idx].min() > 0 or it >= max_iter:
                break
            neg = idx[s[idx] <= 0]
            denom = x[neg] - s[neg]
            alpha = float(np.min(np.where(denom > 0, x[neg] / np.where(denom > 0, denom, 1.0), 1.0)))
            x = x + alpha * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = s
        x[~passive] = 0.0
        w = h - g @ x
    return np.maximum(x, 0.0)


def _solve_spd(a: FloatArray, b: FloatArray) -> FloatArray:
    try:
        c = np.linalg.cholesky(a)
        y = np.linalg.solve(c, b)
        return np.asarray(np.linalg.solve(c.T, y), dtype=np.float64)
    except np.linalg.LinAlgError:
        return np.asarray(np.linalg.lstsq(a, b, rcond=None)[0], dtype=np.float64)


def nnls(a: ArrayLike, b: ArrayLike) -> FloatArray:
    """Non-negative least squares ``min ||a x - b||`` subject to ``x >= 0`` (Lawson-Hanson)."""
    am = np.asarray(a, dtype=np.float64)
    bv = np.asarray(b, dtype=np.float64)
    return nnls_gram(am.T @ am, am.T @ bv)


# ---------------------------------------------------------------------------------------------
# lin-KK
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class KKResult:
    """Outcome of :func:`lin_kk`. Residuals are ``(Z - Z_fit) / |Z|`` per point."""

    valid: bool
    reason: str
    n_elements: int
    mu: float
    residual_re: FloatArray
    residual_im: FloatArray
    rms: float
    max_abs: float
    z_fit: ComplexArray

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "reason": self.reason, "n_elements": self.n_elements, "mu": self.mu,
                "rms": self.rms, "max_abs": self.max_abs,
                "residual_re": self.residual_re.tolist(), "residual_im": self.residual_im.tolist()}


def lin_kk(frequency_hz: ArrayLike, z: ArrayLike, *, c: float = 0.85, max_elements: int | None = None,
           min_elements: int | None = None, inductance: bool = True, capacitance: bool = True, noise: float = 0.005,
           rms_limit: float | None = None, max_limit: float | None = None, low_freq_limit: float | None = None,
           low_freq_points: int = 5) -> KKResult:
    """Linear Kramers-Kronig test of one spectrum (Schoenleitner, Klotz, Ivers-Tiffee 2015).

    ``Z`` is fitted by ``R_ohm + sum_k R_k / (1 + j w tau_k)`` (+ ``j w L`` and ``1/(j w C)``
    when enabled) with ``tau_k`` log-spaced from ``1/w_max`` to ``1/w_min``; the ``R_k`` may be
    negative, so the fit is linear. The number of elements ``M`` grows from 3 until
    ``mu = 1 - sum|R_k<0| / sum|R_k>=0|`` drops to ``c`` (over-fitting starts there); the
    search starts at ``min_elements`` (default 1.5 per decade of the spectrum, plus one),
    because with fewer elements ``mu`` can dip below ``c`` by accident.
    Every KK-compliant spectrum is fitted to its noise level; drift or a non-steady state
    leaves structured residuals, mostly at low frequencies.

    The spectrum is *valid* when the rms residual is <= ``rms_limit``, no residual exceeds
    ``max_limit`` and the rms residual of the ``low_freq_points`` lowest frequencies (where
    drift shows first: a DC drift leaks into a point as ``~1/f``) is <= ``low_freq_limit``.
    Unset limits follow the module's relative noise ``noise`` (standard deviation of each
    of Z_re, Z_im relative to |Z|): 2.5x, 6.5x and 2.5x of it.
    """
    f = np.asarray(frequency_hz, dtype=np.float64).reshape(-1)
    zc = np.asarray(z, dtype=np.complex128).reshape(-1)
    n = f.size
    if n < 5 or zc.size != n:
        raise ValueError("lin-KK needs at least 5 points and one impedance per frequency")
    rms_limit = 2.5 * noise if rms_limit is None else rms_limit
    max_limit = 6.5 * noise if max_limit is None else max_limit
    low_freq_limit = 2.5 * noise if low_freq_limit is None else low_freq_limit
    omega = 2.0 * np.pi * f
    w = 1.0 / np.abs(zc)
    wmin, wmax = float(omega.min()), float(omega.max())
    extra: list[ComplexArray] = [np.ones(n, dtype=np.complex128)]
    if inductance:
        extra.append(np.asarray(1j * omega / wmax, dtype=np.complex128))
    if capacitance:
        extra.append(np.asarray(-1j * wmin / omega, dtype=np.complex128))
    extra_cols = np.stack(extra, axis=1)
    b = np.concatenate([zc.real * w, zc.imag * w])
    m_max = max_elements if max_elements is not None else max(3, n - extra_cols.shape[1] - 1)
    m_max = min(m_max, 2 * n - extra_cols.shape[1] - 1)
    # mu is not monotonic in M: with too few elements it can dip below c by accident while the
    # fit is still poor, so start from about 1.5 elements per decade (never fewer than 3)
    decades = math.log10(wmax / wmin)
    m_min = min(m_max, max(3, min_elements if min_elements is not None else int(math.ceil(1.5 * decades)) + 1))
    best: tuple[int, float, ComplexArray] | None = None
    for m in range(m_min, m_max + 1):
        tau = np.logspace(math.log10(1.0 / wmax), math.log10(1.0 / wmin), m)
        cols = np.concatenate([extra_cols, 1.0 / (1.0 + 1j * omega[:, None] * tau[None, :])], axis=1)
        a = np.concatenate([cols.real * w[:, None], cols.imag * w[:, None]], axis=0)
        x = np.linalg.lstsq(a, b, rcond=None)[0]
        rk = x[extra_cols.shape[1]:]
        pos = float(np.abs(rk[rk >= 0]).sum())
        mu = 1.0 - float(np.abs(rk[rk < 0]).sum()) / pos if pos > 0 else -math.inf
        best = (m, mu, cols @ x)
        if mu <= c:
            break
    assert best is not None
    m, mu, z_fit = best
    res = (zc - z_fit) / np.abs(zc)
    rr, ri = res.real.astype(np.float64), res.imag.astype(np.float64)
    rms = float(np.sqrt(np.mean(rr**2 + ri**2) / 2.0))
    max_abs = float(max(np.abs(rr).max(), np.abs(ri).max()))
    low = np.argsort(f)[:max(1, min(low_freq_points, n))]
    low_rms = float(np.sqrt(np.mean(rr[low] ** 2 + ri[low] ** 2) / 2.0))
    reasons = []
    if rms > rms_limit:
        reasons.append(f"rms residual {rms:.2%} > {rms_limit:.2%}")
    if max_abs > max_limit:
        reasons.append(f"max residual {max_abs:.2%} > {max_limit:.2%}")
    if low_rms > low_freq_limit:
        reasons.append(f"low-frequency residual {low_rms:.2%} > {low_freq_limit:.2%}")
    return KKResult(not reasons, "; ".join(reasons) or "ok", m, mu, rr, ri, rms, max_abs,
                    np.asarray(z_fit, dtype=np.complex128))


# ---------------------------------------------------------------------------------------------
# DRT
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DrtResult:
    """Distribution of relaxation times: ``Z = R0 + j w L + 1/(j w C) + sum_k r_k / (1 + j w tau_k)``.

    ``r_ohm[k] >= 0`` is the resistance of grid point ``tau_s[k]``; the density per unit
    ``ln tau`` is :attr:`gamma_ohm`. ``c_f`` is ``inf`` when no series capacitance was
    fitted or found.
    """

    tau_s: FloatArray
    r_ohm: FloatArray
    r0_ohm: float
    l_h: float
    c_f: float
    lam: float
    rel_rms: float
    z_fit: ComplexArray

    @property
    def gamma_ohm(self) -> FloatArray:
        dln = math.log(self.tau_s[1] / self.tau_s[0]) if self.tau_s.size > 1 else 1.0
        return np.asarray(self.r_ohm / dln, dtype=np.float64)

    def peaks(self, max_peaks: int | None = None, min_fraction: float = 0.005) -> list[tuple[float, float]]:
        """Peaks as (tau, R): R is the resistance between the neighbouring minima, tau the
        R-weighted geometric mean inside; the ``max_peaks`` largest, ordered by tau."""
        r = self.r_ohm
        total = float(r.sum())
        if total <= 0:
            return []
        k = r.size
        # local maxima (plateaus count once), borders included
        padded = np.concatenate([[-1.0], r, [-1.0]])
        out: list[tuple[float, float]] = []
        i = 1
        while i <= k:
            j = i
            while j < k and padded[j + 1] == padded[i]:
                j += 1
            if padded[i] > padded[i - 1] and padded[i] > padded[j + 1] and padded[i] > 0:
                # walk down to the minima on both sides
                lo = i - 1
                while lo > 0 and padded[lo] <= padded[lo + 1] and padded[lo] > 0:
                    lo -= 1
                hi = j + 1
                while hi <= k and padded[hi] <= padded[hi - 1] and padded[hi] > 0:
                    hi += 1
                seg = slice(max(lo, 1) - 1, min(hi, k + 1) - 1)
                rs = r[seg]
                area = float(rs.sum())
                if area >= min_fraction * total:
                    tau = float(np.exp(np.sum(rs * np.log(self.tau_s[seg])) / area))
                    out.append((tau, area))
            i = j + 1
        out.sort(key=lambda p: -p[1])
        if max_peaks is not None:
            out = out[:max_peaks]
        return sorted(out)

    def impedance(self, frequency_hz: ArrayLike) -> ComplexArray:
        """The DRT's model impedance: a smooth, noise-averaged version of the spectrum."""
        jw = 2j * np.pi * np.asarray(frequency_hz, dtype=np.float64)
        z = self.r0_ohm + jw * self.l_h + (self.r_ohm[None, :] / (1.0 + jw[..., None] * self.tau_s[None, :])).sum(axis=-1)
        if math.isfinite(self.c_f):
            z = z + 1.0 / (jw * self.c_f)
        return np.asarray(z, dtype=np.complex128)

    def to_dict(self) -> dict[str, Any]:
        return {"tau_s": self.tau_s.tolist(), "r_ohm": self.r_ohm.tolist(), "r0_ohm": self.r0_ohm,
                "l_h": self.l_h, "c_f": self.c_f, "lam": self.lam, "rel_rms": self.rel_rms}


def drt(frequency_hz: ArrayLike, z: ArrayLike, *, lam: float = 1e-3, points_per_decade: int = 8,
        extend_decades: float = 1.0, inductance: bool = True, capacitance: bool = True,
        order: int = 2) -> DrtResult:
    """Tikhonov-regularised, non-negative DRT.

    Minimises ``||W (K x - Z)||^2 + lam * N * ||D x||^2`` over ``x >= 0``, where ``W`` weights
    points by ``1/|Z|``, ``K`` holds the RC kernels on a log grid of ``points_per_decade``
    from ``1/(2 pi f_max)`` to ``extend_decades`` beyond ``1/(2 pi f_min)``, plus columns for R0, L
    and 1/C, and ``D`` is the ``order``-th difference operator on the RC part (0: identity).
    The augmented system is solved by :func:`nnls_gram`. ``lam`` is dimensionless (the
    unknowns are scaled by the median |Z| and the penalty by the number of points).
    """
    f = np.asarray(frequency_hz, dtype=np.float64).reshape(-1)
    zc = np.asarray(z, dtype=np.complex128).reshape(-1)
    n = f.size
    if n < 3 or zc.size != n:
        raise ValueError("a DRT needs at least 3 points and one impedance per frequency")
    omega = 2.0 * np.pi * f
    wmin, wmax = float(omega.min()), float(omega.max())
    # the grid starts at 1/w_max: faster relaxations look like a plain resistor within the
    # measured range and would take R0's place; it extends beyond 1/w_min for the diffusion tail
    lo = math.log10(1.0 / wmax)
    hi = math.log10(1.0 / wmin) + extend_decades
    k = max(4, int(round((hi - lo) * points_per_decade)) + 1)
    tau = np.logspace(lo, hi, k)
    extra: list[ComplexArray] = [np.ones(n, dtype=np.complex128)]
    scales = [1.0]
    if inductance:
        extra.append(np.asarray(1j * omega / wmax, dtype=np.complex128))
        scales.append(1.0 / wmax)
    if capacitance:
        extra.append(np.asarray(-1j * wmin / omega, dtype=np.complex128))
        scales.append(wmin)  # the unknown is (1/C) / wmin
    ne = len(extra)
    cols = np.concatenate([np.stack(extra, axis=1), 1.0 / (1.0 + 1j * omega[:, None] * tau[None, :])], axis=1)
    a, b = _weighted_system(omega, zc, cols)
    scale = float(np.median(np.abs(zc)))
    b = b / scale
    d = np.eye(k)
    for _ in range(order):
        d = np.diff(d, axis=0)
    reg = np.zeros((d.shape[0], ne + k))
    reg[:, ne:] = d
    gram = a.T @ a + (lam * n) * (reg.T @ reg)
    x = nnls_gram(gram, a.T @ b) * scale
    z_fit = cols @ x
    res = (zc - z_fit) / np.abs(zc)
    rel_rms = float(np.sqrt(np.mean(res.real**2 + res.imag**2) / 2.0))
    r0 = float(x[0])
    i = 1
    l_h = 0.0
    c_f = math.inf
    if inductance:
        l_h = float(x[i]) * scales[i]
        i += 1
    if capacitance:
        inv_c = float(x[i]) * scales[i]
        c_f = 1.0 / inv_c if inv_c > 0 else math.inf
    return DrtResult(tau, np.asarray(x[ne:], dtype=np.float64), r0, l_h, c_f, lam, rel_rms,
                     np.asarray(z_fit, dtype=np.complex128))


# ---------------------------------------------------------------------------------------------
# equivalent-circuit fit
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EcmParams:
    """``Z = j w L + R0 + sum_i R_i / (1 + (j w tau_i)^alpha_i)``, arcs ordered by ``tau`` (R1 fastest).

    With ``alpha_i = 1`` an arc is an ideal ``R_i || C_i`` with ``C_i = tau_i / R_i``; with
    ``alpha_i < 1`` it is ``R_i || CPE_i`` (a ZARC) and ``C_i = tau_i / R_i`` is its
    equivalent capacitance (Brug / Hsu-Mansfeld), ``Q_i = tau_i^alpha_i / R_i``.
    """

    r0_ohm: float
    r_ohm: tuple[float, ...]
    tau_s: tuple[float, ...]
    alpha: tuple[float, ...] = ()
    l_h: float = 0.0

    def __post_init__(self) -> None:
        if len(self.r_ohm) != len(self.tau_s):
            raise ValueError("need one tau per R")
        if not self.alpha:
            object.__setattr__(self, "alpha", tuple(1.0 for _ in self.r_ohm))
        elif len(self.alpha) != len(self.r_ohm):
            raise ValueError("need one alpha per R")
        order = sorted(range(len(self.tau_s)), key=lambda i: self.tau_s[i])
        for name in ("r_ohm", "tau_s", "alpha"):
            v = getattr(self, name)
            object.__setattr__(self, name, tuple(float(v[i]) for i in order))

    @property
    def c_f(self) -> tuple[float, ...]:
        return tuple(t / r if r > 0 else math.inf for r, t in zip(self.r_ohm, self.tau_s, strict=True))

    @property
    def q(self) -> tuple[float, ...]:
        return tuple(t**a / r if r > 0 else math.inf
                     for r, t, a in zip(self.r_ohm, self.tau_s, self.alpha, strict=True))

    def impedance(self, frequency_hz: ArrayLike) -> ComplexArray:
        jw = 2j * np.pi * np.asarray(frequency_hz, dtype=np.float64)
        z = jw * self.l_h + self.r0_ohm
        for r, t, a in zip(self.r_ohm, self.tau_s, self.alpha, strict=True):
            z = z + r / (1.0 + (jw * t) ** a)
        return np.asarray(z, dtype=np.complex128)

    def as_cloud(self) -> dict[str, float]:
        """The cloud's format: R0, R1..Rn, C1..Cn (+ L, and alpha_i for CPE arcs)."""
        out = {"R0": self.r0_ohm}
        out.update({f"R{i + 1}": r for i, r in enumerate(self.r_ohm)})
        out.update({f"C{i + 1}": c for i, c in enumerate(self.c_f)})
        out["L"] = self.l_h
        if any(a != 1.0 for a in self.alpha):
            out.update({f"alpha{i + 1}": a for i, a in enumerate(self.alpha)})
        return out

    def vector(self) -> FloatArray:
        """R0, R1..Rn, C1..Cn as an array (for comparisons)."""
        return np.asarray([self.r0_ohm, *self.r_ohm, *self.c_f], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class EcmFit:
    """Result of :func:`fit_ecm`: ``rel_rms`` is the rms of ``(Z - Z_fit) / |Z|``; ``rel_sd`` the
    relative 1-sigma uncertainty of R0, R1..Rn, C1..Cn that this spectrum's noise leaves
    (inf where the spectrum does not determine a parameter)."""

    params: EcmParams
    rel_rms: float
    iterations: int
    converged: bool
    z_fit: ComplexArray
    rel_sd: FloatArray
    drt: DrtResult | None = None

    def rel_sd_named(self) -> dict[str, float]:
        """``rel_sd`` keyed like :meth:`EcmParams.as_cloud` (R0, R1..Rn, C1..Cn)."""
        n = len(self.params.r_ohm)
        names = ["R0", *(f"R{i + 1}" for i in range(n)), *(f"C{i + 1}" for i in range(n))]
        return dict(zip(names, (float(x) for x in self.rel_sd), strict=True))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"params": self.params.as_cloud(), "tau_s": list(self.params.tau_s),
                             "rel_sd": {k: v if math.isfinite(v) else None for k, v in self.rel_sd_named().items()},
                             "rel_rms": self.rel_rms,
                             "iterations": self.iterations, "converged": self.converged}
        return d


_ALPHA_MIN = 0.4


def _alpha_of(u: FloatArray) -> FloatArray:
    return np.asarray(1.0 - (1.0 - _ALPHA_MIN) / (1.0 + np.exp(-u)), dtype=np.float64)


class _EcmModel:
    """Parameter vector ``[L?, R0, ln R_1..n, ln tau_1..n, u_1..n?]`` with analytic Jacobian."""

    def __init__(self, omega: FloatArray, z: ComplexArray, n_rc: int, inductance: bool, cpe: bool) -> None:
        self.jw = 1j * omega
        self.z = z
        self.w = 1.0 / np.abs(z)
        self.n_rc = n_rc
        self.inductance = inductance
        self.cpe = cpe
        self.i0 = 1 if inductance else 0

    def unpack(self, p: FloatArray) -> tuple[float, float, FloatArray, FloatArray, FloatArray]:
        i0, n = self.i0, self.n_rc
        l_h = float(p[0]) if self.inductance else 0.0
        r0 = float(p[i0])
        r = np.exp(p[i0 + 1:i0 + 1 + n])
        tau = np.exp(p[i0 + 1 + n:i0 + 1 + 2 * n])
        alpha = _alpha_of(p[i0 + 1 + 2 * n:i0 + 1 + 3 * n]) if self.cpe else np.ones(n)
        return l_h, r0, r, tau, alpha

    def residual(self, p: FloatArray) -> FloatArray:
        l_h, r0, r, tau, alpha = self.unpack(p)
        s = (self.jw[:, None] * tau[None, :]) ** alpha[None, :]
        zm = self.jw * l_h + r0 + (r[None, :] / (1.0 + s)).sum(axis=1)
        d = (zm - self.z) * self.w
        return np.concatenate([d.real, d.imag])

    def jacobian(self, p: FloatArray) -> tuple[FloatArray, FloatArray]:
        l_h, r0, r, tau, alpha = self.unpack(p)
        x = self.jw[:, None] * tau[None, :]
        s = x**alpha[None, :]
        den = 1.0 + s
        arcs = r[None, :] / den
        zm = self.jw * l_h + r0 + arcs.sum(axis=1)
        cols: list[NDArray[Any]] = []
        if self.inductance:
            cols.append(self.jw[:, None])
        cols.append(np.ones((self.jw.size, 1), dtype=np.complex128))
        cols.append(arcs)
        cols.append(-r[None, :] * alpha[None, :] * s / den**2)
        if self.cpe:
            sig = (1.0 - alpha) / (1.0 - _ALPHA_MIN)  # the logistic of u
            dalpha_du = -(1.0 - _ALPHA_MIN) * sig * (1.0 - sig)
            cols.append(-r[None, :] * s * np.log(x) / den**2 * dalpha_du[None, :])
        jc = np.concatenate(cols, axis=1) * self.w[:, None]
        d = (zm - self.z) * self.w
        return np.concatenate([jc.real, jc.imag], axis=0), np.concatenate([d.real, d.imag])


def _levenberg_marquardt(model: _EcmModel, p0: FloatArray, max_iter: int) -> tuple[FloatArray, float, int, bool]:
    p = p0.copy()
    jac, r = model.jacobian(p)
    cost = float(r @ r)
    lam = 1e-3
    converged = False
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        a = jac.T @ jac
        g = jac.T @ r
        diag = np.maximum(np.diag(a), 1e-12 * max(float(np.diag(a).max()), 1e-300))
        improved = False
        for _ in range(12):
            try:
                step = np.linalg.solve(a + lam * np.diag(diag), -g)
            except np.linalg.LinAlgError:
                lam *= 10.0
                continue
            p_new = p + step
            r_new = model.residual(p_new)
            cost_new = float(r_new @ r_new)
            if np.isfinite(cost_new) and cost_new < cost:
                rel = (cost - cost_new) / max(cost, 1e-300)
                p, cost = p_new, cost_new
                lam = max(lam / 5.0, 1e-12)
                improved = True
                if rel < 1e-10 or float(np.max(np.abs(step))) < 1e-9:
                    converged = True
                break
            lam *= 6.0
        if not improved:
            converged = True  # no descent direction left: at a minimum (to working precision)
            break
        if converged:
            break
        jac, r = model.jacobian(p)
    return p, cost, it, converged


def _initial_guesses(f: FloatArray, z: ComplexArray, n_rc: int, d: DrtResult | None) -> list[tuple[float, float, FloatArray, FloatArray]]:
    """(L, R0, R[n], tau[n]) starting points: from the DRT's peaks, and a log-uniform spread."""
    omega = 2.0 * np.pi * f
    guesses: list[tuple[float, float, FloatArray, FloatArray]] = []
    lo, hi = math.log(1.0 / omega.max()), math.log(1.0 / omega.min())
    span = max(float(z.real.max() - z.real.min()), 1e-12)
    r0_guess = float(z.real[np.argmax(f)]) if d is None else d.r0_ohm
    l_guess = 0.0 if d is None else d.l_h
    if d is not None:
        pk = d.peaks()
        if pk:
            # keep the n_rc largest peaks; split the widest gaps when there are fewer
            pk = sorted(sorted(pk, key=lambda p: -p[1])[:n_rc])
            taus = [math.log(t) for t, _ in pk]
            rs = [r for _, r in pk]
            while len(taus) < n_rc:
                edges = [lo, *taus, hi]
                gaps = np.diff(edges)
                g = int(np.argmax(gaps))
                taus.insert(g, edges[g] + gaps[g] / 2.0)
                rs.insert(g, 0.05 * span)
            guesses.append((l_guess, r0_guess, np.maximum(np.asarray(rs), 1e-3 * span),
                            np.exp(np.clip(np.asarray(taus), lo - 2.0, hi + 2.0))))
    # log-uniform over the measured range, equal shares of the real-axis span
    taus_u = np.exp(np.linspace(lo + 0.15 * (hi - lo), hi - 0.05 * (hi - lo), n_rc))
    guesses.append((l_guess, r0_guess, np.full(n_rc, span / n_rc), taus_u))
    return guesses


def fit_ecm(frequency_hz: ArrayLike, z: ArrayLike, *, n_rc: int = 4, inductance: bool = True, cpe: bool = False,
            drt_result: DrtResult | None = None, use_drt: bool = True, max_iter: int = 200,
            initial: EcmParams | None = None) -> EcmFit:
    """Fit ``L + R0 + n_rc x (R || C)`` (``cpe``: ``R || CPE``) to a spectrum.

    Weighted (1/|Z|) non-linear least squares by Levenberg-Marquardt with an analytic
    Jacobian, in ``ln R`` and ``ln tau`` (so R, C > 0). Starting points: the peaks of the
    DRT (computed here unless ``drt_result`` is given or ``use_drt`` is False), a
    log-uniform spread of time constants and ``initial`` when given; the best fit wins.
    Arcs come out ordered by time constant: R1/C1 is the fastest (highest frequency) arc.
    """
    f = np.asarray(frequency_hz, dtype=np.float64).reshape(-1)
    zc = np.asarray(z, dtype=np.complex128).reshape(-1)
    if zc.size != f.size or f.size < 2 * n_rc + 2:
        raise ValueError(f"need at least {2 * n_rc + 2} points for {n_rc} arcs")
    if n_rc < 1:
        raise ValueError("n_rc must be >= 1")
    omega = 2.0 * np.pi * f
    d = drt_result
    if d is None and use_drt:
        d = drt(f, zc, inductance=inductance)
    model = _EcmModel(omega, zc, n_rc, inductance, cpe)
    starts = _initial_guesses(f, zc, n_rc, d)
    if initial is not None:
        starts.insert(0, (initial.l_h, initial.r0_ohm, np.asarray(initial.r_ohm), np.asarray(initial.tau_s)))
    best: tuple[float, FloatArray, int, bool] | None = None
    for l_h, r0, r, tau in starts:
        parts = [np.asarray([l_h])] if inductance else []
        parts += [np.asarray([r0]), np.log(np.maximum(r, 1e-15)), np.log(tau)]
        if cpe:
            parts.append(np.full(n_rc, -3.0))
        p0 = np.concatenate(parts)
        p, cost, it, conv = _levenberg_marquardt(model, p0, max_iter)
        if best is None or cost < best[0]:
            best = (cost, p, it, conv)
    assert best is not None
    cost, p, it, conv = best
    l_h, r0, r, tau, alpha = model.unpack(p)
    params = EcmParams(r0, tuple(r.tolist()), tuple(tau.tolist()), tuple(alpha.tolist()), l_h)
    z_fit = params.impedance(f)
    rel = (zc - z_fit) / np.abs(zc)
    rel_rms = float(np.sqrt(np.mean(rel.real**2 + rel.imag**2) / 2.0))
    # the noise as the residuals show it (misfit of the model included), per Z_re / Z_im value
    noise = math.sqrt(cost / max(2 * f.size - p.size, 1))
    order = np.argsort(tau, kind="stable")  # EcmParams sorts its arcs by tau: keep rel_sd in step
    sd = _relative_sd(model, p, noise)
    sd = np.concatenate([sd[:1], sd[1:1 + n_rc][order], sd[1 + n_rc:][order]])
    return EcmFit(params, rel_rms, it, conv, z_fit, sd, d)


def _relative_sd(model: _EcmModel, p: FloatArray, noise: float) -> FloatArray:
    """Relative 1-sigma of R0, R1..Rn, C1..Cn (``C = tau / R``) from the Gauss-Newton
    covariance ``noise^2 (J^T J)^-1`` of the weighted residuals at ``p``."""
    jac, _ = model.jacobian(p)
    scale = np.linalg.norm(jac, axis=0)  # L's column is ~1e7 times the others: equilibrate first
    scale[scale == 0] = 1.0
    js = jac / scale
    cov = noise**2 * np.linalg.pinv(js.T @ js) / np.outer(scale, scale)
    i0, n = model.i0, model.n_rc
    d = np.diag(cov)
    ir, it = slice(i0 + 1, i0 + 1 + n), slice(i0 + 1 + n, i0 + 1 + 2 * n)
    sd_r = np.sqrt(np.maximum(d[ir], 0.0))
    # ln C = ln tau - ln R
    sd_c = np.sqrt(np.maximum(d[it] + d[ir] - 2.0 * np.diag(cov[ir, it]), 0.0))
    r0 = float(p[i0])
    sd_r0 = math.sqrt(max(d[i0], 0.0)) / abs(r0) if r0 != 0 else math.inf
    return np.asarray(np.concatenate([[sd_r0], sd_r, sd_c]), dtype=np.float64)


def parameter_uncertainty(params: EcmParams, frequency_hz: ArrayLike, noise: float = 0.005) -> FloatArray:
    """Cramer-Rao bound: the relative 1-sigma uncertainty of R0, R1..Rn, C1..Cn (ideal RC
    arcs) that no unbiased fit of a spectrum on ``frequency_hz`` can beat when each of Z_re
    and Z_im carries Gaussian noise of ``noise * |Z|``. Tells which parameters a sweep can
    resolve (the cloud can weight or drop the others)."""
    f = np.asarray(frequency_hz, dtype=np.float64).reshape(-1)
    model = _EcmModel(2.0 * np.pi * f, params.impedance(f), len(params.r_ohm), True, False)
    p = np.concatenate([[params.l_h, params.r0_ohm], np.log(params.r_ohm), np.log(params.tau_s)])
    return _relative_sd(model, p, noise)


# ---------------------------------------------------------------------------------------------
# SoT: temperature from an impedance feature, compensated for SoC
# ---------------------------------------------------------------------------------------------

FEATURE_KINDS = ("phase", "log_abs", "log_re", "log_neg_im", "slope_neg_im", "log_im_ratio", "log_apex_freq")


@dataclass(frozen=True)
class SotFeature:
    """An impedance feature evaluated at ``frequency_hz``.

    Values at a frequency come from a local quadratic fit over ``log10 f`` within
    ``band_decades`` of it (which averages the noise of neighbouring points):

    * ``phase``: phase in degrees (the classic SoT feature); ``log_abs``: ln |Z|;
      ``log_re``: ln Z_re; ``log_neg_im``: ln(-Z_im).
    * ``slope_neg_im``: d ln(-Z_im) / d log10 f, the local slope of the imaginary part.
    * ``log_im_ratio``: ln(-Z_im(f)) - ln(-Z_im(f * 10**ref_decades)).
    * ``log_apex_freq``: ln of the frequency where ``-Z_im`` peaks inside
      ``frequency_hz * 10**(+-band_decades)`` (the apex of an arc, ``1/(2 pi tau)``), by a
      parabola through the highest points; NaN when the maximum sits on the band's edge.

    The last three see only the *shape* of ``-Z_im(f)``: they do not change when an aged
    cell's interfacial resistances grow and capacitances shrink by the same factor (lost
    active area keeps the time constants) nor with its ohmic/contact resistance (real
    only), which magnitude and phase features do. Shape features are sensitive to noise,
    so with ``smooth`` a feature is evaluated on the spectrum's DRT model (:func:`drt`, a
    noise-averaged fit of all points) on a grid of 40 points per decade instead of on the
    raw points. Which feature is best is for :func:`calibrate_sot` to find out on
    calibration data.
    """

    kind: str
    frequency_hz: float
    band_decades: float = 0.2
    ref_decades: float = 0.0
    smooth: bool = False

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"unknown SoT feature kind {self.kind!r}; known: {', '.join(FEATURE_KINDS)}")
        if self.frequency_hz <= 0 or self.band_decades <= 0:
            raise ValueError("frequency and band must be > 0")
        if self.kind == "log_im_ratio" and self.ref_decades == 0:
            raise ValueError("log_im_ratio needs ref_decades != 0")

    def label(self) -> str:
        ref = f"/{self.frequency_hz * 10**self.ref_decades:.4g}Hz" if self.kind == "log_im_ratio" else ""
        return f"{self.kind}@{self.frequency_hz:.4g}Hz{ref}{' (DRT-smoothed)' if self.smooth else ''}"


def _local_weights(lf: FloatArray, x0: float, half: float, deriv: int = 0) -> tuple[NDArray[np.intp], FloatArray] | None:
    """Indices and weights so that ``w @ y[idx]`` is the value (``deriv=0``) or slope (1) at
    ``x0`` of a quadratic (fewer points: lower degree) fitted to ``y`` within ``half`` of it."""
    idx = np.flatnonzero(np.abs(lf - x0) <= half + 1e-9)
    xs = lf[idx] - x0
    if xs.size == 0 or xs.max() < -1e-9 or xs.min() > 1e-9:
        return None  # x0 outside the points: no extrapolation
    deg = 2 if xs.size >= 4 else xs.size - 1
    if deg < deriv or (deg == 0 and abs(float(xs[0])) > 1e-6):
        return None
    vander = xs[:, None] ** np.arange(deg + 1)[None, :]
    return idx, np.asarray(np.linalg.pinv(vander)[deriv], dtype=np.float64)


def _local_batch(lf: FloatArray, y: FloatArray, x0: float, half: float, deriv: int = 0) -> FloatArray:
    lw = _local_weights(lf, x0, half, deriv)
    if lw is None:
        return np.full(y.shape[0], math.nan)
    idx, w = lw
    return np.asarray(y[:, idx] @ w, dtype=np.float64)


def _features_batch(f: FloatArray, zs: ComplexArray, feature: SotFeature) -> FloatArray:
    """``feature`` of every row of ``zs`` (spectra on the common grid ``f``); NaN where undefined."""
    lf = np.log10(f)
    x0 = math.log10(feature.frequency_hz)
    half = feature.band_decades
    kind = feature.kind
    m = zs.shape[0]
    if kind == "log_apex_freq":
        sel = np.flatnonzero(np.abs(lf - x0) <= half + 1e-9)
        if sel.size < 3:
            return np.full(m, math.nan)
        order = sel[np.argsort(lf[sel])]
        xs = lf[order]
        y = -zs.imag[:, order]
        i = np.argmax(y, axis=1)
        ok = (i > 0) & (i < order.size - 1)
        i = np.clip(i, 1, order.size - 2)
        rows = np.arange(m)
        xa, xb, xc = xs[i - 1], xs[i], xs[i + 1]
        ya, yb, yc = y[rows, i - 1], y[rows, i], y[rows, i + 1]
        d1 = (yb - ya) / (xb - xa)
        d2 = ((yc - yb) / (xc - xb) - d1) / (xc - xa)
        ok &= d2 < 0
        with np.errstate(divide="ignore", invalid="ignore"):
            vertex = (xa + xb) / 2.0 - d1 / (2.0 * d2)
        return np.where(ok, vertex * math.log(10.0), math.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "phase":
            y = np.degrees(np.arctan2(zs.imag, zs.real))
        elif kind == "log_abs":
            y = np.log(np.abs(zs))
        elif kind == "log_re":
            y = np.where(zs.real > 0, np.log(np.abs(zs.real)), math.nan)
        else:
            y = np.where(zs.imag < 0, np.log(np.abs(zs.imag)), math.nan)
    if kind == "slope_neg_im":
        return _local_batch(lf, y, x0, half, deriv=1)
    if kind == "log_im_ratio":
        return _local_batch(lf, y, x0, half) - _local_batch(lf, y, x0 + feature.ref_decades, half)
    return _local_batch(lf, y, x0, half)


_SMOOTH_PPD = 40


def smoothed_spectrum(frequency_hz: ArrayLike, z: ArrayLike,
                      drt_result: DrtResult | None = None) -> tuple[FloatArray, ComplexArray]:
    """The spectrum's DRT model on a grid of 40 points per decade over the measured range."""
    f = np.asarray(frequency_hz, dtype=np.float64).reshape(-1)
    d = drt_result if drt_result is not None else drt(f, z)
    lo, hi = math.log10(float(f.min())), math.log10(float(f.max()))
    fd = np.logspace(lo, hi, max(2, int(round((hi - lo) * _SMOOTH_PPD)) + 1))
    return fd, d.impedance(fd)


def feature_value(frequency_hz: ArrayLike, z: ArrayLike, feature: SotFeature, *,
                  drt_result: DrtResult | None = None) -> float:
    """Value of ``feature`` for one spectrum (NaN when it cannot be evaluated).

    A ``smooth`` feature needs the spectrum's DRT: pass ``drt_result`` when it is at hand."""
    if feature.smooth:
        fd, zd = smoothed_spectrum(frequency_hz, z, drt_result)
        return _feature_raw(fd, zd, feature)
    return _feature_raw(np.asarray(frequency_hz, dtype=np.float64).reshape(-1),
                        np.asarray(z, dtype=np.complex128).reshape(-1), feature)


def _feature_raw(f: FloatArray, zc: ComplexArray, feature: SotFeature) -> float:
    return float(_features_batch(f, zc[None, :], feature)[0])


def _poly_basis(x: FloatArray, s: FloatArray, dx: int, ds: int) -> FloatArray:
    cols = [x**i * s**j for i in range(dx + 1) for j in range(ds + 1) if i + j <= max(dx, ds)]
    return np.stack(cols, axis=1)


@dataclass(frozen=True)
class SotCalibration:
    """Calibration surface of one chemistry: ``1000 / (T + 273.15) = P(x, soc)``.

    ``x`` is :attr:`feature`'s value normalised by ``(x - x_center) / x_scale`` (likewise
    SoC); ``P`` is a polynomial with powers ``x^i soc^j``, ``i <= degree_x``, ``j <= degree_soc``,
    ``i + j <= max(degree_x, degree_soc)`` in that order. ``cv_rmse_c`` is the cross-validated
    error on the calibration data; ``x_range``, ``soc_range`` and ``t_range_c`` bound where the
    surface was fitted. Serialisable with :meth:`to_dict` / :meth:`from_dict`.
    """

    chemistry: str
    feature: SotFeature
    degree_x: int
    degree_soc: int
    coef: tuple[float, ...]
    x_center: float
    x_scale: float
    soc_center: float
    soc_scale: float
    x_range: tuple[float, float]
    soc_range: tuple[float, float]
    t_range_c: tuple[float, float]
    rmse_c: float
    cv_rmse_c: float
    n_samples: int

    def predict(self, x: ArrayLike, soc: ArrayLike) -> FloatArray:
        xn = (np.asarray(x, dtype=np.float64) - self.x_center) / self.x_scale
        sn = (np.asarray(soc, dtype=np.float64) - self.soc_center) / self.soc_scale
        xn, sn = np.broadcast_arrays(np.atleast_1d(xn), np.atleast_1d(sn))
        y = _poly_basis(xn.reshape(-1), sn.reshape(-1), self.degree_x, self.degree_soc) @ np.asarray(self.coef)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(1000.0 / y - _T0_K, dtype=np.float64).reshape(xn.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chemistry": self.chemistry,
            "feature": {"kind": self.feature.kind, "frequency_hz": self.feature.frequency_hz,
                        "band_decades": self.feature.band_decades, "ref_decades": self.feature.ref_decades,
                        "smooth": self.feature.smooth},
            "degree_x": self.degree_x, "degree_soc": self.degree_soc, "coef": list(self.coef),
            "x_center": self.x_center, "x_scale": self.x_scale, "soc_center": self.soc_center,
            "soc_scale": self.soc_scale, "x_range": list(self.x_range), "soc_range": list(self.soc_range),
            "t_range_c": list(self.t_range_c), "rmse_c": self.rmse_c, "cv_rmse_c": self.cv_rmse_c,
            "n_samples": self.n_samples,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SotCalibration:
        fe = d["feature"]
        return cls(
            chemistry=str(d["chemistry"]),
            feature=SotFeature(str(fe["kind"]), float(fe["frequency_hz"]), float(fe.get("band_decades", 0.2)),
                               float(fe.get("ref_decades", 0.0)), bool(fe.get("smooth", False))),
            degree_x=int(d["degree_x"]), degree_soc=int(d["degree_soc"]),
            coef=tuple(float(c) for c in d["coef"]),
            x_center=float(d["x_center"]), x_scale=float(d["x_scale"]),
            soc_center=float(d["soc_center"]), soc_scale=float(d["soc_scale"]),
            x_range=(float(d["x_range"][0]), float(d["x_range"][1])),
            soc_range=(float(d["soc_range"][0]), float(d["soc_range"][1])),
            t_range_c=(float(d["t_range_c"][0]), float(d["t_range_c"][1])),
            rmse_c=float(d["rmse_c"]), cv_rmse_c=float(d["cv_rmse_c"]), n_samples=int(d["n_samples"]),
        )


def default_sot_candidates(frequency_hz: ArrayLike, *, f_min_hz: float = 0.1, f_max_hz: float = 2000.0,
                           kinds: Sequence[str] = FEATURE_KINDS, band_decades: float = 0.2,
                           smoothing: Sequence[bool] = (False, True)) -> list[SotFeature]:
    """Candidate features: every kind at every measured frequency in ``[f_min_hz, f_max_hz]``,
    on the raw points and on the DRT-smoothed spectrum; slopes with a wider band (0.3
    decade), ratios against 0.5 and 1 decade lower and higher, apex frequencies searched
    within +-1 and +-1.5 decades."""
    f = np.unique(np.asarray(frequency_hz, dtype=np.float64))
    f = f[(f >= f_min_hz) & (f <= f_max_hz)]
    out = []
    for smooth in smoothing:
        for kind in kinds:
            for fr in f:
                if kind == "log_im_ratio":
                    out += [SotFeature(kind, float(fr), band_decades, d, smooth) for d in (-1.0, -0.5, 0.5, 1.0)]
                elif kind == "slope_neg_im":
                    out.append(SotFeature(kind, float(fr), max(band_decades, 0.3), 0.0, smooth))
                elif kind == "log_apex_freq":
                    out += [SotFeature(kind, float(fr), b, 0.0, smooth) for b in (1.0, 1.5)]
                else:
                    out.append(SotFeature(kind, float(fr), band_decades, 0.0, smooth))
    return out


def _fit_surface(x: FloatArray, s: FloatArray, y: FloatArray, dx: int, ds: int, ridge: float) -> FloatArray:
    a = _poly_basis(x, s, dx, ds)
    g = a.T @ a
    g += ridge * np.trace(g) / g.shape[0] * np.eye(g.shape[0])
    return np.asarray(np.linalg.solve(g, a.T @ y), dtype=np.float64)


class _Batch:
    """Spectra grouped by identical frequency grids, so a feature is evaluated for a group at once."""

    def __init__(self, items: Sequence[tuple[FloatArray, ComplexArray]]) -> None:
        self.n = len(items)
        groups: dict[bytes, list[int]] = {}
        for i, (f, _) in enumerate(items):
            groups.setdefault(np.asarray(f, dtype=np.float64).tobytes(), []).append(i)
        self.groups = [(np.asarray(items[idx[0]][0], dtype=np.float64), np.stack([items[i][1] for i in idx]),
                        np.asarray(idx)) for idx in groups.values()]

    def values(self, feature: SotFeature) -> FloatArray:
        out = np.empty(self.n)
        for f, zs, idx in self.groups:
            out[idx] = _features_batch(f, zs, feature)
        return out


def calibrate_sot(spectra: Sequence[EisSpectrum], temperatures_c: ArrayLike, socs: ArrayLike, *,
                  chemistry: str, features: Sequence[SotFeature] | None = None, degree_x: int = 3,
                  degree_soc: int = 2, folds: int = 5, groups: ArrayLike | None = None,
                  ridge: float = 1e-9) -> SotCalibration:
    """Fit the SoT calibration surface of one chemistry from spectra at known T and SoC.

    Every candidate feature (default :func:`default_sot_candidates` of the first spectrum)
    is evaluated on all spectra; a candidate that is NaN for any spectrum is dropped. The
    surface ``1000/T_K = P(x, soc)`` is fitted by (lightly ridge-regularised) least squares
    and the candidate with the lowest cross-validated RMSE in degC wins. ``groups`` (e.g.
    the cell each spectrum came from) makes the cross-validation leave one group out, so
    the choice also accounts for cell-to-cell spread; otherwise ``folds`` interleaved folds.
    """
    t = np.asarray(temperatures_c, dtype=np.float64).reshape(-1)
    soc = np.asarray(socs, dtype=np.float64).reshape(-1)
    m = len(spectra)
    if t.size != m or soc.size != m:
        raise ValueError("need one temperature and one SoC per spectrum")
    if m < 3 * (degree_x + 1) * (degree_soc + 1):
        raise ValueError(f"too few calibration spectra ({m}) for the polynomial degrees")
    cands = list(features) if features is not None else default_sot_candidates(spectra[0].frequency_hz)
    if not cands:
        raise ValueError("no candidate features (is the spectrum's frequency range too narrow?)")
    y = 1000.0 / (t + _T0_K)
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        fold_of = np.unique(g, return_inverse=True)[1]
    else:
        fold_of = np.arange(m) % max(2, folds)
    n_folds = int(fold_of.max()) + 1
    s_center = float(soc.mean())
    s_scale = float(max(np.ptp(soc) / 2.0, 1e-6))
    sn = (soc - s_center) / s_scale
    raw = _Batch([(sp.frequency_hz, sp.z) for sp in spectra])
    smooth = _Batch([smoothed_spectrum(sp.frequency_hz, sp.z) for sp in spectra] if any(c.smooth for c in cands) else [])
    best: tuple[float, SotFeature, FloatArray, float, float] | None = None
    for feat in cands:
        x = (smooth if feat.smooth else raw).values(feat)
        if not np.all(np.isfinite(x)):
            continue
        xc, xs = float(x.mean()), float(max(np.ptp(x) / 2.0, 1e-12))
        xn = (x - xc) / xs
        pred = np.empty(m)
        for k in range(n_folds):
            test = fold_of == k
            if test.all() or not test.any():
                continue
            coef = _fit_surface(xn[~test], sn[~test], y[~test], degree_x, degree_soc, ridge)
            pred[test] = _poly_basis(xn[test], sn[test], degree_x, degree_soc) @ coef
        with np.errstate(divide="ignore", invalid="ignore"):
            err = 1000.0 / pred - _T0_K - t
        cv = float(np.sqrt(np.mean(err**2))) if np.all(np.isfinite(err)) else math.inf
        if best is None or cv < best[0]:
            best = (cv, feat, x, xc, xs)
    if best is None:
        raise ValueError("no candidate feature could be evaluated on every calibration spectrum")
    cv, feat, x, xc, xs = best
    xn = (x - xc) / xs
    coef = _fit_surface(xn, sn, y, degree_x, degree_soc, ridge)
    fit_t = 1000.0 / (_poly_basis(xn, sn, degree_x, degree_soc) @ coef) - _T0_K
    return SotCalibration(
        chemistry=chemistry, feature=feat, degree_x=degree_x, degree_soc=degree_soc,
        coef=tuple(float(c) for c in coef), x_center=xc, x_scale=xs, soc_center=s_center, soc_scale=s_scale,
        x_range=(float(x.min()), float(x.max())), soc_range=(float(soc.min()), float(soc.max())),
        t_range_c=(float(t.min()), float(t.max())), rmse_c=float(np.sqrt(np.mean((fit_t - t) ** 2))),
        cv_rmse_c=cv, n_samples=m)


@dataclass(frozen=True)
class SotEstimate:
    """Cell temperature from impedance. ``extrapolated``: the feature or SoC lay outside the
    calibration data (the value is less trustworthy); ``sigma_c``: the calibration's CV error."""

    temperature_c: float
    feature_value: float
    extrapolated: bool
    sigma_c: float

    def to_dict(self) -> dict[str, Any]:
        return {"temperature_c": self.temperature_c, "feature_value": self.feature_value,
                "extrapolated": self.extrapolated, "sigma_c": self.sigma_c}


def estimate_temperature(spectrum: EisSpectrum, calibration: SotCalibration, soc: float | None = None, *,
                         drt_result: DrtResult | None = None) -> SotEstimate:
    """SoT of one spectrum: the calibration's feature, then its surface at the given SoC
    (default: the spectrum's mean SoC at measurement time). NaN when the feature cannot
    be evaluated (frequency not measured, no apex in the band) or the SoC is unknown.
    ``drt_result``: the spectrum's DRT, if already computed (smoothed features use it)."""
    s = spectrum.mean_soc if soc is None else float(soc)
    x = feature_value(spectrum.frequency_hz, spectrum.z, calibration.feature, drt_result=drt_result)
    if not (math.isfinite(x) and math.isfinite(s)):
        return SotEstimate(math.nan, x, True, calibration.cv_rmse_c)
    t = float(calibration.predict(x, s)[0])
    xr, sr = calibration.x_range, calibration.soc_range
    mx = 0.02 * (xr[1] - xr[0])
    extrap = not (xr[0] - mx <= x <= xr[1] + mx and sr[0] - 0.02 <= s <= sr[1] + 0.02)
    return SotEstimate(t, x, extrap, calibration.cv_rmse_c)


@dataclass(frozen=True)
class SotMismatch:
    """SoT versus the temperature sensor. ``kind``: ``ok``; ``sot_above_sensor`` (internal
    heating, or a sensor reading low / detached); ``sot_below_sensor`` (sensor reading high);
    ``unknown`` (one of the two is missing)."""

    warning: bool
    kind: str
    delta_c: float
    threshold_c: float

    def to_dict(self) -> dict[str, Any]:
        return {"warning": self.warning, "kind": self.kind, "delta_c": self.delta_c, "threshold_c": self.threshold_c}


def sot_mismatch(sot_c: float, sensor_c: float, *, threshold_c: float = 4.0, sigma_c: float = 0.0) -> SotMismatch:
    """Warn when |SoT - sensor| exceeds ``threshold_c`` plus twice the SoT uncertainty ``sigma_c``."""
    if not (math.isfinite(sot_c) and math.isfinite(sensor_c)):
        return SotMismatch(False, "unknown", math.nan, threshold_c)
    delta = sot_c - sensor_c
    limit = threshold_c + 2.0 * max(sigma_c, 0.0)
    if delta > limit:
        return SotMismatch(True, "sot_above_sensor", delta, limit)
    if delta < -limit:
        return SotMismatch(True, "sot_below_sensor", delta, limit)
    return SotMismatch(False, "ok", delta, limit)


# ---------------------------------------------------------------------------------------------
# all together
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EisAnalysis:
    """KK verdict always; SoT, mismatch, DRT and fit only for a valid spectrum."""

    spectrum: EisSpectrum
    kk: KKResult
    sot: SotEstimate | None = None
    mismatch: SotMismatch | None = None
    drt: DrtResult | None = None
    fit: EcmFit | None = None

    @property
    def valid(self) -> bool:
        return self.kk.valid

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "kk": self.kk.to_dict(),
                "sot": self.sot.to_dict() if self.sot else None,
                "mismatch": self.mismatch.to_dict() if self.mismatch else None,
                "drt": self.drt.to_dict() if self.drt else None,
                "fit": self.fit.to_dict() if self.fit else None}


def analyze_spectrum(spectrum: EisSpectrum, *, calibration: SotCalibration | None = None,
                     sensor_temperature_c: float | None = None, soc: float | None = None,
                     fit: bool = True, n_rc: int = 4, cpe: bool = False, mismatch_threshold_c: float = 4.0,
                     kk_options: Mapping[str, Any] | None = None) -> EisAnalysis:
    """Validate a spectrum (lin-KK); if valid, estimate SoT (with ``calibration``), compare it
    with ``sensor_temperature_c`` (default: the spectrum's mean sensor temperature), and fit
    the DRT and the equivalent circuit. An invalid spectrum is returned with its KK verdict only."""
    kk = lin_kk(spectrum.frequency_hz, spectrum.z, **dict(kk_options or {}))
    if not kk.valid:
        return EisAnalysis(spectrum, kk)
    d = drt(spectrum.frequency_hz, spectrum.z)
    sot = mism = None
    if calibration is not None:
        sot = estimate_temperature(spectrum, calibration, soc, drt_result=d)
        sensor = spectrum.mean_temperature_c if sensor_temperature_c is None else sensor_temperature_c
        mism = sot_mismatch(sot.temperature_c, sensor, threshold_c=mismatch_threshold_c, sigma_c=sot.sigma_c)
    ecm = None
    if fit and spectrum.n >= 2 * n_rc + 2:
        ecm = fit_ecm(spectrum.frequency_hz, spectrum.z, n_rc=n_rc, cpe=cpe, drt_result=d)
    return EisAnalysis(spectrum, kk, sot, mism, d, ecm)
