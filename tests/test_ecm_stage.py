"""The cloud's set_ecm_parameters through its argument check and the daemon's EcmStage (docs/cloud-format.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudlink.commands import Context, check_ecm
from gateway.daemon import EcmStage
from gateway.estimation import Estimation
from tests.test_estimation import site

FIT = {"r0_ohm": 0.0018, "r_ohm": [0.0007, 0.0009], "c_f": [15000.0, 300000.0]}


def stage(tmp: Path) -> tuple[EcmStage, Estimation]:
    est, _ = site(tmp)
    return EcmStage(est), est


def checked(est: Estimation, **args: Any) -> dict[str, Any]:
    return check_ecm(FIT | args, Context(cells=est.n_cells, modules=2))


def test_without_cells_every_cell_is_updated(tmp_path: Path) -> None:
    """`cells` is optional: absent means every cell (E6)."""
    ecm, est = stage(tmp_path)
    before = est.ekf.params.r0_ohm.copy()
    ok, reason = ecm.apply(checked(est))
    assert ok, reason
    assert str(est.n_cells) in reason
    r0 = est.ekf.params.r0_ohm
    assert (r0 != before).all() and np.ptp(r0) == 0.0
    ok, reason = ecm.apply(checked(est, cells=[2], r0_ohm=0.0016))
    assert ok, reason
    assert np.flatnonzero(est.ekf.params.r0_ohm != r0).tolist() == [2]


@pytest.mark.parametrize("given", ["soc", "ocv_v"])
def test_soc_zero_is_the_operating_point_it_says(tmp_path: Path, given: str) -> None:
    """SoC 0.0 is not "no SoC" (E7): the values are referred from the empty cell's point, not from SoC 0.5."""
    ecm, est = stage(tmp_path)
    point = {"soc": 0.0} if given == "soc" else {"ocv_v": float(est.cell.ocv.ocv(0.0))}
    ok, reason = ecm.apply(checked(est, cells=[0], **point))
    assert ok, reason
    expected = FIT["r0_ohm"] / float(est.cell.soc_factors(0.0)[0])
    assert est.cell.soc_factors(0.0)[0] != est.cell.soc_factors(0.5)[0]  # else this test would prove nothing
    assert est.ekf.params.r0_ohm[0] == pytest.approx(expected, rel=1e-3)


def test_ocv_v_wins_over_soc_and_neither_means_mid_soc(tmp_path: Path) -> None:
    """Both given: the fit's voltage point is used (docs/cloud-format.md); neither: SoC 0.5."""
    ecm, est = stage(tmp_path)
    ok, reason = ecm.apply(checked(est, cells=[0], ocv_v=float(est.cell.ocv.ocv(0.0)), soc=0.9))
    assert ok, reason
    ok, reason = ecm.apply(checked(est, cells=[1]))
    assert ok, reason
    r0 = est.ekf.params.r0_ohm
    assert r0[0] == pytest.approx(FIT["r0_ohm"] / float(est.cell.soc_factors(0.0)[0]), rel=1e-3)
    assert r0[1] == pytest.approx(FIT["r0_ohm"] / float(est.cell.soc_factors(0.5)[0]), rel=1e-3)
