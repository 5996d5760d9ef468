"""OPC UA methods, writes and alarms, by role: who may do what, and the status codes of everything refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from asyncua import ua
from test_opcua_support import (
    Collector,
    Harness,
    Site,
    connect,
    make_cert,
    node,
    ns_of,
    run,
    running,
    section,
    wait_for,
)

from gateway.events import Event, Kind, Level

pytestmark = pytest.mark.slow

ACK = ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge)


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running(tmp_path_factory.mktemp("opcua-access"), allow_none_readonly=True, anonymous=True) as harness:
        yield harness


async def call(client: Any, ns: int, method: str, *args: ua.Variant) -> list[Any]:
    root = node(client, ns, "")
    return list(await root.call_method(ua.NodeId(f"BatterySystem.{method}", ns), *args))


def boolean(v: bool) -> ua.Variant:
    return ua.Variant(v, ua.VariantType.Boolean)


# -- methods ------------------------------------------------------------------------------------


def test_methods_accept_and_refuse_with_a_reason(h: Harness) -> None:
    h.calls.answer["StartEisSweep"] = (False, "refused: pack current 12.0 A is not below 1.0 A")

    async def body() -> None:
        async with connect(h.url, "otto") as c:
            ns = await ns_of(c)
            assert await call(c, ns, "ResetError", boolean(True)) == [True, "ResetError done"]
            assert await call(c, ns, "RequestBalancing", boolean(False)) == [True, "RequestBalancing done"]
            assert await call(c, ns, "StartEisSweep", ua.Variant("module[1]", ua.VariantType.String)) == \
                [False, "refused: pack current 12.0 A is not below 1.0 A"]
            # arguments are checked before anything runs
            with pytest.raises(ua.uaerrors.BadInvalidArgument):
                await call(c, ns, "ResetError", ua.Variant(1, ua.VariantType.Int32))
            with pytest.raises(ua.uaerrors.BadArgumentsMissing):
                await call(c, ns, "StartEisSweep")
            with pytest.raises(ua.uaerrors.BadTooManyArguments):
                await call(c, ns, "RequestBalancing", boolean(True), boolean(True))
    run(body)
    assert ("ResetError", (True,)) in h.calls.log and ("StartEisSweep", ("module[1]",)) in h.calls.log
    assert all(name != "RequestBalancing" or args == (False,) for name, args in h.calls.log)
    audit = [e.message for e in h.recorder.recent(50) if e.name == "opcua_StartEisSweep"]
    assert audit and "by otto" in audit[-1] and "refused" in audit[-1]


def test_viewers_and_security_none_cannot_call(h: Harness) -> None:
    before = len(h.calls.log)

    async def body() -> None:
        async with connect(h.url, "vera") as c:
            ns = await ns_of(c)
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await call(c, ns, "ResetError", boolean(False))
        async with connect(h.url, "erin", policy=None) as c:  # an engineer, but on a None channel
            ns = await ns_of(c)
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await call(c, ns, "ResetError", boolean(False))
    run(body)
    assert len(h.calls.log) == before


# -- writes -------------------------------------------------------------------------------------


async def write(client: Any, ns: int, path: str, variant: ua.Variant) -> None:
    await node(client, ns, path).write_value(ua.DataValue(variant))


def test_engineer_writes_settings_in_range_and_of_the_right_type(h: Harness) -> None:
    h.writes.clear()

    async def body() -> None:
        async with connect(h.url, "erin", mode=ua.MessageSecurityMode.Sign) as c:
            ns = await ns_of(c)
            await write(c, ns, "Settings.ChargeCurrentMax", ua.Variant(60.0, ua.VariantType.Double))
            assert await node(c, ns, "Settings.ChargeCurrentMax").read_value() == 60.0
            await write(c, ns, "Settings.BalancingAllowed", boolean(False))
            with pytest.raises(ua.uaerrors.BadOutOfRange):
                await write(c, ns, "Settings.ChargeCurrentMax", ua.Variant(500.0, ua.VariantType.Double))
            with pytest.raises(ua.uaerrors.BadOutOfRange):
                await write(c, ns, "Settings.ChargeCurrentMax", ua.Variant(float("nan"), ua.VariantType.Double))
            with pytest.raises(ua.uaerrors.BadTypeMismatch):
                await write(c, ns, "Settings.ChargeCurrentMax", ua.Variant(60.0, ua.VariantType.Float))
            with pytest.raises(ua.uaerrors.BadTypeMismatch):
                await write(c, ns, "Settings.ChargeCurrentMax", ua.Variant("60", ua.VariantType.String))
            with pytest.raises(ua.uaerrors.BadNotWritable):
                await write(c, ns, "Pack.Voltage", ua.Variant(1.0, ua.VariantType.Double))
            # inside the EU range but refused by the gateway's own validation (hardware limits, ordering)
            h.write_answer = (False, "cell_voltage_high: levels out of order")
            try:
                with pytest.raises(ua.uaerrors.BadOutOfRange):
                    await write(c, ns, "Settings.Limits.CellVoltageHigh.MOL", ua.Variant(4.24, ua.VariantType.Double))
            finally:
                h.write_answer = None
            with pytest.raises(ua.uaerrors.BadOutOfRange):  # beyond the hardware limit (4.25 V): never asked
                await write(c, ns, "Settings.Limits.CellVoltageHigh.MSL", ua.Variant(4.3, ua.VariantType.Double))
    run(body)
    assert h.writes == [("ChargeCurrentMax", 60.0), ("BalancingAllowed", False),
                        ("Limits.CellVoltageHigh.MOL", 4.24)]
    assert h.server.status()["writes_refused"] >= 5


def test_writes_need_an_engineer_on_a_secured_channel(h: Harness) -> None:
    h.writes.clear()

    async def body() -> None:
        value = ua.Variant(55.0, ua.VariantType.Double)
        for user in ("vera", "otto"):
            async with connect(h.url, user) as c:
                ns = await ns_of(c)
                with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                    await write(c, ns, "Settings.ChargeCurrentMax", value)
        async with connect(h.url, "erin", policy=None) as c:
            ns = await ns_of(c)
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await write(c, ns, "Settings.ChargeCurrentMax", value)
        async with connect(h.url, None, policy=None) as c:  # anonymous: reads and browses only
            ns = await ns_of(c)
            assert (await node(c, ns, "Identification.GatewayId").read_value()) == "test-gw"
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await write(c, ns, "Settings.ChargeCurrentMax", value)
        # an X.509 user certificate mapped to an engineer
        async with connect(h.url, cert=make_cert("client2"), user_cert=make_cert("laptop-user", user=True)) as c:
            ns = await ns_of(c)
            await write(c, ns, "Settings.ChargeCurrentMax", value)
    run(body)
    assert h.writes == [("ChargeCurrentMax", 55.0)]


# -- alarms ---------------------------------------------------------------------------------------


async def alarm_type(client: Any, ns: int) -> Any:
    return await client.nodes.base_event_type.get_child(
        ["0:ConditionType", "0:AcknowledgeableConditionType", "0:AlarmConditionType", f"{ns}:BmsAlarmType"])


async def alarm_events(client: Any, ns: int) -> tuple[Collector, Any]:
    """A subscription to the server's BMS alarm events: what it received, and the subscription."""
    got = Collector()
    sub = await client.create_subscription(50, got)
    await sub.subscribe_events(client.nodes.server, await alarm_type(client, ns), queuesize=100)
    return got, sub


def last(got: Collector, check: str) -> Any:
    return next((e for e in reversed(got.events) if getattr(e, "Check", None) == check), None)


def test_protection_events_become_conditions_that_operators_acknowledge(h: Harness) -> None:
    async def body() -> None:
        async with connect(h.url, "otto") as c, connect(h.url, "vera") as viewer:
            ns = await ns_of(c)
            got, sub = await alarm_events(c, ns)
            raised = Event(Kind.LIMIT, "cell_voltage_high", Level.RSL, True, index=3, value=4.19, limit=4.18,
                           message="cell_voltage_high at 3 RSL exceeded: 4.19 V (limit 4.18)")
            await anyio.to_thread.run_sync(h.recorder, raised)  # protection publishes from its own threads
            await wait_for(lambda: last(got, "cell_voltage_high") is not None)
            e = last(got, "cell_voltage_high")
            assert e.Severity == 600 and e.ConditionName == "CellVoltageHigh" and e.Level == "RSL"
            assert getattr(e, "ActiveState/Id") is True and getattr(e, "AckedState/Id") is False and e.Retain
            assert (e.Element, e.MeasuredValue, e.LimitValue) == (3, 4.19, 4.18)
            assert e.NodeId == ua.NodeId("BatterySystem.Alarms.CellVoltageHigh", ns)
            assert e.Time.timestamp() == pytest.approx(raised.time, abs=1e-3)
            assert "4.19 V" in e.Message.Text
            assert await node(c, ns, "Alarms.ActiveCount").read_value() >= 1
            condition = c.get_node(e.NodeId)
            event_id = ua.Variant(e.EventId, ua.VariantType.ByteString)
            comment = ua.Variant(ua.LocalizedText("seen, derating"), ua.VariantType.LocalizedText)
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await viewer.get_node(e.NodeId).call_method(ACK, event_id, comment)
            await condition.call_method(ACK, event_id, comment)
            await wait_for(lambda: getattr(last(got, "cell_voltage_high"), "AckedState/Id") is True)
            acked = last(got, "cell_voltage_high")
            assert acked.ClientUserId == "otto" and acked.Comment.Text == "seen, derating" and acked.Retain
            with pytest.raises(ua.uaerrors.BadEventIdUnknown):  # an older event of the condition
                await condition.call_method(ACK, event_id, comment)
            with pytest.raises(ua.uaerrors.BadConditionBranchAlreadyAcked):
                await condition.call_method(ACK, ua.Variant(acked.EventId, ua.VariantType.ByteString), comment)
            # the level escalates: a new activation must be acknowledged again, with the MSL severity
            await anyio.to_thread.run_sync(h.recorder, Event(Kind.LIMIT, "cell_voltage_high", Level.MSL, True,
                                                             index=3, value=4.21, limit=4.2, message="MSL"))
            await wait_for(lambda: last(got, "cell_voltage_high").Severity == 900)
            assert getattr(last(got, "cell_voltage_high"), "AckedState/Id") is False
            # both levels clear; acknowledged then inactive: not retained any more
            for level in (Level.MSL, Level.RSL):
                await anyio.to_thread.run_sync(h.recorder, Event(Kind.LIMIT, "cell_voltage_high", level, False,
                                                                 index=3, value=4.1, limit=4.18, message="cleared"))
            await wait_for(lambda: getattr(last(got, "cell_voltage_high"), "ActiveState/Id") is False)
            assert last(got, "cell_voltage_high").Retain is True  # not acknowledged yet
            await condition.call_method(ACK, ua.Variant(last(got, "cell_voltage_high").EventId,
                                                        ua.VariantType.ByteString), comment)
            await wait_for(lambda: last(got, "cell_voltage_high").Retain is False)
            await sub.delete()
    run(body)


def test_trips_are_events_and_condition_refresh_replays_retained_alarms(h: Harness) -> None:
    async def body() -> None:
        async with connect(h.url, "vera") as c:
            ns = await ns_of(c)
            stale = Event(Kind.DATA, "stale_data", Level.MSL, True, index=17, message="cell[17].voltage: stopped")
            await anyio.to_thread.run_sync(h.recorder, stale)
            trip = Event(Kind.TRIP, "stale_data", Level.MSL, True, index=17, message="trip: stale data")
            got = Collector()
            sub = await c.create_subscription(50, got)
            bms_event = await c.nodes.base_event_type.get_child([f"{ns}:BmsEventType"])
            await sub.subscribe_events(node(c, ns, ""), bms_event, queuesize=100)  # the BatterySystem notifier
            await anyio.to_thread.run_sync(h.recorder, trip)
            await wait_for(lambda: any(getattr(e, "Kind", None) == "trip" for e in got.events))
            e = next(e for e in got.events if e.Kind == "trip")
            assert e.Severity == 1000 and e.Element == 17 and e.Message.Text == "trip: stale data"
            # a client that connects later asks for the alarms that are still retained
            later, sub2 = await alarm_events(c, ns)
            await anyio.sleep(0.2)
            assert last(later, "stale_data") is None
            await c.get_node(ua.ObjectIds.ConditionType).call_method(
                ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh),
                ua.Variant(sub2.subscription_id, ua.VariantType.UInt32))
            await wait_for(lambda: last(later, "stale_data") is not None)
            replay = last(later, "stale_data")
            assert getattr(replay, "ActiveState/Id") is True and replay.Severity == 900 and replay.Retain
            rows = await node(c, ns, "Alarms.Active").read_value()
            assert any(r.startswith("StaleData MSL 17") for r in rows)
            await sub.delete()
            await sub2.delete()
    run(body)
    assert h.server.status()["events_dropped"] == 0


def test_a_burst_of_events_from_another_thread_is_queued_and_emitted(h: Harness) -> None:
    emitted = h.server.status()["events_emitted"]
    for k in range(2000):  # the subscriber only appends to a deque: it returns at once
        h.recorder(Event(Kind.LIMIT, "cell_temperature_spread", Level.MOL, k % 2 == 0, value=5.5, limit=5.0))

    async def body() -> None:
        await wait_for(lambda: h.server.status()["events_pending"] == 0)
    run(body)
    status = h.server.status()
    assert status["events_emitted"] - emitted == 2000 and status["events_dropped"] == 0


def test_audit_events_cut_long_arguments(h: Harness) -> None:
    async def body() -> None:
        async with connect(h.url, "otto") as c:
            ns = await ns_of(c)
            await call(c, ns, "StartEisSweep", ua.Variant("x" * 10_000, ua.VariantType.String))
    run(body)
    audit = [e.message for e in h.recorder.recent(50) if e.name == "opcua_StartEisSweep"][-1]
    assert "x" * 256 in audit and "x" * 257 not in audit


def test_acknowledge_takes_exactly_two_arguments_and_checks_the_role_first(h: Harness) -> None:
    async def body() -> None:
        async with connect(h.url, "otto") as c, connect(h.url, "vera") as viewer:
            ns = await ns_of(c)
            got, sub = await alarm_events(c, ns)
            await anyio.to_thread.run_sync(h.recorder, Event(Kind.LIMIT, "cell_voltage_low", Level.MOL, True, index=2,
                                                             value=3.0, limit=3.1))
            await wait_for(lambda: last(got, "cell_voltage_low") is not None)
            e = last(got, "cell_voltage_low")
            cond = c.get_node(e.NodeId)
            event_id = ua.Variant(e.EventId, ua.VariantType.ByteString)
            comment = ua.Variant(ua.LocalizedText("x"), ua.VariantType.LocalizedText)
            with pytest.raises(ua.uaerrors.BadTooManyArguments):
                await cond.call_method(ACK, event_id, comment, boolean(True))
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):  # whatever the arguments, a viewer may not
                await viewer.get_node(e.NodeId).call_method(ACK, event_id)
            with pytest.raises(ua.uaerrors.BadArgumentsMissing):
                await cond.call_method(ACK, event_id)
            assert h.server.alarms.conditions[("limit", "cell_voltage_low")].acked is False
            await cond.call_method(ACK, event_id, comment)
            await anyio.to_thread.run_sync(h.recorder, Event(Kind.LIMIT, "cell_voltage_low", Level.MOL, False, index=2,
                                                             value=3.2, limit=3.1))
            await wait_for(lambda: last(got, "cell_voltage_low").Retain is False)
            await sub.delete()
    run(body)


def test_condition_refresh_only_for_the_callers_subscriptions_and_typed(h: Harness) -> None:
    refresh = ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh)

    async def body() -> None:
        async with connect(h.url, "erin") as victim, connect(h.url, "vera", cert=make_cert("client2")) as other:
            ns = await ns_of(victim)
            got, sub = await alarm_events(victim, ns)
            condition_type = other.get_node(ua.ObjectIds.ConditionType)
            with pytest.raises(ua.uaerrors.BadSubscriptionIdInvalid):
                await condition_type.call_method(refresh, ua.Variant(sub.subscription_id, ua.VariantType.UInt32))
            with pytest.raises(ua.uaerrors.BadTypeMismatch):
                await condition_type.call_method(refresh, ua.Variant([1, 2], ua.VariantType.UInt32))
            with pytest.raises(ua.uaerrors.BadTypeMismatch):
                await condition_type.call_method(refresh, ua.Variant(sub.subscription_id, ua.VariantType.Int32))
            await victim.get_node(ua.ObjectIds.ConditionType).call_method(  # its own
                refresh, ua.Variant(sub.subscription_id, ua.VariantType.UInt32))
            await sub.delete()
    run(body)


def test_a_backlog_is_drained_in_steps_with_one_summary_per_batch(h: Harness) -> None:
    """The drain yields to the event loop every few events, and writes the alarm summary once per batch."""
    assert h.portal is not None
    alarms = h.server.alarms
    summaries = 0
    publish = alarms.publish_summary

    async def counted(when: Any) -> None:
        nonlocal summaries
        summaries += 1
        await publish(when)

    seen: set[int] = set()
    done = False

    async def ticker() -> None:  # another task of the server's event loop
        while not done:
            if alarms.backlog():
                seen.add(h.server.stats.events_emitted)
            await anyio.sleep(0.001)

    events = [Event(Kind.LIMIT, "cell_temperature_spread", Level.MOL, k % 2 == 0, value=5.5, limit=5.0)
              for k in range(2000)]

    def feed() -> int:  # in the server's event loop: the drain cannot start before all are queued
        for ev in events:
            h.recorder(ev)
        return h.server.stats.events_emitted

    alarms.publish_summary = counted  # type: ignore[method-assign]
    task = h.portal.start_task_soon(ticker)
    try:
        start = h.portal.call(feed)

        async def drained() -> None:
            await wait_for(lambda: h.server.status()["events_pending"] == 0)
        run(drained)
    finally:
        done = True
        task.result(timeout=30)
        alarms.publish_summary = publish  # type: ignore[method-assign]
    assert any(start < n < start + 2000 for n in seen)  # the loop ran while the backlog drained
    assert 1 <= summaries <= 3


def test_an_overflowing_queue_never_loses_the_latest_state_of_a_condition(tmp_path: Path) -> None:
    """Events queued while the server is not serving overflow the queue: conditions keep their latest state
    per element and level (the clear that came last wins); only plain events are dropped, and counted."""
    h = Harness(section(), Site(), tmp_path, max_pending_events=100)
    for k in range(299):  # the 100 that fit end with the spread active
        h.recorder(Event(Kind.LIMIT, "cell_temperature_spread", Level.MOL, k % 2 == 1, value=5.5, limit=5.0))
    h.recorder(Event(Kind.LIMIT, "cell_voltage_high", Level.RSL, True, index=5, value=4.19, limit=4.18))
    for _ in range(7):
        h.recorder(Event(Kind.TRIP, "cell_voltage_high", Level.MSL, True, index=5, message="trip"))
    h.recorder(Event(Kind.LIMIT, "cell_temperature_spread", Level.MOL, False, value=4.0, limit=5.0, message="cleared"))
    with h:
        async def body() -> None:
            await wait_for(lambda: h.server.status()["events_pending"] == 0)
            async with connect(h.url, "vera") as c:
                ns = await ns_of(c)
                rows = await node(c, ns, "Alarms.Active").read_value()
                assert rows == ["CellVoltageHigh RSL 5"]
                assert await node(c, ns, "Alarms.ActiveCount").read_value() == 1
        run(body)
        assert h.server.status()["events_dropped"] == 7
