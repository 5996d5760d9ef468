"""Prometheus metrics on 127.0.0.1, read from the daemon's own counters at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

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

    def collect(self) -> Iterator[Metric]:
        st = self.snapshot()
        yield GaugeMetricFamily("bmsgw_uptime_seconds", "Seconds since the daemon started", value=st["uptime_s"])
        yield from _loops(st["loops"])
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
    for b in buses:
        frames.add_metric([b["name"]], b["frames"])
        rate.add_metric([b["name"]], b["frames_per_s"])
        up.add_metric([b["name"]], int(b["state"] == "up"))
        for kind in ("error_frames", "bus_off", "rx_overflow", "tx_overflow", "tx_errors", "failures", "bad_frames"):
            errs.add_metric([b["name"], kind], b[kind])
        for kind, n in b["decode_errors"].items():
            dec.add_metric([b["name"], kind], n)
        lost.add_metric([b["name"]], b["sink_errors"])
    yield from (frames, rate, up, errs, dec, lost)


def serve(section: MetricsSection, snapshot: Callable[[], dict[str, Any]]) -> Any:
    """Start the HTTP endpoint in its own thread; None (and a warning) when it cannot bind."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(GatewayCollector(snapshot))
    try:
        server, _thread = start_http_server(section.port, section.host, registry=registry)
    except OSError as exc:
        log.warning("metrics endpoint %s:%d not started: %s", section.host, section.port, exc)
        return None
    return server
