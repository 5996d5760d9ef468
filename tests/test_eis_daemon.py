"""EIS through the running daemon: the simulated module on the pack bus, sweeps from the CLI,
results in the image and the CLI, aborts on protection events, refusals; and, in-process, the
service's publication of spectra and the cloud's sweep command."""

from __future__ import annotations

import json
import math
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import can
import numpy as np
import pytest
from anyio.from_thread import BlockingPortal
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.eis_driver import Phase, SweepSettings, load_eis_dbc
from drivers.sim_eis import SimEis, calibration_set
from estimators.sot import SotCalibration, SotEstimate, calibrate_sot
from estimators.spectrum import EisSpectrum
from gateway.cli import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, main
from gateway.control import ControlServer
from gateway.daemon import Gateway
from gateway.eis import EisResult, EisSection, EisService, eis_families, eis_slots
from gateway.events import Event, Kind, Level, Recorder
from gateway.image import ProcessImage, Quality
from gateway.nyquist import _Canvas, write_png
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


SMALL = Layout(modules_per_string=1, cells_per_module=4)


def _service(layout: Layout, records: list[dict[str, Any]] | None = None, *,
             section: EisSection | None = None,
             send: Callable[[list[can.Message]], object] = lambda frames: None,
             calibration: SotCalibration | None = None) -> EisService:
    """The service on its own image, the pack at rest (0 A, steady: sweeps may start)."""
    img = ProcessImage({"cell.voltage": (layout.cells,), **eis_families(layout)}, ["pack.current"])
    for name, (period, signals) in eis_slots(layout).items():
        slot = img.add_slot(name, period)
        for sig in signals:
            img.bind(img.index(sig), slot)
    current = img.index("pack.current")
    img.bind(current, img.add_slot("pack", None))
    img.freeze()
    img.value[current] = 0.0
    img.rx_mono[img.slot_of[current]] = time.monotonic()
    img.seq[img.slot_of[current]] += 1
    return EisService(section or EisSection(enabled=True), layout, img, Recorder(), send, soc=lambda: None,
                      record=None if records is None else records.append, calibration=calibration)


def _step_until(svc: EisService, done: Callable[[], bool], protection: bool = False) -> None:
    """Service ticks until ``done()`` (the bound only guards against a hang: nothing is timed)."""
    async def run() -> None:
        for _ in range(3000):
            await svc.step(protection)
            if done():
                return
            await anyio.sleep(0.01)

    anyio.run(run)
    assert done()


class _Module:
    """The service and the simulated module wired to each other; the module ticks 10 times per
    service tick (a Status frame each), slowed so that a sweep runs for many ticks."""

    def __init__(self, calibration: SotCalibration | None = None) -> None:
        self.sent: list[can.Message] = []
        self.svc = _service(SMALL, section=EisSection(enabled=True, stable_window_s=0.0), send=self._to_module,
                            calibration=calibration)
        self.sim = SimEis(self.svc.on_frame, cells=4, modules=1, cells_per_module=4, speed=50.0)
        self.log: list[str] = []

    def _to_module(self, frames: list[can.Message]) -> None:
        for m in frames:
            self.sent.append(m)
            if m.arbitration_id == 0x300:
                self.log.append("abort")
            self.sim.receive(m)

    def step(self, n: int = 1, protection: bool = False) -> None:
        async def run() -> None:
            for _ in range(n):
                await self.svc.step(protection)
                for _ in range(10):
                    self.sim.tick()

        anyio.run(run)

    def running(self, target: str) -> None:
        self.svc.request(target)
        for _ in range(50):
            self.step()
            if self.svc.driver.phase is Phase.RUNNING:
                return
        raise AssertionError(f"the sweep of {target} did not start")

    def aborts(self) -> list[tuple[int, int]]:
        """(SweepId, AbortReason) of each abort sent."""
        db = load_eis_dbc()
        return [(int(v["SweepId"]), int(v["AbortReason"])) for v in
                (db.decode_message(0x300, m.data, decode_choices=False) for m in self.sent if m.arbitration_id == 0x300)]


def _finished(target: str, temperature_c: float = 25.0, sensor_c: float = 25.0, sweep_id: int = 250) -> EisSpectrum:
    """A spectrum as a finished sweep leaves it (measured at ``temperature_c``, the sensor reading ``sensor_c``)."""
    grid = SweepSettings().grid()
    z = SimEis(lambda m: None).true_impedance(0, 0, grid, temperature_c, 0.5)
    return EisSpectrum(grid, z.real, z.imag, temperature_c=sensor_c, soc=0.5, target=target, sweep_id=sweep_id)


def test_a_spectrum_whose_analysis_fails_is_still_published_and_ends_its_sweep() -> None:
    """One spectrum the analysis cannot take (here a NaN the module reported) is published as
    invalid with the error; it does not cost its own record and outcome, nor the next spectrum's."""
    records: list[dict[str, Any]] = []
    svc = _service(SMALL, records)
    f = SimEis(lambda m: None).model.impedance  # a real cell's spectrum
    grid = np.logspace(3, -1, 41)
    z = f(grid, 25.0, 0.5)
    bad_re = z.real.copy()
    bad_re[10] = math.nan
    bad = EisSpectrum(grid, bad_re, z.imag, target="cell[2]", sweep_id=8)
    good = EisSpectrum(grid, z.real, z.imag, target="cell[1]", sweep_id=7)
    svc.driver._records.extend([bad, good])  # as if both sweeps had completed in the same tick
    svc.driver._sweep_handles.update({8: 1, 7: 2})
    _step_until(svc, lambda: len(svc.outcomes) == 2)
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


# -- the service: analysis off the tick path, its own events, the image ---------------------------


def test_an_abort_never_waits_for_an_analysis() -> None:
    """A protection event while the previous spectrum is being analysed (up to a second for a
    long CPE fit): the running sweep is aborted on the next tick, not after the analysis."""
    mod = _Module()
    mod.running("cell[1]")
    gate = threading.Event()
    analyse = mod.svc.analyse

    def gated(sp: EisSpectrum) -> EisResult:
        mod.log.append("analysis starts")
        gate.wait(timeout=10.0)  # the bound only keeps a failing run from hanging
        mod.log.append("analysis ends")
        return analyse(sp)

    mod.svc.analyse = gated  # type: ignore[method-assign]
    mod.svc.driver._records.append(_finished("cell[0]"))  # the previous sweep, just completed
    mod.step()
    mod.step(protection=True)
    gate.set()
    _step_until(mod.svc, lambda: mod.svc.analysed == 1)
    assert mod.log.index("abort") < mod.log.index("analysis ends")
    assert mod.aborts() == [(0, 2)] and "protection" in mod.svc.driver.status()["last_failure"]
    assert mod.svc.last is not None and mod.svc.last.spectrum.target == "cell[0]"


@pytest.fixture(scope="module")
def small_calibration() -> SotCalibration:
    spectra, temps, socs, groups = calibration_set("NMC", cells=2, temperatures_c=(0, 10, 20, 30, 40, 45),
                                                   socs=(0.3, 0.5, 0.7), frequency_hz=SweepSettings().grid())
    return calibrate_sot(spectra, temps, socs, chemistry="NMC", groups=groups)


def test_the_services_own_sot_warning_does_not_abort_the_next_sweep(small_calibration: SotCalibration) -> None:
    """The sot_mismatch warning goes out through the recorder that also brings P0's protection
    events: only those abort a sweep."""
    mod = _Module(small_calibration)
    events: list[Event] = []
    mod.svc.recorder.subscribers.append(events.append)
    mod.running("cell[1]")
    mod.svc.driver._records.append(_finished("cell[0]", temperature_c=40.0, sensor_c=25.0))  # a sensor fault
    _step_until(mod.svc, lambda: mod.svc.analysed == 1)
    mod.step(3)
    assert [(e.name, e.active) for e in events] == [("sot_mismatch", True)]
    assert mod.aborts() == [] and mod.svc.driver.phase is Phase.RUNNING
    mod.svc.recorder(Event(Kind.LIMIT, "cell_voltage_high", Level.RSL, True, 3, 4.19, 4.18))  # as P0 forwards it
    mod.step()
    assert mod.aborts() == [(0, 2)]


def test_an_estimate_that_failed_is_not_written_as_valid() -> None:
    """An SoT that came out NaN must not reach the image as a valid value (the fit beside it may)."""
    svc = _service(SMALL)
    result = svc.analyse(_finished("cell[1]"))
    assert result.analysis.valid and result.analysis.fit is not None
    nan_sot = SotEstimate(math.nan, math.nan, True, 0.5)
    svc.publish(EisResult(replace(result.analysis, sot=nan_sot), result.analysed_at))
    img, now = svc.image, time.monotonic()
    assert img.valid[img.index("cell[1].sot")] == 0 and img.quality_of(img.index("cell[1].sot"), now) == Quality.INVALID
    assert img.quality_of(img.index("cell[1].eis_r[0]"), now) == Quality.GOOD


# -- the CLI against the daemon's handlers, in-process ----------------------------------------------


@contextmanager
def _served(svc: EisService, tmp_path: Path) -> Iterator[tuple[str, BlockingPortal]]:
    """The daemon's eis.* handlers for ``svc`` on a control socket; the portal runs the service's loop."""
    gw: Any = SimpleNamespace(eis=svc, _eis=lambda: svc)
    handlers = {f"eis.{name}": (lambda args, fn=fn: fn(gw, args)) for name, fn in (
        ("sweep", Gateway.cmd_eis_sweep), ("status", Gateway.cmd_eis_status), ("cancel", Gateway.cmd_eis_cancel),
        ("show", Gateway.cmd_eis_show))}
    server = ControlServer(tmp_path / "c.sock", handlers, {})
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(server.serve)
        yield str(server.path), portal
        future.cancel()


@pytest.mark.parametrize("outcome_lost", [False, True])
def test_eis_sweep_ends_when_its_queued_request_is_cancelled(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             outcome_lost: bool) -> None:
    """`bmsgw eis sweep` follows its request; another operator's `bmsgw eis cancel` drops it from the
    queue. The sweep command must end (and fail), also when the daemon has forgotten the outcome."""
    svc = _service(SMALL)  # a 30 s stability window: the request stays queued
    rc: list[int] = []
    with _served(svc, tmp_path) as (sock, portal):
        cli = threading.Thread(target=lambda: rc.append(main(["eis", "sweep", "--cell", "1", "--interval", "0.05",
                                                              "--socket", sock])), daemon=True)
        cli.start()
        wait_for(lambda: portal.call(svc.driver.status)["queued"] == ["cell[1]"], 20, "the sweep to be queued")
        if outcome_lost:  # e.g. a hundred later sweeps ended since: the daemon no longer knows it

            def cancel_and_forget() -> None:
                svc.cancel(None)
                svc.outcomes.clear()

            portal.call(cancel_and_forget)
        else:
            assert main(["eis", "cancel", "--socket", sock]) == EXIT_OK
        cli.join(30.0)  # the bound only keeps a failing run from hanging
        assert not cli.is_alive()
    out = capsys.readouterr().out
    assert rc == [EXIT_FAIL]
    assert ("cell[1]: ended without an outcome" if outcome_lost else "cell[1]: cancelled by operator") in out


def test_eis_show_png_to_an_unwritable_path_is_a_one_line_error(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    svc = _service(SMALL)
    svc.publish(svc.analyse(_finished("cell[1]")))
    png = tmp_path / "missing" / "n.png"
    with _served(svc, tmp_path) as (sock, _portal):
        rc = main(["eis", "show", "--cell", "1", "--png", str(png), "--socket", sock])
    err = capsys.readouterr().err
    assert rc == EXIT_CONFIG
    assert err == f"bmsgw: {png}: No such file or directory\n"


# -- the Nyquist PNG ----------------------------------------------------------------------------------


def _png_pixels(path: Path) -> np.ndarray:
    """The RGB pixels of a PNG as write_png makes it (one IDAT, filter 0 on every row)."""
    data = path.read_bytes()
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    start = data.index(b"IDAT") + 4
    raw = zlib.decompress(data[start:start + int.from_bytes(data[start - 8:start - 4], "big")])
    return np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)[:, 1:].reshape(h, w, 3)


def test_the_fit_line_stays_inside_the_plot(tmp_path: Path) -> None:
    """A fitted point far below the frame (an inductive tail): its line ends at the plot's edge."""
    re_, im = [1e-3, 1.5e-3, 2e-3], [-1e-4, -3e-4, -1e-4]
    png = tmp_path / "n.png"
    write_png(png, re_, im, [0.9e-3, *re_], [0.05, *im])  # 50 mOhm inductive: 80 frames below
    rows, cols = np.nonzero(np.all(_png_pixels(png) == (200, 30, 30), axis=2))
    assert rows.size and rows.min() >= 40 and rows.max() <= 540 - 60 and cols.min() >= 90 and cols.max() <= 720 - 20


class _CountingCanvas(_Canvas):
    dots = 0

    def dot(self, x: float, y: float, color: tuple[int, int, int], r: int = 0) -> None:
        self.dots += 1
        super().dot(x, y, color, r)


coordinate = st.floats(-1e5, 1e5)


@settings(max_examples=60, deadline=None)
@given(x0=coordinate, y0=coordinate, x1=coordinate, y1=coordinate)
def test_a_line_costs_no_more_than_one_across_the_canvas(x0: float, y0: float, x1: float, y1: float) -> None:
    cv = _CountingCanvas(120, 80)
    cv.line(x0, y0, x1, y1, (0, 0, 0))
    assert cv.dots <= max(cv.w, cv.h) + 1
    for x, y in ((x0, y0), (x1, y1)):  # an end inside is drawn
        if 0 <= x <= cv.w - 1 and 0 <= y <= cv.h - 1:
            assert tuple(cv.px[int(round(y)), int(round(x))]) == (0, 0, 0)
