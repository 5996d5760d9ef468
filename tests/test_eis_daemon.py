"""EIS through the running daemon: the simulated module on the pack bus, sweeps from the CLI,
results in the image and the CLI, aborts on protection events, refusals."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ROOT, Daemon, wait_for

pytestmark = pytest.mark.slow


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


def test_requests_for_targets_the_site_lacks_are_refused(gw: Daemon) -> None:
    r = gw.cli("eis", "sweep", "--cell", "224")
    assert r.returncode == 4 and "224 cells" in r.stderr
    r = gw.cli("eis", "show", "--module", "3")
    assert r.returncode == 4 and "no spectrum of module[3]" in r.stderr


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
