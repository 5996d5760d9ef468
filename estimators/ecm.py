"""Equivalent-circuit cell model: OCV(SoC, T) curves, chemistry presets, per-cell R0 + n RC.

Conventions (shared by every estimator): current in A, ``> 0`` CHARGES the cell;
terminal voltage ``V = OCV(soc, T) + R0 * I + sum(v_k)`` with RC branch voltages
``v_k`` obeying ``dv_k/dt = -v_k / (R_k C_k) + I / C_k``. SoC is a fraction, voltages
in V, temperatures in degC, resistances in ohm, capacitances in F, charge in Ah.

Per-cell parameters are stored at the reference point (25 degC, the chemistry's
reference SoC) and scaled by two shared factors: an Arrhenius temperature factor and
a per-chemistry SoC shape table (resistance rises towards empty). Capacitances are
held fixed, so time constants stretch with resistance (as in a cold cell).

Optionally (``CellType.diffusion_tau_s`` > 0) the OCV is taken at the particle
*surface* SoC ``soc + d`` instead of the bulk SoC: ``d`` is the surface excess of
solid diffusion in a spherical particle with diffusion time ``R^2/D``, driven by the
current (:func:`diffusion_modes`). On a flat OCV (LFP) the steps of the curve then
move with the load as they do in the cell, which plain RC branches cannot follow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "LFP",
    "MAX_RC",
    "NMC",
    "PRESETS",
    "T_REF_C",
    "CellType",
    "EcmParams",
    "OcvCurve",
    "arrhenius",
    "diffusion_modes",
    "get_cell_type",
]

FloatArray = NDArray[np.float64]

T_REF_C = 25.0
MAX_RC = 4
_GAS_CONSTANT = 8.314462618
_GRID = 1001  # resolution of the precomputed inverse/energy tables


def _f64(x: ArrayLike) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


@dataclass(frozen=True)
class OcvCurve:
    """Open-circuit voltage table ``ocv_v`` over ``soc`` at ``t_ref_c`` plus an entropic term.

    ``docv_dt_v_per_k`` is either one coefficient or one per SoC point. ``soc`` must rise
    strictly and ``ocv_v`` must rise strictly (a unique inverse is needed for OCV
    initialisation). Outside [soc[0], soc[-1]] the curve extends linearly with its end
    slopes, so a filter state slightly outside [0, 1] still sees an informative slope.
    """

    soc: tuple[float, ...]
    ocv_v: tuple[float, ...]
    docv_dt_v_per_k: float | tuple[float, ...] = 0.0
    t_ref_c: float = T_REF_C
    _slope_x: FloatArray = field(init=False, repr=False, compare=False)
    _slope_y: FloatArray = field(init=False, repr=False, compare=False)
    _grid_soc: FloatArray = field(init=False, repr=False, compare=False)
    _grid_ocv: FloatArray = field(init=False, repr=False, compare=False)
    _grid_energy: FloatArray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        soc, ocv = _f64(self.soc), _f64(self.ocv_v)
        if soc.ndim != 1 or soc.shape != ocv.shape or soc.size < 2:
            raise ValueError("OCV table needs matching soc/ocv_v of length >= 2")
        if not (np.all(np.isfinite(soc)) and np.all(np.isfinite(ocv))):
            raise ValueError("OCV table values must be finite")
        if np.any(np.diff(soc) <= 0.0) or np.any(np.diff(ocv) <= 0.0):
            raise ValueError("OCV table: soc and ocv_v must both rise strictly")
        dudt = _f64(self.docv_dt_v_per_k)
        if dudt.ndim not in (0, 1) or (dudt.ndim == 1 and dudt.shape != soc.shape):
            raise ValueError("docv_dt_v_per_k: one value or one per SoC point")
        # Slope: piecewise constant between points, evaluated at segment midpoints and
        # interpolated linearly (continuous, so the filter gain does not jump).
        mids = 0.5 * (soc[1:] + soc[:-1])
        slopes = np.diff(ocv) / np.diff(soc)
        object.__setattr__(self, "_slope_x", mids)
        object.__setattr__(self, "_slope_y", slopes)
        grid = np.linspace(0.0, 1.0, _GRID)
        g_ocv = self._ocv_ref(grid)
        # Cumulative integral of OCV over SoC (V * fraction): energy per Ah of capacity.
        energy = np.concatenate(([0.0], np.cumsum(0.5 * (g_ocv[1:] + g_ocv[:-1]) * np.diff(grid))))
        object.__setattr__(self, "_grid_soc", grid)
        object.__setattr__(self, "_grid_ocv", g_ocv)
        object.__setattr__(self, "_grid_energy", energy)

    def _ocv_ref(self, soc: FloatArray) -> FloatArray:
        s0, s1 = self.soc[0], self.soc[-1]
        base = np.interp(soc, self.soc, self.ocv_v)
        lo_slope, hi_slope = self._slope_y[0], self._slope_y[-1]
        base = np.where(soc < s0, self.ocv_v[0] + (soc - s0) * lo_slope, base)
        return np.where(soc > s1, self.ocv_v[-1] + (soc - s1) * hi_slope, base)

    def _entropic(self, soc: FloatArray, temp_c: ArrayLike) -> FloatArray | float:
        dt = _f64(temp_c) - self.t_ref_c
        if isinstance(self.docv_dt_v_per_k, tuple):
            return np.interp(soc, self.soc, self.docv_dt_v_per_k) * dt
        if self.docv_dt_v_per_k == 0.0:
            return 0.0
        return self.docv_dt_v_per_k * dt

    def ocv(self, soc: ArrayLike, temp_c: ArrayLike = T_REF_C) -> FloatArray:
        """OCV in V at ``soc`` (fraction) and ``temp_c`` (degC)."""
        s = _f64(soc)
        return _f64(self._ocv_ref(s) + self._entropic(s, temp_c))

    def slope(self, soc: ArrayLike) -> FloatArray:
        """dOCV/dSoC in V per unit SoC (the entropic term's SoC dependence is neglected)."""
        return _f64(np.interp(_f64(soc), self._slope_x, self._slope_y))

    def soc_at(self, ocv_v: ArrayLike, temp_c: ArrayLike = T_REF_C) -> FloatArray:
        """Inverse: SoC (clipped to [0, 1]) whose OCV at ``temp_c`` is ``ocv_v``."""
        v = _f64(ocv_v)
        if isinstance(self.docv_dt_v_per_k, tuple):
            # Two fixed-point passes are plenty: the entropic term is a few mV.
            s = np.interp(v, self._grid_ocv, self._grid_soc)
            for _ in range(2):
                s = np.interp(v - self._entropic(s, temp_c), self._grid_ocv, self._grid_soc)
            return _f64(s)
        v_ref = v - self._entropic(v, temp_c)
        return _f64(np.interp(v_ref, self._grid_ocv, self._grid_soc))

    def energy_v(self, soc: ArrayLike) -> FloatArray:
        """Integral of OCV over SoC from 0 to ``soc`` (V): multiply by capacity (Ah) for Wh."""
        return _f64(np.interp(np.clip(_f64(soc), 0.0, 1.0), self._grid_soc, self._grid_energy))

    @property
    def v_empty(self) -> float:
        return float(self._ocv_ref(np.array(0.0)))

    @property
    def v_full(self) -> float:
        return float(self._ocv_ref(np.array(1.0)))

    def to_dict(self) -> dict[str, Any]:
        dudt = self.docv_dt_v_per_k
        return {
            "soc": list(self.soc),
            "ocv_v": list(self.ocv_v),
            "docv_dt_v_per_k": list(dudt) if isinstance(dudt, tuple) else dudt,
            "t_ref_c": self.t_ref_c,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OcvCurve:
        dudt = d.get("docv_dt_v_per_k", 0.0)
        return cls(
            soc=tuple(float(x) for x in d["soc"]),
            ocv_v=tuple(float(x) for x in d["ocv_v"]),
            docv_dt_v_per_k=tuple(float(x) for x in dudt) if isinstance(dudt, Sequence) else float(dudt),
            t_ref_c=float(d.get("t_ref_c", T_REF_C)),
        )


def arrhenius(temp_c: ArrayLike, ea_j_per_mol: float, t_ref_c: float = T_REF_C) -> FloatArray:
    """Resistance factor exp(Ea/R (1/T - 1/T_ref)): > 1 when colder than ``t_ref_c``."""
    t_k = np.maximum(_f64(temp_c), -60.0) + 273.15
    return _f64(np.exp((ea_j_per_mol / _GAS_CONSTANT) * (1.0 / t_k - 1.0 / (t_ref_c + 273.15))))


def _sphere_eigenvalues(n: int) -> FloatArray:
    """The first ``n`` positive roots of tan(x) = x (Newton from the asymptote)."""
    q = (np.arange(1, n + 1) + 0.5) * np.pi
    x = q - 1.0 / q
    for _ in range(6):
        x -= (np.tan(x) - x) / (np.tan(x) ** 2)
    return _f64(x)


_DIFF_EXPLICIT = 3  # modes with their own time constant; the faster rest is lumped
_LAMBDA2 = _sphere_eigenvalues(400) ** 2


def diffusion_modes(tau_d_s: float) -> tuple[FloatArray, FloatArray]:
    """Time constants (s) and lags (s) of the surface excess of spherical diffusion.

    With diffusion time ``tau_d_s`` = R^2/D and SoC rate ``r`` (1/s), the surface SoC
    exceeds the bulk by ``d = sum d_n`` with ``dd_n/dt = (lag_n r - d_n) / tau_n``
    (``tau_n = tau_d/lambda_n^2``, ``lag_n = 2 tau_n / 3``; lags sum to ``tau_d/15``, the
    constant-current excess). The first modes are exact, the faster tail is one lumped mode.
    """
    if tau_d_s <= 0.0:
        return np.zeros(0), np.zeros(0)
    tau = tau_d_s / _LAMBDA2
    lag = 2.0 * tau / 3.0
    k = _DIFF_EXPLICIT
    tail_lag = tau_d_s / 15.0 - float(lag[:k].sum())  # the series converges slowly: close it exactly
    tail_tau = float(np.sum(lag[k:] * tau[k:]) / np.sum(lag[k:]))
    return _f64(np.append(tau[:k], tail_tau)), _f64(np.append(lag[:k], tail_lag))


@dataclass(frozen=True)
class CellType:
    """A chemistry preset: OCV curve, nominal capacity and reference ECM parameters.

    ``r_ohm``/``tau_s`` hold one entry per RC branch (1..4), sorted by time constant.
    ``r_soc`` with ``r0_soc_factor``/``rc_soc_factor`` is the resistance shape over SoC
    (1 at ``soc_ref``); ``ea_*`` are Arrhenius activation energies. ``v_min``/``v_max``
    bound normal operation. ``diffusion_tau_s`` (R^2/D at 25 degC, 0: none) makes the
    OCV follow the surface SoC (see the module docstring); it slows like the RC branches
    in the cold.
    """

    name: str
    ocv: OcvCurve
    capacity_ah: float
    r0_ohm: float
    r_ohm: tuple[float, ...]
    tau_s: tuple[float, ...]
    v_min: float
    v_max: float
    r_soc: tuple[float, ...] = (0.0, 0.1, 0.2, 1.0)
    r0_soc_factor: tuple[float, ...] = (1.3, 1.08, 1.0, 1.0)
    rc_soc_factor: tuple[float, ...] = (1.6, 1.15, 1.0, 1.0)
    ea_r0_j_per_mol: float = 20_000.0
    ea_rc_j_per_mol: float = 35_000.0
    coulombic_efficiency: float = 1.0
    diffusion_tau_s: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.r_ohm)
        if not 1 <= n <= MAX_RC or len(self.tau_s) != n:
            raise ValueError(f"{self.name}: need 1..{MAX_RC} RC branches with matching r_ohm/tau_s")
        if min(self.r0_ohm, *self.r_ohm, *self.tau_s, self.capacity_ah) <= 0.0:
            raise ValueError(f"{self.name}: capacity, resistances and time constants must be > 0")
        if not len(self.r_soc) == len(self.r0_soc_factor) == len(self.rc_soc_factor) >= 1:
            raise ValueError(f"{self.name}: resistance SoC shape tables must have matching lengths")
        if np.any(np.diff(self.r_soc) <= 0.0) or min(*self.r0_soc_factor, *self.rc_soc_factor) <= 0.0:
            raise ValueError(f"{self.name}: r_soc must rise strictly and factors be > 0")
        if not 0.0 < self.coulombic_efficiency <= 1.0:
            raise ValueError(f"{self.name}: coulombic efficiency must be in (0, 1]")
        if not self.v_min < self.v_max:
            raise ValueError(f"{self.name}: v_min must be below v_max")
        if not (np.isfinite(self.diffusion_tau_s) and self.diffusion_tau_s >= 0.0):
            raise ValueError(f"{self.name}: diffusion_tau_s must be >= 0")

    @property
    def n_rc(self) -> int:
        return len(self.r_ohm)

    def soc_factors(self, soc: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """(R0 factor, RC factor) of the SoC shape at ``soc``."""
        s = _f64(soc)
        return _f64(np.interp(s, self.r_soc, self.r0_soc_factor)), _f64(np.interp(s, self.r_soc, self.rc_soc_factor))

    def temp_factors(self, temp_c: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """(R0 factor, RC factor) from temperature."""
        return arrhenius(temp_c, self.ea_r0_j_per_mol), arrhenius(temp_c, self.ea_rc_j_per_mol)


# Typical NMC/graphite automotive cell (60 Ah class), 25 degC.
_NMC_TABLE = (
    (0.00, 3.000), (0.02, 3.280), (0.05, 3.420), (0.10, 3.510), (0.15, 3.555), (0.20, 3.590),
    (0.25, 3.615), (0.30, 3.638), (0.35, 3.660), (0.40, 3.682), (0.45, 3.705), (0.50, 3.732),
    (0.55, 3.762), (0.60, 3.797), (0.65, 3.835), (0.70, 3.875), (0.75, 3.916), (0.80, 3.960),
    (0.85, 4.006), (0.90, 4.056), (0.95, 4.120), (1.00, 4.200),
)  # fmt: skip
# LFP/graphite: knees at both ends, long flat plateau (the hard case for SoC).
_LFP_TABLE = (
    (0.00, 2.500), (0.01, 2.800), (0.03, 3.000), (0.05, 3.100), (0.08, 3.170), (0.10, 3.200),
    (0.15, 3.220), (0.20, 3.240), (0.30, 3.265), (0.40, 3.285), (0.50, 3.292), (0.60, 3.300),
    (0.70, 3.320), (0.80, 3.330), (0.90, 3.335), (0.95, 3.345), (0.97, 3.370), (0.98, 3.420),
    (0.99, 3.500), (1.00, 3.650),
)  # fmt: skip

NMC = CellType(
    name="NMC",
    ocv=OcvCurve(tuple(s for s, _ in _NMC_TABLE), tuple(v for _, v in _NMC_TABLE), -0.3e-3),
    capacity_ah=60.0,
    r0_ohm=1.5e-3,
    r_ohm=(0.6e-3, 0.8e-3),
    tau_s=(10.0, 300.0),
    v_min=3.0,
    v_max=4.2,
)
LFP = CellType(
    name="LFP",
    ocv=OcvCurve(tuple(s for s, _ in _LFP_TABLE), tuple(v for _, v in _LFP_TABLE), -0.2e-3),
    capacity_ah=60.0,
    r0_ohm=1.2e-3,
    r_ohm=(0.5e-3, 0.7e-3),
    tau_s=(8.0, 400.0),
    v_min=2.5,
    v_max=3.65,
)
PRESETS: Mapping[str, CellType] = {"NMC": NMC, "LFP": LFP}


def get_cell_type(name: str | CellType) -> CellType:
    """A :class:`CellType` given one or a preset name ("NMC", "LFP")."""
    if isinstance(name, CellType):
        return name
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise ValueError(f"unknown chemistry {name!r}; known: {', '.join(PRESETS)}") from None


@dataclass
class EcmParams:
    """Per-cell ECM parameters at the reference point: shapes (N,), (N, n_rc), (N, n_rc), (N,).

    A branch with ``r_ohm == 0`` is unused (its voltage stays 0). Mutable on purpose: a
    cloud update replaces one cell's row (see :mod:`estimators.model_update`).
    """

    r0_ohm: FloatArray
    r_ohm: FloatArray
    c_f: FloatArray
    capacity_ah: FloatArray

    def __post_init__(self) -> None:
        self.r0_ohm = _f64(self.r0_ohm).copy()
        self.r_ohm = np.atleast_2d(_f64(self.r_ohm)).copy()
        self.c_f = np.atleast_2d(_f64(self.c_f)).copy()
        self.capacity_ah = _f64(self.capacity_ah).copy()
        n = self.r0_ohm.shape[0] if self.r0_ohm.ndim == 1 else -1
        if n < 1 or self.capacity_ah.shape != (n,):
            raise ValueError("r0_ohm and capacity_ah must be 1-D with one entry per cell")
        if self.r_ohm.shape != self.c_f.shape or self.r_ohm.shape[0] != n or not 1 <= self.r_ohm.shape[1] <= MAX_RC:
            raise ValueError(f"r_ohm and c_f must have shape (cells, 1..{MAX_RC})")
        arrays = (self.r0_ohm, self.r_ohm, self.c_f, self.capacity_ah)
        if not all(np.all(np.isfinite(a)) for a in arrays):
            raise ValueError("ECM parameters must be finite")
        if np.any(self.r0_ohm <= 0.0) or np.any(self.capacity_ah <= 0.0):
            raise ValueError("R0 and capacity must be > 0")
        if np.any(self.r_ohm < 0.0) or np.any(self.c_f <= 0.0):
            raise ValueError("RC resistances must be >= 0 and capacitances > 0")

    @property
    def n_cells(self) -> int:
        return int(self.r0_ohm.shape[0])

    @property
    def n_rc(self) -> int:
        return int(self.r_ohm.shape[1])

    @property
    def tau_s(self) -> FloatArray:
        return _f64(self.r_ohm * self.c_f)

    @classmethod
    def uniform(cls, cell: CellType, n_cells: int, n_rc: int | None = None, capacity_ah: float | None = None) -> EcmParams:
        """Every cell at the preset's reference values; ``n_rc`` pads (unused branches) or trims."""
        n = cell.n_rc if n_rc is None else int(n_rc)
        if not 1 <= n <= MAX_RC:
            raise ValueError(f"n_rc must be in 1..{MAX_RC}")
        r = np.zeros(n)
        tau = np.geomspace(1.0, 3000.0, n)  # placeholder time constants of unused branches
        k = min(n, cell.n_rc)
        r[:k] = cell.r_ohm[:k]
        tau[:k] = cell.tau_s[:k]
        c = tau / np.where(r > 0.0, r, 1.0)
        cap = cell.capacity_ah if capacity_ah is None else capacity_ah
        return cls(
            r0_ohm=np.full(n_cells, cell.r0_ohm),
            r_ohm=np.tile(r, (n_cells, 1)),
            c_f=np.tile(c, (n_cells, 1)),
            capacity_ah=np.full(n_cells, float(cap)),
        )

    def with_n_rc(self, n_rc: int) -> EcmParams:
        """A copy with ``n_rc`` branches: extra ones unused (R = 0), surplus ones dropped."""
        if not 1 <= n_rc <= MAX_RC:
            raise ValueError(f"n_rc must be in 1..{MAX_RC}")
        r = np.zeros((self.n_cells, n_rc))
        c = np.ones((self.n_cells, n_rc))
        k = min(n_rc, self.n_rc)
        r[:, :k] = self.r_ohm[:, :k]
        c[:, :k] = self.c_f[:, :k]
        return EcmParams(self.r0_ohm, r, c, self.capacity_ah)

    def copy(self) -> EcmParams:
        return EcmParams(self.r0_ohm, self.r_ohm, self.c_f, self.capacity_ah)

    def to_dict(self) -> dict[str, Any]:
        return {
            "r0_ohm": self.r0_ohm.tolist(),
            "r_ohm": self.r_ohm.tolist(),
            "c_f": self.c_f.tolist(),
            "capacity_ah": self.capacity_ah.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EcmParams:
        return cls(_f64(d["r0_ohm"]), _f64(d["r_ohm"]), _f64(d["c_f"]), _f64(d["capacity_ah"]))
