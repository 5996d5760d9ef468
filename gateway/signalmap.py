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
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cantools.database.can import Message, Signal

from gateway.decode import page_tree, walk_pages
from gateway.image import family_of
from gateway.schema import Loader, read_toml

MuxPath = tuple[tuple[Signal, int], ...]


@dataclass(frozen=True)
class ValidSpec:
    """Validity flag: a signal on the same page and the values that mean valid."""

    signal: str
    when: list[str | int]


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


@dataclass(frozen=True)
class MessageEntry:
    """One ``[[message]]`` entry: per-message settings such as the cycle time."""

    name: str
    cycle_ms: float

    def check(self) -> None:
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


def load_map(path: Path) -> MapFile:
    """Parse and type-check a map file."""
    data, text = read_toml(path)
    return Loader(path, text).load(MapFile, data)


def _choice_values(flag: Signal, when: Iterable[str | int]) -> frozenset[int]:
    choices = {str(v): int(k) for k, v in (flag.conversion.choices or {}).items()}
    out = set()
    for w in when:
        if isinstance(w, int):
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
    text = path.read_text(encoding="utf-8")
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
                    try:
                        new = _bind(entry, key, msg, mux_path, page.signals, sig, env)
                    except EntryError as exc:
                        raise loader.error(f"{key}.{exc.key}", f"{exc.reason} (at {msg.name}.{sig.name})") from None
                    for b in new:
                        where = f"{msg.name}.{sig.name}"
                        if b.target in seen:
                            raise loader.error(f"{key}.to", f"{b.target} is bound twice ({seen[b.target]} and {where})")
                        seen[b.target] = where
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
    out = []
    for bit in range(entry.bits) if entry.bits else [None]:
        try:
            target = canonical(expand(entry.to, env if bit is None else {**env, "bit": str(bit)}))
        except ValueError as exc:
            raise EntryError("to", str(exc)) from None
        out.append(Binding(msg, path, sig, target, entry.scale, entry.offset, bit, valid, key))
    return out
