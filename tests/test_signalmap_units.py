"""Signal maps: units and scales, useless entries, and bindings the DBC message cannot carry.

Every refusal is a ConfigError naming the map file, the entry key and its line (exit 2 at start-up).
"""

from __future__ import annotations

from pathlib import Path

import cantools
import pytest
from cantools.database.can import Database

from gateway.dbcfile import load_dbc
from gateway.schema import ConfigError
from gateway.signalmap import resolve

PACK_DBC = Path(__file__).resolve().parents[1] / "dbc" / "bmsgw_pack.dbc"


@pytest.fixture(scope="module")
def pack_db() -> Database:
    db = cantools.database.load_file(str(PACK_DBC), database_format="dbc")
    assert isinstance(db, Database)
    return db


def refused(tmp_path: Path, db: Database, body: str) -> ConfigError:
    path = tmp_path / "m.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        resolve(path, db.messages)
    assert info.value.file == str(path) and str(path) in str(info.value)
    return info.value


CELLS = "[[signal]]\nmessage = 'MMU(?P<m>\\d+)_CellVoltages'\nsignal = 'Cell(?P<c>\\d+)_Voltage'\n"
TEMPS = "[[signal]]\nmessage = 'MMU(?P<m>\\d+)_Temperatures'\nsignal = 'Sensor(?P<k>\\d)_Temperature'\n"


@pytest.mark.parametrize(("body", "key", "line", "words"), [
    # the DBC's cell voltages are in V; x 1000 would leave the image in mV
    (CELLS + "to = 'cell[{m*14 + c}].voltage'\nscale = 1000.0\n", "signal[0].scale", 5, ["in V", "scale = 1"]),
    # a current bound to a voltage signal
    ("[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'PackVoltage'\nto = 'string[0].current'\n",
     "signal[0].signal", 3, ["PackVoltage is in V", "string[0].current is in A"]),
    # degC + 273.15: Kelvin in the image
    (TEMPS + "to = 'module[{m}].temperature[{k}]'\noffset = 273.15\n", "signal[0].offset", 5, ["offset = 0"]),
    # scale = 0: always 0
    ("[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'PackVoltage'\nto = 'pack.voltage'\nscale = 0.0\n",
     "signal[0].scale", 5, ["must not be 0"]),
    # when = []: never valid
    ("[[signal]]\nmessage = 'PACK_Measurement'\nsignal = 'PackCurrent'\nto = 'pack.current'\n"
     "valid = { signal = 'CurrentValid', when = [] }\n", "signal[0].valid.when", 5, ["at least one"]),
    # division and modulo by zero in a template
    (CELLS + "to = 'cell[{m*14 + c // 0}].voltage'\n", "signal[0].to", 4, ["divides by zero"]),
    (CELLS + "to = 'cell[{(m*14 + c) % (m - m)}].voltage'\n", "signal[0].to", 4, ["divides by zero", "m = 0"]),
], ids=["mV-in-image", "current-from-volts", "kelvin", "scale-0", "when-empty", "div-0", "mod-0"])
def test_entries_that_would_fill_the_image_wrongly_are_refused(tmp_path: Path, pack_db: Database, body: str,
                                                               key: str, line: int, words: list[str]) -> None:
    err = refused(tmp_path, pack_db, body)
    assert (err.key, err.line) == (key, line), str(err)
    for w in words:
        assert w in err.reason, str(err)


UNITS_DBC = '''VERSION ""

BU_: A

BO_ 1 Units: 8 A
 SG_ CellMilli : 0|16@1+ (1,0) [0|65535] "mV" A
 SG_ PowerKilo : 16|16@1- (0.1,0) [0|0] "kW" A
 SG_ TempKelvin : 32|16@1+ (0.1,0) [0|0] "K" A
 SG_ TempC : 48|8@1- (1,0) [0|0] "C" A

BO_ 2 More: 8 A
 SG_ PackVolt : 0|16@1+ (0.1,0) [0|0] " Volt " A
 SG_ CurrentNoUnit : 16|16@1- (0.1,0) [0|0] "" A
 SG_ CurrentMilli : 32|16@1- (1,0) [0|0] "MA" A
 SG_ Insulation : 48|16@1+ (1,0) [0|0] "kOhm" A
'''

UNITS_MAP = """
[[signal]]
message = 'Units'
signal = 'CellMilli'
to = 'cell[0].voltage'
scale = 0.001

[[signal]]
message = 'Units'
signal = 'PowerKilo'
to = 'pack.power'
scale = 1000.0

[[signal]]
message = 'Units'
signal = 'TempKelvin'
to = 'module[0].temperature[0]'
offset = -273.15

[[signal]]
message = 'Units'
signal = 'TempC'
to = 'module[0].board_temperature'

[[signal]]
message = 'More'
signal = 'PackVolt'
to = 'pack.voltage'

[[signal]]
message = 'More'
signal = 'CurrentNoUnit'
to = 'pack.current'
scale = 0.001          # no unit in the DBC: trusted as written

[[signal]]
message = 'More'
signal = 'CurrentMilli'
to = 'string[0].current'
scale = -0.001         # mA (spelt MA), and the other sign convention

[[signal]]
message = 'More'
signal = 'Insulation'
to = 'pack.insulation_resistance'
scale = 1000.0

[[signal]]
message = 'More'
signal = 'PackVolt'
to = 'pack.alive_counter'  # no quantity with a unit: not checked
scale = 7.0
"""


def test_common_dbc_unit_spellings_load_with_the_scale_they_need(tmp_path: Path) -> None:
    db = cantools.database.load_string(UNITS_DBC, database_format="dbc")
    assert isinstance(db, Database)
    path = tmp_path / "units.toml"
    path.write_text(UNITS_MAP, encoding="utf-8")
    sm = resolve(path, db.messages)
    assert len(sm.bindings) == 9
    # and the wrong scale for each of them is refused
    for wrong in ("scale = 0.001\n", "scale = 1000.0\n", "offset = -273.15\n", "scale = -0.001 "):
        text = UNITS_MAP.replace(wrong, "", 1)
        assert text != UNITS_MAP
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=r"signal\[\d\]\.(scale|offset): .* needs scale"):
            resolve(path, db.messages)


def test_unit_of_names_by_their_last_word() -> None:
    from gateway.signalmap import unit_of

    assert [unit_of(n) for n in ("cell[3].voltage", "module[1].board_temperature", "pack.current", "pack.power",
                                 "pack.insulation_resistance", "module[2].state", "cell[1].balancing",
                                 "pack.alive_counter", "cell[0].voltage_mv")] == \
        ["V", "degC", "A", "W", "ohm", None, None, None, None]


@pytest.mark.parametrize("map_name", ["bmsgw_pack.toml", "foxbms.toml"])
def test_the_shipped_maps_have_the_image_units(map_name: str, corpus: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    dbc = PACK_DBC if map_name == "bmsgw_pack.toml" else corpus / "foxbms" / "foxbms.dbc"
    sm = resolve(repo / "dbc" / "maps" / map_name, load_dbc(dbc).db.messages)
    assert sm.bindings


def test_a_signal_outside_its_message_is_the_entry_error(tmp_path: Path, corpus: Path) -> None:
    """Model3CAN.dbc (lenient) has messages whose signals lie outside the frame: binding one must not pass
    start-up (it used to fail later, when the ingest was generated, reported under [site])."""
    tesla = load_dbc(corpus / "tesla-model3" / "Model3CAN.dbc")
    path = tmp_path / "tesla.toml"
    path.write_text("# a map for the Model 3\n[[signal]]\nmessage = 'ID5D5RearDItemps'\nsignal = 'DI_lashAngle'\n"
                    "to = 'pack.ambient_temperature'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        resolve(path, tesla.db.messages)
    err = info.value
    assert (err.file, err.key, err.line) == (str(path), "signal[0]", 2)
    assert "DI_lashAngle does not fit" in err.reason


def test_config_check_names_the_map_entry_not_the_site(tmp_path: Path, corpus: Path) -> None:
    from gateway.config import load_config

    (tmp_path / "tesla.toml").write_text("[[signal]]\nmessage = 'ID5D5RearDItemps'\nsignal = 'DI_lashAngle'\n"
                                         "to = 'pack.ambient_temperature'\n", encoding="utf-8")
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[[bus]]\nname = "pack"\ninterface = "virtual"\nchannel = "x"\n'
                   f'dbc = ["{corpus / "tesla-model3" / "Model3CAN.dbc"}"]\nmap = "tesla.toml"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert (info.value.file, info.value.key, info.value.line) == (str(tmp_path / "tesla.toml"), "signal[0]", 1)
