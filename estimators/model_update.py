"""Validated ECM parameter updates for one cell, in the cloud's format.

The cloud re-fits each cell's ECM from EIS/DRT and sends back, per cell: the
voltage point the fit belongs to, R0, R1..R4 and C1..C4 (ohm, farad). Every
remote path (MQTT downlink, OPC UA method) goes through :func:`apply_ecm_update`,
which either returns new parameters or refuses with a reason; it never raises on
bad input and never modifies its arguments.

The update is converted to the filter's reference point: the voltage point gives
the SoC (through the OCV curve), and the values are divided by the chemistry's
SoC and temperature factors there. Pairs with R = 0 (or absent) are unused; pairs
are sorted by time constant. More pairs than the filter has grow every cell's
branch count (the others get unused branches); :meth:`SocEkf.set_params` then
resizes the filter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .ecm import MAX_RC, T_REF_C, CellType, EcmParams

__all__ = ["EcmUpdate", "UpdateLimits", "UpdateResult", "apply_ecm_update", "parse_ecm_update"]

_KEYS = {"cell", "voltage_v", "temperature_c", "r0_ohm"} | {f"r{k}_ohm" for k in range(1, MAX_RC + 1)} | {
    f"c{k}_f" for k in range(1, MAX_RC + 1)}


@dataclass(frozen=True)
class UpdateLimits:
    """Plausibility bounds of an update (defaults suit cells of ~2-200 Ah).

    ``max_change_factor``: refuse an R0, R_k, C_k or total RC resistance more than this
    factor away from the present value (0 disables), a guard against a fit to the wrong
    cell or unit mix-ups. Branches are compared in time-constant order, and only when the
    update has as many as the cell has now (else the total RC resistance alone).
    """

    r0_min_ohm: float = 1e-5
    r0_max_ohm: float = 0.5
    r_max_ohm: float = 1.0
    c_min_f: float = 1e-3
    c_max_f: float = 1e7
    tau_min_s: float = 1e-4
    tau_max_s: float = 1e5
    total_r_max_ohm: float = 1.0
    temp_min_c: float = -40.0
    temp_max_c: float = 80.0
    max_change_factor: float = 5.0


@dataclass(frozen=True)
class EcmUpdate:
    """One cell's parameters as sent by the cloud (pairs as given, unsorted)."""

    cell: int
    voltage_v: float
    r0_ohm: float
    r_ohm: tuple[float, ...]
    c_f: tuple[float, ...]
    temperature_c: float = T_REF_C


@dataclass(frozen=True)
class UpdateResult:
    """``accepted`` with the new ``params`` (a copy), or refused with ``reason``."""

    accepted: bool
    reason: str
    params: EcmParams | None = None
    update: EcmUpdate | None = None


def _number(d: Mapping[str, Any], key: str) -> float:
    val = d[key]
    if isinstance(val, bool) or not isinstance(val, int | float):
        raise ValueError(f"{key}: expected a number, got {type(val).__name__}")
    x = float(val)
    if not math.isfinite(x):
        raise ValueError(f"{key}: must be finite, got {x!r}")
    return x


def parse_ecm_update(d: Mapping[str, Any]) -> EcmUpdate:
    """Parse the plain mapping (``cell``, ``voltage_v``, ``r0_ohm``, ``r1_ohm``..``r4_ohm``,
    ``c1_f``..``c4_f``, optional ``temperature_c``); ValueError names the problem."""
    if not isinstance(d, Mapping):
        raise ValueError("update must be a mapping")
    unknown = sorted(set(d) - _KEYS)
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(map(str, unknown))}")
    for key in ("cell", "voltage_v", "r0_ohm"):
        if key not in d:
            raise ValueError(f"{key}: missing")
    cell = d["cell"]
    if isinstance(cell, bool) or not isinstance(cell, int):
        raise ValueError("cell: expected an integer index")
    r: list[float] = []
    c: list[float] = []
    for k in range(1, MAX_RC + 1):
        rk, ck = f"r{k}_ohm", f"c{k}_f"
        if (rk in d) != (ck in d):
            raise ValueError(f"{rk}/{ck}: give both or neither")
        if rk in d:
            r.append(_number(d, rk))
            c.append(_number(d, ck))
    temp = _number(d, "temperature_c") if "temperature_c" in d else T_REF_C
    return EcmUpdate(int(cell), _number(d, "voltage_v"), _number(d, "r0_ohm"), tuple(r), tuple(c), temp)


def _check(u: EcmUpdate, params: EcmParams, cell: CellType, lim: UpdateLimits) -> str | None:
    """The reason ``u`` is not physical or not plausible, or None."""
    if not 0 <= u.cell < params.n_cells:
        return f"cell {u.cell} out of range 0..{params.n_cells - 1}"
    lo, hi = cell.ocv.v_empty, cell.ocv.v_full
    if not lo <= u.voltage_v <= hi:
        return f"voltage point {u.voltage_v:g} V outside the OCV curve {lo:.3f}..{hi:.3f} V"
    if not lim.temp_min_c <= u.temperature_c <= lim.temp_max_c:
        return f"temperature {u.temperature_c:g} degC outside {lim.temp_min_c:g}..{lim.temp_max_c:g}"
    if not lim.r0_min_ohm <= u.r0_ohm <= lim.r0_max_ohm:
        return f"R0 {u.r0_ohm:g} ohm outside {lim.r0_min_ohm:g}..{lim.r0_max_ohm:g}"
    for k, (r, c) in enumerate(zip(u.r_ohm, u.c_f, strict=True), start=1):
        if r < 0.0 or r > lim.r_max_ohm:
            return f"R{k} {r:g} ohm outside 0..{lim.r_max_ohm:g}"
        if r == 0.0:
            continue
        if not lim.c_min_f <= c <= lim.c_max_f:
            return f"C{k} {c:g} F outside {lim.c_min_f:g}..{lim.c_max_f:g}"
        if not lim.tau_min_s <= r * c <= lim.tau_max_s:
            return f"R{k}*C{k} = {r * c:g} s outside {lim.tau_min_s:g}..{lim.tau_max_s:g}"
    total = u.r0_ohm + sum(u.r_ohm)
    if total > lim.total_r_max_ohm:
        return f"total resistance {total:g} ohm above {lim.total_r_max_ohm:g}"
    return None


def _too_far(r0: float, pairs: list[tuple[int, float, float]], params: EcmParams, cell: int,
             k: float) -> str | None:
    """Which value (at reference) is more than a factor ``k`` from the cell's present one, or None."""
    if k <= 0.0:
        return None
    used = params.r_ohm[cell] > 0.0
    old_r, old_c = params.r_ohm[cell][used], params.c_f[cell][used]
    order = np.argsort(old_r * old_c)
    checks = [("R0", r0, float(params.r0_ohm[cell]), "ohm")]
    if len(pairs) == order.size:
        for (n, r, c), j in zip(pairs, order, strict=True):
            checks += [(f"R{n}", r, float(old_r[j]), "ohm"), (f"C{n}", c, float(old_c[j]), "F")]
    if old_r.size:
        checks.append(("total RC resistance", sum(p[1] for p in pairs), float(old_r.sum()), "ohm"))
    for name, new, old, unit in checks:
        if not old / k <= new <= old * k:
            return f"{name} {new:g} {unit} (at reference) differs from the present {old:g} {unit} by more than a factor {k:g}"
    return None


def apply_ecm_update(params: EcmParams, update: Mapping[str, Any] | EcmUpdate, cell: CellType,
                     limits: UpdateLimits | None = None) -> UpdateResult:
    """Validate one cell's update and return new parameters with it applied (see module doc)."""
    lim = limits or UpdateLimits()
    try:
        u = update if isinstance(update, EcmUpdate) else parse_ecm_update(update)
    except (ValueError, TypeError) as exc:
        return UpdateResult(False, f"malformed: {exc}")
    reason = _check(u, params, cell, lim)
    if reason is not None:
        return UpdateResult(False, reason, update=u)
    soc = cell.ocv.soc_at(u.voltage_v, u.temperature_c)
    f0s, frs = cell.soc_factors(soc)
    f0t, frt = cell.temp_factors(u.temperature_c)
    r0_ref = u.r0_ohm / float(f0s * f0t)
    old = float(params.r0_ohm[u.cell])
    rc_scale = float(frs * frt)
    # (sender's branch number, R at reference, C): C stays as measured, the model keeps capacitances fixed and scales R
    pairs = sorted(((k, r / rc_scale, c) for k, (r, c) in enumerate(zip(u.r_ohm, u.c_f, strict=True), start=1)
                    if r > 0.0), key=lambda p: p[1] * p[2])
    reason = _too_far(r0_ref, pairs, params, u.cell, lim.max_change_factor)
    if reason is not None:
        return UpdateResult(False, reason, update=u)
    n_rc = max(params.n_rc, len(pairs))
    new = params.with_n_rc(n_rc) if n_rc != params.n_rc else params.copy()
    row_r = np.zeros(n_rc)
    row_c = np.ones(n_rc)
    for j, (_, r, c) in enumerate(pairs):
        row_r[j] = r
        row_c[j] = c
    new.r0_ohm[u.cell] = r0_ref
    new.r_ohm[u.cell] = row_r
    new.c_f[u.cell] = row_c
    grown = f"; RC branches {params.n_rc} -> {n_rc}" if n_rc != params.n_rc else ""
    return UpdateResult(True, f"cell {u.cell}: R0 {old * 1e3:.3f} -> {r0_ref * 1e3:.3f} mohm at reference, "
                              f"{len(pairs)} RC pair(s){grown}", params=new, update=u)
