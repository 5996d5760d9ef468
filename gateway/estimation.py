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
from estimators.ecm import T_REF_C, EcmParams, get_cell_type
from estimators.limits import SofLimiter, SofLimits, sof_preset
from estimators.model_update import apply_ecm_update
from estimators.passport import PassportConfig, PassportCounters
from estimators.soc_ekf import SocEkf
from estimators.sos import PlatingDetector
from gateway.image import ProcessImage, Quality
from gateway.limits import HardwareLimits
from gateway.pipeline import TEMPERATURE_FAMILIES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EstimatorSection:
    """The [estimators] section."""

    enabled: bool = True
    capacity_ah: float = 60.0  # rated cell capacity (second-life: measured at intake)
    soc_period_ms: float = 100.0  # P2: the EKF follows the 10 Hz cell voltages
    limits_period_ms: float = 100.0  # P1: current and voltage limits for the inverter
    persist_s: float = 60.0
    max_charge_c: float = 0.5  # current ceilings in C of the pack's capacity (capacity_ah x parallel strings)
    max_discharge_c: float = 1.0
    rsl_derate: float = 0.5  # factor on the current limits while protection reports an RSL condition
    balancing_start_spread_v: float = 0.100  # a requested run starts only above this cell spread...
    balancing_stop_spread_v: float = 0.030  # ...and ends below this one
    balancing_settle_s: float = 60.0  # rest needed before bleeding (voltages must reflect SoC)
    balancing_budget_s: float = 4 * 3600.0

    def check(self, hardware: HardwareLimits | None = None, strings: int = 1) -> None:
        """ValueError "key: reason"; with ``hardware``, the current ceilings of ``strings`` parallel
        strings must stay within its pack current limits."""
        if self.capacity_ah <= 0:
            raise ValueError("capacity_ah: must be > 0")
        for name in ("soc_period_ms", "limits_period_ms"):
            if not 10 <= getattr(self, name) <= 10_000:
                raise ValueError(f"{name}: must be 10..10000")
        if not 0 <= self.rsl_derate <= 1:
            raise ValueError("rsl_derate: must be 0..1")
        if self.persist_s <= 0:  # the learnt state would be written in a busy loop (or never)
            raise ValueError("persist_s: must be > 0")
        for name, hw_name in (("max_charge_c", "pack_current_charge_max"),
                              ("max_discharge_c", "pack_current_discharge_max")):
            c, pack_ah = getattr(self, name), self.capacity_ah * strings
            if not c > 0:
                raise ValueError(f"{name}: must be > 0")
            top = math.inf if hardware is None else getattr(hardware, hw_name)
            if c * pack_ah > top:
                raise ValueError(f"{name}: {c:g} C is {c * pack_ah:g} A, above hardware_limits.{hw_name} {top:g} A "
                                 f"(at most {top / pack_ah:g} C)")


Inputs = tuple[np.ndarray, np.ndarray, np.ndarray, float, float]


class Estimation:
    """SoC EKF, SoF limiter and passport counters over the process image.

    Parallel strings (``site.strings``) are the image's ``string.current`` family; cells run string
    after string. ``hardware`` (the site's ``[hardware_limits]``) bounds the current limits.
    """

    def __init__(self, section: EstimatorSection, chemistry: str, image: ProcessImage, cells_per_module: int,
                 state_dir: Path, deep_discharge_v: float, hardware: HardwareLimits) -> None:
        section.check()
        self.image = image
        self.cell = get_cell_type(chemistry)
        n = image.families["cell.voltage"].size
        self.n_cells = n
        self.strings = image.families["string.current"].size if "string.current" in image.families else 1
        if n % self.strings:
            raise ValueError(f"{n} cells do not make {self.strings} equal parallel strings")
        self.cells_per_string = n // self.strings
        self.hardware = hardware
        # what a cell could have carried through a gap in the data: the hardware's largest current, its string's share
        self._gap_current_a = max(self.hardware.pack_current_charge_max,
                                  self.hardware.pack_current_discharge_max) / self.strings
        self.cells = image.span("cell.voltage")
        self.cells_per_module = cells_per_module
        self.params = EcmParams.uniform(self.cell, n, capacity_ah=section.capacity_ah)
        self.ekf = SocEkf(self.cell, self.params)
        self.section = section
        self.limiter = self._limiter(section)
        self.passport = PassportCounters(n, PassportConfig(rated_capacity_ah=section.capacity_ah, strings=self.strings,
                                                           deep_discharge_v=deep_discharge_v,
                                                           deep_release_v=deep_discharge_v + 0.3),
                                         ocv=self.cell.ocv)
        self.balancer = Balancer(n, BalanceConfig(
            start_spread_v=section.balancing_start_spread_v, stop_spread_v=section.balancing_stop_spread_v,
            settle_s=section.balancing_settle_s, time_budget_s=section.balancing_budget_s,
            cells_per_module=cells_per_module))
        self.balance: BalanceDecision | None = None
        # the safety loop (gateway.safety) runs it; it lives here so its flags persist with the rest
        self.plating = PlatingDetector(n)
        self.path = state_dir / "estimators.json"
        self.limits: SofLimits | None = None
        self.initialised = False
        self.steps = 0
        self.skipped = 0
        self._last_soc = self._last_limits = 0.0
        # the image's sources the inputs come from (cells, temperatures, current, pack voltage)
        wanted = [np.arange(self.cells.start, self.cells.stop)]
        # the temperature families the map binds (either or both; none: unknown temperatures, zero current)
        self._temp_families = [f for f in TEMPERATURE_FAMILIES if (image.slot_of[image.span(f)] >= 0).any()]
        for family in self._temp_families:
            t = image.span(family)
            wanted.append(np.arange(t.start, t.stop))
        wanted.append(np.array([image.index(n) for n in ("pack.current", "pack.voltage") if n in image.scalars], int))
        self._input_slots = np.unique(image.slots(np.concatenate(wanted).astype(np.intp)))
        self._inputs_cache: tuple[int, float, float, Inputs | None] | None = None
        self._restore()

    # -- inputs --------------------------------------------------------------------------

    def inputs(self, now: float) -> Inputs | None:
        """Cell voltages, their validity, temperatures, pack current and pack voltage; None when unusable.

        The temperatures are, per cell, its module's coldest and hottest good sensor (cells x 2), NaN
        where the module has none: unknown is unknown, which gives zero current and blocks balancing.

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
        # values with their qualities in one read: a separate quality() could pair a value with the next frame's flag
        cells = img.snapshot(self.cells, now)
        v, good = cells.value, cells.quality == Quality.GOOD
        current = img.read("pack.current", now) if "pack.current" in img.scalars else None
        if current is None or current.quality != Quality.GOOD or not good.any():
            return None
        cell_t = self._cell_temperatures(now)
        pv = img.read("pack.voltage", now) if "pack.voltage" in img.scalars else None
        # without a pack voltage: the cells' sum, one string's worth with parallel strings
        pack_v = pv.value if pv is not None and pv.quality == Quality.GOOD else float(np.sum(v[good])) / self.strings
        return v, good, cell_t, current.value, pack_v

    def _cell_temperatures(self, now: float) -> np.ndarray:
        """Per cell (cells x 2) the coldest and hottest good sensor that sees it: its module's sensors
        (``module.temperature``) and its own (``cell.temperature``), whichever the map binds; NaN for none."""
        img, n = self.image, self.n_cells
        lo, hi = np.full(n, np.inf), np.full(n, -np.inf)
        if "module.temperature" in self._temp_families:
            t = img.family_snapshot("module.temperature", now)
            tq = t.quality == Quality.GOOD
            # the limiter and the balancer judge the extremes: a module's mean would hide a hot sensor
            m_lo = np.repeat(np.where(tq, t.value, np.inf).min(axis=1, initial=np.inf), self.cells_per_module)[:n]
            m_hi = np.repeat(np.where(tq, t.value, -np.inf).max(axis=1, initial=-np.inf), self.cells_per_module)[:n]
            lo[: m_lo.size], hi[: m_hi.size] = np.minimum(lo[: m_lo.size], m_lo), np.maximum(hi[: m_hi.size], m_hi)
        if "cell.temperature" in self._temp_families:
            c = img.family_snapshot("cell.temperature", now)
            own = np.where(c.quality == Quality.GOOD, c.value, np.nan).reshape(-1)[:n]
            k = own.size
            lo[:k], hi[:k] = np.fmin(lo[:k], own), np.fmax(hi[:k], own)
        return np.where(np.isfinite(lo)[:, None], np.stack([lo, hi], axis=1), np.nan)

    def _cell_current(self, now: float, pack_current: float) -> float | np.ndarray:
        """Each cell's current: its string's measurement where good, else its string's share of the pack's."""
        if self.strings == 1:
            return pack_current
        img = self.image
        s = img.family_snapshot("string.current", now)
        # parallel strings of like cells split the pack current about evenly: the best guess without a measurement
        per_string = np.where(s.quality == Quality.GOOD, s.value, pack_current / self.strings)
        return np.repeat(per_string, self.cells_per_string)

    # -- loops -----------------------------------------------------------------------------

    def step_soc(self, now: float | None = None) -> None:
        """P2: one EKF step over every cell, and the passport counters."""
        now = time.monotonic() if now is None else now
        got = self.inputs(now)
        if got is None:
            self.skipped += 1
            return
        # only good steps advance the clock: time without data shows up in the next good step's dt
        dt = now - self._last_soc if self._last_soc else self.section.soc_period_ms / 1000.0
        self._last_soc = now
        v, good, cell_t, current, pack_v = got
        cell_i = self._cell_current(now, current)
        # the ECM needs a number: an unknown temperature only scales its resistances (the limits see the NaN)
        model_t = np.nan_to_num(cell_t.mean(axis=1), nan=T_REF_C)
        if not self.initialised:
            # first good data: start from the OCV if the pack rests now, else with the large initial covariance
            self.ekf.init_from_ocv(np.where(good, v, np.nan), model_t, good, cell_i)
            self.initialised = True
            return
        gap = dt > self.passport.config.max_gap_s
        if gap:  # nothing to predict from: what moved meanwhile is unknown (the passport counts the gap)
            self.ekf.gap(dt, self._gap_current_a)
        self.ekf.step(0.0 if gap else dt, cell_i, v, model_t, valid=good)
        self.passport.update(dt, current, pack_v, np.where(good, v, np.nan), cell_t)
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
        self.limits = self.limiter.step(dt, v, cell_t, self.ekf.soc, pack_v, self.section.rsl_derate if derate else 1.0)

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
            new.check(self.hardware, self.strings)
            self._use(new)
        except (TypeError, ValueError) as exc:
            return False, str(exc)
        return True, f"estimator settings applied: {', '.join(sorted(settings))}"

    def _use(self, section: EstimatorSection) -> None:
        limiter = self._limiter(section)  # first: should it fail, the settings in force stay
        self.section, self.limiter = section, limiter

    def _limiter(self, section: EstimatorSection) -> SofLimiter:
        """The limits of one string's cells in series, the currents of all strings, never above the hardware's."""
        c = sof_preset(self.cell.name, section.capacity_ah * self.strings, self.cells_per_string,
                       section.max_charge_c, section.max_discharge_c)
        hw = self.hardware  # the settings were checked against it; this holds whatever got past that
        return SofLimiter(replace(c, max_charge_a=min(c.max_charge_a, hw.pack_current_charge_max),
                                  max_discharge_a=min(c.max_discharge_a, hw.pack_current_discharge_max)))

    # -- persistence ------------------------------------------------------------------------------

    def persist(self) -> None:
        """Write the learnt state atomically (fsynced), so a restart keeps SoC, counters and plating flags."""
        state = {"saved": time.time(), "ekf": self.ekf.export_state(), "passport": self.passport.export_state(),
                 "initialised": self.initialised, "plating": self.plating.export_state()}
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
        # each part on its own: a filter that no longer fits must not cost the passport its lifetime counters
        # (nor the plating flags), which the next persist would overwrite with fresh ones
        try:
            self._restore_filter(state)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            log.warning("SoC filter state in %s does not fit this site (%s): starting it fresh", self.path, exc)
        try:
            self.passport.import_state(state["passport"])
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            log.warning("passport counters in %s do not fit this site (%s): starting them fresh", self.path, exc)
        try:
            self.plating.import_state(state.get("plating"))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            log.warning("plating flags in %s do not fit this site (%s): starting them fresh", self.path, exc)

    def _restore_filter(self, state: dict[str, Any]) -> None:
        offline = time.time() - float(state["saved"])
        clock_behind = not offline >= 0.0  # also NaN
        self.ekf.import_state(state["ekf"], offline_s=0.0 if clock_behind else offline)
        # the configured capacity wins over the saved one (a corrected measurement); the learnt R and C stay
        params = self.ekf.params.copy()
        params.capacity_ah[:] = self.section.capacity_ah
        self.ekf.set_params(params)
        self.params = params
        if clock_behind:
            # no RTC: the wall clock at boot is behind the last save, so how long the pack went unwatched
            # is unknown; widen the SoC as for a gap of any length
            log.warning("the clock (%s) is behind the estimator state's save time (%s): time offline unknown, "
                        "SoC uncertainty widened", time.time(), state["saved"])
            self.ekf.gap(math.inf, self._gap_current_a)
        self.initialised = bool(state.get("initialised"))

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
