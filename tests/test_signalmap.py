"""Signal maps (gateway.signalmap): the shipped maps, pattern features, and errors that point.

The shipped maps are resolved against their DBCs (our pack DBC in dbc/, foxBMS'
DBC from the shared corpus) and, for validity flags, fed with frames encoded by
cantools through the real pipeline (``pipeline.build`` + ``Ingest.on_frame``).
Every map error must be a ConfigError naming the map file and the entry key.
"""

from __future__ import annotations

import random
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import can
import cantools
import pytest
from cantools.database.can import Database, Message

from gateway.config import load_config
from gateway.image import ProcessImage, Quality, family_of
from gateway.ingest import Ingest
from gateway.pipeline import BusSource, Layout, build, covering_families
from gateway.schema import ConfigError
from gateway.signalmap import SignalMap, resolve

NOW = 1000.0  # the monotonic clock the ingests see in these tests


def load(path: Path) -> Database:
    db = cantools.database.load_file(str(path), database_format="dbc")
    assert isinstance(db, Database)
    return db


@pytest.fixture(scope="module")
def pack_db(repo: Path) -> Database:
    return load(repo / "dbc" / "bmsgw_pack.dbc")


@pytest.fixture(scope="module")
def pack_map(repo: Path, pack_db: Database) -> SignalMap:
    return resolve(repo / "dbc" / "maps" / "bmsgw_pack.toml", pack_db.messages)


@pytest.fixture(scope="module")
def fox_db(corpus: Path) -> Database:
    return load(corpus / "foxbms" / "foxbms.dbc")


@pytest.fixture(scope="module")
def fox_map(repo: Path, fox_db: Database) -> SignalMap:
    return resolve(repo / "dbc" / "maps" / "foxbms.toml", fox_db.messages)


def canonical(target: str) -> str:
    """The image's spelling of a target: ``module[05].temperature[1]`` -> ``module[5].temperature[1]``."""
    return re.sub(r"\[(\d+)\]", lambda m: f"[{int(m.group(1))}]", target)


def indices(sm: SignalMap, family: str) -> list[tuple[int, ...]]:
    return sorted(family_of(t)[1] for t in sm.targets() if family_of(t)[0] == family)


def pipeline(sm: SignalMap, messages: list[Message], families: dict[str, tuple[int, ...]]
             ) -> tuple[ProcessImage, Ingest]:
    image, ingests = build(families, [BusSource("bus0", messages, sm)])
    ingest = ingests["bus0"]
    ingest.clock = lambda: NOW
    return image, ingest


def page_signals(msg: Message, selection: dict[str, int]) -> list[str]:
    """Names of the signals on the page a multiplexer selection picks (top level included)."""
    out = []
    for s in msg.signals:
        if s.multiplexer_signal is None or selection.get(s.multiplexer_signal) in (s.multiplexer_ids or ()):
            out.append(s.name)
    return out


def frame(msg: Message, values: dict[str, Any]) -> can.Message:
    """A frame encoded by cantools; signals of the selected page not given are encoded as 0."""
    muxes = {s.name: values[s.name] for s in msg.signals if s.is_multiplexer and s.name in values}
    values = {**dict.fromkeys(page_signals(msg, muxes), 0), **values}
    data = msg.encode(values, scaling=True, strict=True)
    return can.Message(arbitration_id=msg.frame_id, is_extended_id=msg.is_extended_frame, data=data,
                       timestamp=1.7e9, is_fd=msg.is_fd)


# -- the shipped map of our pack ---------------------------------------------------


def test_pack_map_binds_the_whole_pack(pack_map: SignalMap) -> None:
    families = Counter(family_of(t)[0] for t in pack_map.targets())
    assert families["cell.voltage"] == 224
    assert families["module.temperature"] == 32
    assert families["cell.balancing"] == 224
    assert indices(pack_map, "cell.voltage") == [(i,) for i in range(224)]
    assert indices(pack_map, "cell.balancing") == [(i,) for i in range(224)]
    assert indices(pack_map, "module.temperature") == [(m, k) for m in range(16) for k in range(2)]
    for scalar in ("pack.current", "pack.voltage"):
        assert pack_map.targets().count(scalar) == 1
    assert len(set(pack_map.targets())) == len(pack_map.targets())
    assert pack_map.cycle_s == {f"MMU{m:02d}_CellVoltages": 0.1 for m in range(16)}


def test_pack_map_binding_details(pack_map: SignalMap) -> None:
    by_target = {canonical(b.target): b for b in pack_map.bindings}
    b = by_target["cell[47].voltage"]  # module 3, cell 5 of 14
    assert (b.message.name, b.signal.name) == ("MMU03_CellVoltages", "Cell05_Voltage")
    assert [(m.name, v) for m, v in b.path] == [("Page", 1)]
    assert b.valid is not None and b.valid[0].name == "Cell05_Invalid"
    assert b.valid[1] == frozenset({0})  # this DBC's value table: 0 = Valid
    bal = by_target["cell[31].balancing"]  # module 2, bit 3
    assert (bal.message.name, bal.signal.name, bal.bit) == ("MMU02_Status", "BalancingActive", 3)
    t = by_target["module[5].temperature[1]"]
    assert (t.message.name, t.signal.name) == ("MMU05_Temperatures", "Sensor1_Temperature")
    assert by_target["pack.current"].valid is not None


def test_pack_frames_through_the_pipeline(pack_db: Database, pack_map: SignalMap) -> None:
    image, ingest = pipeline(pack_map, pack_db.messages, Layout().families())
    cv = pack_db.get_message_by_name("MMU03_CellVoltages")
    values = {"Page": 1, "Cell04_Voltage": 3.701, "Cell05_Voltage": 3.702, "Cell06_Voltage": 3.703,
              "Cell07_Voltage": 3.704, "Cell04_Invalid": 0, "Cell05_Invalid": 1, "Cell06_Invalid": 0,
              "Cell07_Invalid": 0}
    assert ingest.on_frame(frame(cv, values)) >= 0
    r = image.read("cell[47].voltage", now=NOW)  # module 3 x 14 + cell 5
    assert r.value == pytest.approx(3.702) and r.quality is Quality.INVALID
    for cell, v in ((46, 3.701), (48, 3.703), (49, 3.704)):
        r = image.read(f"cell[{cell}].voltage", now=NOW)
        assert r.value == pytest.approx(v) and r.quality is Quality.GOOD
    # stale after 3 x 100 ms (the [[message]] cycle_ms override)
    assert image.read("cell[46].voltage", now=NOW + 0.29).quality is Quality.GOOD
    assert image.read("cell[46].voltage", now=NOW + 0.31).quality is Quality.STALE

    st = pack_db.get_message_by_name("MMU02_Status")
    mask = 0b10_0000_0000_1001
    ingest.on_frame(frame(st, {"BalancingActive": mask, "ModuleVoltage": 51.8, "MmuState": 2, "MmuFault": 0,
                               "AliveCounter": 3}))
    bits = [image.read(f"cell[{28 + k}].balancing", now=NOW).value for k in range(14)]
    assert bits == [float(mask >> k & 1) for k in range(14)]
    assert image.read("module[2].voltage", now=NOW).value == pytest.approx(51.8)

    pm = pack_db.get_message_by_name("PACK_Measurement")
    ingest.on_frame(frame(pm, {"PackCurrent": -12.345, "PackVoltage": 790.5, "LinkVoltage": 789.0,
                               "CurrentValid": 1, "VoltageValid": 0, "AliveCounter": 1}))
    cur, volt = image.read("pack.current", now=NOW), image.read("pack.voltage", now=NOW)
    assert cur.value == pytest.approx(-12.345) and cur.quality is Quality.GOOD  # CurrentValid: 1 = "Valid"
    assert volt.value == pytest.approx(790.5) and volt.quality is Quality.INVALID


# -- the shipped foxBMS map against foxBMS' own DBC ----------------------------------

FOX_LAYOUT = Layout(strings=1, modules_per_string=12, cells_per_module=18, sensors_per_module=15)


def test_foxbms_map_binds_216_cell_voltages(fox_map: SignalMap) -> None:
    assert indices(fox_map, "cell.voltage") == [(i,) for i in range(216)]
    cells = [b for b in fox_map.bindings if family_of(b.target)[0] == "cell.voltage"]
    for b in cells:
        n = family_of(b.target)[1][0]
        assert b.signal.name == f"CellVoltage_{n:03d}"
        assert b.factor == 0.001
        assert b.valid is not None
        assert b.valid[0].name == f"CellVoltage_{n:03d}_invalidFlag"
        assert b.valid[1] == frozenset({1}), "foxBMS' invalidFlag: 1 means Valid (from its value table)"
        assert [v for _, v in b.path] == [n // 4]
    assert indices(fox_map, "module.temperature") == [(m, k) for m in range(12) for k in range(15)]


def test_foxbms_validity_flags_through_the_pipeline(fox_db: Database, fox_map: SignalMap) -> None:
    image, ingest = pipeline(fox_map, fox_db.messages, FOX_LAYOUT.families())
    msg = fox_db.get_message_by_name("f_CellVoltages")
    rng = random.Random(2)
    expected: dict[int, tuple[float, int]] = {}
    for page in range(54):
        values: dict[str, Any] = {"f_CellVoltages_Mux": page}
        for n in range(4 * page, 4 * page + 4):
            mv, flag = rng.randrange(2500, 4300), rng.randrange(2)
            values[f"CellVoltage_{n:03d}"] = mv
            values[f"CellVoltage_{n:03d}_invalidFlag"] = flag
            expected[n] = (mv / 1000, flag)
        assert set(values) == set(page_signals(msg, {"f_CellVoltages_Mux": page}))
        assert ingest.on_frame(frame(msg, values)) >= 0
    assert {f for _, f in expected.values()} == {0, 1}
    assert len(expected) == 216
    quality = image.family_quality("cell.voltage", now=NOW)
    voltages = image.array("cell.voltage")
    for n, (v, flag) in expected.items():
        assert voltages[n] == pytest.approx(v)
        assert quality[n] == (Quality.GOOD if flag == 1 else Quality.INVALID), n
        assert image.read(f"cell[{n}].voltage", now=NOW).quality is (Quality.GOOD if flag == 1 else Quality.INVALID)


def test_foxbms_mux_page_target(fox_db: Database, fox_map: SignalMap) -> None:
    image, ingest = pipeline(fox_map, fox_db.messages, FOX_LAYOUT.families())
    msg = fox_db.get_message_by_name("f_StringValuesP0")
    assert ingest.on_frame(frame(msg, {"f_StringValuesP0_Mux": 0, "Voltage": 801.0, "Current": -15.0})) >= 0
    assert image.read("string[0].voltage", now=NOW).value == pytest.approx(801.0)
    assert image.read("string[0].current", now=NOW).value == pytest.approx(-15.0)


# -- pattern features --------------------------------------------------------------

PATTERNS = r"""
[map]
description = "pattern features"
dbc = "bmsgw_pack.dbc"

[[message]]
name = 'MMU0[01]_Status'
cycle_ms = 250

# 0: {group} inserts the matched text as is
[[signal]]
message = 'MMU(?P<m>\d+)_Temperatures'
signal = 'Board_Temperature'
to = 'board[{m}].temperature'

# 1: arithmetic over named groups, a linear conversion, validity by raw value
# (V -> mV: only into a name whose last word is no quantity with an image unit)
[[signal]]
message = 'MMU(?P<m>0[01])_CellVoltages'
signal = 'Cell(?P<c>\d+)_Voltage'
to = 'cell[{m*14 + c}].voltage_mv'
scale = 1000.0
offset = -1.5
valid = { signal = 'Cell{c}_Invalid', when = [0] }

# 2: the multiplexer value of the page
[[signal]]
message = 'MMU02_CellVoltages'
signal = 'Cell(?P<c>\d+)_Voltage'
to = 'page[{mux}].slot[{c % 4}]'

# 3: one binding per bit
[[signal]]
message = 'MMU(?P<m>1[45])_Status'
signal = 'BalancingActive'
bits = 14
to = 'balance[{(m - 14) * 14 + bit}].on'
"""


def test_pattern_features(tmp_path: Path, pack_db: Database) -> None:
    path = tmp_path / "patterns.toml"
    path.write_text(PATTERNS, encoding="utf-8")
    sm = resolve(path, pack_db.messages)
    targets = sm.targets()
    by_target = {b.target: b for b in sm.bindings}
    # {group}: the text, zero padding included
    assert [t for t in targets if t.startswith("board")] == [f"board[{m}].temperature" for m in range(16)]
    # arithmetic
    assert indices(sm, "cell.voltage_mv") == [(i,) for i in range(28)]
    b = by_target["cell[19].voltage_mv"]
    assert (b.message.name, b.signal.name, b.factor, b.add) == ("MMU01_CellVoltages", "Cell05_Voltage", 1000.0, -1.5)
    assert b.valid is not None and b.valid[0].name == "Cell05_Invalid" and b.valid[1] == frozenset({0})
    # mux
    pages = {t: by_target[t] for t in targets if t.startswith("page")}
    assert len(pages) == 14
    for t, b in pages.items():
        c = int(b.signal.name[4:6])
        assert family_of(t)[1] == (c // 4, c % 4)
        assert [v for _, v in b.path] == [c // 4]
    # bits
    bal = sorted((b.message.name, b.bit, b.target) for b in sm.bindings if b.bit is not None)
    assert len(bal) == 28
    assert bal[0] == ("MMU14_Status", 0, "balance[0].on")
    assert bal[-1] == ("MMU15_Status", 13, "balance[27].on")
    assert sm.cycle_s == {"MMU00_Status": 0.25, "MMU01_Status": 0.25}

    image, ingest = pipeline(sm, pack_db.messages, covering_families(targets))
    cv = pack_db.get_message_by_name("MMU01_CellVoltages")
    ingest.on_frame(frame(cv, {"Page": 1, "Cell04_Voltage": 3.5, "Cell05_Voltage": 3.25, "Cell06_Voltage": 3.0,
                               "Cell07_Voltage": 2.75, "Cell04_Invalid": 0, "Cell05_Invalid": 1,
                               "Cell06_Invalid": 0, "Cell07_Invalid": 0}))
    assert image.read("cell[19].voltage_mv", now=NOW).value == pytest.approx(3.25 * 1000 - 1.5)
    assert image.read("cell[19].voltage_mv", now=NOW).quality is Quality.INVALID
    assert image.read("cell[18].voltage_mv", now=NOW).quality is Quality.GOOD
    st = pack_db.get_message_by_name("MMU15_Status")
    ingest.on_frame(frame(st, {"BalancingActive": 0b1, "ModuleVoltage": 50, "MmuState": 1, "MmuFault": 0,
                               "AliveCounter": 0}))
    assert image.read("balance[14].on", now=NOW).value == 1.0
    assert image.read("balance[15].on", now=NOW).value == 0.0
    tm = pack_db.get_message_by_name("MMU03_Temperatures")
    ingest.on_frame(frame(tm, {"Sensor0_Temperature": 20.0, "Sensor1_Temperature": 21.0, "Board_Temperature": 33.3,
                               "Sensor0_Invalid": 0, "Sensor1_Invalid": 0, "AliveCounter": 0}))
    assert image.read("board[3].temperature", now=NOW).value == pytest.approx(33.3)


# -- errors ------------------------------------------------------------------------

FIRST = """[[signal]]
message = 'PACK_Measurement'
signal = 'PackCurrent'
to = 'pack.current'

"""


def map_error(tmp_path: Path, messages: list[Message], body: str) -> tuple[Path, ConfigError]:
    path = tmp_path / "site_map.toml"
    path.write_text(FIRST + body, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        resolve(path, messages)
    return path, info.value


def assert_points(path: Path, err: ConfigError, key: str) -> None:
    text = str(err)
    assert str(path) in text, text
    assert err.file == str(path)
    assert err.key == key, text
    assert re.search(rf"(^|\s){re.escape(key)}:", text), text


@pytest.mark.parametrize("field, pattern", [("message", "MMU(?P<m>\\d+_Status"), ("signal", "Pack[Voltage")], ids=["message", "signal"])
def test_bad_regex(tmp_path: Path, pack_db: Database, field: str, pattern: str) -> None:
    body = {"message": "PACK_Measurement", "signal": "PackVoltage", field: pattern}
    path, err = map_error(tmp_path, pack_db.messages, "[[signal]]\n" + "".join(
        f"{k} = '{v}'\n" for k, v in body.items()) + "to = 'pack.voltage'\n")
    assert_points(path, err, f"signal[1].{field}")
    assert "regular expression" in err.reason
    assert err.line == 7 + (field == "signal")


@pytest.mark.parametrize("field, entry", [
    ("to", "to = 'cell[{m*14 + q}].voltage'\n"),
    ("valid.signal", "to = 'cell[{m*14 + c}].voltage'\nvalid = { signal = 'Cell{q}_Invalid', when = ['Valid'] }\n"),
], ids=["to", "valid.signal"])
def test_unknown_group_name(tmp_path: Path, pack_db: Database, field: str, entry: str) -> None:
    body = "[[signal]]\nmessage = 'MMU(?P<m>\\d+)_CellVoltages'\nsignal = 'Cell(?P<c>\\d+)_Voltage'\n" + entry
    path, err = map_error(tmp_path, pack_db.messages, body)
    assert "'q'" in str(err)
    assert_points(path, err, f"signal[1].{field}")


def test_entry_matching_nothing(tmp_path: Path, pack_db: Database) -> None:
    path, err = map_error(tmp_path, pack_db.messages,
                          "[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'NoSuchSignal'\nto = 'pack.x'\n")
    assert_points(path, err, "signal[1]")
    assert "NoSuchSignal" in err.reason
    assert err.line == 6  # the [[signal]] header of the entry


def test_message_entry_matching_nothing(tmp_path: Path, pack_db: Database) -> None:
    path, err = map_error(tmp_path, pack_db.messages, "[[message]]\nname = 'BMS_.*'\ncycle_ms = 100\n")
    assert_points(path, err, "message[0].name")


def test_target_bound_twice(tmp_path: Path, pack_db: Database) -> None:
    path, err = map_error(tmp_path, pack_db.messages,
                          "[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'PackVoltage'\nto = 'pack.current'\n")
    assert_points(path, err, "signal[1].to")
    assert "PackCurrent" in err.reason and "PackVoltage" in err.reason


def test_target_bound_twice_under_another_spelling(tmp_path: Path, pack_db: Database) -> None:
    """cell[03] (text of a group) and cell[3] (arithmetic) are the same image element."""
    body = ("[[signal]]\nmessage = 'MMU00_CellVoltages'\nsignal = 'Cell(?P<c>0[0-9])_Voltage'\n"
            "to = 'cell[{c}].voltage'\n\n"
            "[[signal]]\nmessage = 'MMU00_CellVoltages'\nsignal = 'Cell(?P<c>0[0-9])_Invalid'\n"
            "to = 'cell[{c*1}].voltage'\n")
    path, err = map_error(tmp_path, pack_db.messages, body)
    assert_points(path, err, "signal[2].to")


def test_flag_signal_missing(tmp_path: Path, pack_db: Database) -> None:
    path, err = map_error(tmp_path, pack_db.messages,
                          "[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'PackVoltage'\nto = 'pack.voltage'\n"
                          "valid = { signal = 'VoltageOk', when = ['Valid'] }\n")
    assert_points(path, err, "signal[1].valid.signal")
    assert "VoltageOk" in err.reason


def test_flag_on_another_page_is_missing(tmp_path: Path, pack_db: Database) -> None:
    # Cell04 is on page 1, Cell00_Invalid on page 0
    path, err = map_error(tmp_path, pack_db.messages,
                          "[[signal]]\nmessage = 'MMU00_CellVoltages'\nsignal = 'Cell04_Voltage'\nto = 'cell[4].voltage'\n"
                          "valid = { signal = 'Cell00_Invalid', when = ['Valid'] }\n")
    assert_points(path, err, "signal[1].valid.signal")


def test_when_value_not_in_the_value_table(tmp_path: Path, pack_db: Database) -> None:
    path, err = map_error(tmp_path, pack_db.messages,
                          "[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'PackVoltage'\nto = 'pack.voltage'\n"
                          "valid = { signal = 'VoltageValid', when = ['Good'] }\n")
    assert_points(path, err, "signal[1].valid.when")
    assert "'Good'" in err.reason and "Valid" in err.reason


def test_bits_longer_than_the_signal(tmp_path: Path, pack_db: Database) -> None:
    path, err = map_error(tmp_path, pack_db.messages,
                          "[[signal]]\nmessage = 'MMU(?P<m>\\d+)_Status'\nsignal = 'BalancingActive'\nbits = 15\n"
                          "to = 'cell[{m*14 + bit}].balancing'\n")
    assert_points(path, err, "signal[1].bits")


def test_unknown_key_in_a_map(tmp_path: Path, pack_db: Database) -> None:
    path, err = map_error(tmp_path, pack_db.messages,
                          "[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'PackVoltage'\nto = 'pack.voltage'\n"
                          "scal = 2.0\n")
    assert_points(path, err, "signal[1].scal")
    assert "did you mean 'scale'" in err.reason
    assert err.line == 10


def test_target_that_is_no_canonical_name(tmp_path: Path, pack_db: Database) -> None:
    path, err = map_error(tmp_path, pack_db.messages,
                          "[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'PackVoltage'\nto = 'Pack-Voltage'\n")
    assert_points(path, err, "signal[1].to")


def test_index_outside_the_layout(tmp_path: Path) -> None:
    """The site has 16 modules; the entry maps module m to module[m + 1], so MMU15 is outside."""
    map_path = tmp_path / "shifted.toml"
    map_path.write_text(FIRST + "[[signal]]\nmessage = 'MMU(?P<m>\\d+)_Status'\nsignal = 'ModuleVoltage'\n"
                                "to = 'module[{m + 1}].voltage'\n", encoding="utf-8")
    cfg = tmp_path / "site.toml"
    cfg.write_text('[site]\nmodules_per_string = 16\n\n[[bus]]\nname = "pack"\ninterface = "virtual"\n'
                   'channel = "x"\ndbc = ["bmsgw_pack.dbc"]\nmap = "shifted.toml"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    text = str(info.value)
    assert "module[16].voltage" in text
    assert str(map_path) in text
    assert "signal[1]" in text, f"the error should name the map entry: {text}"


@pytest.mark.parametrize("which", ["pack", "fox"])
def test_random_frames_land_in_the_image_exactly_as_cantools_decodes_them(which: str,
                                                                        request: pytest.FixtureRequest) -> None:
    """Every mapped signal of every message, random payloads: the image holds cantools' value (times the
    map's scale plus its offset) bit for bit, one bit of it for bit bindings, and the validity flag's verdict."""
    db: Database = request.getfixturevalue(f"{which}_db")
    sm: SignalMap = request.getfixturevalue(f"{which}_map")
    image, ingest = pipeline(sm, db.messages, (Layout() if which == "pack" else FOX_LAYOUT).families())
    by_message: dict[str, list[Any]] = {}
    for b in sm.bindings:
        by_message.setdefault(b.message.name, []).append(b)
    rng = random.Random(7)
    checked = 0
    for name, bindings in by_message.items():
        msg = db.get_message_by_name(name)
        for _ in range(120):
            data = bytes(rng.randrange(256) for _ in range(msg.length))
            try:
                scaled = msg.decode(data, decode_choices=False, scaling=True)
                raw = msg.decode(data, decode_choices=False, scaling=False)
            except cantools.database.DecodeError:
                continue  # a multiplexer value without a page: the handler refuses it (counted as bad_mux)
            assert isinstance(scaled, dict) and isinstance(raw, dict)
            ingest.on_frame(can.Message(arbitration_id=msg.frame_id, is_extended_id=msg.is_extended_frame,
                                        data=data, is_fd=msg.is_fd))
            for b in bindings:
                if any(raw.get(m.name) != v for m, v in b.path):
                    continue  # another page
                i = image.index(b.target)
                if b.bit is not None:
                    expected = float((int(raw[b.signal.name]) >> b.bit) & 1)
                else:
                    value = scaled[b.signal.name]
                    expected = float(value * b.factor + b.add if (b.factor, b.add) != (1.0, 0.0) else value)
                got = float(image.value[i])
                assert struct.pack("<d", got) == struct.pack("<d", expected) or (got != got and expected != expected), \
                    (name, b.target, data.hex(), got, expected)
                if b.valid is not None:
                    flag, ok = b.valid
                    assert bool(image.valid[i]) == (raw[flag.name] in ok), (name, b.target, data.hex())
                checked += 1
    assert checked > 1000


def test_bad_regex_in_a_message_entry(tmp_path: Path, pack_db: Database) -> None:
    """A [[message]] name is a regular expression too: a bad one is the map's error, not a re.error traceback."""
    path, err = map_error(tmp_path, pack_db.messages, "[[message]]\nname = 'MMU(\\d+_CellVoltages'\ncycle_ms = 100\n")
    assert_points(path, err, "message[0].name")
    assert "regular expression" in err.reason
    assert err.line == 7


@pytest.mark.parametrize("when", ["2", "-1", "1, 2"])
def test_when_raw_value_the_flag_cannot_hold(tmp_path: Path, pack_db: Database, when: str) -> None:
    """CurrentValid is 1 bit (0..1): 2 (or -1) would leave pack.current invalid forever."""
    path, err = map_error(tmp_path, pack_db.messages,
                          "[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'PackVoltage'\nto = 'pack.voltage'\n"
                          f"valid = {{ signal = 'VoltageValid', when = [{when}] }}\n")
    assert_points(path, err, "signal[1].valid.when")
    assert "VoltageValid" in err.reason and "0..1" in err.reason


def test_when_raw_values_the_flag_holds_are_fine(tmp_path: Path, pack_db: Database) -> None:
    path = tmp_path / "site_map.toml"
    path.write_text(FIRST + "[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'PackVoltage'\nto = 'pack.voltage'\n"
                    "valid = { signal = 'VoltageValid', when = [0, 1] }\n", encoding="utf-8")
    b = next(b for b in resolve(path, pack_db.messages).bindings if b.target == "pack.voltage")
    assert b.valid is not None and b.valid[1] == frozenset({0, 1})


def test_a_map_with_a_byte_order_mark_loads(tmp_path: Path, repo: Path, pack_db: Database) -> None:
    """Windows Notepad saves "UTF-8 with BOM": that is no TOML syntax error on line 1."""
    path = tmp_path / "bom_map.toml"
    path.write_text("\ufeff" + (repo / "dbc" / "maps" / "bmsgw_pack.toml").read_text(encoding="utf-8"),
                    encoding="utf-8")
    assert len(resolve(path, pack_db.messages).bindings) == len(
        resolve(repo / "dbc" / "maps" / "bmsgw_pack.toml", pack_db.messages).bindings)
