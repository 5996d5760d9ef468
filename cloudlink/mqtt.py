"""MQTT plumbing on aiomqtt: a client that honours MQTT 5 PUBACK reason codes, TLS, backoff and pacing.

aiomqtt's ``publish`` treats any PUBACK as success; under MQTT 5 a broker
answers a refused message (ACL, size, quota) with a PUBACK whose reason code is
0x80 or more, and a row deleted on such an answer would be lost.  :class:`Client`
records the reason code of every PUBACK and :meth:`Client.publish_acked` raises
:class:`PublishRefused` for those.  (Under MQTT 3.1.1 a broker cannot tell the
client; a 3.1.1 broker must be configured to disconnect on refusal, as AWS IoT
does, for the same guarantee.)  This relies on aiomqtt 2.x internals
(``_client``, ``_pending_call``, ``_pending_publishes``, ``_wait_for``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloudlink.config import CloudSection

PROTOCOLS = {"5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311}


class PublishRefused(aiomqtt.MqttError):
    """The broker acknowledged a message with an error reason code (MQTT 5)."""

    def __init__(self, reason_code: int, topic: str) -> None:
        self.reason_code = reason_code
        self.topic = topic
        name = _reason_name(reason_code)
        super().__init__(f"broker refused the message on {topic}: {name} (0x{reason_code:02X})")


def _reason_name(code: int) -> str:
    try:
        return str(ReasonCode(paho.PUBACK >> 4, identifier=code))
    except Exception:  # unknown codes
        return "unknown reason"


class _Remember(logging.Handler):
    """Keeps paho's last error message (e.g. the TLS alert that ended a connection)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.last = record.getMessage()


class Client(aiomqtt.Client):
    """aiomqtt's client plus the PUBACK reason code of each QoS 1 publish and a fast, explained failure
    when the broker closes the connection before its CONNACK (aiomqtt would wait for its timeout)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._errors = _Remember()
        log = logging.Logger("cloudlink.mqtt.client")  # not registered: collected with the client
        log.parent = logging.getLogger("cloudlink.mqtt")
        log.addHandler(self._errors)
        kwargs.setdefault("logger", log)
        super().__init__(*args, **kwargs)
        self._puback_rc: dict[int, int] = {}
        self.connack_properties: Properties | None = None

    @property
    def last_error(self) -> str:
        return self._errors.last

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode,
                       properties: Properties | None = None) -> None:
        if not self._connected.done():
            why = self._errors.last or str(reason_code)
            self._connected.set_exception(aiomqtt.MqttError(f"connection closed before CONNACK: {why}"))
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode,
                    properties: Properties | None = None) -> None:
        self.connack_properties = properties
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Properties) -> None:
        try:
            self._puback_rc[mid] = int(reason_code.value) if reason_code is not None else 0
        except (AttributeError, TypeError, ValueError):
            self._puback_rc[mid] = 0
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_acked(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                            properties: Properties | None = None, timeout: float = 30.0) -> int:
        """Publish and wait for the PUBACK; returns its reason code, raises PublishRefused for >= 0x80."""
        info = self._client.publish(topic, payload, qos, retain, properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, f"could not publish on {topic}")
        if qos > 0 and not info.is_published():
            done = asyncio.Event()
            with self._pending_call(info.mid, done, self._pending_publishes):
                await self._wait_for(done.wait(), timeout=timeout)
        rc = self._puback_rc.pop(info.mid, 0)
        if rc >= 0x80:
            raise PublishRefused(rc, topic)
        return rc

    @property
    def max_packet_size(self) -> int | None:
        """The broker's Maximum Packet Size from its CONNACK (MQTT 5), if it sent one."""
        p = self.connack_properties
        v = getattr(p, "MaximumPacketSize", None) if p is not None else None
        return int(v) if v else None


def tls_context(cfg: CloudSection) -> ssl.SSLContext | None:
    """The TLS context for the broker (blocking: reads files), or None without TLS."""
    t = cfg.tls
    if not t.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=t.ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if t.cert_file:
        ctx.load_cert_chain(t.cert_file, t.key_file)
    return ctx


def client_kwargs(cfg: CloudSection, identifier: str, protocol: str, will_topic: str, will_payload: bytes,
                  tls: ssl.SSLContext | None, password: str | None) -> dict[str, Any]:
    """Arguments for :class:`Client` for one connection attempt."""
    proto = PROTOCOLS[protocol]
    kw: dict[str, Any] = {
        "hostname": cfg.host, "port": cfg.broker_port(), "identifier": identifier, "protocol": proto,
        "will": aiomqtt.Will(will_topic, will_payload, qos=1, retain=True),
        "keepalive": cfg.keepalive_s, "timeout": cfg.connect_timeout_s,
        "max_inflight_messages": cfg.inflight + 4,  # + birth, state and acks
        "username": cfg.username or None, "password": password,
    }
    if proto == aiomqtt.ProtocolVersion.V5:
        kw["clean_start"] = True
        props = Properties(paho.PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        kw["properties"] = props
    else:
        kw["clean_session"] = True
    if tls is not None:
        kw["tls_context"] = tls
    return kw


def publish_packet_size(topic: str, payload: bytes, qos: int, properties: Properties | None, v5: bool) -> int:
    """Bytes of the PUBLISH packet, as a broker's Maximum Packet Size counts them (fixed header included)."""
    props = len((properties or Properties(paho.PacketTypes.PUBLISH)).pack()) if v5 else 0
    rest = 2 + len(topic.encode()) + (2 if qos else 0) + props + len(payload)
    return 1 + (1 if rest < 1 << 7 else 2 if rest < 1 << 14 else 3 if rest < 1 << 21 else 4) + rest


def historical_properties() -> Properties:
    """MQTT 5 user property that marks a backfill message (the topic marks it as well)."""
    p = Properties(paho.PacketTypes.PUBLISH)
    p.UserProperty = [("historical", "1")]
    return p


class Backoff:
    """Exponential backoff with jitter: the n-th wait is uniform in [cap/2, cap], cap = min(max, min * 2**n)."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.attempt = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        cap = min(self.max_s, self.min_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self.rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        self.attempt = 0


class Pacer:
    """Bandwidth cap (token bucket over all bytes) and the backfill lane's share of it.

    Live messages draw from the bucket and may overdraw it (they never wait for
    backfill); a backfill message waits until the bucket holds its size and the
    backfill lane is under ``share`` of the cap over the last second.
    """

    def __init__(self, cap_bytes_s: int, share: float) -> None:
        self.cap = cap_bytes_s
        self.share = share
        self.tokens = float(cap_bytes_s)
        self.last = time.monotonic()
        self.backfill_tokens = float(cap_bytes_s) * share

    def _refill(self) -> None:
        now = time.monotonic()
        dt = now - self.last
        self.last = now
        self.tokens = min(float(self.cap), self.tokens + dt * self.cap)
        self.backfill_tokens = min(self.cap * self.share, self.backfill_tokens + dt * self.cap * self.share)

    def wait_live(self, size: int) -> float:
        """Seconds to wait before a live message (0 when the bucket is not in debt)."""
        if not self.cap:
            return 0.0
        self._refill()
        return 0.0 if self.tokens >= 0 else -self.tokens / self.cap

    def wait_backfill(self, size: int) -> float:
        """Seconds to wait before a backfill message of ``size`` bytes."""
        if not self.cap:
            return 0.0
        self._refill()
        lane = self.cap * self.share
        w_total = max(0.0, min(size, self.cap) - self.tokens) / self.cap
        w_lane = max(0.0, min(size, lane) - self.backfill_tokens) / lane
        return max(w_total, w_lane)

    def take(self, size: int, backfill: bool) -> None:
        if not self.cap:
            return
        self._refill()
        self.tokens -= size
        if backfill:
            self.backfill_tokens -= size
