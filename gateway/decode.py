"""Decoders prepared once per frame ID from cantools' parsed DBC model.

cantools stays the DBC parser and the reference for correctness; decoding a
frame through ``Database.decode_message`` costs a few microseconds, too much
for a saturated bus on a Raspberry Pi.  So for every message we generate one
small Python function: the payload becomes an integer once, and every signal
is a shift, a mask, a sign fold and the same ``raw * scale + offset`` cantools
computes (so values are bit-identical to cantools').  Only numbers taken from
the parsed model go into the generated source, never names or strings from the
DBC file.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import can
from cantools.database.can import Message, Signal
from cantools.database.conversion import BaseConversion, IdentityConversion

Value = int | float
DecodedFrame = dict[str, Value]

# CAN FD frames carry 0..8, 12, 16, 20, 24, 32, 48 or 64 bytes; a shorter
# message is padded up to the next of these on the wire.
FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)


def wire_length(length: int) -> int:
    """Length of the frame that carries a ``length``-byte message (FD padding).

    ValueError for more than 64 bytes: no CAN frame carries that (a DBC's DLC typo, which
    load_dbc refuses with its line; this keeps any other caller from a bare StopIteration).
    """
    for n in FD_LENGTHS:
        if n >= length:
            return n
    raise ValueError(f"a {length}-byte message fits no CAN frame (at most {FD_LENGTHS[-1]} bytes)")


class MuxError(ValueError):
    """The multiplexer value of a frame selects no page the DBC defines (args: name, value)."""

    def __str__(self) -> str:
        return f"multiplexer {self.args[0]} = {self.args[1]} selects no page" if len(self.args) == 2 else super().__str__()


def _unpack_f32(raw: int) -> float:
    return float(struct.unpack("<f", raw.to_bytes(4, "little"))[0])


def _unpack_f64(raw: int) -> float:
    return float(struct.unpack("<d", raw.to_bytes(8, "little"))[0])


def raw_expr(sig: Signal, length: int) -> str:
    """Python expression of a signal's raw integer, given ``le``/``be`` payload ints."""
    mask = (1 << sig.length) - 1
    if sig.byte_order == "little_endian":
        shift = sig.start
        src = "le"
    else:
        # DBC big-endian start bits name the MSB in "sawtooth" numbering
        msb = 8 * (sig.start // 8) + 7 - sig.start % 8
        shift = 8 * length - msb - sig.length
        src = "be"
    if shift < 0 or shift + sig.length > 8 * length:
        raise ValueError(f"signal {sig.name} does not fit in the message's {length} bytes")
    expr = f"(({src} >> {shift}) & {mask})" if shift else f"({src} & {mask})"
    if sig.is_signed and not sig.is_float:
        sign = 1 << (sig.length - 1)
        expr = f"(({expr} ^ {sign}) - {sign})"
    return expr


def _mux_key(value: float) -> float:
    """A scaled or float multiplexer value as a page key; inf and NaN stay floats that select no page."""
    return int(value) if isinstance(value, float) and math.isfinite(value) else value


def selector_expr(mux: Signal, length: int) -> str:
    """Expression of the multiplexer value that selects a page: cantools compares the
    *scaled* value with the DBC's page IDs (identical to the raw value in practice)."""
    expr = value_expr(mux, length)
    # int() raises OverflowError on inf: a float multiplexer must select no page instead (MuxError)
    return expr if expr == raw_expr(mux, length) else f"_mux({expr})"


def value_expr(sig: Signal, length: int, factor: float = 1.0, add: float = 0.0) -> str:
    """Expression of the scaled value, as cantools computes it.

    ``factor``/``add`` apply a further linear unit conversion (mV -> V) used
    by signal maps; the default leaves cantools' arithmetic untouched.
    """
    expr = raw_expr(sig, length)
    if sig.is_float:
        fn = {32: "_f32", 64: "_f64"}.get(sig.length)
        if fn is None:
            raise ValueError(f"float signal {sig.name} has length {sig.length}")
        expr = f"{fn}({expr})"
    # the numeric conversion cantools applies (a value table keeps integer arithmetic, for example)
    conv = BaseConversion.factory(sig.conversion.scale, sig.conversion.offset, None, sig.is_float)
    if not isinstance(conv, IdentityConversion):
        # "+ 0" changes nothing when the product cannot be -0.0 (an integer raw times a positive scale)
        # and adding it would not turn an int into a float
        add_offset = (conv.offset != 0 or conv.scale < 0 or sig.is_float
                      or (isinstance(conv.scale, int) and isinstance(conv.offset, float)))
        expr = f"({expr} * {conv.scale!r}" + (f" + {conv.offset!r})" if add_offset else ")")
    if factor != 1.0 or add != 0.0:
        expr = f"({expr} * {factor!r} + {add!r})"
    return expr


GLOBALS: dict[str, Any] = {"_f32": _unpack_f32, "_f64": _unpack_f64, "_mux": _mux_key, "MuxError": MuxError}


def compile_function(source: str, name: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    """Compile generated source and return the function ``name`` from it."""
    scope = dict(GLOBALS)
    scope.update(namespace)
    exec(compile(source, f"<bmsgw:{name}>", "exec"), scope)  # noqa: S102 - numbers-only source
    fn: Callable[..., Any] = scope[name]
    return fn


@dataclass(frozen=True)
class Page:
    """Signals decoded together: the unmultiplexed ones, or one multiplexer page."""

    signals: tuple[Signal, ...]
    muxes: tuple[tuple[Signal, dict[int, Page]], ...]


def page_tree(message: Message) -> Page:
    """The message's signals as a tree of multiplexer pages (nesting allowed)."""

    def build(parent: str | None, mux_id: int | None) -> Page:
        mine = [
            s
            for s in message.signals
            if s.multiplexer_signal == parent and (mux_id is None or mux_id in (s.multiplexer_ids or ()))
        ]
        muxes = []
        for s in mine:
            if not s.is_multiplexer:
                continue
            # like cantools, a named multiplexer value selects a page even when no signal is on it
            ids = {i for c in message.signals if c.multiplexer_signal == s.name for i in c.multiplexer_ids or ()}
            ids.update(int(k) for k in (s.conversion.choices or {}))
            if ids:
                muxes.append((s, {i: build(s.name, i) for i in ids}))
        return Page(tuple(mine), tuple(muxes))

    return build(None, None)


def walk_pages(page: Page, path: tuple[tuple[Signal, int], ...] = ()) -> Iterator[tuple[tuple[tuple[Signal, int], ...], Page]]:
    """Every page with the (multiplexer, value) path that selects it."""
    yield path, page
    for mux, children in page.muxes:
        for mux_id, child in children.items():
            yield from walk_pages(child, (*path, (mux, mux_id)))


def _dict_source(message: Message) -> tuple[str, dict[str, Any]]:
    """Source of ``decode(le, be) -> dict`` for one message, and its constants."""
    length = message.length
    consts: dict[str, Any] = {}
    lines = ["def decode(le, be):", "    out = {}"]
    counter = iter(range(1 << 30))

    def emit(page: Page, indent: str) -> None:
        for sig in page.signals:
            key = f"_n{next(counter)}"
            consts[key] = sig.name
            lines.append(f"{indent}out[{key}] = {value_expr(sig, length)}")
        for mux, children in page.muxes:
            sel = f"_m{next(counter)}"
            lines.append(f"{indent}{sel} = {selector_expr(mux, length)}")
            for n, (mux_id, child) in enumerate(children.items()):
                lines.append(f"{indent}{'if' if n == 0 else 'elif'} {sel} == {mux_id}:")
                emit(child, indent + "    ")
                if not child.signals and not child.muxes:
                    lines.append(f"{indent}    pass")
            lines.append(f"{indent}else:")
            mname = f"_n{next(counter)}"
            consts[mname] = mux.name
            lines.append(f"{indent}    raise MuxError({mname}, {sel})")

    emit(page_tree(message), "    ")
    lines.append("    return out")
    return "\n".join(lines) + "\n", consts


@dataclass(frozen=True)
class PreparedMessage:
    """A message with its generated decoder."""

    message: Message
    wire_length: int
    _decode: Callable[[int, int], DecodedFrame]

    def decode(self, data: bytes | bytearray) -> DecodedFrame:
        """Decode a payload; raises ValueError on a wrong length or multiplexer value."""
        n = len(data)
        if n != self.message.length and n != self.wire_length:
            raise ValueError(f"length {n} instead of {self.message.length}")
        data = bytes(data[: self.message.length])
        return self._decode(int.from_bytes(data, "little"), int.from_bytes(data, "big"))


def prepare(message: Message) -> PreparedMessage:
    """Generate the decoder for one message."""
    source, consts = _dict_source(message)
    fn = compile_function(source, "decode", consts)
    return PreparedMessage(message, wire_length(message.length), fn)


class Decoder:
    """Decoders for every message of one or more DBC databases, keyed by frame ID."""

    def __init__(self, messages: Iterable[Message]) -> None:
        self.standard: dict[int, PreparedMessage] = {}
        self.extended: dict[int, PreparedMessage] = {}
        #: messages that cannot be decoded (e.g. signals outside the frame), with the reason
        self.unusable: dict[str, str] = {}
        for m in messages:
            try:
                prepared = prepare(m)
            except ValueError as exc:
                self.unusable[m.name] = str(exc)
                continue
            (self.extended if m.is_extended_frame else self.standard)[m.frame_id] = prepared

    def lookup(self, frame_id: int, extended: bool = False) -> PreparedMessage | None:
        """The prepared message for a frame ID, or None when the DBC has none."""
        return (self.extended if extended else self.standard).get(frame_id)

    def decode(self, frame_id: int, data: bytes | bytearray, extended: bool = False) -> DecodedFrame:
        """Decode a frame to {signal: value} (raw numbers, like decode_choices=False)."""
        prepared = self.lookup(frame_id, extended)
        if prepared is None:
            raise KeyError(f"unknown frame ID 0x{frame_id:X}")
        return prepared.decode(data)


def frame_record(msg: can.Message, bus: str, decoder: Decoder | None) -> dict[str, Any]:
    """A frame as plain data (and its decoded signals when a decoder is given)."""
    rec: dict[str, Any] = {"bus": bus, "timestamp": msg.timestamp, "id": msg.arbitration_id,
                           "extended": msg.is_extended_id, "fd": msg.is_fd, "error": msg.is_error_frame,
                           "remote": msg.is_remote_frame, "data": bytes(msg.data).hex()}
    # a remote frame requests data and carries none: nothing to decode, and no decode error
    if decoder is not None and not msg.is_error_frame and not msg.is_remote_frame:
        prepared = decoder.lookup(msg.arbitration_id, msg.is_extended_id)
        if prepared is None:
            rec["decode_error"] = "unknown ID"
        else:
            rec["name"] = prepared.message.name
            try:
                rec["signals"] = prepared.decode(msg.data)
            except ValueError as exc:
                rec["decode_error"] = str(exc)
    return rec
