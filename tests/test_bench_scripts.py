"""Smoke test of the benchmark scripts: they run end to end and report what they measured.

No timing is asserted (the figures depend on the machine and its load); only that the
measurement happened: the trips were injected and accounted for, and the OPC UA clients
were subscribed and receiving while the trips ran.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.procs import ROOT

pytestmark = pytest.mark.slow


def test_protection_bench_with_opcua_clients_reports_both_runs() -> None:
    trips = 10
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_protection.py"), "--json", "--only", "process", "--trips", str(trips),
         "--period", "0.25", "--warmup", "0.5", "--rate", "2000", "--opcua-clients", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    for key in ("without_opcua", "with_opcua"):
        r = res[key]
        assert {"p50_ms", "p99_ms", "p999_ms", "max_ms", "p0_scheduling"} <= r.keys()
        assert r["trips"] + r["missed_trips"] + r["unarmed_injections"] == trips
        assert r["p0_events_during_trips"].get("trip", 0) > 0  # P0's events reached the main process
    ua = res["with_opcua"]["opcua"]
    assert ua["clients"] == 1
    assert ua["monitored_items_at_start"] == ua["monitored_items_at_end"] == 1000
    assert ua["subscriptions_at_end"] == 1
    assert ua["notifications_during_trips"] > 0
    assert ua["events_emitted"] > 0  # the trips became OPC UA events


def test_protection_bench_refuses_opcua_clients_for_other_variants() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts/bench_protection.py"), "--only", "thread",
                          "--opcua-clients", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "--opcua-clients" in out.stderr
