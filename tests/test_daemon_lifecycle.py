"""The daemon's life: claiming its socket, refusing bad requests, signals, P0's death, the shutdown order.

Real `bmsgw run` processes with their own config, state directory, control socket and metrics port
in a temp dir; timeouts only bound a hang, nothing here asserts how fast something happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.control import ControlError, request
from tests.procs import ROOT, bmsgw_cmd, free_port, terminate, wait_for

pytestmark = pytest.mark.slow


def _config(tmp: Path, *, eis: bool = False, base: str = "sim.toml") -> Path:
    """A shipped config with its state directory, control socket and metrics port in ``tmp``."""
    text = (ROOT / "gateway" / "configs" / base).read_text()
    if not eis:
        text = text.replace("enabled = true              # the impedance", "enabled = false             # the impedance")
    if 'control_socket = "/run/bmsgw/control.sock"' in text:
        text = text.replace('"/var/lib/bmsgw"', f'"{tmp / "state"}"').replace(
            '"/run/bmsgw/control.sock"', f'"{tmp / "run" / "control.sock"}"')
    else:
        text = text.replace('log_level = "info"', f'log_level = "info"\nstate_dir = "{tmp / "state"}"\n'
                                                  f'control_socket = "{tmp / "run" / "control.sock"}"', 1)
    cfg = tmp / "bmsgw.toml"
    cfg.write_text(text + f"\n[metrics]\nport = {free_port()}\n")
    return cfg


class Gw:
    """`bmsgw run --config CFG [--sim]` in a subprocess (optionally in a session of its own, like a terminal's)."""

    def __init__(self, tmp: Path, cfg: Path, *args: str, name: str = "daemon", session: bool = False,
                 wrapper: Path | None = None) -> None:
        self.tmp, self.cfg = tmp, cfg
        self.env = {**os.environ, "XDG_STATE_HOME": str(tmp / "xdgstate"), "XDG_RUNTIME_DIR": str(tmp / "xdgrun"),
                    "BMSGW_SOCKET": str(tmp / "nosuch.sock")}
        self.log_path = tmp / f"{name}.log"
        self.log = open(self.log_path, "w+")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, str(wrapper), "run"] if wrapper else bmsgw_cmd("run")
        self.proc = subprocess.Popen([*cmd, "--config", str(cfg), *args], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=session)

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(bmsgw_cmd(*args, "--config", str(self.cfg)), env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)

    def status(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the gateway exited {self.proc.returncode}:\n{self.output()}")
        r = self.cli("status", "--json")
        return json.loads(r.stdout) if r.returncode == 0 else None

    def wait_up(self) -> dict[str, Any]:
        st: dict[str, Any] = wait_for(self.status, 60, "the gateway's control socket", 0.3)
        return st

    def wait_contactors(self, state: str) -> dict[str, Any]:
        got: dict[str, Any] = wait_for(lambda: (s := self.status()) and s["protection"]
                                       and s["protection"]["contactors"]["state"] == state and s,
                                       60, f"contactors {state}", 0.3)
        return got

    def p0(self) -> int:
        return int(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()[0])

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        code = terminate(self.proc, 30)
        self.log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text()

    @property
    def socket(self) -> Path:
        return self.tmp / "run" / "control.sock"


@pytest.fixture
def gateways() -> Iterator[list[Gw]]:
    started: list[Gw] = []
    yield started
    for g in started:
        g.stop()


def _raw(path: Path, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(data)
        reply: dict[str, Any] = json.loads(s.makefile("rb").readline())
        return reply


def _proc_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# -- F1: the deep-discharge latch ---------------------------------------------------------------------


def test_reset_with_the_string_false_keeps_the_deep_discharge_latch(tmp_path: Path, gateways: list[Gw]) -> None:
    """bool("false") is True: the daemon used to clear the latch (and auto_close closed the contactors)."""
    cfg = _config(tmp_path)
    (tmp_path / "state").mkdir()
    latch = tmp_path / "state" / "deep_discharge.json"
    latch.write_text(json.dumps({"cell": 17, "value": 2.41, "time": time.time()}))
    g = Gw(tmp_path, cfg, "--sim")
    gateways.append(g)
    g.wait_contactors("ERROR")
    for bad in ("false", "no", 0, 1):
        with pytest.raises(ControlError, match="'clear_deep_discharge' must be true or false"):
            request(g.socket, "reset", {"clear_deep_discharge": bad})
    c = request(g.socket, "contactors")
    assert c["state"] == "ERROR" and c["deep_discharge_latched"]["cell"] == 17 and latch.exists()
    r = g.cli("reset")
    assert r.returncode == 4 and "deep discharge latched" in r.stderr
    assert g.stop() == 0
    assert "Traceback" not in g.output()


# -- F2, F5, F7: refused before any bus is opened ------------------------------------------------------


def test_a_control_socket_path_that_holds_a_file_refuses_to_start_and_keeps_the_file(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    victim = tmp_path / "site-notes.txt"  # stands for bmsgw.toml, cloud.db ...
    victim.write_text("precious\n")
    cfg.write_text(cfg.read_text().replace(f'control_socket = "{tmp_path / "run" / "control.sock"}"',
                                           f'control_socket = "{victim}"'))
    r = subprocess.run(bmsgw_cmd("run", "--sim", "--config", str(cfg)), capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert "exists and is not a socket" in r.stderr and "Traceback" not in r.stderr and "P0" not in r.stderr
    assert victim.read_text() == "precious\n"


def _twin_configs(tmp: Path) -> tuple[Path, Path]:
    """Two configs: the same control socket, each its own state directory and metrics port."""
    a = _config(tmp)
    (tmp / "b").mkdir()
    b = tmp / "b" / "bmsgw.toml"
    text = a.read_text().replace(f'state_dir = "{tmp / "state"}"', f'state_dir = "{tmp / "b" / "state"}"')
    b.write_text(text.rsplit("[metrics]", 1)[0] + f"[metrics]\nport = {free_port()}\n")
    return a, b


def test_the_socket_is_claimed_for_real_before_p0_is_forked(tmp_path: Path) -> None:
    """Both gateways pass the claim when it is only a connect test and neither listens yet: both fork P0."""
    from gateway.config import load_config
    from gateway.daemon import Gateway

    a, b = _twin_configs(tmp_path)
    first = Gateway(load_config(a), simulate=True)
    first.claim()
    try:
        assert first.control.path.is_socket()
        second = Gateway(load_config(b), simulate=True)
        with pytest.raises(ControlError, match="another gateway is already listening"):
            second.claim()
        assert first.control.path.is_socket()
    finally:
        first.control.release()
        os.close(first._lock_fd)
    assert not first.control.path.exists()


def test_of_two_gateways_started_together_on_one_socket_one_runs(tmp_path: Path, gateways: list[Gw]) -> None:
    a, b = _twin_configs(tmp_path)
    ga, gb = Gw(tmp_path, a, "--sim", name="a"), Gw(tmp_path, b, "--sim", name="b")
    gateways += [ga, gb]
    wait_for(lambda: ga.proc.poll() is not None or gb.proc.poll() is not None, 60, "one of them to give up")
    loser, winner = (ga, gb) if ga.proc.poll() is not None else (gb, ga)
    assert loser.wait() == 2, loser.output()
    out = loser.output()
    assert "another gateway" in out and "Traceback" not in out
    assert "P0" not in out and "bus pack up" not in out  # no P0, no bus: refused before the fork
    winner.wait_up()
    assert winner.stop() == 0


def test_run_sim_with_a_config_that_cannot_simulate_is_a_config_error(tmp_path: Path) -> None:
    cfg = _config(tmp_path, base="socketcan.toml")
    r = subprocess.run(bmsgw_cmd("run", "--sim", "--config", str(cfg)), capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert "config error" in r.stderr and "[sim]" in r.stderr
    assert "Traceback" not in r.stderr and "P0" not in r.stderr
    assert not (tmp_path / "run" / "control.sock").exists()


# -- F6, F9: P0 gone or hung ----------------------------------------------------------------------------------


def test_p0_killed_ends_the_gateway_with_exit_1_and_no_traceback(tmp_path: Path, gateways: list[Gw]) -> None:
    g = Gw(tmp_path, _config(tmp_path), "--sim")
    gateways.append(g)
    g.wait_contactors("NORMAL")
    os.kill(g.p0(), signal.SIGKILL)
    assert g.wait() == 1
    out = g.output()
    assert "the P0 process exited" in out and "ended unexpectedly" in out
    assert "Traceback" not in out and "ExceptionGroup" not in out
    assert not g.socket.exists()


def test_a_hung_p0_is_not_answered_exit_1_not_refused(tmp_path: Path, gateways: list[Gw]) -> None:
    g = Gw(tmp_path, _config(tmp_path), "--sim")
    gateways.append(g)
    g.wait_contactors("NORMAL")
    p0 = g.p0()
    os.kill(p0, signal.SIGSTOP)
    try:
        for args in (("contactors", "open"), ("alarms",), ("reset",)):
            r = g.cli(*args)
            assert r.returncode == 1, (args, r.stderr)
            assert "did not answer" in r.stderr and "refused" not in r.stderr
    finally:
        os.kill(p0, signal.SIGCONT)
    g.wait_up()  # P0 answers again
    assert g.stop() == 0


# -- F10: bad requests --------------------------------------------------------------------------------------


def test_bad_requests_are_refused_with_a_reason_and_never_internal_errors(tmp_path: Path, gateways: list[Gw]) -> None:
    g = Gw(tmp_path, _config(tmp_path), "--sim")
    gateways.append(g)
    g.wait_up()
    cases = {
        b'{"cmd":"alarms","args":{"recent":1e309}}': "'recent' must be an integer",
        b'{"cmd":"alarms","args":{"recent":NaN}}': "'recent' must be an integer",
        b'{"cmd":"alarms","args":{"recent":-1}}': "'recent' must be 0..",
        b'{"cmd":"eis.status","args":{"handle":1e400}}': "eis.enabled = false",  # no EIS here: refused first
        b'{"cmd":"sim.fault","args":{"fault":"silent","target":1e30}}': "'target' must be an integer",
        b'{"cmd":"candump","args":{"bus":["pack"]}}': "'bus' must be a string",
        b'{"cmd":"candump","args":{"decode":"yes"}}': "'decode' must be true or false",
        b'{"cmd":"signals","args":{"glob":["*"]}}': "'glob' must be a string",
        b'{"cmd":"contactors","args":{"action":["close"]}}': "'action' must be a string",
        b'{"cmd":"reset","args":{"clear_deep_discharge":"no"}}': "must be true or false",
        b'{"cmd":"status","args":' + b"[" * 30000 + b"]" * 30000 + b"}": "request nested too deeply",
    }
    for line, reason in cases.items():
        reply = _raw(g.socket, line + b"\n")
        assert not reply["ok"] and reason in reply["error"] and "internal error" not in reply["error"], (line[:60],
                                                                                                         reply)
    assert g.status() is not None
    assert g.stop() == 0
    out = g.output()
    assert "Traceback" not in out and "control request failed" not in out and "P0 request" not in out


# -- F12: signal ages ------------------------------------------------------------------------------------------


def test_a_signal_stored_after_the_clock_read_has_age_zero_not_negative(tmp_path: Path) -> None:
    """P0 stores frames while the main process reads the image: a frame newer than the handler's clock
    read must show age 0, never a negative age."""
    from gateway.config import load_config
    from gateway.daemon import Gateway

    gw = Gateway(load_config(_config(tmp_path)))
    img = gw.image
    slot = int(img.slots([img.index("pack.voltage")])[0])
    img.seq[slot] = 1
    img.rx_mono[slot] = time.monotonic() + 5.0  # stored after the request read its clock
    rows = anyio.run(gw.cmd_signals, {"glob": "pack.voltage"})
    assert rows[0]["age_s"] == 0.0
    with pytest.raises(ControlError, match="'glob' must be a string"):
        anyio.run(gw.cmd_signals, {"glob": ["pack.*"]})


# -- F8, F13: shutdown ------------------------------------------------------------------------------------------

_TRACE = '''
import os, sys
sys.path.insert(0, os.getcwd())  # this checkout's gateway (the test runs the wrapper with cwd=ROOT)
import gateway.estimation, gateway.p0

def trace(cls, name, label):
    f = getattr(cls, name)
    def traced(*a, **k):
        print(f"STEP {label} begin", file=sys.stderr, flush=True)
        try:
            return f(*a, **k)
        finally:
            print(f"STEP {label} end", file=sys.stderr, flush=True)
    setattr(cls, name, traced)

trace(gateway.p0.P0Process, "stop", "p0-stop")
trace(gateway.estimation.Estimation, "persist", "persist")
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_contactors_open_before_anything_else_stops(tmp_path: Path, gateways: list[Gw], sig: int) -> None:
    """README: clean shutdown, the contactors are opened first; the final estimator persist comes after."""
    wrapper = tmp_path / "trace.py"
    wrapper.write_text(_TRACE)
    g = Gw(tmp_path, _config(tmp_path), "--sim", wrapper=wrapper)
    gateways.append(g)
    g.wait_contactors("NORMAL")
    g.proc.send_signal(sig)
    assert g.wait() == 0
    steps = [line.split()[1:] for line in g.output().splitlines() if line.startswith("STEP ")]
    first_stop = steps.index(["p0-stop", "begin"])
    first_stop_end = steps.index(["p0-stop", "end"])
    last_persist = max(i for i, s in enumerate(steps) if s == ["persist", "begin"])
    assert first_stop < first_stop_end < last_persist, steps
    assert "P0 stopped: contactors opened" in g.output()


def test_sighup_of_the_terminal_stops_cleanly_with_the_trip(tmp_path: Path, gateways: list[Gw]) -> None:
    """The SSH session of a foreground `bmsgw run` drops: the terminal's process group (main and P0) gets
    SIGHUP. P0 must not die before the main process stops it; the main process stops like on SIGTERM."""
    g = Gw(tmp_path, _config(tmp_path), "--sim", session=True)
    gateways.append(g)
    g.wait_contactors("NORMAL")
    p0 = g.p0()
    os.killpg(g.proc.pid, signal.SIGHUP)
    assert g.wait() == 0, g.output()
    out = g.output()
    assert "SIGHUP received" in out and "P0 stopped: contactors opened" in out and "Traceback" not in out
    wait_for(lambda: _proc_gone(p0), 30, "P0 gone")
    assert not g.socket.exists()


def _calibration_child(pid: int) -> int | None:
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for kid in kids:
            try:
                if b"gateway.eis" in Path(f"/proc/{kid}/cmdline").read_bytes():
                    return int(kid)
            except FileNotFoundError:
                continue
    return None


@pytest.mark.parametrize("how", ["kill", "term"])
def test_the_sim_calibration_child_ends_with_the_gateway(tmp_path: Path, gateways: list[Gw], how: str) -> None:
    """--sim on a fresh state directory calibrates SoT in a child process: killed with the gateway (SIGKILL:
    it dies with its parent; SIGTERM: the shutdown kills it), never left to run on as an orphan."""
    g = Gw(tmp_path, _config(tmp_path, eis=True), "--sim")
    gateways.append(g)
    child = wait_for(lambda: _calibration_child(g.proc.pid), 60, "the calibration child", 0.01)
    if how == "kill":
        g.proc.kill()
        g.wait()
    else:
        g.proc.send_signal(signal.SIGTERM)
        assert g.wait() == 0, g.output()
    wait_for(lambda: _proc_gone(child), 60, "the calibration child gone")
    # it was stopped mid-way: an orphan (or a shutdown that waits for it) would have written its result
    assert not list((tmp_path / "state").glob("sot_calibration_sim_*.json"))


def test_the_trip_events_of_the_stop_reach_the_cloud_buffer(tmp_path: Path, gateways: list[Gw]) -> None:
    """P0 stops first, so the cloud link's final flush (when the group is cancelled) stores its trip event."""
    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text() + f'\n[cloud]\nenabled = true\nhost = "127.0.0.1"\nport = {free_port()}\n'
                                     "[cloud.commands]\nenabled = false\n")
    g = Gw(tmp_path, cfg, "--sim")
    gateways.append(g)
    g.wait_contactors("NORMAL")
    assert g.stop() == 0, g.output()
    r = subprocess.run(bmsgw_cmd("cloud", "decode", str(tmp_path / "state" / "cloud.db"), "--rows", "100000"),
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "NORMAL -> ERROR: gateway stopping" in r.stdout
