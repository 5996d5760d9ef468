"""The main process's request pipe to P0: a P0 that hangs must not make callers queue behind each other."""

from __future__ import annotations

import threading
from multiprocessing import Pipe
from typing import Any

import pytest

from gateway.p0 import P0Error, RpcClient


def test_a_caller_behind_a_hung_request_gives_up_within_its_own_timeout() -> None:
    here, there = Pipe(duplex=True)
    rpc = RpcClient(here)
    first: dict[str, Any] = {}
    hung = threading.Thread(target=lambda: first.update(result=rpc.call("alarms", None, 60.0)))
    hung.start()
    assert there.poll(10)  # the first request is out and nobody answers it
    first_id, _, _ = there.recv()

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
    late_id, _, _ = there.recv()
    there.send((late_id, True, "late"))  # the answer to the request given up on

    def answer(ok: bool, result: object) -> None:
        req_id, _, _ = there.recv()
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
