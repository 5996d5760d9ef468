"""gateway.decode.Decoder must return exactly what cantools returns.

cantools is the reference: for every message of real DBC files (foxBMS 2, the
IVT-S current sensor, the Bender iso165C, Tesla Model 3) and of our own pack
DBC, and for a DBC written here that exercises CAN FD, 29-bit IDs, IEEE
floats, big-endian signed signals, nested (extended) multiplexing, value tables
and negative scales, ``Decoder.decode`` must give the same keys and equal
values as ``db.decode_message(frame_id, data, decode_choices=False)``, and
raise ValueError (MuxError for a bad multiplexer value) exactly where cantools
raises DecodeError.

Payloads are random; with probability 1/2 hypothesis also "steers" the
multiplexer fields to values cantools' own signal tree defines (so deep pages
are reached, not only the ones random bytes happen to select).  The steering
writes bits with its own bit-walk, independent of the code under test.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import cantools
import pytest
from cantools.database.can import Database, Message, Signal
from cantools.database.errors import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.decode import FD_LENGTHS, Decoder, MuxError, wire_length

# -- a DBC written for these tests -------------------------------------------------
#
# 0x400       FD, 12 bytes: 4-bit mux with a value table (page 5 is named but empty),
#             big-endian signed 12-bit temperature crossing bytes, 32-bit signed current
# 0x19000001  29-bit, FD, 24 bytes: big-endian signed int32, big-endian float64 with a
#             scale, little-endian float32 with scale and offset, negative scale, value table
# 0x19000002  29-bit, FD, 64 bytes: nested multiplexing Mode -> Sub -> leaves via
#             SG_MUL_VAL_ (ranges, several ids per leaf), a float64 on a nested page,
#             a 33-bit big-endian signed signal, a 64-bit unsigned signal at the end
# 0x401       FD, 10 bytes: travels padded to 12 bytes on the wire
# 0x402/0x403 classic CAN: float32 (one big-endian with negative scale), big-endian float64
FD_DBC = '''VERSION "bmsgw-test"

NS_ :

BS_:

BU_: PCU GW

BO_ 1024 FD_Cells12: 12 PCU
 SG_ Page M : 0|4@1+ (1,0) [0|15] "" GW
 SG_ CellA m0 : 4|13@1+ (0.001,0) [0|8.191] "V" GW
 SG_ CellB m0 : 17|13@1+ (0.001,0) [0|8.191] "V" GW
 SG_ CellC m1 : 4|13@1+ (0.001,0) [0|8.191] "V" GW
 SG_ Temp m1 : 31|12@0- (0.1,-40) [-244.8|164.7] "degC" GW
 SG_ Current : 40|32@1- (0.001,0) [-2147483.648|2147483.647] "A" GW
 SG_ Tail : 87|9@0+ (1,0) [0|511] "" GW

BO_ 2566914049 FD_Extended24: 24 PCU
 SG_ Power : 7|32@0- (1,0) [0|0] "W" GW
 SG_ Energy : 39|64@0- (0.5,0) [0|0] "Wh" GW
 SG_ Ratio : 128|32@1- (2,1) [0|0] "" GW
 SG_ Level : 167|16@0- (-0.25,100) [0|0] "" GW
 SG_ State : 176|3@1+ (1,0) [0|7] "" GW

BO_ 2566914050 FD_Nested64: 64 PCU
 SG_ Mode M : 0|8@1+ (1,0) [0|255] "" GW
 SG_ Sub m1M : 8|8@1+ (1,0) [0|255] "" GW
 SG_ LeafA m0 : 16|16@1- (-0.5,10) [0|0] "" GW
 SG_ LeafB m2 : 23|20@0- (0.01,0) [0|0] "" GW
 SG_ LeafF m3 : 32|64@1- (1,0) [0|0] "" GW
 SG_ Direct m4 : 16|16@1+ (1,0) [0|0] "" GW
 SG_ Always : 440|64@1+ (1,0) [0|0] "" GW
 SG_ BigSigned : 135|33@0- (3,-7) [0|0] "" GW

BO_ 1025 FD_Padded10: 10 PCU
 SG_ First : 7|16@0- (1,0) [0|0] "" GW
 SG_ Last : 72|8@1+ (1,0) [0|0] "" GW

BO_ 1026 Classic_Floats: 8 PCU
 SG_ F32 : 0|32@1- (1,0) [0|0] "" GW
 SG_ F32BE : 39|32@0- (-2,0.5) [0|0] "" GW

BO_ 1027 Classic_Double: 8 PCU
 SG_ F64 : 7|64@0- (1,0) [0|0] "" GW

BA_DEF_ BO_ "VFrameFormat" ENUM "StandardCAN","ExtendedCAN","reserved","J1939PG","reserved","reserved",\
"reserved","reserved","reserved","reserved","reserved","reserved","reserved","reserved","StandardCAN_FD",\
"ExtendedCAN_FD";
BA_DEF_DEF_ "VFrameFormat" "StandardCAN";
BA_ "VFrameFormat" BO_ 1024 14;
BA_ "VFrameFormat" BO_ 2566914049 15;
BA_ "VFrameFormat" BO_ 2566914050 15;
BA_ "VFrameFormat" BO_ 1025 14;

VAL_ 1024 Page 0 "CellsLow" 1 "CellsHigh" 5 "Reserved" ;
VAL_ 2566914049 State 0 "Off" 1 "On" 7 "Fault" ;
VAL_ 2566914050 Mode 0 "Idle" 1 "Nested" 9 "Spare" ;

SIG_VALTYPE_ 2566914049 Ratio : 1;
SIG_VALTYPE_ 2566914049 Energy : 2;
SIG_VALTYPE_ 2566914050 LeafF : 2;
SIG_VALTYPE_ 1026 F32 : 1;
SIG_VALTYPE_ 1026 F32BE : 1;
SIG_VALTYPE_ 1027 F64 : 2;

SG_MUL_VAL_ 2566914050 Sub Mode 1-1;
SG_MUL_VAL_ 2566914050 LeafA Sub 0-0, 5-6;
SG_MUL_VAL_ 2566914050 LeafB Sub 2-2;
SG_MUL_VAL_ 2566914050 LeafF Sub 3-4;
SG_MUL_VAL_ 2566914050 Direct Mode 4-4;
'''.replace("\\\n", "")

# name -> (where, relative path); "corpus" files come from the shared corpus folder
SOURCES = {
    "foxbms": ("corpus", "foxbms/foxbms.dbc"),
    "ivt-s": ("corpus", "foxbms/IVT-S_12082020.dbc"),
    "iso165": ("corpus", "foxbms/iso165_IMD.dbc"),
    "model3": ("corpus", "tesla-model3/Model3CAN.dbc"),
    "bmsgw_pack": ("repo", "dbc/bmsgw_pack.dbc"),
    "written-fd": ("string", ""),
}


@dataclass
class Case:
    """One DBC: cantools' database (the reference) and our decoder built from it."""

    name: str
    db: Database
    strict: bool  # parsed strictly (False: only leniently)
    decoder: Decoder

    @property
    def messages(self) -> list[Message]:
        return list(self.db.messages)


def load_dbc_string(text: str) -> Database:
    db = cantools.database.load_string(text, database_format="dbc")
    assert isinstance(db, Database)
    return db


def decode_raw(msg: Message, data: bytes) -> dict[str, Any]:
    """cantools' raw (unscaled) decoding of a frame."""
    decoded = msg.decode(data, decode_choices=False, scaling=False)
    assert isinstance(decoded, dict)
    return decoded


def load_reference(path: Path) -> tuple[Database, bool]:
    """cantools' database of a DBC, strict when possible, else lenient (like gateway.dbcfile)."""
    try:
        db = cantools.database.load_file(str(path), database_format="dbc", strict=True)
        strict = True
    except cantools.database.errors.Error:
        db = cantools.database.load_file(str(path), database_format="dbc", strict=False)
        strict = False
    assert isinstance(db, Database)
    return db, strict


_CASES: dict[str, Case] = {}


@pytest.fixture(scope="module", params=list(SOURCES))
def case(request: pytest.FixtureRequest) -> Case:
    name = request.param
    if name not in _CASES:
        where, rel = SOURCES[name]
        if where == "string":
            db, strict = load_dbc_string(FD_DBC), True
        else:
            base = request.getfixturevalue("corpus") if where == "corpus" else request.getfixturevalue("repo")
            db, strict = load_reference(base / rel)
        _CASES[name] = Case(name, db, strict, Decoder(db.messages))
    return _CASES[name]


@pytest.fixture(scope="module")
def fd_case() -> Case:
    db = load_dbc_string(FD_DBC)
    return Case("written-fd", db, True, Decoder(db.messages))


# -- helpers independent of the code under test ------------------------------------


def bit_positions(sig: Signal) -> list[int]:
    """Payload bit numbers (byte * 8 + bit) of a signal, least significant bit first."""
    if sig.byte_order == "little_endian":
        return [sig.start + i for i in range(sig.length)]
    # Motorola: the start bit is the MSB; walk down within a byte, then to bit 7 of the next byte
    pos, out = sig.start, []
    for _ in range(sig.length):
        out.append(pos)
        pos = pos - 1 if pos % 8 else pos + 15
    return out[::-1]


def put_raw(buf: bytearray, sig: Signal, raw: int) -> None:
    """Write a raw value (two's complement when negative) into a signal's bits."""
    raw &= (1 << sig.length) - 1
    for i, pos in enumerate(bit_positions(sig)):
        byte, bit = divmod(pos, 8)
        if raw >> i & 1:
            buf[byte] |= 1 << bit
        else:
            buf[byte] &= ~(1 << bit) & 0xFF


Tree = Sequence[Any]  # cantools' Message.signal_tree: names and {mux: {id: subtree}}


def steer(msg: Message, payload: bytes, choose: Callable[[Signal, list[int]], int]) -> bytes:
    """Set the multiplexer fields, top down along cantools' signal tree, to chosen values."""
    buf = bytearray(payload)

    def walk(tree: Tree) -> None:
        for node in tree:
            if isinstance(node, dict):
                for mux_name, pages in node.items():
                    sig = msg.get_signal_by_name(mux_name)
                    mux_id = choose(sig, sorted(pages))
                    put_raw(buf, sig, mux_id)
                    if mux_id in pages:
                        walk(pages[mux_id])

    walk(msg.signal_tree)
    return bytes(buf)


def page_selections(tree: Tree) -> list[dict[str, int]]:
    """Every combination of multiplexer values that selects a page, per cantools' signal tree."""
    combos: list[dict[str, int]] = [{}]
    for node in tree:
        if isinstance(node, dict):
            for mux_name, pages in node.items():
                options = [{mux_name: mux_id, **sub} for mux_id, subtree in pages.items()
                           for sub in page_selections(subtree)]
                combos = [{**c, **o} for c, o in product(combos, options)]
    return combos


def select(msg: Message, payload: bytes, selection: dict[str, int]) -> bytes:
    buf = bytearray(payload)
    for name, mux_id in selection.items():
        put_raw(buf, msg.get_signal_by_name(name), mux_id)
    return bytes(buf)


def fits(sig: Signal, value: int) -> bool:
    """Whether a raw value is representable in the signal's bits."""
    if sig.is_signed:
        return -(1 << (sig.length - 1)) <= value < 1 << (sig.length - 1)
    return 0 <= value < 1 << sig.length


def same_value(a: Any, b: Any) -> bool:
    """Equal and of the same type; floats bit for bit (any NaN equals any NaN, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or struct.pack("<d", a) == struct.pack("<d", b)
    return bool(a == b)


def is_mux_error(exc: DecodeError) -> bool:
    return str(exc).startswith("expected multiplexer id")


def assert_same_as_cantools(case: Case, msg: Message, data: bytes) -> str:
    """Decode with both; return 'ok', 'mux' or 'unpack' (what cantools did)."""
    try:
        expected = case.db.decode_message(msg.frame_id, data, decode_choices=False)
    except DecodeError as exc:
        if msg.name in case.decoder.unusable:
            assert case.decoder.lookup(msg.frame_id, msg.is_extended_frame) is None
            return "unpack"
        with pytest.raises(ValueError) as ours:
            case.decoder.decode(msg.frame_id, data, msg.is_extended_frame)
        if is_mux_error(exc):
            assert isinstance(ours.value, MuxError), f"{msg.name} {data.hex()}: {ours.value!r} for {exc}"
            return "mux"
        return "unpack"
    assert msg.name not in case.decoder.unusable, f"cantools decodes {msg.name}, our decoder refused it"
    got = case.decoder.decode(msg.frame_id, data, msg.is_extended_frame)
    assert isinstance(expected, dict)
    assert set(got) == set(expected), f"{msg.name} {data.hex()}: keys differ"
    bad = {k: (got[k], expected[k]) for k in expected if not same_value(got[k], expected[k])}
    assert not bad, f"{msg.name} payload {data.hex()}: (ours, cantools) = {bad}"
    return "ok"


def cantools_cannot_decode(msg: Message) -> bool:
    """True when cantools fails to unpack some page of the message (not a multiplexer value error)."""
    for selection in page_selections(msg.signal_tree):
        try:
            msg.decode(select(msg, bytes(msg.length), selection), decode_choices=False)
        except DecodeError as exc:
            if not is_mux_error(exc):
                return True
    return False


# -- property tests ----------------------------------------------------------------


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_payloads_decode_like_cantools(case: Case, data: st.DataObject) -> None:
    msg = data.draw(st.sampled_from(case.messages), label="message")
    payload = data.draw(st.binary(min_size=msg.length, max_size=msg.length), label="payload")
    if data.draw(st.booleans(), label="steer multiplexers"):
        def choose(sig: Signal, ids: list[int]) -> int:
            return data.draw(st.sampled_from(ids) | st.integers(0, (1 << sig.length) - 1), label=sig.name)

        payload = steer(msg, payload, choose)
    event(f"cantools: {assert_same_as_cantools(case, msg, payload)}")


def test_every_page_of_every_message_decodes_like_cantools(case: Case) -> None:
    """Deterministic sweep: each message, each multiplexer page, a few fixed random payloads."""
    rng = random.Random(f"bmsgw-{case.name}")
    outcomes: dict[str, set[str]] = {}
    for msg in case.messages:
        for selection in page_selections(msg.signal_tree):
            for _ in range(3):
                payload = bytes(rng.getrandbits(8) for _ in range(msg.length))
                for data in (payload, select(msg, payload, selection)):
                    outcomes.setdefault(msg.name, set()).add(assert_same_as_cantools(case, msg, data))
        for fixed in (bytes(msg.length), b"\xff" * msg.length):
            assert_same_as_cantools(case, msg, fixed)
    # every usable message decoded successfully at least once (so every page was reached)
    assert {n for n, o in outcomes.items() if "ok" not in o} == set(case.decoder.unusable)


def test_unusable_messages_are_exactly_those_cantools_cannot_decode(case: Case) -> None:
    expected = {m.name for m in case.messages if cantools_cannot_decode(m)}
    assert set(case.decoder.unusable) == expected
    for name, reason in case.decoder.unusable.items():
        assert "does not fit" in reason, (name, reason)
    usable = [m for m in case.messages if m.name not in expected]
    assert len(case.decoder.standard) + len(case.decoder.extended) == len(usable)
    for m in usable:
        prepared = case.decoder.lookup(m.frame_id, m.is_extended_frame)
        assert prepared is not None and prepared.message is m


def test_corpus_dbcs_load_as_documented(corpus: Path) -> None:
    """Guards the premises above: Model 3 only parses leniently and has undecodable messages."""
    for rel, strict in [("foxbms/foxbms.dbc", True), ("foxbms/IVT-S_12082020.dbc", True),
                        ("foxbms/iso165_IMD.dbc", True), ("tesla-model3/Model3CAN.dbc", False)]:
        db, was_strict = load_reference(corpus / rel)
        assert was_strict is strict, rel
    model3, _ = load_reference(corpus / "tesla-model3/Model3CAN.dbc")
    dec = Decoder(model3.messages)
    assert dec.unusable, "Model3CAN.dbc has messages whose signals lie outside the frame"
    assert any(s.conversion.scale < 0 for m in model3.messages for s in m.signals)
    foxbms, _ = load_reference(corpus / "foxbms/foxbms.dbc")
    assert sum(m.is_multiplexed() for m in foxbms.messages) == 18


# -- the written FD DBC: features and length handling ------------------------------


def test_written_dbc_has_the_features_it_claims(fd_case: Case) -> None:
    db = fd_case.db
    cells = db.get_message_by_name("FD_Cells12")
    ext = db.get_message_by_name("FD_Extended24")
    nested = db.get_message_by_name("FD_Nested64")
    assert (cells.is_fd, cells.length, cells.is_extended_frame) == (True, 12, False)
    assert (ext.is_fd, ext.length, ext.is_extended_frame, ext.frame_id) == (True, 24, True, 0x19000001)
    assert (nested.is_fd, nested.length, nested.is_extended_frame) == (True, 64, True)
    floats = {s.name: s.length for m in db.messages for s in m.signals if s.is_float}
    assert floats == {"Energy": 64, "Ratio": 32, "LeafF": 64, "F32": 32, "F32BE": 32, "F64": 64}
    assert nested.get_signal_by_name("Sub").is_multiplexer
    assert nested.get_signal_by_name("Sub").multiplexer_signal == "Mode"
    assert sorted(nested.get_signal_by_name("LeafA").multiplexer_ids or []) == [0, 5, 6]
    assert nested.get_signal_by_name("LeafF").multiplexer_ids == [3, 4]
    temp = cells.get_signal_by_name("Temp")
    assert temp.byte_order == "big_endian" and temp.is_signed and temp.start // 8 != (temp.start - 11) // 8
    assert ext.get_signal_by_name("Level").conversion.scale < 0
    assert cells.get_signal_by_name("Page").conversion.choices
    assert fd_case.decoder.unusable == {}


def test_extended_ids_are_looked_up_as_extended(fd_case: Case) -> None:
    dec = fd_case.decoder
    assert dec.lookup(0x19000001, extended=True) is not None
    assert dec.lookup(0x19000001, extended=False) is None
    assert dec.lookup(0x400, extended=False) is not None
    assert dec.lookup(0x400, extended=True) is None
    with pytest.raises(KeyError):
        dec.decode(0x19000001, bytes(24))


def test_known_values(fd_case: Case) -> None:
    """A hand-checked frame, so agreement with cantools is not agreement on a shared mistake."""
    dec = fd_case.decoder
    # Temp: big-endian signed 12 bit, MSB at bit 31 -> byte 3 holds bits 11..4, byte 4 bits 7..4 hold 3..0
    raw = -123 & 0xFFF  # -> (-123 * 0.1) - 40
    data = bytearray(12)
    data[0] = 1  # page 1
    data[3] = raw >> 4
    data[4] = (raw & 0xF) << 4
    out = dec.decode(0x400, bytes(data))
    assert out["Page"] == 1
    assert out["Temp"] == pytest.approx(-123 * 0.1 - 40)
    # Level: negative scale, big-endian signed 16 bit at bytes 20..21
    data = bytearray(24)
    data[20:22] = (-4).to_bytes(2, "big", signed=True)
    out = dec.decode(0x19000001, bytes(data), extended=True)
    assert out["Level"] == pytest.approx(-4 * -0.25 + 100)
    assert out["Ratio"] == 1.0  # float32 0.0 * 2 + 1


def test_nested_multiplexing_selects_pages(fd_case: Case) -> None:
    dec = fd_case.decoder
    frame = bytearray(64)
    frame[0], frame[1] = 1, 3  # Mode 1 -> Sub 3 -> LeafF
    assert set(dec.decode(0x19000002, bytes(frame), extended=True)) == {"Mode", "Sub", "LeafF", "Always", "BigSigned"}
    frame[1] = 6  # Sub 6 -> LeafA (range 5-6)
    assert "LeafA" in dec.decode(0x19000002, bytes(frame), extended=True)
    frame[1] = 1  # Sub 1: no page
    with pytest.raises(MuxError):
        dec.decode(0x19000002, bytes(frame), extended=True)
    frame[0] = 9  # Mode 9: named in the value table, selects an empty page
    assert set(dec.decode(0x19000002, bytes(frame), extended=True)) == {"Mode", "Always", "BigSigned"}
    frame[0] = 2  # Mode 2: neither signals nor a name
    with pytest.raises(MuxError):
        dec.decode(0x19000002, bytes(frame), extended=True)


@pytest.mark.parametrize("name", ["FD_Cells12", "FD_Extended24", "FD_Nested64", "FD_Padded10", "Classic_Floats"])
def test_frames_shorter_than_the_message_raise(fd_case: Case, name: str) -> None:
    msg = fd_case.db.get_message_by_name(name)
    for n in range(msg.length):
        with pytest.raises(ValueError, match="length"):
            fd_case.decoder.decode(msg.frame_id, bytes(n), msg.is_extended_frame)
        with pytest.raises(DecodeError):
            fd_case.db.decode_message(msg.frame_id, bytes(n))


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(min_size=10, max_size=10), pad=st.binary(min_size=2, max_size=2))
def test_fd_frame_padded_to_the_next_fd_length_decodes_like_the_unpadded(fd_case: Case, payload: bytes,
                                                                         pad: bytes) -> None:
    msg = fd_case.db.get_message_by_name("FD_Padded10")
    assert wire_length(msg.length) == 12
    unpadded = fd_case.decoder.decode(msg.frame_id, payload)
    assert fd_case.decoder.decode(msg.frame_id, payload + pad) == unpadded
    assert fd_case.decoder.decode(msg.frame_id, bytearray(payload + pad)) == unpadded
    assert fd_case.db.decode_message(msg.frame_id, payload + pad, decode_choices=False) == unpadded


def test_other_lengths_are_rejected(fd_case: Case) -> None:
    padded = fd_case.db.get_message_by_name("FD_Padded10")
    for n in (11, 13, 16):
        with pytest.raises(ValueError):
            fd_case.decoder.decode(padded.frame_id, bytes(n))
    classic = fd_case.db.get_message_by_name("Classic_Floats")
    with pytest.raises(ValueError):
        fd_case.decoder.decode(classic.frame_id, bytes(12))
    fd12 = fd_case.db.get_message_by_name("FD_Cells12")
    with pytest.raises(ValueError):
        fd_case.decoder.decode(fd12.frame_id, bytes(16))


def test_wire_length_is_the_next_fd_length() -> None:
    for n in range(65):
        w = wire_length(n)
        assert w in FD_LENGTHS and w >= n
        assert not [x for x in FD_LENGTHS if n <= x < w]


@pytest.mark.parametrize("n", [65, 80, 1000])
def test_wire_length_of_a_message_no_frame_carries(n: int) -> None:
    """More than 64 bytes (a DBC's mistyped length) is a ValueError that says so, not a bare StopIteration."""
    with pytest.raises(ValueError, match=rf"{n}-byte message fits no CAN frame"):
        wire_length(n)


def test_bit_walk_helper_agrees_with_cantools(case: Case) -> None:
    """The steering helper writes where cantools reads (else the sweep would prove little)."""
    rng = random.Random(7)
    for msg in case.messages:
        if msg.name in case.decoder.unusable:
            continue
        for selection in page_selections(msg.signal_tree):
            if not all(fits(msg.get_signal_by_name(n), v) for n, v in selection.items()):
                continue  # e.g. Model 3's 1-bit multiplexer whose value table names page 2
            base = select(msg, bytes(rng.getrandbits(8) for _ in range(msg.length)), selection)
            decoded = decode_raw(msg, base)
            assert {k: decoded[k] for k in selection} == selection
            for name in decoded:
                sig = msg.get_signal_by_name(name)
                if sig.is_float or name in selection:
                    continue
                raw = rng.getrandbits(sig.length)
                buf = bytearray(base)
                put_raw(buf, sig, raw)
                expected = raw - (1 << sig.length) if sig.is_signed and raw >> (sig.length - 1) else raw
                assert decode_raw(msg, bytes(buf))[name] == expected, name


# -- divergences from cantools found by these tests (kept failing until fixed) -------

# A 64-bit counter with a value table and a scale written as "1.0": cantools keeps integer
# arithmetic (its NamedSignalConversion wraps an IdentityConversion / LinearIntegerConversion),
# while the generated decoder computes ``raw * 1.0 + 0.0`` from the outer float scale and loses
# every bit beyond 2**53.
VALUE_TABLE_DBC = '''VERSION ""

BU_: A

BO_ 1 Counters: 16 A
 SG_ Count : 0|64@1+ (1.0,0.0) [0|0] "" A
 SG_ Twice : 64|64@1+ (2.0,0) [0|0] "" A

VAL_ 1 Count 0 "Zero" 1 "One" ;
VAL_ 1 Twice 0 "Zero" 1 "One" ;
'''


def test_value_table_signals_keep_cantools_integer_arithmetic() -> None:
    db = load_dbc_string(VALUE_TABLE_DBC)
    data = bytes([0x01] * 8 + [0xFE] * 8)
    expected = db.decode_message(1, data, decode_choices=False)
    assert expected == {"Count": 0x0101010101010101, "Twice": 2 * 0xFEFEFEFEFEFEFEFE}
    got = Decoder(db.messages).decode(1, data)
    assert got == expected
    assert {k: type(v) for k, v in got.items()} == {"Count": int, "Twice": int}


# A multiplexer with a scale or offset: cantools selects the page by the *scaled* value
# (int(raw * scale + offset)), the generated decoder by the raw value; for the same frame the
# two return different signals (or one raises where the other decodes).
SCALED_MUX_DBC = '''VERSION ""

BU_: A

BO_ 1 ScaledMux: 8 A
 SG_ Sel M : 0|8@1+ (2,1) [0|511] "" A
 SG_ OnOne m1 : 8|8@1+ (1,0) [0|255] "" A
 SG_ OnThree m3 : 8|8@1+ (1,0) [0|255] "" A
'''


def test_scaled_multiplexer_selects_the_page_cantools_selects() -> None:
    db = load_dbc_string(SCALED_MUX_DBC)
    case = Case("scaled-mux", db, True, Decoder(db.messages))
    # raw 0 -> cantools: Sel = 1 (page OnOne); raw 1 -> Sel = 3 (page OnThree); raw 2, 3 -> no page
    for raw_selector in range(4):
        assert_same_as_cantools(case, db.messages[0], bytes([raw_selector, 7, 0, 0, 0, 0, 0, 0]))


# A float multiplexer (SIG_VALTYPE_ 1): inf and NaN select no page. int(inf) raised OverflowError,
# which frame_record (replay, candump --decode) did not catch.
FLOAT_MUX_DBC = '''VERSION ""

BU_: N

BO_ 291 FM: 8 N
 SG_ Mux M : 0|32@1- (1,0) [0|0] "" N
 SG_ A m0 : 32|16@1+ (1,0) [0|65535] "" N
 SG_ B m1 : 32|16@1+ (1,0) [0|65535] "" N

SIG_VALTYPE_ 291 Mux : 1;
'''


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e30, 2.0])
def test_a_float_multiplexer_value_without_a_page_is_a_mux_error(value: float) -> None:
    import can

    from gateway.decode import frame_record

    db = load_dbc_string(FLOAT_MUX_DBC)
    dec = Decoder(db.messages)
    data = struct.pack("<f", value) + bytes(4)
    with pytest.raises(MuxError, match="multiplexer Mux = .* selects no page"):
        dec.decode(291, data)
    rec = frame_record(can.Message(arbitration_id=291, is_extended_id=False, data=data), "b", dec)
    assert "signals" not in rec and "selects no page" in rec["decode_error"]
    assert dec.decode(291, struct.pack("<f", 1.0) + bytes([7, 0, 0, 0])) == {"Mux": 1.0, "B": 7}
