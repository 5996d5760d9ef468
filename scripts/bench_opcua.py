#!/usr/bin/env python3
"""OPC UA benchmark: the bmsgw server under 3 subscribed clients, against the naive write_value loop.

The gateway side is laid out like the daemon: a process forked first runs the CAN side
(the simulated 224-cell reference pack of the shipped config sending its real frames
through the real ingest into the process image, which is shared memory), and the main
process runs an estimator stand-in (cell SoC and SoT once a second) and the OpcuaServer. Three client processes (asyncua, SignAndEncrypt Basic256Sha256, a viewer
user) each subscribe to the same 1,000 variables (cell voltage, balancing, SoC, SoT,
module and pack values) at a 250 ms publishing interval, queue size 1, and note for
every notification the arrival of its notification message minus its SourceTimestamp (the
measurement time), and also when asyncua's per-item dispatch handed it to the handler.

Phases, all with the three clients subscribed:

1. ``default``: the site at the default rates (pack 10 Hz, cells 1 Hz) for --seconds:
   ``cpu_pct`` is the CPU time of the event-loop thread (asyncua and our pushes; the
   simulated pack and the decoding run in the other process, as in the daemon) over wall
   time; ``sub_p99_ms`` is the 99th percentile of measurement time to
   notification (message arrival) over every client; ``sub_p99_ms_in_handler`` the same
   at the handler, which adds the client library's own dispatch time.
2. ``capacity``: the pack process stops; the image is refreshed (every signal, every slot)
   before each ``push_once(force=True)``, back to back: ``updates_per_s`` is the number of
   values written into the address space per second.
3. ``baseline``: the image stands still; the same variables get fresh values through the
   naive loop a user would write: ``await node.write_value(DataValue)`` per node.

Loopback only. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncua import Client, ua  # noqa: E402
from asyncua.crypto import cert_gen  # noqa: E402
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

CLIENTS = 3
ITEMS = 1000
PUBLISH_MS = 250.0
USER, PASSWORD = "bench", "bench-password"


def make_client_cert(folder: Path, name: str) -> tuple[Path, Path, str]:
    """A client application certificate (and key) with its application URI."""
    uri = f"urn:bmsgw:bench:{name}"
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=2)
    cert_file, key_file = folder / f"{name}.der", folder / f"{name}.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_file.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_file, key_file, uri


# -- client process ----------------------------------------------------------------------------


class _Handler:
    """Per notification: when its message arrived, and when the handler got it (after asyncua's dispatch)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.arrived = math.nan

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        now = time.time()
        ts = data.monitored_item.Value.SourceTimestamp
        if ts is not None:
            src = ts.timestamp()
            self.samples.append((now, (self.arrived - src) * 1000.0, (now - src) * 1000.0))


async def client_main(args: argparse.Namespace) -> None:
    # the clients stand for SCADA machines on the network; sharing the gateway's 2 cores here,
    # they yield the CPU like the daemon's main process does (P0 keeps priority)
    os.nice(10)
    nodes_ids = json.loads(Path(args.nodes).read_text())
    client = Client(args.url, timeout=30)
    client.application_uri = args.uri
    await client.set_security(SecurityPolicyBasic256Sha256, args.cert, args.key, mode=ua.MessageSecurityMode.SignAndEncrypt)
    client.set_user(USER)
    client.set_password(PASSWORD)
    handler = _Handler()
    async with client:
        sub = await client.create_subscription(PUBLISH_MS, handler)
        # note when each notification message arrives (decoded), before the per-item dispatch
        callbacks = client.uaclient._subscription_callbacks
        deliver = callbacks[sub.subscription_id]

        async def arrived(result: Any) -> None:
            handler.arrived = time.time()
            await deliver(result)
        callbacks[sub.subscription_id] = arrived
        nodes = [client.get_node(n) for n in nodes_ids]
        for k in range(0, len(nodes), 250):
            await sub.subscribe_data_change(nodes[k:k + 250], queuesize=1)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)  # the bench says when to stop
        await sub.delete()
    Path(args.out).write_text(json.dumps(handler.samples))


# -- gateway side ------------------------------------------------------------------------------


class Estimates:
    """Stand-in estimator: cell SoC from the cell voltage and SoT from the module temperature, once a second."""

    def __init__(self, image: Any, cells: int, per_module: int) -> None:
        self.image = image
        self.cells = cells
        self.per_module = per_module
        self.capacity = False
        self.last = -math.inf
        self.data: dict[str, Any] = {}

    def __call__(self) -> dict[str, Any]:
        now = time.time()
        if self.capacity:  # a fresh estimate at every call
            return {"time": now, "cell.soc": np.random.uniform(20, 80, self.cells),
                    "cell.sot": np.random.uniform(20, 30, self.cells), "pack.soc": float(np.random.uniform(20, 80))}
        if now - self.last >= 1.0:
            v = self.image.array("cell.voltage")
            t = self.image.array("module.temperature").mean(axis=1)
            soc = np.clip((v - 3.2) / (4.15 - 3.2) * 100.0, 0, 100)
            self.data = {"time": now, "cell.soc": np.round(soc, 2),
                         "cell.sot": np.round(np.repeat(t, self.per_module) + np.random.normal(0, 0.2, self.cells), 2),
                         "pack.soc": float(np.nanmean(soc))}
            self.last = now
        return self.data


def bump(image: Any, rng: np.random.Generator) -> None:
    """Every bound signal gets a new value and every slot a new sample (as if all frames arrived now)."""
    bound = image.slot_of >= 0
    image.value[bound] = rng.uniform(0.0, 4.0, int(bound.sum()))
    n = len(image.slot_names)
    image.rx_time[:n] = time.time()
    image.rx_mono[:n] = time.monotonic()
    image.seq[:n] += 1


def pick_nodes(server: Any, ns: int) -> list[str]:
    """The 1,000 monitored variables: per cell V, balancing, SoC, SoT; per module 6 values; 8 pack values."""
    base = "BatterySystem."
    cells = server.layout.cells
    per_module = server.layout.cells_per_module
    out: list[str] = []
    for leaf in ("Voltage", "Balancing", "SoC", "SoT"):
        for c in range(cells):
            m = c // per_module
            out.append(f"ns={ns};s={base}Strings.String0.Modules.Module{m}.Cells.Cell{c}.{leaf}")
    for m in range(server.layout.modules):
        for leaf in ("Voltage", "BoardTemperature", "State", "Fault", "Temperature0", "Temperature1"):
            out.append(f"ns={ns};s={base}Strings.String0.Modules.Module{m}.{leaf}")
    for leaf in ("Current", "Voltage", "LinkVoltage", "AmbientTemperature", "CoolantInletTemperature",
                 "CoolantOutletTemperature", "Power", "MinCellVoltage"):
        out.append(f"ns={ns};s={base}Pack.{leaf}")
    return out[:ITEMS]


async def naive_round(server: Any, nodes: list[tuple[Any, ua.VariantType]], rng: np.random.Generator) -> int:
    """The loop a user would write: one ``write_value`` per node."""
    values = rng.uniform(0.0, 4.0, len(nodes))
    ts = datetime.now(UTC)
    for k, ((node, vt), v) in enumerate(zip(nodes, values.tolist(), strict=True)):
        value: Any = bool(v > 2.0) if vt == ua.VariantType.Boolean else int(v) if vt == ua.VariantType.Int32 else v
        await node.write_value(ua.DataValue(ua.Variant(value, vt), SourceTimestamp=ts))
        if k % 512 == 511:
            await asyncio.sleep(0)
    return len(nodes)


def pct(samples: list[float], q: float) -> float | None:
    return round(float(np.percentile(samples, q)), 1) if samples else None


def start_pack_process(loaded: Any) -> int:
    """The CAN side in its own process, as the daemon's P0 process: the simulated pack's frames through the
    real ingest into the process image, which lives in shared memory. Forked before any thread exists."""
    from drivers.sim_pack import SimPack, SimRunner

    cfg, site = loaded.config, loaded.config.site
    pid = os.fork()
    if pid:
        os.nice(cfg.protection.main_process_nice)  # as the daemon's main process does after forking P0
        return pid
    try:
        ingest = loaded.ingests[cfg.bus[0].name]
        sim = SimPack(str(loaded.dbcs[cfg.bus[0].name][0].path), ingest.on_frame, modules=site.modules,
                      cells_per_module=site.cells_per_module, sensors_per_module=site.sensors_per_module,
                      contactors_closed=True, seed=7)
        SimRunner(sim)._run()  # until SIGTERM
    finally:
        os._exit(0)


def stop_pack_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass  # stopped already


async def gateway_main(args: argparse.Namespace, loaded: Any, pack_pid: int) -> dict[str, Any]:
    import anyio

    from gateway.events import Recorder
    from gateway.opcua_config import OpcuaSection, OpcuaUser, hash_password
    from gateway.opcua_server import NAMESPACE_URI, OpcuaServer

    cfg, image = loaded.config, loaded.image
    # the daemon's GIL switch interval
    sys.setswitchinterval(cfg.protection.switch_interval_ms / 1000.0)
    site = cfg.site
    tmp = Path(tempfile.mkdtemp(prefix="bench-opcua-"))
    certs = [make_client_cert(tmp, f"client{k}") for k in range(CLIENTS)]
    section = OpcuaSection(enabled=True, port=args.port, user=[OpcuaUser(USER, "viewer", hash_password(PASSWORD))],
                           trusted_client_certs=[str(c) for c, _, _ in certs],
                           security=["Basic256Sha256_SignAndEncrypt"])
    estimates = Estimates(image, site.cells, site.cells_per_module)
    server = OpcuaServer(section, image, site, Recorder(), tmp / "state",
                         limits=lambda: cfg.limit_table().as_dict(), estimates=estimates, gateway_id="bench")
    result: dict[str, Any] = {}
    procs: list[subprocess.Popen[str]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        with anyio.fail_after(120):
            await server.ready.wait()
        ns = server.ns
        assert server.server is not None
        assert await server.server.get_namespace_index(NAMESPACE_URI) == ns
        node_ids = pick_nodes(server, ns)
        nodes_file = tmp / "nodes.json"
        nodes_file.write_text(json.dumps(node_ids))
        outs = [tmp / f"client{k}.json" for k in range(CLIENTS)]
        for k, (cert, key, uri) in enumerate(certs):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--client", "--url", server.url, "--nodes", str(nodes_file), "--cert",
                 str(cert), "--key", str(key), "--uri", uri, "--out", str(outs[k])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:
            line = await anyio.to_thread.run_sync(p.stdout.readline)  # type: ignore[union-attr]
            if line.strip() != "ready":
                raise RuntimeError("a benchmark client did not start")
        items = server.status()["monitored_items"]
        await anyio.sleep(args.warmup)
        # 1. default rates
        t0, c0, u0 = time.time(), time.thread_time(), server.stats.updates
        await anyio.sleep(args.seconds)
        t1, c1, u1 = time.time(), time.thread_time(), server.stats.updates
        stop_pack_process(pack_pid)
        # 2. capacity
        rng = np.random.default_rng(1)
        estimates.capacity = True
        await anyio.sleep(0.5)
        items_capacity = server.status()["monitored_items"]
        t2, u2 = time.time(), server.stats.updates
        deadline = time.monotonic() + args.capacity_seconds
        while time.monotonic() < deadline:
            bump(image, rng)
            await server.push_once(force=True)
            await anyio.sleep(0)
        t3, u3 = time.time(), server.stats.updates
        estimates.capacity = False
        # 3. naive baseline: same variables, image standing still (wait until its staleness was published)
        await anyio.sleep(4.0)
        assert server.server is not None
        naive_nodes = [(server.server.get_node(nid), _vt(server, nid)) for nid in _pushed_nodes(server)]
        t4 = time.time()
        written = 0
        deadline = time.monotonic() + args.capacity_seconds
        while time.monotonic() < deadline:
            written += await naive_round(server, naive_nodes, rng)
            await anyio.sleep(0)
        t5 = time.time()
        await anyio.sleep(1.0)
        for p in procs:
            p.stdin.write("stop\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        for p in procs:
            await anyio.to_thread.run_sync(p.wait)
        per_client = [json.loads(o.read_text()) for o in outs]
        samples = [s for client in per_client for s in client]
        default = [lat for when, lat, _ in samples if t0 <= when <= t1]
        default_handler = [lat for when, _, lat in samples if t0 <= when <= t1]
        capacity = [lat for when, lat, _ in samples if t2 <= when <= t3]
        result = {
            "updates_per_s": round((u3 - u2) / (t3 - t2)),
            "baseline_updates_per_s": round(written / (t5 - t4)),
            "ratio": round((u3 - u2) / (t3 - t2) / max(1.0, written / (t5 - t4)), 2),
            "sub_p50_ms": pct(default, 50),
            "sub_p99_ms": pct(default, 99),
            "sub_max_ms": round(max(default), 1) if default else None,
            "sub_p99_ms_in_handler": pct(default_handler, 99),
            "cpu_pct": round((c1 - c0) / (t1 - t0) * 100.0, 1),
            "default_updates_per_s": round((u1 - u0) / (t1 - t0)),
            "notifications_default": len(default),
            "sub_p99_ms_at_capacity": pct(capacity, 99),
            "clients": CLIENTS,
            "monitored_items": items,
            "monitored_items_at_capacity": items_capacity,
            "notifications_per_client_at_capacity": [sum(1 for s in c if t2 <= s[0] <= t3) for c in per_client],
            "publishing_interval_ms": PUBLISH_MS,
            "security": "Basic256Sha256 SignAndEncrypt",
            "site_cells": site.cells,
            "start_s": round(server.stats.start_s, 2),
        }
        tg.cancel_scope.cancel()
    for p in procs:
        if p.poll() is None:
            p.kill()
    return result


def _pushed_nodes(server: Any) -> list[Any]:
    """Every variable the capacity phase writes: image-backed, aggregates, cell estimates, pack SoC."""
    out = [nid for g in server._groups for nid in g.nodeids]
    out += [a.nodeid for a in server._aggregates]
    for nodes, _ in server._cell_est.values():
        out += nodes
    out.append(server._est_nodes["pack.soc"][0])
    return out


def _vt(server: Any, nid: Any) -> ua.VariantType:
    for g in server._groups:
        if nid in g.nodeids:
            return [ua.VariantType.Double, ua.VariantType.Boolean, ua.VariantType.Int32][g.kinds[g.nodeids.index(nid)]]
    return ua.VariantType.Double


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object (the default output)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the default-rate phase")
    ap.add_argument("--capacity-seconds", type=float, default=6.0, help="length of each throughput phase")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: a free one)")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    for name in ("url", "nodes", "cert", "key", "uri", "out"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        asyncio.run(client_main(args))
        return 0
    if args.port == 0:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    import logging
    logging.basicConfig(level=logging.ERROR)
    from gateway.config import load_config, shipped_config
    loaded = load_config(shipped_config())
    pack_pid = start_pack_process(loaded)
    try:
        result = asyncio.run(gateway_main(args, loaded, pack_pid))
    finally:
        stop_pack_process(pack_pid)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
