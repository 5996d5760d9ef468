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
are flagged; a cell with too few valid samples in the rest scores NaN (unknown,
which the safety level counts as missing data, not as "no plating").

Safety level per cell (0 ok, 1 attention, 2 warning, 3 critical) combines the
protection's active level per cell, the proximity of voltage and temperature to
their limits, the plating flag and (optional) an EIS-based temperature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntFlag
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["PlatingConfig", "PlatingDetector", "PlatingResult", "SafetyConfig", "SafetyReason", "plating_score",
           "safety_levels", "worst"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class PlatingConfig:
    """Thresholds of :class:`PlatingDetector` (A, Ah, s, mV/min, V).

    A charge begins at ``charge_current_a``; below it, down to ``rest_current_a``, a charge
    goes on (a CV taper, a ramp-down at its end) and adds to it. ``quantum_v`` is the cell
    voltages' resolution: 1 mV is what the pack DBC (``dbc/bmsgw_pack.dbc``) carries.
    """

    charge_current_a: float = 1.0
    min_charge_ah: float = 0.5
    rest_current_a: float = 0.5
    window_s: float = 3600.0
    first_bin_s: float = 60.0
    bins: int = 12
    threshold_mv_per_min: float = 0.05
    quantum_v: float = 0.001

    def __post_init__(self) -> None:
        if not 0.0 < self.first_bin_s < self.window_s or self.bins < 4:
            raise ValueError("need 0 < first_bin_s < window_s and bins >= 4")
        if min(self.charge_current_a, self.min_charge_ah, self.rest_current_a, self.threshold_mv_per_min,
               self.quantum_v) < 0.0:
            raise ValueError("thresholds must be >= 0")


@dataclass(frozen=True)
class PlatingResult:
    """Outcome of one analysed rest: per-cell score (mV/min) and flag."""

    score_mv_per_min: FloatArray
    flagged: NDArray[np.bool_]
    charge_ah: float
    rest_s: float

    @property
    def plating(self) -> FloatArray:
        """Per cell 1.0 flagged, 0.0 not, NaN where the score is unknown (the ``plating`` of :func:`safety_levels`)."""
        return np.where(np.isfinite(self.score_mv_per_min), self.flagged.astype(np.float64), np.nan)


def plating_score(t_s: ArrayLike, v: ArrayLike, first_bin_s: float = 60.0, bins: int = 12,
                  k_sigma: float = 3.0, quantum_v: float = 0.001) -> FloatArray:
    """Significant bump of ``|dV/dt|`` (mV/min) in a post-charge relaxation; ``v`` is
    (samples, cells), NaN where a sample is invalid.

    Each cell's valid samples are averaged in log-spaced bins from ``first_bin_s`` to the
    last time, and the relaxation rate is taken between neighbouring bins. The score is how
    far the rate's lower confidence bound (``k_sigma`` standard deviations, from the sample
    noise estimated per cell, at least the quantisation noise of ``quantum_v`` steps) rises
    above the lowest upper bound seen before: 0 for a monotonic relaxation, whatever the
    noise. NaN for a cell whose valid samples fill fewer than 4 bins.
    """
    t = np.asarray(t_s, dtype=np.float64)
    volt = np.asarray(v, dtype=np.float64)
    if volt.ndim == 1:
        volt = volt[:, None]
    edges = np.geomspace(first_bin_s, max(t[-1], first_bin_s * 2.0), bins + 1)
    idx = np.digitize(t, edges) - 1
    use = (idx >= 0) & (idx < bins)
    # With 1 mV steps and little analogue noise most successive differences are 0: their median
    # would claim a noise far below the rounding's, and rounding artefacts would read as bumps.
    floor = max(quantum_v / np.sqrt(12.0), 1e-5)
    return np.array([_cell_score(t[use], idx[use], col, bins, k_sigma, floor) for col in volt[use].T],
                    dtype=np.float64)


def _cell_score(t: FloatArray, idx: NDArray[np.intp], v: FloatArray, bins: int, k_sigma: float,
                noise_floor: float) -> float:
    """:func:`plating_score` of one cell from its binned samples (the invalid ones left out)."""
    ok = np.isfinite(v)
    t, idx, v = t[ok], idx[ok], v[ok]
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    have = count > 0
    if have.sum() < 4:
        return math.nan  # too little to tell: unknown, not "no plating"
    n_b = count[have]
    tb = np.bincount(idx, weights=t, minlength=bins)[have] / n_b
    vb = np.bincount(idx, weights=v, minlength=bins)[have] / n_b
    # Sample noise from the second differences (blind to the relaxation's slow trend). Their RMS,
    # not their median: with voltages rounded to 1 mV most differences are 0, and a median then
    # claims less noise than the samples carry, so rounding steps between bins read as bumps.
    d2 = np.diff(v, 2)
    noise = max(math.sqrt(float(np.mean(d2 * d2)) / 6.0) if d2.size else 0.0, noise_floor)
    dt = np.diff(tb)
    # After a charge the voltage falls: the relaxation rate is -dV/dt (> 0), in mV/min.
    rate = -np.diff(vb) / dt * 60e3
    sigma = noise * np.sqrt(1.0 / n_b[1:] + 1.0 / n_b[:-1]) / dt * 60e3
    upper = np.minimum.accumulate(rate + k_sigma * sigma)
    bump = (rate[1:] - k_sigma * sigma[1:]) - upper[:-1]
    return max(float(bump.max()), 0.0)


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
        """Feed one sample; returns a result when a post-charge rest window completes.

        A charge (from ``charge_current_a`` on, and below it down to ``rest_current_a`` once
        begun: a CV taper or a ramp-down at its end) adds to the accumulated charge and holds
        off the rest; only a discharge ends a rest early or discards the charge.
        """
        c = self.config
        dt = max(0.0, float(dt_s))
        current_a = float(current_a)
        charging = current_a >= c.charge_current_a or (current_a > c.rest_current_a and self._charge_ah > 0.0)
        if charging:
            self._charge_ah += current_a * dt / 3600.0
            self._rest_s = -1.0
            self._t, self._v = [], []
            return None
        if current_a > c.rest_current_a:  # a small charge with none before it: not a rest, nothing to add to
            return None
        if current_a < -c.rest_current_a:  # a discharge
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
        score = plating_score(t, v, c.first_bin_s, c.bins, quantum_v=c.quantum_v)
        self.last = PlatingResult(score, score > c.threshold_mv_per_min, charge_ah, rest_s)
        return self.last

    def export_state(self) -> dict[str, Any] | None:
        """The last analysed rest as plain data (None before any): what a restart must not forget.

        A rest being recorded is not kept: after a restart its time base would be wrong.
        """
        r = self.last
        if r is None:
            return None
        return {"n_cells": self.n_cells, "charge_ah": r.charge_ah, "rest_s": r.rest_s,
                "score_mv_per_min": [x if math.isfinite(x) else None for x in r.score_mv_per_min.tolist()],
                "flagged": r.flagged.tolist()}

    def import_state(self, d: Mapping[str, Any] | None) -> None:
        """Restore :meth:`export_state` output; ValueError (nothing changed) if it does not fit."""
        if d is None:
            self.last = None
            return
        if d.get("n_cells") != self.n_cells:
            raise ValueError("plating state is for another cell count")
        score = np.asarray([math.nan if x is None else x for x in d["score_mv_per_min"]], dtype=np.float64)
        flagged = np.asarray(d["flagged"], dtype=np.bool_)
        if score.shape != (self.n_cells,) or flagged.shape != (self.n_cells,):
            raise ValueError(f"plating state: expected {self.n_cells} cells")
        if np.any(np.isinf(score)) or np.any(flagged & ~np.isfinite(score)):
            raise ValueError("plating state: malformed scores")
        self.last = PlatingResult(score, flagged, float(d["charge_ah"]), float(d["rest_s"]))


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
    3 MSL); ``plating``: per-cell flag from :class:`PlatingDetector`, NaN where the last
    rest could not tell (missing data, a warning like any other); ``eis_temp_c``:
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
        pl = np.broadcast_to(np.asarray(plating, dtype=np.float64), v.shape)
        unknown = np.isnan(pl)  # unknown is not "no plating"
        raise_to(unknown, 2, SafetyReason.DATA_MISSING)
        raise_to(~unknown & (pl != 0.0), 2, SafetyReason.PLATING)
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

