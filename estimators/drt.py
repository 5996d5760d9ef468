"""Distribution of relaxation times: Tikhonov-regularised, non-negative. Pure numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .lsq import nnls_gram, weighted_system
from .spectrum import ComplexArray, FloatArray

__all__ = ["DrtResult", "drt"]


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
    a, b = weighted_system(omega, zc, cols)
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
