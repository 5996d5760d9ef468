"""OPC UA address space and values: browse paths, units and ranges, statuses from the image, subscriptions.

A real asyncua client over TCP (SignAndEncrypt, Basic256Sha256) reads what the server
publishes from the process image of a 16-cell home battery; one test builds the
224-cell reference site from the shipped config and feeds it real frames.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from asyncua import ua
from test_opcua_support import (
    Collector,
    Harness,
    connect,
    node,
    ns_of,
    run,
    running,
    section,
    utc_seconds,
    wait_for,
)

from drivers.sim_pack import SimPack
from gateway.config import load_config, shipped_config
from gateway.image import Quality
from gateway.opcua_nodes import UNECE_URI, unit_id
from gateway.opcua_server import NAMESPACE_URI
from tests.test_ingest import alternating_writer

pytestmark = pytest.mark.slow

CELL = "Strings.String0.Modules.Module{m}.Cells.Cell{c}.{leaf}"


def cell(c: int, leaf: str = "Voltage") -> str:
    return CELL.format(m=c // 8, c=c, leaf=leaf)


@pytest.fixture(scope="module")
def h(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running(tmp_path_factory.mktemp("opcua-model")) as harness:
        yield harness


async def read(client: Any, ns: int, path: str) -> ua.DataValue:
    return await node(client, ns, path).read_data_value(raise_on_bad_status=False)


async def names(client: Any, ns: int, path: str) -> list[str]:
    return [(await n.read_browse_name()).Name for n in await node(client, ns, path).get_children()]


def test_browse_paths_units_ranges_and_descriptions(h: Harness) -> None:
    async def body() -> None:
        async with connect(h.url, "vera") as c:
            ns = await ns_of(c)
            root = await c.nodes.objects.get_child([f"{ns}:BatterySystem"])
            assert root.nodeid == ua.NodeId("BatterySystem", ns)
            top = await names(c, ns, "")
            for part in ("Identification", "Pack", "Strings", "Limits", "Settings", "Alarms", "Estimators", "EIS",
                         "Gateway", "ResetError", "StartEisSweep", "RequestBalancing"):
                assert part in top
            # the documented browse path and the string NodeId are the same thing
            v = await root.get_child([f"{ns}:{p}" for p in cell(9).split(".")])
            assert v.nodeid == ua.NodeId(f"BatterySystem.{cell(9)}", ns)
            assert await names(c, ns, "Strings.String0.Modules") == ["Module0", "Module1"]
            assert await names(c, ns, "Strings.String0.Modules.Module1.Cells") == [f"Cell{i}" for i in range(8, 16)]
            leaves = await names(c, ns, "Strings.String0.Modules.Module1.Cells.Cell9")
            assert sorted(leaves) == ["Balancing", "SoC", "SoT", "Voltage"]  # cell.temperature: not bound, no node
            assert {"Temperature0", "Temperature1", "BoardTemperature", "Voltage", "State", "Fault"} <= \
                set(await names(c, ns, "Strings.String0.Modules.Module1"))
            assert (await read(c, ns, "Identification.Cells")).Value.Value == 16
            summary = await read(c, ns, "Alarms.ActiveCount")
            assert summary.StatusCode.is_good() and summary.Value.Value == 0
            # units, EU range (the MSL window of the NMC preset), description, type, access
            units = await v.get_child(["0:EngineeringUnits"])
            eu = await units.read_value()
            assert (eu.NamespaceUri, eu.UnitId, eu.DisplayName.Text) == (UNECE_URI, unit_id("VLT"), "V")
            rng = await (await v.get_child(["0:EURange"])).read_value()
            assert (rng.Low, rng.High) == (2.8, 4.2)
            assert "cell voltage" in (await v.read_description()).Text
            assert await v.read_type_definition() == ua.NodeId(ua.ObjectIds.AnalogItemType)
            assert await v.read_data_type() == ua.NodeId(ua.ObjectIds.Double)
            access = (await v.read_attribute(ua.AttributeIds.AccessLevel)).Value.Value
            assert access == ua.AccessLevel.CurrentRead.mask
            temp = node(c, ns, "Strings.String0.Modules.Module1.Temperature1")
            assert (await (await temp.get_child(["0:EngineeringUnits"])).read_value()).UnitId == unit_id("CEL")
            assert await c.get_namespace_array() and NAMESPACE_URI in await c.get_namespace_array()
    run(body)


def test_values_carry_measurement_time_and_quality(h: Harness) -> None:
    site = h.site
    slot = site.cell_slot[5]
    wall = site.feed(slot, {"cell[5].voltage": 3.65}, wall=1.7e9 + 123.456789)
    site.feed(site.status_slot[1], {"module[1].state": 2, "module[1].fault": 0, "cell[9].balancing": 1,
                                    "module[1].voltage": 29.5})
    h.push()

    async def body() -> None:
        async with connect(h.url, "vera") as c:
            ns = await ns_of(c)
            dv = await read(c, ns, cell(5))
            assert dv.StatusCode.is_good() and dv.Value.Value == 3.65
            assert utc_seconds(dv.SourceTimestamp) == pytest.approx(wall, abs=1e-6)
            assert dv.ServerTimestamp is not None
            # nothing new arrives: the node is not written again (the server timestamp stays)
            h.push()
            h.push()
            again = await read(c, ns, cell(5))
            assert (again.SourceTimestamp, again.ServerTimestamp) == (dv.SourceTimestamp, dv.ServerTimestamp)
            # the frame stops arriving: same sample, same measurement time, Uncertain
            site.stale(slot)
            h.push()
            stale = await read(c, ns, cell(5))
            assert stale.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue
            assert stale.Value.Value == 3.65 and stale.SourceTimestamp == dv.SourceTimestamp
            # the BMS flags the value invalid: Bad, no value, the new sample's time
            wall2 = site.feed(slot, {"cell[5].voltage": 3.0}, valid=False)
            h.push()
            bad = await read(c, ns, cell(5))
            assert bad.StatusCode.value == ua.StatusCodes.BadSensorFailure and bad.Value.Value is None
            assert utc_seconds(bad.SourceTimestamp) == pytest.approx(wall2, abs=1e-6)
            # never received: waiting for initial data, no measurement time
            never = await read(c, ns, cell(15))
            assert never.StatusCode.value == ua.StatusCodes.BadWaitingForInitialData
            assert never.SourceTimestamp is None
            # integer and boolean signals keep their types
            state = await read(c, ns, "Strings.String0.Modules.Module1.State")
            assert (state.Value.VariantType, state.Value.Value) == (ua.VariantType.Int32, 2)
            bal = await read(c, ns, cell(9, "Balancing"))
            assert (bal.Value.VariantType, bal.Value.Value) == (ua.VariantType.Boolean, True)
    run(body)


def test_rate_limit_holds_a_sample_back_but_never_a_quality_change(h: Harness) -> None:
    site = h.site  # cells at 0.02 Hz in these tests: one sample per 50 s
    slot = site.cell_slot[6]
    site.feed(slot, {"cell[6].voltage": 3.60})
    h.push()
    wall2 = site.feed(slot, {"cell[6].voltage": 3.61})
    h.push()

    async def body() -> None:
        async with connect(h.url, "vera") as c:
            ns = await ns_of(c)
            assert (await read(c, ns, cell(6))).Value.Value == 3.60  # inside the rate window
            site.stale(slot)
            h.push()
            dv = await read(c, ns, cell(6))  # a quality change goes out at once, with the latest sample
            assert dv.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue
            assert dv.Value.Value == 3.61 and utc_seconds(dv.SourceTimestamp) == pytest.approx(wall2, abs=1e-6)
    run(body)


def test_subscription_gets_measurement_time_and_status_changes(h: Harness) -> None:
    site = h.site
    slot = site.cell_slot[7]
    ident = f"BatterySystem.{cell(7)}"

    async def body() -> None:
        async with connect(h.url, "otto", policy="Aes128Sha256RsaOaep") as c:
            ns = await ns_of(c)
            got = Collector()
            sub = await c.create_subscription(50, got)
            await sub.subscribe_data_change([node(c, ns, cell(7))], queuesize=1)
            await wait_for(lambda: bool(got.values(ident)))
            assert got.values(ident)[-1].StatusCode.value == ua.StatusCodes.BadWaitingForInitialData
            wall = site.feed(slot, {"cell[7].voltage": 3.70})
            await wait_for(lambda: got.values(ident)[-1].Value.Value == 3.70)
            dv = got.values(ident)[-1]
            assert dv.StatusCode.is_good() and utc_seconds(dv.SourceTimestamp) == pytest.approx(wall, abs=1e-6)
            site.stale(slot)
            await wait_for(lambda: got.values(ident)[-1].StatusCode.is_uncertain())
            assert got.values(ident)[-1].SourceTimestamp == dv.SourceTimestamp
            site.feed(slot, {"cell[7].voltage": float("nan")})
            await wait_for(lambda: got.values(ident)[-1].StatusCode.is_bad())
            assert got.values(ident)[-1].StatusCode.value == ua.StatusCodes.BadSensorFailure
            await sub.delete()
    run(body)


def test_asyncua_own_write_path_delivers_the_same(h: Harness) -> None:
    """The inline delivery to monitored items and asyncua's own path (its fallback) agree."""
    site = h.site
    ident = f"BatterySystem.{cell(4)}"
    writer = h.server.writer
    assert writer is not None and writer.inline
    writer.inline = False
    try:
        async def body() -> None:
            async with connect(h.url, "vera") as c:
                ns = await ns_of(c)
                got = Collector()
                sub = await c.create_subscription(50, got)
                await sub.subscribe_data_change([node(c, ns, cell(4))], queuesize=1)
                await wait_for(lambda: bool(got.values(ident)))
                wall = site.feed(site.cell_slot[4], {"cell[4].voltage": 3.44})
                await wait_for(lambda: got.values(ident)[-1].Value.Value == 3.44)
                dv = got.values(ident)[-1]
                assert dv.StatusCode.is_good() and utc_seconds(dv.SourceTimestamp) == pytest.approx(wall, abs=1e-6)
                await sub.delete()
        run(body)
    finally:
        writer.inline = True
    assert writer.fallbacks == 0  # nothing unknown met on the inline path


def test_aggregates_from_the_image(h: Harness) -> None:
    site = h.site
    wall = site.feed(site.pack_slot, {"pack.voltage": 52.0, "pack.current": -10.0, "contactor.main_positive": 1,
                                      "string[0].current": -10.0, "string[0].voltage": 52.0})
    for c in range(4):
        site.feed(site.cell_slot[c], {f"cell[{c}].voltage": 3.5 + c / 100})
    h.push()
    img = site.image
    idx = np.arange(img.span("cell.voltage").start, img.span("cell.voltage").stop)

    def lowest_good() -> float:
        good = img.quality(idx) == Quality.GOOD
        return float(img.value[idx][good].min())

    async def body() -> None:
        async with connect(h.url, "vera") as c:
            ns = await ns_of(c)
            power = await read(c, ns, "Pack.Power")
            assert power.Value.Value == -520.0 and power.StatusCode.is_good()
            assert utc_seconds(power.SourceTimestamp) == pytest.approx(wall, abs=1e-6)
            low = await wait_for_async(lambda: read(c, ns, "Pack.MinCellVoltage"),
                                       lambda d: d.Value.Value == lowest_good())
            assert low.StatusCode.is_uncertain()  # some cells are not good
            assert (await read(c, ns, "Contactor.MainPositive")).Value.Value == 1.0
            assert (await read(c, ns, "Strings.String0.Current")).Value.Value == -10.0
    run(body)


def test_estimates_are_written_when_they_change(h: Harness) -> None:
    t1 = time.time() - 5.0
    soc = np.linspace(40, 55, 16)
    h.estimates = {"time": t1, "pack.soc": 55.5, "pack.contactor_state": "CLOSED", "cell.soc": soc,
                   "eis.frequency_hz": [1000.0, 100.0, 10.0], "eis.fit.r0_ohm": (0.0012, t1 - 60),
                   "eis.fit.rel_sd": ([0.002, 0.02, 0.01, 0.03, 0.02, 0.05, 0.04, 0.08, 0.05], t1 - 60),
                   "estimators.ekf_innovation_v": 0.002}

    async def body() -> None:
        async with connect(h.url, "vera") as c:
            ns = await ns_of(c)
            soc_node = node(c, ns, "Pack.SoC")

            async def value(path: str) -> Any:
                return (await read(c, ns, path)).Value.Value

            # an estimators.* key gets its node the first time the provider returns it
            await wait_for_async(lambda: read(c, ns, "Estimators.EkfInnovationV"), lambda d: d.Value.Value == 0.002)
            dv = await soc_node.read_data_value()
            assert dv.Value.Value == 55.5 and utc_seconds(dv.SourceTimestamp) == pytest.approx(t1, abs=1e-6)
            assert await value("Pack.ContactorState") == "CLOSED"
            assert await value(cell(12, "SoC")) == pytest.approx(soc[12])
            assert await value("EIS.Frequency") == [1000.0, 100.0, 10.0]
            r0 = await read(c, ns, "EIS.Fit.R0")
            assert r0.Value.Value == 0.0012 and utc_seconds(r0.SourceTimestamp) == pytest.approx(t1 - 60, abs=1e-6)
            assert (await value("EIS.Fit.RelativeUncertainty"))[7] == 0.08  # C3
            # the provider returns the same estimate again: nothing is written again
            for _ in range(3):
                h.push()
            assert (await soc_node.read_data_value()).ServerTimestamp == dv.ServerTimestamp
            # a new estimate with the same numbers is a new sample; a state that did not change is not
            state = await read(c, ns, "Pack.ContactorState")
            h.estimates = {**h.estimates, "time": t1 + 1.0}
            await wait_for_async(lambda: soc_node.read_data_value(), lambda d: d.ServerTimestamp != dv.ServerTimestamp)
            assert utc_seconds((await soc_node.read_data_value()).SourceTimestamp) == pytest.approx(t1 + 1, abs=1e-6)
            assert (await read(c, ns, "Pack.ContactorState")).ServerTimestamp == state.ServerTimestamp
    run(body)


def test_a_stale_estimate_is_uncertain_with_its_last_value_then_good_again(h: Harness) -> None:
    """The provider marks keys it could not refresh (P0 hangs): same value, UncertainLastUsableValue, its own time."""
    h.estimates = {"pack.contactor_state": "PRECHARGE", "pack.bms_state": "derate"}

    async def body() -> None:
        async with connect(h.url, "vera") as c:
            ns = await ns_of(c)
            good = await wait_for_async(lambda: read(c, ns, "Pack.ContactorState"),
                                        lambda d: d.Value.Value == "PRECHARGE" and d.StatusCode.is_good())
            h.estimates = {**h.estimates, "stale": {"pack.contactor_state"}}
            stale = await wait_for_async(lambda: read(c, ns, "Pack.ContactorState"),
                                         lambda d: not d.StatusCode.is_good())
            assert stale.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue
            assert stale.Value.Value == "PRECHARGE" and stale.SourceTimestamp == good.SourceTimestamp
            assert (await read(c, ns, "Pack.BmsState")).StatusCode.is_good()  # not marked: untouched
            h.estimates = {k: v for k, v in h.estimates.items() if k != "stale"}
            again = await wait_for_async(lambda: read(c, ns, "Pack.ContactorState"), lambda d: d.StatusCode.is_good())
            assert again.Value.Value == "PRECHARGE" and again.SourceTimestamp == good.SourceTimestamp
    run(body)


async def wait_for_async(get: Any, ok: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if ok(value):
            return value
        assert time.monotonic() < deadline, "condition not met"
        await anyio.sleep(0.02)


def test_limits_are_read_only_and_follow_the_table(h: Harness) -> None:
    async def body() -> None:
        async with connect(h.url, "erin") as c:
            ns = await ns_of(c)
            msl = node(c, ns, "Limits.CellVoltageHigh.MSL")
            assert await msl.read_value() == 4.2
            eu = await (await msl.get_child(["0:EngineeringUnits"])).read_value()
            assert eu.UnitId == unit_id("VLT")
            with pytest.raises(ua.uaerrors.BadNotWritable):
                await msl.write_value(ua.DataValue(ua.Variant(4.1, ua.VariantType.Double)))
            assert await node(c, ns, "Limits.DeepDischargeVoltage").read_value() == 2.5
            h.limits = {**h.limits, "cell_voltage_high": {"mol": 4.1, "rsl": 4.15, "msl": 4.19}}
            await wait_for_async(msl.read_value, lambda v: v == 4.19)
            # the engineer setting that mirrors it follows too
            setting = node(c, ns, "Settings.Limits.CellVoltageHigh.MSL")
            await wait_for_async(setting.read_value, lambda v: v == 4.19)
    run(body)


def test_gateway_diagnostics(h: Harness) -> None:
    async def body() -> None:
        async with connect(h.url, "vera") as c:
            ns = await ns_of(c)
            backlog = node(c, ns, "Gateway.Diagnostics.Cloud.Backlog")
            await wait_for_async(backlog.read_value, lambda v: v == 12.0)
            assert await node(c, ns, "Gateway.Diagnostics.Loops.BusRates.Runs").read_value() == 3.0
            assert await node(c, ns, "Gateway.Diagnostics.Cloud.Connected").read_value() is False
            assert await node(c, ns, "Gateway.Diagnostics.OpcUa.Endpoint").read_value() == h.url
            h.diagnostics = {**h.diagnostics, "cloud": {"connected": True, "backlog": 0}}
            await wait_for_async(backlog.read_value, lambda v: v == 0.0)
            await wait_for_async(node(c, ns, "Gateway.Diagnostics.OpcUa.Subscriptions").read_value,
                                 lambda v: v >= 0)
    run(body)


def test_the_224_cell_reference_site_fed_with_real_frames(tmp_path: Path) -> None:
    loaded = load_config(shipped_config())
    cfg = loaded.config
    ingest = loaded.ingests[cfg.bus[0].name]
    sim = SimPack(str(loaded.dbcs[cfg.bus[0].name][0].path), ingest.on_frame, modules=cfg.site.modules,
                  cells_per_module=cfg.site.cells_per_module, contactors_closed=True, seed=3)

    class Site:
        image = loaded.image
        layout = cfg.site

    with Harness(section(cell_rate_hz=100.0, pack_rate_hz=100.0), Site(), tmp_path) as harness:
        for _ in range(120):  # 1.2 s of the pack's traffic: every frame at least once
            sim.tick()
        img = loaded.image
        i = img.index("cell[223].voltage")
        slot = int(img.slot_of[i])

        async def body() -> None:
            async with connect(harness.url, "vera") as c:
                ns = await ns_of(c)
                path = "Strings.String0.Modules.Module15.Cells.Cell223.Voltage"
                dv = await wait_for_async(lambda: read(c, ns, path),
                                          lambda d: abs(utc_seconds(d.SourceTimestamp) - float(img.rx_time[slot])) < 2e-6)
                assert dv.StatusCode.is_good() and dv.Value.Value == pytest.approx(float(img.value[i]))
                assert await names(c, ns, "Strings.String0.Modules.Module15.Cells") == \
                    [f"Cell{k}" for k in range(210, 224)]
                with pytest.raises(ua.uaerrors.BadNodeIdUnknown):
                    await node(c, ns, "Strings.String0.Modules.Module16.Cells.Cell224.Voltage").read_value()
                current = await read(c, ns, "Pack.Current")
                assert current.Value.Value == pytest.approx(float(img.value[img.index("pack.current")]))
                assert (await read(c, ns, "Identification.Cells")).Value.Value == 224
                assert (await read(c, ns, "Strings.String0.Modules.Module3.Temperature1")).StatusCode.is_good()
        run(body)


def test_a_published_value_is_never_another_frames_status(tmp_path: Path) -> None:
    """P0 rewrites the pack current while the server publishes it: the invalid frame's -8000 A never goes out
    as Good: value and StatusCode come from one read of the image."""
    with running(tmp_path) as hh:
        img, srv = hh.site.image, hh.server
        i = img.index("pack.current")
        g = next(g for g in srv._groups if i in g.idx)
        target = g.nodeids[int(np.flatnonzero(g.idx == i)[0])]
        seen: set[tuple[Any, bool]] = set()

        async def write(nodeid: Any, _attr: Any, dv: ua.DataValue) -> None:
            if nodeid == target:
                seen.add((dv.Value.Value, dv.StatusCode.is_good()))

        async def push() -> None:
            for n in range(50_000):  # bounded; on a busy box push on until the bad frame went out
                if n >= 20_000 and (None, False) in seen:
                    break
                await srv._push_group(g, time.monotonic(), True)

        srv._write = write  # this thread's pushes only see it; the server's own loop may too, harmlessly
        frames = [{i: (10.0, True)}, {i: (-8000.0, False)}]
        with alternating_writer(img, hh.site.pack_slot, frames):
            anyio.run(push)
    # a read that met the writer mid-frame on every retry goes out Uncertain (STALE), whatever its value
    assert (None, False) in seen and (-8000.0, True) not in seen, seen
