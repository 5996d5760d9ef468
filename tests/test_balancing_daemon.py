"""Balancing through the running daemon: request, the module units bleed, progress, cancel."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.procs import ROOT, Daemon, wait_for

pytestmark = pytest.mark.slow


def test_balance_request_bleeds_the_high_cells_then_cancel(tmp_path: Path) -> None:
    cfg = tmp_path / "bmsgw.toml"
    text = (ROOT / "gateway/configs/sim.toml").read_text().replace("start_hour = 12.0", "start_hour = 2.0")
    cfg.write_text(text + """
[metrics]
port = 0

[estimators]
balancing_start_spread_v = 0.040   # the simulated pack's spread is ~55 mV
balancing_stop_spread_v = 0.020
balancing_settle_s = 1.0
""")
    d = Daemon(tmp_path, "--sim", "--config", str(cfg))
    try:
        wait_for(lambda: d.json("status")["estimates"]["initialised"], 30, "the estimators")
        r = d.cli("balance", "start")
        assert r.returncode == 0 and "balancing" in r.stdout
        st = wait_for(lambda: (lambda s: s if s["status"] == "active" and s["bleeding"] else None)(d.json("balance")),
                      30, "bleeding")
        assert 0 < st["bleeding"] < 224 and st["spread_v"] > 0.04
        # the module units report what they bleed; the gateway sees it back in the image
        rows = wait_for(lambda: [r for r in d.json("signals", "cell[*].balancing") if r["value"] == 1], 20,
                        "balancing feedback from the module units")
        assert {int(r["name"][5:-11]) for r in rows} <= set(st["cells"]) | set(d.json("balance")["cells"])
        r = d.cli("balance", "stop")
        assert r.returncode == 0 and "aborted" in r.stdout
        wait_for(lambda: not [r for r in d.json("signals", "cell[*].balancing") if r["value"] == 1], 20,
                 "bleeding to stop")
    finally:
        assert d.stop() == 0
