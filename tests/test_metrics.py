"""The metrics endpoint on its own: what it exports, and what bad or idle clients cost it."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import anyio
import pytest

from gateway.metrics import MAX_CLIENTS, MetricsSection, serve

Start = Callable[[dict[str, Any]], int]


def snapshot(answering: bool) -> dict[str, Any]:
    bus = {"name": "pack", "frames": 10, "frames_per_s": 900.0, "state": "up", "error_frames": 0, "bus_off": 0,
           "rx_overflow": 0, "tx_overflow": 0, "tx_errors": 0, "failures": 0, "bad_frames": 0, "sink_errors": 0,
           "remote_frames": 4, "decode_errors": {"unknown": 0, "bad_length": 0, "bad_mux": 0}}
    return {"uptime_s": 5.0, "healthy": answering, "p0_answering": answering, "loops": [], "buses": [bus],
            "events_dropped": {"event": 3}, "protection": {"contactors": {"trips": 0, "state": "NORMAL"},
                                                          "missed_deadlines": 0, "healthy": True, "active_alarms": 0}}


@pytest.fixture
def endpoint() -> Iterator[Start]:
    """Start the endpoint on a free loopback port serving a given snapshot; returns the port."""
    with anyio.from_thread.start_blocking_portal() as portal:
        futures = []

        def start(st: dict[str, Any]) -> int:
            future, port = portal.start_task(partial(serve, timeout_s=0.5), MetricsSection(port=0), lambda: st)
            futures.append(future)
            assert isinstance(port, int)
            return port

        yield start
        for f in futures:
            f.cancel()


def scrape(port: int, path: str = "/metrics") -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        return s.recv(4096)


def test_a_p0_that_does_not_answer_shows_as_such_and_its_last_series_are_not_served(endpoint: Start) -> None:
    fresh, stale = scrape(endpoint(snapshot(True))), scrape(endpoint(snapshot(False)))
    assert fresh["bmsgw_healthy"] == 1 and fresh["bmsgw_p0_answering"] == 1
    assert fresh['bmsgw_can_up{bus="pack"}'] == 1 and fresh["bmsgw_protection_healthy"] == 1
    assert fresh['bmsgw_can_remote_frames_total{bus="pack"}'] == 4
    assert stale["bmsgw_healthy"] == 0 and stale["bmsgw_p0_answering"] == 0
    assert not [k for k in stale if k.startswith(("bmsgw_can_", "bmsgw_protection_", "bmsgw_contactor_"))], stale
    assert stale['bmsgw_p0_events_dropped_total{kind="event"}'] == 3


def test_idle_clients_take_no_threads_and_are_let_go(endpoint: Start) -> None:
    port = endpoint(snapshot(True))
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CLIENTS + 10)]
    try:
        assert threading.active_count() == threads
        assert [s.recv(1) for s in idle] == [b""] * len(idle)  # the surplus at once, the rest after the timeout
    finally:
        for s in idle:
            s.close()
    m = scrape(port)
    assert m['bmsgw_metrics_refused_total{reason="busy"}'] >= 10
    assert m['bmsgw_metrics_refused_total{reason="timeout"}'] >= 1


def test_bad_requests_are_answered_and_counted(endpoint: Start) -> None:
    port = endpoint(snapshot(True))
    assert exchange(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert exchange(port, b"GET /secrets HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert exchange(port, b"\x16\x03\x01 hello\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert exchange(port, b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 20_000).startswith(b"HTTP/1.1 431")
    head = exchange(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    with pytest.raises(urllib.error.HTTPError):
        scrape(port, "/other")
    assert scrape(port)['bmsgw_metrics_refused_total{reason="bad_request"}'] == 5
