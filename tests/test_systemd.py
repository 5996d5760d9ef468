"""systemd integration: the unit file, and the notify protocol against a fake notify socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.control import request
from gateway.daemon import P0_STATUS_MAX_AGE_S
from tests.procs import ROOT, Daemon

pytestmark = pytest.mark.slow


class NotifySocket:
    """What systemd listens on: a Unix datagram socket collecting the daemon's messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def collect(self, seconds: float) -> list[dict[str, str]]:
        """Messages received during the next ``seconds``."""
        end = time.monotonic() + seconds
        got = []
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), msg))
            got.append(msg)
        return got

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for msg in self.collect(0.2):
                if key in msg:
                    return msg
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages[-5:]}")


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.sock.close()


def test_ready_watchdog_and_no_watchdog_while_the_lane_is_stalled(tmp_path: Path, notify: NotifySocket) -> None:
    d = Daemon(tmp_path, "--sim", env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "300000"})
    try:
        ready = notify.wait_for("READY", 30)
        assert ready["READY"] == "1" and "frames/s" in ready["STATUS"]
        pings = [m for m in notify.collect(1.0) if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 5  # every 100 ms (a third of WatchdogSec)

        assert d.cli("sim", "fault", "stall_lane").returncode == 0
        notify.collect(0.3)  # the lane's last tick ages past twice its deadline
        window = notify.collect(1.0)
        assert not [m for m in window if "WATCHDOG" in m], window
        assert any("UNHEALTHY" in m.get("STATUS", "") for m in window)

        assert d.cli("sim", "fault", "clear").returncode == 0
        notify.wait_for("WATCHDOG", 5)
    finally:
        assert d.stop() == 0
    notify.collect(0.5)
    assert "STOPPING" in notify.messages[-1][1]


def test_no_watchdog_while_p0_hangs_even_with_clients_asking(tmp_path: Path, notify: NotifySocket) -> None:
    """A hung P0 leaves its last status behind: that status must not keep the watchdog fed."""
    d = Daemon(tmp_path, "--sim", env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "300000"})
    p0 = int(Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()[0])
    done = threading.Event()

    def ask() -> None:
        while not done.is_set():
            with contextlib.suppress(Exception):
                request(d.socket, "status", timeout=5.0)

    try:
        notify.wait_for("READY", 30)
        notify.wait_for("WATCHDOG", 5)
        os.kill(p0, signal.SIGSTOP)
        notify.collect(P0_STATUS_MAX_AGE_S + 0.5)
        text = d.cli("status")
        assert text.returncode == 0 and "UNHEALTHY: the CAN/protection process (P0) does not answer" in text.stdout
        askers = [threading.Thread(target=ask) for _ in range(8)]
        for t in askers:
            t.start()
        window = notify.collect(3.0)
        assert not [m for m in window if "WATCHDOG" in m], window
        assert any("does not answer" in m.get("STATUS", "") for m in window)
        done.set()
        os.kill(p0, signal.SIGCONT)
        for t in askers:
            t.join(10)
        notify.wait_for("WATCHDOG", 10)
    finally:
        done.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(p0, signal.SIGCONT)
        assert d.stop() == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "bmsgw.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "ProtectSystem=strict" in unit
    # verify checks that ExecStart exists: point it at this checkout's installed command
    exe = Path(sys.executable).parent / "bmsgw"
    local = tmp_path / "bmsgw.service"
    local.write_text(unit.replace("/opt/bmsgw/venv/bin/bmsgw", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "bmsgw.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def _enter_realtime_as_nobody(rtprio: int) -> tuple[bool, bool, str]:
    """enter_realtime(7) in a forked child that became an unprivileged user with RLIMIT_RTPRIO = rtprio."""
    import resource

    from gateway.p0 import enter_realtime

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                resource.setrlimit(resource.RLIMIT_RTPRIO, (rtprio, rtprio))
            except ValueError:  # a container without CAP_SYS_RESOURCE cannot raise the hard limit
                os.write(w, b"skip|False|cannot raise RLIMIT_RTPRIO here")
                os._exit(0)
            os.setgid(65534)
            os.setuid(65534)
            ok, how = enter_realtime(7)
            os.write(w, f"{ok}|{os.sched_getscheduler(0) == os.SCHED_FIFO}|{how}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        ok, fifo, how = f.read().split("|", 2)
    os.waitpid(pid, 0)
    if ok == "skip":
        pytest.skip(how)
    return ok == "True", fifo == "True", how


@pytest.mark.parametrize("rtprio", [0, 20])
def test_p0_takes_realtime_priority_only_when_the_unit_allows_it(rtprio: int) -> None:
    """The unit's LimitRTPRIO is what lets the unprivileged service user run P0 under SCHED_FIFO;
    without it P0 says how to allow it and keeps normal scheduling."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become an unprivileged user with a chosen RLIMIT_RTPRIO")
    ok, fifo, how = _enter_realtime_as_nobody(rtprio)
    assert (ok, fifo) == ((True, True) if rtprio else (False, False))
    assert ("SCHED_FIFO priority 7" if rtprio else "LimitRTPRIO=7") in how
    unit = (ROOT / "systemd" / "bmsgw.service").read_text()
    assert "LimitRTPRIO=20" in unit and "RestrictRealtime=yes" not in unit


def test_the_unit_says_which_devices_other_adapters_need() -> None:
    """DevicePolicy=closed lets only the serial adapters through: the unit and the docs name the
    DeviceAllow= groups character-device adapters need, and that SocketCAN needs none."""
    unit = (ROOT / "systemd" / "bmsgw.service").read_text()
    allowed = [line for line in unit.splitlines() if line.startswith("DeviceAllow=")]
    assert "DevicePolicy=closed" in unit and allowed == ["DeviceAllow=char-ttyACM rw", "DeviceAllow=char-ttyUSB rw"]
    comments = "\n".join(line for line in unit.splitlines() if line.startswith("#"))
    assert "DeviceAllow=char-pcan rw" in comments and "/proc/devices" in comments and "SocketCAN" in comments
    ops = (ROOT / "docs" / "operations.md").read_text()
    assert "DeviceAllow=char-pcan rw" in ops and "no `DeviceAllow=`" in ops
