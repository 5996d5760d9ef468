"""Shared pieces of the OPC UA tests (no tests here): a small site, a server in its own event loop, clients.

The server runs in an anyio blocking portal (its own thread and event loop, as in the
daemon); the tests are the "CAN receive threads": they write the process image's
buffers and publish protection events from their own thread, and talk to the server
with real asyncua clients over TCP on a free loopback port.
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from asyncua import Client, ua
from asyncua.crypto import cert_gen, security_policies
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.events import Recorder
from gateway.image import ProcessImage
from gateway.limits import HARDWARE_DEFAULTS, PRESETS
from gateway.opcua_config import OpcuaSection, OpcuaUser, hash_password
from gateway.opcua_server import NAMESPACE_URI, OpcuaServer, SettingSpec, limit_settings
from gateway.pipeline import Layout

HOME = Layout(strings=1, modules_per_string=2, cells_per_module=8, sensors_per_module=2)  # a 16-cell home battery
PASSWORDS = {"vera": "viewer-pw", "otto": "operator-pw", "erin": "engineer-pw"}
ROLES = {"vera": "viewer", "otto": "operator", "erin": "engineer"}
TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path
    uri: str


@functools.cache
def cert_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="opcua-test-certs-"))


@functools.cache
def make_cert(name: str, user: bool = False) -> Cert:
    """A self-signed client application (or user) certificate, made once per test session."""
    uri = f"urn:bmsgw:test:{name}"
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=2)
    folder = cert_dir()
    c, k = folder / f"{name}.der", folder / f"{name}.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    k.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return Cert(c, k, uri)


# -- the site -----------------------------------------------------------------------------------


class Site:
    """The process image of the home battery; one slot per cell so tests do not disturb each other.

    Periods are long (10 s: stale after 30 s), so nothing goes stale while a test runs unless
    the test says so (:meth:`stale`).
    """

    PERIOD = 10.0

    def __init__(self, layout: Layout = HOME) -> None:
        self.layout = layout
        img = ProcessImage(layout.families(), ["pack.current", "pack.voltage", "contactor.main_positive"])
        self.cell_slot = [img.add_slot(f"cell{c}", self.PERIOD) for c in range(layout.cells)]
        self.temp_slot = [img.add_slot(f"temps{m}", self.PERIOD) for m in range(layout.modules)]
        self.status_slot = [img.add_slot(f"status{m}", self.PERIOD) for m in range(layout.modules)]
        self.pack_slot = img.add_slot("pack", self.PERIOD)
        for c in range(layout.cells):
            img.bind(img.index(f"cell[{c}].voltage"), self.cell_slot[c])
            img.bind(img.index(f"cell[{c}].balancing"), self.status_slot[c // layout.cells_per_module])
        for m in range(layout.modules):
            for k in range(layout.sensors_per_module):
                img.bind(img.index(f"module[{m}].temperature[{k}]"), self.temp_slot[m])
            img.bind(img.index(f"module[{m}].board_temperature"), self.temp_slot[m])
            for f in ("voltage", "state", "fault"):
                img.bind(img.index(f"module[{m}].{f}"), self.status_slot[m])
        for name in ("pack.current", "pack.voltage", "contactor.main_positive", "string[0].current",
                     "string[0].voltage"):
            img.bind(img.index(name), self.pack_slot)
        img.freeze()
        self.image = img

    def feed(self, slot: int, values: dict[str, float], valid: bool = True, wall: float | None = None) -> float:
        """What an ingest handler does for one frame: values and flags, then the slot's time and sequence."""
        img = self.image
        for name, v in values.items():
            i = img.index(name)
            img.w_value[i] = v
            img.w_valid[i] = 1 if valid else 0
        wall = time.time() if wall is None else wall
        img.w_rx_time[slot] = wall
        img.w_rx_mono[slot] = time.monotonic()
        img.w_seq[slot] += 1
        return wall

    def stale(self, slot: int) -> None:
        """The slot stops arriving (its last sample is long past its staleness limit)."""
        self.image.w_rx_mono[slot] = time.monotonic() - 1000.0


# -- the server -------------------------------------------------------------------------------


@dataclass
class Calls:
    log: list[tuple[str, tuple[Any, ...]]]
    answer: dict[str, tuple[bool, str]]

    def handler(self, name: str) -> Callable[..., tuple[bool, str]]:
        def call(*args: Any) -> tuple[bool, str]:
            self.log.append((name, args))
            return self.answer.get(name, (True, f"{name} done"))
        return call


class Harness:
    """An OpcuaServer running in a blocking portal (own thread, own event loop)."""

    def __init__(self, section: OpcuaSection, site: Any, state_dir: Path, **kwargs: Any) -> None:
        self.site = site
        self.recorder = Recorder()
        self.calls = Calls([], {})
        self.writes: list[tuple[str, Any]] = []
        self.write_answer: tuple[bool, str] | None = None
        self.limits = PRESETS["NMC"].as_dict()
        self.estimates: dict[str, Any] = {}
        self.diagnostics: dict[str, Any] = {"loops": [{"name": "bus-rates", "runs": 3, "overruns": 0}],
                                            "cloud": {"connected": False, "backlog": 12}}
        kwargs.setdefault("settings", [*limit_settings(self.limits, HARDWARE_DEFAULTS["NMC"]),
                                       SettingSpec("ChargeCurrentMax", 0.0, 120.0, "A", "charge current ceiling",
                                                   initial=50.0),
                                       SettingSpec("BalancingAllowed", kind="boolean", initial=True)])
        self.server = OpcuaServer(
            section, site.image, site.layout, self.recorder, state_dir,
            {n: self.calls.handler(n) for n in ("ResetError", "StartEisSweep", "RequestBalancing")},
            lambda: self.limits, lambda: self.diagnostics, self._write, estimates=lambda: self.estimates,
            gateway_id="test-gw", site="test-site", **kwargs)
        self._cm: contextlib.AbstractContextManager[BlockingPortal] | None = None
        self.portal: BlockingPortal | None = None

    def _write(self, name: str, value: Any) -> tuple[bool, str]:
        self.writes.append((name, value))
        if self.write_answer is not None:
            return self.write_answer
        return True, f"{name} = {value}"

    def __enter__(self) -> Harness:
        self.start()
        self.wait_ready()
        return self

    def start(self) -> None:
        self._cm = start_blocking_portal()
        self.portal = self._cm.__enter__()
        self._task = self.portal.start_task_soon(self.server.run)

    def wait_ready(self) -> None:
        async def ready() -> None:
            with anyio.fail_after(120):
                await self.server.ready.wait()
        assert self.portal is not None
        self.portal.call(ready)

    def __exit__(self, *exc: object) -> None:
        assert self.portal is not None and self._cm is not None
        self._task.cancel()
        with contextlib.suppress(Exception):
            self._task.exception(timeout=20)
        self._cm.__exit__(None, None, None)

    @property
    def url(self) -> str:
        return self.server.url

    def push(self) -> int:
        """One scan of the image right now (the server also scans on its own every scan_ms)."""
        assert self.portal is not None
        return int(self.portal.call(self.server.push_once))


def section(**overrides: Any) -> OpcuaSection:
    users = [OpcuaUser(n, ROLES[n], hash_password(p)) for n, p in PASSWORDS.items()]  # type: ignore[arg-type]
    users.append(OpcuaUser("laptop", "engineer", certificate=str(make_cert("laptop-user", user=True).cert)))
    base: dict[str, Any] = dict(
        enabled=True, port=free_port(), user=users, cell_rate_hz=0.02, pack_rate_hz=50.0, scan_ms=10.0,
        slow_period_s=0.2, trusted_client_certs=[str(make_cert("client").cert), str(make_cert("client2").cert)],
        security=["Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign", "Aes128Sha256RsaOaep_SignAndEncrypt",
                  "Aes128Sha256RsaOaep_Sign"])
    base.update(overrides)
    return OpcuaSection(**base)


@contextlib.contextmanager
def running(tmp: Path, **overrides: Any) -> Iterator[Harness]:
    with Harness(section(**overrides), Site(), tmp) as h:
        yield h


# -- clients ----------------------------------------------------------------------------------

POLICIES = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128Sha256RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
}


@contextlib.asynccontextmanager
async def connect(url: str, user: str | None = None, *, password: str | None = None, policy: str | None = "Basic256Sha256",
                  mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt, cert: Cert | None = None,
                  user_cert: Cert | None = None, strip_client_certificate: bool = False) -> AsyncIterator[Client]:
    """A connected asyncua client: ``policy=None`` for security None; ``user`` logs in with its password."""
    client = Client(url, timeout=TIMEOUT)
    cert = cert or make_cert("client")
    client.application_uri = cert.uri
    if policy is not None:
        await client.set_security(POLICIES[policy], str(cert.cert), str(cert.key), mode=mode)
    if user is not None:
        client.set_user(user)
        client.set_password(password if password is not None else PASSWORDS[user])
    if user_cert is not None:
        await client.load_client_certificate(str(user_cert.cert))
        await client.load_private_key(user_cert.key)
    if strip_client_certificate:  # a hostile client: declares no certificate in CreateSession
        create = client.uaclient.create_session

        async def stripped(params: ua.CreateSessionParameters) -> Any:
            params.ClientCertificate = None
            return await create(params)
        client.uaclient.create_session = stripped  # type: ignore[method-assign]
    await client.connect()
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def ns_of(client: Client) -> int:
    return int(await client.get_namespace_index(NAMESPACE_URI))


def node(client: Client, ns: int, path: str) -> Any:
    """The documented string NodeId of a browse path below BatterySystem."""
    return client.get_node(ua.NodeId(f"BatterySystem.{path}" if path else "BatterySystem", ns))


async def wait_for(check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


def run(fn: Callable[[], Any]) -> Any:
    """Run an async test body in a fresh event loop (the server has its own)."""
    return anyio.run(fn)


def utc_seconds(dt: Any) -> float:
    return float(dt.timestamp()) if dt is not None else math.nan


class Collector:
    """asyncua subscription handler that keeps every data change and event."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, Any]] = []
        self.events: list[Any] = []

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.changes.append((node.nodeid.Identifier, data.monitored_item.Value))

    def event_notification(self, event: Any) -> None:
        self.events.append(event)

    def values(self, ident: str) -> list[Any]:
        return [dv for i, dv in self.changes if i == ident]
