"""Interoperability with an independent OPC UA stack: node-opcua (scripts/interop/opcua_node.js).

Runs when ``node`` and the npm package are there (``cd scripts/interop && npm install``);
otherwise it is skipped with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_opcua_support import PASSWORDS, Harness, Site, make_cert, section

from gateway.opcua_nodes import unit_id

INTEROP = Path(__file__).resolve().parents[1] / "scripts" / "interop"
pytestmark = pytest.mark.slow


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node (Node.js) is not installed: the node-opcua interoperability check needs it")
    if not (INTEROP / "node_modules" / "node-opcua-client").is_dir():
        pytest.skip("node-opcua-client is not installed: run `npm install` in scripts/interop")
    return node


def test_node_opcua_browses_reads_subscribes_calls_and_is_refused_a_write(tmp_path: Path) -> None:
    node = _node()
    client = make_cert("node-opcua")
    pem = tmp_path / "node-opcua.pem"
    pem.write_bytes(x509.load_der_x509_certificate(client.cert.read_bytes()).public_bytes(serialization.Encoding.PEM))
    site = Site()
    with Harness(section(trusted_client_certs=[str(client.cert)]), site, tmp_path / "state") as h:
        stop = threading.Event()
        fed: list[float] = []

        def can_thread() -> None:  # the pack keeps measuring while node-opcua looks at it
            v = 50.0
            while not stop.is_set():
                v += 0.01
                fed.append(site.feed(site.pack_slot, {"pack.voltage": v, "pack.current": 2.0}))
                time.sleep(0.05)

        feeder = threading.Thread(target=can_thread, daemon=True)
        feeder.start()
        try:
            run = subprocess.run(
                [node, str(INTEROP / "opcua_node.js"), "--url", h.url, "--user", "otto", "--password",
                 PASSWORDS["otto"], "--cert", str(pem), "--key", str(client.key), "--uri", client.uri,
                 "--server-cert", str(tmp_path / "state" / "opcua" / "server_cert.der"), "--read", "Pack.Voltage",
                 "--notifications", "3", "--pki", str(tmp_path / "pki"), "--timeout", "60",
                 "--out", str(tmp_path / "out.json")],
                capture_output=True, text=True, timeout=120, cwd=INTEROP)
        finally:
            stop.set()
            feeder.join(2)
        result = tmp_path / "out.json"
        assert run.returncode == 0, result.read_text() if result.exists() else run.stdout + run.stderr
        out = json.loads(result.read_text())
    ns = out["namespace"]["index"]
    assert ns >= 2
    assert {"Identification", "Pack", "Strings", "Alarms", "ResetError"} <= set(out["browse"]["names"])
    assert out["translate"]["status"] == "Good"
    assert out["translate"]["nodeId"] == f"ns={ns};s=BatterySystem.Pack.Voltage"
    read = out["read"]
    assert read["status"] == "Good" and read["dataType"] == "Double" and 50.0 < read["value"] < 60.0
    assert min(abs(read["sourceTimestamp"] - t) for t in fed) < 1e-3  # the measurement time, not the read's
    assert out["units"] == {"unitId": unit_id("VLT"), "displayName": "V"}
    seen = out["subscribe"]["notifications"]
    assert len(seen) >= 3 and all(n["status"] == "Good" for n in seen)
    stamps = [n["sourceTimestamp"] for n in seen]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert out["call"] == {"status": "Good", "outputs": [True, "ResetError done"]}
    assert out["write"]["status"] == "BadNotWritable"
    assert ("ResetError", (False,)) in h.calls.log
