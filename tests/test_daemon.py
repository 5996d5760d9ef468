"""The daemon and the CLI against it: real processes, a real control socket, real CAN traffic."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ROOT, Daemon, SimServer, bmsgw_cmd, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("sim"), "--sim")
    yield d
    assert d.stop() == 0, d.output()
    assert not d.socket.exists(), "the control socket is removed on shutdown"


def _all_cells_good(d: Daemon) -> bool:
    st = d.json("status")
    return st["pack"]["cell_voltage"]["not_good"] == 0 and st["buses"][0]["frames_per_s"] > 500


def test_control_socket_is_group_accessible_only(sim_daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(sim_daemon.socket).st_mode) == 0o660


def test_status_shows_the_live_pack(sim_daemon: Daemon) -> None:
    wait_for(lambda: _all_cells_good(sim_daemon), what="all 224 cells good")
    st = sim_daemon.json("status")
    pack = st["pack"]
    assert 224 * 3.3 < pack["voltage_v"] < 224 * 4.2
    assert pack["voltage_quality"] == "good"
    assert 3.3 < pack["cell_voltage"]["min"] <= pack["cell_voltage"]["max"] < 4.2
    assert 0 <= pack["cell_voltage"]["max_index"] < 224
    assert 15 < pack["temperature"]["min"] < 40
    bus = st["buses"][0]
    assert bus["state"] == "up" and 850 < bus["frames_per_s"] < 1000
    assert bus["decode_errors"] == {"unknown": 0, "bad_length": 0, "bad_mux": 0, "failed": 0}
    assert bus["remote_frames"] == 0 and bus["bad_frames"] == 0
    assert st["loops"][0]["runs"] >= 1
    text = sim_daemon.cli("status")
    assert text.returncode == 0
    assert "cell V" in text.stdout and "frames/s" in text.stdout and "(cell " in text.stdout
    assert "loop protection" in text.stdout and "errors 0" in text.stdout and "LOST" not in text.stdout


def test_signals_glob_text_and_json(sim_daemon: Daemon) -> None:
    rows = sim_daemon.json("signals", "cell[1?].voltage")
    assert [r["name"] for r in rows] == [f"cell[{i}].voltage" for i in range(10, 20)]
    wait_for(lambda: all(r["quality"] == "good" for r in sim_daemon.json("signals", "cell[1?].voltage")),
             what="good cells")
    text = sim_daemon.cli("signals", "pack.*")
    assert text.returncode == 0 and "pack.current" in text.stdout and "good" in text.stdout
    missing = sim_daemon.cli("signals", "nothing.here")
    assert missing.returncode == 4 and "no signal matches" in missing.stderr


def test_candump_live_decoded(sim_daemon: Daemon) -> None:
    r = sim_daemon.cli("candump", "--decode", "--count", "50", "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == 50
    assert {rec["id"] for rec in recs} & {0x100}
    assert all("signals" in rec for rec in recs)
    text = sim_daemon.cli("candump", "--count", "5")
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 5


def test_sim_fault_silent_module_goes_stale_then_recovers(sim_daemon: Daemon) -> None:
    assert sim_daemon.cli("sim", "fault", "silent", "--target", "5").returncode == 0
    wait_for(lambda: all(r["quality"] == "stale" for r in sim_daemon.json("signals", "cell[7?].voltage")
                         if 70 <= int(r["name"][5:7]) < 84), what="module 5 cells stale")
    st = sim_daemon.json("status")
    assert st["pack"]["cell_voltage"]["not_good"] == 14
    assert "module 5 silent" in st["simulator"]["faults"]
    assert sim_daemon.cli("sim", "fault", "clear").returncode == 0
    wait_for(lambda: _all_cells_good(sim_daemon), what="cells good again")
    bad = sim_daemon.cli("sim", "fault", "silent", "--target", "99")
    assert bad.returncode == 4 and "out of range" in bad.stderr
    nan = sim_daemon.cli("sim", "fault", "heating", "--target", "0", "--value", "nan")
    assert nan.returncode == 4 and "heating" in nan.stderr and "finite" in nan.stderr
    assert sim_daemon.json("status")["simulator"]["tick_errors"] == 0


def test_a_second_gateway_is_refused_before_it_touches_the_bus(sim_daemon: Daemon) -> None:
    before = sim_daemon.json("contactors")
    second = subprocess.run(bmsgw_cmd("run", "--sim"), env=sim_daemon.env, capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert second.returncode == 2, second.stderr
    assert "another gateway is running" in second.stderr and "Traceback" not in second.stderr
    after = sim_daemon.json("contactors")
    assert (after["state"], after["trips"]) == (before["state"], before["trips"])


def test_cli_arguments_and_a_daemon_that_goes_away(tmp_path: Path) -> None:
    """P0 opens the contactors even when the main process dies while P0 answers it; clients are told."""
    d = Daemon(tmp_path, "--sim")
    try:
        bad = d.cli("top", "--interval", "-1")
        assert bad.returncode == 2 and "0.05..3600" in bad.stderr
        wait_for(lambda: d.json("contactors")["state"] == "NORMAL", 30, "contactors NORMAL")
        p0 = int(Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()[0])
        dump = subprocess.Popen(bmsgw_cmd("candump"), env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT)
        assert dump.stdout is not None and dump.stdout.readline()
        os.kill(p0, signal.SIGSTOP)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(d.socket))
            s.sendall(b'{"cmd": "contactors"}\n')  # handed to P0, which answers once it runs again
            time.sleep(0.1)
            d.proc.kill()
            d.proc.wait()
        os.kill(p0, signal.SIGCONT)
        wait_for(lambda: not Path(f"/proc/{p0}").exists() or Path(f"/proc/{p0}/stat").read_text().split()[2] == "Z",
                 10, "P0 gone")
        _, err = dump.communicate(timeout=10)
        assert dump.returncode == 1 and "closed the connection" in err
    finally:
        d.stop()
    log = d.output()
    assert "stopping the CAN side" in log and "P0 process failed" not in log


def test_cli_without_daemon_says_so(tmp_path: Path) -> None:
    r = subprocess.run(bmsgw_cmd("status", "--socket", str(tmp_path / "none.sock")), capture_output=True, text=True)
    assert r.returncode == 3
    assert "not running" in r.stderr


def test_bad_config_stops_startup_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "gateway/configs/sim.toml").read_text().replace('interface = "virtual"', 'interfase = "virtual"'))
    r = subprocess.run(bmsgw_cmd("run", "--config", str(bad)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert str(bad) in r.stderr and "bus[0].interfase" in r.stderr and "did you mean 'interface'" in r.stderr


def _slcan_config(tmp: Path, url: str) -> Path:
    cfg = tmp / "slcan.toml"
    cfg.write_text((ROOT / "gateway/configs/sim.toml").read_text()
                   .replace('interface = "virtual"', 'interface = "slcan"')
                   .replace('channel = "bmsgw-sim"', f'channel = "{url}"\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0'))
    return cfg


def test_cross_process_slcan_and_reconnect_after_the_adapter_disappears(tmp_path: Path) -> None:
    sim = SimServer()
    daemon = None
    try:
        daemon = Daemon(tmp_path, "--config", str(_slcan_config(tmp_path, sim.url)))
        wait_for(lambda: _all_cells_good(daemon), what="cells decoded over slcan")
        opens = daemon.json("status")["buses"][0]["opens"]

        sim.kill()  # the adapter vanishes mid-stream
        wait_for(lambda: daemon.json("status")["buses"][0]["state"] == "down", what="bus down")
        wait_for(lambda: daemon.json("status")["pack"]["cell_voltage"]["not_good"] == 224, what="cells stale")
        assert daemon.json("status")["buses"][0]["last_error"]

        sim = SimServer(port=sim.port)  # back on the same port
        wait_for(lambda: _all_cells_good(daemon), what="cells good after reconnect")
        st = daemon.json("status")["buses"][0]
        assert st["state"] == "up" and st["opens"] > opens and st["failures"] >= 1
    finally:
        if daemon is not None:
            assert daemon.stop() == 0
        sim.stop()
