"""Prometheus metrics on 127.0.0.1, read from the daemon's own counters at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from gateway.control import accept_retrying

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricsSection:
    """The [metrics] section."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9108

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port: must be 0..65535")
        if self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("host: metrics are served on loopback only (scrape through an SSH tunnel or a local agent)")


class GatewayCollector(Collector):
    """Turns the status snapshot of the running gateway into metric families."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot
        self.refused: dict[str, int] = {}  # scrapes the endpoint refused, by reason

    def collect(self) -> Iterator[Metric]:
        st = self.snapshot()
        yield GaugeMetricFamily("bmsgw_uptime_seconds", "Seconds since the daemon started", value=st["uptime_s"])
        yield GaugeMetricFamily("bmsgw_healthy", "1 while the gateway is healthy (bmsgw status says why not)",
                                value=int(st["healthy"]))
        yield GaugeMetricFamily("bmsgw_p0_answering", "1 while the CAN/protection process (P0) answers",
                                value=int(st["p0_answering"]))
        yield from _loops(st["loops"])
        refused = CounterMetricFamily("bmsgw_metrics_refused", "Requests to this endpoint refused", labels=["reason"])
        for reason, n in self.refused.items():
            refused.add_metric([reason], n)
        yield refused
        dropped = CounterMetricFamily("bmsgw_p0_events_dropped", "Events, flight records and EIS frames P0 could "
                                      "not hand to a busy main process", labels=["kind"])
        for kind, n in st["events_dropped"].items():
            dropped.add_metric([kind], n)
        yield dropped
        if not st["p0_answering"]:
            return  # the bus and protection series would be P0's last answer, shown as if current
        yield from _buses(st["buses"])
        prot = st.get("protection")
        if prot:
            yield CounterMetricFamily("bmsgw_trips", "Contactor trips by protection", value=prot["contactors"]["trips"])
            yield CounterMetricFamily("bmsgw_protection_missed_deadlines", "Protection ticks later than the deadline",
                                      value=prot["missed_deadlines"])
            yield GaugeMetricFamily("bmsgw_protection_healthy", "1 while the protection lane keeps its deadline",
                                    value=int(prot["healthy"]))
            yield GaugeMetricFamily("bmsgw_active_alarms", "Active limit and data conditions", value=prot["active_alarms"])
            state = GaugeMetricFamily("bmsgw_contactor_state", "1 for the current contactor state", labels=["state"])
            for name in ("INIT", "STANDBY", "PRECHARGE", "NORMAL", "OPEN_REQUESTED", "ERROR"):
                state.add_metric([name], int(prot["contactors"]["state"] == name))
            yield state
        for name, value in st.get("extra_metrics", {}).items():
            yield GaugeMetricFamily(f"bmsgw_{name}", name.replace("_", " "), value=value)


def _loops(loops: list[dict[str, Any]]) -> Iterator[Metric]:
    period = GaugeMetricFamily("bmsgw_loop_period_seconds", "Configured period of each loop", labels=["loop", "lane"])
    jitter = GaugeMetricFamily("bmsgw_loop_jitter_p99_seconds", "99th percentile lateness of loop starts",
                               labels=["loop", "lane"])
    busy = GaugeMetricFamily("bmsgw_loop_busy_p99_seconds", "99th percentile run time of loop bodies",
                             labels=["loop", "lane"])
    runs = CounterMetricFamily("bmsgw_loop_runs", "Loop runs", labels=["loop", "lane"])
    over = CounterMetricFamily("bmsgw_loop_overruns", "Loop runs that ended after the next was due",
                               labels=["loop", "lane"])
    errors = CounterMetricFamily("bmsgw_loop_errors", "Loop runs that raised", labels=["loop", "lane"])
    for lp in loops:
        lbl = [lp["name"], lp["lane"]]
        period.add_metric(lbl, lp["period_ms"] / 1e3)
        jitter.add_metric(lbl, lp["jitter_p99_ms"] / 1e3)
        busy.add_metric(lbl, lp["busy_p99_ms"] / 1e3)
        runs.add_metric(lbl, lp["runs"])
        over.add_metric(lbl, lp["overruns"])
        errors.add_metric(lbl, lp["errors"])
    yield from (period, jitter, busy, runs, over, errors)


def _buses(buses: list[dict[str, Any]]) -> Iterator[Metric]:
    frames = CounterMetricFamily("bmsgw_can_frames", "Frames received", labels=["bus"])
    rate = GaugeMetricFamily("bmsgw_can_frames_per_second", "Frames received in the last second", labels=["bus"])
    up = GaugeMetricFamily("bmsgw_can_up", "1 while the adapter is open", labels=["bus"])
    errs = CounterMetricFamily("bmsgw_can_errors", "Error frames, bus-off, overrun events and unparsable frames",
                               labels=["bus", "kind"])
    dec = CounterMetricFamily("bmsgw_decode_errors", "Frames not decoded", labels=["bus", "kind"])
    lost = CounterMetricFamily("bmsgw_can_frames_lost", "Frames lost because a frame handler raised", labels=["bus"])
    remote = CounterMetricFamily("bmsgw_can_remote_frames", "Remote (RTR) frames: requests, not errors", labels=["bus"])
    for b in buses:
        frames.add_metric([b["name"]], b["frames"])
        rate.add_metric([b["name"]], b["frames_per_s"])
        up.add_metric([b["name"]], int(b["state"] == "up"))
        for kind in ("error_frames", "bus_off", "rx_overflow", "tx_overflow", "tx_errors", "failures", "bad_frames"):
            errs.add_metric([b["name"], kind], b[kind])
        for kind, n in b["decode_errors"].items():
            dec.add_metric([b["name"], kind], n)
        lost.add_metric([b["name"]], b["sink_errors"])
        remote.add_metric([b["name"]], b["remote_frames"])
    yield from (frames, rate, up, errs, dec, lost, remote)


MAX_CLIENTS = 16
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192


async def serve(section: MetricsSection, snapshot: Callable[[], dict[str, Any]], *,
                timeout_s: float = REQUEST_TIMEOUT_S,
                task_status: anyio.abc.TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` in the event loop until cancelled; started with the bound port (None: not bound).

    prometheus_client's own server gives every connection a thread and never times
    one out: idle connections from any local user piled up threads for ever. Here a
    connection is a task, gets ``timeout_s`` for its whole exchange, and at most
    ``MAX_CLIENTS`` are served at once (the others are closed at once).
    """
    registry = CollectorRegistry()
    collector = GatewayCollector(snapshot)
    registry.register(collector)
    try:
        listener = await anyio.create_tcp_listener(local_host=section.host, local_port=section.port)
    except OSError as exc:
        log.warning("metrics endpoint %s:%d not started: %s", section.host, section.port, exc)
        task_status.started(None)
        return
    clients = 0

    def refuse(reason: str) -> None:
        collector.refused[reason] = collector.refused.get(reason, 0) + 1

    async def handle(stream: anyio.abc.SocketStream) -> None:
        nonlocal clients
        async with stream:
            if clients >= MAX_CLIENTS:
                return refuse("busy")
            clients += 1
            try:
                with anyio.move_on_after(timeout_s) as scope:
                    code, answer = _answer(await _read_head(stream), registry)
                    if code != 200:
                        refuse("bad_request")
                    await stream.send(answer)
                if scope.cancelled_caught:
                    refuse("timeout")
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the scraper left: nobody to answer
            finally:
                clients -= 1

    async with listener, anyio.create_task_group() as tg:
        for one in listener.listeners:  # "localhost" may be both 127.0.0.1 and ::1
            assert isinstance(one, anyio.abc.SocketListener)
            tg.start_soon(_accept, one, handle, tg)
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))


async def _accept(listener: anyio.abc.SocketListener,
                  handle: Callable[[anyio.abc.SocketStream], Coroutine[Any, Any, None]], tg: anyio.abc.TaskGroup) -> None:
    while True:
        tg.start_soon(handle, await accept_retrying(listener, "metrics endpoint"))


async def _read_head(stream: anyio.abc.ByteStream) -> bytes | None:
    """The request line and headers; None when they exceed MAX_REQUEST_BYTES."""
    buf = b""
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        if len(buf) > MAX_REQUEST_BYTES:
            return None
        buf += await stream.receive(4096)
    return buf


def _answer(head: bytes | None, registry: CollectorRegistry) -> tuple[int, bytes]:
    if head is None:
        return 431, _response(431, "Request Header Fields Too Large", b"request too large\n")
    parts = head.split(b"\n", 1)[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return 400, _response(400, "Bad Request", b"not an HTTP request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return 405, _response(405, "Method Not Allowed", b"GET /metrics only\n")
    if target not in (b"/", b"/metrics"):
        return 404, _response(404, "Not Found", b"GET /metrics only\n")
    body = generate_latest(registry)
    return 200, _response(200, "OK", body if method == b"GET" else b"", CONTENT_TYPE_LATEST, len(body))


def _response(code: int, reason: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              length: int | None = None) -> bytes:
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    return head.encode() + body
