"""State of safety inputs: a lithium-plating indicator and a per-cell safety level.

Lithium plating: metallic lithium plated during a charge re-intercalates (or
strips) during the rest that follows, which holds the cell voltage on a small
plateau; when that ends the voltage falls faster again. Without plating the
post-charge relaxation decays monotonically: ``|dV/dt|`` only shrinks. The
detector records every cell's voltage during the first ``window_s`` of a rest
that follows a charge, averages it in bins spaced evenly in log(time), and scores
the significant rise of ``|dV/dt|`` over its running minimum (mV/min, beyond the
noise): a "bump" in the relaxation rate is the plating signature (differential
voltage relaxation analysis). Cells whose score exceeds ``threshold_mv_per_min``
are flagged.

Safety level per cell (0 ok, 1 attention, 2 warning, 3 critical) combines the
protection's active level per cell, the proximity of voltage and temperature to
their limits, the plating flag and (optional) an EIS-based temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["PlatingConfig", "PlatingDetector", "PlatingResult", "SafetyConfig", "SafetyReason", "plating_score",
           "safety_levels", "worst"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class PlatingConfig:
    """Thresholds of :class:`PlatingDetector` (A, Ah, s, mV/min)."""

    charge_current_a: float = 1.0
    min_charge_ah: float = 0.5
    rest_current_a: float = 0.5
    window_s: float = 3600.0
    first_bin_s: float = 60.0
    bins: int = 12
    threshold_mv_per_min: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.first_bin_s < self.window_s or self.bins < 4:
            raise ValueError("need 0 < first_bin_s < window_s and bins >= 4")
        if min(self.charge_current_a, self.min_charge_ah, self.rest_current_a, self.threshold_mv_per_min) < 0.0:
            raise ValueError("thresholds must be >= 0")


@dataclass(frozen=True)
class PlatingResult:
    """Outcome of one analysed rest: per-cell score (mV/min) and flag."""

    score_mv_per_min: FloatArray
    flagged: NDArray[np.bool_]
    charge_ah: float
    rest_s: float


def plating_score(t_s: ArrayLike, v: ArrayLike, first_bin_s: float = 60.0, bins: int = 12,
                  k_sigma: float = 3.0) -> FloatArray:
    """Significant bump of ``|dV/dt|`` (mV/min) in a post-charge relaxation; ``v`` is
    (samples, cells).

    Samples are averaged in log-spaced bins from ``first_bin_s`` to the last time, and
    the relaxation rate is taken between neighbouring bins. The score is how far the
    rate's lower confidence bound (``k_sigma`` standard deviations, from the sample noise
    estimated per cell) rises above the lowest upper bound seen before: 0 for a
    monotonic relaxation, whatever the noise.
    """
    t = np.asarray(t_s, dtype=np.float64)
    volt = np.asarray(v, dtype=np.float64)
    if volt.ndim == 1:
        volt = volt[:, None]
    n_cells = volt.shape[1]
    edges = np.geomspace(first_bin_s, max(t[-1], first_bin_s * 2.0), bins + 1)
    idx = np.digitize(t, edges) - 1
    use = (idx >= 0) & (idx < bins)
    count = np.bincount(idx[use], minlength=bins).astype(np.float64)
    have = count > 0
    if have.sum() < 4:
        return np.zeros(n_cells)
    n_b = count[have]
    tb = np.bincount(idx[use], weights=t[use], minlength=bins)[have] / n_b
    sums = np.stack([np.bincount(idx[use], weights=col, minlength=bins)[have] for col in volt[use].T], axis=1)
    vb = np.asarray(sums, dtype=np.float64) / n_b[:, None]
    # Sample noise per cell from successive differences (robust to the slow trend).
    noise = np.median(np.abs(np.diff(volt[use], axis=0)), axis=0) / (0.6745 * np.sqrt(2.0))
    noise = np.maximum(noise, 1e-5)
    dt = np.diff(tb)
    # After a charge the voltage falls: the relaxation rate is -dV/dt (> 0), in mV/min.
    rate = -np.diff(vb, axis=0) / dt[:, None] * 60e3
    sigma = noise[None, :] * np.sqrt(1.0 / n_b[1:] + 1.0 / n_b[:-1])[:, None] / dt[:, None] * 60e3
    upper = np.minimum.accumulate(rate + k_sigma * sigma, axis=0)
    bump = (rate[1:] - k_sigma * sigma[1:]) - upper[:-1]
    return np.asarray(np.maximum(bump.max(axis=0), 0.0), dtype=np.float64)


class PlatingDetector:
    """Watches charge -> rest transitions and scores each rest (see module docstring)."""

    def __init__(self, n_cells: int, config: PlatingConfig | None = None) -> None:
        self.n_cells = int(n_cells)
        self.config = config or PlatingConfig()
        self._charge_ah = 0.0
        self._t: list[float] = []
        self._v: list[FloatArray] = []
        self._rest_s = -1.0  # < 0: not recording
        self.last: PlatingResult | None = None

    def step(self, dt_s: float, current_a: float, cell_v: ArrayLike) -> PlatingResult | None:
        """Feed one sample; returns a result when a post-charge rest window completes."""
        c = self.config
        dt = max(0.0, float(dt_s))
        if current_a >= c.charge_current_a:
            self._charge_ah += current_a * dt / 3600.0
            self._rest_s = -1.0
            self._t, self._v = [], []
            return None
        if abs(current_a) > c.rest_current_a:  # discharge or a small charge
            if self._rest_s >= 0.0:
                return self._finish()
            self._charge_ah = 0.0
            return None
        if self._rest_s < 0.0:
            if self._charge_ah < c.min_charge_ah:
                self._charge_ah = 0.0
                return None
            self._rest_s = 0.0
        else:
            self._rest_s += dt
        self._t.append(self._rest_s)
        self._v.append(np.asarray(cell_v, dtype=np.float64).copy())
        if self._rest_s >= c.window_s:
            return self._finish()
        return None

    def _finish(self) -> PlatingResult | None:
        c = self.config
        rest_s, charge_ah = self._rest_s, self._charge_ah
        t, v = np.asarray(self._t), np.asarray(self._v)
        self._rest_s, self._charge_ah, self._t, self._v = -1.0, 0.0, [], []
        if rest_s < 4.0 * c.first_bin_s:
            return None  # too short to tell
        score = plating_score(t, v, c.first_bin_s, c.bins)
        self.last = PlatingResult(score, score > c.threshold_mv_per_min, charge_ah, rest_s)
        return self.last


class SafetyReason(IntFlag):
    """Why a cell's safety level is raised (bit mask per cell)."""

    NONE = 0
    PROTECTION = 1
    VOLTAGE_NEAR_LIMIT = 2
    TEMPERATURE_NEAR_LIMIT = 4
    PLATING = 8
    EIS_TEMPERATURE = 16
    EIS_SENSOR_MISMATCH = 32
    DATA_MISSING = 64


@dataclass(frozen=True)
class SafetyConfig:
    """Limits and margins of :func:`safety_levels` (V, degC)."""

    v_max: float = 4.2
    v_min: float = 3.0
    t_max_c: float = 55.0
    t_min_c: float = -20.0
    v_margin_attention: float = 0.05
    v_margin_warning: float = 0.02
    t_margin_attention: float = 10.0
    t_margin_warning: float = 5.0
    eis_mismatch_c: float = 8.0

    def __post_init__(self) -> None:
        if not self.v_min < self.v_max or not self.t_min_c < self.t_max_c:
            raise ValueError("limits must satisfy min < max")
        if not 0.0 <= self.v_margin_warning <= self.v_margin_attention:
            raise ValueError("need 0 <= v_margin_warning <= v_margin_attention")
        if not 0.0 <= self.t_margin_warning <= self.t_margin_attention:
            raise ValueError("need 0 <= t_margin_warning <= t_margin_attention")


def _proximity(x: FloatArray, lo: float, hi: float, attention: float, warning: float) -> NDArray[np.int8]:
    gap = np.minimum(hi - x, x - lo)
    level = np.where(gap <= warning, 2, np.where(gap <= attention, 1, 0))
    return np.where(gap <= 0.0, 3, level).astype(np.int8)


def safety_levels(cell_v: ArrayLike, cell_temp_c: ArrayLike, protection_level: ArrayLike | None = None,
                  plating: ArrayLike | None = None, eis_temp_c: ArrayLike | None = None,
                  config: SafetyConfig | None = None) -> tuple[NDArray[np.int8], NDArray[np.int16]]:
    """Per-cell safety level (0..3) and :class:`SafetyReason` bits.

    ``protection_level``: the protection's active level per cell (0 none, 1 MOL, 2 RSL,
    3 MSL); ``plating``: per-cell flag from :class:`PlatingDetector`; ``eis_temp_c``:
    per-cell temperature from EIS (NaN where unknown), checked against the limits and
    against the sensor temperature. Missing voltage or temperature counts as a warning.
    """
    c = config or SafetyConfig()
    v = np.asarray(cell_v, dtype=np.float64)
    t = np.broadcast_to(np.asarray(cell_temp_c, dtype=np.float64), v.shape)
    level = np.zeros(v.shape, dtype=np.int8)
    reason = np.zeros(v.shape, dtype=np.int16)

    def raise_to(mask: NDArray[np.bool_] | NDArray[np.int8], lvl: NDArray[np.int8] | int, bit: SafetyReason) -> None:
        nonlocal level
        m = np.asarray(mask, dtype=np.bool_)
        level = np.where(m, np.maximum(level, lvl), level).astype(np.int8)
        reason[m] |= int(bit)

    missing = ~(np.isfinite(v) & np.isfinite(t))
    raise_to(missing, 2, SafetyReason.DATA_MISSING)
    pv = _proximity(np.where(np.isfinite(v), v, 0.5 * (c.v_min + c.v_max)), c.v_min, c.v_max,
                    c.v_margin_attention, c.v_margin_warning)
    raise_to(pv > 0, pv, SafetyReason.VOLTAGE_NEAR_LIMIT)
    pt = _proximity(np.where(np.isfinite(t), t, 0.5 * (c.t_min_c + c.t_max_c)), c.t_min_c, c.t_max_c,
                    c.t_margin_attention, c.t_margin_warning)
    raise_to(pt > 0, pt, SafetyReason.TEMPERATURE_NEAR_LIMIT)
    if protection_level is not None:
        p = np.clip(np.broadcast_to(np.asarray(protection_level), v.shape).astype(np.int8), 0, 3)
        raise_to(p > 0, p, SafetyReason.PROTECTION)
    if plating is not None:
        raise_to(np.broadcast_to(np.asarray(plating, dtype=np.bool_), v.shape), 2, SafetyReason.PLATING)
    if eis_temp_c is not None:
        te = np.broadcast_to(np.asarray(eis_temp_c, dtype=np.float64), v.shape)
        known = np.isfinite(te)
        pe = _proximity(np.where(known, te, 0.5 * (c.t_min_c + c.t_max_c)), c.t_min_c, c.t_max_c,
                        c.t_margin_attention, c.t_margin_warning)
        raise_to(known & (pe > 0), pe, SafetyReason.EIS_TEMPERATURE)
        # The core runs hotter than the sensor on the module: a large gap is a warning
        # of internal heating that the sensors do not see (yet).
        gap = np.where(known & np.isfinite(t), te - t, 0.0)
        raise_to(gap > c.eis_mismatch_c, 2, SafetyReason.EIS_SENSOR_MISMATCH)
    return level, reason


def worst(levels: ArrayLike) -> int:
    """The pack's safety level: the worst cell's."""
    a = np.asarray(levels)
    return int(a.max()) if a.size else 0

