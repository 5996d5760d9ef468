"""Passive balancing decisions: when to bleed which cells.

A run starts (on request, or by itself when ``auto``) only when the cell voltage
spread is at least ``start_spread_v``, and only while the pack is at rest or at low
current (``max_current_a`` for at least ``settle_s``), no cell is above
``max_temp_c`` and no alarm is active. It stops when the spread falls below
``stop_spread_v`` (done) or the ``time_budget_s`` is used up. A run that loses
its conditions pauses (bleeding off) and resumes when they return; an alarm ends
it. Cells bleed while they are more than ``cell_band_v`` above the lowest cell,
with a hysteresis of ``cell_hysteresis_v``; at most ``max_per_module`` cells per
module bleed at once (the highest first), which bounds the heat in a module.

Pure: the caller passes the monotonic time; the result is a per-cell mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["BalanceConfig", "BalanceDecision", "BalanceStatus", "Balancer"]


class BalanceStatus(StrEnum):
    """State of the balancer, as shown to users and sent on the bus."""

    IDLE = "idle"  # nothing requested
    WAITING = "waiting"  # requested, conditions (rest, temperature, alarm, spread) not met yet
    ACTIVE = "active"  # bleeding
    PAUSED = "paused"  # a running run lost its conditions (current, temperature)
    DONE = "done"  # spread below the stop threshold
    TIMEOUT = "timeout"  # time budget used up
    ABORTED = "aborted"  # an alarm ended the run, or it was cancelled


@dataclass(frozen=True)
class BalanceConfig:
    """Thresholds of :class:`Balancer` (V, A, degC, s)."""

    start_spread_v: float = 0.100
    stop_spread_v: float = 0.030
    cell_band_v: float = 0.010
    cell_hysteresis_v: float = 0.005
    max_current_a: float = 2.0
    settle_s: float = 60.0
    max_temp_c: float = 45.0
    time_budget_s: float = 4 * 3600.0
    max_per_module: int = 0  # 0: no limit
    cells_per_module: int = 14
    auto: bool = False
    auto_interval_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if not 0.0 < self.stop_spread_v < self.start_spread_v:
            raise ValueError("need 0 < stop_spread_v < start_spread_v")
        if not 0.0 <= self.cell_hysteresis_v <= self.cell_band_v < self.stop_spread_v:
            raise ValueError("need 0 <= cell_hysteresis_v <= cell_band_v < stop_spread_v")
        if min(self.max_current_a, self.settle_s, self.time_budget_s, self.auto_interval_s) < 0.0:
            raise ValueError("current, times and budget must be >= 0")
        if self.max_per_module < 0 or self.cells_per_module < 1:
            raise ValueError("max_per_module must be >= 0 and cells_per_module >= 1")


@dataclass(frozen=True)
class BalanceDecision:
    """One cycle's outcome: ``bleed`` mask (n_cells,), status, spread, elapsed time, reason."""

    bleed: NDArray[np.bool_]
    status: BalanceStatus
    spread_v: float
    elapsed_s: float
    reason: str

    @property
    def bleeding(self) -> int:
        return int(self.bleed.sum())


class Balancer:
    """Decides per cycle which cells bleed (see module docstring)."""

    def __init__(self, n_cells: int, config: BalanceConfig | None = None) -> None:
        self.n_cells = int(n_cells)
        self.config = config or BalanceConfig()
        self.status = BalanceStatus.IDLE
        self._requested = False
        self._budget_s = self.config.time_budget_s  # of the current run (a request may set its own)
        self._stop_v = self.config.stop_spread_v
        self._start_s = math.nan
        self._active_s = 0.0
        self._quiet_since = math.nan
        self._last_t = math.nan
        self._last_end_s = -math.inf
        self._bleed = np.zeros(self.n_cells, dtype=np.bool_)

    def request(self, time_budget_s: float | None = None, stop_spread_v: float | None = None) -> None:
        """Ask for a run (``bmsgw balance``, the cloud); it starts when the conditions allow.

        ``time_budget_s`` and ``stop_spread_v`` replace the configured ones for this run only.
        """
        c = self.config
        budget = c.time_budget_s if time_budget_s is None else float(time_budget_s)
        stop = c.stop_spread_v if stop_spread_v is None else float(stop_spread_v)
        if not budget > 0.0:
            raise ValueError("time budget must be > 0 s")
        if not c.cell_band_v < stop < c.start_spread_v:
            raise ValueError(f"stop spread must lie between the cell band ({c.cell_band_v * 1e3:g} mV) "
                             f"and the start spread ({c.start_spread_v * 1e3:g} mV)")
        self._budget_s, self._stop_v = budget, stop
        self._requested = True
        if self.status not in (BalanceStatus.ACTIVE, BalanceStatus.PAUSED):
            self.status = BalanceStatus.WAITING

    def cancel(self) -> None:
        """Stop now (bleeding off)."""
        self._finish(BalanceStatus.ABORTED if self._requested else BalanceStatus.IDLE)

    def _finish(self, status: BalanceStatus, now: float | None = None) -> None:
        self._requested = False
        self._budget_s, self._stop_v = self.config.time_budget_s, self.config.stop_spread_v
        self.status = status
        self._start_s = math.nan
        self._bleed[:] = False
        if now is not None:
            self._last_end_s = now

    def _select(self, v: NDArray[np.float64], ok: NDArray[np.bool_], v_min: float) -> NDArray[np.bool_]:
        c = self.config
        above = v - v_min
        keep = self._bleed & (above > c.cell_band_v - c.cell_hysteresis_v)
        bleed = ok & (keep | (above > c.cell_band_v))
        if c.max_per_module > 0:
            n_mod = -(-self.n_cells // c.cells_per_module)
            padded = np.full(n_mod * c.cells_per_module, -np.inf)
            padded[: self.n_cells] = np.where(bleed, above, -np.inf)
            grid = padded.reshape(n_mod, c.cells_per_module)
            order = np.argsort(-grid, axis=1)
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(c.cells_per_module)[None, :].repeat(n_mod, 0), axis=1)
            allowed = (rank < c.max_per_module).reshape(-1)[: self.n_cells]
            bleed &= allowed
        return bleed

    def step(self, now_s: float, cell_v: ArrayLike, current_a: float, max_temp_c: float,
             alarm: bool, valid: ArrayLike | None = None) -> BalanceDecision:
        """Decide for this cycle. ``now_s``: monotonic seconds; ``alarm``: any active
        protection warning or fault; ``valid``: per-cell mask of good voltages."""
        c = self.config
        v = np.asarray(cell_v, dtype=np.float64)
        ok = np.isfinite(v) if valid is None else np.asarray(valid, dtype=np.bool_) & np.isfinite(v)
        dt = 0.0 if math.isnan(self._last_t) else max(0.0, now_s - self._last_t)
        self._last_t = now_s
        if ok.any():
            v_min, v_max = float(v[ok].min()), float(v[ok].max())
            spread = v_max - v_min
        else:
            v_min, spread = math.nan, math.nan
        quiet = math.isfinite(current_a) and abs(current_a) <= c.max_current_a
        if not quiet:
            self._quiet_since = math.nan
        elif math.isnan(self._quiet_since):
            self._quiet_since = now_s
        settled = quiet and now_s - self._quiet_since >= c.settle_s
        cool = math.isfinite(max_temp_c) and max_temp_c <= c.max_temp_c
        all_valid = bool(ok.all())

        running = self.status in (BalanceStatus.ACTIVE, BalanceStatus.PAUSED)
        if running and self.status is BalanceStatus.ACTIVE:
            self._active_s += dt
        if running and alarm:
            self._finish(BalanceStatus.ABORTED, now_s)
            return self._decision(spread, "alarm active")
        if running and self._active_s >= self._budget_s:
            budget = self._budget_s
            self._finish(BalanceStatus.TIMEOUT, now_s)
            return self._decision(spread, f"time budget {budget:g} s used")
        if running and math.isfinite(spread) and spread < self._stop_v:
            stop = self._stop_v
            self._finish(BalanceStatus.DONE, now_s)
            return self._decision(spread, f"spread {spread * 1e3:.1f} mV below {stop * 1e3:g} mV")
        if not running:
            due = c.auto and now_s - self._last_end_s >= c.auto_interval_s
            if not (self._requested or due):
                return self._decision(spread, "")
            self.status = BalanceStatus.WAITING
            why = self._blocked(spread, settled, cool, alarm, all_valid, start=True)
            if why:
                return self._decision(spread, why)
            self.status = BalanceStatus.ACTIVE
            self._start_s = now_s
            self._active_s = 0.0
            self._requested = True
        why = self._blocked(spread, settled, cool, alarm, all_valid, start=False)
        if why:
            self.status = BalanceStatus.PAUSED
            self._bleed[:] = False
            return self._decision(spread, why)
        self.status = BalanceStatus.ACTIVE
        self._bleed = self._select(v, ok, v_min)
        return self._decision(spread, f"bleeding {int(self._bleed.sum())} cell(s)")

    def _blocked(self, spread: float, settled: bool, cool: bool, alarm: bool, all_valid: bool, start: bool) -> str:
        c = self.config
        if alarm:
            return "alarm active"
        if not all_valid:
            return "cell voltages missing or invalid"
        if not cool:
            return f"temperature above {c.max_temp_c:g} degC (or unknown)"
        if not settled:
            return f"not at rest (|I| <= {c.max_current_a:g} A for {c.settle_s:g} s)"
        if start and spread < c.start_spread_v:
            return f"spread {spread * 1e3:.1f} mV below the start threshold {c.start_spread_v * 1e3:g} mV"
        return ""

    def _decision(self, spread: float, reason: str) -> BalanceDecision:
        return BalanceDecision(self._bleed.copy(), self.status, spread, self._active_s, reason)
