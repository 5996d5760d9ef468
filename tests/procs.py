"""Real gateway and simulator processes for the integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def bmsgw_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


def free_port() -> int:
    """A free TCP port on loopback (tests never listen anywhere else)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition", step: float = 0.1) -> Any:
    """Poll until cond() is truthy; fail with what was awaited (no timing is asserted, the timeout bounds a hang)."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            last = cond()
        except Exception as exc:  # the thing polled may not be up yet
            last = exc
        else:
            if last:
                return last
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def terminate(proc: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM (a clean stop), SIGKILL when that has not ended it within ``timeout``; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


class Daemon:
    """`bmsgw run` in a subprocess with its own control socket and state dir."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.socket = tmp / "control.sock"
        self.env = {**os.environ, "BMSGW_SOCKET": str(self.socket), "XDG_STATE_HOME": str(tmp / "state"),
                    "XDG_RUNTIME_DIR": str(tmp), **(env or {})}
        self.log = open(tmp / "daemon.log", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(bmsgw_cmd("run", *args), env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        wait_for(lambda: self.cli("status").returncode == 0 or self._died(), 30, "the daemon's control socket")
        self._died()

    def _died(self) -> bool:
        if self.proc.poll() is not None:
            self.log.seek(0)
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read()}")
        return False

    def cli(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(bmsgw_cmd(*args), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def json(self, *args: str) -> Any:
        r = self.cli(*args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def stop(self) -> int:
        code = terminate(self.proc, 15)
        self.log.close()
        return code

    def output(self) -> str:
        return (self.socket.parent / "daemon.log").read_text()


class SimServer:
    """`bmsgw sim serve` in a subprocess: the simulated pack as SLCAN on loopback TCP."""

    def __init__(self, port: int = 0, config: Path | None = None) -> None:
        args = ["sim", "serve", "--port", str(port)] + (["--config", str(config)] if config else [])
        self.proc = subprocess.Popen(bmsgw_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("socket://127.0.0.1:"):
            raise AssertionError(f"sim serve did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.url = line
        self.port = int(line.rsplit(":", 1)[1])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
