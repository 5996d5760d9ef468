"""Linear Kramers-Kronig test of impedance spectra (Schoenleitner et al. 2015). Pure numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .lsq import weighted_system
from .spectrum import ComplexArray, FloatArray

__all__ = ["KKResult", "lin_kk"]

# what a spectrum must cover before its verdict means anything: the KK fit of a narrower (or
# one-frequency) spectrum fits anything, and every estimate downstream would be made up
MIN_FREQUENCIES = 5  # distinct: at least 0.001 decade apart
MIN_DECADES = 1.0


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

    @classmethod
    def invalid(cls, n: int, reason: str) -> KKResult:
        """The verdict of a spectrum that could not be tested: invalid, no fit, no residuals."""
        nan = np.full(n, math.nan)
        return cls(False, reason, 0, math.nan, nan, nan.copy(), math.nan, math.nan, nan.astype(np.complex128))

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

    The spectrum is *valid* when it has at least ``MIN_FREQUENCIES`` distinct frequencies over
    ``MIN_DECADES`` (otherwise it is not tested), the rms residual is <= ``rms_limit``, no
    residual exceeds ``max_limit`` and the rms residual of the ``low_freq_points`` lowest
    frequencies (where drift shows first: a DC drift leaks into a point as ``~1/f``) is
    <= ``low_freq_limit``.
    Unset limits follow the module's relative noise ``noise`` (standard deviation of each
    of Z_re, Z_im relative to |Z|): 2.5x, 6.5x and 2.5x of it.
    """
    f = np.asarray(frequency_hz, dtype=np.float64).reshape(-1)
    zc = np.asarray(z, dtype=np.complex128).reshape(-1)
    n = f.size
    if n < 5 or zc.size != n:
        raise ValueError("lin-KK needs at least 5 points and one impedance per frequency")
    if not np.all(np.isfinite(f) & (f > 0)):
        return KKResult.invalid(n, "a frequency is not finite and positive")
    logf = np.log10(f)
    distinct, decades = np.unique(np.round(logf, 3)).size, float(np.ptp(logf))
    if distinct < MIN_FREQUENCIES or decades < MIN_DECADES - 1e-9:
        return KKResult.invalid(n, f"{distinct} distinct frequencies over {decades:.2f} decades: too few to test "
                                   f"(at least {MIN_FREQUENCIES} over {MIN_DECADES:g} decade)")
    rms_limit = 2.5 * noise if rms_limit is None else rms_limit
    max_limit = 6.5 * noise if max_limit is None else max_limit
    low_freq_limit = 2.5 * noise if low_freq_limit is None else low_freq_limit
    omega = 2.0 * np.pi * f
    wmin, wmax = float(omega.min()), float(omega.max())
    extra: list[ComplexArray] = [np.ones(n, dtype=np.complex128)]
    if inductance:
        extra.append(np.asarray(1j * omega / wmax, dtype=np.complex128))
    if capacitance:
        extra.append(np.asarray(-1j * wmin / omega, dtype=np.complex128))
    extra_cols = np.stack(extra, axis=1)
    m_max = max_elements if max_elements is not None else max(3, n - extra_cols.shape[1] - 1)
    m_max = min(m_max, 2 * n - extra_cols.shape[1] - 1)
    # mu is not monotonic in M: with too few elements it can dip below c by accident while the
    # fit is still poor, so start from about 1.5 elements per decade (never fewer than 3)
    m_min = min(m_max, max(3, min_elements if min_elements is not None else int(math.ceil(1.5 * decades)) + 1))
    best: tuple[int, float, ComplexArray] | None = None
    for m in range(m_min, m_max + 1):
        tau = np.logspace(math.log10(1.0 / wmax), math.log10(1.0 / wmin), m)
        cols = np.concatenate([extra_cols, 1.0 / (1.0 + 1j * omega[:, None] * tau[None, :])], axis=1)
        a, b = weighted_system(omega, zc, cols)
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
