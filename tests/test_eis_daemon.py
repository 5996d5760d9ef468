"""EIS through the running daemon: the simulated module on the pack bus, sweeps from the CLI,
results in the image and the CLI, aborts on protection events, refusals; and, in-process, the
service's publication of spectra and the cloud's sweep command."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import numpy as np
import pytest

from drivers.sim_eis import SimEis
from estimators.spectrum import EisSpectrum
from gateway.daemon import Gateway
from gateway.eis import EisSection, EisService, eis_families, eis_slots
from gateway.events import Recorder
from gateway.image import ProcessImage
from gateway.pipeline import Layout
from tests.procs import ROOT, Daemon, wait_for


def night_sim_text() -> str:
    """The shipped sim config at night (the pack rests: sweeps may run), the module 200x faster."""
    text = (ROOT / "gateway/configs/sim.toml").read_text()
    text = text.replace("start_hour = 12.0", "start_hour = 2.0").replace("eis_speed = 10.0", "eis_speed = 200.0")
    return text.replace('periodic = "cells"', 'periodic = "off"\nstable_window_s = 2.0')


def eis_config(tmp: Path, extra: str = "") -> Path:
    cfg = tmp / "bmsgw.toml"
    cfg.write_text(night_sim_text() + "\n[metrics]\nport = 0\n" + extra)
    return cfg


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("eis")
    d = Daemon(tmp, "--sim", "--config", str(eis_config(tmp)))
    wait_for(lambda: d.json("status")["estimates"]["initialised"], 30, "the estimators (SoC for SoT)")
    wait_for(lambda: d.json("eis", "status")["sot_calibration"], 30, "the simulated module's SoT calibration")
    yield d
    assert d.stop() == 0


@pytest.mark.slow
def test_sweep_from_the_cli_feeds_image_table_plot_and_png(gw: Daemon, tmp_path: Path) -> None:
    r = gw.cli("eis", "sweep", "--cell", "5", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "/61]" in r.stdout or "/61" in r.stdout  # the progress bar
    assert "cell[5]: measured" in r.stdout
    res = gw.json("eis", "show", "--cell", "5")
    assert res["target"] == "cell[5]" and res["points"] == 61 and res["valid"]
    # at rest the cell's temperature is its sensors' (the sim's truth is close): SoT must agree
    assert abs(res["sot_c"] - res["temperature_c"]) < 2.5, res
    assert not res["mismatch"]["warning"]
    params = res["fit"]["params"]
    assert 0.0002 < params["R0"] < 0.005 and all(params[f"R{k}"] > 0 and params[f"C{k}"] > 0 for k in range(1, 5))
    assert all(0.0 < res["fit"]["rel_sd"][k] < 1.0 for k in params if k[0] in "RC")  # each with its uncertainty
    assert 0.0 < res["soc"] < 1.0 and 2.5 < res["voltage_v"] < 4.3
    # the process image carries SoT and the fit, stamped with the sweep's time
    rows = {row["name"]: row for row in gw.json("signals", "cell[5].*")}
    assert rows["cell[5].sot"]["quality"] == "good"
    assert rows["cell[5].sot"]["value"] == pytest.approx(res["sot_c"])
    assert rows["cell[5].eis_r[0]"]["value"] == pytest.approx(params["R0"])
    assert rows["cell[5].sot"]["timestamp"] == pytest.approx(res["time"])
    assert gw.json("signals", "cell[6].sot")[0]["quality"] == "stale"  # never measured
    # the technician's view: table, verdict, Nyquist plot in the terminal and as a PNG
    png = tmp_path / "nyquist.png"
    r = gw.cli("eis", "show", "--cell", "5", "--png", str(png))
    assert r.returncode == 0, r.stderr
    assert "valid (Kramers-Kronig)" in r.stdout and "SoT" in r.stdout and "Re Z (mOhm)" in r.stdout
    assert re.search(r"C4 +[0-9.e+-]+ F +\+-[0-9.]+ %", r.stdout), r.stdout
    assert r.stdout.count(" o") + r.stdout.count("o ") > 10  # plotted points
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    table = gw.cli("eis", "show", "--all")
    assert table.returncode == 0 and "cell[5]" in table.stdout


@pytest.mark.slow
def test_requests_for_targets_the_site_lacks_are_refused(gw: Daemon) -> None:
    r = gw.cli("eis", "sweep", "--cell", "224")
    assert r.returncode == 4 and "224 cells" in r.stderr
    r = gw.cli("eis", "show", "--module", "3")
    assert r.returncode == 4 and "no spectrum of module[3]" in r.stderr


@pytest.mark.slow
def test_a_protection_event_aborts_the_running_sweep(gw: Daemon) -> None:
    # down to 1 mHz: the last points take seconds each even at 200x
    queued = json.loads(gw.cli("eis", "sweep", "--module", "2", "--f-stop", "0.001", "--no-wait", "--json").stdout)
    wait_for(lambda: gw.json("eis", "status")["points_received"] > 3, 60, "the module sweep to be under way")
    # a module falls silent: protection reports stale data, which must end the sweep at once
    assert gw.cli("sim", "fault", "silent", "--target", "9").returncode == 0
    try:
        st = wait_for(lambda: (lambda s: s if s["last_failure"] else None)(gw.json("eis", "status")), 30,
                      "the abort")
        assert "protection" in st["last_failure"] and st["target"] is None
        assert all(r["target"] != "module[2]" for r in gw.json("eis", "show", "--all"))
    finally:
        gw.cli("sim", "fault", "clear")
        gw.cli("eis", "cancel")
    assert queued["handle"] > 0


# -- in-process: the service and the daemon's command handler, no daemon -------------------------


def _service(layout: Layout, records: list[dict[str, Any]] | None = None) -> EisService:
    img = ProcessImage({"cell.voltage": (layout.cells,), **eis_families(layout)}, ["pack.current"])
    for name, (period, signals) in eis_slots(layout).items():
        slot = img.add_slot(name, period)
        for sig in signals:
            img.bind(img.index(sig), slot)
    img.freeze()
    return EisService(EisSection(enabled=True), layout, img, Recorder(), lambda frames: None, soc=lambda: None,
                      record=None if records is None else records.append)


def test_a_spectrum_whose_analysis_fails_is_still_published_and_ends_its_sweep() -> None:
    """One spectrum the analysis cannot take (here a NaN the module reported) is published as
    invalid with the error; it does not cost its own record and outcome, nor the next spectrum's."""
    records: list[dict[str, Any]] = []
    svc = _service(Layout(modules_per_string=1, cells_per_module=4), records)
    f = SimEis(lambda m: None).model.impedance  # a real cell's spectrum
    grid = np.logspace(3, -1, 41)
    z = f(grid, 25.0, 0.5)
    bad_re = z.real.copy()
    bad_re[10] = math.nan
    bad = EisSpectrum(grid, bad_re, z.imag, target="cell[2]", sweep_id=8)
    good = EisSpectrum(grid, z.real, z.imag, target="cell[1]", sweep_id=7)
    svc.driver._records.extend([bad, good])  # as if both sweeps had completed in the same tick
    svc._handle_of.update({8: 1, 7: 2})
    anyio.run(svc.step, False)
    assert [r["target"] for r in records] == ["cell[2]", "cell[1]"]
    assert not records[0]["valid"] and "analysis failed" in records[0]["kk"]["reason"]
    assert records[1]["valid"]
    assert svc.outcomes[1]["ok"] and not svc.outcomes[1]["valid"] and "analysis failed" in svc.outcomes[1]["reason"]
    assert svc.outcomes[2] == {"ok": True, "target": "cell[1]", "valid": True, "reason": "measured"}
    assert svc.status()["analysed"] == 2 and svc.status()["invalid"] == 1
    assert svc.show("cell[2]")["valid"] is False


def test_a_cloud_sweep_command_is_queued_whole_or_not_at_all() -> None:
    """start_eis_sweep may name more targets than the EIS queue holds (or one it refuses): the
    answer "rejected" must mean nothing was queued."""
    svc = _service(Layout())  # 224 cells: the cloud's validator lets all of them through
    gw: Any = SimpleNamespace(eis=svc)
    gw._eis_sweep = lambda target, **o: Gateway._eis_sweep(gw, target, **o)
    args: dict[str, Any] = {"cells": list(range(100)), "modules": None, "f_min_hz": 0.1, "f_max_hz": 1000.0,
                            "points_per_decade": 10, "amplitude_a": None}
    ok, reason = Gateway._remote_eis_sweep(gw, args)
    assert not ok and "queue" in reason
    assert svc.driver.status()["queued"] == []
    ok, reason = Gateway._remote_eis_sweep(gw, {**args, "cells": [0, 1, 224]})  # the last one the site lacks
    assert not ok and "cell[224]" in reason
    assert svc.driver.status()["queued"] == []
    ok, reason = Gateway._remote_eis_sweep(gw, {**args, "cells": [0, 1], "modules": [3]})
    assert ok and svc.driver.status()["queued"] == ["cell[0]", "cell[1]", "module[3]"]
