"""CloudLink against a real Mosquitto on loopback: outages, a frozen broker, limits, quota, damage, fallback.

Every test checks by (boot, stream, sequence number) that the batches the store accepted arrived
at a consumer (duplicates allowed and counted, none missing).  A :class:`Gate` sits between the
gateway and the broker where the order of reconnection matters: the consumer must be subscribed
again before the gateway delivers, or the *broker* (persistence off) would drop what nobody
subscribed to yet.  Waits are for conditions, bounded by timeouts; no time is asserted.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from mqtt_broker import Broker, Consumer, Feeder, Gate, V311Gate, make_image

import cloudlink.link
from cloudlink.batch import KIND_EIS, KIND_EVENTS, KIND_THINNED, Sealer, Telemetry, decode
from cloudlink.commands import make_command
from cloudlink.config import CloudSection, CommandSettings, SignalClass
from cloudlink.link import CloudLink
from cloudlink.store import Store
from gateway.events import Event, Kind, Level, Recorder

pytestmark = pytest.mark.slow

GW = "gw-test"
SECRET = "0123456789abcdef0123"
T_MS = 1_700_000_000_000


def config(port: int, **kw: Any) -> CloudSection:
    base: dict[str, Any] = {
        "enabled": True, "host": "127.0.0.1", "port": port, "protocol": "5",
        "telemetry": [SignalClass("pack", ["pack.current", "pack.voltage"], rate_hz=50.0, batch_s=0.2),
                      SignalClass("cells", ["cell[*].voltage"], rate_hz=10.0, batch_s=0.5)],
        "commands": CommandSettings(enabled=False), "backoff_min_s": 0.05, "backoff_max_s": 0.4,
        "keepalive_s": 2, "ack_timeout_s": 1.5, "connect_timeout_s": 1.5, "event_flush_s": 0.05,
        "fsync_window_s": 0.2, "inflight": 8}
    base.update(kw)
    return CloudSection(**base)


class Rig:
    """A link on a fed process image with a recorder, and what it committed."""

    def __init__(self, tmp: Path, cfg: CloudSection, handlers: dict[str, Any] | None = None,
                 state: Path | None = None, cells: int = 16, noisy: bool = False) -> None:
        self.img = make_image(cells)
        self.feeder = Feeder(self.img, noisy=noisy)
        self.recorder = Recorder()
        self.link = CloudLink(cfg, self.img, self.recorder, handlers or {}, state or tmp / "state", GW, "site")
        self.rows: list[Any] = []
        self.link.on_commit.append(self.rows.append)
        self.events = 0

    def accepted(self, stream: str | None = None) -> set[tuple[str, str, str, int]]:
        return {(GW, r.boot, r.stream, r.seq) for r in list(self.rows) if stream is None or r.stream == stream}

    def event(self, kind: str = Kind.INFO) -> None:
        self.events += 1
        self.recorder(Event(kind, "synthetic", Level.INFO, index=self.events, value=float(self.events)))

    def run(self, scenario: Callable[[], Awaitable[None]], timeout: float = 40.0) -> None:
        async def main() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.link.run)
                with anyio.fail_after(timeout):
                    await scenario()
                tg.cancel_scope.cancel()
            # cancelling run() leaves no task behind (aiomqtt's own helper task included)
            await until(lambda: not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()], 5,
                        "no orphan tasks")
            assert self.link.conn["state"] == "stopped" and self.link.store.con is None
        try:
            anyio.run(main)
        finally:
            self.feeder.stop()


async def until(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = cond()
        if last:
            return last
        await anyio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


async def all_arrived(consumer: Consumer, accepted: set[tuple[str, str, str, int]], timeout: float = 20.0) -> None:
    await until(lambda: not consumer.missing(accepted), timeout,
                f"{len(accepted)} accepted batches at the consumer (missing {consumer.missing(accepted)[:5]})")


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    b = Broker(tmp_path)
    yield b
    b.stop()


def test_broker_absent_at_start(tmp_path: Path) -> None:
    gate = Gate(0)
    gate.close()  # nothing listens: connection refused, as with no broker at all
    rig = Rig(tmp_path, config(gate.port))
    state: dict[str, Any] = {}

    async def scenario() -> None:
        for _ in range(10):
            rig.event()
            await anyio.sleep(0.05)
        await until(lambda: len(rig.rows) >= 15 and rig.link.conn["attempts"] >= 3, what="batches while offline")
        st = rig.link.status()
        assert st["connection"]["state"] != "connected" and "refused" in st["connection"]["last_error"].lower()
        assert st["buffer"]["rows"].get("telemetry", 0) > 0 and st["buffer"]["oldest_unsent_age_s"] is not None
        backlog = rig.accepted()
        b = state["broker"] = Broker(tmp_path)  # the broker comes up; the consumer subscribes first
        c = state["consumer"] = Consumer(b.port)
        gate.target = b.port
        gate.open()
        await all_arrived(c, backlog)
        await until(lambda: rig.link.status()["counters"]["published_live"] > 5, what="live data")
        await all_arrived(c, rig.accepted())
        with c.lock:
            lanes = {k: set(v) for k, v in c.lanes.items()}
        assert all("hist" in lanes[k] for k in backlog), "the backlog goes on the historical topic"
        assert any(lanes[k] == {"data"} for k in rig.accepted() - backlog), "new batches go live"
        assert c.json_on("/birth")[-1]["gateway"] == GW
        assert c.duplicates() < len(rig.accepted())

    try:
        rig.run(scenario)
    finally:
        gate.close()
        if "consumer" in state:
            state["consumer"].stop()
        if "broker" in state:
            state["broker"].stop()


def test_broker_killed_and_restarted_mid_stream(tmp_path: Path, broker: Broker) -> None:
    gate = Gate(broker.port)
    consumer = Consumer(broker.port)
    rig = Rig(tmp_path, config(gate.port))

    async def scenario() -> None:
        await until(lambda: rig.link.counters["acked"] >= 10, what="publishing")
        subs = consumer.subscriptions
        broker.freeze()  # so that publishes are surely awaiting their PUBACK when it dies
        await until(lambda: rig.link.inflight >= 2, what="publishes in flight")
        broker.kill()  # SIGKILL, mid-stream
        gate.close()
        for _ in range(5):
            rig.event(Kind.TRIP)
            await anyio.sleep(0.05)
        await until(lambda: rig.link.conn["state"] != "connected", what="the link noticing")
        n = len(rig.rows)
        await until(lambda: len(rig.rows) >= n + 5, what="batches while the broker is down")
        broker.start()
        await until(lambda: consumer.subscriptions > subs, what="the consumer back")
        gate.open()
        accepted = rig.accepted()
        await all_arrived(consumer, accepted)
        assert rig.link.conn["connections"] >= 2
        events = {k for k in accepted if k[2] == "events"}
        assert events and not consumer.missing(events)

    try:
        rig.run(scenario)
    finally:
        gate.close()
        consumer.stop()


def test_broker_frozen_then_resumed(tmp_path: Path, broker: Broker) -> None:
    consumer = Consumer(broker.port)
    rig = Rig(tmp_path, config(broker.port))

    async def scenario() -> None:
        await until(lambda: rig.link.counters["acked"] >= 10, what="publishing")
        first_session = rig.link.conn["session"]
        broker.freeze()  # SIGSTOP: the TCP connection stays, nothing answers
        try:
            await until(lambda: rig.link.conn["state"] != "connected", what="the link giving up on the frozen broker")
            n = len(rig.rows)
            await until(lambda: len(rig.rows) >= n + 5, what="batches while frozen")
            assert rig.link.status()["buffer"]["total_bytes"] > 0
        finally:
            broker.resume()
        accepted = rig.accepted()
        await all_arrived(consumer, accepted)
        await until(lambda: rig.link.conn["state"] == "connected", what="reconnected")
        assert rig.link.conn["session"] > first_session
        # a late will of the frozen connection carries the old session: the cloud can tell it is stale
        births = consumer.json_on("/birth")
        for st in consumer.json_on("/state"):
            if st["state"] == "offline" and not st["clean"]:
                assert st["session"] < births[-1]["session"]

    try:
        rig.run(scenario)
    finally:
        consumer.stop()


def test_payload_limit_is_respected_and_a_smaller_broker_limit_loses_nothing(tmp_path: Path) -> None:
    broker = Broker(tmp_path, extra="max_packet_size 1400\n")
    consumer = Consumer(broker.port)
    cells = SignalClass("cells", ["cell[*].voltage"], rate_hz=25.0, batch_s=0.8)
    rig = Rig(tmp_path, config(broker.port, max_payload=1024, quota_bytes=1 << 20, telemetry=[cells]), cells=64,
              noisy=True)

    async def scenario() -> None:
        await until(lambda: len(rig.accepted("cells")) >= 4, what="split cell batches")  # 2+ blocks, split
        await all_arrived(consumer, rig.accepted())
        sizes = consumer.payload_sizes()
        assert sizes and max(sizes) <= 1024
        with consumer.lock:
            per_batch = [b.samples for k, b in consumer.batches.items() if k[2] == "cells"]
        assert max(per_batch) < 64 * 20  # 0.8 s of 64 noisy cells did not fit in one message

    try:
        rig.run(scenario)
    finally:
        consumer.stop()
    # the same broker, a gateway configured for bigger messages: a batch above the broker's Maximum Packet
    # Size (CONNACK) would end every session, on every retry, and block the link; it is dropped and reported
    consumer2 = Consumer(broker.port)
    rig2 = Rig(tmp_path, config(broker.port, max_payload=16384, telemetry=[cells]), state=tmp_path / "state2",
               cells=64, noisy=True)

    def reported() -> set[tuple[str, str, str, int]]:
        return {(GW, g["boot"], g["stream"], q) for g in consumer2.gaps() if g["reason"] == "refused_by_broker"
                for a, b in g["seqs"] for q in range(a, b + 1)}

    async def scenario2() -> None:
        await until(lambda: any(r.size > 1400 for r in rig2.rows), what="a batch above the broker's limit")
        await until(lambda: "refused_by_broker" in rig2.link.status()["losses"], what="oversized batches dropped")
        rig2.event()  # something small after them
        await until(lambda: rig2.accepted("events"), what="the event committed")
        snapshot = rig2.accepted()
        await until(lambda: not [k for k in snapshot if k not in consumer2.keys() and k not in reported()],
                    what="every batch delivered or reported refused_by_broker")
        big = {(GW, r.boot, r.stream, r.seq) for r in rig2.rows if r.size > 1400}
        assert big and not big & consumer2.keys()  # never sent
        stored = {r.id for r in await anyio.to_thread.run_sync(rig2.link.store.all_rows)}
        assert not [r for r in rig2.rows if r.size > 1400 and r.id in stored and (GW, r.boot, r.stream, r.seq)
                    in reported()]
        st = rig2.link.status()
        assert st["connection"]["connections"] == 1  # no session ended on them
        assert st["connection"]["broker_max_packet"] == 1400
        assert any("1400" in w for w in st["warnings"])

    try:
        rig2.run(scenario2)
    finally:
        consumer2.stop()
        broker.stop()


def test_a_refusing_puback_does_not_delete(tmp_path: Path) -> None:
    """MQTT 5 PUBACK 0x87 (ACL) for one stream's backlog: those rows stay buffered, the rest flows.

    (Mosquitto also drops the connection after such a refusal; the refused topic is paused so the
    other streams and the live lane keep going between reconnects.)
    """
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite #\ntopic deny bmsgw/+/+/hist/pack\n")
    broker = Broker(tmp_path, extra=f"acl_file {acl}\n")
    gate = Gate(broker.port)
    gate.close()
    consumer = Consumer(broker.port)
    rig = Rig(tmp_path, config(gate.port, backoff_max_s=3.0))

    async def scenario() -> None:
        await until(lambda: len(rig.accepted("pack")) >= 4 and len(rig.accepted("cells")) >= 2, what="a backlog")
        backlog = rig.accepted()
        gate.open()
        await until(lambda: "not authorized" in rig.link.status()["connection"]["last_refused"].lower(),
                    what="PUBACK 0x87")
        others = {k for k in backlog if k[2] != "pack"}
        await all_arrived(consumer, others, timeout=40)  # the other streams' backlog is delivered
        await until(lambda: rig.link.counters["published_live"] >= 3, what="live data flowing")
        stored = {(GW, r.boot, r.stream, r.seq) for r in await anyio.to_thread.run_sync(rig.link.store.all_rows)}
        refused = {k for k in backlog if k[2] == "pack"}
        assert refused <= stored  # every refused batch is still buffered
        assert not refused & consumer.keys()  # and none of them reached anyone
        assert rig.link.counters["refused"] >= 1

    try:
        rig.run(scenario, timeout=70)
    finally:
        gate.close()
        consumer.stop()
        broker.stop()


def test_quota_pressure_thins_drops_reports_and_keeps_events(tmp_path: Path, broker: Broker) -> None:
    gate = Gate(broker.port)
    gate.close()
    consumer = Consumer(broker.port)
    cfg = config(gate.port, max_payload=1024, quota_bytes=16 * 1024, min_free_bytes=0, thin_window_s=5.0,
                 telemetry=[SignalClass("cells", ["cell[*].voltage"], rate_hz=50.0, batch_s=0.5)])
    rig = Rig(tmp_path, cfg, cells=64, noisy=True)

    async def scenario() -> None:
        async def events() -> None:
            while True:
                rig.event(Kind.TRIP)
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(events)
            await until(lambda: "dropped" in rig.link.status()["losses"], 30, what="drops under quota pressure")
            tg.cancel_scope.cancel()
        losses = rig.link.status()["losses"]
        assert "thinned" in losses
        gate.open()
        accepted = rig.accepted()
        events_acc = {k for k in accepted if k[2] == "events"}
        await all_arrived(consumer, events_acc | {k for k in accepted if k[2] == "gaps"})

        def accounted() -> list[tuple[str, str, str, int]]:
            lost = {(GW, g["boot"], g["stream"], q) for g in consumer.gaps()
                    if g["reason"] in ("dropped", "quota_full") for a, b in g["seqs"] for q in range(a, b + 1)}
            return sorted(k for k in accepted if k[2] == "cells" and k not in consumer.keys() and k not in lost)

        await until(lambda: not accounted(), what="every cells batch received or reported lost")
        with consumer.lock:
            kinds = {b.kind for k, b in consumer.batches.items() if k[2] == "cells"}
        assert KIND_THINNED in kinds
        assert all(b.kind == KIND_EVENTS for k, b in consumer.batches.items() if k[2] == "events")

    try:
        rig.run(scenario, timeout=60)
    finally:
        gate.close()
        consumer.stop()


def test_damaged_database_recovered_and_sent(tmp_path: Path, broker: Broker) -> None:
    state = tmp_path / "state"
    state.mkdir()
    sealer = Sealer(GW, "0ld0ld0ld0ld0ld0", 128 * 1024)
    store = Store(state / "cloud.db", sealer, quota_bytes=1 << 30, min_free_bytes=0, fsync_window_s=0.2,
                  thin_window_ms=1000)
    store.open()
    rng = np.random.default_rng(0)
    for i in range(40):
        v = np.round(3.7 + rng.normal(0, 0.001, (50, 100)), 3)
        store.put(sealer.telemetry("cells", Telemetry([f"cell[{j}].voltage" for j in range(100)],
                                                      1_700_000_000_000 + i * 5000 + np.arange(50) * 100, v,
                                                      np.zeros((50, 100), np.int8))))
    store.close()
    db = state / "cloud.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size * 2 // 3])  # torn by a power cut
    consumer = Consumer(broker.port)
    rig = Rig(tmp_path, config(broker.port), state=state)

    async def scenario() -> None:
        await until(lambda: rig.link.store.recovery.state == "recovered", what="recovery")
        rec = rig.link.store.recovery
        assert 0 < rec.salvaged_rows < 40
        old = {(GW, "0ld0ld0ld0ld0ld0", "cells", q) for q in range(40)}
        await until(lambda: len(old & consumer.keys()) == rec.salvaged_rows, what="salvaged batches delivered")
        await until(lambda: any(g["reason"] == "corrupt" for g in consumer.gaps()), what="the damage reported")
        await all_arrived(consumer, rig.accepted())
        assert any("recovered" in w for w in rig.link.status()["warnings"])

    try:
        rig.run(scenario)
    finally:
        consumer.stop()


def test_mqtt5_refused_falls_back_to_311(tmp_path: Path, broker: Broker) -> None:
    gate = V311Gate(broker.port)
    consumer = Consumer(broker.port)
    rig = Rig(tmp_path, config(gate.port, protocol="auto"))

    async def scenario() -> None:
        await until(lambda: rig.link.conn["state"] == "connected", what="a connection")
        assert rig.link.conn["protocol"] == "3.1.1"
        assert gate.refused_v5 >= 1 and gate.passed_v311 >= 1
        await until(lambda: rig.link.counters["acked"] >= 5, what="publishing over 3.1.1")
        await all_arrived(consumer, rig.accepted())

    try:
        rig.run(scenario)
    finally:
        gate.close()
        consumer.stop()


def test_live_data_is_not_held_up_by_the_backlog(tmp_path: Path, broker: Broker) -> None:
    """A backlog drained at a bandwidth cap: live batches arrive while it is still being sent."""
    state = tmp_path / "state"
    state.mkdir()
    old_boot = "b4ckl0gb4ckl0g00"
    sealer = Sealer(GW, old_boot, 128 * 1024)
    store = Store(state / "cloud.db", sealer, quota_bytes=1 << 30, min_free_bytes=0, fsync_window_s=0.2,
                  thin_window_ms=1000)
    store.open()
    rng = np.random.default_rng(0)
    for i in range(40):  # about 40 kB of yesterday's cell voltages
        v = np.round(3.7 + rng.normal(0, 0.02, (20, 50)), 3)
        store.put(sealer.telemetry("cells", Telemetry([f"cell[{j}].voltage" for j in range(50)],
                                                      1_700_000_000_000 + i * 2000 + np.arange(20) * 100, v,
                                                      np.zeros((20, 50), np.int8))))
    backlog_bytes = store.total_bytes
    store.close()
    consumer = Consumer(broker.port)
    cfg = config(broker.port, bandwidth_cap=16384, backfill_share=0.5,
                 telemetry=[SignalClass("cells", ["cell[*].voltage"], rate_hz=10.0, batch_s=0.2)])
    rig = Rig(tmp_path, cfg, state=state)
    backlog = {(GW, old_boot, "cells", q) for q in range(40)}

    async def scenario() -> None:
        assert backlog_bytes > 4 * 16384 * 0.5  # seconds at the backfill lane's share of the cap
        await until(lambda: rig.link.counters["published_live"] >= 3, what="live batches")
        assert consumer.missing(backlog), "the backlog is still draining at the cap"
        await all_arrived(consumer, backlog, timeout=40)
        first_live = min(m[2] for m in consumer.on_topic("") if "/data/" in m[0])
        last_hist = max(m[2] for m in consumer.on_topic("") if "/hist/" in m[0])
        assert first_live < last_hist
        await all_arrived(consumer, rig.accepted())

    try:
        rig.run(scenario, timeout=60)
    finally:
        consumer.stop()


def test_commands_over_the_broker(tmp_path: Path, broker: Broker) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    consumer = Consumer(broker.port)
    resets: list[dict[str, Any]] = []

    def reset(args: dict[str, Any]) -> tuple[bool, str]:
        resets.append(args)
        return True, "error state left"

    cfg = config(broker.port, commands=CommandSettings(hmac_secret=SECRET, health_check_s=0.2))
    rig = Rig(tmp_path, cfg, handlers={"reset_error": reset})
    cloud = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    cloud.connect("127.0.0.1", broker.port)
    cloud.loop_start()
    topic = "bmsgw/site/gw-test/cmd/"
    secret = SECRET.encode()

    def acks() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for env in consumer.json_on("/cmd-ack"):
            body = json.loads(env["body"])
            out.setdefault(str(body["id"]), []).append(body)
        return out

    async def scenario() -> None:
        await until(lambda: rig.link.conn["state"] == "connected", what="connected")
        await anyio.sleep(0.2)  # the link subscribes right after connecting
        births = len(consumer.json_on("/birth"))
        send = [
            ("ok-1", "reset_error", make_command(secret, GW, "reset_error", {}, cmd_id="ok-1")),
            ("ok-1", "reset_error", make_command(secret, GW, "reset_error", {}, cmd_id="ok-1")),
            ("forged", "reset_error", make_command(b"not-the-right-secret", GW, "reset_error", {}, cmd_id="forged")),
            ("old", "reset_error", make_command(secret, GW, "reset_error", {}, cmd_id="old",
                                               issued_at=time.time() - 600, ttl_s=60)),
            ("oob", "set_report_rates", make_command(secret, GW, "set_report_rates", {"rates": {"cells": 1000.0}},
                                                     cmd_id="oob")),
            ("rate", "set_report_rates", make_command(secret, GW, "set_report_rates", {"rates": {"cells": 20.0}},
                                                      cmd_id="rate")),
            ("birth", "request_birth", make_command(secret, GW, "request_birth", {}, cmd_id="birth")),
        ]
        for _, name, payload in send:
            cloud.publish(topic + name, payload, qos=1)
        await until(lambda: len(acks().get("ok-1", [])) == 2 and all(k in acks() for k, _, _ in send),
                    what="an answer to every command")
        a = acks()
        assert [x["status"] for x in a["ok-1"]] == ["accepted", "accepted"]
        assert [x["duplicate"] for x in a["ok-1"]] == [False, True]
        assert len(resets) == 1
        assert a["forged"][0]["status"] == "rejected" and a["forged"][0]["reason"] == "bad signature"
        assert a["old"][0]["reason"].startswith("expired")
        assert a["oob"][0]["status"] == "rejected" and "outside" in a["oob"][0]["reason"]
        assert a["rate"][0]["status"] == "accepted"
        assert next(s for s in rig.link.samplers if s.name == "cells").rate_hz == 20.0
        assert a["birth"][0]["status"] == "accepted"
        await until(lambda: len(consumer.json_on("/birth")) > births, what="a new birth")
        assert consumer.json_on("/birth")[-1]["classes"]["cells"]["rate_hz"] == 20.0

    try:
        rig.run(scenario)
    finally:
        cloud.loop_stop()
        consumer.stop()


def offline_gate() -> Gate:
    """A port nothing listens on (connection refused): the link works offline, nothing is ever deleted."""
    gate = Gate(0)
    gate.close()
    return gate


def stored_records(path: Path, stream: str) -> list[dict[str, Any]]:
    con = sqlite3.connect(path)
    try:
        return [r for (p,) in con.execute("SELECT payload FROM batches WHERE stream = ?", (stream,))
                for r in decode(bytes(p)).records]
    finally:
        con.close()


def test_shutdown_stores_or_counts_everything_queued_for_the_writer(tmp_path: Path) -> None:
    """Cancelling run() while the writer is busy (a slow SD card): what waits for it is stored, or counted lost."""
    gate = offline_gate()
    rig = Rig(tmp_path, config(gate.port, telemetry=[]))
    link = rig.link
    real_put = link.store.put
    entered, release = threading.Event(), threading.Event()

    def slow_put(sealed: Any) -> Any:
        entered.set()
        release.wait(30)
        return real_put(sealed)

    link.store.put = slow_put  # type: ignore[method-assign]
    tel = Telemetry(["pack.current"], np.array([T_MS], np.int64), np.zeros((1, 1)), np.zeros((1, 1), np.int8), 10.0)
    overflowed = 0

    async def scenario() -> None:
        nonlocal overflowed
        await until(lambda: link.intake.on_event in rig.recorder.subscribers, what="run() listening to the recorder")
        rig.event(Kind.TRIP)
        await until(entered.is_set, what="the writer storing the first event")
        for _ in range(5):
            rig.event(Kind.TRIP)
        await until(lambda: link.intake.pending() == 0, what="the later events queued for the writer")
        before = link.counters["overflow"]
        for _ in range(1100):  # more than the queue holds: the rest overflows, to be counted as lost
            link._emit_telemetry("pack", tel)
        overflowed = link.counters["overflow"] - before
        release.set()  # no await until run() is cancelled: the queue and the overflow are shutdown's to handle

    try:
        rig.run(scenario)
    finally:
        release.set()
        gate.close()
    assert link.store.path is not None
    assert sorted(r["index"] for r in stored_records(link.store.path, "events")) == list(range(1, rig.events + 1))
    assert overflowed > 0
    gaps = [g for g in stored_records(link.store.path, "gaps") if g["reason"] == "overflow"]
    lost = overflowed * tel.samples
    assert sum(g["samples"] for g in gaps) == lost == link.store.stats()["losses"]["overflow"]["samples"]


def test_a_failing_command_purge_does_not_end_the_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forgetting expired command ids fails (disk full): the error is recorded and the link goes on."""
    monkeypatch.setattr(cloudlink.link, "PURGE_EVERY_S", 0.2)
    state = tmp_path / "state"
    state.mkdir()
    store = Store(state / "cloud.db", Sealer(GW, "0ld0ld0ld0ld0ld0", 128 * 1024), quota_bytes=1 << 30,
                  min_free_bytes=0, fsync_window_s=0.2, thin_window_ms=1000)
    store.open()
    store.remember_command("expired", 1.0, b"{}")
    assert store.con is not None
    store.con.execute("CREATE TRIGGER full BEFORE DELETE ON commands BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    store.close()
    gate = offline_gate()
    rig = Rig(tmp_path, config(gate.port, telemetry=[]), state=state)

    async def scenario() -> None:
        await until(lambda: "disk says no" in rig.link.conn["last_error"], what="the purge failing")
        n = len(rig.rows)
        rig.event(Kind.TRIP)
        await until(lambda: len(rig.rows) > n, what="the link still storing events")

    try:
        rig.run(scenario)
    finally:
        gate.close()


RATE_CLASS = SignalClass("cells", ["cell[*].voltage"], rate_hz=10.0, batch_s=5.0)


async def set_rates(link: CloudLink, cmd_id: str, rates: dict[str, float]) -> dict[str, Any]:
    assert link.processor is not None
    out = await link.processor.handle("set_report_rates", make_command(SECRET.encode(), GW, "set_report_rates",
                                                                       {"rates": rates}, cmd_id=cmd_id))
    return out.body


def test_report_rate_can_be_raised_again_after_slowing_down(tmp_path: Path) -> None:
    gate = offline_gate()
    cfg = config(gate.port, telemetry=[RATE_CLASS], commands=CommandSettings(hmac_secret=SECRET, health_check_s=0.5))
    rig = Rig(tmp_path, cfg)
    sampler = rig.link.samplers[0]

    async def scenario() -> None:
        await until(lambda: sampler.stats.runs >= 2, what="the sampler running")
        assert (await set_rates(rig.link, "slow", {"cells": 0.01}))["status"] == "accepted"
        runs = sampler.stats.runs
        a = await set_rates(rig.link, "fast", {"cells": 10.0})  # 100 s until the next tick at the slow rate
        assert a["status"] == "accepted", a["reason"]
        assert sampler.rate_hz == 10.0 and sampler.stats.runs > runs

    try:
        rig.run(scenario)
    finally:
        gate.close()


def test_an_old_sampler_error_does_not_veto_a_rate_change(tmp_path: Path) -> None:
    gate = offline_gate()
    cfg = config(gate.port, telemetry=[RATE_CLASS], commands=CommandSettings(hmac_secret=SECRET, health_check_s=0.3))
    rig = Rig(tmp_path, cfg)
    sampler = rig.link.samplers[0]
    read = rig.img.snapshot
    fail = [1]

    def flaky(idx: Any, mono: float) -> Any:  # one transient read error, then normal operation
        if fail[0]:
            fail[0] -= 1
            raise RuntimeError("transient read error")
        return read(idx, mono)

    rig.img.snapshot = flaky  # type: ignore[method-assign, assignment]

    async def scenario() -> None:
        await until(lambda: sampler.stats.errors == 1 and sampler.stats.runs >= 3, what="one sampler error")
        a = await set_rates(rig.link, "r1", {"cells": 20.0})
        assert a["status"] == "accepted", a["reason"]
        assert sampler.rate_hz == 20.0

    try:
        rig.run(scenario)
    finally:
        gate.close()


def test_an_unencodable_record_loses_only_itself_and_leaves_no_seq_hole(tmp_path: Path) -> None:
    """One record that cannot be split must not take the records drained with it, nor leave seqs unaccounted."""
    cfg = CloudSection(enabled=True, host="127.0.0.1", port=1, max_payload=1024,
                       commands=CommandSettings(enabled=False))
    link = CloudLink(cfg, make_image(4), None, {}, tmp_path / "state", GW, "site")
    link.store.open()
    try:
        small = [{"kind": "eis", "target": f"cell[{i}]", "timestamp": 1.7e9 + i, "sweep_id": f"s{i}",
                  "valid": False, "reason": "x" * 200} for i in range(3)]
        big = {"kind": "eis", "target": "cell[9]", "timestamp": 1.7e9, "sweep_id": "s9", "valid": True,
               "fit": {"params": {f"p{i}": 0.1 * i for i in range(200)}}}  # a map larger than a message
        rows, error = link._seal_and_put([("rec", "eis", KIND_EIS, [small[0], big, *small[1:]])])
        assert "split" in error
        eis = [r for r in link.store.all_rows() if r.stream == "eis"]
        assert sorted(r.seq for r in eis) == list(range(link.sealer.last_seq()["eis"] + 1))  # no hole
        assert [x for r in eis for x in decode(r.payload).records] == small
        gaps = [g for r in link.store.all_rows() if r.stream == "gaps" for g in decode(r.payload).records]
        assert [(g["reason"], g["stream"], g["seqs"], g["samples"], g["t0"]) for g in gaps] == \
            [("encode_error", "eis", [], 1, 1_700_000_000_000)]
    finally:
        link.store.close()


def test_events_recorded_before_the_link_runs_reach_the_store(tmp_path: Path) -> None:
    """The start-up events (a latched ERROR coming back) happen before the store is open."""
    gate = offline_gate()
    rig = Rig(tmp_path, config(gate.port, telemetry=[]))
    early = Recorder()
    early(Event(Kind.STATE, "INIT -> ERROR: ERROR before the restart", Level.MSL, index=1))
    rig.recorder = early
    rig.link = link = CloudLink(config(gate.port, telemetry=[]), rig.img, early, {}, tmp_path / "state2", GW, "site")
    link.on_commit.append(rig.rows.append)
    rig.events = 1
    rig.event()  # after the link exists, before it runs

    async def scenario() -> None:
        await until(lambda: link.intake.pending() == 0 and rig.accepted("events"),
                    what="the early events stored")

    try:
        rig.run(scenario)
    finally:
        gate.close()
    assert link.store.path is not None
    assert sorted(r["index"] for r in stored_records(link.store.path, "events")) == [1, 2]
