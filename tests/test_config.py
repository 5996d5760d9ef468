"""gateway.config.load_config and ``bmsgw config check``: good configs load, bad ones point.

Every error is a ConfigError whose text names the file and the key path (and
the line where one exists), so a technician can fix a config over SSH.
Bad configs are variants of the shipped sim.toml written to tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.config import Loaded, load_config, shipped_config, shipped_dbc_dir
from gateway.dbcfile import load_dbc
from gateway.schema import ConfigError


@pytest.fixture(scope="module")
def sim_text(repo: Path) -> str:
    return (repo / "gateway" / "configs" / "sim.toml").read_text(encoding="utf-8")


def variant(tmp_path: Path, base: str, *edits: tuple[str, str], append: str = "", name: str = "bmsgw.toml") -> Path:
    """Write ``base`` with each (old, new) replaced once (old must be there) and ``append`` added."""
    text = base
    for old, new in edits:
        assert text.count(old) == 1, f"{old!r} is not (exactly once) in the base config"
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text + append, encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if needle in line]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def assert_points(err: ConfigError, file: Path, key: str, line: int | None = None) -> None:
    text = str(err)
    assert str(file) in text, text
    assert f" {key}: " in f" {text}", f"key path {key!r} not named: {text}"
    if line is not None:
        assert err.line == line, text
        assert f"{file}:{line}:" in text, text


# -- shipped configs ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["sim.toml", "socketcan.toml"])
def test_shipped_configs_load(repo: Path, name: str) -> None:
    path = repo / "gateway" / "configs" / name
    assert shipped_config(name) == path
    loaded = load_config(path)
    assert isinstance(loaded, Loaded)
    assert loaded.warnings == []
    cfg = loaded.config
    assert cfg.site.cells == 224 and cfg.site.modules == 16
    assert [b.name for b in cfg.bus] == ["pack"]
    assert [d.path for d in loaded.dbcs["pack"]] == [shipped_dbc_dir() / "bmsgw_pack.dbc"]
    assert loaded.sources[0].signal_map.source == str(shipped_dbc_dir() / "maps" / "bmsgw_pack.toml")
    assert set(loaded.ingests) == {"pack"}
    assert loaded.image.families["cell.voltage"].shape == (224,)
    assert loaded.image.index("pack.current") >= 0
    if name == "sim.toml":
        assert cfg.sim is not None and cfg.sim.bus == "pack"
        assert cfg.bus[0].interface == "virtual"
    else:
        assert cfg.sim is None
        assert (cfg.bus[0].interface, cfg.bus[0].channel) == ("socketcan", "can0")
        assert cfg.gateway.state_dir == "/var/lib/bmsgw"


def test_relative_paths_next_to_the_config_win(tmp_path: Path, sim_text: str) -> None:
    local_dbc = tmp_path / "bmsgw_pack.dbc"
    local_dbc.write_bytes((shipped_dbc_dir() / "bmsgw_pack.dbc").read_bytes())
    loaded = load_config(variant(tmp_path, sim_text))
    assert [d.path for d in loaded.dbcs["pack"]] == [local_dbc.resolve()]


# -- bad configs --------------------------------------------------------------------


def test_toml_syntax_error_names_the_line(tmp_path: Path, sim_text: str) -> None:
    path = variant(tmp_path, sim_text, ('site = "simulated-site"', 'site = "simulated-site'))
    err = config_error(path)
    line = line_of(path, 'site = "simulated-site')
    assert err.line == line
    assert str(err).startswith(f"{path}:{line}: TOML syntax")


@pytest.mark.parametrize("old, new, key, hint", [
    ('log_level = "info"', 'log_levl = "info"', "gateway.log_levl", "did you mean 'log_level'"),
    ("bitrate = 500000", "bitrat = 500000", "bus[0].bitrat", "did you mean 'bitrate'"),
    ("initial_soc = 0.5", "inital_soc = 0.5", "sim.inital_soc", "did you mean 'initial_soc'"),
    ("chemistry = \"NMC\"", "chemistry = \"NMC\"\ncolour = \"red\"", "site.colour", "known keys: "),
], ids=["gateway", "bus", "sim", "no-close-match"])
def test_unknown_key_with_hint_and_line(tmp_path: Path, sim_text: str, old: str, new: str, key: str,
                                        hint: str) -> None:
    path = variant(tmp_path, sim_text, (old, new))
    err = config_error(path)
    assert_points(err, path, key, line_of(path, new.splitlines()[-1]))
    assert err.key == key
    assert hint in err.reason


@pytest.mark.parametrize("old, new, key, reason", [
    ("bitrate = 500000", 'bitrate = "fast"', "bus[0].bitrate", "expected an integer, got a string ('fast')"),
    ("modules_per_string = 16", "modules_per_string = 16.5", "site.modules_per_string", "expected an integer"),
    ("speed = 1.0", "speed = true", "sim.speed", "expected a number, got a boolean"),
    ('dbc = ["bmsgw_pack.dbc"]', 'dbc = "bmsgw_pack.dbc"', "bus[0].dbc", "expected an array"),
    ('id = "bmsgw-sim"', "id = 7", "gateway.id", "expected a string"),
], ids=["int", "int-not-float", "float-not-bool", "list", "str"])
def test_wrong_type(tmp_path: Path, sim_text: str, old: str, new: str, key: str, reason: str) -> None:
    path = variant(tmp_path, sim_text, (old, new))
    err = config_error(path)
    assert_points(err, path, key)
    assert reason in err.reason


@pytest.mark.parametrize("old, new, key", [
    ('chemistry = "NMC"', 'chemistry = "LiPo"', "site.chemistry"),
    ('log_level = "info"', 'log_level = "verbose"', "gateway.log_level"),
], ids=["chemistry", "log_level"])
def test_bad_literal(tmp_path: Path, sim_text: str, old: str, new: str, key: str) -> None:
    path = variant(tmp_path, sim_text, (old, new))
    err = config_error(path)
    assert_points(err, path, key)
    assert "must be one of" in err.reason and repr(new.split('"')[1]) in err.reason


@pytest.mark.parametrize("old, new, key", [
    ('log_level = "info"', 'log_level = "info"\nstale_cycles = 0.5', "gateway.stale_cycles"),
    ("bitrate = 500000", "bitrate = 5000", "bus[0].bitrate"),
    ("initial_soc = 0.5", "initial_soc = 1.5", "sim.initial_soc"),
    ("cells_per_module = 14", "cells_per_module = 99999999", "site.cells_per_module"),
    ("sensors_per_module = 2", "sensors_per_module = 99999999", "site.sensors_per_module"),
    ('channel = "bmsgw-sim"', 'channel = "socket://127.0.0.1"', "bus[0].channel"),
    ('channel = "bmsgw-sim"', 'channel = "socket://127.0.0.1:http"', "bus[0].channel"),
], ids=["gateway", "bus", "sim", "cells-beyond-memory", "sensors-beyond-memory", "socket-without-port",
        "socket-bad-port"])
def test_value_check_names_the_key(tmp_path: Path, sim_text: str, old: str, new: str, key: str) -> None:
    path = variant(tmp_path, sim_text, (old, new))
    assert_points(config_error(path), path, key, line_of(path, new.splitlines()[-1]))


@pytest.mark.parametrize("old, new, key", [
    ("auto_close = true", "auto_close = true\nprecharge_timeout_s = nan", "protection.contactors.precharge_timeout_s"),
    ("initial_soc = 0.5", "initial_soc = 0.5\n[protection.lane]\ndeadline_ms = inf", "protection.lane.deadline_ms"),
    ("initial_soc = 0.5", "initial_soc = 0.5\n[protection.debounce.per_check]\ncell_voltage_high = -inf",
     "protection.debounce.per_check.cell_voltage_high"),
], ids=["nan", "inf", "-inf-in-a-dict"])
def test_non_finite_numbers_are_refused(tmp_path: Path, sim_text: str, old: str, new: str, key: str) -> None:
    """TOML's nan and inf would pass every range check (nan compares false): a precharge without a timeout."""
    path = variant(tmp_path, sim_text, (old, new))
    err = config_error(path)
    assert_points(err, path, key, line_of(path, new.splitlines()[-1]))
    assert "must be a finite number" in err.reason


@pytest.mark.parametrize("old, new, key", [
    ('log_level = "info"', 'log_level = "loud"', "gateway.log_level"),
    ('chemistry = "NMC"', 'chemistry = "LiPo"', "site.chemistry"),
    ("bitrate = 500000", "bitrate = 5e5", "bus[0].bitrate"),
], ids=["gateway", "site", "bus"])
def test_error_line_is_the_line_of_the_key(tmp_path: Path, sim_text: str, old: str, new: str, key: str) -> None:
    """The line in the message is the offending key's (not some other key's of the same name)."""
    path = variant(tmp_path, sim_text, (old, new))
    assert_points(config_error(path), path, key, line_of(path, new))


@pytest.mark.parametrize("value, key, reason", [
    ("max_charge_c = 3.0", "estimators.max_charge_c", "pack_current_charge_max"),  # 180 A against 120 A
    ("max_discharge_c = 2.6", "estimators.max_discharge_c", "pack_current_discharge_max"),  # 156 A against 150 A
    ("max_discharge_c = -1.0", "estimators.max_discharge_c", "must be > 0"),
], ids=["charge", "discharge", "negative"])
def test_estimator_current_ceilings_stay_within_the_hardware(tmp_path: Path, sim_text: str, value: str, key: str,
                                                             reason: str) -> None:
    path = variant(tmp_path, sim_text, append=f"\n[estimators]\n{value}\n")
    err = config_error(path)
    assert_points(err, path, key, line_of(path, value))
    assert reason in err.reason
    proc = cli(path)
    assert proc.returncode == 2 and key in proc.stderr
    assert load_config(variant(tmp_path, sim_text, append="\n[estimators]\nmax_discharge_c = 2.5\n"))  # 150 A


def test_missing_dbc_file(tmp_path: Path, sim_text: str) -> None:
    path = variant(tmp_path, sim_text, ('dbc = ["bmsgw_pack.dbc"]', 'dbc = ["bmsgw_pack.dbc", "pack_v2.dbc"]'))
    err = config_error(path)
    assert_points(err, path, "bus[0].dbc[1]", line_of(path, "pack_v2.dbc"))
    assert "'pack_v2.dbc' not found" in err.reason
    assert str(tmp_path) in err.reason  # where it looked


def test_missing_map_file(tmp_path: Path, sim_text: str) -> None:
    path = variant(tmp_path, sim_text, ('map = "bmsgw_pack.toml"', 'map = "nope.toml"'))
    err = config_error(path)
    assert_points(err, path, "bus[0].map", line_of(path, 'map = "nope.toml"'))


BROKEN_DBC = '''VERSION ""

BU_: PCU

BO_ 256 PACK_Measurement: 8 PCU
 SG_ PackCurrent : 0|24@1- (0.001,0) [-8388.608|8388.607] "A" GW
 SG_ PackVoltage : 24|16@1+ (0.02 0) [0|1310.7] "V" GW
'''


def test_dbc_with_a_syntax_error_names_file_line_and_key(tmp_path: Path, sim_text: str) -> None:
    dbc = tmp_path / "broken.dbc"
    dbc.write_text(BROKEN_DBC, encoding="utf-8")
    path = variant(tmp_path, sim_text, ('dbc = ["bmsgw_pack.dbc"]', 'dbc = ["broken.dbc"]'))
    err = config_error(path)
    text = str(err)
    assert f"{dbc}:7:" in text, text  # the DBC file and the line of the bad SG_
    assert "bus[0].dbc[0]" in text, f"which entry of the config pulled this DBC in? {text}"


def test_map_index_outside_the_site_layout(tmp_path: Path, sim_text: str) -> None:
    path = variant(tmp_path, sim_text, ("modules_per_string = 16", "modules_per_string = 15"))
    err = config_error(path)
    assert_points(err, path, "site")
    assert "cell[210].voltage" in err.reason
    assert str(shipped_dbc_dir() / "maps" / "bmsgw_pack.toml") in err.reason


def test_duplicate_bus_names(tmp_path: Path, sim_text: str) -> None:
    second = ('\n[[bus]]\nname = "pack"\ninterface = "virtual"\nchannel = "other"\n'
              'dbc = ["bmsgw_pack.dbc"]\nmap = "bmsgw_pack.toml"\n')
    path = variant(tmp_path, sim_text, append=second)
    err = config_error(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert_points(err, path, "bus[1].name", lines.index('name = "pack"', lines.index("[sim]")) + 1)
    assert "used twice" in err.reason


def test_sim_bus_naming_no_bus(tmp_path: Path, sim_text: str) -> None:
    path = variant(tmp_path, sim_text, ("speed = 1.0", 'speed = 1.0\nbus = "can1"'))
    err = config_error(path)
    assert_points(err, path, "sim.bus", line_of(path, 'bus = "can1"'))
    assert "'can1'" in err.reason


def test_no_bus_at_all(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text('[gateway]\nid = "x"\n', encoding="utf-8")
    err = config_error(path)
    assert_points(err, path, "bus")


OVERLAP_MAP = """[[signal]]
message = 'foxBMS_State'
signal = 'foxBMS_State'
to = 'bms.state'
"""


def test_strict_dbc_refuses_a_dbc_that_only_parses_leniently(tmp_path: Path, sim_text: str, corpus: Path) -> None:
    dbc = corpus / "foxbms" / "overlapping-signals.dbc"
    (tmp_path / "overlap.toml").write_text(OVERLAP_MAP, encoding="utf-8")
    # a DBC without cell voltages cannot feed protection; this test is about parsing it
    edits = (('dbc = ["bmsgw_pack.dbc"]', f'dbc = ["{dbc}"]'), ('map = "bmsgw_pack.toml"', 'map = "overlap.toml"'),
             ("[protection.contactors]", "[protection]\nenabled = false\n\n[protection.contactors]"))
    # leniently: it loads, with a warning naming the file and the problem
    lenient = load_config(variant(tmp_path, sim_text, *edits, name="lenient.toml"))
    assert len(lenient.warnings) == 1
    assert str(dbc) in lenient.warnings[0] and "overlapping" in lenient.warnings[0]
    assert lenient.image.index("bms.state") >= 0
    # strictly: refused
    path = variant(tmp_path, sim_text, *edits, ('channel = "bmsgw-sim"', 'channel = "bmsgw-sim"\nstrict_dbc = true'),
                   name="strict.toml")
    err = config_error(path)
    text = str(err)
    assert str(dbc) in text and "overlapping" in text
    assert "bus[0].dbc[0]" in text, f"which entry of the config pulled this DBC in? {text}"


def test_load_dbc_strict_and_lenient(corpus: Path) -> None:
    dbc = corpus / "foxbms" / "overlapping-signals.dbc"
    with pytest.raises(ConfigError, match="overlapping"):
        load_dbc(dbc, strict_only=True)
    loaded = load_dbc(dbc)
    assert loaded.warnings and "loaded leniently" in loaded.warnings[0]


def test_unreadable_config(tmp_path: Path) -> None:
    err = config_error(tmp_path / "absent.toml")
    assert str(tmp_path / "absent.toml") in str(err) and "cannot read" in str(err)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[gateway]\nsite = "Zürich"\n'.encode("latin-1"))
    assert "UTF-8" in str(config_error(bad))


# -- the CLI --------------------------------------------------------------------------


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_cli_config_check_bad_file(tmp_path: Path, sim_text: str) -> None:
    path = variant(tmp_path, sim_text, ('log_level = "info"', 'log_levl = "info"'))
    proc = cli(path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"{path}:{line_of(path, 'log_levl')}: gateway.log_levl: unknown key (did you mean 'log_level'?)" \
        in proc.stderr


def test_cli_config_check_good_file_prints_toml(repo: Path) -> None:
    path = repo / "gateway" / "configs" / "sim.toml"
    proc = cli(path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"# {path}: OK")
    resolved = tomllib.loads(proc.stdout)
    assert resolved["gateway"]["id"] == "bmsgw-sim"
    assert resolved["site"]["modules_per_string"] == 16
    assert resolved["bus"][0]["dbc"] == [str(shipped_dbc_dir() / "bmsgw_pack.dbc")]
    assert resolved["sim"]["bus"] == "pack"


def test_cli_config_check_json(repo: Path) -> None:
    path = repo / "gateway" / "configs" / "socketcan.toml"
    proc = cli("--json", path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True
    assert out["file"] == str(path)
    assert out["config"]["bus"][0]["interface"] == "socketcan"
    assert out["buses"][0]["name"] == "pack" and out["buses"][0]["bound_signals"] > 0
    assert out["warnings"] == []
    assert out["image"]["signals"] > 0


def test_protection_refuses_a_map_without_cell_voltages(tmp_path: Path, sim_text: str, corpus: Path) -> None:
    dbc = corpus / "foxbms" / "overlapping-signals.dbc"
    (tmp_path / "overlap.toml").write_text(OVERLAP_MAP, encoding="utf-8")
    path = variant(tmp_path, sim_text, ('dbc = ["bmsgw_pack.dbc"]', f'dbc = ["{dbc}"]'),
                   ('map = "bmsgw_pack.toml"', 'map = "overlap.toml"'))
    err = config_error(path)
    assert err.key == "protection" and "cell voltages" in err.reason and "enabled = false" in err.reason


# -- protection's signals must be able to go stale ----------------------------------------------

CELL_CYCLE_ENTRY = "[[message]]\nname = 'MMU\\d+_CellVoltages'\ncycle_ms = 100\n"


def pack_copy(tmp_path: Path, sim_text: str, *frame_ids: int, keep_map_cycle: bool = False,
              protection: bool = True) -> Path:
    """sim.toml over copies of the shipped DBC and map, the DBC without the cycle time of ``frame_ids``.

    Unless ``keep_map_cycle``, the map also loses its [[message]] cycle_ms for the cell-voltage frames.
    """
    dbc = (shipped_dbc_dir() / "bmsgw_pack.dbc").read_text(encoding="utf-8")
    for fid in frame_ids:
        line = next(ln for ln in dbc.splitlines(keepends=True) if ln.startswith(f'BA_ "GenMsgCycleTime" BO_ {fid} '))
        dbc = dbc.replace(line, "")
    (tmp_path / "pack.dbc").write_text(dbc, encoding="utf-8")
    mp = (shipped_dbc_dir() / "maps" / "bmsgw_pack.toml").read_text(encoding="utf-8")
    assert mp.count(CELL_CYCLE_ENTRY) == 1
    (tmp_path / "pack_map.toml").write_text(mp if keep_map_cycle else mp.replace(CELL_CYCLE_ENTRY, ""),
                                            encoding="utf-8")
    edits = [('dbc = ["bmsgw_pack.dbc"]', 'dbc = ["pack.dbc"]'), ('map = "bmsgw_pack.toml"', 'map = "pack_map.toml"')]
    if not protection:
        edits.append(("[protection.contactors]", "[protection]\nenabled = false\n\n[protection.contactors]"))
    return variant(tmp_path, sim_text, *edits)


@pytest.mark.parametrize("frame_id, message, signal", [
    (514, "MMU02_CellVoltages", "cell[28].voltage"),
    (581, "MMU05_Temperatures", "module[5].temperature[0]"),
    (256, "PACK_Measurement", "pack.current"),
], ids=["cell-voltages", "temperatures", "pack-current"])
def test_protection_refuses_a_watched_message_without_cycle_time(tmp_path: Path, sim_text: str, frame_id: int,
                                                                  message: str, signal: str) -> None:
    """Without a period a silent sender never goes stale: protection would keep judging its last value."""
    path = pack_copy(tmp_path, sim_text, frame_id)
    err = config_error(path)
    assert_points(err, path, "bus[0].map", line_of(path, 'map = "pack_map.toml"'))
    assert message in err.reason and signal in err.reason and "no cycle time" in err.reason
    # how to fix it, and where
    assert "cycle_ms" in err.reason and str(tmp_path / "pack_map.toml") in err.reason
    assert "GenMsgCycleTime" in err.reason and str(tmp_path / "pack.dbc") in err.reason


def test_protection_refusal_lists_every_message_without_cycle_time(tmp_path: Path, sim_text: str) -> None:
    err = config_error(pack_copy(tmp_path, sim_text, 513, 514))
    assert "MMU01_CellVoltages" in err.reason and "MMU02_CellVoltages" in err.reason


def test_a_map_cycle_time_or_an_unwatched_message_or_no_protection_is_fine(tmp_path: Path, sim_text: str) -> None:
    # the map's [[message]] cycle_ms stands in for the DBC's missing attribute
    loaded = load_config(pack_copy(tmp_path, sim_text, 514, keep_map_cycle=True))
    assert loaded.image.period(int(loaded.image.slot_of[loaded.image.index("cell[28].voltage")])) == 0.1
    # PACK_Temperatures (ambient, coolant) is not what protection judges
    load_config(pack_copy(tmp_path, sim_text, 257, keep_map_cycle=True))
    # a read-only gateway watches nothing
    load_config(pack_copy(tmp_path, sim_text, 514, 581, 256, protection=False))
