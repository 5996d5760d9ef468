"""Signal maps: bind DBC signals to canonical names (TOML files in dbc/maps/).

One entry can bind many signals: ``message`` and ``signal`` are regular
expressions (full match) whose named groups, the multiplexer value ``mux`` and,
for bit fields, the bit number ``bit`` feed the ``to`` template::

    [[signal]]
    message = 'MMU(?P<m>\\d+)_CellVoltages'
    signal = 'Cell(?P<c>\\d+)_Voltage'
    to = 'cell[{m*14 + c}].voltage'
    valid = { signal = 'Cell{c}_Invalid', when = ['Valid'] }

``{group}`` inserts the matched text; any other ``{...}`` is integer
arithmetic (+ - * // %) over the groups, ``mux`` and ``bit``.  ``valid`` names
a flag signal on the same page and the values meaning *valid*: choice names
from the DBC's value table or raw integers (foxBMS' ``invalidFlag`` = 1 means
valid, so read the table, not the name).

Physical quantities have one unit in the image (``QUANTITY_UNITS``): a DBC
signal with a unit must be brought to it by ``scale``/``offset`` (mV: 0.001).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cantools.database.can import Message, Signal

from gateway.decode import page_tree, raw_expr, selector_expr, value_expr, walk_pages
from gateway.image import family_of
from gateway.schema import Loader, read_text, read_toml

MuxPath = tuple[tuple[Signal, int], ...]


@dataclass(frozen=True)
class ValidSpec:
    """Validity flag: a signal on the same page and the values that mean valid."""

    signal: str
    when: list[str | int]

    def check(self) -> None:
        if not self.when:
            raise ValueError("when: must list at least one value that means valid (else the value is never valid)")


@dataclass(frozen=True)
class SignalEntry:
    """One ``[[signal]]`` entry of a map file."""

    signal: str
    to: str
    message: str = ".*"
    scale: float = 1.0
    offset: float = 0.0
    bits: int = 0
    valid: ValidSpec | None = None

    def check(self) -> None:
        for key, rx in (("message", self.message), ("signal", self.signal)):
            try:
                re.compile(rx)
            except re.error as exc:
                raise ValueError(f"{key}: bad regular expression: {exc}") from None
        if not 0 <= self.bits <= 64:
            raise ValueError("bits: must be 0..64")
        if self.scale == 0:
            raise ValueError("scale: must not be 0 (every value would read 0)")


@dataclass(frozen=True)
class MessageEntry:
    """One ``[[message]]`` entry: per-message settings such as the cycle time."""

    name: str
    cycle_ms: float

    def check(self) -> None:
        try:
            re.compile(self.name)
        except re.error as exc:
            raise ValueError(f"name: bad regular expression: {exc}") from None
        if self.cycle_ms <= 0:
            raise ValueError("cycle_ms: must be > 0")


@dataclass(frozen=True)
class MapInfo:
    description: str = ""
    dbc: str = ""


@dataclass(frozen=True)
class MapFile:
    """A whole map file."""

    map: MapInfo = field(default_factory=MapInfo)
    message: list[MessageEntry] = field(default_factory=list)
    signal: list[SignalEntry] = field(default_factory=list)


@dataclass(frozen=True)
class Binding:
    """One DBC signal (on one multiplexer page, optionally one bit) -> one canonical name."""

    message: Message
    path: MuxPath
    signal: Signal
    target: str
    factor: float = 1.0
    add: float = 0.0
    bit: int | None = None
    valid: tuple[Signal, frozenset[int]] | None = None
    entry: str = ""  # the map entry that made it, e.g. "signal[3]"


@dataclass
class SignalMap:
    """The resolved bindings of a map against a set of DBC messages."""

    bindings: list[Binding]
    cycle_s: dict[str, float]  # per message name, from [[message]] overrides
    source: str

    def targets(self) -> list[str]:
        return [b.target for b in self.bindings]


_OPS: dict[type, Any] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                         ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _arith(expr: str, env: dict[str, int]) -> int:
    """Evaluate integer arithmetic over known names; nothing else is allowed."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise ValueError(f"unknown name '{node.id}' (known: {', '.join(sorted(env)) or 'none'})")
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return int(_OPS[type(node.op)](ev(node.left), ev(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"'{expr}' is not integer arithmetic (+ - * // %) over names")

    try:
        return ev(ast.parse(expr, mode="eval"))
    except SyntaxError:
        raise ValueError(f"'{expr}' is not a valid expression") from None
    except ZeroDivisionError:
        names = ", ".join(f"{k} = {v}" for k, v in sorted(env.items())) or "no names"
        raise ValueError(f"'{expr}' divides by zero (with {names})") from None


def expand(template: str, text: dict[str, str]) -> str:
    """Fill ``{...}`` fields: a bare group inserts its text, anything else is arithmetic."""
    ints = {k: int(v) for k, v in text.items() if re.fullmatch(r"-?\d+", v)}

    def field_value(m: re.Match[str]) -> str:
        body = m.group(1).strip()
        return text[body] if body in text else str(_arith(body, ints))

    return re.sub(r"\{([^{}]*)\}", field_value, template)


def canonical(name: str) -> str:
    """One spelling per signal: ``cell[03].voltage`` and ``cell[3].voltage`` are the same."""
    family_of(name)
    return re.sub(r"\[(\d+)\]", lambda m: f"[{int(m.group(1))}]", name)


# The image's unit of each physical quantity, by the last word of a name (module[3].board_temperature);
# other names (states, flags, counters, SoC fractions) are not checked
QUANTITY_UNITS: dict[str, str] = {"voltage": "V", "current": "A", "power": "W", "temperature": "degC",
                                  "resistance": "ohm"}

# DBC unit spellings -> (image unit, scale, offset) that convert a value in it to the image unit
UNIT_SPELLINGS: dict[str, tuple[str, float, float]] = {
    **dict.fromkeys(("V", "Volt", "Volts"), ("V", 1.0, 0.0)), "mV": ("V", 1e-3, 0.0), "kV": ("V", 1e3, 0.0),
    **dict.fromkeys(("A", "Amp", "Amps", "Ampere"), ("A", 1.0, 0.0)), "mA": ("A", 1e-3, 0.0), "kA": ("A", 1e3, 0.0),
    "W": ("W", 1.0, 0.0), "mW": ("W", 1e-3, 0.0), "kW": ("W", 1e3, 0.0), "MW": ("W", 1e6, 0.0),
    **dict.fromkeys(("degC", "°C", "C", "deg C", "deg_C", "Celsius", "Â°C"), ("degC", 1.0, 0.0)),
    "K": ("degC", 1.0, -273.15), **dict.fromkeys(("degF", "°F"), ("degC", 5 / 9, -160 / 9)),
    **dict.fromkeys(("ohm", "Ohm", "Ω"), ("ohm", 1.0, 0.0)), "mOhm": ("ohm", 1e-3, 0.0),
    **dict.fromkeys(("kOhm", "kΩ"), ("ohm", 1e3, 0.0)), "MOhm": ("ohm", 1e6, 0.0),
}
# the same, case-folded where that stays unambiguous (mW and MW differ, so "mw" is not in here)
_FOLDED = {k.lower(): v for k, v in UNIT_SPELLINGS.items()
           if all(w == v for j, w in UNIT_SPELLINGS.items() if j.lower() == k.lower())}


def unit_of(name: str) -> str | None:
    """The image unit of a canonical name (``cell[3].voltage``: V), None for unitless ones."""
    return QUANTITY_UNITS.get(family_of(name)[0].rsplit(".", 1)[-1].rsplit("_", 1)[-1])


def load_map(path: Path) -> MapFile:
    """Parse and type-check a map file."""
    data, text = read_toml(path)
    return Loader(path, text).load(MapFile, data)


def _choice_values(flag: Signal, when: Iterable[str | int]) -> frozenset[int]:
    """The raw values of ``flag`` that mean valid; ValueError for a name or number it cannot hold."""
    choices = {str(v): int(k) for k, v in (flag.conversion.choices or {}).items()}
    signed = flag.is_signed and not flag.is_float  # as raw_expr reads it
    lo, hi = (-(1 << (flag.length - 1)), (1 << (flag.length - 1)) - 1) if signed else (0, (1 << flag.length) - 1)
    out = set()
    for w in when:
        if isinstance(w, int):
            if not lo <= w <= hi:  # the flag never holds it: the value would never be valid
                raise ValueError(f"{w} is not a raw value of {flag.name} ({flag.length} bit"
                                 f"{'s' if flag.length != 1 else ''}, {'signed' if signed else 'unsigned'}: "
                                 f"{lo}..{hi})")
            out.add(w)
        elif w in choices:
            out.add(choices[w])
        else:
            known = ", ".join(choices) or "none"
            raise ValueError(f"'{w}' is not a value of {flag.name} (its value table has: {known})")
    return frozenset(out)


def resolve(path: Path, messages: Iterable[Message]) -> SignalMap:
    """Resolve a map file against DBC messages into bindings; errors name the entry."""
    spec = load_map(path)
    text = read_text(path)
    loader = Loader(path, text)
    msgs = list(messages)
    cycle: dict[str, float] = {}
    for i, me in enumerate(spec.message):
        hits = [m.name for m in msgs if re.fullmatch(me.name, m.name)]
        if not hits:
            raise loader.error(f"message[{i}].name", f"'{me.name}' matches no message of the DBC")
        cycle.update((n, me.cycle_ms / 1000.0) for n in hits)

    bindings: list[Binding] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(spec.signal):
        key = f"signal[{i}]"
        found = 0
        for msg in msgs:
            mm = re.fullmatch(entry.message, msg.name)
            if not mm:
                continue
            for mux_path, page in walk_pages(page_tree(msg)):
                for sig in page.signals:
                    sm = re.fullmatch(entry.signal, sig.name)
                    if not sm:
                        continue
                    env = {k: v for k, v in {**mm.groupdict(), **sm.groupdict()}.items() if v is not None}
                    if mux_path:
                        env["mux"] = str(mux_path[-1][1])
                    where = f"{msg.name}.{sig.name}"
                    try:
                        new = _bind(entry, key, msg, mux_path, page.signals, sig, env)
                        for b in new:
                            if b.target in seen:
                                raise EntryError("to", f"{b.target} is bound twice ({seen[b.target]} and {where})")
                            seen[b.target] = where
                            _check_unit(b)
                    except EntryError as exc:
                        raise loader.error(f"{key}.{exc.key}" if exc.key else key, f"{exc.reason} (at {where})") from None
                    bindings += new
                    found += 1
        if not found:
            raise loader.error(key, f"no DBC signal matches message '{entry.message}' / signal '{entry.signal}'")
    return SignalMap(bindings, cycle, str(path))


class EntryError(ValueError):
    """A problem with one key of a map entry."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def _bind(entry: SignalEntry, key: str, msg: Message, path: MuxPath, page: tuple[Signal, ...], sig: Signal,
          env: dict[str, str]) -> list[Binding]:
    valid = None
    if entry.valid is not None:
        try:
            flag_name = expand(entry.valid.signal, env)
        except ValueError as exc:
            raise EntryError("valid.signal", str(exc)) from None
        flag = next((s for s in page if s.name == flag_name), None)
        if flag is None:
            raise EntryError("valid.signal", f"no signal '{flag_name}' on the same page of {msg.name}")
        try:
            valid = (flag, _choice_values(flag, entry.valid.when))
        except ValueError as exc:
            raise EntryError("valid.when", str(exc)) from None
    if entry.bits > sig.length:
        raise EntryError("bits", f"{sig.name} has only {sig.length} bits")
    # the code the ingest will generate, tried now: a signal outside its message is the map's error at start-up
    try:
        for mux, _ in path:
            selector_expr(mux, msg.length)
        if valid is not None:
            raw_expr(valid[0], msg.length)
        (raw_expr if entry.bits else value_expr)(sig, msg.length)
    except ValueError as exc:
        raise EntryError("", f"cannot bind: {exc} (the DBC's {msg.name} cannot be decoded)") from None
    out = []
    for bit in range(entry.bits) if entry.bits else [None]:
        try:
            target = canonical(expand(entry.to, env if bit is None else {**env, "bit": str(bit)}))
        except ValueError as exc:
            raise EntryError("to", str(exc)) from None
        out.append(Binding(msg, path, sig, target, entry.scale, entry.offset, bit, valid, key))
    return out


def _check_unit(b: Binding) -> None:
    """The binding yields its target's image unit: DBC unit x scale + offset (a DBC without a unit, or with
    one we cannot read, is trusted)."""
    want = unit_of(b.target)
    unit = (b.signal.unit or "").strip()
    if want is None or not unit or b.bit is not None:
        return
    conv = UNIT_SPELLINGS.get(unit) or _FOLDED.get(unit.lower())
    if conv is None:
        return  # a spelling we do not know ("V DC"): trusted like a missing unit, the DBC cannot be edited
    if conv[0] != want:
        known = ", ".join(k for k, v in UNIT_SPELLINGS.items() if v[0] == want)
        raise EntryError("signal", f"{b.signal.name} is in {unit}, but {b.target} is in {want} "
                                   f"(DBC units it can be bound from: {known})")
    _, scale, offset = conv
    scale_ok = math.isclose(abs(b.factor), scale, rel_tol=1e-9) and (b.factor > 0 or offset == 0)
    # a sign flip (scale = -1 x the unit's) is a convention (which way current counts), not a unit error
    if scale_ok and math.isclose(b.add, offset, rel_tol=1e-9, abs_tol=1e-9):
        return
    raise EntryError("scale" if not scale_ok else "offset",
                     f"{b.signal.name} is in {unit} and {b.target} in {want}: the entry needs scale = {scale:g} "
                     f"and offset = {offset:g} (it has scale = {b.factor:g}, offset = {b.add:g})")
