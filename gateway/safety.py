"""State-of-safety inputs in the process image: the plating indicator and each cell's safety level.

Once a second (P2) the daemon combines, per cell (estimators/sos.py): the protection's active
conditions, how close voltage and temperature (its module's sensor nearest a limit; unknown
counts as missing data) are to their MSL, the lithium-plating flag
of the last post-charge rest, and the EIS temperature (SoT) where a recent sweep measured
one. The results are image signals like any other: ``cell[N].safety_level`` (0 ok,
1 attention, 2 warning, 3 critical), ``cell[N].safety_reason`` (bits of
:class:`estimators.sos.SafetyReason`), ``cell[N].plating`` (the last rest's score, mV/min;
invalid where the rest could not tell, which counts as missing data) and
``pack.safety_level`` (the worst cell). They share one source with a 1 s cycle, so they
read stale when this loop stops. The daemon hands it the :class:`gateway.estimation.Estimation`'s
plating detector, so the last rest's flags persist with that state across restarts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from estimators.sos import PlatingDetector, PlatingResult, SafetyConfig, safety_levels, worst
from gateway.events import Level
from gateway.image import ProcessImage, Quality
from gateway.limits import LimitTable
from gateway.pipeline import Layout

PERIOD_S = 1.0
PLATING_EVERY = 5  # the detector keeps an hour of rest: every 5th second is plenty, and 5x less memory
SOT_MAX_AGE_S = 3600.0  # an older SoT says nothing about the cell's temperature now
SLOT = "estimators:safety"

Inputs = tuple[np.ndarray, np.ndarray, np.ndarray, float, float]


def safety_slots(layout: Layout) -> dict[str, tuple[float | None, list[str]]]:
    """The image source of the safety signals."""
    cells = [f"cell[{i}].{name}" for i in range(layout.cells) for name in ("safety_level", "safety_reason", "plating")]
    return {SLOT: (PERIOD_S, [*cells, "pack.safety_level"])}


def safety_families(layout: Layout) -> dict[str, tuple[int, ...]]:
    return {f"cell.{name}": (layout.cells,) for name in ("safety_level", "safety_reason", "plating")}


def protection_levels(alarms: Sequence[dict[str, Any]], layout: Layout) -> np.ndarray:
    """Per cell, the highest level of the protection's active conditions (gateway.protection.Protection.active:
    cell checks count per cell, temperature sensors for their module's cells, pack-wide ones for all)."""
    n = layout.cells
    n_sensors = layout.modules * layout.sensors_per_module
    out = np.zeros(n, dtype=np.int8)
    for a in alarms:
        level, k, check = int(Level[a["level"]]), int(a["element"]), str(a["check"])
        cells: slice | int
        per_cell = check in ("cell_deep_discharge", "cell.voltage_bad_data") or (
            check.startswith("cell_voltage_") and check != "cell_voltage_spread")
        per_sensor = check == "module.temperature_bad_data" or (
            check.startswith("cell_temperature_") and check != "cell_temperature_spread")
        if check == "stale_data":  # elements: cells, then sensors, then the current
            per_cell, per_sensor = k < n, n <= k < n + n_sensors
            k = k - n if per_sensor else k
        if per_cell and k < n:
            cells = k
        elif per_sensor and layout.sensors_per_module:
            m = k // layout.sensors_per_module
            cells = slice(m * layout.cells_per_module, (m + 1) * layout.cells_per_module)
        else:
            cells = slice(None)
        out[cells] = np.maximum(out[cells], level)
    return out


def _nearest_limit(cell_t: np.ndarray, n: int, config: SafetyConfig) -> np.ndarray:
    """Per cell, of its sensor temperatures (one or more per cell) the one nearest a limit; NaN if any is unknown."""
    t = np.asarray(cell_t, dtype=np.float64).reshape(n, -1)
    lo, hi = t.min(axis=1), t.max(axis=1)  # a NaN makes both NaN: missing data
    mid = 0.5 * (config.t_min_c + config.t_max_c)
    return np.where(hi - mid >= mid - lo, hi, lo)


class SafetyIndicators:
    """The P2 safety step: reads the estimators' inputs, writes the safety signals into the image."""

    def __init__(self, image: ProcessImage, layout: Layout, inputs: Callable[[float], Inputs | None],
                 plating: PlatingDetector | None = None) -> None:
        """``plating``: the detector to run (the daemon passes the Estimation's, which persists its flags)."""
        self.image = image
        self.layout = layout
        self.inputs = inputs
        self.plating = PlatingDetector(layout.cells) if plating is None else plating
        self._steps = 0
        self._last_plating = 0.0
        span = image.span("cell.safety_level")
        self._level, self._reason = span, image.span("cell.safety_reason")
        self._score = image.span("cell.plating")
        self._pack = image.index("pack.safety_level")
        self._slot = int(image.slot_of[self._pack])
        self._sot = image.span("cell.sot") if "cell.sot" in image.families else None
        if self.plating.last is None:
            image.value[self._score] = 0.0
        else:  # restored: a flagged cell stays flagged after a restart
            self._write_score(self.plating.last)

    def step(self, limits: LimitTable, alarms: Sequence[dict[str, Any]], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        got = self.inputs(now)
        if got is None:
            return  # no good data: the signals go stale, which is what they should say
        v, good, cell_t, current, _pack_v = got
        self._steps += 1
        if self._steps % PLATING_EVERY == 1 or PLATING_EVERY == 1:
            dt = now - self._last_plating if self._last_plating else PLATING_EVERY * PERIOD_S
            self._last_plating = now
            result = self.plating.step(dt, current, np.where(good, v, np.nan))
            if result is not None:
                self._write_score(result)
        plating = self.plating.last.plating if self.plating.last is not None else None  # NaN: unknown
        config = self._config(limits)
        level, reason = safety_levels(np.where(good, v, np.nan), _nearest_limit(cell_t, v.size, config),
                                      protection_levels(alarms, self.layout), plating, self._sot_now(now), config)
        img = self.image
        img.value[self._level] = level
        img.value[self._reason] = reason
        img.value[self._pack] = worst(level)
        img.rx_time[self._slot] = time.time()
        img.rx_mono[self._slot] = now
        img.seq[self._slot] += 1

    def _write_score(self, result: PlatingResult) -> None:
        score = result.score_mv_per_min
        self.image.value[self._score] = score
        self.image.valid[self._score] = np.isfinite(score)  # an unknown score is no value (reads INVALID)

    def _sot_now(self, now: float) -> np.ndarray | None:
        if self._sot is None:
            return None
        img = self.image
        s = img.snapshot(self._sot, now)
        fresh = (s.quality == Quality.GOOD) & (s.age_s < SOT_MAX_AGE_S)
        return np.where(fresh, s.value, np.nan) if fresh.any() else None

    @staticmethod
    def _config(limits: LimitTable) -> SafetyConfig:
        """The MSLs in force are the edges the proximity is measured to."""
        return SafetyConfig(v_max=limits.cell_voltage_high.msl, v_min=limits.cell_voltage_low.msl,
                            t_max_c=max(limits.cell_temperature_high_charge.msl,
                                        limits.cell_temperature_high_discharge.msl),
                            t_min_c=min(limits.cell_temperature_low_charge.msl,
                                        limits.cell_temperature_low_discharge.msl))
