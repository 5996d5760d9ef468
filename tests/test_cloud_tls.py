"""TLS with a client certificate (mutual TLS) against Mosquitto; without the certificate, or with a
broker the gateway does not trust, nothing is sent and nothing is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from mqtt_broker import Broker, Consumer, make_pki
from test_cloud_link import GW, Rig, all_arrived, config, until

from cloudlink.config import TlsSettings

pytestmark = pytest.mark.slow


@pytest.fixture
def tls_broker(tmp_path: Path) -> Any:
    pki = make_pki(tmp_path)
    b = Broker(tmp_path, tls=pki)
    yield b, pki
    b.stop()


def test_mutual_tls_delivers(tmp_path: Path, tls_broker: tuple[Broker, dict[str, Path]]) -> None:
    broker, pki = tls_broker
    consumer = Consumer(broker.port)  # the consumer uses the plain loopback listener
    assert broker.tls_port
    tls = TlsSettings(enabled=True, ca_file=str(pki["ca"]), cert_file=str(pki["client_cert"]),
                      key_file=str(pki["client_key"]))
    rig = Rig(tmp_path, config(broker.tls_port, tls=tls))

    async def scenario() -> None:
        await until(lambda: rig.link.counters["acked"] >= 10, what="publishing over TLS")
        assert rig.link.conn["broker"].endswith(f":{broker.tls_port}")
        await all_arrived(consumer, rig.accepted())

    try:
        rig.run(scenario)
    finally:
        consumer.stop()


@pytest.mark.parametrize("problem", ["no_client_certificate", "untrusted_broker"])
def test_tls_refused_keeps_everything(tmp_path: Path, tls_broker: tuple[Broker, dict[str, Path]],
                                      problem: str) -> None:
    broker, pki = tls_broker
    consumer = Consumer(broker.port)
    assert broker.tls_port
    if problem == "no_client_certificate":
        tls = TlsSettings(enabled=True, ca_file=str(pki["ca"]))
    else:  # a CA that did not sign the broker's certificate
        (tmp_path / "other").mkdir()
        other = make_pki(tmp_path / "other")
        tls = TlsSettings(enabled=True, ca_file=str(other["ca"]), cert_file=str(pki["client_cert"]),
                          key_file=str(pki["client_key"]))
    rig = Rig(tmp_path, config(broker.tls_port, tls=tls), state=tmp_path / f"state-{problem}")

    async def scenario() -> None:
        await until(lambda: rig.link.conn["attempts"] >= 3 and len(rig.rows) >= 5, what="refused attempts")
        assert rig.link.conn["connections"] == 0
        err = rig.link.conn["last_error"].lower()
        assert any(w in err for w in ("certificate", "ssl", "tls", "handshake", "closed", "reset", "eof")), err
        stored = {(GW, r.boot, r.stream, r.seq) for r in await anyio.to_thread.run_sync(rig.link.store.all_rows)}
        assert rig.accepted() <= stored  # nothing was sent, nothing was dropped
        assert not consumer.keys()

    try:
        rig.run(scenario)
    finally:
        consumer.stop()
