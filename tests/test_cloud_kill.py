"""The gateway killed with SIGKILL again and again while publishing: nothing it accepted is lost.

The link runs in a child process (``tests/mqtt_broker.py child``) that prints every batch its store
committed.  The test kills it at random moments, restarts it on the same state directory, and
finally lets one run drain the buffer without sampling.  The consumer must then hold every
accepted (boot, stream, seq); duplicates (acknowledged but not yet deleted when killed) are allowed.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mqtt_broker import ROOT, Broker, Consumer, wait_for

pytestmark = pytest.mark.slow

GW = "gw-child"


class Child:
    def __init__(self, port: int, state: Path, *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "mqtt_broker.py"), "child", "--port",
                                      str(port), "--state", str(state), "--gateway", GW, *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.rows: list[dict[str, object]] = []
        self.boot = ""
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            d = json.loads(line)
            with self.lock:
                if "started" in d:
                    self.boot = str(d["started"])
                else:
                    self.rows.append(d)

    def accepted(self) -> set[tuple[str, str, str, int]]:
        with self.lock:
            return {(GW, str(r["boot"]), str(r["stream"]), int(r["seq"])) for r in self.rows}  # type: ignore[call-overload]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.thread.join(5)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            assert self.proc.stderr is not None
            raise AssertionError(f"child exited {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
        return True


def stored_rows(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(con.execute("SELECT count(*) FROM batches").fetchone()[0])
    finally:
        con.close()


def test_sigkill_while_publishing_loses_nothing(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    consumer = Consumer(broker.port)
    state = tmp_path / "state"
    rnd = random.Random(1234)
    accepted: set[tuple[str, str, str, int]] = set()
    boots = []
    try:
        for _ in range(5):
            child = Child(broker.port, state)
            try:
                wait_for(lambda c=child: c.alive() and len(c.rows) >= rnd.randint(3, 25), 30, "the child committing")
            finally:
                child.kill()  # SIGKILL, mid-publish
            accepted |= child.accepted()
            boots.append(child.boot)
        # one more kill while the broker, frozen, has acknowledged nothing of the latest batches; then the
        # broker dies too: only batches the gateway kept until their PUBACK can still arrive
        child = Child(broker.port, state)
        try:
            wait_for(lambda: child.alive() and len(child.rows) >= 5, 30, "the child committing")
            broker.freeze()
            n = len(child.rows)
            wait_for(lambda: child.alive() and len(child.rows) >= n + 5, 30, "batches the broker cannot acknowledge")
        finally:
            child.kill()
            broker.kill()
        accepted |= child.accepted()
        boots.append(child.boot)
        subs = consumer.subscriptions
        broker.start()
        wait_for(lambda: consumer.subscriptions > subs, 10, "the consumer back on the restarted broker")
        assert len({k[1] for k in accepted}) == 6  # six boots, each with its own sequence numbers
        # one more run that samples nothing and drains what the killed ones left
        drain = Child(broker.port, state, "--no-sample")
        try:
            wait_for(lambda: drain.alive() and not consumer.missing(accepted), 30,
                     f"every accepted batch (missing {consumer.missing(accepted)[:5]})")
            wait_for(lambda: stored_rows(state / "cloud.db") == 0, 30, "the buffer drained")
        finally:
            drain.kill()
        assert not consumer.missing(accepted)
        assert consumer.bad == []
        events = {k for k in accepted if k[2] == "events"}
        assert events and not consumer.missing(events)
        # the broker published the will of each killed session: offline, not clean, with that session's number
        wills = [s for s in consumer.json_on("/state") if s["state"] == "offline" and not s["clean"]]
        births = consumer.json_on("/birth")
        assert {w["boot"] for w in wills} >= set(boots[:5])  # the frozen broker's death took the last will along
        for w in wills:
            assert any(b["session"] == w["session"] and b["boot"] == w["boot"] for b in births)
    finally:
        consumer.stop()
        broker.stop()
