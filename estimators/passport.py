"""Battery-passport and health counters (EU Regulation 2023/1542, stationary batteries).

Counted from every sample the edge sees: charge and energy throughput in each
direction, full equivalent cycles (discharged Ah / rated capacity), time per
temperature bin (of the hottest and of the coldest cell), time charging below /
above the charge temperature window, deep-discharge events (a cell below
``deep_discharge_v``; re-armed above ``deep_release_v``), extremes seen, a per-cell
capacity estimate from two rested OCV points, and per-cell internal resistance
from current steps (dV/dI between two consecutive samples).

With ``strings`` parallel strings the current is the pack's: the throughput counters
count it whole, full equivalent cycles divide by the pack's capacity, and the per-cell
capacity and resistance take each cell's share (the strings split the current evenly).
Temperatures may be given per cell or per cell and sensor (each sensor counts).

Counters only ever grow: a non-finite or negative time step, or one longer than
``max_gap_s`` (a gap in the data), integrates nothing and is counted as a gap.
A gap (or a non-finite time step or current) also drops the last rested OCV point:
the charge moved meanwhile is unknown, so no capacity estimate spans it.
The state exports to plain data and imports back (validated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .ecm import OcvCurve

__all__ = ["PassportConfig", "PassportCounters"]

FloatArray = NDArray[np.float64]
STATE_VERSION = 1
_SCALARS = ("charge_ah", "discharge_ah", "energy_in_wh", "energy_out_wh", "observed_s", "gap_s",
            "charging_cold_s", "charging_hot_s", "deep_discharge_events", "capacity_updates", "resistance_updates")
_EXTREMES = ("cell_v_min", "cell_v_max", "temp_min_c", "temp_max_c", "charge_a_max", "discharge_a_max")


@dataclass(frozen=True)
class PassportConfig:
    """Parameters of :class:`PassportCounters` (A, Ah, V, degC, s); ``rated_capacity_ah`` is a cell's."""

    rated_capacity_ah: float
    strings: int = 1
    temp_edges_c: tuple[float, ...] = (-20.0, -10.0, 0.0, 10.0, 25.0, 35.0, 45.0, 55.0)
    charge_min_c: float = 0.0
    charge_max_c: float = 45.0
    moving_current_a: float = 0.5
    deep_discharge_v: float = 2.5
    deep_release_v: float = 2.8
    max_gap_s: float = 10.0
    rest_current_a: float = 0.5
    rest_time_s: float = 1800.0
    capacity_min_delta_soc: float = 0.3
    capacity_min_slope_v: float = 0.1
    capacity_bounds: tuple[float, float] = (0.3, 1.5)
    step_min_a: float = 10.0
    step_max_dt_s: float = 0.5
    resistance_max_ohm: float = 0.5
    resistance_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.rated_capacity_ah <= 0.0 or self.strings < 1:
            raise ValueError("rated_capacity_ah must be > 0 and strings >= 1")
        if any(b <= a for a, b in zip(self.temp_edges_c, self.temp_edges_c[1:], strict=False)):
            raise ValueError("temp_edges_c must rise strictly")
        if not self.deep_discharge_v < self.deep_release_v:
            raise ValueError("deep_release_v must be above deep_discharge_v")
        if not 0.0 < self.resistance_weight <= 1.0 or self.step_min_a <= 0.0:
            raise ValueError("resistance_weight in (0, 1] and step_min_a > 0")


@dataclass
class _Rest:
    soc: FloatArray
    net_ah: float
    informative: NDArray[np.bool_]


@dataclass
class PassportCounters:
    """Accumulates the counters over samples (see module docstring)."""

    n_cells: int
    config: PassportConfig
    ocv: OcvCurve | None = None
    charge_ah: float = 0.0
    discharge_ah: float = 0.0
    energy_in_wh: float = 0.0
    energy_out_wh: float = 0.0
    observed_s: float = 0.0
    gap_s: float = 0.0
    charging_cold_s: float = 0.0
    charging_hot_s: float = 0.0
    deep_discharge_events: float = 0.0
    capacity_updates: float = 0.0
    resistance_updates: float = 0.0
    cell_v_min: float = math.inf
    cell_v_max: float = -math.inf
    temp_min_c: float = math.inf
    temp_max_c: float = -math.inf
    charge_a_max: float = 0.0
    discharge_a_max: float = 0.0
    time_by_max_temp_s: FloatArray = field(init=False)
    time_by_min_temp_s: FloatArray = field(init=False)
    capacity_ah: FloatArray = field(init=False)
    resistance_ohm: FloatArray = field(init=False)
    _deep: NDArray[np.bool_] = field(init=False, repr=False)
    _prev_i: float = field(default=math.nan, repr=False)
    _prev_v: FloatArray | None = field(default=None, repr=False)
    _rest_s: float = field(default=0.0, repr=False)
    _rest_taken: bool = field(default=False, repr=False)
    _last_rest: _Rest | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        nb = len(self.config.temp_edges_c) + 1
        self.time_by_max_temp_s = np.zeros(nb)
        self.time_by_min_temp_s = np.zeros(nb)
        self.capacity_ah = np.full(self.n_cells, np.nan)
        self.resistance_ohm = np.full(self.n_cells, np.nan)
        self._deep = np.zeros(self.n_cells, dtype=np.bool_)

    @property
    def full_equivalent_cycles(self) -> float:
        """Discharged Ah over the pack's rated capacity."""
        return self.discharge_ah / (self.config.rated_capacity_ah * self.config.strings)

    @property
    def round_trip_efficiency(self) -> float:
        """Energy out over energy in (NaN before anything was charged)."""
        return self.energy_out_wh / self.energy_in_wh if self.energy_in_wh > 0.0 else math.nan

    def update(self, dt_s: float, current_a: float, pack_voltage_v: float, cell_v: ArrayLike,
               cell_temp_c: ArrayLike) -> None:
        """Integrate one sample interval ending now (``current_a``: the pack's, > 0 charging;
        ``cell_temp_c``: per cell, or per cell and sensor)."""
        c = self.config
        dt = float(dt_s)
        v = np.asarray(cell_v, dtype=np.float64)
        temps = np.asarray(cell_temp_c, dtype=np.float64)
        i = float(current_a)
        self._extremes(i, v, temps)
        self._deep_discharge(v)
        if not math.isfinite(dt):
            self._forget_rest()  # an unknown interval: charge may have moved unseen
            return
        if dt <= 0.0:
            return
        if dt > c.max_gap_s or not math.isfinite(i):
            self.gap_s += dt
            self._prev_i, self._prev_v = math.nan, None
            self._forget_rest()
            return
        self.observed_s += dt
        ah = abs(i) * dt / 3600.0
        wh = abs(i * pack_voltage_v) * dt / 3600.0 if math.isfinite(pack_voltage_v) else 0.0
        if i > 0.0:
            self.charge_ah += ah
            self.energy_in_wh += wh
        elif i < 0.0:
            self.discharge_ah += ah
            self.energy_out_wh += wh
        finite_t = temps[np.isfinite(temps)]
        if finite_t.size:
            t_hi, t_lo = float(finite_t.max()), float(finite_t.min())
            self.time_by_max_temp_s[int(np.searchsorted(c.temp_edges_c, t_hi, side="right"))] += dt
            self.time_by_min_temp_s[int(np.searchsorted(c.temp_edges_c, t_lo, side="right"))] += dt
            if i >= c.moving_current_a:
                if t_lo < c.charge_min_c:
                    self.charging_cold_s += dt
                if t_hi > c.charge_max_c:
                    self.charging_hot_s += dt
        self._resistance(dt, i, v)
        self._capacity(dt, i, v, temps)

    def _forget_rest(self) -> None:
        """The charge moved during a gap is not in ``net_ah``: no capacity may span it."""
        self._rest_s, self._rest_taken, self._last_rest = 0.0, False, None

    def _extremes(self, i: float, v: FloatArray, temps: FloatArray) -> None:
        fv = v[np.isfinite(v)]
        if fv.size:
            self.cell_v_min = min(self.cell_v_min, float(fv.min()))
            self.cell_v_max = max(self.cell_v_max, float(fv.max()))
        ft = temps[np.isfinite(temps)]
        if ft.size:
            self.temp_min_c = min(self.temp_min_c, float(ft.min()))
            self.temp_max_c = max(self.temp_max_c, float(ft.max()))
        if math.isfinite(i):
            self.charge_a_max = max(self.charge_a_max, i)
            self.discharge_a_max = max(self.discharge_a_max, -i)

    def _deep_discharge(self, v: FloatArray) -> None:
        c = self.config
        if v.shape != self._deep.shape:
            return
        low = np.isfinite(v) & (v < c.deep_discharge_v)
        new = low & ~self._deep
        if new.any():
            self.deep_discharge_events += float(new.sum())
        self._deep = (self._deep | low) & ~(np.isfinite(v) & (v > c.deep_release_v))

    def _resistance(self, dt: float, i: float, v: FloatArray) -> None:
        c = self.config
        prev_i, prev_v = self._prev_i, self._prev_v
        self._prev_i, self._prev_v = i, v.copy()
        if prev_v is None or not math.isfinite(prev_i) or dt > c.step_max_dt_s or v.shape != prev_v.shape:
            return
        di = (i - prev_i) / c.strings
        if abs(di) < c.step_min_a:
            return
        r = (v - prev_v) / di
        ok = np.isfinite(r) & (r > 0.0) & (r < c.resistance_max_ohm)
        if not ok.any():
            return
        w = c.resistance_weight
        old = self.resistance_ohm
        self.resistance_ohm = np.where(ok, np.where(np.isfinite(old), old + w * (r - old), r), old)
        self.resistance_updates += 1.0

    def _capacity(self, dt: float, i: float, v: FloatArray, temps: FloatArray) -> None:
        c = self.config
        if self.ocv is None or v.shape != (self.n_cells,):
            return
        if abs(i) > c.rest_current_a:
            self._rest_s, self._rest_taken = 0.0, False
            return
        self._rest_s += dt
        if self._rest_taken or self._rest_s < c.rest_time_s or not np.all(np.isfinite(v)):
            return
        self._rest_taken = True
        if temps.ndim == 2:  # per cell and sensor: the OCV wants one temperature per cell
            temps = temps.mean(axis=1)
        t = temps if temps.shape == v.shape else np.full(v.shape, float(np.nanmean(temps)) if temps.size else 25.0)
        soc = self.ocv.soc_at(v, np.where(np.isfinite(t), t, 25.0))
        informative = self.ocv.slope(soc) >= c.capacity_min_slope_v
        here = _Rest(soc, self.charge_ah - self.discharge_ah, informative)
        prev = self._last_rest
        self._last_rest = here
        if prev is None:
            return
        d_soc = here.soc - prev.soc
        d_ah = (here.net_ah - prev.net_ah) / c.strings
        lo, hi = c.capacity_bounds
        with np.errstate(divide="ignore", invalid="ignore"):
            cap = d_ah / d_soc
        ok = (np.abs(d_soc) >= c.capacity_min_delta_soc) & here.informative & prev.informative
        ok &= np.isfinite(cap) & (cap >= lo * c.rated_capacity_ah) & (cap <= hi * c.rated_capacity_ah)
        if ok.any():
            self.capacity_ah = np.where(ok, cap, self.capacity_ah)
            self.capacity_updates += 1.0

    # ---------------------------------------------------------------- persist

    def export_state(self) -> dict[str, Any]:
        """Plain-data snapshot of every counter (for the daemon to persist)."""
        d: dict[str, Any] = {"version": STATE_VERSION, "n_cells": self.n_cells}
        for k in _SCALARS:
            d[k] = float(getattr(self, k))
        for k in _EXTREMES:  # +-inf (nothing seen yet) as None, for JSON
            x = float(getattr(self, k))
            d[k] = x if math.isfinite(x) else None
        d["time_by_max_temp_s"] = self.time_by_max_temp_s.tolist()
        d["time_by_min_temp_s"] = self.time_by_min_temp_s.tolist()
        d["temp_edges_c"] = list(self.config.temp_edges_c)
        d["capacity_ah"] = [None if not math.isfinite(x) else x for x in self.capacity_ah.tolist()]
        d["resistance_ohm"] = [None if not math.isfinite(x) else x for x in self.resistance_ohm.tolist()]
        d["deep_latched"] = self._deep.tolist()
        return d

    def import_state(self, d: Mapping[str, Any]) -> None:
        """Restore :meth:`export_state` output; ValueError (nothing changed) if it does not fit."""
        if d.get("version") != STATE_VERSION or d.get("n_cells") != self.n_cells:
            raise ValueError("passport state is for another version or cell count")
        if list(d.get("temp_edges_c", [])) != list(self.config.temp_edges_c):
            raise ValueError("passport state has other temperature bins")
        missing = [k for k in (*_SCALARS, *_EXTREMES, "time_by_max_temp_s", "time_by_min_temp_s", "capacity_ah",
                               "resistance_ohm") if k not in d]
        if missing:
            raise ValueError(f"passport state lacks {', '.join(missing)}")
        unseen = {"cell_v_min": math.inf, "temp_min_c": math.inf, "cell_v_max": -math.inf, "temp_max_c": -math.inf,
                  "charge_a_max": 0.0, "discharge_a_max": 0.0}
        vals = {k: float(d[k]) for k in _SCALARS}
        vals.update({k: unseen[k] if d[k] is None else float(d[k]) for k in _EXTREMES})
        if any(not math.isfinite(vals[k]) or vals[k] < 0.0 for k in _SCALARS):
            raise ValueError("passport counters must be finite and >= 0")
        bins = [np.asarray(d[k], dtype=np.float64) for k in ("time_by_max_temp_s", "time_by_min_temp_s")]
        nb = len(self.config.temp_edges_c) + 1
        if any(b.shape != (nb,) or not np.all(np.isfinite(b)) or np.any(b < 0.0) for b in bins):
            raise ValueError("passport temperature bins are malformed")

        def cells(key: str) -> FloatArray:
            a = np.asarray([np.nan if x is None else x for x in d[key]], dtype=np.float64)
            if a.shape != (self.n_cells,):
                raise ValueError(f"{key}: expected {self.n_cells} values")
            return a

        cap, res = cells("capacity_ah"), cells("resistance_ohm")
        deep = np.asarray(d.get("deep_latched", [False] * self.n_cells), dtype=np.bool_)
        if deep.shape != (self.n_cells,):
            raise ValueError("deep_latched: wrong length")
        for k, x in vals.items():
            setattr(self, k, x)
        self.time_by_max_temp_s, self.time_by_min_temp_s = bins[0].copy(), bins[1].copy()
        self.capacity_ah, self.resistance_ohm, self._deep = cap, res, deep

    def summary(self) -> dict[str, Any]:
        """The passport figures as plain data (for signals, OPC UA, the cloud)."""
        cap = self.capacity_ah[np.isfinite(self.capacity_ah)]
        res = self.resistance_ohm[np.isfinite(self.resistance_ohm)]
        return {
            "charge_ah": self.charge_ah,
            "discharge_ah": self.discharge_ah,
            "energy_in_wh": self.energy_in_wh,
            "energy_out_wh": self.energy_out_wh,
            "full_equivalent_cycles": self.full_equivalent_cycles,
            "round_trip_efficiency": self.round_trip_efficiency,
            "charging_cold_s": self.charging_cold_s,
            "charging_hot_s": self.charging_hot_s,
            "deep_discharge_events": int(self.deep_discharge_events),
            "capacity_ah_min": float(cap.min()) if cap.size else None,
            "resistance_ohm_max": float(res.max()) if res.size else None,
            "resistance_ohm_sum": float(res.sum()) if res.size == self.n_cells else None,
            "cell_v_min": self.cell_v_min if math.isfinite(self.cell_v_min) else None,
            "cell_v_max": self.cell_v_max if math.isfinite(self.cell_v_max) else None,
            "temp_min_c": self.temp_min_c if math.isfinite(self.temp_min_c) else None,
            "temp_max_c": self.temp_max_c if math.isfinite(self.temp_max_c) else None,
        }
