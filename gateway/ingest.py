"""The per-frame hot path: a CAN frame in, mapped signals in the process image out.

For every frame ID that carries mapped signals we generate one handler that
checks the length, turns the payload into integers once, dispatches on the
multiplexer and stores each mapped value, its validity flag and the page's
timestamp straight into the process image buffers, between the two counters
that let readers tell a whole frame from one being written.  Nothing here
scales with the size of the DBC or allocates per signal.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import count

import can
from cantools.database.can import Message

from gateway.decode import Page, compile_function, page_tree, raw_expr, selector_expr, value_expr, wire_length
from gateway.image import ProcessImage
from gateway.signalmap import Binding, MuxPath

# handler return codes below zero; >= 0 is the slot that was refreshed
BAD_LENGTH = -1
BAD_MUX = -2
NOTHING_MAPPED = -3
UNKNOWN_ID = -4
FAILED = -5
REMOTE = -6  # a remote (RTR) frame: a request for data, carrying none

Handler = Callable[[bytes | bytearray, float, float], int]


@dataclass
class IdCounters:
    """Per frame ID counters of frames not decoded (keys: frame IDs, 29-bit ones with bit 31 set)."""

    unknown: dict[int, int] = field(default_factory=dict)
    bad_length: dict[int, int] = field(default_factory=dict)
    bad_mux: dict[int, int] = field(default_factory=dict)
    failed: dict[int, int] = field(default_factory=dict)
    remote: dict[int, int] = field(default_factory=dict)  # RTR requests: normal traffic, not errors

    def total(self) -> dict[str, int]:
        """Decode errors per kind (remote frames are not errors and not in here)."""
        return {k: sum(v.values()) for k, v in vars(self).items() if k != "remote"}


def _ignore(slot: int) -> None:
    """The default of :attr:`Ingest.on_also`: nobody checks the extra slots."""


def frame_key(frame_id: int, extended: bool) -> int:
    return frame_id | (1 << 31) if extended else frame_id


def _handler_source(message: Message, bindings: list[Binding], image: ProcessImage, bus: str,
                    periods: dict[str, float]) -> str:
    """Source of ``handle(data, ts, mono) -> int`` for one message.

    The top page's code is inlined in ``handle`` (its multiplexer pages are functions reached
    through a dict), a page whose only multiplexer decides the result returns its page's result
    directly, and the big-endian integer is only computed when a signal needs it.

    ``handle`` returns one refreshed slot (the deepest page's) or a negative code; a frame that
    refreshes more than one slot (mapped signals on the top level and on a page, several
    multiplexers, or top-level values stored before a bad page value) passes each other one to
    ``E(slot)``, which is :attr:`Ingest.on_also`.
    """
    length = message.length
    by_path: dict[MuxPath, list[Binding]] = {}
    for b in bindings:
        by_path.setdefault(b.path, []).append(b)
    period = periods.get(message.name, (message.cycle_time or 0) / 1000.0)
    blocks: list[str] = []
    exprs: list[str] = []  # every payload expression, to see whether "be" is needed
    names = count()

    def page_body(page: Page, path: MuxPath) -> list[str]:
        body: list[str] = []
        mine = by_path.get(path, [])
        ret = str(NOTHING_MAPPED)
        if mine:
            slot = image.add_slot(bus + ":" + message.name + "".join(f"[{m.name}={v}]" for m, v in path), period)
            for b in mine:
                image.bind(image.index(b.target), slot)
            # the slot's seqlock (gateway/image.py): readers in the main process see this frame whole or retry.
            # "begun" is derived from the finished count, so a frame that fails half-way heals with the next.
            body += [f"w = S[{slot}] + 1", f"B[{slot}] = w"]
            ret = str(slot)
        for b in mine:
            i = image.index(b.target)
            if b.bit is None:
                expr = value_expr(b.signal, length, b.factor, b.add)
            else:
                expr = f"((({raw_expr(b.signal, length)}) >> {b.bit}) & 1)"
            exprs.append(expr)
            body.append(f"V[{i}] = {expr}")
            if b.valid is not None:
                flag, ok = b.valid
                raw = raw_expr(flag, length)
                exprs.append(raw)
                body.append(f"Q[{i}] = {raw} == {next(iter(ok))!r}" if len(set(ok)) == 1 else
                            f"Q[{i}] = {raw} in {set(ok)!r}")
        if mine:
            body += [f"T[{slot}] = ts", f"M[{slot}] = mono", f"S[{slot}] = w"]
        # one multiplexer and nothing of this page's own: the page's result decides (the common case, no extra)
        direct = len(page.muxes) == 1 and ret == str(NOTHING_MAPPED)
        if page.muxes and not direct:
            # "got": the slot this page will return; a slot refreshed before it that is not returned goes to
            # E (Ingest.on_also), so that every refreshed slot is reported, on a bad page value too
            body.append(f"got = {ret}")
        for mux, children in page.muxes:
            table = f"_c{next(names)}"
            child_fns = {v: page_fn(child, (*path, (mux, v))) for v, child in children.items()}
            blocks.append(f"{table} = {{{', '.join(f'{v}: {f}' for v, f in child_fns.items())}}}")
            sel = selector_expr(mux, length)
            exprs.append(sel)
            if direct:
                body += [f"f = {table}.get({sel})", "if f is None:", f"    return {BAD_MUX}",
                         "return f(le, be, ts, mono)"]
                return body
            body += [f"f = {table}.get({sel})",
                     "if f is None:",
                     "    if got >= 0:",
                     "        E(got)",
                     f"    return {BAD_MUX}",
                     "r = f(le, be, ts, mono)",
                     "if r >= 0:",
                     "    if got >= 0:",
                     "        E(got)",
                     "    got = r",
                     f"elif r == {BAD_MUX}:",
                     "    if got >= 0:",
                     "        E(got)",
                     f"    return {BAD_MUX}"]
        body.append("return got" if page.muxes else f"return {ret}")
        return body

    def page_fn(page: Page, path: MuxPath) -> str:
        fn = f"_p{next(names)}"
        body = page_body(page, path)
        blocks.append(f"def {fn}(le, be, ts, mono):\n" + "\n".join("    " + line for line in body))
        return fn

    top = page_body(page_tree(message), ())
    wire = wire_length(length)
    uses_be = any(re.search(r"\bbe\b", e) for e in exprs)
    blocks.append(
        "def handle(data, ts, mono):\n"
        "    n = len(data)\n"
        + (f"    if n != {length}:\n"
           f"        return {BAD_LENGTH}\n" if wire == length else
           f"    if n != {length}:\n"
           f"        if n != {wire}:\n"
           f"            return {BAD_LENGTH}\n"
           f"        data = data[:{length}]\n")
        + "    le = int.from_bytes(data, 'little')\n"
        + ("    be = int.from_bytes(data, 'big')\n" if uses_be else "    be = 0  # no big-endian signal is mapped\n")
        + "\n".join("    " + line for line in top)
    )
    return "\n\n".join(blocks) + "\n"


class Ingest:
    """Decodes frames of one bus into the shared process image and counts what it rejects.

    Construction registers the bus's slots in the image; call :meth:`compile`
    once the image is frozen (every bus registered).
    """

    def __init__(self, bus: str, image: ProcessImage, messages: Iterable[Message], bindings: list[Binding],
                 periods: dict[str, float] | None = None) -> None:
        self.bus = bus
        self.image = image
        self.counters = IdCounters()
        self.clock: Callable[[], float] = time.monotonic  # replay substitutes the trace's clock
        #: called (in the receiving thread, after the slot's stores) with every slot a frame refreshed
        #: besides the one on_frame returns; protection's lane checks them too (see _handler_source)
        self.on_also: Callable[[int], object] = _ignore
        self.handlers: dict[int, Handler] = {}
        by_msg: dict[int, list[Binding]] = {}
        for b in bindings:
            by_msg.setdefault(id(b.message), []).append(b)
        self._sources = {
            frame_key(m.frame_id, m.is_extended_frame): _handler_source(m, by_msg.get(id(m), []), image, bus, periods or {})
            for m in messages
        }

    def compile(self) -> None:
        """Generate the handlers; the image must be frozen."""
        img = self.image
        scope = {"V": img.w_value, "Q": img.w_valid, "T": img.w_rx_time, "M": img.w_rx_mono, "S": img.w_seq,
                 "B": img.w_begun, "E": self._also}
        self.handlers = {key: compile_function(src, "handle", scope) for key, src in self._sources.items()}

    def _also(self, slot: int) -> None:
        # looked up on each call: the lane sets on_also after the handlers were compiled
        self.on_also(slot)

    def on_frame(self, msg: can.Message) -> int:
        """Handle one received frame; returns the refreshed slot or a negative code.

        A frame that refreshed more than one slot has given every other one to :attr:`on_also` first.
        """
        key = msg.arbitration_id | (1 << 31) if msg.is_extended_id else msg.arbitration_id
        if msg.is_remote_frame:  # no payload: neither a bad length nor a refresh of the message's values
            c = self.counters.remote
            c[key] = c.get(key, 0) + 1
            return REMOTE
        handler = self.handlers.get(key)
        if handler is None:
            c = self.counters.unknown
            c[key] = c.get(key, 0) + 1
            return UNKNOWN_ID
        try:
            r = handler(msg.data, msg.timestamp, self.clock())
        except Exception:  # a generated handler must never take the receive thread down
            c = self.counters.failed
            c[key] = c.get(key, 0) + 1
            return FAILED
        if r < 0 and r != NOTHING_MAPPED:
            c = self.counters.bad_length if r == BAD_LENGTH else self.counters.bad_mux
            c[key] = c.get(key, 0) + 1
        return r
