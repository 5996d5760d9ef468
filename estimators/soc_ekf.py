"""Per-cell SoC by an extended Kalman filter on the ECM, vectorised over all cells.

State of every cell: ``[soc, v_1 .. v_n, b]``: SoC, the n RC branch voltages and
(optionally) the current-sensor offset ``b`` in A (the true current is
``I_measured - b``; the offset is common to a series string but each cell carries
its own estimate, which keeps every cell's filter independent, and so cheap; it
corrects the charge integral, where a small offset adds up, and the predicted
overpotential). All cells advance together as stacked arrays: there is no Python
loop over cells.

What it handles:

* wrong initial SoC: large initial covariance; :meth:`SocEkf.init_from_ocv` starts
  from the OCV when the pack rests, with a variance from the local OCV slope (under
  load the voltage is no OCV: it keeps the large initial variance);
  while the innovations stay far larger than expected, the SoC variance widens again
  and the RC voltages are not corrected (they would soak up the SoC error);
* solid diffusion (``CellType.diffusion_tau_s`` > 0): the OCV is read at the surface
  SoC, the bulk SoC plus the surface excess the current drives (:mod:`estimators.ecm`);
  the excess is a known response to the current, so it is no filter state;
* current-sensor offset: the bias state (see ``EkfConfig.bias``); while the offset
  is still unknown, a rest (reading within ``rest_current_a`` of zero) calibrates it:
  at rest the true current is zero, so the reading *is* the offset. Otherwise the R0
  drop of a 50 mA offset alone holds a flat-OCV (LFP) SoC several % off;
* OCV initialisation once the pack has rested: cells still far off (averaged
  innovations too large) ``rest_reinit_s`` into a rest restart from the OCV inverse
  of the rest-averaged voltage, with the variance that average supports: one global
  step instead of the filter's slow local steps through a flat, curved OCV;
* OCV re-calibration after rest: once the current stays below ``rest_current_a``
  for ``rest_time_s``, the rest-averaged voltage is used as an OCV measurement with
  the (smaller) ``rest_voltage_noise_v``;
* outliers: innovations beyond ``gate_sigma`` standard deviations are de-weighted;
* invalid samples: cells whose voltage is flagged invalid are predicted only;
* parallel strings: the current may be given per cell (each cell its string's);
* data gaps: :meth:`SocEkf.gap` widens the SoC variance for time the filter did not see.

The whole filter state exports to plain lists (:meth:`SocEkf.export_state`) so the
daemon can persist it and restore it after a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .ecm import CellType, EcmParams, diffusion_modes

__all__ = ["EkfConfig", "PackSoc", "SocEkf", "pack_soc"]

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

STATE_VERSION = 1


@dataclass(frozen=True)
class EkfConfig:
    """Tuning of :class:`SocEkf` (standard deviations; per-second values scale with sqrt(dt)).

    ``voltage_noise_v`` is the sensor noise plus a base model error; ``model_error_rel``
    adds that fraction of the predicted overpotential (the ECM errs more under load); ``current_noise_rel``/``current_noise_a`` are the white
    noise of the current sensor; ``soc_walk_per_sqrt_s`` and ``rc_walk_v_per_sqrt_s``
    are model random walks; ``bias_walk_a_per_sqrt_s`` lets the offset drift; the offset
    is learnt only from cells whose SoC standard deviation is below ``bias_learn_max_soc_std``
    and whose normalised innovation (averaged over ``nis_average_s``) is below
    ``bias_learn_max_nis``, i.e. once the filter has converged, and only from samples
    whose predicted overpotential is below ``bias_learn_max_overpotential_v`` (light
    load, where the ECM is accurate), or from rests only if not ``bias_learn_under_load``.
    ``rest_current_a`` (after removing the estimated offset) and ``rest_time_s`` define
    a rest; ``self_discharge_std_per_day`` widens the SoC variance over time offline.
    While the averaged normalised innovation exceeds ``inflate_nis`` the SoC variance
    grows (e-folding in ``inflate_time_s``), and while it exceeds ``rc_learn_max_nis``
    the RC voltages are not corrected from the innovations (0 turns either off).
    While the offset's standard deviation exceeds ``offset_calibrated_std_a``, every
    sample whose raw current reading (now and over the step) is within ``rest_current_a``
    of zero is fused as "true current 0" with ``rest_zero_current_std_a`` (0: off).
    Once a rest has lasted ``rest_reinit_s`` (0: off), cells whose averaged normalised
    innovation exceeds ``reinit_nis`` restart from the rest-averaged voltage.
    """

    voltage_noise_v: float = 0.010
    current_noise_rel: float = 0.005
    current_noise_a: float = 0.02
    soc_walk_per_sqrt_s: float = 2e-6
    rc_walk_v_per_sqrt_s: float = 2e-5
    bias: bool = True
    bias_init_std_a: float = 0.3
    bias_walk_a_per_sqrt_s: float = 5e-6
    bias_learn_max_soc_std: float = 0.05
    bias_learn_max_nis: float = 4.0
    bias_learn_under_load: bool = True
    bias_learn_max_overpotential_v: float = 1.0
    model_error_rel: float = 0.1
    nis_average_s: float = 120.0
    init_soc_std: float = 0.3
    init_rc_std_v: float = 0.02
    ocv_init_voltage_std_v: float = 0.006
    rest_current_a: float = 0.5
    rest_time_s: float = 1800.0
    rest_voltage_noise_v: float = 0.004
    rest_average_s: float = 60.0
    gate_sigma: float = 5.0
    soc_bounds: tuple[float, float] = (-0.05, 1.05)
    self_discharge_std_per_day: float = 0.01
    inflate_nis: float = 4.0
    inflate_time_s: float = 60.0
    rc_learn_max_nis: float = 4.0
    rest_zero_current_std_a: float = 0.05
    offset_calibrated_std_a: float = 0.01
    rest_reinit_s: float = 120.0
    reinit_nis: float = 4.0

    def __post_init__(self) -> None:
        positive = ("voltage_noise_v", "rest_voltage_noise_v", "init_soc_std", "init_rc_std_v",
                    "ocv_init_voltage_std_v", "rest_time_s", "rest_average_s", "nis_average_s", "bias_learn_max_nis",
                    "inflate_time_s")
        for name in positive:
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name}: must be > 0")
        nonneg = ("current_noise_rel", "current_noise_a", "soc_walk_per_sqrt_s", "rc_walk_v_per_sqrt_s",
                  "bias_init_std_a", "bias_walk_a_per_sqrt_s", "bias_learn_max_soc_std", "rest_current_a", "model_error_rel",
                  "bias_learn_max_overpotential_v", "gate_sigma",
                  "self_discharge_std_per_day", "inflate_nis", "rc_learn_max_nis", "rest_zero_current_std_a",
                  "offset_calibrated_std_a", "rest_reinit_s", "reinit_nis")
        for name in nonneg:
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name}: must be >= 0")
        if not self.soc_bounds[0] < 0.0 < 1.0 < self.soc_bounds[1]:
            raise ValueError("soc_bounds must enclose [0, 1]")


@dataclass(frozen=True)
class PackSoc:
    """Pack-level view of the per-cell estimates.

    ``soc``: usable-window SoC of the series string, ``D / (D + C)`` with ``D`` the Ah
    the weakest cell can still deliver and ``C`` the Ah the fullest cell can still take
    (0 when any cell is empty, 1 when any cell is full). ``soe``: the same with OCV
    energy; ``energy_wh``/``room_wh``: OCV energy available to discharge / charge.
    """

    soc: float
    soe: float
    min_cell_soc: float
    max_cell_soc: float
    mean_cell_soc: float
    energy_wh: float
    room_wh: float


def pack_soc(cell: CellType, soc: ArrayLike, capacity_ah: ArrayLike) -> PackSoc:
    """Pack SoC/SoE of a series string from per-cell SoC and capacity (see :class:`PackSoc`)."""
    s = np.clip(np.asarray(soc, dtype=np.float64), 0.0, 1.0)
    q = np.broadcast_to(np.asarray(capacity_ah, dtype=np.float64), s.shape)
    ok = np.isfinite(s) & np.isfinite(q)
    if not ok.any():
        nan = float("nan")
        return PackSoc(nan, nan, nan, nan, nan, nan, nan)
    s, q = s[ok], q[ok]
    d = float(np.min(s * q))
    c = float(np.min((1.0 - s) * q))
    e = cell.ocv.energy_v
    energy = float(np.sum(q * (e(s) - e(s - d / q))))
    room = float(np.sum(q * (e(s + c / q) - e(s))))
    total_ah = d + c
    return PackSoc(
        soc=d / total_ah if total_ah > 0.0 else 0.0,
        soe=energy / (energy + room) if energy + room > 0.0 else 0.0,
        min_cell_soc=float(s.min()),
        max_cell_soc=float(s.max()),
        mean_cell_soc=float(s.mean()),
        energy_wh=energy,
        room_wh=room,
    )


class SocEkf:
    """Extended Kalman filter over every cell of a series string (see module docstring).

    ``cell`` supplies the OCV curve and the resistance shape over SoC and temperature;
    ``params`` the per-cell reference ECM values and capacities. ``soc0`` is the initial
    SoC (scalar or per cell) with standard deviation ``config.init_soc_std``.
    """

    # The current rest's voltage (less modelled RC voltages): sum, count, recent trend.
    _rest_sum: FloatArray
    _rest_n: FloatArray
    _rest_ema: FloatArray
    _rest_reinit_done: bool

    def __init__(self, cell: CellType, params: EcmParams, config: EkfConfig | None = None,
                 soc0: ArrayLike = 0.5) -> None:
        self.cell = cell
        self.config = config if config is not None else EkfConfig()
        self.params = params.copy()
        self.n_cells = params.n_cells
        self._tf_key = float("nan")
        self._tf = self.cell.temp_factors(25.0)
        self._diff_tau, self._diff_lag = diffusion_modes(cell.diffusion_tau_s)
        self._alloc(params.n_rc)
        self.reset(soc0)

    # ----------------------------------------------------------------- layout

    def _alloc(self, n_rc: int) -> None:
        self.n_rc = n_rc
        self.m = 1 + n_rc + (1 if self.config.bias else 0)
        self._rc = slice(1, 1 + n_rc)
        self._eye = np.eye(self.m)
        self._diag = np.arange(self.m)

    @property
    def _b(self) -> int:
        return self.m - 1

    def reset(self, soc0: ArrayLike, soc_std: float | None = None) -> None:
        """Start over at ``soc0`` (RC branches at rest, offset 0) with a wide covariance."""
        cfg = self.config
        n, m = self.n_cells, self.m
        self.x = np.zeros((n, m))
        self.x[:, 0] = np.broadcast_to(np.asarray(soc0, dtype=np.float64), (n,))
        p0 = np.zeros(m)
        p0[0] = (cfg.init_soc_std if soc_std is None else soc_std) ** 2
        p0[self._rc] = cfg.init_rc_std_v**2
        if cfg.bias:
            p0[self._b] = cfg.bias_init_std_a**2
        self.P = np.tile(np.diag(p0), (n, 1, 1))
        self.diffusion = np.zeros((n, self._diff_tau.size))
        self._i_prev = np.full(n, np.nan)
        self._rest_s = 0.0
        self._rest_v = np.zeros(n)
        self._rest_recalibrated = False
        self._rest_clear()
        self.recalibrations = 0
        self.reinits = 0
        self.steps = 0
        self.nis = np.full(n, 10.0 * self.config.bias_learn_max_nis)
        self._dt = 1.0

    def init_from_ocv(self, voltage_v: ArrayLike, temp_c: ArrayLike = 25.0, mask: ArrayLike | None = None,
                      current_a: ArrayLike = 0.0) -> None:
        """Set SoC from rested cell voltages (cells in ``mask``, default all valid ones).

        The SoC variance follows from ``ocv_init_voltage_std_v`` and the local OCV slope,
        so a flat plateau (LFP) leaves it wide and the filter keeps listening. A cell whose
        ``current_a`` is beyond ``rest_current_a`` starts from its voltage less the R0 drop,
        with the initial covariance (``init_soc_std``, ``init_rc_std_v``).
        """
        cfg = self.config
        v = np.broadcast_to(np.asarray(voltage_v, dtype=np.float64), (self.n_cells,))
        sel = np.isfinite(v) if mask is None else np.asarray(mask, dtype=np.bool_) & np.isfinite(v)
        i = self._per_cell(current_a)
        # under load the R0 and RC drops (0.1-0.2 V at 1C) are in the voltage: tens of slope-sigmas of SoC,
        # and the RC voltages are unknown too
        load = np.abs(i) > cfg.rest_current_a
        r0, _ = self._resistances(self.cell.ocv.soc_at(v, temp_c), temp_c)
        soc = self.cell.ocv.soc_at(np.where(load, v - r0 * i, v), temp_c)
        slope = np.maximum(self.cell.ocv.slope(soc), 1e-3)
        std = np.where(load, cfg.init_soc_std, np.clip(cfg.ocv_init_voltage_std_v / slope, 0.005, cfg.init_soc_std))
        fresh = np.zeros((int(sel.sum()), self.m, self.m))
        fresh[:, 0, 0] = std[sel] ** 2
        rc_idx = np.arange(1, 1 + self.n_rc)
        fresh[:, rc_idx, rc_idx] = (np.where(load[sel], 1.0, 0.1) * cfg.init_rc_std_v)[:, None] ** 2
        if cfg.bias:  # what was learnt about the sensor offset stays
            fresh[:, self._b, self._b] = self.P[sel, self._b, self._b]
        self.x[sel, 0] = soc[sel]
        self.x[sel, self._rc] = 0.0
        self.diffusion[sel] = 0.0
        self.P[sel] = fresh

    def gap(self, dt_s: float, current_bound_a: ArrayLike) -> None:
        """``dt_s`` passed unseen (no current, or a stalled loop): instead of predicting, widen the
        SoC variance by the charge ``current_bound_a`` could have moved, at most to ``init_soc_std``."""
        cfg = self.config
        moved = np.abs(self._per_cell(current_bound_a)) * max(0.0, float(dt_s)) / (3600.0 * self.params.capacity_ah)
        var = self.P[:, 0, 0]
        self.P[:, 0, 0] = np.maximum(var, np.minimum(var + moved**2, cfg.init_soc_std**2))
        # the current before the gap says nothing about the next step, nor was the pack seen at rest
        self._i_prev = np.full(self.n_cells, np.nan)
        self._rest_s = 0.0
        self._rest_recalibrated = False
        self._rest_clear()

    def _per_cell(self, a: ArrayLike) -> FloatArray:
        return np.broadcast_to(np.asarray(a, dtype=np.float64), (self.n_cells,))

    # ------------------------------------------------------------------ model

    def _temp_factors(self, temp_c: ArrayLike) -> tuple[FloatArray, FloatArray]:
        if isinstance(temp_c, int | float):  # the common scalar case: cache it
            if temp_c != self._tf_key:
                self._tf_key = float(temp_c)
                self._tf = self.cell.temp_factors(temp_c)
            return self._tf
        return self.cell.temp_factors(temp_c)

    def _resistances(self, soc: FloatArray, temp_c: ArrayLike) -> tuple[FloatArray, FloatArray]:
        f0s, frs = self.cell.soc_factors(soc)
        f0t, frt = self._temp_factors(temp_c)
        r0 = self.params.r0_ohm * (f0s * f0t)
        r = self.params.r_ohm * (frs * frt)[:, None]
        return r0, r

    def step(self, dt_s: float, current_a: ArrayLike, voltage_v: ArrayLike, temp_c: ArrayLike = 25.0, *,
             mean_current_a: ArrayLike | None = None, valid: ArrayLike | None = None) -> None:
        """Advance by ``dt_s`` and fuse the cell voltages measured now.

        ``current_a``: measured current now (> 0 charging), the string's (scalar) or per cell
        (parallel strings); ``mean_current_a``: its mean over the step (default: mean of the
        previous and this sample);
        ``voltage_v``: per-cell voltages now; ``temp_c``: scalar or per cell;
        ``valid``: per-cell mask of usable voltages (NaN counts as invalid too).
        """
        dt = float(dt_s)
        i_now = self._per_cell(current_a)
        if not np.all(np.isfinite(i_now)):
            raise ValueError("current must be finite (treat a bad current as a gap: skip the step)")
        if mean_current_a is not None:
            i_mean = self._per_cell(mean_current_a)
        elif np.all(np.isfinite(self._i_prev)):
            i_mean = 0.5 * (self._i_prev + i_now)
        else:
            i_mean = i_now
        self._i_prev = i_now.copy()
        v = np.asarray(voltage_v, dtype=np.float64)
        ok = np.isfinite(v)
        if valid is not None:
            ok &= np.asarray(valid, dtype=np.bool_)
        if dt > 0.0:
            self._dt = dt
            self._predict(dt, i_mean, temp_c)
        cfg = self.config
        if cfg.bias and cfg.rest_zero_current_std_a > 0.0 and \
                max(np.max(np.abs(i_now)), np.max(np.abs(i_mean))) <= cfg.rest_current_a:
            # Judged on the raw reading: an offset estimate still unsure must not decide.
            self._zero_current_update(i_now, cfg.rest_zero_current_std_a)
        self._update(v, ok, i_now, temp_c, self.config.voltage_noise_v)
        self._track_rest(dt, i_now, v, ok, temp_c)
        self.steps += 1

    def _predict(self, dt: float, i_mean: FloatArray, temp_c: ArrayLike) -> None:
        cfg = self.config
        x, P = self.x, self.P
        soc = x[:, 0]
        _, r = self._resistances(soc, temp_c)
        tau = np.maximum(r * self.params.c_f, 1e-6)
        a = np.exp(-dt / tau)
        gain = r * (1.0 - a)
        # The offset estimate corrects every use of the current, but only the charge
        # integral carries it in the Jacobian: through R0 and the RC branches it is worth
        # a few mV, and that path would let a large initial SoC error leak into the
        # offset state (yet on a flat OCV those mV must not be left in the prediction).
        i_soc = i_mean - x[:, self._b] if cfg.bias else i_mean
        k_soc = dt / (3600.0 * self.params.capacity_ah)
        eta = np.where(i_soc > 0.0, self.cell.coulombic_efficiency, 1.0)
        x[:, 0] = np.clip(soc + k_soc * eta * i_soc, *cfg.soc_bounds)
        x[:, self._rc] = a * x[:, self._rc] + gain * i_soc[:, None]
        if self._diff_tau.size:
            # Surface excess: a known linear response to the current, so it needs no
            # covariance of its own (its error is part of the model error).
            # Diffusion slows in the cold like the RC branches.
            slow = np.asarray(self._temp_factors(temp_c)[1], dtype=np.float64).reshape(-1, 1)
            a_d = np.exp(-dt / (self._diff_tau * slow))
            rate = (eta * i_soc / (3600.0 * self.params.capacity_ah))[:, None]  # SoC per second
            self.diffusion = a_d * self.diffusion + (1.0 - a_d) * (self._diff_lag * slow) * rate

        # P <- F P F' with F = D + e0 c e_b' (D diagonal: 1, a_k, 1; c couples SoC to the
        # offset), expanded by hand: far cheaper than stacked matrix products.
        rc_idx = np.arange(1, 1 + self.n_rc)
        d = np.ones((self.n_cells, self.m))
        d[:, rc_idx] = a
        P *= d[:, :, None] * d[:, None, :]
        if cfg.bias:
            b = self._b
            c = -k_soc * eta
            col = P[:, :, b] * (c / d[:, b])[:, None]  # (D P D) e_b c / d_b = D P e_b c
            p_bb = P[:, b, b] / d[:, b] ** 2
            P[:, :, 0] += col
            P[:, 0, :] += col
            P[:, 0, 0] += c * c * p_bb
        sig_i = cfg.current_noise_rel * np.abs(i_mean) + cfg.current_noise_a
        q_soc = (k_soc * sig_i) ** 2 + cfg.soc_walk_per_sqrt_s**2 * dt
        P[:, 0, 0] += q_soc
        P[:, rc_idx, rc_idx] += (gain * sig_i[:, None]) ** 2 + cfg.rc_walk_v_per_sqrt_s**2 * dt
        if cfg.bias:
            P[:, self._b, self._b] += cfg.bias_walk_a_per_sqrt_s**2 * dt
        if cfg.inflate_nis > 0.0:
            # Innovations persistently larger than the filter expects: its SoC variance
            # has collapsed too early (a large start error seen through a curved OCV).
            # Widen it again (e-folding in inflate_time_s) until the innovations agree.
            widen = (self.nis > cfg.inflate_nis) & (P[:, 0, 0] < cfg.init_soc_std**2)
            grow = np.sqrt(np.where(widen, 1.0 + dt / cfg.inflate_time_s, 1.0))
            P[:, 0, :] *= grow[:, None]
            P[:, :, 0] *= grow[:, None]

    def _zero_current_update(self, i_now: FloatArray, std_a: float) -> None:
        """At rest the true current is zero: the reading is the sensor offset."""
        b = self._b
        sel = self.P[:, b, b] > self.config.offset_calibrated_std_a**2
        if not sel.any():
            return
        x, P = self.x[sel], self.P[sel]
        ph = P[:, :, b].copy()
        S = ph[:, b] + std_a**2
        K = ph / S[:, None]
        x += K * (i_now[sel] - x[:, b])[:, None]
        P -= K[:, :, None] * ph[:, None, :]
        self.x[sel] = x
        self.P[sel] = 0.5 * (P + P.transpose(0, 2, 1))

    def _update(self, v: FloatArray, ok: BoolArray, i_now: FloatArray | float, temp_c: ArrayLike, noise_v: float,
                rest: bool = False) -> None:
        cfg = self.config
        x, P = self.x, self.P
        soc = x[:, 0]
        # The OCV is that of the particle surface (see estimators.ecm).
        surface = soc + self.diffusion.sum(axis=1) if self._diff_tau.size else soc
        ocv = self.cell.ocv.ocv(surface, temp_c)
        slope = self.cell.ocv.slope(surface)
        H = np.zeros((self.n_cells, self.m))
        H[:, 0] = slope
        H[:, self._rc] = 1.0
        over = x[:, self._rc].sum(axis=1)
        if not rest:
            r0, _ = self._resistances(soc, temp_c)
            over = over + r0 * (i_now - x[:, self._b] if cfg.bias else i_now)
        pred = ocv + over
        # The ECM's error grows with the overpotential it has to predict.
        noise2 = noise_v**2 + (cfg.model_error_rel * over) ** 2
        innov = np.where(ok, v - pred, 0.0)
        PH = np.einsum("nij,nj->ni", P, H)
        S = np.einsum("ni,ni->n", H, PH) + noise2
        if not rest:
            # Normalised innovation, averaged over ~nis_average_s: about 1 when the filter
            # is consistent, large while it is still converging or the model is off.
            w = min(1.0, self._dt / cfg.nis_average_s)
            self.nis = np.where(ok, self.nis + w * (innov**2 / S - self.nis), self.nis)
        if cfg.gate_sigma > 0.0:
            S = np.maximum(S, innov**2 / cfg.gate_sigma**2)
        K = PH / S[:, None]
        K[~ok] = 0.0
        if cfg.rc_learn_max_nis > 0.0 and not rest:
            # While innovations are far larger than expected (a start far off), the RC
            # voltages follow the current only: else they soak up the SoC error and
            # hand it back at their own slow pace.
            K[np.ix_(self.nis > cfg.rc_learn_max_nis, np.arange(1, 1 + self.n_rc))] = 0.0
        if cfg.bias:
            # The offset is learnt from rested (OCV) measurements only, and only once a
            # cell's filter has converged: under load the innovations mostly carry the
            # ECM's own error, and while converging they say nothing about the offset.
            # Otherwise it is a "consider" state (its covariance still counts).
            unsure = (P[:, 0, 0] > cfg.bias_learn_max_soc_std**2) | (self.nis > cfg.bias_learn_max_nis)
            if not rest:
                unsure |= np.abs(over) > cfg.bias_learn_max_overpotential_v
                if not cfg.bias_learn_under_load:
                    unsure[:] = True
            K[unsure, self._b] = 0.0
        x += K * innov[:, None]
        # Joseph-equivalent form, valid for the suboptimal gain above as well.
        KPH = K[:, :, None] * PH[:, None, :]
        P += S[:, None, None] * (K[:, :, None] * K[:, None, :]) - KPH - KPH.transpose(0, 2, 1)
        P[:] = 0.5 * (P + P.transpose(0, 2, 1))
        d = self._diag
        P[:, d, d] = np.maximum(P[:, d, d], 1e-12)
        np.clip(x[:, 0], *cfg.soc_bounds, out=x[:, 0])

    def _track_rest(self, dt: float, i_now: FloatArray, v: FloatArray, ok: BoolArray, temp_c: ArrayLike) -> None:
        cfg = self.config
        offset = float(np.mean(self.x[:, self._b])) if cfg.bias else 0.0
        if np.max(np.abs(i_now - offset)) > cfg.rest_current_a:
            self._rest_s = 0.0
            self._rest_recalibrated = False
            self._rest_clear()
            return
        w = min(1.0, dt / cfg.rest_average_s)
        if self._rest_s == 0.0:
            self._rest_v = np.where(ok, v, np.nan)
        else:
            have = ok & np.isfinite(self._rest_v)
            self._rest_v = np.where(have, self._rest_v + w * (v - self._rest_v), np.where(ok, v, self._rest_v))
        if cfg.rest_reinit_s > 0.0 and not self._rest_reinit_done:
            # The rest's voltage less the RC voltages the model still expects: plain
            # mean since the rest began and its recent (rest_average_s) trend.
            relaxed = v - self.x[:, self._rc].sum(axis=1)
            add = np.where(ok, relaxed, 0.0)
            first = ok & (self._rest_n == 0)
            self._rest_sum += add
            self._rest_n += ok
            self._rest_ema = np.where(first, relaxed, np.where(ok, self._rest_ema + w * (relaxed - self._rest_ema),
                                                               self._rest_ema))
        self._rest_s += dt
        if cfg.rest_reinit_s > 0.0 and not self._rest_reinit_done and self._rest_s >= cfg.rest_reinit_s:
            self._reinit_at_rest(temp_c)
            self._rest_reinit_done = True
        if not self._rest_recalibrated and self._rest_s >= cfg.rest_time_s:
            self.recalibrate_at_rest(self._rest_v, temp_c)
            self._rest_recalibrated = True

    def _rest_clear(self) -> None:
        n = self.n_cells
        self._rest_sum = np.zeros(n)
        self._rest_n = np.zeros(n)
        self._rest_ema = np.zeros(n)
        self._rest_reinit_done = False

    def _reinit_at_rest(self, temp_c: ArrayLike) -> None:
        """Cells still far off (averaged NIS above ``reinit_nis``) restart from the rest.

        The SoC is the OCV inverse of the voltage averaged since the rest began (less the
        modelled RC voltages and surface excess), with the variance that average supports:
        ``voltage_noise_v**2 / n`` plus the squared gap between the mean and the recent
        trend (a voltage still relaxing), over the local OCV slope. The RC voltages, the
        offset and their covariance stay; the innovation average restarts at 1.
        """
        cfg = self.config
        sel = (self.nis > cfg.reinit_nis) & (self._rest_n >= 2)
        if not sel.any():
            return
        n = self._rest_n[sel]
        mean = self._rest_sum[sel] / n
        var_v = cfg.voltage_noise_v**2 / n + (self._rest_ema[sel] - mean) ** 2
        temp = np.broadcast_to(np.asarray(temp_c, dtype=np.float64), (self.n_cells,))[sel]
        surface = self.cell.ocv.soc_at(mean, temp)
        excess = self.diffusion[sel].sum(axis=1) if self._diff_tau.size else 0.0
        slope = np.maximum(self.cell.ocv.slope(surface), 1e-3)
        std = np.clip(np.sqrt(var_v) / slope, 0.005, cfg.init_soc_std)
        x, P = self.x[sel], self.P[sel]
        x[:, 0] = np.clip(surface - excess, *cfg.soc_bounds)
        P[:, 0, :] = 0.0
        P[:, :, 0] = 0.0
        P[:, 0, 0] = std**2
        self.x[sel] = x
        self.P[sel] = P
        self.nis[sel] = 1.0
        self.reinits += 1

    def recalibrate_at_rest(self, rested_voltage_v: ArrayLike, temp_c: ArrayLike = 25.0) -> None:
        """Fuse rested cell voltages as OCV measurements (``rest_voltage_noise_v``).

        Called automatically once per detected rest; the daemon may call it after a
        known rest (e.g. the contactors were open).
        """
        v = np.asarray(rested_voltage_v, dtype=np.float64)
        self._update(v, np.isfinite(v), 0.0, temp_c, self.config.rest_voltage_noise_v, rest=True)
        self.recalibrations += 1

    # ---------------------------------------------------------------- outputs

    @property
    def soc(self) -> FloatArray:
        """Per-cell SoC estimate (fraction, clipped to [0, 1])."""
        return np.clip(self.x[:, 0], 0.0, 1.0)

    @property
    def soc_std(self) -> FloatArray:
        """Per-cell SoC standard deviation (fraction)."""
        return np.sqrt(self.P[:, 0, 0])

    @property
    def current_offset_a(self) -> float:
        """Estimated current-sensor offset in A (mean over cells; 0 without the bias state)."""
        return float(np.mean(self.x[:, self._b])) if self.config.bias else 0.0

    @property
    def rest_s(self) -> float:
        """Seconds the pack has been at rest (0 under load)."""
        return self._rest_s

    def pack(self) -> PackSoc:
        """Pack SoC, SoE and min/max cell SoC (see :class:`PackSoc`)."""
        return pack_soc(self.cell, self.soc, self.params.capacity_ah)

    # ----------------------------------------------------------- parameters

    def set_params(self, params: EcmParams) -> None:
        """Use new ECM parameters; a different RC branch count resizes the state."""
        if params.n_cells != self.n_cells:
            raise ValueError(f"parameters for {params.n_cells} cells, filter has {self.n_cells}")
        if params.n_rc != self.n_rc:
            old_x, old_p, old_n = self.x, self.P, self.n_rc
            self._alloc(params.n_rc)
            k = min(old_n, self.n_rc)
            keep_old = [0, *range(1, 1 + k)] + ([old_n + 1] if self.config.bias else [])
            keep_new = [0, *range(1, 1 + k)] + ([self._b] if self.config.bias else [])
            self.x = np.zeros((self.n_cells, self.m))
            self.x[:, keep_new] = old_x[:, keep_old]
            self.P = np.zeros((self.n_cells, self.m, self.m))
            self.P[:, self._diag, self._diag] = (0.1 * self.config.init_rc_std_v) ** 2
            self.P[np.ix_(np.arange(self.n_cells), keep_new, keep_new)] = old_p[np.ix_(
                np.arange(self.n_cells), keep_old, keep_old)]
        self.params = params.copy()

    # ---------------------------------------------------------------- persist

    def export_state(self) -> dict[str, Any]:
        """Plain-data snapshot (lists and numbers) of everything the filter has learnt."""
        return {
            "version": STATE_VERSION,
            "n_cells": self.n_cells,
            "n_rc": self.n_rc,
            "bias": self.config.bias,
            "x": self.x.tolist(),
            "P": self.P.tolist(),
            "params": self.params.to_dict(),
            "nis": self.nis.tolist(),
            "diffusion": self.diffusion.tolist(),
            "i_prev": self._i_prev.tolist() if np.all(np.isfinite(self._i_prev)) else None,
            "rest_s": self._rest_s,
            "rest_v": [None if not np.isfinite(v) else float(v) for v in self._rest_v],
            "rest_recalibrated": self._rest_recalibrated,
            "rest_sum": self._rest_sum.tolist(),
            "rest_n": self._rest_n.tolist(),
            "rest_ema": self._rest_ema.tolist(),
            "rest_reinit_done": self._rest_reinit_done,
        }

    def import_state(self, state: Mapping[str, Any], offline_s: float = 0.0) -> None:
        """Restore :meth:`export_state` output; ``offline_s`` widens the SoC variance for
        the time the gateway did not watch (self-discharge, unseen currents).

        Raises ValueError (state unchanged) when the snapshot does not fit this filter.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("n_cells") != self.n_cells or bool(state.get("bias")) != self.config.bias:
            raise ValueError("state was saved for a different cell count or bias setting")
        params = EcmParams.from_dict(state["params"]) if "params" in state else self.params
        if params.n_cells != self.n_cells:
            raise ValueError("state parameters are for a different cell count")
        m = 1 + params.n_rc + (1 if self.config.bias else 0)
        x = np.asarray(state["x"], dtype=np.float64)
        P = np.asarray(state["P"], dtype=np.float64)
        if x.shape != (self.n_cells, m) or P.shape != (self.n_cells, m, m):
            raise ValueError("state arrays have the wrong shape")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(P))):
            raise ValueError("state holds non-finite values")
        if np.any(np.diagonal(P, axis1=1, axis2=2) < 0.0):
            raise ValueError("state covariance has negative variances")
        i_prev = state.get("i_prev")
        prev = np.full(self.n_cells, np.nan) if i_prev is None else np.asarray(i_prev, dtype=np.float64)
        if prev.shape not in ((), (self.n_cells,)):  # one value: saved before currents were per cell
            raise ValueError("state arrays have the wrong shape")
        nis = np.asarray(state.get("nis", self.nis), dtype=np.float64)
        rest_v = np.asarray([np.nan if v is None else v for v in state.get("rest_v", [None] * self.n_cells)],
                            dtype=np.float64)
        if nis.shape != (self.n_cells,) or rest_v.shape != (self.n_cells,):
            raise ValueError("state arrays have the wrong shape")
        diffusion = np.asarray(state.get("diffusion", []), dtype=np.float64)
        if diffusion.shape != self.diffusion.shape or not np.all(np.isfinite(diffusion)):
            # Saved without (or for another cell model): the surface excess relaxes
            # within minutes, so starting it at rest costs little.
            diffusion = np.zeros_like(self.diffusion)
        self.params = params
        self._alloc(params.n_rc)
        self.x = x.copy()
        self.P = P.copy()
        self.nis = nis.copy()
        offline = max(0.0, float(offline_s))
        self.P[:, 0, 0] += (self.config.self_discharge_std_per_day * offline / 86400.0) ** 2
        self.diffusion = diffusion * np.exp(-offline / np.maximum(self._diff_tau, 1e-9))  # relaxed meanwhile
        # Continue exactly where the snapshot stopped, unless time has passed since.
        fresh = offline == 0.0
        self._i_prev = self._per_cell(prev if fresh else np.nan).copy()
        self._rest_s = float(state.get("rest_s", 0.0)) if fresh else 0.0
        self._rest_v = rest_v
        self._rest_recalibrated = bool(state.get("rest_recalibrated", False)) and fresh
        self._rest_clear()
        acc = [np.asarray(state.get(k, []), dtype=np.float64) for k in ("rest_sum", "rest_n", "rest_ema")]
        if fresh and all(a.shape == (self.n_cells,) and np.all(np.isfinite(a)) for a in acc):
            self._rest_sum, self._rest_n, self._rest_ema = acc
            self._rest_reinit_done = bool(state.get("rest_reinit_done", False))
        elif self._rest_s > 0.0:  # the rest's mean is lost: no restart from it
            self._rest_reinit_done = True
