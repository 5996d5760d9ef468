"""A real Mosquitto for the cloud-link tests, and what the tests need around it.

* :class:`Broker`: ``/usr/sbin/mosquitto`` on a free loopback port with a config written into the
  test's tmp dir (persistence off), optionally with a TLS listener; kill, restart, freeze (SIGSTOP),
  resume (SIGCONT).
* :func:`make_pki`: a CA, a server certificate for 127.0.0.1 and a client certificate (``cryptography``).
* :class:`Consumer`: a paho subscriber in its own thread that decodes every batch with the public
  decoder and tells, by boot/stream/sequence number, what arrived, what twice, what not.
* :class:`Gate`: a TCP pass-through the gateway connects through, so a test can decide *when* the
  gateway may reconnect (e.g. only after the consumer has re-subscribed to a restarted broker).
* :func:`make_image` / :class:`Feeder`: a small process image written by a thread like the CAN path does.
* ``python tests/mqtt_broker.py child ...``: a CloudLink in a separate process (for SIGKILL tests);
  it prints one JSON line per committed batch.

Nothing here ever connects anywhere but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from cloudlink.batch import BatchError, decode  # noqa: E402
from gateway.image import ProcessImage  # noqa: E402
from tests.procs import free_port, wait_for  # noqa: E402 - shared with the other process tests

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
HOST = "127.0.0.1"


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


# -- the broker -----------------------------------------------------------------------------------


class Broker:
    """Mosquitto on loopback, persistence off, config in ``tmp``."""

    def __init__(self, tmp: Path, *, extra: str = "", tls: dict[str, Path] | None = None,
                 require_certificate: bool = True, port: int | None = None) -> None:
        self.tmp = tmp
        self.port = port or free_port()
        self.tls_port = free_port() if tls else None
        self.extra = extra
        self.tls = tls
        self.require_certificate = require_certificate
        self.conf = tmp / f"mosquitto-{self.port}.conf"
        self.logfile = tmp / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_conf()
        self.start()

    def write_conf(self) -> None:
        # run as root (CI containers), mosquitto would switch to its own user, which cannot read tmp_path
        lines = ["user root" if os.geteuid() == 0 else "", f"listener {self.port} {HOST}", "allow_anonymous true",
                 "persistence false",
                 "max_queued_messages 0", "log_dest stderr", "log_type error", "log_type warning"]
        if self.tls and self.tls_port:
            lines += [f"listener {self.tls_port} {HOST}", f"cafile {self.tls['ca']}",
                      f"certfile {self.tls['server_cert']}", f"keyfile {self.tls['server_key']}",
                      f"require_certificate {'true' if self.require_certificate else 'false'}",
                      "use_identity_as_username true" if self.require_certificate else "", "allow_anonymous true"]
        self.conf.write_text("\n".join(line for line in lines if line) + "\n" + self.extra + "\n")

    def start(self) -> None:
        if not Path(MOSQUITTO).is_file():
            raise AssertionError(f"{MOSQUITTO} not found: the cloud tests need the Debian package 'mosquitto'")
        log = open(self.logfile, "ab")  # noqa: SIM115 - inherited by the child, closed right after
        try:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        finally:
            log.close()
        for port in (self.port, self.tls_port):
            if port:
                wait_for(lambda p=port: port_open(p) or self._died(), 10, "mosquitto to listen")
        if self._died():
            raise AssertionError(f"mosquitto exited {self.proc.returncode if self.proc else None}: "
                                 f"{self.logfile.read_text()}")

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


# -- TLS ------------------------------------------------------------------------------------------


def make_pki(d: Path) -> dict[str, Path]:
    """CA, server certificate (SAN IP 127.0.0.1) and client certificate, as PEM files in ``d``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: ec.EllipticCurvePrivateKey, p: Path) -> None:
        p.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        p.chmod(0o600)

    ca_key = key()
    ca = (x509.CertificateBuilder().subject_name(name("bmsgw test CA")).issuer_name(name("bmsgw test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                                critical=False)
        return b.sign(ca_key, hashes.SHA256()), k

    out = {"ca": d / "ca.pem", "server_cert": d / "server.pem", "server_key": d / "server.key",
           "client_cert": d / "client.pem", "client_key": d / "client.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    srv, srv_key = leaf(HOST, True)
    out["server_cert"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    write_key(srv_key, out["server_key"])
    cli, cli_key = leaf("gw-tls", False)
    out["client_cert"].write_bytes(cli.public_bytes(serialization.Encoding.PEM))
    write_key(cli_key, out["client_key"])
    return out


# -- the consumer ---------------------------------------------------------------------------------


class Consumer:
    """Subscribes to everything under a prefix and keeps what arrived (decoded, verified)."""

    def __init__(self, port: int, prefix: str = "#", tls: dict[str, Path] | None = None, qos: int = 0) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[str, bytes, float, bool]] = []  # topic, payload, receive time, retained
        self.seen: Counter[tuple[str, str, str, int]] = Counter()  # (gateway, boot, stream, seq) -> copies
        self.batches: dict[tuple[str, str, str, int], Any] = {}
        self.lanes: dict[tuple[str, str, str, int], set[str]] = {}  # data (live) and/or hist (backfill)
        self.bad: list[str] = []
        self.subscriptions = 0
        self.qos = qos
        self.prefix = prefix
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"consumer-{port}-{os.getpid()}",
                                  protocol=paho.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(0.02, 0.1)
        if tls:
            self.client.tls_set(ca_certs=str(tls["ca"]), certfile=str(tls["client_cert"]), keyfile=str(tls["client_key"]))
        self.client.connect_async(HOST, port, keepalive=60)
        self.client.loop_start()
        wait_for(lambda: self.subscriptions > 0, 10, "the consumer's subscription")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe(self.prefix, qos=self.qos)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, rcs: Any, props: Any = None) -> None:
        with self.lock:
            self.subscriptions += 1

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        now = time.time()
        topic = msg.topic
        with self.lock:
            self.messages.append((topic, bytes(msg.payload), now, bool(msg.retain)))
        if "/data/" in topic or "/hist/" in topic:
            try:
                b = decode(bytes(msg.payload))
            except BatchError as exc:
                with self.lock:
                    self.bad.append(f"{topic}: {exc}")
                return
            key = (b.gateway, b.boot, b.stream, b.seq)
            with self.lock:
                self.seen[key] += 1
                self.batches[key] = b
                self.lanes.setdefault(key, set()).add("hist" if "/hist/" in topic else "data")

    def stop(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()

    # what arrived

    def keys(self) -> set[tuple[str, str, str, int]]:
        with self.lock:
            return set(self.seen)

    def duplicates(self) -> int:
        with self.lock:
            return sum(n - 1 for n in self.seen.values())

    def missing(self, accepted: Iterable[tuple[str, str, str, int]]) -> list[tuple[str, str, str, int]]:
        got = self.keys()
        return sorted(k for k in set(accepted) if k not in got)

    def on_topic(self, suffix: str) -> list[tuple[str, bytes, float, bool]]:
        with self.lock:
            return [m for m in self.messages if m[0].endswith(suffix)]

    def json_on(self, suffix: str) -> list[dict[str, Any]]:
        return [json.loads(m[1]) for m in self.on_topic(suffix) if m[1]]

    def gaps(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for k, b in self.batches.items() if k[2] == "gaps" for r in b.records]

    def payload_sizes(self) -> list[int]:
        with self.lock:
            return [len(m[1]) for m in self.messages if "/data/" in m[0] or "/hist/" in m[0]]


def accepted_from(rows: Iterable[Any], gateway: str) -> set[tuple[str, str, str, int]]:
    return {(gateway, r.boot, r.stream, r.seq) for r in rows}


# -- a gate in front of the broker ---------------------------------------------------------------


class Gate:
    """A TCP pass-through to the broker; closed, it refuses connections and cuts the open ones."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.open()

    def open(self) -> None:
        with self.lock:
            if self.listener is not None:
                return
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((HOST, self.port))
            s.listen(16)
            self.listener = s
        self.thread = threading.Thread(target=self._accept, args=(s,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        with self.lock:
            s, self.listener = self.listener, None
            conns, self.conns = self.conns, []
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        if self.thread is not None:
            self.thread.join(5)

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                down, _ = s.accept()
            except OSError:
                return
            try:
                up = socket.create_connection((HOST, self.target), timeout=2)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            with self.lock:
                if self.listener is not s:
                    down.close()
                    up.close()
                    return
                self.conns += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                with contextlib.suppress(OSError):
                    x.shutdown(socket.SHUT_RDWR)


class V311Gate(Gate):
    """A gate that behaves like a broker speaking only MQTT 3.1.1: a v5 CONNECT gets CONNACK 0x01 and is closed."""

    def __init__(self, target_port: int) -> None:
        self.refused_v5 = 0
        self.passed_v311 = 0
        super().__init__(target_port)

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                down, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=self._first_packet, args=(s, down), daemon=True).start()

    def _first_packet(self, s: socket.socket, down: socket.socket) -> None:
        down.settimeout(5)
        try:
            head = _recv_exact(down, 2)
            length, shift, rest = head[1] & 0x7F, 7, head[1]
            header = bytearray(head)
            while rest & 0x80:
                b = _recv_exact(down, 1)
                header += b
                rest = b[0]
                length |= (rest & 0x7F) << shift
                shift += 7
            body = _recv_exact(down, length)
        except OSError:
            down.close()
            return
        level = body[6] if len(body) > 6 else 0
        if level == 5:
            self.refused_v5 += 1
            with contextlib.suppress(OSError):
                down.sendall(b"\x20\x02\x00\x01")  # CONNACK, 3.1.1: unacceptable protocol version
            down.close()
            return
        self.passed_v311 += 1
        down.settimeout(None)
        try:
            up = socket.create_connection((HOST, self.target), timeout=2)
            up.settimeout(None)
            up.sendall(bytes(header) + body)
        except OSError:
            down.close()
            return
        with self.lock:
            if self.listener is not s:
                down.close()
                up.close()
                return
            self.conns += [down, up]
        for a, b in ((down, up), (up, down)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("closed")
        buf += chunk
    return buf


# -- a process image written by a thread ----------------------------------------------------------


def make_image(cells: int = 16) -> ProcessImage:
    """Cells, two module sensors each for two modules, pack current and voltage; every signal bound."""
    img = ProcessImage({"cell.voltage": (cells,), "module.temperature": (2, 2), "module.voltage": (2,)},
                       ["pack.current", "pack.voltage"])
    slots = {"pack": img.add_slot("pack", 0.01), "cells": img.add_slot("cells", 0.1), "temps": img.add_slot("t", 1.0)}
    for n in ("pack.current", "pack.voltage"):
        img.bind(img.index(n), slots["pack"])
    for i in range(cells):
        img.bind(img.index(f"cell[{i}].voltage"), slots["cells"])
    for m in range(2):
        for k in range(2):
            img.bind(img.index(f"module[{m}].temperature[{k}]"), slots["temps"])
    img.freeze()
    return img


class Feeder:
    """Writes the image at 100 Hz from a thread, like a CAN receive thread (decimal values at sensor steps)."""

    def __init__(self, img: ProcessImage, hz: float = 100.0, noisy: bool = False) -> None:
        self.img = img
        self.hz = hz
        self.noisy = noisy
        self.rng = __import__("numpy").random.default_rng(0)
        self.stop_event = threading.Event()
        self.n = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.cells = [img.index(n) for n in img.names() if n.startswith("cell[")]
        self.temps = [img.index(n) for n in img.names() if n.startswith("module[") and "temperature" in n]
        self.thread.start()

    def _run(self) -> None:
        img = self.img
        ic, iv = img.index("pack.current"), img.index("pack.voltage")
        while not self.stop_event.wait(1.0 / self.hz):
            self.n += 1
            now, mono = time.time(), time.monotonic()
            img.w_value[ic] = round(((self.n * 37) % 2000 - 1000) * 0.001, 3)
            img.w_value[iv] = round(50.0 + (self.n % 100) * 0.01, 2)
            noise = self.rng.integers(0, 200, len(self.cells)) if self.noisy else None
            for k, i in enumerate(self.cells):
                step = int(noise[k]) if noise is not None else (self.n // 10 + k) % 50
                img.w_value[i] = round(3.6 + step * 0.001, 3)
            for k, i in enumerate(self.temps):
                img.w_value[i] = round(25.0 + ((self.n // 100 + k) % 20) * 0.1, 1)
            for slot in range(len(img.slot_names)):
                img.w_rx_time[slot] = now
                img.w_rx_mono[slot] = mono
                img.w_seq[slot] += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(2)


# -- a gateway in a child process ------------------------------------------------------------------


def child_main(argv: list[str]) -> int:
    """``child --port P --state DIR [--no-sample]``: a CloudLink that prints each committed batch as JSON."""
    import anyio

    from cloudlink.config import CloudSection, CommandSettings, SignalClass
    from cloudlink.link import CloudLink
    from gateway.events import Event, Kind, Level, Recorder

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--gateway", default="gw-child")
    ap.add_argument("--no-sample", action="store_true")
    args = ap.parse_args(argv)
    img = make_image(8)
    feeder = Feeder(img)
    classes = [] if args.no_sample else [
        SignalClass("pack", ["pack.current", "pack.voltage"], rate_hz=50.0, batch_s=0.2),
        SignalClass("cells", ["cell[*].voltage"], rate_hz=10.0, batch_s=0.3)]
    cfg = CloudSection(enabled=True, host=HOST, port=args.port, protocol="5", telemetry=classes,
                       commands=CommandSettings(enabled=False), backoff_min_s=0.05, backoff_max_s=0.3,
                       keepalive_s=5, ack_timeout_s=3.0, connect_timeout_s=3.0, event_flush_s=0.05,
                       fsync_window_s=0.2, inflight=8)
    recorder = Recorder()
    link = CloudLink(cfg, img, recorder, {}, args.state, args.gateway, "site")
    out = sys.stdout

    def committed(row: Any) -> None:
        out.write(json.dumps({"boot": row.boot, "stream": row.stream, "seq": row.seq, "n": row.samples}) + "\n")
        out.flush()

    link.on_commit.append(committed)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(link.run)
            out.write(json.dumps({"started": link.boot}) + "\n")
            out.flush()
            k = 0
            while not args.no_sample:
                await anyio.sleep(0.05)
                k += 1
                recorder(Event(Kind.INFO if k % 7 else Kind.TRIP, "synthetic", Level.INFO, index=k, value=float(k)))

    try:
        anyio.run(main)
    finally:
        feeder.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child_main(sys.argv[2:]))
    print("usage: python tests/mqtt_broker.py child --port P --state DIR [--no-sample]", file=sys.stderr)
    sys.exit(2)
