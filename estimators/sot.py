"""SoT: cell temperature from an impedance feature, compensated for SoC. Pure numpy.

:func:`feature_value` (phase, log magnitude, ... at a frequency, or the apex frequency of
an arc), :func:`calibrate_sot` (fits the calibration surface ``1000 / T_K = P(feature, SoC)``
from spectra at known T and SoC, choosing the feature and frequency by cross-validation),
:func:`estimate_temperature`, :func:`sot_mismatch`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .drt import DrtResult, drt
from .spectrum import ComplexArray, EisSpectrum, FloatArray

__all__ = ["FEATURE_KINDS", "SotCalibration", "SotEstimate", "SotFeature", "SotMismatch", "calibrate_sot",
           "default_sot_candidates", "estimate_temperature", "feature_value", "smoothed_spectrum", "sot_mismatch"]

_T0_K = 273.15

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
