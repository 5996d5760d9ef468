"""`bmsgw replay`: recorded traces through the same decode pipeline as the daemon."""

from __future__ import annotations

import json
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
