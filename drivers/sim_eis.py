"""The simulated EIS module: a physically shaped cell impedance speaking dbc/bmsgw_eis.dbc.

Impedance model (per cell, :class:`ImpedanceModel`), ``variant="physical"`` (default)::

    Z = j w L + R0 + R_sei / (1 + (j w tau_sei)^a_sei)            SEI / surface film arc
              + R_ct  / (1 + (j w tau_ct)^a_ct)                  charge transfer || double layer
              + R_d tanh(sqrt(j w tau_d)) / sqrt(j w tau_d)       finite-length Warburg (diffusion)
              + 1 / (j w C_int)                                   intercalation capacitance

* Temperature: every resistance follows Arrhenius, ``R(T) = R_ref exp(Ea/R (1/T - 1/T_ref))``,
  with its own activation energy (electrolyte/ohmic lowest, charge transfer highest);
  capacitances do not depend on T, so the arcs' time constants stretch with R when cold.
  ``tau_d`` follows the diffusion coefficient's Arrhenius law.
* SoC: charge-transfer resistance rises towards both ends (Butler-Volmer exchange current
  ``~ sqrt(x (1 - x))``) and steeply below about 15 %; diffusion slows at low SoC;
  ``C_int = Q / (dOCV/dSoC)`` from the chemistry's OCV table in drivers/sim_battery.py.
* Cell-to-cell spread (:class:`CellSpread`): an aged cell loses active area (all
  interfacial R scale up, their C down, so time constants stay), its contact/ohmic
  resistance, inductance and capacity vary independently.

``variant="ecm"`` replaces the CPEs by ideal capacitors, the Warburg by two RC elements
(``0.4 R_d`` at ``0.03 tau_d``, ``0.6 R_d`` at ``0.5 tau_d``) and drops ``C_int``: then
``L + R0 + 4 (R || C)`` is exactly the cloud's model, with the same temperature and SoC laws
and a known truth (:meth:`ImpedanceModel.ecm_params`) for testing fits.

Measurement noise: each of ``Z_re`` and ``Z_im`` gets Gaussian noise of standard deviation
``noise * |Z|`` (0.5 % by default). A sweep under a DC current drifts: the module sees the
open-circuit voltage change ``dV/dt = I / (3600 Q) * dOCV/dSoC`` (plus :attr:`SimEis.drift_v_per_s`),
which leaks into each point as ``dZ = -(dV/dt) / (pi f I_amp)`` (a ramp over whole periods
of a sine). Temperature or SoC changes during a sweep change the impedance point by point.

:class:`SimEis` is the module node: feed it frames with :meth:`SimEis.receive`, call
:meth:`SimEis.tick` every ``TICK_S`` of wall time, it sends through the ``send`` callable,
like drivers/sim_pack.py's SimPack. It measures point after point in simulated time
(``speed`` times faster than real), and sends acks, status, capabilities and result frames
(classic three frames per point, or CAN FD with up to 5 points per frame).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import can
import cantools
import numpy as np
from numpy.typing import ArrayLike, NDArray

from drivers.eis_driver import load_eis_dbc, quantize_log_f
from drivers.sim_battery import get_chemistry
from estimators.eis_fit import EcmParams
from estimators.spectrum import EisSpectrum, log_grid

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
ComplexArray = NDArray[np.complex128]

TICK_S = 0.01
_R_GAS = 8.314462618
_T_REF_K = 298.15
DBC_PATH = Path(__file__).resolve().parent.parent / "dbc" / "bmsgw_eis.dbc"

# protocol constants (docs/eis-can-protocol.md)
STATE_IDLE, STATE_SETTLING, STATE_MEASURING, STATE_DONE, STATE_ABORTED, STATE_ERROR = range(6)
ERR_NONE = 0
ERR_BUSY = 1
ERR_INVALID_SWEEP_ID = 2
ERR_INVALID_TARGET = 3
ERR_INVALID_FREQUENCY = 4
ERR_INVALID_POINTS = 5
ERR_INVALID_AMPLITUDE = 6
ERR_FD_NOT_SUPPORTED = 7
ERR_UNKNOWN_SWEEP = 8
ERR_DC_CURRENT_TOO_HIGH = 9
ERR_OVERLOAD = 11
ERR_ABORTED_BY_GATEWAY = 15
ERR_GATEWAY_LOST = 16
CMD_ABORT, CMD_SWEEP, CMD_RESEND = 0, 1, 2
FORMAT_CLASSIC, FORMAT_FD = 0, 1
FD_POINTS_PER_FRAME = 5
GATEWAY_HEARTBEAT_ID = 0x130  # dbc/bmsgw_pack.dbc


# ---------------------------------------------------------------------------------------------
# impedance physics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImpedanceChemistry:
    """Impedance parameters of a chemistry at 25 degC and 50 % SoC (a 60 Ah class cell).

    Resistances in ohm, time constants in s, inductance in H, activation energies in J/mol.
    """

    name: str
    l_h: float
    r0_ohm: float
    ea_r0: float
    r_sei_ohm: float
    tau_sei_s: float
    alpha_sei: float
    ea_sei: float
    r_ct_ohm: float
    tau_ct_s: float
    alpha_ct: float
    ea_ct: float
    r_d_ohm: float
    tau_d_s: float
    ea_d: float
    capacity_ah: float = 60.0

    def ct_soc_factor(self, soc: float) -> float:
        # exchange current ~ sqrt(x (1 - x)) of the negative electrode's stoichiometry x,
        # plus the steep rise of a nearly empty cell
        x = 0.05 + 0.8 * min(max(soc, 0.0), 1.0)
        return float(0.5 / math.sqrt(x * (1.0 - x)) + 0.8 * math.exp(-soc / 0.08))

    def diffusion_soc_factor(self, soc: float) -> float:
        return float(1.0 + 0.8 * math.exp(-min(max(soc, 0.0), 1.0) / 0.15))


NMC_IMPEDANCE = ImpedanceChemistry(
    name="NMC", l_h=25e-9, r0_ohm=1.0e-3, ea_r0=12_000.0,
    r_sei_ohm=0.40e-3, tau_sei_s=2.0e-4, alpha_sei=0.92, ea_sei=30_000.0,
    r_ct_ohm=0.70e-3, tau_ct_s=6.0e-3, alpha_ct=0.88, ea_ct=45_000.0,
    r_d_ohm=0.9e-3, tau_d_s=2.5, ea_d=35_000.0,
)
LFP_IMPEDANCE = ImpedanceChemistry(
    name="LFP", l_h=25e-9, r0_ohm=0.9e-3, ea_r0=11_000.0,
    r_sei_ohm=0.30e-3, tau_sei_s=2.5e-4, alpha_sei=0.9, ea_sei=28_000.0,
    r_ct_ohm=0.55e-3, tau_ct_s=8.0e-3, alpha_ct=0.86, ea_ct=42_000.0,
    r_d_ohm=0.7e-3, tau_d_s=3.0, ea_d=33_000.0,
)
IMPEDANCE_CHEMISTRIES = {"NMC": NMC_IMPEDANCE, "LFP": LFP_IMPEDANCE}


@dataclass(frozen=True)
class CellSpread:
    """Multipliers of one cell relative to the chemistry's typical cell."""

    area: float = 1.0  # interfacial R x 1/area, C x area (active-area loss of an aged cell: area < 1)
    r0: float = 1.0
    inductance: float = 1.0
    capacity: float = 1.0

    @classmethod
    def draw(cls, rng: np.random.Generator, *, area_sigma: float = 0.10, r0_sigma: float = 0.05,
             l_sigma: float = 0.10, capacity_sigma: float = 0.03) -> CellSpread:
        """A random second-life cell (3-sigma clipped normal multipliers)."""
        z = np.clip(rng.standard_normal(4), -3.0, 3.0)
        return cls(area=float(1.0 / (1.0 + area_sigma * z[0])), r0=float(1.0 + r0_sigma * z[1]),
                   inductance=float(1.0 + l_sigma * z[2]), capacity=float(1.0 + capacity_sigma * z[3]))


def _arrhenius(ea: float, temperature_c: float) -> float:
    return math.exp(ea / _R_GAS * (1.0 / (temperature_c + 273.15) - 1.0 / _T_REF_K))


# The "ecm" variant's stand-in for the diffusion branch: two RC elements, 40 % of R_d at
# 0.03 tau_d and 60 % at 0.5 tau_d (the finite Warburg relaxes over about that span;
# its Foster series would need many more, closely spaced elements, which no 4-RC fit resolves).
WARBURG_RC = ((0.4, 0.03), (0.6, 0.5))


class ImpedanceModel:
    """Impedance of a cell of one chemistry at a temperature and SoC (see the module docstring)."""

    def __init__(self, chemistry: str | ImpedanceChemistry = "NMC", variant: str = "physical") -> None:
        if variant not in ("physical", "ecm"):
            raise ValueError("variant must be 'physical' or 'ecm'")
        self.chem = chemistry if isinstance(chemistry, ImpedanceChemistry) else IMPEDANCE_CHEMISTRIES[chemistry.upper()]
        self.variant = variant
        ocv = get_chemistry(self.chem.name)
        self._ocv_soc = np.asarray(ocv.ocv_soc)
        self._ocv_v = np.asarray(ocv.ocv_v)

    def docv_dsoc(self, soc: float) -> float:
        """OCV slope in V per unit SoC (smoothed over +-5 % SoC)."""
        lo, hi = max(soc - 0.05, 0.0), min(soc + 0.05, 1.0)
        v = np.interp([lo, hi], self._ocv_soc, self._ocv_v)
        return float(max((v[1] - v[0]) / (hi - lo), 1e-3))

    def parts(self, temperature_c: float, soc: float, spread: CellSpread = CellSpread()) -> dict[str, float]:
        """The element values at this state."""
        c = self.chem
        a = spread.area
        f_ct = c.ct_soc_factor(soc) / c.ct_soc_factor(0.5)
        f_d = c.diffusion_soc_factor(soc) / c.diffusion_soc_factor(0.5)
        r_sei = c.r_sei_ohm / a * _arrhenius(c.ea_sei, temperature_c)
        r_ct = c.r_ct_ohm / a * f_ct * _arrhenius(c.ea_ct, temperature_c)
        d_t = _arrhenius(c.ea_d, temperature_c) * f_d
        return {
            "l_h": c.l_h * spread.inductance,
            "r0_ohm": c.r0_ohm * spread.r0 * _arrhenius(c.ea_r0, temperature_c),
            "r_sei_ohm": r_sei, "tau_sei_s": c.tau_sei_s * r_sei / (c.r_sei_ohm / a),
            "r_ct_ohm": r_ct, "tau_ct_s": c.tau_ct_s * r_ct / (c.r_ct_ohm / a),
            "r_d_ohm": c.r_d_ohm / a * d_t, "tau_d_s": c.tau_d_s * d_t,
            "c_int_f": c.capacity_ah * spread.capacity * 3600.0 / self.docv_dsoc(soc),
        }

    def ecm_params(self, temperature_c: float, soc: float, spread: CellSpread = CellSpread()) -> EcmParams:
        """The exact ``L + R0 + 4 (R || C)`` of the ``ecm`` variant at this state."""
        p = self.parts(temperature_c, soc, spread)
        (k1, t1), (k2, t2) = WARBURG_RC
        return EcmParams(
            r0_ohm=p["r0_ohm"],
            r_ohm=(p["r_sei_ohm"], p["r_ct_ohm"], k1 * p["r_d_ohm"], k2 * p["r_d_ohm"]),
            tau_s=(p["tau_sei_s"], p["tau_ct_s"], t1 * p["tau_d_s"], t2 * p["tau_d_s"]),
            l_h=p["l_h"],
        )

    def impedance(self, frequency_hz: ArrayLike, temperature_c: float, soc: float,
                  spread: CellSpread = CellSpread()) -> ComplexArray:
        """Noise-free impedance in ohm (``Z_im < 0`` capacitive)."""
        f = np.asarray(frequency_hz, dtype=np.float64)
        if self.variant == "ecm":
            return self.ecm_params(temperature_c, soc, spread).impedance(f)
        p = self.parts(temperature_c, soc, spread)
        c = self.chem
        jw = 2j * np.pi * f
        sd = np.sqrt(jw * p["tau_d_s"])
        z = (jw * p["l_h"] + p["r0_ohm"]
             + p["r_sei_ohm"] / (1.0 + (jw * p["tau_sei_s"]) ** c.alpha_sei)
             + p["r_ct_ohm"] / (1.0 + (jw * p["tau_ct_s"]) ** c.alpha_ct)
             + p["r_d_ohm"] * np.tanh(sd) / sd
             + 1.0 / (jw * p["c_int_f"]))
        return np.asarray(z, dtype=np.complex128)


def add_noise(z: ArrayLike, rng: np.random.Generator, noise: float = 0.005) -> ComplexArray:
    """Gaussian noise of ``noise * |Z|`` on each of the real and imaginary parts."""
    zc = np.asarray(z, dtype=np.complex128)
    mag = np.abs(zc)
    return np.asarray(zc + noise * mag * (rng.standard_normal(zc.shape) + 1j * rng.standard_normal(zc.shape)),
                      dtype=np.complex128)


def simulate_spectrum(model: ImpedanceModel, frequency_hz: ArrayLike, temperature_c: float, soc: float, *,
                      spread: CellSpread = CellSpread(), noise: float = 0.005,
                      rng: np.random.Generator | None = None, temperature_drift_c: float = 0.0,
                      soc_drift: float = 0.0, voltage_drift_v_per_s: float = 0.0, amplitude_a: float = 1.0,
                      periods: float = 2.0, min_point_s: float = 0.2, target: str = "cell[0]") -> EisSpectrum:
    """A measured spectrum as the module would return it (noise, optional drift during the sweep).

    Points are measured in the order given; ``temperature_drift_c``/``soc_drift`` are the
    total change from the first to the last point (linear in time), ``voltage_drift_v_per_s``
    a DC drift leaking into every point. The record's temperature/SoC are the true values
    at each point's measurement time.
    """
    f = np.asarray(frequency_hz, dtype=np.float64).reshape(-1)
    rng = rng if rng is not None else np.random.default_rng()
    dur = np.maximum(periods / f, min_point_s)
    t_mid = np.cumsum(dur) - dur / 2.0
    frac = t_mid / float(dur.sum())
    temps = temperature_c + temperature_drift_c * frac
    socs = soc + soc_drift * frac
    if temperature_drift_c == 0.0 and soc_drift == 0.0:
        z = model.impedance(f, temperature_c, soc, spread)
    else:
        z = np.asarray([model.impedance(f[i:i + 1], float(temps[i]), float(socs[i]), spread)[0]
                        for i in range(f.size)])
    if voltage_drift_v_per_s:
        z = z - voltage_drift_v_per_s / (np.pi * f * amplitude_a)
    if noise > 0:
        z = add_noise(z, rng, noise)
    return EisSpectrum.from_impedance(f, z, temperature_c=temps, soc=socs, duration_s=float(dur.sum()),
                                      target=target)


# ---------------------------------------------------------------------------------------------
# the module node
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConditions:
    """What the simulated module's target cell is doing right now."""

    temperature_c: float = 25.0
    soc: float = 0.5
    current_a: float = 0.0  # DC current through the cell (> 0 charging)


@dataclass
class _Sweep:
    sweep_id: int
    target_type: int
    target_index: int
    freqs: FloatArray
    amplitude_a: float
    fmt: int
    start: float
    point_end: list[float] = field(default_factory=list)
    results: list[tuple[float, float, float, int]] = field(default_factory=list)
    unsent_fd: list[int] = field(default_factory=list)
    oldest_unsent: float = 0.0
    resend: list[int] = field(default_factory=list)


class SimEis:
    """The simulated EIS module node (see the module docstring).

    ``conditions(target_type, target_index)`` gives the true state of the target while it
    is measured (default: 25 degC, 50 % SoC, no current, or what :meth:`set_conditions`
    stored); ``cells``/``modules`` bound the valid targets. Knobs for tests: ``silent``
    (answers nothing), ``drop_result_frames`` (drops the next N result frames), ``fail_next``
    (the next sweep ends in Error with that code half-way), ``drift_v_per_s``,
    ``temperature_ramp_c_per_s``.
    """

    def __init__(self, send: Callable[[can.Message], object], *, dbc_path: str | Path = DBC_PATH,
                 chemistry: str = "NMC", variant: str = "physical", cells: int = 224, modules: int = 16,
                 cells_per_module: int = 14, conditions: Callable[[int, int], SimConditions] | None = None,
                 noise: float = 0.005, speed: float = 1.0, seed: int = 1, fd_capable: bool = True,
                 min_freq_hz: float = 0.001, max_freq_hz: float = 20_000.0, max_amplitude_a: float = 10.0,
                 default_amplitude_a: float = 1.0, max_points: int = 512, periods: float = 2.0,
                 min_point_s: float = 0.2, settle_s: float = 1.0, max_dc_current_a: float = 10.0,
                 cell_spread: float = 1.0, heartbeat_timeout_s: float | None = None) -> None:
        self.db = db = load_eis_dbc(dbc_path)
        self._msg = {m.name: m for m in db.messages}
        self.send = send
        self.model = ImpedanceModel(chemistry, variant)
        self.cells, self.modules, self.cells_per_module = cells, modules, cells_per_module
        self.conditions = conditions
        self._conditions: dict[tuple[int, int], SimConditions] = {}
        self.noise = noise
        self.speed = speed
        self.rng = np.random.default_rng(seed)
        spread_rng = np.random.default_rng(seed + 10_000)
        self.spreads = [CellSpread.draw(spread_rng, area_sigma=0.1 * cell_spread, r0_sigma=0.05 * cell_spread,
                                        l_sigma=0.1 * cell_spread, capacity_sigma=0.03 * cell_spread)
                        for _ in range(cells)]
        self.fd_capable = fd_capable
        self.min_freq_hz, self.max_freq_hz = min_freq_hz, max_freq_hz
        self.max_amplitude_a, self.default_amplitude_a = max_amplitude_a, default_amplitude_a
        self.max_points = max_points
        self.periods, self.min_point_s, self.settle_s = periods, min_point_s, settle_s
        self.max_dc_current_a = max_dc_current_a
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # test knobs
        self.silent = False
        self.drop_result_frames = 0
        self.fail_next: int | None = None
        self.drift_v_per_s = 0.0
        self.temperature_ramp_c_per_s = 0.0
        # state
        self.state = STATE_IDLE
        self.error_code = ERR_NONE
        self.sweep: _Sweep | None = None
        self.tick_count = 0
        self.frames_sent = 0
        self.frames_received = 0
        self.frames_dropped = 0
        self.truth: list[tuple[float, float]] = []  # (T, SoC) per point of the current sweep
        self._alive: dict[str, int] = {}
        self._next_status = 0.0
        self._next_caps = 0.0
        self._last_heartbeat: float | None = None

    # -- configuration --------------------------------------------------------------------

    def set_conditions(self, target_type: int, target_index: int, conditions: SimConditions) -> None:
        self._conditions[(target_type, target_index)] = conditions

    def target_conditions(self, target_type: int, target_index: int) -> SimConditions:
        if self.conditions is not None:
            return self.conditions(target_type, target_index)
        return self._conditions.get((target_type, target_index), SimConditions())

    def spread_of(self, target_type: int, target_index: int) -> CellSpread:
        if target_type == 0:
            return self.spreads[target_index % len(self.spreads)]
        n = self.cells_per_module
        cells = self.spreads[target_index * n:(target_index + 1) * n] or [CellSpread()]
        return CellSpread(area=float(np.mean([c.area for c in cells])), r0=float(np.mean([c.r0 for c in cells])),
                          inductance=float(np.mean([c.inductance for c in cells])),
                          capacity=float(np.mean([c.capacity for c in cells])))

    def true_impedance(self, target_type: int, target_index: int, frequency_hz: ArrayLike,
                       temperature_c: float, soc: float) -> ComplexArray:
        """Noise-free impedance of a target (a module: its cells in series)."""
        z = self.model.impedance(frequency_hz, temperature_c, soc, self.spread_of(target_type, target_index))
        return z * (self.cells_per_module if target_type == 1 else 1)

    @property
    def now(self) -> float:
        return self.tick_count * TICK_S

    # -- frames in ------------------------------------------------------------------------

    def receive(self, msg: can.Message) -> None:
        """A frame from the bus (commands; the gateway heartbeat when watched)."""
        self.frames_received += 1
        if msg.is_extended_id or msg.is_error_frame or msg.is_remote_frame:
            return
        if msg.arbitration_id == GATEWAY_HEARTBEAT_ID:
            self._last_heartbeat = self.now
            return
        if self.silent:
            return
        try:
            if msg.arbitration_id == self._msg["EIS_SweepRequest"].frame_id:
                self._on_sweep_request(self._decode("EIS_SweepRequest", msg))
            elif msg.arbitration_id == self._msg["EIS_Abort"].frame_id:
                self._on_abort(self._decode("EIS_Abort", msg))
            elif msg.arbitration_id == self._msg["EIS_ResendRequest"].frame_id:
                self._on_resend(self._decode("EIS_ResendRequest", msg))
        except (cantools.database.DecodeError, KeyError, ValueError, IndexError) as exc:
            log.debug("sim EIS: ignoring bad command frame: %s", exc)

    def _decode(self, name: str, msg: can.Message) -> dict[str, float]:
        m = self._msg[name]
        if len(msg.data) < m.length:
            raise ValueError(f"{name}: {len(msg.data)} bytes, need {m.length}")
        return cast(dict[str, float], m.decode(bytes(msg.data[:m.length]), decode_choices=False))

    def _ack(self, sweep_id: int, command: int, result: int, points: int = 0, duration_s: float = 0.0) -> None:
        self._send("EIS_Ack", {"SweepId": sweep_id, "Command": command, "Result": result, "PointsTotal": points,
                               "EstimatedDuration": min(math.ceil(duration_s), 65535)})

    def _on_sweep_request(self, v: dict[str, float]) -> None:
        sid = int(v["SweepId"])
        ttype, tidx = int(v["TargetType"]), int(v["TargetIndex"])
        a, b = float(v["StartFreqLog10"]), float(v["StopFreqLog10"])
        ppd = int(v["PointsPerDecade"])
        amp = float(v["ExcitationAmplitude"]) or self.default_amplitude_a
        fmt = int(v["ResultFormat"])
        running = self.state in (STATE_SETTLING, STATE_MEASURING)
        if running and self.sweep is not None:
            same = (sid == self.sweep.sweep_id and ttype == self.sweep.target_type and tidx == self.sweep.target_index
                    and fmt == self.sweep.fmt)
            if same:  # a repeated request: the ack got lost; answer again, keep measuring
                self._ack(sid, CMD_SWEEP, ERR_NONE, self.sweep.freqs.size, self._duration(self.sweep.freqs))
            else:
                self._ack(sid, CMD_SWEEP, ERR_BUSY)
            return
        err = ERR_NONE
        freqs = np.zeros(0)
        # the limits as advertised (coded): a request at its own code is within them
        lo_code, hi_code = quantize_log_f(self.min_freq_hz), quantize_log_f(self.max_freq_hz)
        if sid == 0:
            err = ERR_INVALID_SWEEP_ID
        elif ttype == 0 and not 0 <= tidx < self.cells or ttype == 1 and not 0 <= tidx < self.modules or ttype > 1:
            err = ERR_INVALID_TARGET
        elif not (lo_code - 1e-9 <= min(a, b) and max(a, b) <= hi_code + 1e-9):
            err = ERR_INVALID_FREQUENCY
        elif ppd < 1:
            err = ERR_INVALID_POINTS
        elif amp > self.max_amplitude_a + 1e-9:
            err = ERR_INVALID_AMPLITUDE
        elif fmt == FORMAT_FD and not self.fd_capable or fmt > FORMAT_FD:
            err = ERR_FD_NOT_SUPPORTED
        else:
            # a coded limit lies up to half a code beyond the generator's: the nearest it can make
            freqs = np.clip(log_grid(10.0**a, 10.0**b, ppd), self.min_freq_hz, self.max_freq_hz)
            if freqs.size > self.max_points:
                err = ERR_INVALID_POINTS
        if err != ERR_NONE:
            self._ack(sid, CMD_SWEEP, err)
            return
        cond = self.target_conditions(ttype, tidx)
        self.sweep = _Sweep(sid, ttype, tidx, freqs, amp, fmt, self.now)
        if abs(cond.current_a) > self.max_dc_current_a:  # the module's own pre-check
            self._ack(sid, CMD_SWEEP, ERR_NONE, freqs.size, self._duration(freqs))
            self._finish(STATE_ERROR, ERR_DC_CURRENT_TOO_HIGH)
            return
        self.truth = []
        self._ack(sid, CMD_SWEEP, ERR_NONE, freqs.size, self._duration(freqs))
        self._set_state(STATE_SETTLING, ERR_NONE)
        # schedule every point's end time in simulated seconds, compressed by speed
        t = self.now + self.settle_s / self.speed
        for fr in freqs:
            t += max(self.periods / float(fr), self.min_point_s) / self.speed
            self.sweep.point_end.append(t)

    def _duration(self, freqs: FloatArray) -> float:
        """Expected duration on this node's clock (measurement time compressed by ``speed``)."""
        return (self.settle_s + float(np.maximum(self.periods / freqs, self.min_point_s).sum())) / self.speed

    def _on_abort(self, v: dict[str, float]) -> None:
        sid = int(v["SweepId"])
        running = self.state in (STATE_SETTLING, STATE_MEASURING)
        if self.sweep is not None and running and sid in (0, self.sweep.sweep_id):
            self._ack(sid, CMD_ABORT, ERR_NONE)
            self._finish(STATE_ABORTED, ERR_ABORTED_BY_GATEWAY)
        elif sid == 0 or (self.sweep is not None and sid == self.sweep.sweep_id):
            self._ack(sid, CMD_ABORT, ERR_NONE)  # nothing running: nothing to do
        else:
            self._ack(sid, CMD_ABORT, ERR_UNKNOWN_SWEEP)

    def _on_resend(self, v: dict[str, float]) -> None:
        sid, first, count = int(v["SweepId"]), int(v["FirstPoint"]), int(v["PointCount"])
        sw = self.sweep
        if sw is None or sid != sw.sweep_id or sid == 0:
            self._ack(sid, CMD_RESEND, ERR_UNKNOWN_SWEEP)
            return
        avail = [k for k in range(first, first + count) if k < len(sw.results)]
        if count < 1 or not avail:
            self._ack(sid, CMD_RESEND, ERR_INVALID_POINTS)
            return
        self._ack(sid, CMD_RESEND, ERR_NONE, len(avail))
        if sw.fmt == FORMAT_FD:
            for i in range(0, len(avail), FD_POINTS_PER_FRAME):
                self._send_fd(sw, avail[i:i + FD_POINTS_PER_FRAME])
        else:
            for k in avail:
                self._send_classic(sw, k)

    # -- the clock ------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance one TICK_S: measure points that are due, send frames that are due."""
        now = self.now
        sw = self.sweep
        if (self.heartbeat_timeout_s is not None and self._last_heartbeat is not None
                and self.state in (STATE_SETTLING, STATE_MEASURING)
                and now - self._last_heartbeat > self.heartbeat_timeout_s):
            self._finish(STATE_ERROR, ERR_GATEWAY_LOST)
        if sw is not None and self.state in (STATE_SETTLING, STATE_MEASURING):
            if self.state == STATE_SETTLING and now >= sw.start + self.settle_s / self.speed:
                self._set_state(STATE_MEASURING, ERR_NONE)
            while self.state == STATE_MEASURING and len(sw.results) < sw.freqs.size \
                    and now >= sw.point_end[len(sw.results)]:
                k = len(sw.results)
                if self.fail_next is not None and k >= sw.freqs.size // 2:
                    code, self.fail_next = self.fail_next, None
                    self._finish(STATE_ERROR, code)
                    break
                self._measure_point(sw, k)
            if sw.fmt == FORMAT_FD and sw.unsent_fd and self.state == STATE_MEASURING and (
                    len(sw.unsent_fd) >= FD_POINTS_PER_FRAME or now - sw.oldest_unsent >= 1.0
                    or len(sw.results) == sw.freqs.size):
                self._flush_fd(sw)
            if self.state == STATE_MEASURING and len(sw.results) == sw.freqs.size:
                self._finish(STATE_DONE, ERR_NONE)
        if not self.silent:
            if now >= self._next_caps:
                self._send_caps()
                self._next_caps = now + 5.0
            if now >= self._next_status:
                self._send_status()
        self.tick_count += 1

    def _measure_point(self, sw: _Sweep, k: int) -> None:
        f = float(sw.freqs[k])
        cond = self.target_conditions(sw.target_type, sw.target_index)
        temp = cond.temperature_c + self.temperature_ramp_c_per_s * (self.now - sw.start) * self.speed
        z = complex(self.true_impedance(sw.target_type, sw.target_index, [f], temp, cond.soc)[0])
        # OCV drift under a DC current plus injected drift, leaking into the point
        q_as = self.model.chem.capacity_ah * 3600.0
        drift = cond.current_a / q_as * self.model.docv_dsoc(cond.soc) + self.drift_v_per_s
        z -= drift / (math.pi * f * sw.amplitude_a)
        if self.noise > 0:
            z += self.noise * abs(z) * complex(self.rng.standard_normal(), self.rng.standard_normal())
        flags = 0
        sw.results.append((f, z.real, z.imag, flags))
        self.truth.append((temp, cond.soc))
        if sw.fmt == FORMAT_FD:
            if not sw.unsent_fd:
                sw.oldest_unsent = self.now
            sw.unsent_fd.append(k)
        else:
            self._send_classic(sw, k)

    def _flush_fd(self, sw: _Sweep) -> None:
        while sw.unsent_fd:
            chunk = sw.unsent_fd[:FD_POINTS_PER_FRAME]
            del sw.unsent_fd[:FD_POINTS_PER_FRAME]
            self._send_fd(sw, chunk)

    def _finish(self, state: int, code: int) -> None:
        if self.sweep is not None and self.sweep.unsent_fd and state == STATE_DONE:
            self._flush_fd(self.sweep)
        self._set_state(state, code)

    def _set_state(self, state: int, code: int) -> None:
        self.state = state
        self.error_code = code
        self._send_status()

    # -- frames out -----------------------------------------------------------------------

    def _send_status(self) -> None:
        sw = self.sweep
        busy = self.state in (STATE_SETTLING, STATE_MEASURING)
        self._next_status = self.now + (0.1 if busy else 1.0)
        if self.silent:
            return
        self._send("EIS_Status", {
            "State": self.state, "SweepId": sw.sweep_id if sw else 0, "ErrorCode": self.error_code,
            "TargetType": sw.target_type if sw else 0, "TargetIndex": sw.target_index if sw else 0,
            "PointsDone": len(sw.results) if sw else 0, "PointsTotal": sw.freqs.size if sw else 0})

    def _send_caps(self) -> None:
        self._send("EIS_Capabilities", {
            "ProtocolVersion": 1, "MinFreqLog10": quantize_log_f(self.min_freq_hz),
            "MaxFreqLog10": quantize_log_f(self.max_freq_hz), "MaxAmplitude": self.max_amplitude_a,
            "MaxPoints": self.max_points, "FdCapable": int(self.fd_capable), "ModuleTargets": 1})

    def _send_classic(self, sw: _Sweep, k: int) -> None:
        f, re, im, flags = sw.results[k]
        head = {"SweepId": sw.sweep_id, "PointIndex": k}
        self._send("EIS_ResultPoint", {**head, "Part": 0, "PointFlags": flags, "Frequency": f}, result=True)
        self._send("EIS_ResultPoint", {**head, "Part": 1, "ZReal": re}, result=True)
        self._send("EIS_ResultPoint", {**head, "Part": 2, "ZImag": im}, result=True)

    def _send_fd(self, sw: _Sweep, points: list[int]) -> None:
        values: dict[str, float] = {"SweepId": sw.sweep_id, "FirstPoint": points[0], "PointCount": len(points)}
        for slot in range(FD_POINTS_PER_FRAME):
            if slot < len(points):
                f, re, im, flags = sw.results[points[slot]]
            else:
                f, re, im, flags = 0.0, 0.0, 0.0, 0
            values |= {f"Point{slot}_Flags": flags, f"Point{slot}_Frequency": f,
                       f"Point{slot}_ZReal": re, f"Point{slot}_ZImag": im}
        # slots must hold consecutive points; a resend of a gap therefore goes one frame per run
        assert points == list(range(points[0], points[0] + len(points)))
        self._send("EIS_ResultPointsFD", values, result=True)

    def _send(self, name: str, values: dict[str, Any], result: bool = False) -> None:
        msg = self._msg[name]
        if any(s.name == "AliveCounter" for s in msg.signals):
            values["AliveCounter"] = self._alive[name] = (self._alive.get(name, -1) + 1) % 16
        if result and self.drop_result_frames > 0:
            self.drop_result_frames -= 1
            self.frames_dropped += 1
            return
        data = msg.encode(values, strict=False, scaling=True, padding=False)
        self.send(can.Message(arbitration_id=msg.frame_id, data=data, is_extended_id=False, is_fd=msg.is_fd,
                              bitrate_switch=msg.is_fd, timestamp=time.time()))
        self.frames_sent += 1


def calibration_set(chemistry: str = "NMC", *, temperatures_c: ArrayLike = (0, 5, 10, 15, 20, 25, 30, 35, 40, 45),
                    socs: ArrayLike = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), cells: int = 4, noise: float = 0.005,
                    frequency_hz: ArrayLike | None = None, seed: int = 7,
                    variant: str = "physical") -> tuple[list[EisSpectrum], FloatArray, FloatArray, NDArray[np.int64]]:
    """Spectra of a few random cells over a T x SoC grid, as a lab would record to calibrate SoT:
    (spectra, temperatures, socs, cell index per spectrum) for :func:`estimators.sot.calibrate_sot`."""
    model = ImpedanceModel(chemistry, variant)
    f = log_grid(10_000.0, 0.01, 10) if frequency_hz is None else np.asarray(frequency_hz, dtype=np.float64)
    rng = np.random.default_rng(seed)
    spreads = [CellSpread.draw(rng) for _ in range(cells)]
    out: list[EisSpectrum] = []
    ts: list[float] = []
    ss: list[float] = []
    gs: list[int] = []
    for ci, sp in enumerate(spreads):
        for t in np.asarray(temperatures_c, dtype=np.float64):
            for s in np.asarray(socs, dtype=np.float64):
                spec = simulate_spectrum(model, f, float(t), float(s), spread=sp, noise=noise, rng=rng)
                out.append(replace(spec, target=f"cell[{ci}]"))
                ts.append(float(t))
                ss.append(float(s))
                gs.append(ci)
    return out, np.asarray(ts), np.asarray(ss), np.asarray(gs, dtype=np.int64)
