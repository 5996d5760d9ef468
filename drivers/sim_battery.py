"""Physics of the simulated battery pack used by ``--sim`` mode and the tests.

A string of second-life EV modules in series (reference site: 16 modules x 14
cells = 224 cells). Every cell has its own equivalent-circuit model (OCV table
+ R0 + two RC pairs, temperature dependent); every module is a lumped thermal
mass cooled by convection to ambient. A measurement layer turns the true state
into what the module electronics would report (noise, quantisation, sensor
offsets) and hosts the fault injection.

Conventions (used everywhere in this module):

* Current in amperes; pack current ``> 0`` means CHARGING (current flows into
  the battery), ``< 0`` means discharging. Charging raises the terminal voltage:
  ``V = OCV(soc, T) + I * R0 + v1 + v2``.
* Voltages in V, temperatures in degC, time in s, power in W, charge in Ah,
  SoC as a fraction in [0, 1].
* Cells are numbered module-major: cell ``k`` lives in module
  ``k // cells_per_module``. Per-cell arrays have shape ``(n_cells,)``.

The model never reads a clock: the caller advances it with ``step(dt, I)``, so
simulated time may run faster or slower than real time. There is no I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "CHEMISTRIES",
    "LFP",
    "MAX_CURRENT_OFFSET_A",
    "MAX_DRIFT_MV_PER_S",
    "MAX_MODULE_HEAT_W",
    "NMC",
    "Chemistry",
    "PackMeasurement",
    "SensorConfig",
    "SimBatteryPack",
    "StorageDayProfile",
    "derate_current",
    "get_chemistry",
]

FloatArray = NDArray[np.float64]

_GAS_CONSTANT_J_PER_MOL_K = 8.314462618
_T_REF_C = 25.0
_T_REF_K = _T_REF_C + 273.15
_SECONDS_PER_DAY = 86400.0
# Draws beyond 3 sigma would be outliers no incoming inspection lets through
# (and a Gaussian tail could otherwise give a negative capacity).
_SPREAD_CLIP_SIGMA = 3.0
# Physical ranges of the injectable faults: beyond them the model leaves physics
# (a negative heat source cools a module towards absolute zero) and non-finite
# values make every later step fail.
MAX_DRIFT_MV_PER_S = 10_000.0  # the reported voltage saturates within a second anyway
MAX_MODULE_HEAT_W = 2_000.0  # settles ~500 K above ambient: beyond a thermal runaway
MAX_CURRENT_OFFSET_A = 1_000.0  # the current sensor's range is +-8388 A


@dataclass(frozen=True, slots=True)
class Chemistry:
    """Per-cell parameters of one cell chemistry (values at 25 degC, new-ish cell).

    ``ocv_soc``/``ocv_v``: OCV table at 25 degC (SoC strictly increasing).
    ``v_min``/``v_max``: normal operating window of a cell in V.
    ``charge_taper_v``/``discharge_taper_v``: (start, end) of the voltage band in
    which :func:`derate_current` tapers the request from full to zero.
    Resistances in ohm, time constants in s, activation energies in J/mol.
    """

    name: str
    ocv_soc: tuple[float, ...]
    ocv_v: tuple[float, ...]
    docv_dt_v_per_k: float
    v_min: float
    v_max: float
    charge_taper_v: tuple[float, float]
    discharge_taper_v: tuple[float, float]
    r0_ohm: float
    r1_ohm: float
    tau1_s: float
    r2_ohm: float
    tau2_s: float
    # Ohmic (electrolyte) resistance is less temperature sensitive than charge
    # transfer and diffusion, hence two activation energies.
    ea_r0_j_per_mol: float = 20_000.0
    ea_rc_j_per_mol: float = 35_000.0
    # Resistance rises near empty; factor 1 + gain * exp(-soc / width).
    r_low_soc_gain: float = 0.5
    r_low_soc_width: float = 0.1
    coulombic_efficiency: float = 0.995

    def __post_init__(self) -> None:
        soc = np.asarray(self.ocv_soc, dtype=np.float64)
        ocv = np.asarray(self.ocv_v, dtype=np.float64)
        if soc.shape != ocv.shape or soc.size < 2:
            raise ValueError(f"{self.name}: OCV table needs matching soc/ocv of length >= 2")
        if soc[0] != 0.0 or soc[-1] != 1.0 or np.any(np.diff(soc) <= 0.0):
            raise ValueError(f"{self.name}: OCV soc points must rise strictly from 0 to 1")
        if np.any(np.diff(ocv) < 0.0):
            raise ValueError(f"{self.name}: OCV must not decrease with SoC")
        if not self.v_min < self.discharge_taper_v[1] < self.discharge_taper_v[0]:
            raise ValueError(f"{self.name}: discharge taper must lie above v_min, start > end")
        if not self.charge_taper_v[0] < self.charge_taper_v[1] < self.v_max:
            raise ValueError(f"{self.name}: charge taper must lie below v_max, start < end")
        if min(self.r0_ohm, self.r1_ohm, self.r2_ohm, self.tau1_s, self.tau2_s) <= 0.0:
            raise ValueError(f"{self.name}: resistances and time constants must be > 0")
        if not 0.0 < self.coulombic_efficiency <= 1.0:
            raise ValueError(f"{self.name}: coulombic efficiency must be in (0, 1]")

    def ocv(self, soc: ArrayLike, temp_c: ArrayLike = _T_REF_C) -> FloatArray:
        """Open-circuit voltage in V at ``soc`` (fraction) and ``temp_c`` (degC)."""
        base = np.interp(np.asarray(soc, dtype=np.float64), self.ocv_soc, self.ocv_v)
        result: FloatArray = np.asarray(
            base + self.docv_dt_v_per_k * (np.asarray(temp_c, dtype=np.float64) - _T_REF_C),
            dtype=np.float64,
        )
        return result


# Typical NMC/graphite automotive cell (BMW i3 / VW e-Golf class, 60 Ah):
# steep below 10 %, gentle S-shape through the middle, 4.20 V at full.
_NMC_OCV_25C = (  # (SoC, OCV in V)
    (0.00, 3.000),
    (0.02, 3.280),
    (0.05, 3.420),
    (0.10, 3.510),
    (0.15, 3.555),
    (0.20, 3.590),
    (0.25, 3.615),
    (0.30, 3.638),
    (0.35, 3.660),
    (0.40, 3.682),
    (0.45, 3.705),
    (0.50, 3.732),
    (0.55, 3.762),
    (0.60, 3.797),
    (0.65, 3.835),
    (0.70, 3.875),
    (0.75, 3.916),
    (0.80, 3.960),
    (0.85, 4.006),
    (0.90, 4.056),
    (0.95, 4.120),
    (1.00, 4.200),
)
NMC = Chemistry(
    name="NMC",
    ocv_soc=tuple(soc for soc, _ in _NMC_OCV_25C),
    ocv_v=tuple(v for _, v in _NMC_OCV_25C),
    docv_dt_v_per_k=-0.3e-3,
    v_min=3.0,
    v_max=4.2,
    charge_taper_v=(4.05, 4.15),
    discharge_taper_v=(3.45, 3.30),
    r0_ohm=1.5e-3,
    r1_ohm=0.6e-3,
    tau1_s=10.0,
    r2_ohm=0.8e-3,
    tau2_s=300.0,
)

# LFP/graphite: knees at both ends and a long flat plateau (3.20-3.35 V)
# between about 10 % and 95 %, which is what makes LFP SoC hard to observe.
_LFP_OCV_25C = (  # (SoC, OCV in V)
    (0.00, 2.500),
    (0.01, 2.800),
    (0.03, 3.000),
    (0.05, 3.100),
    (0.08, 3.170),
    (0.10, 3.200),
    (0.15, 3.220),
    (0.20, 3.240),
    (0.30, 3.265),
    (0.40, 3.285),
    (0.50, 3.292),
    (0.60, 3.300),
    (0.70, 3.320),
    (0.80, 3.330),
    (0.90, 3.335),
    (0.95, 3.345),
    (0.97, 3.370),
    (0.98, 3.420),
    (0.99, 3.500),
    (1.00, 3.650),
)
LFP = Chemistry(
    name="LFP",
    ocv_soc=tuple(soc for soc, _ in _LFP_OCV_25C),
    ocv_v=tuple(v for _, v in _LFP_OCV_25C),
    docv_dt_v_per_k=-0.2e-3,
    v_min=2.5,
    v_max=3.65,
    charge_taper_v=(3.45, 3.55),
    discharge_taper_v=(3.00, 2.80),
    r0_ohm=1.2e-3,
    r1_ohm=0.5e-3,
    tau1_s=8.0,
    r2_ohm=0.7e-3,
    tau2_s=400.0,
)

CHEMISTRIES: Mapping[str, Chemistry] = {"NMC": NMC, "LFP": LFP}


def get_chemistry(chemistry: str | Chemistry) -> Chemistry:
    """Return a :class:`Chemistry` given one or its name ("NMC", "LFP")."""
    if isinstance(chemistry, Chemistry):
        return chemistry
    try:
        return CHEMISTRIES[chemistry.upper()]
    except KeyError:
        raise ValueError(
            f"unknown chemistry {chemistry!r}; known: {', '.join(CHEMISTRIES)}"
        ) from None


@dataclass(frozen=True, slots=True)
class SensorConfig:
    """Noise, resolution and offsets of the simulated measurement hardware.

    Noise values are Gaussian standard deviations; resolution 0 disables
    quantisation. ``temp_sensor_offset_std_c`` sets the fixed per-sensor
    calibration offsets drawn once from the pack's seed.
    """

    cell_voltage_noise_v: float = 0.001
    cell_voltage_resolution_v: float = 0.001
    temp_noise_c: float = 0.05
    temp_resolution_c: float = 0.1
    temp_sensor_offset_std_c: float = 0.3
    current_noise_a: float = 0.05
    current_offset_a: float = 0.0
    current_resolution_a: float = 0.001
    pack_voltage_noise_v: float = 0.05
    pack_voltage_resolution_v: float = 0.01


@dataclass(frozen=True, slots=True)
class PackMeasurement:
    """One reading of the pack as the hardware reports it.

    ``cell_voltages_v``: (n_cells,) V; ``module_temps_c``: (modules,
    sensors_per_module) degC; ``pack_current_a``: A, > 0 charging;
    ``pack_voltage_v``: the string's own voltage sense, V (independent of the
    cell channels, so cell-channel faults do not show in it);
    ``dc_link_voltage_v``: inverter-side voltage, V; ``pack_temp_c``: mean module
    temperature; ``ambient_temp_c``: ambient sensor; ``time_s``: simulated time.
    """

    time_s: float
    cell_voltages_v: FloatArray
    module_temps_c: FloatArray
    pack_temp_c: float
    ambient_temp_c: float
    pack_current_a: float
    pack_voltage_v: float
    dc_link_voltage_v: float


def _decimals(resolution: float) -> int:
    # One guard digit so that e.g. 0.25 keeps its two places.
    return max(0, math.ceil(-math.log10(resolution))) + 1


def _checked(what: str, value: float, lo: float, hi: float, unit: str) -> float:
    """``value`` if finite and within ``lo..hi``, else a ValueError naming ``what`` and the range."""
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{what} {value:g} {unit}; allowed: a finite value in {lo:g}..{hi:g} {unit}")
    return value


def _quantise(value: FloatArray, resolution: float) -> FloatArray:
    if resolution <= 0.0:
        return value
    # The second round removes artefacts like 25.400000000000002 so that
    # readings compare equal to the decimal values a real device would send.
    return np.round(np.round(value / resolution) * resolution, _decimals(resolution))


def _quantise_scalar(value: float, resolution: float) -> float:
    if resolution <= 0.0:
        return value
    return round(round(value / resolution) * resolution, _decimals(resolution))


@dataclass(slots=True)
class _Faults:
    drift_rate_v_per_s: FloatArray
    drift_start_s: FloatArray
    stuck: NDArray[np.bool_]
    stuck_value_v: FloatArray
    module_heat_w: FloatArray
    current_offset_a: float = 0.0
    descriptions: list[str] = field(default_factory=list)


class SimBatteryPack:
    """A series string of modules of ECM cells with lumped module thermals.

    Args (all keyword-only):
        modules, cells_per_module, sensors_per_module: topology.
        chemistry: "NMC", "LFP" or a :class:`Chemistry`.
        capacity_ah: mean cell capacity in Ah (second-life, already aged).
        capacity_spread, r0_spread: relative 1-sigma cell-to-cell spread.
        initial_soc: mean initial SoC (fraction); soc_spread: absolute 1-sigma.
        ambient_c: ambient temperature in degC (settable later via ``ambient_c``).
        initial_temp_c: initial module temperature, default = ambient.
        cell_heat_capacity_j_per_k: thermal mass per cell (module = sum of cells).
        module_cooling_w_per_k: convective conductance module -> ambient.
        sensors: measurement noise/offset settings.
        seed: seeds both the cell spread and the measurement noise.
    """

    def __init__(
        self,
        *,
        modules: int = 16,
        cells_per_module: int = 14,
        sensors_per_module: int = 2,
        chemistry: str | Chemistry = "NMC",
        capacity_ah: float = 60.0,
        capacity_spread: float = 0.03,
        initial_soc: float = 0.5,
        soc_spread: float = 0.02,
        r0_spread: float = 0.05,
        ambient_c: float = 25.0,
        initial_temp_c: float | None = None,
        cell_heat_capacity_j_per_k: float = 1800.0,
        module_cooling_w_per_k: float = 4.0,
        sensors: SensorConfig | None = None,
        seed: int = 0,
    ) -> None:
        if modules < 1 or cells_per_module < 1 or sensors_per_module < 0:
            raise ValueError("need >= 1 module, >= 1 cell per module, >= 0 sensors")
        if capacity_ah <= 0.0 or cell_heat_capacity_j_per_k <= 0.0:
            raise ValueError("capacity and heat capacity must be > 0")
        if module_cooling_w_per_k <= 0.0:
            raise ValueError("module cooling conductance must be > 0")
        if min(capacity_spread, soc_spread, r0_spread) < 0.0:
            raise ValueError("spreads must be >= 0")
        if not 0.0 <= initial_soc <= 1.0:
            raise ValueError("initial_soc must be in [0, 1]")

        self.modules = modules
        self.cells_per_module = cells_per_module
        self.sensors_per_module = sensors_per_module
        self.n_cells = modules * cells_per_module
        self.chemistry = get_chemistry(chemistry)
        self.sensors = sensors if sensors is not None else SensorConfig()
        self.ambient_c = float(ambient_c)
        self.dc_link_voltage_v = 0.0
        """Inverter-side DC-link voltage in V; set by the caller (e.g. precharge sim)."""
        self.time_s = 0.0

        # Separate streams: the cell spread must not change when a caller
        # measures more or less often.
        spread_seq, noise_seq = np.random.SeedSequence(seed).spawn(2)
        spread_rng = np.random.default_rng(spread_seq)
        self._noise_rng = np.random.default_rng(noise_seq)
        shape = (modules, cells_per_module)

        def draw(sigma: float) -> FloatArray:
            z = np.clip(spread_rng.standard_normal(shape), -_SPREAD_CLIP_SIGMA, _SPREAD_CLIP_SIGMA)
            return np.asarray(sigma * z, dtype=np.float64)

        chem = self.chemistry
        self._capacity_ah = capacity_ah * (1.0 + draw(capacity_spread))
        self._inv_capacity_as = 1.0 / (3600.0 * self._capacity_ah)
        self._soc = np.clip(initial_soc + draw(soc_spread), 0.0, 1.0)
        # An aged cell's whole impedance grows, so one factor scales R0, R1, R2.
        r_factor = 1.0 + draw(r0_spread)
        self._r0_ref = chem.r0_ohm * r_factor
        self._r1_ref = chem.r1_ohm * r_factor
        self._r2_ref = chem.r2_ohm * r_factor
        # Capacitances are fixed; time constants then stretch with R when cold,
        # as charge transfer and diffusion really do.
        self._c1 = chem.tau1_s / self._r1_ref
        self._c2 = chem.tau2_s / self._r2_ref
        self._sensor_offset_c = np.asarray(
            self.sensors.temp_sensor_offset_std_c
            * np.clip(
                spread_rng.standard_normal((modules, sensors_per_module)),
                -_SPREAD_CLIP_SIGMA,
                _SPREAD_CLIP_SIGMA,
            ),
            dtype=np.float64,
        )

        self._k_r0 = chem.ea_r0_j_per_mol / _GAS_CONSTANT_J_PER_MOL_K
        self._k_rc = chem.ea_rc_j_per_mol / _GAS_CONSTANT_J_PER_MOL_K
        self._ocv_soc = np.asarray(chem.ocv_soc, dtype=np.float64)
        self._ocv_v = np.asarray(chem.ocv_v, dtype=np.float64)

        self._v1 = np.zeros(shape)
        self._v2 = np.zeros(shape)
        t0 = self.ambient_c if initial_temp_c is None else float(initial_temp_c)
        self._t_mod = np.full(modules, t0)
        self._heat_capacity_j_per_k = cell_heat_capacity_j_per_k * cells_per_module
        self._cooling_w_per_k = module_cooling_w_per_k
        self._thermal_tau_s = self._heat_capacity_j_per_k / module_cooling_w_per_k
        self._decay_dt = -1.0
        self._decay = 1.0

        self._current_a = 0.0
        self._balance_a: FloatArray | None = None
        self._i_cell: float | FloatArray = 0.0
        self._r0, _, _ = self._resistances()
        self._last_cell_v: FloatArray | None = None
        self._faults = self._no_faults()

    # ------------------------------------------------------------------ physics

    def _resistances(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        inv_t = 1.0 / (self._t_mod + 273.15) - 1.0 / _T_REF_K
        f_r0 = np.exp(self._k_r0 * inv_t)[:, None]
        f_rc = np.exp(self._k_rc * inv_t)[:, None]
        chem = self.chemistry
        f_soc = 1.0 + chem.r_low_soc_gain * np.exp(self._soc * (-1.0 / chem.r_low_soc_width))
        f_rc_cell = f_rc * f_soc
        return (
            self._r0_ref * (f_r0 * f_soc),
            self._r1_ref * f_rc_cell,
            self._r2_ref * f_rc_cell,
        )

    def step(self, dt_s: float, current_a: float) -> None:
        """Advance the physics by ``dt_s`` seconds at constant pack current ``current_a``.

        ``current_a`` > 0 charges. The RC and thermal states use their exact
        solution for a constant input, so any dt is stable; resistances are
        evaluated at the start of the step.
        """
        dt = float(dt_s)
        i = float(current_a)
        if not (dt >= 0.0 and math.isfinite(dt)):
            raise ValueError(f"dt must be finite and >= 0, got {dt_s!r}")
        if not math.isfinite(i):
            raise ValueError(f"current must be finite, got {current_a!r}")

        r0, r1, r2 = self._resistances()
        i_cell: float | FloatArray = i if self._balance_a is None else i + self._balance_a

        a1 = np.exp((-dt / self._c1) / r1)
        a2 = np.exp((-dt / self._c2) / r2)
        self._v1 = self._v1 * a1 + (r1 * (1.0 - a1)) * i_cell
        self._v2 = self._v2 * a2 + (r2 * (1.0 - a2)) * i_cell

        # Joule heat in R0 plus what the RC branches' resistors dissipate.
        # Reversible (entropic) heat is left out: its sign changes with SoC in
        # real cells, which the constant dOCV/dT here cannot represent.
        heat_cell = (np.square(i_cell) * r0) + np.square(self._v1) / r1 + np.square(self._v2) / r2
        heat_w = heat_cell.sum(axis=1) + self._faults.module_heat_w
        t_inf = self.ambient_c + heat_w / self._cooling_w_per_k
        self._t_mod = t_inf + (self._t_mod - t_inf) * self._thermal_decay(dt)

        eta = self.chemistry.coulombic_efficiency
        if self._balance_a is None:
            charge_as = (eta * i if i > 0.0 else i) * dt
            self._soc += charge_as * self._inv_capacity_as
        else:
            i_arr = np.asarray(i_cell)
            self._soc += np.where(i_arr > 0.0, eta * i_arr, i_arr) * dt * self._inv_capacity_as
        # Guard only: the derated profile keeps a healthy pack well inside.
        np.clip(self._soc, 0.0, 1.0, out=self._soc)

        self._r0 = r0
        self._i_cell = i_cell
        self._current_a = i
        self.time_s += dt

    def _thermal_decay(self, dt: float) -> float:
        # Callers almost always repeat the same dt: cache the scalar exp.
        if dt != self._decay_dt:
            self._decay_dt = dt
            self._decay = math.exp(-dt / self._thermal_tau_s)
        return self._decay

    def _cell_voltage_2d(self) -> FloatArray:
        ocv = np.interp(self._soc, self._ocv_soc, self._ocv_v) + self.chemistry.docv_dt_v_per_k * (
            self._t_mod[:, None] - _T_REF_C
        )
        return np.asarray(ocv + self._i_cell * self._r0 + self._v1 + self._v2, dtype=np.float64)

    def set_soc(self, soc: ArrayLike) -> None:
        """Set SoC (fraction, scalar or per cell) and put the cells at rest (RC states 0)."""
        values = np.broadcast_to(np.asarray(soc, dtype=np.float64), (self.n_cells,))
        if np.any(values < 0.0) or np.any(values > 1.0):
            raise ValueError("SoC must be in [0, 1]")
        self._soc = values.reshape(self.modules, self.cells_per_module).copy()
        self._v1[:] = 0.0
        self._v2[:] = 0.0
        self._r0, _, _ = self._resistances()

    def set_balancing_currents(self, currents_a: ArrayLike | None) -> None:
        """Per-cell balancing current in A on top of the pack current (> 0 charges
        that cell), or None to stop balancing. Does not change the pack current."""
        if currents_a is None:
            self._balance_a = None
        else:
            values = np.asarray(currents_a, dtype=np.float64)
            if values.shape != (self.n_cells,) or not np.all(np.isfinite(values)):
                raise ValueError(f"balancing currents must be {self.n_cells} finite values")
            self._balance_a = values.reshape(self.modules, self.cells_per_module).copy()
        self._i_cell = (
            self._current_a if self._balance_a is None else self._current_a + self._balance_a
        )

    # ------------------------------------------------------------ true state

    @property
    def current_a(self) -> float:
        """Pack current in A applied during the last step (> 0 charging)."""
        return self._current_a

    @property
    def soc(self) -> FloatArray:
        """True per-cell SoC (fraction), (n_cells,)."""
        return self._soc.reshape(-1).copy()

    @property
    def capacity_ah(self) -> FloatArray:
        """Per-cell capacity in Ah, (n_cells,)."""
        return self._capacity_ah.reshape(-1).copy()

    @property
    def r0_ohm(self) -> FloatArray:
        """Per-cell ohmic resistance in ohm at the present temperature and SoC."""
        return self._r0.reshape(-1).copy()

    @property
    def module_temps_c(self) -> FloatArray:
        """True module temperatures in degC, (modules,)."""
        return self._t_mod.copy()

    @property
    def cell_temps_c(self) -> FloatArray:
        """True cell temperatures in degC (= their module's), (n_cells,)."""
        return np.repeat(self._t_mod, self.cells_per_module)

    @property
    def sensor_offsets_c(self) -> FloatArray:
        """Fixed calibration offsets of the temperature sensors, (modules, sensors)."""
        return self._sensor_offset_c.copy()

    @property
    def ocv_v(self) -> FloatArray:
        """True per-cell open-circuit voltage in V, (n_cells,)."""
        ocv = self.chemistry.ocv(self._soc, self._t_mod[:, None])
        return np.asarray(ocv, dtype=np.float64).reshape(-1)

    @property
    def cell_voltages_v(self) -> FloatArray:
        """True per-cell terminal voltage in V, (n_cells,), without sensor effects."""
        return self._cell_voltage_2d().reshape(-1)

    @property
    def pack_voltage_v(self) -> float:
        """True string voltage in V (sum of cell terminal voltages)."""
        return float(self._cell_voltage_2d().sum())

    # ------------------------------------------------------------ measurement

    def measure(self) -> PackMeasurement:
        """Read the pack as the hardware would: noise, quantisation, offsets, faults."""
        s = self.sensors
        rng = self._noise_rng
        f = self._faults
        true_v = self._cell_voltage_2d().reshape(-1)

        cell_v = true_v + f.drift_rate_v_per_s * (self.time_s - f.drift_start_s)
        if s.cell_voltage_noise_v > 0.0:
            cell_v = cell_v + rng.normal(0.0, s.cell_voltage_noise_v, self.n_cells)
        cell_v = _quantise(cell_v, s.cell_voltage_resolution_v)
        if f.stuck.any():
            cell_v = np.where(f.stuck, f.stuck_value_v, cell_v)
        self._last_cell_v = cell_v

        temps = self._t_mod[:, None] + self._sensor_offset_c
        if s.temp_noise_c > 0.0:
            temps = temps + rng.normal(0.0, s.temp_noise_c, temps.shape)
        temps = _quantise(temps, s.temp_resolution_c)

        def noisy(value: float, sigma: float, resolution: float) -> float:
            if sigma > 0.0:
                value += float(rng.normal(0.0, sigma))
            return _quantise_scalar(value, resolution)

        return PackMeasurement(
            time_s=self.time_s,
            cell_voltages_v=cell_v,
            module_temps_c=temps,
            pack_temp_c=noisy(float(self._t_mod.mean()), s.temp_noise_c, s.temp_resolution_c),
            ambient_temp_c=noisy(self.ambient_c, s.temp_noise_c, s.temp_resolution_c),
            pack_current_a=noisy(
                self._current_a + s.current_offset_a + f.current_offset_a,
                s.current_noise_a,
                s.current_resolution_a,
            ),
            pack_voltage_v=noisy(
                float(true_v.sum()), s.pack_voltage_noise_v, s.pack_voltage_resolution_v
            ),
            dc_link_voltage_v=noisy(
                self.dc_link_voltage_v, s.pack_voltage_noise_v, s.pack_voltage_resolution_v
            ),
        )

    # ------------------------------------------------------------------ faults

    def _no_faults(self) -> _Faults:
        return _Faults(
            drift_rate_v_per_s=np.zeros(self.n_cells),
            drift_start_s=np.zeros(self.n_cells),
            stuck=np.zeros(self.n_cells, dtype=np.bool_),
            stuck_value_v=np.zeros(self.n_cells),
            module_heat_w=np.zeros(self.modules),
        )

    def _check_cell(self, cell: int) -> int:
        if not 0 <= cell < self.n_cells:
            raise IndexError(f"cell {cell} out of range 0..{self.n_cells - 1}")
        return int(cell)

    def inject_cell_drift(self, cell: int, rate_mv_per_s: float) -> None:
        """Make ``cell``'s reported voltage drift by ``rate_mv_per_s`` mV/s from now on
        (a measurement offset growing with time; the cell itself is unchanged)."""
        k = self._check_cell(cell)
        _checked(f"cell {k} voltage drift", rate_mv_per_s, -MAX_DRIFT_MV_PER_S, MAX_DRIFT_MV_PER_S, "mV/s")
        f = self._faults
        f.drift_rate_v_per_s[k] = rate_mv_per_s * 1e-3
        f.drift_start_s[k] = self.time_s
        f.descriptions.append(f"cell {k} voltage drift {rate_mv_per_s:+g} mV/s")

    def inject_module_heating(self, module: int, power_w: float) -> None:
        """Put an extra ``power_w`` W of heat into ``module`` (adds to earlier injections)."""
        if not 0 <= module < self.modules:
            raise IndexError(f"module {module} out of range 0..{self.modules - 1}")
        total = self._faults.module_heat_w[module] + power_w
        _checked(f"module {module} extra heat would total", total, 0.0, MAX_MODULE_HEAT_W, "W")
        self._faults.module_heat_w[module] = total
        self._faults.descriptions.append(f"module {module} extra heat {power_w:g} W")

    def inject_current_offset(self, offset_a: float) -> None:
        """Add ``offset_a`` A to the reported pack current (sensor offset fault)."""
        total = self._faults.current_offset_a + offset_a
        _checked("current sensor offset would total", total, -MAX_CURRENT_OFFSET_A, MAX_CURRENT_OFFSET_A, "A")
        self._faults.current_offset_a = total
        self._faults.descriptions.append(f"current sensor offset {offset_a:+g} A")

    def inject_stuck_cell(self, cell: int) -> None:
        """Freeze ``cell``'s reported voltage at its last reported value (or, before any
        ``measure()``, at its present noise-free quantised value)."""
        k = self._check_cell(cell)
        if self._last_cell_v is not None:
            value = float(self._last_cell_v[k])
        else:
            value = _quantise_scalar(
                float(self._cell_voltage_2d().reshape(-1)[k]),
                self.sensors.cell_voltage_resolution_v,
            )
        self._faults.stuck[k] = True
        self._faults.stuck_value_v[k] = value
        self._faults.descriptions.append(f"cell {k} voltage stuck at {value:.3f} V")

    def clear_faults(self) -> None:
        """Remove every injected fault; module temperatures then relax naturally.

        A non-finite temperature or RC voltage (a bad value that got past the
        checks, e.g. a NaN ``ambient_c``) is reset to ambient / rest, so that
        clearing always brings the pack back.
        """
        self._faults = self._no_faults()
        for state, rest in ((self._t_mod, self.ambient_c), (self._v1, 0.0), (self._v2, 0.0)):
            state[~np.isfinite(state)] = rest
        self._r0, _, _ = self._resistances()

    @property
    def active_faults(self) -> tuple[str, ...]:
        """Human-readable list of the injected faults, oldest first."""
        return tuple(self._faults.descriptions)


# ---------------------------------------------------------------- load profile


def derate_current(
    request_a: float,
    max_cell_v: float,
    min_cell_v: float,
    chemistry: str | Chemistry = "NMC",
) -> float:
    """Scale a current request (A, > 0 charge) down near the cell voltage limits.

    Charge tapers linearly to 0 as the highest cell goes from the chemistry's
    ``charge_taper_v`` start to end; discharge likewise with the lowest cell
    over ``discharge_taper_v``. This acts like the CV phase of a charger, so a
    healthy pack stays inside [v_min, v_max] without help from protection.
    """
    chem = get_chemistry(chemistry)
    if request_a > 0.0:
        start, end = chem.charge_taper_v
        factor = (end - max_cell_v) / (end - start)
    elif request_a < 0.0:
        start, end = chem.discharge_taper_v
        factor = (min_cell_v - end) / (start - end)
    else:
        return 0.0
    return request_a * min(1.0, max(0.0, factor))


def _sin2_bell(t_h: float, start_h: float, end_h: float) -> float:
    if not start_h < t_h < end_h:
        return 0.0
    return math.sin(math.pi * (t_h - start_h) / (end_h - start_h)) ** 2


def _plateau(t_h: float, start_h: float, end_h: float, ramp_h: float) -> float:
    if not start_h < t_h < end_h:
        return 0.0
    ramp = min(ramp_h, 0.5 * (end_h - start_h))
    edge = min(t_h - start_h, end_h - t_h)
    if ramp <= 0.0 or edge >= ramp:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * edge / ramp))


@dataclass(frozen=True, slots=True)
class StorageDayProfile:
    """Daily current request of a stationary store (> 0 charging), periodic in 24 h.

    PV charging follows a sin^2 bell over ``charge_window_h`` (local hours);
    the evening discharge is a plateau over ``discharge_window_h`` with
    raised-cosine ramps of ``discharge_ramp_h``; the rest of the day is idle.
    Peak currents are magnitudes in A.
    """

    charge_peak_a: float = 30.0
    discharge_peak_a: float = 40.0
    charge_window_h: tuple[float, float] = (9.0, 16.0)
    discharge_window_h: tuple[float, float] = (18.0, 23.0)
    discharge_ramp_h: float = 0.5

    def __post_init__(self) -> None:
        if self.charge_peak_a < 0.0 or self.discharge_peak_a < 0.0:
            raise ValueError("peak currents are magnitudes and must be >= 0")
        for lo, hi in (self.charge_window_h, self.discharge_window_h):
            if not 0.0 <= lo < hi <= 24.0:
                raise ValueError(f"window ({lo}, {hi}) must satisfy 0 <= start < end <= 24")
        if self.discharge_ramp_h < 0.0:
            raise ValueError("ramp must be >= 0")

    def current_at(self, t_s: float) -> float:
        """Requested pack current in A at ``t_s`` seconds after a midnight."""
        t_h = (t_s % _SECONDS_PER_DAY) / 3600.0
        charge = self.charge_peak_a * _sin2_bell(t_h, *self.charge_window_h)
        discharge = self.discharge_peak_a * _plateau(
            t_h, *self.discharge_window_h, self.discharge_ramp_h
        )
        return charge - discharge

    def derated_current_at(
        self,
        t_s: float,
        max_cell_v: float,
        min_cell_v: float,
        chemistry: str | Chemistry = "NMC",
    ) -> float:
        """:meth:`current_at` passed through :func:`derate_current`."""
        return derate_current(self.current_at(t_s), max_cell_v, min_cell_v, chemistry)
