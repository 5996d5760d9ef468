"""The cloud link inside the running daemon: the simulated site's data reaches a real Mosquitto,
and signed commands come back through the same functions the CLI uses."""

from __future__ import annotations

import json
from collections.abc import Iterator

import paho.mqtt.publish as publish
import pytest

from cloudlink.commands import make_command
from tests.mqtt_broker import Broker, Consumer
from tests.procs import ROOT, Daemon, wait_for

pytestmark = pytest.mark.slow
SECRET = b"site-secret-for-tests"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Broker, Consumer]]:
    tmp = tmp_path_factory.mktemp("cloud")
    broker = Broker(tmp)
    consumer = Consumer(broker.port, "bmsgw/#")
    (tmp / "secret").write_bytes(SECRET)
    cfg = tmp / "bmsgw.toml"
    # at night the pack rests, so EIS sweeps may run; the simulated module measures 200x faster
    text = (ROOT / "gateway/configs/sim.toml").read_text().replace("start_hour = 12.0", "start_hour = 2.0")
    text = text.replace("eis_speed = 10.0", "eis_speed = 200.0").replace('periodic = "cells"', 'stable_window_s = 2.0')
    cfg.write_text(text + f"""
[metrics]
port = 0

[cloud]
enabled = true
host = "127.0.0.1"
port = {broker.port}

[cloud.commands]
hmac_secret_file = "{tmp / 'secret'}"
health_check_s = 0.5
""")
    d = Daemon(tmp, "--sim", "--config", str(cfg))
    yield d, broker, consumer
    assert d.stop() == 0
    consumer.stop()
    broker.stop()


def command(broker: Broker, name: str, args: dict[str, object], cmd_id: str, secret: bytes = SECRET) -> None:
    payload = make_command(secret, "bmsgw-sim", name, args, cmd_id=cmd_id)
    publish.single(f"bmsgw/simulated-site/bmsgw-sim/cmd/{name}", payload, qos=1, hostname="127.0.0.1",
                   port=broker.port)


def ack(consumer: Consumer, cmd_id: str) -> dict[str, object]:
    """The gateway's answer (a signed envelope whose body is the JSON answer)."""
    def find() -> dict[str, object] | None:
        answers = [json.loads(env["body"]) for env in consumer.json_on("cmd-ack")]
        return next((a for a in answers if a.get("id") == cmd_id), None)

    return wait_for(find, 20, f"the answer to {cmd_id}")


def test_telemetry_and_birth_reach_the_broker(site: tuple[Daemon, Broker, Consumer]) -> None:
    d, _broker, consumer = site
    wait_for(lambda: d.json("cloud", "status")["connection"]["state"] == "connected", 30, "the link to connect")
    birth = wait_for(lambda: consumer.json_on("birth"), 20, "the birth message")[-1]
    assert birth["gateway"] == "bmsgw-sim" and birth["dbc_hash"]
    assert any("cell[" in n for c in birth["classes"].values() for n in c["signals"])
    assert {"reset_error", "set_protection_limits", "set_ecm_parameters", "request_birth"} <= set(birth["commands"])
    wait_for(lambda: len(consumer.seen) >= 3, 40, "telemetry batches")
    assert not consumer.bad
    st = d.json("status")
    assert st["cloud"]["connection"]["state"] == "connected"
    text = d.cli("cloud", "status")
    assert text.returncode == 0 and "connected" in text.stdout


def test_limit_change_within_hardware_applies_and_beyond_is_rejected(site: tuple[Daemon, Broker, Consumer]) -> None:
    d, broker, consumer = site
    command(broker, "set_protection_limits", {"limits": {"cell_voltage_high": {"msl": 4.19}}}, "lim-1")
    a = ack(consumer, "lim-1")
    assert a["status"] == "accepted", a
    command(broker, "set_protection_limits", {"limits": {"cell_voltage_high": {"msl": 4.5}}}, "lim-2")
    a = ack(consumer, "lim-2")
    assert a["status"] == "rejected" and "hardware" in str(a["reason"])
    command(broker, "set_protection_limits", {"limits": {"cell_voltage_high": {"msl": 4.18}}}, "lim-3",
            secret=b"not-the-secret")
    a = ack(consumer, "lim-3")
    assert a["status"] == "rejected"


def test_reset_error_uses_the_same_rules_as_the_cli(site: tuple[Daemon, Broker, Consumer]) -> None:
    d, broker, consumer = site
    command(broker, "reset_error", {}, "reset-1")
    a = ack(consumer, "reset-1")
    assert a["status"] == "rejected" and "not in ERROR" in str(a["reason"]), a
    assert json.loads(d.cli("alarms", "--json").stdout)["contactors"]["state"] in ("NORMAL", "PRECHARGE", "STANDBY")


def test_start_eis_sweep_measures_and_the_record_reaches_the_cloud(site: tuple[Daemon, Broker, Consumer]) -> None:
    d, broker, consumer = site
    command(broker, "start_eis_sweep", {"cells": [7], "f_min_hz": 1.0, "f_max_hz": 1000.0}, "eis-1")
    a = ack(consumer, "eis-1")
    assert a["status"] == "accepted" and "1 sweeps queued" in str(a["reason"]), a

    def record() -> dict[str, object] | None:
        with consumer.lock:
            recs = [r for k, b in consumer.batches.items() if k[2] == "eis" for r in b.records]
        return next((r for r in recs if r.get("target") == "cell[7]"), None)

    rec = wait_for(record, 90, "the EIS record in the cloud")
    assert rec["kind"] == "eis" and rec["valid"] is True and len(rec["frequency_hz"]) == 31  # type: ignore[arg-type]
    assert rec["frequency_hz"][0] == pytest.approx(1000.0, rel=0.01)  # type: ignore[index]
    assert set(rec["fit"]["params"]) >= {"R0", "R1", "R4", "C1", "C4"}  # type: ignore[index]
    command(broker, "start_eis_sweep", {"cells": [900]}, "eis-2")
    a = ack(consumer, "eis-2")
    assert a["status"] == "rejected", a
