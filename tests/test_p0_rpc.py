"""The pipes between the main process and P0: requests that give up cleanly, events whose loss is told."""

from __future__ import annotations

import threading
from multiprocessing import Pipe
from typing import Any

import pytest

from gateway.events import Event, Kind, Recorder
from gateway.p0 import Outbox, P0Error, RpcClient, _serve_requests


def test_a_caller_behind_a_hung_request_gives_up_within_its_own_timeout() -> None:
    here, there = Pipe(duplex=True)
    rpc = RpcClient(here)
    first: dict[str, Any] = {}
    hung = threading.Thread(target=lambda: first.update(result=rpc.call("alarms", None, 60.0)))
    hung.start()
    assert there.poll(10)  # the first request is out and nobody answers it
    first_id, *_ = there.recv()

    with pytest.raises(P0Error, match="did not answer 'status' within 0.2 s"):
        rpc.call("status", None, 0.2)
    assert hung.is_alive()  # it gave up while the first one still waited

    there.send((first_id, True, {"active": []}))
    hung.join(10)
    assert first["result"] == {"active": []}


def test_late_replies_are_dropped_and_refusals_raise() -> None:
    here, there = Pipe(duplex=True)
    rpc = RpcClient(here)
    with pytest.raises(P0Error, match="within 0.05 s"):
        rpc.call("status", None, 0.05)
    late_id, *_ = there.recv()
    there.send((late_id, True, "late"))  # the answer to the request given up on

    def answer(ok: bool, result: object) -> None:
        req_id, *_ = there.recv()
        there.send((req_id, ok, result))

    replier = threading.Thread(target=answer, args=(True, "fresh"))
    replier.start()
    assert rpc.call("status", None, 10.0) == "fresh"
    replier.join(10)

    replier = threading.Thread(target=answer, args=(False, "contactors are latched open"))
    replier.start()
    with pytest.raises(P0Error, match="latched open"):
        rpc.call("contactors", {"action": "close"}, 10.0)
    replier.join(10)

    there.close()
    with pytest.raises(P0Error, match="gone"):
        rpc.call("status", None, 10.0)


class _Core:
    def __init__(self) -> None:
        self.handled: list[str] = []

    def handle(self, cmd: str, args: dict[str, Any]) -> str:
        self.handled.append(cmd)
        return f"{cmd} done"


def test_a_request_its_caller_gave_up_on_is_not_carried_out_later() -> None:
    """A P0 that resumes after a hang must not open the contactors for a request that was answered 'no answer'."""
    here, there = Pipe(duplex=True)
    rpc, core, stopping = RpcClient(here), _Core(), threading.Event()
    with pytest.raises(P0Error, match="did not answer 'contactors'"):
        rpc.call("contactors", {"action": "open"}, 0.05)  # P0 is not reading yet: it hangs
    server = threading.Thread(target=_serve_requests, args=(core, there, stopping))
    server.start()
    try:
        assert rpc.call("status", None, 10.0) == "status done"
        assert core.handled == ["status"]
    finally:
        stopping.set()
        server.join(10)


def test_events_p0_cannot_hand_over_are_counted_and_the_main_process_is_told() -> None:
    outbox = Outbox(2)
    for i in range(5):  # the main process is busy: nobody forwards yet
        outbox.publish("event", Event(Kind.LIMIT, "cell_voltage_high", index=i))
    assert outbox.dropped == {"event": 3}
    here, there = Pipe(duplex=False)
    threading.Thread(target=outbox.forward, args=(there,), daemon=True).start()
    got = [here.recv() for _ in range(3)]
    assert [e.index for _, e in got[:2]] == [0, 1]
    kind, loss = got[2]
    assert kind == "event" and loss.name == "p0_events_dropped" and loss.value == 3 and "3 event" in loss.message
    outbox.publish("event", Event(Kind.LIMIT, "cell_voltage_high", index=9))
    assert here.recv()[1].index == 9 and not here.poll(0.2)  # no new loss: no second report
    here.close()


def test_recent_zero_or_less_is_no_events() -> None:
    rec = Recorder()
    for i in range(5):
        rec(Event(Kind.INFO, "x", index=i))
    assert [e.index for e in rec.recent(2)] == [3, 4] and rec.recent(0) == [] and rec.recent(-3) == []
    assert len(rec.recent(100)) == 5


def test_a_frame_tap_counts_what_it_dropped_once_per_read() -> None:
    import can

    from gateway.p0 import TAP_QUEUE, FrameTap

    tap = FrameTap("pack")
    for i in range(TAP_QUEUE + 5):
        tap(can.Message(arbitration_id=i & 0x7FF))
    frames, lost = tap.take()
    assert (len(frames), lost) == (TAP_QUEUE, 5)
    assert tap.take() == ([], 0)
    tap(can.Message(arbitration_id=1))
    assert len(tap.take()[0]) == 1


def test_no_answer_is_told_apart_from_a_refusal() -> None:
    """The daemon maps P0Unavailable to "did not answer" (CLI exit 1) and P0Error to "refused" (exit 4)."""
    from gateway.p0 import P0Unavailable

    here, there = Pipe(duplex=True)
    rpc = RpcClient(here)
    with pytest.raises(P0Unavailable, match="did not answer 'alarms' within 0.05 s"):
        rpc.call("alarms", None, 0.05)
    there.recv()

    def refuse() -> None:
        req_id, *_ = there.recv()
        there.send((req_id, False, "deep discharge latched"))

    replier = threading.Thread(target=refuse)
    replier.start()
    with pytest.raises(P0Error, match="latched") as refused:
        rpc.call("reset", None, 10.0)
    assert not isinstance(refused.value, P0Unavailable)
    replier.join(10)
    there.close()
    with pytest.raises(P0Unavailable, match="gone"):
        rpc.call("status", None, 10.0)


class _Machine:
    def __init__(self) -> None:
        self.resets: list[bool] = []

    def reset(self, clear_deep_discharge: bool) -> tuple[bool, str]:
        self.resets.append(clear_deep_discharge)
        return True, "reset: STANDBY"


class _Lane:
    def __init__(self) -> None:
        self.machine = _Machine()


class _Adapter:
    def __init__(self) -> None:
        self.taps: list[Any] = []


class _CoreParts:
    """The parts of a P0Core its request methods use (a whole P0Core opens buses)."""

    def __init__(self) -> None:
        self.lane = _Lane()
        self.adapters = {"pack": _Adapter()}
        self.sim = object()

    def _lane(self) -> _Lane:
        return self.lane


@pytest.mark.parametrize("bad", ["false", "no", 1, 0, [], None])
def test_p0_reset_takes_only_true_or_false(bad: object) -> None:
    """P0 is the last line: whatever the main process passes, "false" never clears the deep-discharge latch."""
    from gateway.p0 import P0Core

    core = _CoreParts()
    if bad is None:  # absent: no clearing
        assert P0Core.req_reset(core, {}) == {"ok": True, "reason": "reset: STANDBY"}  # type: ignore[arg-type]
        assert core.lane.machine.resets == [False]
        return
    with pytest.raises(P0Error, match="'clear_deep_discharge' must be true or false"):
        P0Core.req_reset(core, {"clear_deep_discharge": bad})  # type: ignore[arg-type]
    assert core.lane.machine.resets == []
    P0Core.req_reset(core, {"clear_deep_discharge": True})  # type: ignore[arg-type]
    assert core.lane.machine.resets == [True]


def test_p0_requests_refuse_arguments_of_the_wrong_type() -> None:
    """A refusal (P0Error) with the reason, not an "internal error" traceback in P0's log."""
    from gateway.p0 import P0Core

    core = _CoreParts()
    with pytest.raises(P0Error, match="'bus' must be a bus name"):
        P0Core.req_tap_open(core, {"bus": ["pack"]})  # type: ignore[arg-type]
    assert core.adapters["pack"].taps == []
    for args, what in (({"fault": "silent", "target": 1e30}, "'target' must be an integer"),
                       ({"fault": "silent", "target": "5"}, "'target' must be an integer"),
                       ({"fault": "heating", "value": "hot"}, "'value' must be a number"),
                       ({"fault": ["silent"]}, "'fault' must be a string")):
        with pytest.raises(P0Error, match=what):
            P0Core.req_sim_fault(core, args)  # type: ignore[arg-type]


def test_p0_hands_over_its_last_events_before_it_exits() -> None:
    """The trip on stop publishes events; P0 waits (bounded) until they are sent before os._exit."""
    outbox = Outbox(100)
    for i in range(20):
        outbox.publish("event", Event(Kind.INFO, "contactors_open", index=i))
    here, there = Pipe(duplex=False)
    threading.Thread(target=outbox.forward, args=(there,), daemon=True).start()
    assert outbox.drain(10.0)
    assert [here.recv()[1].index for _ in range(20)] == list(range(20))
    here.close()
    outbox.publish("event", Event(Kind.INFO, "late"))
    assert outbox.drain(10.0)  # the main process is gone: nothing waits for it
