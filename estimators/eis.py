"""One spectrum's analysis: lin-KK first; only a valid spectrum feeds SoT and the fits.

The parts live in modules of their own: :mod:`estimators.spectrum` (the record),
:mod:`estimators.kk` (lin-KK), :mod:`estimators.drt` (DRT), :mod:`estimators.eis_fit`
(equivalent-circuit fit) and :mod:`estimators.sot` (temperature from impedance).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .drt import DrtResult, drt
from .eis_fit import EcmFit, fit_ecm
from .kk import KKResult, lin_kk
from .sot import SotCalibration, SotEstimate, SotMismatch, estimate_temperature, sot_mismatch
from .spectrum import EisSpectrum

__all__ = ["EisAnalysis", "analyze_spectrum"]


@dataclass(frozen=True, eq=False)
class EisAnalysis:
    """KK verdict always; SoT, mismatch, DRT and fit only for a valid spectrum."""

    spectrum: EisSpectrum
    kk: KKResult
    sot: SotEstimate | None = None
    mismatch: SotMismatch | None = None
    drt: DrtResult | None = None
    fit: EcmFit | None = None

    @property
    def valid(self) -> bool:
        return self.kk.valid

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "kk": self.kk.to_dict(),
                "sot": self.sot.to_dict() if self.sot else None,
                "mismatch": self.mismatch.to_dict() if self.mismatch else None,
                "drt": self.drt.to_dict() if self.drt else None,
                "fit": self.fit.to_dict() if self.fit else None}


def analyze_spectrum(spectrum: EisSpectrum, *, calibration: SotCalibration | None = None,
                     sensor_temperature_c: float | None = None, soc: float | None = None,
                     fit: bool = True, n_rc: int = 4, cpe: bool = False, mismatch_threshold_c: float = 4.0,
                     kk_options: Mapping[str, Any] | None = None) -> EisAnalysis:
    """Validate a spectrum (lin-KK); if valid, estimate SoT (with ``calibration``), compare it
    with ``sensor_temperature_c`` (default: the spectrum's mean sensor temperature), and fit
    the DRT and the equivalent circuit. An invalid spectrum is returned with its KK verdict only."""
    kk = lin_kk(spectrum.frequency_hz, spectrum.z, **dict(kk_options or {}))
    if not kk.valid:
        return EisAnalysis(spectrum, kk)
    d = drt(spectrum.frequency_hz, spectrum.z)
    sot = mism = None
    if calibration is not None:
        sot = estimate_temperature(spectrum, calibration, soc, drt_result=d)
        sensor = spectrum.mean_temperature_c if sensor_temperature_c is None else sensor_temperature_c
        mism = sot_mismatch(sot.temperature_c, sensor, threshold_c=mismatch_threshold_c, sigma_c=sot.sigma_c)
    ecm = None
    if fit and spectrum.n >= 2 * n_rc + 2:
        ecm = fit_ecm(spectrum.frequency_hz, spectrum.z, n_rc=n_rc, cpe=cpe, drt_result=d)
    return EisAnalysis(spectrum, kk, sot, mism, d, ecm)
