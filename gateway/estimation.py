"""The estimator loops of the main process: SoC (P2), current limits (P1), passport counters.

The numerical work is in ``estimators/`` (pure numpy); this module reads the
process image, feeds the estimators at their cadence, persists their state in
the state directory, and offers one validated entry point for new ECM
parameters (CLI now; the cloud downlink and OPC UA use the same function).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from estimators.balancing import BalanceConfig, BalanceDecision, Balancer
from estimators.ecm import EcmParams, get_cell_type
from estimators.limits import SofLimiter, SofLimits, sof_preset
from estimators.model_update import apply_ecm_update
from estimators.passport import PassportConfig, PassportCounters
from estimators.soc_ekf import SocEkf
from gateway.image import ProcessImage, Quality

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EstimatorSection:
    """The [estimators] section."""

    enabled: bool = True
    capacity_ah: float = 60.0  # rated cell capacity (second-life: measured at intake)
    soc_period_ms: float = 100.0  # P2: the EKF follows the 10 Hz cell voltages
    limits_period_ms: float = 100.0  # P1: current and voltage limits for the inverter
    persist_s: float = 60.0
    max_charge_c: float = 0.5
    max_discharge_c: float = 1.0
    rsl_derate: float = 0.5  # factor on the current limits while protection reports an RSL condition
    balancing_start_spread_v: float = 0.100  # a requested run starts only above this cell spread...
    balancing_stop_spread_v: float = 0.030  # ...and ends below this one
    balancing_settle_s: float = 60.0  # rest needed before bleeding (voltages must reflect SoC)
    balancing_budget_s: float = 4 * 3600.0

    def check(self) -> None:
        if self.capacity_ah <= 0:
            raise ValueError("capacity_ah: must be > 0")
        for name in ("soc_period_ms", "limits_period_ms"):
            if not 10 <= getattr(self, name) <= 10_000:
                raise ValueError(f"{name}: must be 10..10000")
        if not 0 <= self.rsl_derate <= 1:
            raise ValueError("rsl_derate: must be 0..1")


Inputs = tuple[np.ndarray, np.ndarray, np.ndarray, float, float]


class Estimation:
    """SoC EKF, SoF limiter and passport counters over the process image."""

    def __init__(self, section: EstimatorSection, chemistry: str, image: ProcessImage, cells_per_module: int,
                 state_dir: Path, deep_discharge_v: float) -> None:
        self.section = section
        self.image = image
        self.cell = get_cell_type(chemistry)
        n = image.families["cell.voltage"].size
        self.n_cells = n
        self.cells = image.span("cell.voltage")
        self.cells_per_module = cells_per_module
        self.params = EcmParams.uniform(self.cell, n, capacity_ah=section.capacity_ah)
        self.ekf = SocEkf(self.cell, self.params)
        self.limiter = SofLimiter(sof_preset(chemistry, section.capacity_ah, n, section.max_charge_c,
                                             section.max_discharge_c))
        if section.max_charge_c <= 0 or section.max_discharge_c <= 0:
            raise ValueError("max_charge_c and max_discharge_c must be > 0")
        self.passport = PassportCounters(n, PassportConfig(rated_capacity_ah=section.capacity_ah,
                                                           deep_discharge_v=deep_discharge_v,
                                                           deep_release_v=deep_discharge_v + 0.3),
                                         ocv=self.cell.ocv)
        self.balancer = Balancer(n, BalanceConfig(
            start_spread_v=section.balancing_start_spread_v, stop_spread_v=section.balancing_stop_spread_v,
            settle_s=section.balancing_settle_s, time_budget_s=section.balancing_budget_s,
            cells_per_module=cells_per_module))
        self.balance: BalanceDecision | None = None
        self.path = state_dir / "estimators.json"
        self.limits: SofLimits | None = None
        self.initialised = False
        self.steps = 0
        self.skipped = 0
        self._last_soc = self._last_limits = 0.0
        # the image's sources the inputs come from (cells, temperatures, current, pack voltage)
        wanted = [np.arange(self.cells.start, self.cells.stop)]
        if "module.temperature" in image.families:
            t = image.span("module.temperature")
            wanted.append(np.arange(t.start, t.stop))
        wanted.append(np.array([image.index(n) for n in ("pack.current", "pack.voltage") if n in image.scalars], int))
        self._input_slots = np.unique(image.slots(np.concatenate(wanted).astype(np.intp)))
        self._inputs_cache: tuple[int, float, float, Inputs | None] | None = None
        self._restore()

    # -- inputs --------------------------------------------------------------------------

    def inputs(self, now: float) -> Inputs | None:
        """Cell voltages, their validity, per-cell temperatures, current and pack voltage; None when unusable.

        The SoC, limits, balancing and safety loops all ask, mostly within the same millisecond: the
        image is read once and the answer reused (as copies) until one of its sources brings a new
        frame or goes stale, so every caller gets exactly what a fresh read would give.
        """
        img = self.image
        seq = int(img.seq[self._input_slots].sum())  # before the read: a frame during it means a new read next time
        c = self._inputs_cache
        if c is None or c[0] != seq or not c[1] <= now <= c[2]:
            c = self._inputs_cache = (seq, now, self._fresh_until(now), self._read_inputs(now))
        got = c[3]
        if got is None:
            return None
        v, good, cell_t, current, pack_v = got
        return v.copy(), good.copy(), cell_t.copy(), current, pack_v

    def _fresh_until(self, now: float) -> float:
        """Until when no input source that is fresh at ``now`` can go stale (receive times only move forward)."""
        img = self.image
        slots = self._input_slots
        rx, after = img.rx_mono[slots], img.stale_after[slots]
        fresh = (img.seq[slots] > 0) & ~((now - rx) > after)
        # the margin keeps float rounding from ever calling fresh what a fresh read would call stale
        return float((rx[fresh] + after[fresh]).min()) - 1e-6 if fresh.any() else math.inf

    def _read_inputs(self, now: float) -> Inputs | None:
        img = self.image
        v = img.value[self.cells].copy()
        good = img.quality(self.cells, now) == Quality.GOOD
        current = img.read("pack.current", now) if "pack.current" in img.scalars else None
        if current is None or current.quality != Quality.GOOD or not good.any():
            return None
        temps = img.array("module.temperature")
        tq = img.family_quality("module.temperature", now) == Quality.GOOD
        # a cell takes its module's mean good sensor temperature; the pack mean where a module has none
        pack_t = float(temps[tq].mean()) if tq.any() else 25.0
        n_good = tq.sum(axis=1)
        per_module = np.where(n_good > 0, np.where(tq, temps, 0.0).sum(axis=1) / np.maximum(n_good, 1), pack_t)
        cell_t = np.repeat(per_module, self.cells_per_module)[: self.n_cells]
        pv = img.read("pack.voltage", now) if "pack.voltage" in img.scalars else None
        pack_v = pv.value if pv is not None and pv.quality == Quality.GOOD else float(np.sum(v[good]))
        return v, good, cell_t, current.value, pack_v

    # -- loops -----------------------------------------------------------------------------

    def step_soc(self, now: float | None = None) -> None:
        """P2: one EKF step over every cell, and the passport counters."""
        now = time.monotonic() if now is None else now
        dt = now - self._last_soc if self._last_soc else self.section.soc_period_ms / 1000.0
        self._last_soc = now
        got = self.inputs(now)
        if got is None:
            self.skipped += 1
            return
        v, good, cell_t, current, pack_v = got
        if not self.initialised:
            # first good data: start from the OCV (the pack has rested while the gateway was down, or not:
            # the large initial covariance lets the filter correct a wrong start)
            self.ekf.init_from_ocv(np.where(good, v, np.nan), cell_t, good)
            self.initialised = True
            return
        self.ekf.step(min(dt, 5.0), current, v, cell_t, valid=good)
        self.passport.update(min(dt, 5.0), current, pack_v, np.where(good, v, np.nan), cell_t)
        self.steps += 1

    def step_limits(self, derate: bool, now: float | None = None) -> None:
        """P1: current and voltage limits (minimum of the limiters, anti-flapping), derated on RSL."""
        now = time.monotonic() if now is None else now
        dt = now - self._last_limits if self._last_limits else self.section.limits_period_ms / 1000.0
        self._last_limits = now
        got = self.inputs(now)
        if got is None:
            v = np.full(self.n_cells, np.nan)  # no data: the limiter answers zero current
            cell_t, pack_v = v, float("nan")
        else:
            v, good, cell_t, _current, pack_v = got
            v = np.where(good, v, np.nan)
        lim = self.limiter.step(dt, v, cell_t, self.ekf.soc, pack_v)
        if derate:
            f = self.section.rsl_derate
            lim = SofLimits(lim.charge_current_a * f, lim.discharge_current_a * f, lim.charge_voltage_v,
                            lim.discharge_voltage_v, "protection RSL", "protection RSL")
        self.limits = lim

    def step_balancing(self, alarm: bool, now: float | None = None) -> BalanceDecision:
        """P1, once a second: which cells bleed (only at rest, cool, without alarms; see estimators.balancing)."""
        now = time.monotonic() if now is None else now
        got = self.inputs(now)
        if got is None:
            v, good, temp, current = np.full(self.n_cells, np.nan), np.zeros(self.n_cells, bool), math.nan, math.nan
        else:
            v, good, cell_t, current, _pack_v = got
            temp = float(np.max(cell_t))
        self.balance = self.balancer.step(now, v, current, temp, alarm, good)
        return self.balance

    def balancing_status(self) -> dict[str, Any]:
        b = self.balance
        return {"status": str(self.balancer.status), "bleeding": 0 if b is None else b.bleeding,
                "cells": [] if b is None else np.flatnonzero(b.bleed).tolist(),
                "spread_v": None if b is None else _f(b.spread_v), "elapsed_s": None if b is None else _f(b.elapsed_s),
                "reason": "" if b is None else b.reason}

    # -- model updates (CLI, cloud, OPC UA) ------------------------------------------------------

    def update_ecm(self, update: dict[str, Any]) -> tuple[bool, str]:
        """Validate and apply one cell's ECM parameters (the cloud's format)."""
        result = apply_ecm_update(self.ekf.params, update, self.cell)
        if not result.accepted or result.params is None:
            return False, result.reason
        self.ekf.set_params(result.params)
        self.params = result.params
        return True, result.reason or "applied"

    # -- settings (cloud: set_estimator_settings) ------------------------------------------------------

    TUNABLE = ("rsl_derate", "max_charge_c", "max_discharge_c")

    def apply_settings(self, settings: dict[str, Any]) -> tuple[bool, str]:
        """Change tunable settings, validated like the config file's; limits are rebuilt."""
        unknown = sorted(set(settings) - set(self.TUNABLE))
        if unknown:
            return False, f"{unknown[0]}: not a tunable estimator setting (tunable: {', '.join(self.TUNABLE)})"
        try:
            new = replace(self.section, **{k: float(v) for k, v in settings.items()})  # type: ignore[arg-type]
            new.check()
        except (TypeError, ValueError) as exc:
            return False, str(exc)
        self._use(new)
        return True, f"estimator settings applied: {', '.join(sorted(settings))}"

    def _use(self, section: EstimatorSection) -> None:
        self.section = section
        self.limiter = SofLimiter(sof_preset(self.cell.name, section.capacity_ah, self.n_cells,
                                             section.max_charge_c, section.max_discharge_c))

    # -- persistence ------------------------------------------------------------------------------

    def persist(self) -> None:
        """Write the learnt state atomically (fsynced), so a restart keeps SoC and counters."""
        state = {"saved": time.time(), "ekf": self.ekf.export_state(), "passport": self.passport.export_state(),
                 "initialised": self.initialised}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _restore(self) -> None:
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("estimator state %s unreadable (%s): starting fresh", self.path, exc)
            return
        try:
            self.ekf.import_state(state["ekf"], offline_s=max(0.0, time.time() - float(state["saved"])))
            self.passport.import_state(state["passport"])
            self.initialised = bool(state.get("initialised"))
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("estimator state %s does not fit this site (%s): starting fresh", self.path, exc)

    def snapshot(self) -> dict[str, Any]:
        pack = self.ekf.pack()
        return {
            "initialised": self.initialised, "steps": self.steps, "skipped": self.skipped,
            "soc": _f(pack.soc), "soe": _f(pack.soe), "min_cell_soc": _f(pack.min_cell_soc),
            "max_cell_soc": _f(pack.max_cell_soc), "energy_wh": _f(pack.energy_wh),
            "current_offset_a": _f(self.ekf.current_offset_a),
            "limits": None if self.limits is None else {k: _f(v) if isinstance(v, float) else v
                                                        for k, v in asdict(self.limits).items()},
            "passport": self.passport.summary(),
            "balancing": self.balancing_status(),
        }


def _f(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, 6)
