"""Downlink commands: authenticated envelopes, an allowlist, strict arguments, staged config changes.

A command arrives on ``<cmd topic>/<command>`` as JSON::

    {"body": "<JSON text of the body>", "hmac": "<hex HMAC-SHA256 of the body text's UTF-8 bytes>"}

and the body is ``{"id", "gateway", "command", "issued_at", "expires_at", "args"}``
(docs/cloud-format.md).  Nothing outside :data:`COMMANDS` is ever executed, no
argument outside its bounds reaches a handler, and protection limits can never
be set beyond the hardware limits.  Every command is answered on the cmd-ack
topic; a duplicate id gets the stored answer again (marked ``duplicate``) and is
not applied twice.  Config changes are validated, staged (the handler's
snapshot), applied, health-checked for ``health_check_s`` and restored from
the snapshot when applying or the health check fails.

The effects are the daemon's: ``handlers`` maps a command name to a callable
``handler(args) -> (ok, reason)`` (sync or async), or for config changes to an
object with ``snapshot()``, ``apply(args)``, ``health()`` and ``restore(snapshot)`` (each sync or async).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import anyio

from cloudlink.config import CommandSettings
from gateway.limits import CHECKS, HardwareLimits, LevelOverride, LimitTable, validate, with_overrides

log = logging.getLogger(__name__)

Result = tuple[bool, str]
Handler = Callable[[dict[str, Any]], "Result | Awaitable[Result]"]

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_SETTING = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
MAX_COMMAND_BYTES = 64 * 1024


@runtime_checkable
class Staged(Protocol):
    """A config change that can be snapshotted, applied, checked and rolled back."""

    def snapshot(self) -> Any: ...

    def apply(self, args: dict[str, Any]) -> Result | Awaitable[Result]: ...

    def health(self) -> Result | Awaitable[Result]: ...

    def restore(self, snapshot: Any) -> None | Awaitable[None]: ...


class CommandLog(Protocol):
    """Where answered command ids are remembered (the store: they survive restarts)."""

    def command_ack(self, cmd_id: str) -> bytes | None: ...

    def remember_command(self, cmd_id: str, expires: float, ack: bytes) -> None: ...


class MemoryLog:
    """A CommandLog in memory (tests, or a store that is unavailable)."""

    def __init__(self) -> None:
        self.acks: dict[str, bytes] = {}

    def command_ack(self, cmd_id: str) -> bytes | None:
        return self.acks.get(cmd_id)

    def remember_command(self, cmd_id: str, expires: float, ack: bytes) -> None:
        self.acks[cmd_id] = ack


class Reject(Exception):
    """A command refused, with the reason sent back."""


@dataclass
class Context:
    """What the argument checks need to know about this gateway."""

    cells: int = 0
    modules: int = 0
    rate_limits: dict[str, float] = field(default_factory=dict)  # signal class -> max_rate_hz
    hardware_limits: HardwareLimits | None = None
    current_limits: Callable[[], LimitTable] | None = None


# -- argument checks ---------------------------------------------------------------------------


def _keys(args: Mapping[str, Any], allowed: set[str], where: str = "args") -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise Reject(f"{where}.{unknown[0]}: unknown argument (allowed: {', '.join(sorted(allowed)) or 'none'})")


def _number(args: Mapping[str, Any], key: str, lo: float, hi: float, *, required: bool = True,
            lo_open: bool = False, default: float | None = None, where: str = "args") -> float | None:
    if key not in args:
        if required:
            raise Reject(f"{where}.{key}: missing")
        return default
    v = args[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise Reject(f"{where}.{key}: must be a finite number, got {v!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise Reject(f"{where}.{key}: {v} is outside {'(' if lo_open else '['}{lo}, {hi}]")
    return float(v)


def _index_list(args: Mapping[str, Any], key: str, n: int, what: str, *, required: bool = False,
                where: str = "args") -> list[int] | None:
    if key not in args:
        if required:
            raise Reject(f"{where}.{key}: missing")
        return None
    v = args[key]
    if not isinstance(v, list) or not v or len(v) > max(n, 1):
        raise Reject(f"{where}.{key}: must be a non-empty list of {what} indices")
    out = []
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n:
            raise Reject(f"{where}.{key}[{i}]: {x!r} is not a {what} index (0..{n - 1})")
        out.append(x)
    if len(set(out)) != len(out):
        raise Reject(f"{where}.{key}: duplicate indices")
    return out


def check_ecm(args: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    """ECM parameters of a 4-RC model (R0, R1..R4, C1..C4, optionally the OCV point they were fitted at)."""
    _keys(args, {"cells", "r0_ohm", "r_ohm", "c_f", "ocv_v", "soc", "temperature_c"})
    out: dict[str, Any] = {"cells": _index_list(args, "cells", ctx.cells, "cell")}
    out["r0_ohm"] = _number(args, "r0_ohm", 0.0, 1.0, lo_open=True)
    rs, cs = args.get("r_ohm"), args.get("c_f")
    if not isinstance(rs, list) or not 1 <= len(rs) <= 4:
        raise Reject("args.r_ohm: must be a list of 1 to 4 resistances (R1..R4)")
    if not isinstance(cs, list) or len(cs) != len(rs):
        raise Reject(f"args.c_f: must be a list of {len(rs)} capacitances (C1..C{len(rs)}), one per resistance")
    out["r_ohm"] = [_number({"r": r}, "r", 0.0, 1.0, where=f"args.r_ohm[{i}]") for i, r in enumerate(rs)]
    out["c_f"] = [_number({"c": c}, "c", 0.0, 1e7, lo_open=True, where=f"args.c_f[{i}]") for i, c in enumerate(cs)]
    vmax = ctx.hardware_limits.cell_voltage_max if ctx.hardware_limits else 5.0
    out["ocv_v"] = _number(args, "ocv_v", 0.0, vmax, required=False, lo_open=True)
    out["soc"] = _number(args, "soc", 0.0, 1.0, required=False)
    out["temperature_c"] = _number(args, "temperature_c", -40.0, 100.0, required=False)
    return out


def check_estimator(args: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    """Estimator settings: names and plain values (the estimator's handler checks its own names and bounds,
    the current ceilings against the hardware limits, and refuses before changing anything)."""
    _keys(args, {"settings"})
    s = args.get("settings")
    if not isinstance(s, dict) or not s or len(s) > 64:
        raise Reject("args.settings: must be a table of 1 to 64 settings")
    out: dict[str, Any] = {}
    for k, v in s.items():
        if not isinstance(k, str) or not _SETTING.match(k):
            raise Reject(f"args.settings: '{k}' is not a setting name (lower-case letters, digits, _ and .)")
        if isinstance(v, bool):
            out[k] = v
        elif isinstance(v, int | float) and math.isfinite(v) and abs(v) <= 1e12:
            out[k] = float(v)
        else:
            raise Reject(f"args.settings.{k}: must be a finite number or true/false, got {v!r}")
    return {"settings": out}


def check_limits(args: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    """New protection limit levels: applied to the current table and checked against the hardware limits."""
    _keys(args, {"limits", "deep_discharge_v"})
    if ctx.hardware_limits is None or ctx.current_limits is None:
        raise Reject("this gateway was started without its hardware limits; protection limits cannot be changed")
    lim = args.get("limits", {})
    if not isinstance(lim, dict) or (not lim and "deep_discharge_v" not in args):
        raise Reject("args.limits: must be a table of checks with mol/rsl/msl levels")
    overrides: dict[str, LevelOverride] = {}
    for check, levels in lim.items():
        if check not in CHECKS:
            raise Reject(f"args.limits.{check}: unknown check (known: {', '.join(CHECKS)})")
        if not isinstance(levels, dict) or not levels:
            raise Reject(f"args.limits.{check}: must be a table with some of mol, rsl, msl")
        _keys(levels, {"mol", "rsl", "msl"}, f"args.limits.{check}")
        vals = {k: _number(levels, k, -1e6, 1e6, where=f"args.limits.{check}") for k in levels}
        overrides[check] = LevelOverride(**vals)
    ddv = _number(args, "deep_discharge_v", 0.0, 10.0, required=False)
    try:
        table = with_overrides(ctx.current_limits(), overrides, ddv)
    except ValueError as exc:
        raise Reject(f"args.limits.{exc}") from None
    problems = validate(table, ctx.hardware_limits)
    if problems:
        raise Reject("args.limits." + "; ".join(problems))
    return {"limits": {k: {n: v for n, v in vars(o).items() if v is not None} for k, o in overrides.items()},
            "deep_discharge_v": ddv, "table": table}


def check_eis(args: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    _keys(args, {"cells", "modules", "f_min_hz", "f_max_hz", "points_per_decade", "amplitude_a"})
    cells = _index_list(args, "cells", ctx.cells, "cell")
    modules = _index_list(args, "modules", ctx.modules, "module")
    if cells is None and modules is None:
        raise Reject("args.cells: name the cells (or modules) to measure")
    fmin = _number(args, "f_min_hz", 0.01, 10000.0, required=False, default=0.1)
    fmax = _number(args, "f_max_hz", 0.01, 10000.0, required=False, default=1000.0)
    assert fmin is not None and fmax is not None
    if fmin >= fmax:
        raise Reject(f"args.f_min_hz: {fmin} must be below f_max_hz {fmax}")
    ppd = args.get("points_per_decade", 10)
    if isinstance(ppd, bool) or not isinstance(ppd, int) or not 1 <= ppd <= 20:
        raise Reject(f"args.points_per_decade: {ppd!r} must be an integer 1..20")
    amp = _number(args, "amplitude_a", 0.0, 10.0, required=False, lo_open=True)
    return {"cells": cells, "modules": modules, "f_min_hz": fmin, "f_max_hz": fmax, "points_per_decade": ppd,
            "amplitude_a": amp}


def check_balancing(args: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    _keys(args, {"cells", "max_duration_s", "stop_spread_v"})
    return {"cells": _index_list(args, "cells", ctx.cells, "cell"),
            "max_duration_s": _number(args, "max_duration_s", 1.0, 86400.0, required=False, default=3600.0),
            "stop_spread_v": _number(args, "stop_spread_v", 0.005, 0.2, required=False)}


def check_nothing(args: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    _keys(args, set())
    return {}


def check_rates(args: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    _keys(args, {"rates"})
    rates = args.get("rates")
    if not isinstance(rates, dict) or not rates:
        raise Reject("args.rates: must be a table of signal class -> rate in Hz")
    out = {}
    for name in rates:
        if name not in ctx.rate_limits:
            raise Reject(f"args.rates.{name}: unknown signal class (known: {', '.join(ctx.rate_limits) or 'none'})")
        v = _number(rates, name, 0.0, ctx.rate_limits[name], lo_open=True, where="args.rates")
        assert v is not None
        if v < 0.001:
            raise Reject(f"args.rates.{name}: {v} Hz is below 0.001 Hz")
        out[name] = v
    return {"rates": out}


def check_reset(args: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    _keys(args, {"clear_deep_discharge"})
    v = args.get("clear_deep_discharge", False)
    if not isinstance(v, bool):
        raise Reject("args.clear_deep_discharge: must be true or false")
    return {"clear_deep_discharge": v}


# name -> (config change?, argument check)
COMMANDS: dict[str, tuple[bool, Callable[[Mapping[str, Any], Context], dict[str, Any]]]] = {
    "set_ecm_parameters": (True, check_ecm),
    "set_estimator_settings": (True, check_estimator),
    "set_protection_limits": (True, check_limits),
    "start_eis_sweep": (False, check_eis),
    "request_balancing": (False, check_balancing),
    "request_birth": (False, check_nothing),
    "set_report_rates": (True, check_rates),
    "reset_error": (False, check_reset),
}


# -- envelopes ---------------------------------------------------------------------------------


def sign(body_text: str, secret: bytes | None) -> bytes:
    """The JSON envelope around a body text (signed when a secret is given)."""
    env: dict[str, str] = {"body": body_text}
    if secret is not None:
        env["hmac"] = hmac.new(secret, body_text.encode("utf-8"), hashlib.sha256).hexdigest()
    return json.dumps(env, separators=(",", ":")).encode("utf-8")


def make_command(secret: bytes | None, gateway: str, command: str, args: Mapping[str, Any] | None = None, *,
                 cmd_id: str, issued_at: float | None = None, ttl_s: float = 60.0) -> bytes:
    """A command envelope as the cloud sends it (for tools and tests)."""
    t = time.time() if issued_at is None else issued_at
    body = {"id": cmd_id, "gateway": gateway, "command": command, "issued_at": t, "expires_at": t + ttl_s,
            "args": dict(args or {})}
    return sign(json.dumps(body, separators=(",", ":")), secret)


def open_envelope(payload: bytes, secret: bytes | None) -> dict[str, Any]:
    """The body of a signed envelope (Reject when malformed or the signature does not match)."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise Reject(f"command larger than {MAX_COMMAND_BYTES} bytes")
    try:
        env = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the decoder's stack
        raise Reject("not a JSON envelope") from None
    if not isinstance(env, dict) or not isinstance(env.get("body"), str):
        raise Reject("envelope must be an object with a 'body' string")
    text: str = env["body"]
    if secret is not None:
        mac = env.get("hmac")
        if not isinstance(mac, str):
            raise Reject("missing hmac")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape is valid JSON but has no UTF-8 bytes to sign
            raise Reject("body is not valid UTF-8") from None
        want = hmac.new(secret, data, hashlib.sha256).hexdigest()
        # compare_digest raises TypeError for non-ASCII str; no hex digest is non-ASCII anyway
        if not mac.isascii() or not hmac.compare_digest(want, mac.lower()):
            raise Reject("bad signature")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise Reject("body is not JSON") from None
    if not isinstance(body, dict):
        raise Reject("body must be a JSON object")
    return body


# -- the processor -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one command."""

    ack: bytes
    body: dict[str, Any]
    applied: bool = False


class CommandProcessor:
    """Checks, applies and answers commands one at a time."""

    def __init__(self, settings: CommandSettings, gateway: str, handlers: Mapping[str, Any], log: CommandLog,
                 ctx: Context, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.gateway = gateway
        self.handlers = dict(handlers)
        self.log = log
        self.ctx = ctx
        self.clock = clock
        self.secret: bytes | None = settings.secret() if settings.auth == "hmac" else None
        if self.secret is not None and len(self.secret) < 16:
            raise ValueError("commands.hmac_secret: at least 16 bytes are needed (auth = 'hmac')")
        # errors: commands that failed in a way no check anticipated (also counted as rejected)
        self.counts: dict[str, int] = {"accepted": 0, "rejected": 0, "duplicate": 0, "errors": 0}
        self.last: dict[str, Any] | None = None

    def _answer(self, body: dict[str, Any], status: str, reason: str, cmd: str | None, duplicate: bool = False,
                received: float | None = None) -> dict[str, Any]:
        return {"id": body.get("id") if isinstance(body.get("id"), str) else None, "gateway": self.gateway,
                "command": cmd, "status": status, "reason": reason, "duplicate": duplicate,
                "received_at": received if received is not None else self.clock(), "at": self.clock()}

    def _out(self, ack: dict[str, Any], applied: bool = False) -> Outcome:
        key = "duplicate" if ack["duplicate"] else ack["status"]
        self.counts[key] = self.counts.get(key, 0) + 1
        self.last = ack
        return Outcome(sign(json.dumps(ack, separators=(",", ":")), self.secret), ack, applied)

    async def handle(self, topic_command: str, payload: bytes) -> Outcome:
        """One command in, its answer out (never raises for bad input)."""
        received = self.clock()
        try:
            return await self._handle(topic_command, payload, received)
        except Exception as exc:
            # last resort: an exception here would end the MQTT session, and a retained command would
            # then end every later one too; it is answered like any other bad command instead
            log.exception("cloud: command on '%s' failed unexpectedly", topic_command)
            self.counts["errors"] += 1
            peek = _peek_id(payload)
            reason = f"internal error: {type(exc).__name__}: {exc}"[:200]
            return self._out(self._answer({"id": peek} if peek else {}, "rejected", reason, topic_command or None,
                                          received=received))

    async def _handle(self, topic_command: str, payload: bytes, received: float) -> Outcome:
        try:
            body = open_envelope(payload, self.secret)
        except Reject as exc:
            # the id is echoed (unverified) so the sender can match the answer; nothing else is trusted
            peek = _peek_id(payload)
            return self._out(self._answer({"id": peek} if peek else {}, "rejected", str(exc),
                                          topic_command or None, received=received))
        cmd_id = body.get("id")
        cmd = body.get("command") if isinstance(body.get("command"), str) else None
        if not isinstance(cmd_id, str) or not _ID.match(cmd_id):
            return self._out(self._answer(body, "rejected", "id: must be 1-64 characters of A-Z a-z 0-9 . _ : -",
                                          cmd, received=received))
        old = await anyio.to_thread.run_sync(self.log.command_ack, cmd_id)  # SQLite: off the event loop
        if old is not None:
            try:
                prev = json.loads(old)
            except ValueError:
                prev = self._answer(body, "rejected", "stored answer unreadable", cmd)
            prev.update(duplicate=True, at=self.clock())
            return self._out(prev)
        try:
            expires = self._check_envelope(body, topic_command, received)
        except Reject as exc:
            # expired and stale commands are not remembered: a retry with a fresh envelope may pass
            return self._out(self._answer(body, "rejected", str(exc), cmd, received=received))
        assert cmd is not None
        try:
            config, checker = COMMANDS[cmd]
            handler = self.handlers.get(cmd)
            if handler is None:
                raise Reject(f"'{cmd}' is not supported by this gateway")
            raw_args = body.get("args", {})
            if not isinstance(raw_args, dict):
                raise Reject("args: must be an object")
            args = checker(raw_args, self.ctx)
            ok, reason, applied = await self._apply(handler, args, config)
            status = "accepted" if ok else "rejected"
        except Reject as exc:
            status, reason, applied = "rejected", str(exc), False
        except Exception as exc:  # a handler failure is an answer, not a crash
            status, reason, applied = "rejected", f"handler failed: {type(exc).__name__}: {exc}", False
        ack = self._answer(body, status, reason, cmd, received=received)
        try:
            await anyio.to_thread.run_sync(self.log.remember_command, cmd_id, expires + self.settings.remember_s,
                                           json.dumps(ack).encode())
        except Exception as exc:  # the answer still goes out; a later duplicate could then be applied again
            ack["reason"] += f" (not remembered: {exc})"
        return self._out(ack, applied)

    def _check_envelope(self, body: Mapping[str, Any], topic_command: str, now: float) -> float:
        s = self.settings
        if body.get("gateway") != self.gateway:
            raise Reject(f"gateway: addressed to {body.get('gateway')!r}, this is {self.gateway!r}")
        cmd = body.get("command")
        if not isinstance(cmd, str) or cmd not in COMMANDS:
            raise Reject(f"command: {cmd!r} is not allowed (allowed: {', '.join(COMMANDS)})")
        if topic_command and topic_command != cmd:
            raise Reject(f"command: '{cmd}' arrived on the topic for '{topic_command}'")
        issued, expires = body.get("issued_at"), body.get("expires_at")
        for key, v in (("issued_at", issued), ("expires_at", expires)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise Reject(f"{key}: must be a Unix time in seconds")
        assert isinstance(issued, int | float) and isinstance(expires, int | float)
        if expires <= issued:
            raise Reject("expires_at: must be after issued_at")
        if expires - issued > s.max_ttl_s:
            raise Reject(f"expires_at: lifetime {expires - issued:.0f} s exceeds max_ttl_s {s.max_ttl_s:.0f}")
        if issued > now + s.clock_skew_s:
            raise Reject(f"issued_at: {issued - now:.0f} s in the future (allowed skew {s.clock_skew_s:.0f} s)")
        if now > expires:
            raise Reject(f"expired {now - expires:.1f} s ago")
        return float(expires)

    async def _apply(self, handler: Any, args: dict[str, Any], config: bool) -> tuple[bool, str, bool]:
        if isinstance(handler, Staged):
            snap = await _call(handler.snapshot)
            try:
                ok, reason = _result(await _call(handler.apply, args))
            except Exception as exc:
                ok, reason = False, f"apply failed: {type(exc).__name__}: {exc}"
            if not ok:
                await _call(handler.restore, snap)
                return False, f"{reason}; rolled back", False
            if self.settings.health_check_s > 0:
                await anyio.sleep(self.settings.health_check_s)
            try:
                hok, hreason = _result(await _call(handler.health))
            except Exception as exc:
                hok, hreason = False, f"{type(exc).__name__}: {exc}"
            if not hok:
                await _call(handler.restore, snap)
                return False, f"health check failed ({hreason}); rolled back", False
            return True, reason or "applied", True
        if not callable(handler):
            raise Reject("handler is not callable")
        ok, reason = _result(await _call(handler, args))
        return ok, reason or ("done" if ok else "refused"), ok


def _peek_id(payload: bytes) -> str | None:
    """The id of an envelope that failed its checks, when it can be read at all."""
    try:
        body = json.loads(json.loads(payload.decode("utf-8"))["body"])
        cmd_id = body.get("id")
    except Exception:  # anything malformed simply has no id
        return None
    return cmd_id if isinstance(cmd_id, str) and _ID.match(cmd_id) else None


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    r = fn(*args)
    if inspect.isawaitable(r):
        r = await r
    return r


def _result(r: Any) -> Result:
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], bool):
        return r[0], str(r[1])
    if isinstance(r, bool):
        return r, ""
    raise TypeError(f"a handler must return (ok, reason), got {r!r}")
