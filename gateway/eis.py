"""The EIS coordinator of the main process: sweeps, their analysis, and where the results go.

The module's frames reach this process from P0 (which only forwards the EIS frame IDs, so
a sweep never touches the protection lane's work), and its commands go back through P0's
adapter. :class:`EisService` owns the protocol driver (drivers/eis_driver.py), feeds it the
pack current and protection state every ``TICK_S``, and analyses each finished spectrum in a
worker thread of its own (lin-KK, DRT, equivalent-circuit fit, SoT: estimators/eis.py), which
the ticks never wait for: an analysis takes up to a second, an abort must not. A result goes to

* the process image: ``cell.sot`` / ``module.sot`` (degC) and the fit, ``*.eis_r`` (R0..R4)
  and ``*.eis_c`` (C1..C4), stamped with the measurement time (an invalid spectrum changes
  nothing there: it never feeds SoT or fits);
* the recorder: a warning event when SoT and the sensor disagree (sensor failure or internal
  heating), which also feeds the safety level;
* the cloud (one EIS record per spectrum, valid or not, with its verdict), OPC UA (last
  spectrum and fit) and the CLI (``bmsgw eis sweep|show``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import can
import numpy as np

from drivers.eis_driver import Conditions, EisDriver, EisDriverConfig, EisTarget, SweepSettings, load_eis_dbc
from estimators.eis import EisAnalysis, analyze_spectrum
from estimators.kk import KKResult
from estimators.sot import SotCalibration, calibrate_sot
from estimators.spectrum import EisSpectrum
from gateway.events import Event, Kind, Level, Recorder
from gateway.image import ProcessImage, Quality
from gateway.pipeline import Layout

log = logging.getLogger(__name__)

TICK_S = 0.1
N_RC = 4  # the cloud's R1..R4 / C1..C4: the image always has room for four arcs
# events that abort a sweep: anything protection (P0) reports, at any level
PROTECTION_KINDS = frozenset({Kind.LIMIT, Kind.DATA, Kind.TRIP, Kind.DEADLINE, Kind.CONTACTOR})
SOT_MISMATCH = "sot_mismatch"  # this service's own warning (a LIMIT event too, but not protection's)


@dataclass(frozen=True)
class EisSection:
    """The [eis] section: the impedance module, when sweeps may run, what is made of them."""

    enabled: bool = False
    bus: str = ""  # the module's bus; empty: the first bus
    periodic: Literal["off", "cells", "modules"] = "off"  # round-robin sweeps over these targets
    period_s: float = 3600.0  # one periodic sweep this often
    f_start_hz: float = 10_000.0
    f_stop_hz: float = 0.01
    points_per_decade: int = 10
    amplitude_a: float = 0.0  # 0: the module chooses
    fd: bool = False  # results as CAN FD frames (5 points each)
    max_abs_current_a: float = 2.0  # sweeps start only below this pack current...
    max_current_spread_a: float = 0.5  # ...steady within this much...
    stable_window_s: float = 30.0  # ...for this long
    abort_current_delta_a: float = 1.0  # a running sweep is aborted when the current moves this much
    sot_calibration: str = ""  # JSON of estimators.eis.SotCalibration; empty: no SoT (--sim: calibrated)
    sot_mismatch_c: float = 4.0  # SoT vs sensor beyond this (plus 2 sigma): a warning
    fit_rc: int = 4  # RC arcs of the fit (1..4)
    fit_cpe: bool = False  # constant-phase elements instead of ideal capacitors

    def check(self) -> None:
        if not 1 <= self.fit_rc <= N_RC:
            raise ValueError(f"fit_rc: must be 1..{N_RC}")
        if self.period_s < 60:
            raise ValueError("period_s: must be >= 60")
        if self.sot_mismatch_c <= 0:
            raise ValueError("sot_mismatch_c: must be > 0")
        for name in ("max_abs_current_a", "max_current_spread_a", "abort_current_delta_a", "stable_window_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        try:
            self.sweep().validate()
        except ValueError as exc:
            raise ValueError(f"f_start_hz/f_stop_hz/points_per_decade/amplitude_a: {exc}") from None

    def sweep(self) -> SweepSettings:
        return SweepSettings(self.f_start_hz, self.f_stop_hz, self.points_per_decade, self.amplitude_a, self.fd)

    def driver_config(self, layout: Layout) -> EisDriverConfig:
        targets: tuple[EisTarget, ...] = ()
        if self.periodic != "off":
            kind = self.periodic[:-1]
            n = layout.cells if kind == "cell" else layout.modules
            targets = tuple(EisTarget(kind, i) for i in range(n))
        return EisDriverConfig(sweep=self.sweep(), periodic_targets=targets, period_s=self.period_s,
                               max_abs_current_a=self.max_abs_current_a,
                               max_current_spread_a=self.max_current_spread_a,
                               stable_window_s=self.stable_window_s, abort_current_delta_a=self.abort_current_delta_a)


def eis_families(layout: Layout) -> dict[str, tuple[int, ...]]:
    """The image families EIS results live in."""
    out: dict[str, tuple[int, ...]] = {}
    for kind, n in (("cell", layout.cells), ("module", layout.modules)):
        out |= {f"{kind}.sot": (n,), f"{kind}.eis_r": (n, N_RC + 1), f"{kind}.eis_c": (n, N_RC)}
    return out


def eis_slots(layout: Layout) -> dict[str, tuple[float | None, list[str]]]:
    """One image source per target: its SoT and fit share the time of its measurement (no cycle time)."""
    out: dict[str, tuple[float | None, list[str]]] = {}
    for kind, n in (("cell", layout.cells), ("module", layout.modules)):
        for i in range(n):
            out[f"eis:{kind}[{i}]"] = (None, [f"{kind}[{i}].sot",
                                              *(f"{kind}[{i}].eis_r[{k}]" for k in range(N_RC + 1)),
                                              *(f"{kind}[{i}].eis_c[{k}]" for k in range(N_RC))])
    return out


def module_frame_ids() -> frozenset[int]:
    """The frame IDs the EIS module sends (P0 forwards these to this process, nothing else)."""
    return frozenset(m.frame_id for m in load_eis_dbc().messages if m.senders == ["EIS"])


def load_calibration(path: Path) -> SotCalibration:
    """A SoT calibration file (JSON of SotCalibration.to_dict); ValueError naming the problem."""
    try:
        return SotCalibration.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a SoT calibration ({exc})") from None


def _write_simulated_calibration(chemistry: str, sweep: SweepSettings, cache: Path) -> None:
    from drivers.sim_eis import calibration_set

    spectra, temps, socs, groups = calibration_set(chemistry, cells=4, frequency_hz=sweep.grid())
    cal = calibrate_sot(spectra, temps, socs, chemistry=chemistry, groups=groups)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(cal.to_dict()))
    tmp.replace(cache)


@dataclass(frozen=True, eq=False)
class EisResult:
    """One analysed spectrum."""

    analysis: EisAnalysis
    analysed_at: float  # wall clock

    @property
    def spectrum(self) -> EisSpectrum:
        return self.analysis.spectrum

    def record(self) -> dict[str, Any]:
        """The cloud's EIS record (docs/cloud-format.md): the spectrum, its verdict, SoT and fit."""
        a = self.analysis
        out: dict[str, Any] = {"kind": "eis", **a.spectrum.to_dict(), "valid": a.valid,
                               "kk": {k: v for k, v in a.kk.to_dict().items() if not k.startswith("residual")},
                               "analysed_at": self.analysed_at}
        if a.sot is not None:
            out["sot"] = a.sot.to_dict()
        if a.mismatch is not None:
            out["sot_mismatch"] = a.mismatch.to_dict()
        if a.fit is not None:
            out["fit"] = a.fit.to_dict()
        if a.drt is not None:
            out["drt_peaks"] = [{"tau_s": t, "r_ohm": r} for t, r in a.drt.peaks()]
        return out


class EisService:
    """Sweeps on request and on schedule, their analysis and publication (see the module docstring).

    ``send(frames)`` puts frames on the module's bus (through P0; it may block briefly, and
    is called from a worker thread). ``soc()`` returns the EKF's per-cell SoC (fraction) or
    None. ``record(dict)`` hands an EIS record to the cloud link. ``calibration``: SoT off
    when None.
    """

    def __init__(self, section: EisSection, layout: Layout, image: ProcessImage, recorder: Recorder,
                 send: Callable[[list[can.Message]], object], soc: Callable[[], np.ndarray | None],
                 record: Callable[[dict[str, Any]], None] | None = None,
                 calibration: SotCalibration | None = None) -> None:
        self.section = section
        self.layout = layout
        self.image = image
        self.recorder = recorder
        self.send = send
        self.soc = soc
        self.record = record
        self.calibration = calibration
        self.driver = EisDriver(self._conditions, section.driver_config(layout))
        self.results: dict[str, EisResult] = {}  # the last of each target
        self.last: EisResult | None = None
        self.last_valid: EisResult | None = None
        self.analysed = 0
        self.invalid = 0
        self.mismatches = 0
        self.send_errors = 0
        self.outcomes: dict[int, dict[str, Any]] = {}  # handle -> how its sweep ended (the last 100)
        self._analysis = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eis-analysis")
        self._analysing: deque[tuple[int | None, Future[EisResult]]] = deque()  # in the order measured
        self._protection_seen = threading.Event()
        self._mismatch_active: set[str] = set()
        recorder.subscribers.append(self._on_event)

    # -- inputs ------------------------------------------------------------------------------

    def on_frame(self, msg: can.Message) -> None:
        """A frame of the module (from P0's event stream; any thread)."""
        self.driver.on_frame(msg, time.monotonic())

    def _on_event(self, event: Event) -> None:
        # our own SoT warning comes back through the recorder: it must not abort the next sweep
        if event.active and event.kind in PROTECTION_KINDS and event.name != SOT_MISMATCH:
            self._protection_seen.set()

    def _good(self, name: str, now: float) -> float:
        try:
            r = self.image.read(name, now)  # value and quality of one frame
        except (KeyError, ValueError):
            return math.nan
        return float(r.value) if r.quality == Quality.GOOD else math.nan

    def _conditions(self, target: EisTarget) -> Conditions:
        """Voltage, temperature and SoC of the target now (NaN where unknown)."""
        now = time.monotonic()
        lay = self.layout
        cells = [target.index] if target.kind == "cell" else \
            list(range(target.index * lay.cells_per_module, (target.index + 1) * lay.cells_per_module))
        module = cells[0] // lay.cells_per_module
        volt = self._good(f"cell[{target.index}].voltage" if target.kind == "cell" else f"module[{module}].voltage", now)
        temp = self._good(f"cell[{target.index}].temperature", now) if target.kind == "cell" else math.nan
        if math.isnan(temp):
            sensors = [self._good(f"module[{module}].temperature[{k}]", now) for k in range(lay.sensors_per_module)]
            known = [t for t in sensors if not math.isnan(t)]
            temp = sum(known) / len(known) if known else math.nan
        soc_all = self.soc()
        soc = math.nan
        if soc_all is not None and cells[-1] < soc_all.size:
            soc = float(np.mean(soc_all[cells]))
        return Conditions(volt, temp, soc)

    def _pack_current(self) -> float:
        now = time.monotonic()
        for name in ("pack.current", "string[0].current"):
            value = self._good(name, now)
            if not math.isnan(value):
                return value
        return math.nan

    # -- the loop ----------------------------------------------------------------------------

    async def step(self, protection_active: bool) -> None:
        """One driver tick; frames out; finished spectra handed to the analysis thread, those it
        has analysed published (in the order they were measured)."""
        import anyio

        active = protection_active or self._protection_seen.is_set()
        self._protection_seen.clear()
        frames = self.driver.tick(time.monotonic(), self._pack_current(), active)
        if frames:
            try:
                await anyio.to_thread.run_sync(self.send, frames)
            except Exception as exc:  # the bus or P0 refused: the driver repeats requests (Ack timeout)
                # and aborts (while the module's Status still says it measures)
                self.send_errors += 1
                log.warning("EIS: could not send %d frames: %s", len(frames), exc)
        self._take_failures()
        for spectrum in self.driver.pop_records():
            self._analysing.append((self.driver.handle_of(spectrum.sweep_id),
                                    self._analysis.submit(self.analyse, spectrum)))
        while self._analysing and self._analysing[0][1].done():
            handle, future = self._analysing.popleft()
            result = future.result()  # analyse() turns every error into an invalid result
            self.publish(result)
            if handle is not None:
                self._ended(handle, {"ok": True, "target": result.spectrum.target, "valid": result.analysis.valid,
                                     "reason": "measured" if result.analysis.valid
                                     else f"measured, but invalid: {result.analysis.kk.reason}"})

    def _take_failures(self) -> None:
        for failure in self.driver.pop_failures():
            if failure.final:
                self._ended(failure.handle, {"ok": False, "target": failure.target.name, "reason": failure.reason})
            log.log(logging.WARNING if failure.final else logging.INFO, "EIS sweep of %s %s: %s",
                    failure.target.name, "failed" if failure.final else f"attempt {failure.attempt} failed",
                    failure.reason)

    def _ended(self, handle: int, outcome: dict[str, Any]) -> None:
        self.outcomes[handle] = outcome
        while len(self.outcomes) > 100:
            del self.outcomes[next(iter(self.outcomes))]

    def analyse(self, spectrum: EisSpectrum) -> EisResult:
        """KK, DRT, fit and SoT of one spectrum (pure computation; a worker thread runs it).
        A spectrum the analysis fails on is returned as invalid, the error as its KK reason: it is
        still published (every record goes to the cloud) and its sweep still gets an outcome."""
        s = self.section
        try:
            analysis = analyze_spectrum(spectrum, calibration=self.calibration, fit=True, n_rc=s.fit_rc,
                                        cpe=s.fit_cpe, mismatch_threshold_c=s.sot_mismatch_c)
        except Exception as exc:  # numerics (LinAlgError, ...) or too few points: one spectrum's problem
            log.warning("EIS %s: analysis failed: %s: %s", spectrum.target, type(exc).__name__, exc)
            analysis = EisAnalysis(spectrum, KKResult.invalid(spectrum.n, f"analysis failed: {type(exc).__name__}: {exc}"))
        return EisResult(analysis, time.time())

    def publish(self, result: EisResult) -> None:
        """Image, events, cloud: what one analysed spectrum changes."""
        sp = result.spectrum
        self.results[sp.target] = self.last = result
        self.analysed += 1
        a = result.analysis
        if a.valid:
            self.last_valid = result
            self._write_image(result)
            self._mismatch_event(result)
        else:
            self.invalid += 1
        if self.record is not None:
            self.record(result.record())
        sot = a.sot.temperature_c if a.sot is not None else math.nan
        log.info("EIS %s: %d points, %s%s%s", sp.target, sp.n, "valid" if a.valid else f"INVALID ({a.kk.reason})",
                 f", SoT {sot:.1f} degC" if math.isfinite(sot) else "",
                 f", R0 {a.fit.params.r0_ohm * 1000:.3f} mOhm" if a.fit is not None else "")

    def _write_image(self, result: EisResult) -> None:
        img = self.image
        a = result.analysis
        target = EisTarget.parse(result.spectrum.target)
        base = f"{target.kind}[{target.index}]"
        values: dict[str, float] = {}
        if a.sot is not None:
            values[f"{base}.sot"] = a.sot.temperature_c
        if a.fit is not None:
            p = a.fit.params
            for k, r in enumerate((p.r0_ohm, *p.r_ohm)):
                values[f"{base}.eis_r[{k}]"] = r
            for k, c in enumerate(p.c_f):
                values[f"{base}.eis_c[{k}]"] = c
        if not values:
            return
        for name, value in values.items():
            i = img.index(name)
            img.value[i] = value
            img.valid[i] = math.isfinite(value)  # an estimate that failed (NaN) is no value
        slot = int(img.slot_of[img.index(f"{base}.sot")])
        ts = result.spectrum.timestamp
        img.rx_time[slot] = ts if math.isfinite(ts) else result.analysed_at
        img.rx_mono[slot] = time.monotonic()
        img.seq[slot] += 1

    def _mismatch_event(self, result: EisResult) -> None:
        m = result.analysis.mismatch
        sot = result.analysis.sot
        target = result.spectrum.target
        if m is None or sot is None or m.kind == "unknown":
            return
        index = EisTarget.parse(target).index
        if m.warning:
            self.mismatches += 1
            self._mismatch_active.add(target)
            cause = "internal heating or a sensor reading low" if m.kind == "sot_above_sensor" \
                else "a sensor reading high"
            self.recorder(Event(Kind.LIMIT, SOT_MISMATCH, Level.RSL, True, index, round(sot.temperature_c, 2),
                                round(m.threshold_c, 2),
                                f"{target}: SoT {sot.temperature_c:.1f} degC differs from the sensor by "
                                f"{m.delta_c:+.1f} degC ({cause})"))
        elif target in self._mismatch_active:
            self._mismatch_active.discard(target)
            self.recorder(Event(Kind.LIMIT, SOT_MISMATCH, Level.RSL, False, index, round(sot.temperature_c, 2),
                                round(m.threshold_c, 2), f"{target}: SoT agrees with the sensor again"))

    # -- requests (CLI, OPC UA, cloud) -------------------------------------------------------------

    def request(self, target: str, **overrides: Any) -> tuple[bool, str, int]:
        """Queue an on-demand sweep of ``cell[N]`` / ``module[N]``: (accepted, reason, handle)."""
        try:
            t = EisTarget.parse(target)
            n = self.layout.cells if t.kind == "cell" else self.layout.modules
            if t.index >= n:
                return False, f"{t.name}: this site has {n} {t.kind}s (0..{n - 1})", 0
            handle = self.driver.request_sweep(t, **overrides)
        except ValueError as exc:
            return False, str(exc), 0
        return True, f"sweep of {t.name} queued (starts when the pack current is low and steady)", handle

    def cancel(self, handle: int | None = None) -> bool:
        """Abort the running sweep and drop queued ones (``handle`` None: all); each ends at once
        with the outcome "cancelled by operator"."""
        found = self.driver.cancel(handle)
        self._take_failures()
        return found


    def status(self, handle: int | None = None) -> dict[str, Any]:
        """Driver state, progress of the running sweep, counters, the last result; with ``handle``,
        also how that sweep ended (``outcome``, None until it has) and where it is until then
        (``stage``: see :meth:`EisDriver.stage`, or "analysing"; None once it has an outcome, or when
        this process does not know it)."""
        last = self.last
        extra = {"outcome": self.outcomes.get(handle), "stage": self._stage(handle)} if handle is not None else {}
        return {**self.driver.status(), **extra, "analysed": self.analysed, "invalid": self.invalid,
                "sot_mismatches": self.mismatches, "send_errors": self.send_errors,
                "sot_calibration": None if self.calibration is None else self.calibration.feature.label(),
                "last": None if last is None else summary(last)}

    def _stage(self, handle: int) -> str | None:
        if handle in self.outcomes:
            return None
        return self.driver.stage(handle) or ("analysing" if any(h == handle for h, _ in self._analysing) else None)

    def show(self, target: str | None = None) -> dict[str, Any]:
        """The last result of a target (default: the last of all), spectrum included."""
        result = self.last if target is None else self.results.get(EisTarget.parse(target).name)
        if result is None:
            raise KeyError(f"no spectrum of {target} yet" if target else "no spectrum measured yet")
        return {**summary(result), "spectrum": result.spectrum.to_dict(),
                "kk_residual_re": result.analysis.kk.residual_re.tolist(),
                "kk_residual_im": result.analysis.kk.residual_im.tolist(),
                "fit_z_re": None if result.analysis.fit is None else result.analysis.fit.z_fit.real.tolist(),
                "fit_z_im": None if result.analysis.fit is None else result.analysis.fit.z_fit.imag.tolist()}

    def targets(self) -> list[dict[str, Any]]:
        """One summary line per target measured so far."""
        return [summary(r) for _, r in sorted(self.results.items(), key=lambda kv: _target_key(kv[0]))]

    def estimates(self) -> dict[str, Any]:
        """The OPC UA EIS node values: last spectrum (arrays) and last fit, with their times."""
        out: dict[str, Any] = {}
        last = self.last
        if last is not None:
            sp, t = last.spectrum, last.spectrum.timestamp
            out |= {"eis.time": (t, t), "eis.target": (sp.target, t), "eis.kk_valid": (last.analysis.valid, t),
                    "eis.frequency_hz": (sp.frequency_hz, t), "eis.z_re_ohm": (sp.z_re_ohm, t),
                    "eis.z_im_ohm": (sp.z_im_ohm, t), "eis.magnitude_ohm": (sp.abs_ohm, t),
                    "eis.phase_deg": (sp.phase_deg, t), "eis.voltage_v": (sp.voltage_v, t)}
        stamps = self.image.rx_time[self.image.slots(self.image.span("cell.sot"))]
        if np.isfinite(stamps).any():
            # only cells whose SoT changed are written: each keeps the time of its own sweep
            out["cell.sot"] = (self.image.array("cell.sot").copy(), float(np.nanmax(stamps)))
        fitted = self.last_valid
        if fitted is not None and fitted.analysis.fit is not None:
            fit, t = fitted.analysis.fit, fitted.analysed_at
            p, sd = fit.params, fit.rel_sd_named()
            rs = (p.r0_ohm, *p.r_ohm)
            out |= {"eis.fit.time": (t, t), "eis.fit.ocv_v": (fitted.spectrum.mean_voltage_v, t),
                    **{f"eis.fit.r{k}_ohm": (rs[k] if k < len(rs) else math.nan, t) for k in range(N_RC + 1)},
                    **{f"eis.fit.c{k + 1}_f": (p.c_f[k] if k < len(p.c_f) else math.nan, t) for k in range(N_RC)},
                    "eis.fit.rel_sd": ([sd.get(f"R{k}", math.nan) for k in range(N_RC + 1)]
                                       + [sd.get(f"C{k}", math.nan) for k in range(1, N_RC + 1)], t)}
        return out


def summary(result: EisResult) -> dict[str, Any]:
    """A result in a few numbers (status, `eis show` tables)."""
    a, sp = result.analysis, result.spectrum
    return {"target": sp.target, "time": _num(sp.timestamp), "points": sp.n, "valid": a.valid,
            "kk_reason": a.kk.reason, "kk_rms": _num(a.kk.rms),
            "temperature_c": _num(sp.mean_temperature_c), "soc": _num(sp.mean_soc), "voltage_v": _num(sp.mean_voltage_v),
            "sot_c": None if a.sot is None else _num(a.sot.temperature_c),
            "sot_sigma_c": None if a.sot is None else _num(a.sot.sigma_c),
            "sot_extrapolated": None if a.sot is None else a.sot.extrapolated,
            "mismatch": None if a.mismatch is None else a.mismatch.to_dict(),
            "fit": None if a.fit is None else {"params": {k: _num(v) for k, v in a.fit.params.as_cloud().items()},
                                                "rel_sd": {k: _num(v) for k, v in a.fit.rel_sd_named().items()},
                                                "rel_rms": _num(a.fit.rel_rms), "converged": a.fit.converged}}


def _target_key(name: str) -> tuple[str, int]:
    t = EisTarget.parse(name)
    return t.kind, t.index


def _num(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


if __name__ == "__main__":  # the daemon's simulated-calibration child: CHEMISTRY F_START F_STOP POINTS_PER_DECADE CACHE
    chem, f_start, f_stop, ppd, out = sys.argv[1:6]
    _write_simulated_calibration(chem, SweepSettings(float(f_start), float(f_stop), int(ppd)), Path(out))
