"""Limit tables: three levels per quantity (MOL info, RSL warning/derate, MSL trip), per chemistry.

The hardware limits are a separate, fixed section: every configured or remote
limit is checked against them, and nothing can widen them at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal

Direction = Literal["high", "low"]


@dataclass(frozen=True)
class Levels:
    """Thresholds of one check; for a "low" check they descend (MOL > RSL > MSL)."""

    mol: float
    rsl: float
    msl: float

    def ordered(self, direction: Direction) -> bool:
        a, b, c = self.mol, self.rsl, self.msl
        return a <= b <= c if direction == "high" else a >= b >= c

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.mol, self.rsl, self.msl)


@dataclass(frozen=True)
class LevelOverride:
    """Per-site override of some levels of a preset (unset levels keep the preset's)."""

    mol: float | None = None
    rsl: float | None = None
    msl: float | None = None

    def apply(self, base: Levels) -> Levels:
        return Levels(*(base_v if v is None else v for base_v, v in
                        zip(base.as_tuple(), (self.mol, self.rsl, self.msl), strict=True)))


# check name -> (direction, unit, debounce group)
CHECKS: dict[str, tuple[Direction, str, str]] = {
    "cell_voltage_high": ("high", "V", "voltage"),
    "cell_voltage_low": ("low", "V", "voltage"),
    "cell_temperature_high_charge": ("high", "degC", "temperature"),
    "cell_temperature_high_discharge": ("high", "degC", "temperature"),
    "cell_temperature_low_charge": ("low", "degC", "temperature"),
    "cell_temperature_low_discharge": ("low", "degC", "temperature"),
    "pack_current_charge": ("high", "A", "current"),
    "pack_current_discharge": ("high", "A", "current"),
    "cell_voltage_spread": ("high", "V", "spread"),
    "cell_temperature_spread": ("high", "degC", "spread"),
    "pack_voltage_mismatch": ("high", "V", "plausibility"),
}


@dataclass(frozen=True)
class LimitTable:
    """All limits of one site (a chemistry preset with overrides applied)."""

    cell_voltage_high: Levels
    cell_voltage_low: Levels
    cell_temperature_high_charge: Levels
    cell_temperature_high_discharge: Levels
    cell_temperature_low_charge: Levels
    cell_temperature_low_discharge: Levels
    pack_current_charge: Levels
    pack_current_discharge: Levels
    cell_voltage_spread: Levels
    cell_temperature_spread: Levels
    pack_voltage_mismatch: Levels
    deep_discharge_v: float  # below this a cell is deep-discharged: latched across restarts

    def get(self, check: str) -> Levels:
        levels: Levels = getattr(self, check)
        return levels

    def as_dict(self) -> dict[str, dict[str, float] | float]:
        out: dict[str, dict[str, float] | float] = {
            f.name: vars(getattr(self, f.name)).copy() for f in fields(self) if f.name in CHECKS}
        out["deep_discharge_v"] = self.deep_discharge_v
        return out


def _preset(v_high: tuple[float, float, float], v_low: tuple[float, float, float], deep: float,
            t_charge: tuple[float, float], t_discharge: tuple[float, float]) -> LimitTable:
    # temperature windows: (low MSL, high MSL); MOL/RSL sit 5 and 2 degC inside
    def hi(msl: float) -> Levels:
        return Levels(msl - 5, msl - 2, msl)

    def lo(msl: float) -> Levels:
        return Levels(msl + 5, msl + 2, msl)

    return LimitTable(
        cell_voltage_high=Levels(*v_high), cell_voltage_low=Levels(*v_low),
        cell_temperature_high_charge=hi(t_charge[1]), cell_temperature_high_discharge=hi(t_discharge[1]),
        cell_temperature_low_charge=lo(t_charge[0]), cell_temperature_low_discharge=lo(t_discharge[0]),
        pack_current_charge=Levels(60.0, 70.0, 80.0), pack_current_discharge=Levels(80.0, 90.0, 100.0),
        cell_voltage_spread=Levels(0.10, 0.20, 0.30), cell_temperature_spread=Levels(5.0, 8.0, 12.0),
        pack_voltage_mismatch=Levels(2.0, 5.0, 10.0), deep_discharge_v=deep)


# Typical datasheet windows of second-life cells; a site overrides what its modules' datasheet says.
PRESETS: dict[str, LimitTable] = {
    "NMC": _preset((4.15, 4.18, 4.20), (3.20, 3.00, 2.80), 2.50, (0.0, 45.0), (-20.0, 60.0)),
    "LFP": _preset((3.55, 3.60, 3.65), (2.90, 2.70, 2.50), 2.00, (0.0, 45.0), (-20.0, 60.0)),
    "LTO": _preset((2.70, 2.75, 2.80), (1.80, 1.70, 1.60), 1.50, (-20.0, 55.0), (-30.0, 60.0)),
}


@dataclass(frozen=True)
class HardwareLimits:
    """What the cells and the power path can take, from their datasheets. No remote input changes these."""

    cell_voltage_max: float
    cell_voltage_min: float
    cell_temperature_max: float
    cell_temperature_min: float
    pack_current_charge_max: float
    pack_current_discharge_max: float

    def check(self) -> None:
        if not self.cell_voltage_min < self.cell_voltage_max:
            raise ValueError("cell_voltage_min: must be below cell_voltage_max")
        if not self.cell_temperature_min < self.cell_temperature_max:
            raise ValueError("cell_temperature_min: must be below cell_temperature_max")
        for name in ("pack_current_charge_max", "pack_current_discharge_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")


HARDWARE_DEFAULTS: dict[str, HardwareLimits] = {
    "NMC": HardwareLimits(4.25, 2.50, 65.0, -30.0, 120.0, 150.0),
    "LFP": HardwareLimits(3.75, 2.00, 65.0, -30.0, 120.0, 150.0),
    "LTO": HardwareLimits(2.85, 1.50, 65.0, -40.0, 120.0, 150.0),
}


@dataclass(frozen=True)
class HardwareSection:
    """The [hardware_limits] section: what is set replaces the chemistry's default."""

    cell_voltage_max: float | None = None
    cell_voltage_min: float | None = None
    cell_temperature_max: float | None = None
    cell_temperature_min: float | None = None
    pack_current_charge_max: float | None = None
    pack_current_discharge_max: float | None = None

    def resolve(self, chemistry: str) -> HardwareLimits:
        set_values = {k: v for k, v in vars(self).items() if v is not None}
        return replace(HARDWARE_DEFAULTS[chemistry], **set_values)


def _bounds(hw: HardwareLimits) -> dict[str, tuple[float, float]]:
    """For each check, the range its thresholds must stay in."""
    v = (hw.cell_voltage_min, hw.cell_voltage_max)
    t = (hw.cell_temperature_min, hw.cell_temperature_max)
    return {
        "cell_voltage_high": v, "cell_voltage_low": v,
        "cell_temperature_high_charge": t, "cell_temperature_high_discharge": t,
        "cell_temperature_low_charge": t, "cell_temperature_low_discharge": t,
        "pack_current_charge": (0.0, hw.pack_current_charge_max),
        "pack_current_discharge": (0.0, hw.pack_current_discharge_max),
        # a spread wider than the hardware's whole range could never be reached: a disabled check
        "cell_voltage_spread": (0.0, v[1] - v[0]), "cell_temperature_spread": (0.0, t[1] - t[0]),
        "pack_voltage_mismatch": (0.0, math.inf),
    }


def validate(table: LimitTable, hw: HardwareLimits) -> list[str]:
    """Reasons the table is unusable ("check: reason"); empty when it is fine."""
    errors = []
    bounds = _bounds(hw)
    for name, (direction, unit, _) in CHECKS.items():
        lv = table.get(name)
        if not all(math.isfinite(x) for x in lv.as_tuple()):  # NaN never compares; inf never trips
            errors.append(f"{name}: non-finite threshold")
            continue
        if not lv.ordered(direction):
            order = "MOL <= RSL <= MSL" if direction == "high" else "MOL >= RSL >= MSL"
            errors.append(f"{name}: levels out of order (need {order}, got {lv.mol}, {lv.rsl}, {lv.msl})")
        lo, hi = bounds[name]
        if not all(lo <= x <= hi for x in lv.as_tuple()):
            errors.append(f"{name}: levels {lv.mol}, {lv.rsl}, {lv.msl} {unit} outside the hardware limits "
                          f"[{lo}, {hi}]")
    if not hw.cell_voltage_min <= table.deep_discharge_v < table.cell_voltage_low.msl:
        errors.append(f"deep_discharge_v: {table.deep_discharge_v} V must be within the hardware limits and "
                      f"below cell_voltage_low.msl ({table.cell_voltage_low.msl} V)")
    return errors


def with_overrides(base: LimitTable, overrides: dict[str, LevelOverride],
                   deep_discharge_v: float | None = None) -> LimitTable:
    """A preset with a site's (or a validated remote) overrides applied."""
    unknown = set(overrides) - set(CHECKS)
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown check (known: {', '.join(CHECKS)})")
    changes: dict[str, object] = {name: o.apply(base.get(name)) for name, o in overrides.items()}
    if deep_discharge_v is not None:
        changes["deep_discharge_v"] = deep_discharge_v
    return replace(base, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Debounce:
    """Debounce delays per group of checks (foxBMS-like defaults)."""

    voltage_ms: float = 200.0
    current_ms: float = 100.0
    temperature_ms: float = 1000.0
    spread_ms: float = 1000.0
    plausibility_ms: float = 1000.0
    data_ms: float = 100.0  # invalid / implausible / stale data, on top of the staleness delay
    per_check: dict[str, float] = field(default_factory=dict)  # check name -> ms, overrides the group

    def delay_s(self, check: str) -> float:
        if check in self.per_check:
            return self.per_check[check] / 1000.0
        group = CHECKS[check][2] if check in CHECKS else "data"
        ms: float = getattr(self, f"{group}_ms")
        return ms / 1000.0

    def check(self) -> None:
        for f in fields(self):
            if f.name != "per_check" and getattr(self, f.name) < 0:
                raise ValueError(f"{f.name}: must be >= 0")
        for name, ms in self.per_check.items():
            if name not in CHECKS:
                raise ValueError(f"per_check.{name}: unknown check (known: {', '.join(CHECKS)})")
            if ms < 0:
                raise ValueError(f"per_check.{name}: must be >= 0")
