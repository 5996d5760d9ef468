"""`bmsgw doctor`: checks what a technician would check first, and says what to fix."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drivers.canbus import socket_address
from gateway.config import Config, load_config, socket_path, state_dir
from gateway.control import ControlError, NotRunning, request
from gateway.schema import ConfigError

MIN_FREE_BYTES = 200 * 1024 * 1024
CLOCK_TOOL_TIMEOUT_S = 5.0


@dataclass
class Finding:
    """One check: ok / warn / fail, what was seen, and what to do about it."""

    check: str
    status: str
    detail: str
    fix: str = ""


def _tcp(host: str, port: int, timeout: float = 2.0) -> str:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except OSError as exc:
        return str(exc.strerror or exc)


def check_config(path: Path) -> tuple[Config | None, list[Finding]]:
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        return None, [Finding("config", "fail", str(exc), f"edit {exc.file} (see docs/configuration.md), "
                                                          f"then run 'bmsgw config check {path}'")]
    out = [Finding("config", "ok", f"{path} is valid")]
    out += [Finding("dbc", "warn", w, "fix the DBC or set strict_dbc = false knowingly") for w in loaded.warnings]
    return loaded.config, out


def check_buses(cfg: Config) -> list[Finding]:
    out = []
    for bus in cfg.bus:
        name = f"bus {bus.name}"
        if bus.interface == "socketcan":
            state = Path(f"/sys/class/net/{bus.channel}/operstate")
            if not state.parent.exists():
                out.append(Finding(name, "fail", f"no network interface {bus.channel}",
                                   "check the adapter and its driver: ip -details link show"))
            elif state.read_text().strip() not in ("up", "unknown"):
                out.append(Finding(name, "fail", f"{bus.channel} is {state.read_text().strip()}",
                                   f"sudo ip link set {bus.channel} up type can bitrate {bus.bitrate}"))
            else:
                out.append(Finding(name, "ok", f"{bus.channel} is up"))
        elif bus.channel.startswith("socket://"):
            addr = socket_address(bus.channel)
            assert not isinstance(addr, str), addr  # the config check refuses a channel without host and port
            err = _tcp(*addr)
            out.append(Finding(name, "fail" if err else "ok", f"{bus.channel}: {err or 'reachable'}",
                               "start the adapter's TCP bridge (e.g. 'bmsgw sim serve')" if err else ""))
        elif bus.channel.startswith("/dev/"):
            dev = Path(bus.channel)
            if not dev.exists():
                out.append(Finding(name, "fail", f"{dev} does not exist", "plug in the adapter; check dmesg"))
            elif not os.access(dev, os.R_OK | os.W_OK):
                out.append(Finding(name, "fail", f"no read/write access to {dev}",
                                   "add the gateway's user to the device's group (usually dialout)"))
            else:
                out.append(Finding(name, "ok", f"{dev} accessible"))
        else:
            out.append(Finding(name, "ok", f"{bus.interface} {bus.channel} (not checked from outside the daemon)"))
    return out


def check_disk(cfg: Config) -> list[Finding]:
    d = state_dir(cfg)
    probe = d if d.exists() else d.parent
    if not probe.exists():
        return [Finding("state dir", "warn", f"{d} does not exist yet", "the daemon creates it on first start")]
    free = shutil.disk_usage(probe).free
    out = [Finding("disk", "ok" if free >= MIN_FREE_BYTES else "fail", f"{free / 2**20:.0f} MiB free at {probe}",
                   "" if free >= MIN_FREE_BYTES else "free space: the cloud buffer and the deep-discharge latch live here")]
    if not os.access(probe, os.W_OK):
        out.append(Finding("state dir", "fail", f"{probe} is not writable by this user",
                           "run as the gateway's user, or fix the owner of the state directory"))
    return out


def check_clock() -> list[Finding]:
    unknown = "cannot tell whether the clock is synchronized"
    if shutil.which("timedatectl"):
        try:
            r = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                               text=True, timeout=CLOCK_TOOL_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # e.g. systemd not answering on D-Bus: a finding, not a crash
            unknown += f" (timedatectl did not answer within {CLOCK_TOOL_TIMEOUT_S:g} s)"
        except OSError as exc:
            unknown += f" (timedatectl: {exc.strerror or exc})"
        else:
            if r.returncode == 0 and r.stdout.strip() in ("yes", "no"):
                ok = r.stdout.strip() == "yes"
                return [Finding("clock", "ok" if ok else "warn", f"NTP synchronized: {r.stdout.strip()}",
                                "" if ok else "enable time sync (timedatectl set-ntp true): "
                                              "records carry wall-clock time")]
    if Path("/run/systemd/timesync/synchronized").exists():
        return [Finding("clock", "ok", "systemd-timesyncd reports synchronized")]
    return [Finding("clock", "warn", unknown, "install and enable a time sync service (systemd-timesyncd or chrony)")]


def check_daemon(cfg: Config) -> list[Finding]:
    path = socket_path(cfg)
    try:
        st = request(path, "status", timeout=3)
    except NotRunning as exc:
        return [Finding("daemon", "fail", str(exc), "systemctl start bmsgw; journalctl -u bmsgw -e")]
    except (ControlError, OSError, ValueError) as exc:
        return [Finding("daemon", "fail", f"the daemon did not answer: {exc}", "journalctl -u bmsgw -e")]
    out = [Finding("daemon", "ok" if st.get("healthy") else "fail",
                   f"running {st['uptime_s']:.0f} s, " + ("healthy" if st.get("healthy") else "protection lane UNHEALTHY"),
                   "" if st.get("healthy") else "journalctl -u bmsgw -e; systemd will restart it")]
    for b in st["buses"]:
        if b["state"] != "up":
            out.append(Finding(f"bus {b['name']} (live)", "fail", f"{b['state']}: {b['last_error']}",
                               "check wiring, termination and bitrate; 'bmsgw candump' shows what arrives"))
    prot = st.get("protection")
    if prot and prot["contactors"]["state"] == "ERROR":
        out.append(Finding("contactors", "warn", "ERROR: " + "; ".join(prot["contactors"]["error_causes"][:3]),
                           "'bmsgw alarms' for the causes; 'bmsgw reset' once they are gone"))
    return out


def check_broker(cfg: Config) -> list[Finding]:
    c = cfg.cloud
    if not c.enabled:
        return [Finding("broker", "ok", "cloud link disabled")]
    err = _tcp(c.host, c.broker_port(), timeout=3.0)
    return [Finding("broker", "fail" if err else "ok", f"{c.host}:{c.broker_port()}: {err or 'reachable'}",
                    "check the network (4G/Wi-Fi), DNS and firewall; data is buffered meanwhile" if err else "")]


def check_opcua(cfg: Config) -> list[Finding]:
    o = cfg.opcua
    if not o.enabled:
        return [Finding("opc ua", "ok", "OPC UA server disabled")]
    err = _tcp(o.host if o.host not in ("0.0.0.0", "::") else "127.0.0.1", o.port)
    return [Finding("opc ua", "fail" if err else "ok", f"{o.endpoint}: {err or 'listening'}",
                    "is the daemon running? another program on the port? ('ss -ltnp')" if err else "")]


def check_permissions(cfg: Config, path: Path) -> list[Finding]:
    out = []
    sock = socket_path(cfg)
    if sock.exists() and not os.access(sock, os.R_OK | os.W_OK):
        out.append(Finding("permissions", "fail", f"no access to {sock}",
                           "add your user to the gateway's group (sudo usermod -a -G bmsgw $USER), log in again"))
    if not os.access(path, os.R_OK):
        out.append(Finding("permissions", "fail", f"cannot read {path}", "run as the gateway's user or with sudo"))
    return out or [Finding("permissions", "ok", "config readable, control socket usable")]


def run(path: Path) -> list[Finding]:
    """Every check, in the order a technician would go."""
    cfg, findings = check_config(path)
    if cfg is None:
        return findings
    return (findings + check_permissions(cfg, path) + check_daemon(cfg) + check_buses(cfg) + check_broker(cfg)
            + check_opcua(cfg) + check_disk(cfg) + check_clock())


def as_json(findings: list[Finding]) -> dict[str, Any]:
    return {"ok": all(f.status != "fail" for f in findings), "findings": [asdict(f) for f in findings]}
