"""gateway.config.load_config and ``bmsgw config check``: good configs load, bad ones point.

Every error is a ConfigError whose text names the file and the key path (and
the line where one exists), so a technician can fix a config over SSH.
Bad configs are variants of the shipped sim.toml written to tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
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


# -- input that used to pass the check or crash it (audit: parsing of user input) ------------------------


@pytest.mark.parametrize("table, value, key", [
    ("protection.lane", "flight_max_frames_per_s = 0", "protection.lane.flight_max_frames_per_s"),
    ("protection.lane", "flight_max_frames_per_s = -5", "protection.lane.flight_max_frames_per_s"),
    ("protection.lane", "flight_before_s = -1.0", "protection.lane.flight_before_s"),
    ("protection.lane", "flight_after_s = -0.5", "protection.lane.flight_after_s"),
    ("protection.lane", "flight_max_frames_per_s = 100000", "protection.lane.flight_max_frames_per_s"),
    ("protection.lane", "max_missed = 100", "protection.lane.max_missed"),
    ("protection.debounce", "voltage_ms = 600000", "protection.debounce.voltage_ms"),
    ("protection.debounce.per_check", "cell_voltage_high = 3600000", "protection.debounce.per_check.cell_voltage_high"),
    ("protection.plausible", "current_abs_max = -1.0", "protection.plausible.current_abs_max"),
    ("protection.contactors", "open_current_a = -1.0", "protection.contactors.open_current_a"),
    ("protection.contactors", "min_close_interval_s = -10.0", "protection.contactors.min_close_interval_s"),
    ("estimators", "persist_s = 0.0", "estimators.persist_s"),
], ids=["flight-zero", "flight-negative", "before-negative", "after-negative", "ring-beyond-cap", "max-missed",
        "debounce", "debounce-per-check", "current-abs-max", "open-current", "close-interval", "persist"])
def test_physically_meaningless_values_are_refused(tmp_path: Path, sim_text: str, table: str, value: str,
                                                   key: str) -> None:
    """flight_max_frames_per_s = 0 used to pass and then fail every received frame in P0 (protection deaf);
    the others would disable or stall what they configure."""
    path = variant(tmp_path, sim_text, ("auto_close = true", "auto_close = true\n"),
                   append=f"\n[{table}]\n{value}\n") if table != "protection.contactors" else \
        variant(tmp_path, sim_text, ("auto_close = true", f"auto_close = true\n{value}"))
    err = config_error(path)
    assert_points(err, path, key, line_of(path, value))


def test_limits_of_the_range_checks_are_accepted(tmp_path: Path, sim_text: str) -> None:
    """The bounds themselves are good input: 5 x 100 ms missed, 10 s debounce, a 500,000-frame ring."""
    path = variant(tmp_path, sim_text, ("auto_close = true", "auto_close = true\nopen_current_a = 0.0\n"
                                        "min_close_interval_s = 0.0"),
                   append="\n[protection.lane]\ndeadline_ms = 100.0\nmax_missed = 5\nflight_max_frames_per_s = 20000\n"
                          "flight_before_s = 12.0\nflight_after_s = 12.0\n"
                          "[protection.debounce]\ntemperature_ms = 10000.0\n")
    lane = load_config(path).config.protection.lane
    assert (lane.max_missed, lane.flight_max_frames_per_s) == (5, 20000)


def test_the_ring_cap_and_stall_bound_say_why(tmp_path: Path, sim_text: str) -> None:
    err = config_error(variant(tmp_path, sim_text, append="\n[protection.lane]\nflight_max_frames_per_s = 100000\n"))
    assert "500000" in err.reason and "MiB" in err.reason
    err = config_error(variant(tmp_path, sim_text, append="\n[protection.lane]\nmax_missed = 100\n"))
    assert "stalled" in err.reason and "500" in err.reason


NO_USER = "~no-such-user-bmsgw-test"


@pytest.mark.parametrize("old, new, key", [
    ('dbc = ["bmsgw_pack.dbc"]', f'dbc = ["{NO_USER}/pack.dbc"]', "bus[0].dbc[0]"),
    ('map = "bmsgw_pack.toml"', f'map = "{NO_USER}/pack.toml"', "bus[0].map"),
    ('dbc = ["bmsgw_pack.dbc"]', f'dbc = ["{"a" * 300}.dbc"]', "bus[0].dbc[0]"),
    ("period_s = 900", f'period_s = 900\nsot_calibration = "{NO_USER}/c.json"', "eis.sot_calibration"),
    ("initial_soc = 0.5", f'initial_soc = 0.5\n[opcua]\ntrusted_client_certs = ["{NO_USER}/certs"]',
     "opcua.trusted_client_certs[0]"),
    ("initial_soc = 0.5", f'initial_soc = 0.5\n[cloud]\nenabled = true\nhost = "broker"\n[cloud.commands]\n'
                          f'enabled = false\n[cloud.tls]\nenabled = true\nca_file = "{NO_USER}/ca.pem"', "cloud.tls.ca_file"),
    ("initial_soc = 0.5", f'initial_soc = 0.5\n[cloud]\nenabled = true\nhost = "broker"\nusername = "u"\n'
                          f'password_file = "{"p" * 300}"\n[cloud.commands]\nenabled = false', "cloud.password_file"),
    ("initial_soc = 0.5", f'initial_soc = 0.5\n[cloud]\nenabled = true\nhost = "broker"\n'
                          f'store_file = "{NO_USER}/cloud.db"\n[cloud.commands]\nenabled = false', "cloud.store_file"),
], ids=["dbc-user", "map-user", "dbc-too-long", "sot-user", "opcua-user", "cloud-tls-user", "cloud-too-long",
        "cloud-store-user"])
def test_a_path_that_cannot_be_looked_up_is_the_keys_config_error(tmp_path: Path, sim_text: str, old: str, new: str,
                                                                   key: str) -> None:
    """An unknown ~user or a name too long for the file system was a RuntimeError/OSError traceback (exit 1)."""
    path = variant(tmp_path, sim_text, (old, new))
    err = config_error(path)
    needle = next(line for line in new.splitlines() if NO_USER in line or "a" * 300 in line or "p" * 300 in line)
    assert_points(err, path, key, line_of(path, needle))
    assert "no such user" in err.reason or "too long" in err.reason


def test_a_file_in_a_folder_the_user_may_not_enter_is_a_config_error(tmp_path: Path, sim_text: str,
                                                                     repo: Path) -> None:
    """The service user (not root) cannot look into a 0700 folder of another user: a ConfigError, exit 2."""
    import os
    import shutil
    import tempfile

    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0 and setpriv is None:
        pytest.skip("as root without setpriv no folder is closed to us")
    top = Path(tempfile.mkdtemp(prefix="bmsgw-perm-", dir="/tmp"))  # tmp_path's parents are closed to others
    try:
        top.chmod(0o755)
        (top / "private").mkdir()
        shutil.copy(repo / "dbc" / "bmsgw_pack.dbc", top / "private" / "pack.dbc")
        (top / "private").chmod(0o700)
        cfg = variant(top, sim_text, ('dbc = ["bmsgw_pack.dbc"]', 'dbc = ["private/pack.dbc"]'))
        cfg.chmod(0o644)
        if os.geteuid() == 0:  # check as nobody, as the service user would
            proc = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                                   "-m", "gateway.cli", "config", "check", str(cfg)], capture_output=True, text=True,
                                  timeout=60, cwd="/", env={**os.environ, "HOME": "/tmp", "PYTHONPATH": str(repo)})
            assert proc.returncode == 2, proc.stderr
            text = proc.stderr
        else:
            text = str(config_error(cfg))
        assert "Traceback" not in text and "bus[0].dbc[0]" in text and "Permission denied" in text, text
    finally:
        (top / "private").chmod(0o755)
        shutil.rmtree(top)


def dbc_variant(tmp_path: Path, sim_text: str, repo: Path, old: str, new: str) -> tuple[Path, Path]:
    text = (repo / "dbc" / "bmsgw_pack.dbc").read_text(encoding="cp1252")
    assert text.count(old) == 1
    dbc = tmp_path / "pack.dbc"
    dbc.write_text(text.replace(old, new), encoding="cp1252")
    return dbc, variant(tmp_path, sim_text, ('dbc = ["bmsgw_pack.dbc"]', 'dbc = ["pack.dbc"]'))


@pytest.mark.parametrize("old, new", [
    ("BO_ 288 BALANCING_Command: 8 GW", "BO_ 288 BALANCING_Command: 80 GW"),
    ("BO_ 257 PACK_Temperatures: 8 PCU", "BO_ 257 PACK_Temperatures: 65 PCU"),
], ids=["unmapped", "mapped"])
def test_a_dbc_message_longer_than_64_bytes_is_refused_at_its_line(tmp_path: Path, sim_text: str, repo: Path,
                                                                   old: str, new: str) -> None:
    """A mistyped DLC: no CAN frame carries it (it was a StopIteration traceback in config check and replay)."""
    dbc, path = dbc_variant(tmp_path, sim_text, repo, old, new)
    err = config_error(path)
    assert err.file == str(dbc) and err.line == line_of(dbc, new), str(err)
    assert "at most 64" in err.reason and new.split()[2].rstrip(":") in err.reason
    assert "bus[0].dbc[0]" in str(err)


def test_a_corrupt_start_bit_is_refused_at_its_line(tmp_path: Path, sim_text: str, repo: Path) -> None:
    """cantools builds bit tables as large as the start bit (1000000000: 16 s and 2.3 GB, then an empty
    reason); the pre-check refuses it at once, at the SG_ line, with the reason."""
    old = " SG_ VoltageValid : 57|1@1+"
    for start in ("100000", "1000000000"):
        dbc, path = dbc_variant(tmp_path, sim_text, repo, old, f" SG_ VoltageValid : {start}|1@1+")
        with pytest.raises(ConfigError) as info:
            load_dbc(dbc)
        assert info.value.line == line_of(dbc, f"VoltageValid : {start}|"), str(info.value)
        assert f"start bit {start}" in info.value.reason and "outside any CAN frame" in info.value.reason


def test_a_signal_beyond_its_message_but_inside_a_frame_still_loads_leniently(tmp_path: Path, sim_text: str,
                                                                              repo: Path) -> None:
    """Real DBCs (Tesla's, the IVT-S's) have signals past their message's length: still good input."""
    dbc, _ = dbc_variant(tmp_path, sim_text, repo, "BO_ 256 PACK_Measurement: 8 PCU", "BO_ 256 PACK_Measurement: 5 PCU")
    loaded = load_dbc(dbc)  # CurrentValid (bit 56) and VoltageValid (bit 57) lie past byte 5
    assert loaded.warnings and "loaded leniently" in loaded.warnings[0]
    assert loaded.db.get_message_by_name("PACK_Measurement").length == 5


def test_byte_order_marks_in_config_map_and_dbc_are_accepted(tmp_path: Path, sim_text: str, repo: Path) -> None:
    """Windows editors save "UTF-8 with BOM": that is not a syntax error on line 1."""
    (tmp_path / "map.toml").write_text("\ufeff" + (repo / "dbc" / "maps" / "bmsgw_pack.toml").read_text("utf-8"),
                                       encoding="utf-8")
    (tmp_path / "pack.dbc").write_bytes(b"\xef\xbb\xbf" + (repo / "dbc" / "bmsgw_pack.dbc").read_bytes())
    path = variant(tmp_path, sim_text, ('dbc = ["bmsgw_pack.dbc"]', 'dbc = ["pack.dbc"]'),
                   ('map = "bmsgw_pack.toml"', 'map = "map.toml"'))
    path.write_text("\ufeff" + path.read_text(encoding="utf-8"), encoding="utf-8")
    loaded = load_config(path)
    assert loaded.warnings == [] and loaded.image.index("pack.current") >= 0
    assert len(loaded.dbcs["pack"][0].db.messages) == len(load_dbc(repo / "dbc" / "bmsgw_pack.dbc").db.messages)


CLOUD = '\n[cloud]\nenabled = true\nhost = "127.0.0.1"\n'


@pytest.mark.parametrize("template, why", [
    ('"{prefix}/{site}/{gateway}/state{"', "Single '{'"),
    ('"{prefix}/{site}/{gateway}/state}"', "Single '}'"),
    ('"{prefix.x}/{site}/{gateway}/state"', "{prefix.x}"),
    ('"{prefix[9]}/{site}/{gateway}/state"', "{prefix[9]}"),
    ('"{prefix!r}/{site}/{gateway}/state"', "{prefix!r}"),
    ('"{prefix:>9}/{site}/{gateway}/state"', "{prefix:>9}"),
], ids=["stray-open", "stray-close", "attribute", "index", "conversion", "format-spec"])
def test_a_topic_template_the_link_could_not_render_is_refused(tmp_path: Path, sim_text: str, template: str,
                                                               why: str) -> None:
    """They passed the check and crashed `bmsgw run` (exit 1) when the link started."""
    value = f"state = {template}"
    path = variant(tmp_path, sim_text, append=CLOUD + f"[cloud.commands]\nenabled = false\n[cloud.topics]\n{value}\n")
    err = config_error(path)
    assert_points(err, path, "cloud.topics.state", line_of(path, value))
    assert why in err.reason


def test_literal_braces_in_a_topic_are_fine(tmp_path: Path, sim_text: str) -> None:
    path = variant(tmp_path, sim_text,
                   append=CLOUD + '[cloud.commands]\nenabled = false\n[cloud.topics]\nstate = "{prefix}/{{x}}/{gateway}/state"\n')
    cloud = load_config(path).config.cloud
    assert cloud.topics.render("state", "s", "gw") == "bmsgw/{x}/gw/state"


@pytest.mark.parametrize("content, reason", [
    (b"short\n", "fewer than 16 bytes"),
    (None, "not a file"),  # a folder
], ids=["short", "folder"])
def test_the_hmac_secret_file_is_read_at_check_time(tmp_path: Path, sim_text: str, content: bytes | None,
                                                    reason: str) -> None:
    """A secret file shorter than 16 bytes passed `config check` and stopped `bmsgw run` after P0 started."""
    secret = tmp_path / "secret"
    if content is None:
        secret.mkdir()
    else:
        secret.write_bytes(content)
    value = f'hmac_secret_file = "{secret}"'
    path = variant(tmp_path, sim_text, append=CLOUD + f"[cloud.commands]\n{value}\n")
    err = config_error(path)
    assert_points(err, path, "cloud.commands.hmac_secret_file", line_of(path, value))
    assert reason in err.reason


def test_a_password_file_that_is_not_text_is_refused_at_check_time(tmp_path: Path, sim_text: str) -> None:
    (tmp_path / "pw").write_bytes(b"\xff\xfe\x00pw")
    value = 'password_file = "pw"'
    path = variant(tmp_path, sim_text, append=CLOUD + f'username = "gw"\n{value}\n[cloud.commands]\nenabled = false\n')
    err = config_error(path)
    assert_points(err, path, "cloud.password_file", line_of(path, value))
    assert "UTF-8" in err.reason


@pytest.mark.parametrize("old, new, key", [
    ('id = "bmsgw-sim"', 'id = "gw#1"', "gateway.id"),
    ('id = "bmsgw-sim"', 'id = "gw+1"', "gateway.id"),
    ('id = "bmsgw-sim"', 'id = "gw\\u00001"', "gateway.id"),
    ('id = "bmsgw-sim"', 'id = "gw//1"', "gateway.id"),
    ('site = "simulated-site"', 'site = "plant/#"', "gateway.site"),
    ('site = "simulated-site"', 'site = ""', "gateway.site"),
], ids=["id-hash", "id-plus", "id-nul", "id-empty-level", "site-hash", "site-empty"])
def test_a_site_or_id_that_makes_a_topic_the_broker_refuses(tmp_path: Path, sim_text: str, old: str, new: str,
                                                            key: str) -> None:
    """With the link on, the broker would refuse every PUBLISH of these topics (and drop the connection) forever."""
    path = variant(tmp_path, sim_text, (old, new), append=CLOUD + "[cloud.commands]\nenabled = false\n")
    err = config_error(path)
    assert_points(err, path, key, line_of(path, new))
    # the link off: the same id is harmless
    assert load_config(variant(tmp_path, sim_text, (old, new), name="off.toml"))


@pytest.mark.parametrize("append", [
    "\n[cloud]\nenabled = false\n",
    '\n[cloud]\nenabled = false\nhost = "broker.example"\npassword_file = "absent.pw"\nusername = "u"\n',
    '\n[cloud]\nenabled = false\n[cloud.commands]\nmax_ttl_s = 600.0\n[cloud.tls]\nca_file = "absent.pem"\n',
], ids=["plain", "with-host-and-absent-password-file", "with-commands-and-tls-tables"])
def test_cloud_disabled_needs_no_secret_tls_or_files(tmp_path: Path, sim_text: str, append: str) -> None:
    """`enabled = false` was refused for a missing HMAC secret of the (unused) cloud commands."""
    assert not load_config(variant(tmp_path, sim_text, append=append)).config.cloud.enabled


def test_relative_cloud_files_are_next_to_the_config_not_in_the_working_directory(
        tmp_path: Path, sim_text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like DBCs, maps and OPC UA certificates (systemd starts the daemon in /)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "mqtt.pw").write_text("mqtt-password\n")
    (etc / "secret").write_text("0123456789abcdef0123\n")
    for name in ("ca.pem", "client.pem", "client.key"):
        (etc / name).write_text("-----BEGIN CERTIFICATE-----\n")
    path = variant(etc, sim_text, append=CLOUD + 'username = "gw"\npassword_file = "mqtt.pw"\n'
                   '[cloud.commands]\nhmac_secret_file = "secret"\n'
                   '[cloud.tls]\nenabled = true\nca_file = "ca.pem"\ncert_file = "client.pem"\nkey_file = "client.key"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cloud = load_config(path).config.cloud
    assert cloud.password_file == str(etc / "mqtt.pw") and cloud.read_password() == "mqtt-password"
    assert cloud.commands.hmac_secret_file == str(etc / "secret")
    assert cloud.commands.secret() == b"0123456789abcdef0123"
    assert (cloud.tls.ca_file, cloud.tls.cert_file, cloud.tls.key_file) == (
        str(etc / "ca.pem"), str(etc / "client.pem"), str(etc / "client.key"))
    # and a file that is not next to the config is reported with where it was looked for
    (etc / "mqtt.pw").rename(elsewhere / "mqtt.pw")
    err = config_error(path)
    assert_points(err, path, "cloud.password_file", line_of(path, 'password_file = "mqtt.pw"'))
    assert str(etc) in err.reason


def test_configuration_doc_states_the_cloud_defaults_of_the_code(repo: Path) -> None:
    """docs/configuration.md section 15 said commands off, telemetry pack 10 Hz / cells 1 Hz, and that
    [cloud.tls] enabled turns the cloud link on."""
    import re

    from cloudlink.config import CloudSection

    doc = (repo / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = doc.split("## 15. `[cloud]`")[1].split("## 16")[0]
    commands = section.split("`[cloud.commands]`:")[1]
    m = re.search(r"\| `enabled` \| `(\w+)` \|", commands)
    assert m is not None and m.group(1).lower() == str(CloudSection().commands.enabled).lower()
    tel = re.search(r"\| `telemetry` \| ([^|]+)\|", section)
    assert tel is not None
    for c in CloudSection().telemetry:
        assert f"{c.name} {c.rate_hz:g} Hz" in tel.group(1), (c.name, tel.group(1))
    tls = section.split("`[cloud.tls]`:")[1].split("`[cloud.topics]`")[0]
    m = re.search(r"\| `enabled` \| `\w+` \| ([^|]+)\|", tls)
    assert m is not None and "TLS" in m.group(1) and "cloud link on" not in m.group(1)


def test_a_technician_outside_the_service_group_is_sent_to_the_service_socket(tmp_path: Path) -> None:
    """/run/bmsgw is 0750 under systemd: a user outside the group cannot even stat the socket there,
    and the CLI must still pick it (to say "join its group"), not die with a traceback."""
    import gateway.config as config

    if os.geteuid() != 0:
        pytest.skip("needs root to become an unprivileged user")
    top = Path(tempfile.mkdtemp(prefix="bmsgw-run-"))
    try:
        top.chmod(0o755)
        run = top / "bmsgw"
        run.mkdir(mode=0o750)
        (run / "control.sock").touch()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                os.environ.pop("BMSGW_SOCKET", None)
                config.SYSTEM_SOCKET = run / "control.sock"
                try:
                    os.write(w, str(config.default_socket()).encode())
                except BaseException as exc:  # noqa: BLE001 - reported to the parent
                    os.write(w, f"raised {exc!r}".encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            got = f.read()
        os.waitpid(pid, 0)
        assert got == str(run / "control.sock")
    finally:
        shutil.rmtree(top)
