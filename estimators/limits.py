"""State of function: charge/discharge current limits and charge/discharge voltage limits.

Each current limit is the minimum of look-up-table limiters (piecewise linear,
clamped at the ends) over the extreme cell voltage, the extreme cell temperatures
(every value given: pass each sensor, never a mean) and the extreme cell SoC,
capped by the configured maximum. The voltage limits are
the pack voltages at which the highest (lowest) cell would reach its own limit if
every cell moved alike. Missing inputs (NaN) give zero current (fail safe).

Anti-flapping (per output, :class:`Governor`): a more restrictive value applies at
once; a more permissive one only after ``recovery_delay_s`` without a new
restriction, and then ramps at ``ramp_per_s`` (A/s or V/s). Until the first cycle with
every input present (start-up) the limits are zero and the governors stay unset, so the
first complete data apply at once instead of after a recovery delay and a ramp from zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["NO_DATA", "Governor", "Lut", "SofConfig", "SofLimiter", "SofLimits", "sof_preset"]

NO_DATA = "no_data"  # the limiter name when an input is missing (zero current)


@dataclass(frozen=True)
class Lut:
    """Piecewise-linear table ``y(x)``; ``x`` strictly rising; clamped outside."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y) or len(self.x) < 1:
            raise ValueError("LUT needs matching x and y of length >= 1")
        if any(b <= a for a, b in zip(self.x, self.x[1:], strict=False)):
            raise ValueError("LUT x must rise strictly")
        if not all(math.isfinite(v) for v in (*self.x, *self.y)) or min(self.y) < 0.0:
            raise ValueError("LUT values must be finite and y >= 0")

    def __call__(self, x: float) -> float:
        if not math.isfinite(x):
            return 0.0
        return float(np.interp(x, self.x, self.y))


@dataclass(frozen=True)
class SofConfig:
    """Limiter tables (current in A) and the pack's voltage limits.

    Current tables: ``*_vs_cell_v`` over the highest (charge) / lowest (discharge) cell
    voltage; ``*_vs_temp`` evaluated at the lowest AND the highest cell temperature
    (the smaller wins); ``*_vs_soc`` over the highest (charge) / lowest (discharge)
    cell SoC. ``cell_charge_v``/``cell_discharge_v``: per-cell voltage limits.
    """

    n_series: int
    max_charge_a: float
    max_discharge_a: float
    cell_charge_v: float
    cell_discharge_v: float
    charge_vs_cell_v: Lut
    discharge_vs_cell_v: Lut
    charge_vs_temp: Lut
    discharge_vs_temp: Lut
    charge_vs_soc: Lut
    discharge_vs_soc: Lut
    recovery_delay_s: float = 30.0
    current_ramp_a_per_s: float = 1.0
    voltage_ramp_v_per_s: float = 0.5

    def __post_init__(self) -> None:
        if self.n_series < 1:
            raise ValueError("n_series must be >= 1")
        if min(self.max_charge_a, self.max_discharge_a) < 0.0:
            raise ValueError("maximum currents must be >= 0")
        if not 0.0 < self.cell_discharge_v < self.cell_charge_v:
            raise ValueError("need 0 < cell_discharge_v < cell_charge_v")
        if self.recovery_delay_s < 0.0 or min(self.current_ramp_a_per_s, self.voltage_ramp_v_per_s) <= 0.0:
            raise ValueError("recovery delay must be >= 0 and ramps > 0")


def sof_preset(chemistry: str, capacity_ah: float, n_series: int, max_c_charge: float = 0.5,
               max_c_discharge: float = 1.0) -> SofConfig:
    """Conservative default tables for "NMC" or "LFP" cells of ``capacity_ah``, in C-rates."""
    q = float(capacity_ah)
    chem = chemistry.upper()
    if chem == "NMC":
        v_chg, v_dis = 4.15, 3.1
        chg_v = Lut((4.05, 4.10, 4.15), (1.0, 0.3, 0.0))
        dis_v = Lut((3.1, 3.3, 3.45), (0.0, 0.3, 1.0))
    elif chem == "LFP":
        v_chg, v_dis = 3.55, 2.6
        chg_v = Lut((3.40, 3.48, 3.55), (1.0, 0.3, 0.0))
        dis_v = Lut((2.6, 2.9, 3.05), (0.0, 0.3, 1.0))
    else:
        raise ValueError(f"unknown chemistry {chemistry!r}")
    chg_t = Lut((0.0, 5.0, 10.0, 15.0, 40.0, 45.0, 50.0), (0.0, 0.1, 0.3, 1.0, 1.0, 0.3, 0.0))
    dis_t = Lut((-20.0, -10.0, 0.0, 10.0, 45.0, 50.0, 55.0), (0.0, 0.2, 0.5, 1.0, 1.0, 0.3, 0.0))
    chg_s = Lut((0.85, 0.95, 1.0), (1.0, 0.3, 0.05))
    dis_s = Lut((0.0, 0.05, 0.15), (0.0, 0.3, 1.0))

    def scale(lut: Lut, amps: float) -> Lut:
        return Lut(lut.x, tuple(y * amps for y in lut.y))

    i_chg, i_dis = max_c_charge * q, max_c_discharge * q
    return SofConfig(
        n_series=n_series, max_charge_a=i_chg, max_discharge_a=i_dis, cell_charge_v=v_chg, cell_discharge_v=v_dis,
        charge_vs_cell_v=scale(chg_v, i_chg), discharge_vs_cell_v=scale(dis_v, i_dis),
        charge_vs_temp=scale(chg_t, i_chg), discharge_vs_temp=scale(dis_t, i_dis),
        charge_vs_soc=scale(chg_s, i_chg), discharge_vs_soc=scale(dis_s, i_dis),
    )


@dataclass
class Governor:
    """Anti-flapping for one limit: restrictions at once, relaxations delayed and ramped.

    ``lower_is_safer``: True for current limits and the charge voltage limit, False
    for the discharge voltage limit (a higher floor is safer).
    """

    delay_s: float
    ramp_per_s: float
    lower_is_safer: bool = True
    value: float = float("nan")
    _since_s: float = field(default=0.0, repr=False)

    def step(self, target: float, dt_s: float) -> float:
        dt = max(0.0, float(dt_s))
        if not math.isfinite(self.value):
            self.value = target
            self._since_s = 0.0
            return self.value
        sign = 1.0 if self.lower_is_safer else -1.0
        if sign * (target - self.value) <= 0.0:  # as or more restrictive: apply now
            if target != self.value:
                self._since_s = 0.0
            self.value = target
            return self.value
        self._since_s += dt
        if self._since_s >= self.delay_s:
            step = self.ramp_per_s * dt
            self.value = target if abs(target - self.value) <= step else self.value + sign * step
        return self.value


@dataclass(frozen=True)
class SofLimits:
    """One cycle's limits (A, V) and the name of the limiter that set each current limit."""

    charge_current_a: float
    discharge_current_a: float
    charge_voltage_v: float
    discharge_voltage_v: float
    charge_limited_by: str
    discharge_limited_by: str


class SofLimiter:
    """Computes :class:`SofLimits` every control cycle (pure: time comes in as ``dt_s``)."""

    def __init__(self, config: SofConfig) -> None:
        self.config = config
        c = config
        self._gov = {
            "chg_i": Governor(c.recovery_delay_s, c.current_ramp_a_per_s),
            "dis_i": Governor(c.recovery_delay_s, c.current_ramp_a_per_s),
            "chg_v": Governor(c.recovery_delay_s, c.voltage_ramp_v_per_s),
            "dis_v": Governor(c.recovery_delay_s, c.voltage_ramp_v_per_s, lower_is_safer=False),
        }

    @staticmethod
    def _extremes(values: ArrayLike) -> tuple[float, float]:
        a = np.asarray(values, dtype=np.float64)
        if a.size == 0 or not np.all(np.isfinite(a)):
            return float("nan"), float("nan")
        return float(a.min()), float(a.max())

    def targets(self, cell_v: ArrayLike, cell_temp_c: ArrayLike, cell_soc: ArrayLike,
                pack_v: float | None = None) -> SofLimits:
        """The limits before anti-flapping. Any NaN in an input forces zero current."""
        c = self.config
        v_lo, v_hi = self._extremes(cell_v)
        t_lo, t_hi = self._extremes(cell_temp_c)
        s_lo, s_hi = self._extremes(cell_soc)
        n = c.n_series
        if not all(map(math.isfinite, (v_lo, t_lo, s_lo))):  # nothing can flow
            return SofLimits(0.0, 0.0, n * c.cell_discharge_v, n * c.cell_charge_v, NO_DATA, NO_DATA)
        chg = {
            "max": c.max_charge_a,
            "cell_voltage": c.charge_vs_cell_v(v_hi),
            "temperature": min(c.charge_vs_temp(t_lo), c.charge_vs_temp(t_hi)),
            "soc": c.charge_vs_soc(s_hi),
        }
        dis = {
            "max": c.max_discharge_a,
            "cell_voltage": c.discharge_vs_cell_v(v_lo),
            "temperature": min(c.discharge_vs_temp(t_lo), c.discharge_vs_temp(t_hi)),
            "soc": c.discharge_vs_soc(s_lo),
        }
        chg_by = min(chg, key=lambda k: chg[k])
        dis_by = min(dis, key=lambda k: dis[k])
        v_sum = float(np.sum(np.asarray(cell_v, dtype=np.float64))) if pack_v is None else float(pack_v)
        if math.isfinite(v_sum):
            cvl = min(n * c.cell_charge_v, v_sum + n * (c.cell_charge_v - v_hi))
            dvl = max(n * c.cell_discharge_v, v_sum - n * (v_lo - c.cell_discharge_v))
        else:
            cvl, dvl = n * c.cell_discharge_v, n * c.cell_charge_v  # nothing can flow
        return SofLimits(chg[chg_by], dis[dis_by], cvl, dvl, chg_by, dis_by)

    def step(self, dt_s: float, cell_v: ArrayLike, cell_temp_c: ArrayLike, cell_soc: ArrayLike,
             pack_v: float | None = None, derate: float = 1.0) -> SofLimits:
        """This cycle's limits with anti-flapping applied.

        ``derate`` (< 1: a warning condition) scales the current targets before the governors,
        so a condition that comes and goes holds the lower limit instead of toggling it.
        """
        t = self.targets(cell_v, cell_temp_c, cell_soc, pack_v)
        g = self._gov
        if t.charge_limited_by == NO_DATA and not math.isfinite(g["chg_i"].value):
            return t  # start-up: not a restriction to recover from
        if derate < 1.0 and t.charge_limited_by != NO_DATA:
            t = SofLimits(t.charge_current_a * derate, t.discharge_current_a * derate, t.charge_voltage_v,
                          t.discharge_voltage_v, "derate", "derate")
        return SofLimits(
            g["chg_i"].step(t.charge_current_a, dt_s),
            g["dis_i"].step(t.discharge_current_a, dt_s),
            g["chg_v"].step(t.charge_voltage_v, dt_s),
            g["dis_v"].step(t.discharge_voltage_v, dt_s),
            t.charge_limited_by,
            t.discharge_limited_by,
        )
