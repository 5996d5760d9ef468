"""Operations: metrics endpoint, doctor, top, logs hints, log rate limiting, the installer."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.slcan_server import SlcanServer
from gateway.logsetup import RepeatFilter
from tests.procs import ROOT, Daemon, bmsgw_cmd, free_port, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path, int]]:
    tmp = tmp_path_factory.mktemp("ops")
    port = free_port()
    cfg = tmp / "bmsgw.toml"
    cfg.write_text((ROOT / "gateway/configs/sim.toml").read_text() + f"\n[metrics]\nport = {port}\n")
    d = Daemon(tmp, "--sim", "--config", str(cfg))
    yield d, cfg, port
    assert d.stop() == 0


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_endpoint(ops: tuple[Daemon, Path, int]) -> None:
    _, _, port = ops
    m = wait_for(lambda: (lambda m: m if m.get('bmsgw_contactor_state{state="NORMAL"}') == 1 else None)(scrape(port)),
                 30, "contactors NORMAL in the metrics")
    assert m['bmsgw_can_frames_total{bus="pack"}'] > 500
    assert m['bmsgw_can_up{bus="pack"}'] == 1
    assert m['bmsgw_loop_period_seconds{lane="P0",loop="protection"}'] == 0.01
    assert m['bmsgw_decode_errors_total{bus="pack",kind="unknown"}'] == 0
    assert m["bmsgw_protection_healthy"] == 1 and m["bmsgw_trips_total"] == 0
    assert m['bmsgw_loop_errors_total{lane="P0",loop="protection"}'] == 0
    assert m['bmsgw_can_frames_lost_total{bus="pack"}'] == 0


def test_metrics_only_on_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text((ROOT / "gateway/configs/sim.toml").read_text() + '\n[metrics]\nhost = "0.0.0.0"\n')
    r = subprocess.run(bmsgw_cmd("config", "check", str(cfg)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "metrics.host" in r.stderr


def test_doctor_against_the_running_daemon(ops: tuple[Daemon, Path, int]) -> None:
    d, cfg, _ = ops
    r = d.cli("doctor", "--config", str(cfg), "--json")
    out = json.loads(r.stdout)
    checks = {f["check"]: f for f in out["findings"]}
    assert checks["config"]["status"] == "ok" and checks["daemon"]["status"] == "ok"
    assert {"bus pack", "disk", "clock"} <= set(checks)
    assert r.returncode == (0 if out["ok"] else 1)


def test_doctor_names_the_config_problem_and_the_fix(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text((ROOT / "gateway/configs/sim.toml").read_text().replace("cells_per_module = 14", "cells_per_module = 0"))
    r = subprocess.run(bmsgw_cmd("doctor", "--config", str(cfg)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "FAIL  config" in r.stdout and "cells_per_module" in r.stdout and "fix:" in r.stdout


def test_doctor_finds_a_missing_socketcan_interface(tmp_path: Path) -> None:
    cfg = tmp_path / "can.toml"
    cfg.write_text((ROOT / "gateway/configs/socketcan.toml").read_text().replace('"can0"', '"can7"')
                   .replace("/var/lib/bmsgw", str(tmp_path / "state")).replace("/run/bmsgw/control.sock",
                                                                              str(tmp_path / "c.sock")))
    r = subprocess.run(bmsgw_cmd("doctor", "--config", str(cfg), "--json"), capture_output=True, text=True, timeout=60)
    checks = {f["check"]: f for f in json.loads(r.stdout)["findings"]}
    assert checks["bus pack"]["status"] == "fail" and "can7" in checks["bus pack"]["detail"]
    assert checks["daemon"]["status"] == "fail" and "not running" in checks["daemon"]["detail"]


def doctor_on_channel(tmp_path: Path, channel: str,
                      **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`bmsgw doctor --json` on the sim config with the pack bus on slcan ``channel`` (no daemon running)."""
    cfg = tmp_path / "slcan.toml"
    cfg.write_text((ROOT / "gateway/configs/sim.toml").read_text().replace('interface = "virtual"', 'interface = "slcan"')
                   .replace('channel = "bmsgw-sim"', f'channel = "{channel}"'))
    r = subprocess.run(bmsgw_cmd("doctor", "--config", str(cfg), "--json"), capture_output=True, text=True, timeout=60,
                       env={**os.environ, "BMSGW_SOCKET": str(tmp_path / "none.sock"),
                            "XDG_STATE_HOME": str(tmp_path / "state"), **env})
    assert "Traceback" not in r.stderr, r.stderr
    return r, {f["check"]: f for f in json.loads(r.stdout)["findings"]}


@pytest.mark.parametrize(("channel", "why"), [("socket://127.0.0.1", "no port"),
                                               ("socket://127.0.0.1:abc", "bad port"),
                                               ("socket://127.0.0.1:70000", "bad port"),
                                               ("socket://:5000", "no host")])
def test_doctor_reports_a_socket_channel_it_cannot_use(tmp_path: Path, channel: str, why: str) -> None:
    r, checks = doctor_on_channel(tmp_path, channel)
    assert r.returncode == 1
    config = checks["config"]  # refused by the config check already, naming the key
    assert config["status"] == "fail" and "bus[0].channel" in config["detail"] and why in config["detail"], config
    assert "socket://HOST:PORT" in config["detail"]


def test_doctor_reaches_an_ipv6_socket_channel(tmp_path: Path) -> None:
    srv = SlcanServer("::1")
    try:
        srv.start()
    except OSError as exc:  # no IPv6 in the container
        pytest.skip(f"cannot bind ::1: {exc}")
    try:
        _, checks = doctor_on_channel(tmp_path, srv.url)  # socket://[::1]:PORT
    finally:
        srv.stop()
    assert checks["bus pack"]["status"] == "ok", checks["bus pack"]
    assert srv.stats.connections == 1


def test_doctor_survives_a_clock_tool_that_hangs(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "timedatectl"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    _, checks = doctor_on_channel(tmp_path, "socket://127.0.0.1:1", PATH=f"{bin_dir}:{os.environ['PATH']}")
    clock = checks["clock"]
    if Path("/run/systemd/timesync/synchronized").exists():  # the fallback check answers
        assert clock["status"] == "ok", clock
    else:
        assert clock["status"] == "warn" and "timedatectl did not answer" in clock["detail"], clock


def test_top_without_a_terminal_prints_plain_screens(ops: tuple[Daemon, Path, int]) -> None:
    d, _, _ = ops
    r = d.cli("top", "--count", "2", "--interval", "0.2")
    assert r.returncode == 0
    assert r.stdout.count("frames/s") == 2 and "\x1b" not in r.stdout
    assert "protection" in r.stdout and "contactors" in r.stdout


def test_logs_hints() -> None:
    r = subprocess.run(bmsgw_cmd("logs"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "journalctl -u bmsgw -f" in r.stdout


def test_repeated_errors_are_rate_limited_with_a_count() -> None:
    f = RepeatFilter(interval_s=3600)

    def rec(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("bmsgw", level, __file__, 1, msg, None, None)

    assert f.filter(rec("bus pack down: receive: gone"))
    assert not any(f.filter(rec("bus pack down: receive: gone")) for _ in range(50))
    assert f.filter(rec("another problem"))
    assert f.filter(rec("info passes", logging.INFO)) and f.filter(rec("info passes", logging.INFO))
    f.interval_s = 0.0  # the window has passed: the next one carries the count
    r = rec("bus pack down: receive: gone")
    assert f.filter(r) and "[repeated 50 more times" in r.getMessage()


def test_installer_is_idempotent_keeps_edited_config_and_data(tmp_path: Path) -> None:
    stage = tmp_path / "root"
    run = lambda *a: subprocess.run([str(ROOT / "scripts/install"), "--root", str(stage), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    r = run()
    assert r.returncode == 0, r.stderr
    cfg = stage / "etc/bmsgw/bmsgw.toml"
    exe = stage / "opt/bmsgw/venv/bin/bmsgw"
    assert (stage / "etc/systemd/system/bmsgw.service").read_text() == (ROOT / "systemd/bmsgw.service").read_text()
    check = subprocess.run([str(exe), "config", "check", str(cfg)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr  # the installed program, with its package data
    cfg.write_text(cfg.read_text() + "# edited on site\n")
    (stage / "var/lib/bmsgw/deep_discharge.json").write_text("{}")
    r = run()
    assert r.returncode == 0 and "kept your" in r.stdout
    assert cfg.read_text().endswith("# edited on site\n") and (stage / "etc/bmsgw/bmsgw.toml.dist").exists()
    r = run("--uninstall")
    assert r.returncode == 0
    assert not (stage / "opt/bmsgw").exists() and not (stage / "etc/systemd/system/bmsgw.service").exists()
    assert cfg.exists() and (stage / "var/lib/bmsgw/deep_discharge.json").exists()
    assert run("--uninstall", "--purge").returncode == 0
    assert not (stage / "etc/bmsgw").exists() and not (stage / "var/lib/bmsgw").exists()
