"""`bmsgw replay`: recorded traces through the same decode pipeline as the daemon."""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path

import can
import pytest

from drivers.sim_pack import SimPack
from gateway.replay import Replay
from gateway.tracefile import read_trace
from tests.procs import ROOT, bmsgw_cmd

CORPUS = ROOT.parent / "shared" / "corpus"
FOX = CORPUS / "foxbms"
needs_corpus = pytest.mark.skipif(not FOX.is_dir(), reason="../shared/corpus is not beside the checkout")


@needs_corpus
def test_foxbms_trace_decodes_what_the_dbc_still_describes() -> None:
    rp = Replay(read_trace(FOX / "test_log.txt"), [FOX / "foxbms.dbc"], ROOT / "dbc/maps/foxbms.toml")
    recs = list(rp.frames())
    st = rp.stats.as_dict()
    # the trace predates this DBC (schema drift): 0x246..0x24F and 0x35C/0x35D are no longer defined
    assert st["frames"] == len(recs) == 301
    assert st["decoded"] == 158
    assert st["unknown_id_frames"] == 143
    assert st["decode_error_frames"] == 0
    assert set(st["unknown_ids"]) == {"0x246", "0x247", "0x248", "0x249", "0x24A", "0x24B", "0x24C", "0x24D",
                                      "0x24E", "0x24F", "0x251", "0x35C", "0x35D"}
    sig = {s["name"]: s for s in rp.signals()}
    # the one f_CellVoltages frame (0x250) has its invalidFlag bits at 0 = Invalid, and the map honours that
    assert sig["cell[0].voltage"]["quality"] == "invalid"
    assert sig["bms.state"]["quality"] == "good"


@needs_corpus
def test_replay_cli_json_summary() -> None:
    r = subprocess.run(bmsgw_cmd("replay", str(FOX / "test_log.txt"), "--dbc", str(FOX / "foxbms.dbc"), "--json"),
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["summary"]["frames"] == 301 and out["summary"]["decoded"] == 158


def test_candump_log_of_the_simulator_replays_into_the_same_image(tmp_path: Path) -> None:
    frames: list[can.Message] = []
    sim = SimPack(str(ROOT / "dbc/bmsgw_pack.dbc"), frames.append, seed=3)
    for _ in range(150):
        sim.tick()
    log = tmp_path / "sim.log"
    with can.CanutilsLogWriter(str(log), channel="can0") as w:
        for f in frames:
            w.on_message_received(f)
    rp = Replay(read_trace(log), [ROOT / "dbc/bmsgw_pack.dbc"], ROOT / "dbc/maps/bmsgw_pack.toml")
    for _ in rp.frames():
        pass
    assert rp.stats.decoded == len(frames)
    assert rp.image is not None
    cells = rp.image.array("cell.voltage")
    truth = sim.pack.measure().cell_voltages_v  # what the simulated electronics reports
    assert cells.shape == (224,)
    assert abs(cells - truth).max() < 0.01  # 1 mV resolution, noise and a tick or two of drift


def test_unreadable_trace_is_exit_2_and_bad_lines_are_counted(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage")
    r = subprocess.run(bmsgw_cmd("replay", str(junk), "--dbc", str(ROOT / "dbc/bmsgw_pack.dbc")),
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and str(junk) in r.stderr
    log = tmp_path / "mixed.log"
    log.write_text("(1.000000) can0 100#0000000000000000\nthis is not a frame\n(1.010000) can0 100#00\n")
    r = subprocess.run(bmsgw_cmd("replay", str(log), "--dbc", str(ROOT / "dbc/bmsgw_pack.dbc"), "--json"),
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    out = json.loads(r.stdout)["summary"]
    assert out["frames"] == 2 and out["decoded"] == 1 and out["bad_lines"] == 1 and out["decode_error_frames"] == 1


def test_remote_frames_are_counted_apart_from_decode_errors(tmp_path: Path) -> None:
    log = tmp_path / "rtr.log"
    log.write_text("(1.0) can0 100#R8\n(1.1) can0 100#R\n(1.2) can0 7AB#R2\n(1.3) can0 100#0000000000000000\n")
    rp = Replay(read_trace(log), [ROOT / "dbc/bmsgw_pack.dbc"], ROOT / "dbc/maps/bmsgw_pack.toml")
    recs = list(rp.frames())
    st = rp.stats.as_dict()
    assert (st["frames"], st["decoded"], st["remote_frames"]) == (4, 1, 3)
    assert st["decode_error_frames"] == st["unknown_id_frames"] == 0
    assert all("decode_error" not in r for r in recs)
    assert rp.ingest is not None and rp.ingest.counters.total()["bad_length"] == 0


def test_a_float_multiplexer_of_inf_or_nan_is_a_decode_error_not_a_crash(tmp_path: Path) -> None:
    import struct

    dbc = tmp_path / "floatmux.dbc"
    dbc.write_text('VERSION ""\n\nBU_: N\n\nBO_ 291 FM: 8 N\n SG_ Mux M : 0|32@1- (1,0) [0|0] "" N\n'
                   ' SG_ A m0 : 32|16@1+ (1,0) [0|65535] "" N\n SG_ B m1 : 32|16@1+ (1,0) [0|65535] "" N\n\n'
                   'SIG_VALTYPE_ 291 Mux : 1;\n')
    log = tmp_path / "floatmux.log"
    log.write_text("".join(f"({i + 1}.0) can0 123#{(struct.pack('<f', v) + bytes(4)).hex().upper()}\n"
                           for i, v in enumerate([0.0, 1.0, float("inf"), float("nan"), 1.0])))
    rp = Replay(read_trace(log), [dbc])
    recs = list(rp.frames())
    assert rp.stats.decoded == 3 and rp.stats.errors == {"0x123": 2}
    assert [r.get("decode_error") for r in recs][2:4] == ["multiplexer Mux = inf selects no page",
                                                          "multiplexer Mux = nan selects no page"]


@needs_corpus
def test_a_map_its_dbc_cannot_carry_is_a_config_error_naming_the_entry(tmp_path: Path) -> None:
    """Model3CAN.dbc has signals outside their frame; binding one was a traceback (exit 1)."""
    tesla = tmp_path / "tesla.toml"
    tesla.write_text("[[signal]]\nmessage = 'ID5D5RearDItemps'\nsignal = 'DI_lashAngle'\nto = 'pack.ambient_temperature'\n")
    huge = tmp_path / "huge.toml"  # no site layout in a replay: the image must not grow to a template's mistake
    huge.write_text("[[signal]]\nmessage = 'ID132HVBattAmpVolt'\nsignal = 'BattVoltage132'\n"
                    "to = 'string[{10000000000000000000000 + 0}].voltage'\n")
    log = tmp_path / "t.log"
    log.write_text("(1.0) can0 5D5#0000000000\n")
    for path, where in ((tesla, "tesla.toml:1: signal[0]: "), (huge, "huge.toml:4: signal[0].to: ")):
        r = subprocess.run(bmsgw_cmd("replay", str(log), "--dbc", str(CORPUS / "tesla-model3/Model3CAN.dbc"),
                                     "--map", str(path), "--summary"),
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"bmsgw: config error: {path.parent}/{where}" in r.stderr, r.stderr


def test_bindings_small_one_by_one_but_huge_together_are_a_config_error_naming_the_entry(tmp_path: Path) -> None:
    """The image is sized by each dimension's largest index over all bindings: two entries of
    module[19999].temperature[0] and module[0].temperature[19999] would make a 20000 x 20000 family (~5 GB)."""
    mapfile = tmp_path / "m.toml"
    mapfile.write_text("[[signal]]\nmessage = 'MMU00_Temperatures'\nsignal = 'Sensor0_Temperature'\n"
                       "to = 'module[19999].temperature[0]'\n"
                       "[[signal]]\nmessage = 'MMU00_Temperatures'\nsignal = 'Sensor1_Temperature'\n"
                       "to = 'module[0].temperature[19999]'\n")
    log = tmp_path / "t.log"
    log.write_text("(1.0) can0 100#0000000000000000\n")

    def small_address_space() -> None:  # without the check, fail fast instead of taking the machine's memory
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    r = subprocess.run(bmsgw_cmd("replay", str(log), "--dbc", str(ROOT / "dbc/bmsgw_pack.dbc"), "--map", str(mapfile),
                                 "--summary"),
                       capture_output=True, text=True, timeout=120, cwd=ROOT, preexec_fn=small_address_space)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"bmsgw: config error: {mapfile}:8: signal[1].to: module[0].temperature[19999]: with signal[0] " \
           f"(module[19999].temperature[0]) the family module.temperature grows to 20000 x 20000" in r.stderr, r.stderr


def test_a_truncated_blf_and_a_bad_asc_line_are_reported_and_the_replay_goes_on(tmp_path: Path) -> None:
    full = tmp_path / "full.blf"
    with can.BLFWriter(str(full)) as w:
        for i in range(1000):
            w.on_message_received(can.Message(timestamp=1.0 + i * 0.01, arbitration_id=0x100, is_extended_id=False,
                                              data=bytes(8)))
    cut = tmp_path / "cut.blf"
    cut.write_bytes(full.read_bytes()[:-37])
    asc = tmp_path / "one_bad.asc"
    line = "   {t:.6f} 1  100             Rx   d 8 00 01 02 03 04 05 06 07\n"
    asc.write_text("date Mon Jan 1 00:00:00.000 am 2024\nbase hex  timestamps absolute\ninternal events logged\n"
                   "Begin TriggerBlock Mon Jan 1 00:00:00.000 am 2024\n" + line.format(t=1.0)
                   + line.format(t=1.1).replace(" 03 ", " 0G ") + line.format(t=1.2) + "End TriggerBlock\n")
    for path, frames, problem in ((cut, 993, "record 994: truncated: "), (asc, 2, "line 6: ASCReader: ValueError")):
        r = subprocess.run(bmsgw_cmd("replay", str(path), "--dbc", str(ROOT / "dbc/bmsgw_pack.dbc"), "--json"),
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)["summary"]
        assert out["frames"] == out["decoded"] == frames and out["bad_lines"] == 1
        assert out["trace_problems"][0].startswith(problem), out["trace_problems"]
    text = subprocess.run(bmsgw_cmd("replay", str(cut), "--dbc", str(ROOT / "dbc/bmsgw_pack.dbc"), "--summary"),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert f"{cut}: truncated" in text.stderr
    assert "0 remote frames, 1 unreadable lines" in text.stdout and "record 994: truncated" in text.stdout
