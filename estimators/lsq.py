"""Linear least squares for the EIS estimators: the 1/|Z|-weighted system and NNLS."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .spectrum import ComplexArray, FloatArray

__all__ = ["nnls", "nnls_gram", "weighted_system"]


def weighted_system(omega: FloatArray, z: ComplexArray, columns: ComplexArray) -> tuple[FloatArray, FloatArray]:
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
