"""Impedance spectra: the EIS record type and the protocol's frequency grid.

Pure numpy, no I/O. Conventions shared by every EIS estimator (:mod:`estimators.kk`,
:mod:`estimators.drt`, :mod:`estimators.eis_fit`, :mod:`estimators.sot`):

* ``Z = Z_re + j Z_im`` in ohm with ``Z_im < 0`` for capacitive behaviour (the usual
  electrochemistry sign: a Nyquist plot shows ``-Z_im`` upwards); phase in degrees,
  ``phase = atan2(Z_im, Z_re)`` (negative for capacitive points).
* Frequencies in Hz, time constants in s, temperatures in degC, SoC as a fraction 0..1.
* Residuals are relative to ``|Z|`` of each point (the noise of an EIS module is roughly
  proportional to ``|Z|``), so every fit weights points by ``1 / |Z|``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ComplexArray", "EisSpectrum", "FloatArray", "log_grid"]

FloatArray = NDArray[np.float64]
ComplexArray = NDArray[np.complex128]
IntArray = NDArray[np.int64]


def log_grid(start_hz: float, stop_hz: float, points_per_decade: int) -> FloatArray:
    """The sweep grid of the EIS protocol: from ``start_hz`` towards ``stop_hz``, ``points_per_decade``
    points per decade, ``floor(decades * ppd) + 1`` points (the stop frequency is hit when it lies on the grid)."""
    if start_hz <= 0 or stop_hz <= 0 or points_per_decade < 1:
        raise ValueError("frequencies must be > 0 and points_per_decade >= 1")
    a, b = math.log10(start_hz), math.log10(stop_hz)
    n = int(math.floor(abs(b - a) * points_per_decade + 1e-6)) + 1
    step = (1.0 if b >= a else -1.0) / points_per_decade
    return np.asarray(10.0 ** (a + step * np.arange(n)), dtype=np.float64)


def _arr(x: ArrayLike, n: int, name: str) -> FloatArray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        return np.full(n, float(a))
    a = a.reshape(-1)
    if a.size != n:
        raise ValueError(f"{name}: expected {n} values, got {a.size}")
    return a


@dataclass(frozen=True, eq=False)
class EisSpectrum:
    """One EIS measurement record.

    Per point: ``frequency_hz``, ``z_re_ohm``, ``z_im_ohm`` (|Z| and phase derive from them),
    the cell ``voltage_v``, ``temperature_c`` and ``soc`` at the time the point was measured
    (NaN where unknown) and the module's quality ``flags`` (bit 0 clipped, bit 1 low quality).
    ``timestamp`` is wall-clock seconds (Unix) at the start of the sweep; ``target`` the
    canonical name of what was measured (``cell[17]``, ``module[3]``).
    """

    frequency_hz: FloatArray
    z_re_ohm: FloatArray
    z_im_ohm: FloatArray
    voltage_v: FloatArray = field(default_factory=lambda: np.zeros(0))
    temperature_c: FloatArray = field(default_factory=lambda: np.zeros(0))
    soc: FloatArray = field(default_factory=lambda: np.zeros(0))
    flags: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    timestamp: float = math.nan
    target: str = ""
    sweep_id: int = 0
    duration_s: float = math.nan
    pack_current_a: float = math.nan

    def __post_init__(self) -> None:
        f = np.asarray(self.frequency_hz, dtype=np.float64).reshape(-1)
        n = f.size
        if n == 0:
            raise ValueError("a spectrum needs at least one point")
        if not np.all(np.isfinite(f)) or np.any(f <= 0):
            raise ValueError("frequencies must be finite and > 0")
        object.__setattr__(self, "frequency_hz", f)
        object.__setattr__(self, "z_re_ohm", _arr(self.z_re_ohm, n, "z_re_ohm"))
        object.__setattr__(self, "z_im_ohm", _arr(self.z_im_ohm, n, "z_im_ohm"))
        for name in ("voltage_v", "temperature_c", "soc"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            object.__setattr__(self, name, np.full(n, math.nan) if v.size == 0 else _arr(v, n, name))
        fl = np.asarray(self.flags, dtype=np.int64)
        object.__setattr__(self, "flags", np.zeros(n, dtype=np.int64) if fl.size == 0
                           else np.asarray(_arr(fl, n, "flags"), dtype=np.int64))

    @classmethod
    def from_impedance(cls, frequency_hz: ArrayLike, z: ArrayLike, **kwargs: Any) -> EisSpectrum:
        """Build from complex impedances; scalars given for voltage/temperature/soc apply to all points."""
        zc = np.asarray(z, dtype=np.complex128).reshape(-1)
        return cls(np.asarray(frequency_hz, dtype=np.float64), zc.real.copy(), zc.imag.copy(), **kwargs)

    @property
    def n(self) -> int:
        return int(self.frequency_hz.size)

    @property
    def z(self) -> ComplexArray:
        return np.asarray(self.z_re_ohm + 1j * self.z_im_ohm, dtype=np.complex128)

    @property
    def abs_ohm(self) -> FloatArray:
        return np.asarray(np.hypot(self.z_re_ohm, self.z_im_ohm), dtype=np.float64)

    @property
    def phase_deg(self) -> FloatArray:
        return np.asarray(np.degrees(np.arctan2(self.z_im_ohm, self.z_re_ohm)), dtype=np.float64)

    def _mean(self, a: FloatArray) -> float:
        ok = np.isfinite(a)
        return float(a[ok].mean()) if ok.any() else math.nan

    @property
    def mean_temperature_c(self) -> float:
        return self._mean(self.temperature_c)

    @property
    def mean_soc(self) -> float:
        return self._mean(self.soc)

    @property
    def mean_voltage_v(self) -> float:
        return self._mean(self.voltage_v)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (msgpack/JSON), NaN kept as float NaN."""
        return {
            "timestamp": self.timestamp, "target": self.target, "sweep_id": self.sweep_id,
            "duration_s": self.duration_s, "pack_current_a": self.pack_current_a,
            "frequency_hz": self.frequency_hz.tolist(), "z_re_ohm": self.z_re_ohm.tolist(),
            "z_im_ohm": self.z_im_ohm.tolist(), "abs_ohm": self.abs_ohm.tolist(),
            "phase_deg": self.phase_deg.tolist(), "voltage_v": self.voltage_v.tolist(),
            "temperature_c": self.temperature_c.tolist(), "soc": self.soc.tolist(),
            "flags": self.flags.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EisSpectrum:
        keys = ("frequency_hz", "z_re_ohm", "z_im_ohm", "voltage_v", "temperature_c", "soc", "flags",
                "timestamp", "target", "sweep_id", "duration_s", "pack_current_a")
        return cls(**{k: d[k] for k in keys if k in d})
