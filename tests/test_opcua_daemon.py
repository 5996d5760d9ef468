"""OPC UA inside the running daemon: live values from the P0 process's image, estimates, methods."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator

import pytest
from asyncua import ua

from gateway.opcua_config import hash_password
from tests.procs import Daemon, wait_for
from tests.test_eis_daemon import night_sim_text
from tests.test_opcua_support import PASSWORDS, connect, node, ns_of
from tests.test_ops import free_port, scrape

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int, int]]:
    tmp = tmp_path_factory.mktemp("opcua")
    port, metrics = free_port(), free_port()
    cfg = tmp / "bmsgw.toml"
    cfg.write_text(night_sim_text() + f"""
[metrics]
port = {metrics}

[opcua]
enabled = true
port = {port}
anonymous = true
allow_none_readonly = true
accept_any_client_cert = true

[[opcua.user]]
name = "otto"
role = "operator"
password_hash = "{hash_password(PASSWORDS['otto'])}"
""")
    d = Daemon(tmp, "--sim", "--config", str(cfg))
    wait_for(lambda: d.json("status")["opcua"]["listening"], 60, "the OPC UA endpoint")
    yield d, port, metrics
    assert d.stop() == 0


def test_live_values_estimates_and_refused_method_over_none(site: tuple[Daemon, int, int]) -> None:
    d, port, _ = site
    wait_for(lambda: d.json("status")["estimates"]["initialised"], 30, "the estimator")

    async def check() -> None:
        async with connect(f"opc.tcp://127.0.0.1:{port}/bmsgw", policy=None) as client:
            ns = await ns_of(client)
            dv = await node(client, ns, "Pack.Voltage").read_data_value()
            assert dv.StatusCode.is_good() and 224 * 3.3 < dv.Value.Value < 224 * 4.2
            assert dv.SourceTimestamp is not None
            soc = await node(client, ns, "Pack.SoC").read_value()
            assert 10.0 < soc < 90.0
            level = await node(client, ns, "Pack.SafetyLevel").read_data_value()  # the gateway's own image signal
            assert level.StatusCode.is_good() and level.Value.Value in (0.0, 1.0, 2.0, 3.0)
            state = await node(client, ns, "Pack.ContactorState").read_value()
            assert state in ("NORMAL", "PRECHARGE", "STANDBY")
            with pytest.raises(ua.UaStatusCodeError):  # None is read-only: no method calls
                bs = node(client, ns, "")
                methods = [m for m in await bs.get_methods() if (await m.read_browse_name()).Name == "ResetError"]
                await bs.call_method(methods[0], False)

    asyncio.run(check())


def test_endpoint_shows_in_status_metrics_and_doctor(site: tuple[Daemon, int, int]) -> None:
    d, _port, metrics = site
    st = d.json("status")["opcua"]
    assert st["listening"] and st["endpoint"].endswith("/bmsgw")
    m = scrape(metrics)
    assert m["bmsgw_opcua_listening"] == 1 and "bmsgw_opcua_subscriptions" in m
    cfg = next(a for a in d.proc.args if str(a).endswith(".toml"))  # type: ignore[union-attr]
    doc = json.loads(d.cli("doctor", "--config", str(cfg), "--json").stdout)
    checks = {f["check"]: f for f in doc["findings"]}
    assert checks["opc ua"]["status"] == "ok" and checks["permissions"]["status"] == "ok"


def test_operator_starts_an_eis_sweep_and_a_bad_target_is_refused_with_a_reason(site: tuple[Daemon, int, int]) -> None:
    d, port, _ = site

    async def call(target: str) -> list[object]:
        async with connect(f"opc.tcp://127.0.0.1:{port}/bmsgw", "otto") as client:
            ns = await ns_of(client)
            bs = node(client, ns, "")
            method = [m for m in await bs.get_methods() if (await m.read_browse_name()).Name == "StartEisSweep"][0]
            out = await bs.call_method(method, target)
            return out if isinstance(out, list) else [out]

    accepted = asyncio.run(call("cell[12]"))
    assert accepted[0] is True and "queued" in str(accepted[1])
    refused = asyncio.run(call("cell[500]"))
    assert refused[0] is False and "224 cells" in str(refused[1])
    # the measured spectrum's fit reaches EIS.Fit, each parameter with its uncertainty
    wait_for(lambda: any(r["target"] == "cell[12]" and r["valid"] for r in d.json("eis", "show", "--all")),
             120, "the sweep of cell[12]")

    async def fit() -> tuple[float, list[float]]:
        async with connect(f"opc.tcp://127.0.0.1:{port}/bmsgw", "otto") as client:
            ns = await ns_of(client)
            return (await node(client, ns, "EIS.Fit.R0").read_value(),
                    await node(client, ns, "EIS.Fit.RelativeUncertainty").read_value())

    def fitted() -> tuple[float, list[float]] | None:
        r0, sd = asyncio.run(fit())
        return (r0, sd) if r0 > 0 else None

    r0, sd = wait_for(fitted, 30, "EIS.Fit")
    assert 0.0002 < r0 < 0.005 and len(sd) == 9 and all(0.0 < x < 1.0 for x in sd), sd


# -- keep this test LAST in the module: it stops the P0 process for a while (the module's daemon is shared) --


def test_contactor_and_bms_state_go_uncertain_while_p0_hangs(site: tuple[Daemon, int, int]) -> None:
    """P0 stops answering (alive, hung): the states taken from its status keep their last value, Uncertain."""
    d, port, _ = site
    paths = ("Pack.ContactorState", "Pack.BmsState")

    async def read() -> list[ua.DataValue]:
        async with connect(f"opc.tcp://127.0.0.1:{port}/bmsgw", policy=None) as client:
            ns = await ns_of(client)
            return [await node(client, ns, p).read_data_value(raise_on_bad_status=False) for p in paths]

    def statuses(want: int) -> list[ua.DataValue] | None:
        dvs = asyncio.run(read())
        return dvs if all(dv.StatusCode.value == want for dv in dvs) else None

    before = wait_for(lambda: statuses(ua.StatusCodes.Good), 30, "Good states")
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(d.proc.pid), "--sort=start_time"],
                              capture_output=True, text=True, check=True).stdout.split()
    p0 = int(children[0])  # the first child: P0 is forked before anything else starts
    os.kill(p0, signal.SIGSTOP)
    try:
        stale = wait_for(lambda: statuses(ua.StatusCodes.UncertainLastUsableValue), 30, "Uncertain states")
    finally:
        os.kill(p0, signal.SIGCONT)
    assert [dv.Value.Value for dv in stale] == [dv.Value.Value for dv in before]
    wait_for(lambda: statuses(ua.StatusCodes.Good), 30, "Good states again")
