"""Equivalent-circuit fit of an impedance spectrum: ``L + R0 + n x (R || C)`` or ``R || CPE``.

Levenberg-Marquardt from the DRT's peaks; arcs are always reported ordered by time
constant (R1C1 fastest), so labels never swap between fits. :meth:`EcmParams.as_cloud`
gives the cloud's R0, R1..R4, C1..C4. Pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .drt import DrtResult, drt
from .spectrum import ComplexArray, FloatArray

__all__ = ["EcmFit", "EcmParams", "fit_ecm", "parameter_uncertainty"]


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
