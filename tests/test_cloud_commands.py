"""Downlink commands: signatures, freshness, duplicates, the allowlist, bounds, staged changes and rollback."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from cloudlink.commands import COMMANDS, CommandProcessor, Context, MemoryLog, make_command, sign
from cloudlink.config import CommandSettings
from gateway.daemon import SettingsStage
from gateway.limits import HARDWARE_DEFAULTS, PRESETS, LimitTable
from tests.test_estimation import site

SECRET = b"0123456789abcdef-secret"
GW = "gw-1"


class Recorded:
    """A plain handler that records its calls."""

    def __init__(self, result: tuple[bool, str] = (True, "ok")) -> None:
        self.calls: list[dict[str, Any]] = []
        self.result = result

    def __call__(self, args: dict[str, Any]) -> tuple[bool, str]:
        self.calls.append(args)
        return self.result


class StagedSetting:
    """A config change with a snapshot, an apply, a health check and a restore."""

    def __init__(self, healthy: bool = True, apply_ok: bool = True) -> None:
        self.value: dict[str, Any] = {"gain": 1.0}
        self.healthy = healthy
        self.apply_ok = apply_ok
        self.restored = 0

    def snapshot(self) -> dict[str, Any]:
        return dict(self.value)

    def apply(self, args: dict[str, Any]) -> tuple[bool, str]:
        self.value = dict(args["settings"])
        return (True, "staged and applied") if self.apply_ok else (False, "half applied, then failed")

    def health(self) -> tuple[bool, str]:
        return (True, "fine") if self.healthy else (False, "estimator diverged")

    def restore(self, snap: dict[str, Any]) -> None:
        self.value = snap
        self.restored += 1


def processor(handlers: dict[str, Any], auth: str = "hmac", log: MemoryLog | None = None,
              now: float | None = None) -> CommandProcessor:
    settings = CommandSettings(auth=auth, hmac_secret=SECRET.decode() if auth == "hmac" else "", health_check_s=0.01,
                               max_ttl_s=600, clock_skew_s=30)
    limits = PRESETS["NMC"]
    ctx = Context(cells=224, modules=16, rate_limits={"cells": 50.0, "pack": 200.0},
                  hardware_limits=HARDWARE_DEFAULTS["NMC"], current_limits=lambda: limits)
    clock = (lambda: now) if now is not None else time.time
    return CommandProcessor(settings, GW, handlers, log or MemoryLog(), ctx, clock)


def run(p: CommandProcessor, command: str, payload: bytes) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        out = await p.handle(command, payload)
        env = json.loads(out.ack)
        if p.secret is not None:  # every answer is signed with the gateway's secret
            want = hmac.new(p.secret, env["body"].encode(), hashlib.sha256).hexdigest()
            assert env["hmac"] == want
        body: dict[str, Any] = json.loads(env["body"])
        assert body == out.body
        return body
    return anyio.run(go)


def cmd(command: str, args: dict[str, Any] | None = None, *, cmd_id: str = "c-1", secret: bytes | None = SECRET,
        gateway: str = GW, **kw: Any) -> bytes:
    return make_command(secret, gateway, command, args or {}, cmd_id=cmd_id, **kw)


def test_allowlist_is_what_the_issue_names() -> None:
    assert set(COMMANDS) == {"set_ecm_parameters", "set_estimator_settings", "set_protection_limits", "start_eis_sweep",
                             "request_balancing", "request_birth", "set_report_rates", "reset_error"}


def test_valid_command_is_applied_and_answered() -> None:
    h = Recorded()
    a = run(processor({"reset_error": h}), "reset_error", cmd("reset_error", {"clear_deep_discharge": True}))
    assert a["status"] == "accepted" and a["id"] == "c-1" and a["command"] == "reset_error" and not a["duplicate"]
    assert h.calls == [{"clear_deep_discharge": True}]


def test_refusal_by_the_handler_is_reported() -> None:
    h = Recorded((False, "cell 3 still above the limit"))
    a = run(processor({"reset_error": h}), "reset_error", cmd("reset_error"))
    assert a["status"] == "rejected" and "still above" in a["reason"]


@pytest.mark.parametrize("forgery", ["wrong_key", "tampered", "unsigned", "not_json"])
def test_forged_commands_are_rejected_and_not_applied(forgery: str) -> None:
    h = Recorded()
    p = processor({"reset_error": h})
    good = cmd("reset_error")
    if forgery == "wrong_key":
        payload = cmd("reset_error", secret=b"another-secret-of-16b")
    elif forgery == "tampered":
        env = json.loads(good)
        env["body"] = env["body"].replace('"clear_deep_discharge"', '"x"').replace("{}", '{"clear_deep_discharge":true}')
        payload = json.dumps(env).encode()
    elif forgery == "unsigned":
        payload = cmd("reset_error", secret=None)
    else:
        payload = b"\xff{not json"
    a = run(p, "reset_error", payload)
    assert a["status"] == "rejected"
    assert a["reason"] in ("bad signature", "missing hmac", "not a JSON envelope")
    assert a["id"] == (None if forgery == "not_json" else "c-1")  # echoed, unverified, to match the answer
    assert h.calls == []
    # a forged command is not remembered: the genuine one with the same id still works
    assert run(p, "reset_error", good)["status"] == "accepted"


def test_expired_future_and_overlong_commands_are_rejected() -> None:
    h = Recorded()
    now = 1_800_000_000.0
    p = processor({"reset_error": h}, now=now)
    a = run(p, "reset_error", cmd("reset_error", issued_at=now - 120, ttl_s=60))
    assert a["status"] == "rejected" and a["reason"].startswith("expired")
    a = run(p, "reset_error", cmd("reset_error", cmd_id="c-2", issued_at=now + 3600, ttl_s=60))
    assert a["status"] == "rejected" and "future" in a["reason"]
    a = run(p, "reset_error", cmd("reset_error", cmd_id="c-3", issued_at=now, ttl_s=7200))
    assert a["status"] == "rejected" and "max_ttl_s" in a["reason"]
    assert h.calls == []
    assert run(p, "reset_error", cmd("reset_error", cmd_id="c-4", issued_at=now - 5, ttl_s=60))["status"] == "accepted"


def test_duplicates_are_answered_again_without_reapplying() -> None:
    h = Recorded()
    log = MemoryLog()
    p = processor({"reset_error": h}, log=log)
    first = run(p, "reset_error", cmd("reset_error", cmd_id="dup-1"))
    second = run(p, "reset_error", cmd("reset_error", cmd_id="dup-1"))
    assert first["status"] == second["status"] == "accepted"
    assert not first["duplicate"] and second["duplicate"]
    assert len(h.calls) == 1
    # also after a restart (the log is the store in the gateway) and after the command expired
    p2 = processor({"reset_error": h}, log=log, now=time.time() + 10_000)
    third = run(p2, "reset_error", cmd("reset_error", cmd_id="dup-1"))
    assert third["duplicate"] and third["status"] == "accepted" and len(h.calls) == 1
    # a rejected command stays rejected for its id
    bad = run(p, "set_report_rates", cmd("set_report_rates", {"rates": {"cells": 1e6}}, cmd_id="dup-2"))
    again = run(p, "set_report_rates", cmd("set_report_rates", {"rates": {"cells": 1.0}}, cmd_id="dup-2"))
    assert bad["status"] == again["status"] == "rejected" and again["duplicate"]


@pytest.mark.parametrize(("command", "args", "reason"), [
    ("set_report_rates", {"rates": {"cells": 51.0}}, "args.rates.cells: 51.0 is outside (0.0, 50.0]"),
    ("set_report_rates", {"rates": {"nosuch": 1.0}}, "unknown signal class"),
    ("set_report_rates", {"rates": {"cells": float("nan")}}, "finite number"),
    ("start_eis_sweep", {"cells": [224]}, "args.cells[0]: 224 is not a cell index"),
    ("start_eis_sweep", {"cells": [1], "f_min_hz": 100.0, "f_max_hz": 10.0}, "must be below f_max_hz"),
    ("request_balancing", {"max_duration_s": 1e9}, "args.max_duration_s"),
    ("set_ecm_parameters", {"r0_ohm": 0.001, "r_ohm": [0.001] * 5, "c_f": [100.0] * 5}, "1 to 4 resistances"),
    ("set_ecm_parameters", {"r0_ohm": -0.001, "r_ohm": [0.001], "c_f": [100.0]}, "args.r0_ohm"),
    ("set_estimator_settings", {"settings": {"Bad Name": 1}}, "not a setting name"),
    ("set_estimator_settings", {"settings": {"q": "import os"}}, "finite number or true/false"),
    ("reset_error", {"shell": "rm -rf /"}, "args.shell: unknown argument"),
    ("set_protection_limits", {"limits": {"cell_voltage_high": {"msl": 4.5}}}, "outside the hardware limits"),
    ("set_protection_limits", {"limits": {"cell_voltage_low": {"msl": 2.0, "rsl": 2.1, "mol": 2.2}}},
     "outside the hardware limits"),
    ("set_protection_limits", {"limits": {"pack_current_charge": {"msl": 500.0}}}, "outside the hardware limits"),
    ("set_protection_limits", {"limits": {"cell_voltage_spread": {"msl": 1e6}}}, "outside the hardware limits"),
    ("set_protection_limits", {"limits": {"cell_voltage_high": {"rsl": 4.19, "msl": 4.18}}}, "out of order"),
    ("set_protection_limits", {"limits": {"made_up_check": {"msl": 1.0}}}, "unknown check"),
])
def test_out_of_bounds_arguments_never_reach_a_handler(command: str, args: dict[str, Any], reason: str) -> None:
    h = Recorded()
    a = run(processor({c: h for c in COMMANDS}), command, cmd(command, args))
    assert a["status"] == "rejected"
    assert reason in a["reason"]
    assert h.calls == []


def test_limits_within_hardware_reach_the_handler_as_a_validated_table() -> None:
    h = Recorded()
    a = run(processor({"set_protection_limits": h}), "set_protection_limits",
            cmd("set_protection_limits", {"limits": {"cell_voltage_high": {"rsl": 4.16, "msl": 4.19}}}))
    assert a["status"] == "accepted", a
    table = h.calls[0]["table"]
    assert isinstance(table, LimitTable)
    assert table.cell_voltage_high.msl == 4.19 and table.cell_voltage_high.mol == PRESETS["NMC"].cell_voltage_high.mol


def test_unknown_command_gateway_and_topic_mismatch() -> None:
    h = Recorded()
    p = processor({"reset_error": h})
    assert "not allowed" in run(p, "shell", cmd("shell", {"cmd": "id"}))["reason"]
    assert "addressed to" in run(p, "reset_error", cmd("reset_error", cmd_id="c-2", gateway="other"))["reason"]
    assert "arrived on the topic" in run(p, "request_birth", cmd("reset_error", cmd_id="c-3"))["reason"]
    assert "not supported" in run(p, "start_eis_sweep", cmd("start_eis_sweep", {"cells": [1]}, cmd_id="c-4"))["reason"]
    assert h.calls == []


def test_staged_change_is_rolled_back_when_unhealthy() -> None:
    st = StagedSetting(healthy=False)
    a = run(processor({"set_estimator_settings": st}), "set_estimator_settings",
            cmd("set_estimator_settings", {"settings": {"gain": 2.0}}))
    assert a["status"] == "rejected" and "health check failed (estimator diverged); rolled back" == a["reason"]
    assert st.value == {"gain": 1.0} and st.restored == 1


def test_staged_change_is_rolled_back_when_apply_fails() -> None:
    st = StagedSetting(apply_ok=False)
    a = run(processor({"set_estimator_settings": st}), "set_estimator_settings",
            cmd("set_estimator_settings", {"settings": {"gain": 3.0}}))
    assert a["status"] == "rejected" and a["reason"].endswith("rolled back")
    assert st.value == {"gain": 1.0}


def test_staged_change_applied_when_healthy() -> None:
    st = StagedSetting()
    a = run(processor({"set_estimator_settings": st}), "set_estimator_settings",
            cmd("set_estimator_settings", {"settings": {"gain": 2.5}}))
    assert a["status"] == "accepted" and st.value == {"gain": 2.5} and st.restored == 0


def test_estimator_settings_beyond_the_hardware_are_refused_by_the_estimator(tmp_path: Path) -> None:
    est, _img = site(tmp_path)
    before = est.section
    p = processor({"set_estimator_settings": SettingsStage(est)})
    a = run(p, "set_estimator_settings", cmd("set_estimator_settings", {"settings": {"max_charge_c": 20.0}}))
    assert a["status"] == "rejected" and "max_charge_c" in a["reason"] and "pack_current_charge_max" in a["reason"]
    a = run(p, "set_estimator_settings", cmd("set_estimator_settings", {"settings": {"max_discharge_c": -1.0}},
                                             cmd_id="c-2"))
    assert a["status"] == "rejected" and a["reason"].startswith("max_discharge_c: must be > 0")
    assert est.section == before and est.limiter.config.max_charge_a == 30.0
    a = run(p, "set_estimator_settings", cmd("set_estimator_settings", {"settings": {"max_charge_c": 1.0}},
                                             cmd_id="c-3"))
    assert a["status"] == "accepted" and est.limiter.config.max_charge_a == 60.0


def test_tls_acl_mode_accepts_unsigned_commands() -> None:
    h = Recorded()
    p = processor({"reset_error": h}, auth="tls_acl")
    a = run(p, "reset_error", cmd("reset_error", secret=None))
    assert a["status"] == "accepted" and len(h.calls) == 1
    assert "hmac" not in json.loads(sign("{}", None))


def test_a_crashing_handler_is_an_answer() -> None:
    def boom(args: dict[str, Any]) -> tuple[bool, str]:
        raise RuntimeError("EIS module not connected")
    a = run(processor({"start_eis_sweep": boom}), "start_eis_sweep", cmd("start_eis_sweep", {"cells": [3]}))
    assert a["status"] == "rejected" and "EIS module not connected" in a["reason"]


def _signed_envelope(body_text: str) -> bytes:
    mac = hmac.new(SECRET, body_text.encode("utf-8"), hashlib.sha256).hexdigest()
    return json.dumps({"body": body_text, "hmac": mac}).encode()


@pytest.mark.parametrize(("payload", "reason"), [
    (json.dumps({"body": "{}", "hmac": "\u00e9"}).encode(), "bad signature"),  # non-ASCII hmac, no secret needed
    (b'{"body": "\\ud800", "hmac": "00"}', "body is not valid UTF-8"),  # a lone surrogate cannot be signed
    (("[" * 30000 + "]" * 30000).encode(), "not a JSON envelope"),  # deeper than the JSON decoder recurses
    (_signed_envelope("[" * 30000 + "]" * 30000), "body is not JSON"),
])
def test_malformed_envelopes_are_rejected_not_raised(payload: bytes, reason: str) -> None:
    h = Recorded()
    p = processor({"reset_error": h})
    a = run(p, "reset_error", payload)
    assert a["status"] == "rejected" and a["reason"] == reason
    assert p.counts["rejected"] == 1 and h.calls == []


class BrokenLog(MemoryLog):
    """A command log whose database fails (e.g. an I/O error on the SD card)."""

    def command_ack(self, cmd_id: str) -> bytes | None:
        raise sqlite3.OperationalError("disk I/O error")


def test_an_unexpected_failure_is_answered_rejected_and_counted() -> None:
    h = Recorded()
    p = processor({"reset_error": h}, log=BrokenLog())
    a = run(p, "reset_error", cmd("reset_error"))
    assert a["status"] == "rejected" and "disk I/O error" in a["reason"] and a["id"] == "c-1"
    assert p.counts["rejected"] == 1 and p.counts["errors"] == 1 and h.calls == []
    # a time no float can hold fails a check nobody anticipated: still an answer, never an exception
    p = processor({"reset_error": h})
    huge = 10 ** 400
    a = run(p, "reset_error", _signed_envelope(json.dumps(
        {"id": "c-2", "gateway": GW, "command": "reset_error", "issued_at": huge, "expires_at": huge + 60,
         "args": {}})))
    assert a["status"] == "rejected" and a["id"] == "c-2" and p.counts["errors"] == 1 and h.calls == []
