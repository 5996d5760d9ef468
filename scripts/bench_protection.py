#!/usr/bin/env python3
"""Protection latency: violating frame into the adapter -> contactor-open frame out, under stress.

The bus is a separate process (as the kernel and the adapter are on real hardware) streaming
SocketCAN-format frames over a loopback socket into a python-can bus class whose recv()
blocks in the kernel like socketcan's. The gateway side is the daemon's own assembly
(config, image, protection lane, CAN adapter receive thread). The stress load of DOMAIN.md,
scaled to this machine: the bus flooded with reference-site frames (default 8,000 frames/s,
a saturated 1 Mbit/s bus), CPU-heavy pure-Python and msgpack work on the asyncio event loop,
and numpy work in an estimator thread. Every ``--period`` seconds the bus process sends one
cell-voltage frame with a cell above its MSL; the latency runs from just before that frame is
written to the socket to the moment the lane has handed the contactor-open frame to the
adapter's send().

Debounce is one sample for the measured check: this measures the mechanism, not the
configured delay (which adds exactly N sample periods, see tests/test_protection.py).

Three variants in the same run:
* process (the daemon's design): the CAN side runs in a process forked before the loads start,
  under SCHED_FIFO at protection.realtime_priority when the user may (root, or LimitRTPRIO);
* thread: the same lane as threads inside the loaded process (the design this replaced);
* baseline: the naive way, an asyncio task polling the process image every 10 ms on the
  same busy event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import can
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drivers.canbus import CanAdapter  # noqa: E402
from drivers.sim_pack import SimPack  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.contactors import State  # noqa: E402
from gateway.daemon import make_lane  # noqa: E402
from gateway.events import Recorder  # noqa: E402
from gateway.p0 import enter_realtime  # noqa: E402

MODULE, PAGE, CELL_IN_MODULE = 2, 0, 1
EXTRA = """
[protection.debounce.per_check]
cell_voltage_high = 0
[protection.limits.cell_voltage_spread]
mol = 1.0
rsl = 1.5
msl = 2.0
"""


def reference_frames() -> list[can.Message]:
    out: list[can.Message] = []
    sim = SimPack(str(ROOT / "dbc" / "bmsgw_pack.dbc"), out.append, seed=5, contactors_closed=True)
    for _ in range(1000):
        sim.tick()
    # no contactor feedback: nothing answers the gateway's commands in this bench
    return [m for m in out if m.arbitration_id != 0x111]


FRAME = struct.Struct("<IB3x8s")  # SocketCAN's struct can_frame: ID, length, padding, payload


class StreamBus(can.BusABC):
    """Frames from the bus process as 16-byte SocketCAN records over a loopback socket.

    This stands in for the kernel's CAN socket: the receive thread blocks in recv() without
    the GIL, as it does on socketcan (python-can's slcan reads byte by byte and cannot keep
    up with a saturated bus, and its virtual bus needs a producer thread inside our process).
    """

    def __init__(self, port: int, **kwargs: Any) -> None:
        super().__init__(channel=f"tcp:{port}", **kwargs)
        self.sock = socket.create_connection(("127.0.0.1", port))

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        self.sock.settimeout(timeout)
        try:
            raw = self.sock.recv(FRAME.size, socket.MSG_WAITALL)
        except TimeoutError:
            return None, False
        if len(raw) < FRAME.size:
            raise can.CanOperationError("bus process gone")
        can_id, n, data = FRAME.unpack(raw)
        return can.Message(arbitration_id=can_id, data=data[:n], is_extended_id=False, timestamp=time.time()), False

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        pass  # the latency is taken when the lane hands the frame to send()

    def shutdown(self) -> None:
        self.sock.close()
        super().shutdown()


def traffic(args: argparse.Namespace) -> None:
    """The bus, in its own process: reference frames at ``rate``, plus one violating frame
    every ``period`` s. Prints the injection times (perf_counter is CLOCK_MONOTONIC, the same
    clock in every process on Linux) as JSON when done."""
    frames = [FRAME.pack(m.arbitration_id, len(m.data), bytes(m.data)) for m in reference_frames()]
    db = load_config(ROOT / "gateway/configs/sim.toml").dbcs["pack"][0].db
    m = violating_frame(reference_frames(), db)
    bad = FRAME.pack(m.arbitration_id, len(m.data), bytes(m.data))
    with socket.create_server(("127.0.0.1", 0)) as srv:
        print(srv.getsockname()[1], flush=True)
        conn, _ = srv.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        time.sleep(args.warmup)
        t0 = time.perf_counter()
        sent, injected, i = 0, [], 0
        next_trip = t0 + args.period
        while len(injected) < args.trips:
            now = time.perf_counter()
            if now >= next_trip:
                injected.append(time.perf_counter())
                conn.sendall(bad)
                next_trip = now + args.period
                continue
            due = t0 + sent / args.rate
            if due - now > 0.0005:
                time.sleep(min(due - now, max(0.0, next_trip - now)))
                continue
            conn.sendall(frames[i])
            i = (i + 1) % len(frames)
            sent += 1
        time.sleep(0.3)
    print(json.dumps({"injected": injected, "sent": sent}), flush=True)


def estimator_load(stop: threading.Event) -> None:
    """An EKF-sized numpy workload running continuously (P2 work in a thread)."""
    rng = np.random.default_rng(1)
    p = rng.random((224, 3, 3))
    while not stop.is_set():
        for _ in range(50):
            p = np.einsum("nij,njk->nik", p, p) / 3.0 + 0.01
        time.sleep(0.001)


async def loop_load(stop: asyncio.Event) -> None:
    """CPU-heavy work on the event loop: pure Python bursts and big msgpack encodes."""
    big = {"v": [float(i) for i in range(100_000)], "names": [f"cell[{i}]" for i in range(10_000)]}
    while not stop.is_set():
        acc = 0
        for i in range(200_000):  # ~20 ms of pure Python holding the GIL
            acc += i * i
        msgpack.packb(big)
        await asyncio.sleep(0)


def violating_frame(frames: list[can.Message], db: Any) -> can.Message:
    msg_def = db.get_message_by_frame_id(0x200 + MODULE)
    base = next(m for m in frames if m.arbitration_id == 0x200 + MODULE and m.data[0] & 0x0F == PAGE)
    values = msg_def.decode(bytes(base.data), decode_choices=False)
    values[f"Cell{CELL_IN_MODULE:02d}_Voltage"] = 4.5
    return can.Message(arbitration_id=base.arbitration_id, data=msg_def.encode(values), is_extended_id=False)


class Record:
    """Trip times and armed flags in shared memory, so a forked P0 process can report them."""

    def __init__(self, n: int = 100_000) -> None:
        self._mm = mmap.mmap(-1, n * 9 + 16)
        self.outs = np.frombuffer(self._mm, dtype=np.float64, count=n)
        self.armed = np.frombuffer(self._mm, dtype=np.int8, count=n, offset=n * 8)
        self.counts = np.frombuffer(self._mm, dtype=np.int64, count=2, offset=n * 9)

    def out(self, t: float) -> None:
        self.outs[self.counts[0]] = t
        self.counts[0] += 1

    def arm(self, armed: bool) -> None:
        self.armed[self.counts[1]] = armed
        self.counts[1] += 1


def gateway_side(loaded: Any, port: int, rec: Record, frames: list[can.Message]) -> Callable[[], None]:
    """The daemon's CAN side (adapter, decode, protection lane) instrumented; returns its stop function."""
    adapters: dict[str, CanAdapter] = {}
    lane = make_lane(loaded, Recorder(), lambda msg: adapters["pack"].send(msg))
    machine = lane.machine
    trip = machine.trip

    def timed_trip(cause: str, now: float | None = None) -> bool:
        fresh = trip(cause, now)  # the open command has been handed to send() when this returns
        if fresh:
            rec.out(time.perf_counter())
        return fresh

    machine.trip = timed_trip  # type: ignore[method-assign]
    inner = lane.sink("pack", loaded.ingests["pack"], False)
    bad = violating_frame(frames, loaded.dbcs["pack"][0].db)
    bad_id, bad_data = bad.arbitration_id, bytes(bad.data)

    def sink(msg: can.Message) -> None:
        # was the lane armed (not latched in ERROR from the previous trip) when this violation arrived?
        if msg.arbitration_id == bad_id and msg.data == bad_data:
            rec.arm(machine.state is not State.ERROR)
        inner(msg)

    stop = threading.Event()

    def rearm() -> None:  # after each trip: reset once the violation has cleared
        while not stop.wait(0.01):
            if machine.state is State.ERROR:
                machine.reset()

    adapters["pack"] = CanAdapter(loaded.config.bus[0], sink, open_bus=lambda **kw: StreamBus(port))
    adapters["pack"].start()
    lane.start()
    threading.Thread(target=rearm, daemon=True).start()

    def stop_all() -> None:
        stop.set()
        lane.stop()
        adapters["pack"].stop()

    return stop_all


async def run(mode: str, args: argparse.Namespace, frames: list[can.Message]) -> dict[str, Any]:
    """One variant: "process" (the daemon's design), "thread" (lane in the loaded process), "baseline"."""
    tmp = Path(tempfile.mkdtemp(prefix="bmsgw-bench-"))
    text = (ROOT / "gateway/configs/sim.toml").read_text().replace(
        "[gateway]\n", f'[gateway]\nstate_dir = "{tmp}"\n').replace("auto_close = true", "auto_close = false")
    (tmp / "bench.toml").write_text(text + EXTRA)
    loaded = load_config(tmp / "bench.toml")
    sys.setswitchinterval(loaded.config.protection.switch_interval_ms / 1000)
    proc = subprocess.Popen([sys.executable, __file__, "--traffic", "--port", "0", "--trips", str(args.trips),
                             "--period", str(args.period), "--rate", str(args.rate), "--warmup", "2.0"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    rec = Record()
    child = 0
    stop_side: Callable[[], None] = lambda: None  # noqa: E731
    baseline_adapter = None
    if mode == "process":
        child = os.fork()  # as the daemon does: before this process starts any thread
        if child == 0:
            prio = loaded.config.protection.realtime_priority if args.realtime_priority is None else args.realtime_priority
            enter_realtime(prio)
            gc.collect()
            gc.freeze()
            side_stop = gateway_side(loaded, port, rec, frames)
            done = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: done.set())
            done.wait()
            side_stop()
            os._exit(0)
        os.nice(loaded.config.protection.main_process_nice)  # as P0Process does
    elif mode == "thread":
        stop_side = gateway_side(loaded, port, rec, frames)
    else:
        baseline_adapter = CanAdapter(loaded.config.bus[0], loaded.ingests["pack"].on_frame,
                                      open_bus=lambda **kw: StreamBus(port))
        baseline_adapter.start()

    stop_threads = threading.Event()
    threading.Thread(target=estimator_load, args=(stop_threads,), daemon=True).start()
    stop_loop = asyncio.Event()
    tasks = [asyncio.create_task(loop_load(stop_loop))]
    image = loaded.image
    cells = image.span("cell.voltage")
    msl = loaded.config.limit_table().cell_voltage_high.msl

    async def naive_poll() -> None:
        tripped = False
        while not stop_loop.is_set():
            await asyncio.sleep(0.01)
            over = float(np.nanmax(image.value[cells])) > msl
            if over and not tripped:
                assert baseline_adapter is not None
                baseline_adapter.send(can.Message(arbitration_id=0x110, data=bytes(8), is_extended_id=False))
                rec.out(time.perf_counter())
            tripped = over

    if mode == "baseline":
        tasks.append(asyncio.create_task(naive_poll()))
    while proc.poll() is None:
        await asyncio.sleep(0.05)
    report = json.loads(proc.stdout.read().strip().splitlines()[-1])
    stop_loop.set()
    stop_threads.set()
    for task in tasks:
        await task
    if child:
        os.kill(child, signal.SIGTERM)
        os.waitpid(child, 0)
    stop_side()
    if baseline_adapter is not None:
        baseline_adapter.stop()
    outs = np.sort(rec.outs[: rec.counts[0]])
    armed = rec.armed[: rec.counts[1]]
    latencies, missed, unarmed = [], 0, 0
    for k, t_in in enumerate(report["injected"]):
        if mode != "baseline" and k < len(armed) and not armed[k]:
            unarmed += 1  # still latched from the previous trip: nothing to trip, not a miss
            continue
        hits = outs[(outs >= t_in) & (outs <= t_in + 0.2)]
        if hits.size == 0:
            missed += 1
        else:
            latencies.append((float(hits[0]) - t_in) * 1000)
    a = np.array(latencies) if latencies else np.array([np.nan])
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "p999_ms": float(np.percentile(a, 99.9)), "max_ms": float(a.max()), "trips": len(latencies),
            "missed_trips": missed, "unarmed_injections": unarmed, "frames_flooded": report["sent"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    ap.add_argument("--trips", type=int, default=300)
    ap.add_argument("--period", type=float, default=0.15, help="seconds between trips")
    ap.add_argument("--rate", type=float, default=8000.0, help="flood frames/s (a saturated 1 Mbit/s bus: ~8,000)")
    ap.add_argument("--realtime-priority", type=int, help="P0's SCHED_FIFO priority (default: the config's; 0 = off)")
    ap.add_argument("--only", choices=["process", "thread", "baseline"], help="run one variant")
    ap.add_argument("--traffic", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=float, default=2.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.traffic:
        traffic(args)
        return
    frames = reference_frames()
    if args.only:
        print(json.dumps(asyncio.run(run(args.only, args, frames))))
        return
    ours = asyncio.run(run("process", args, frames))
    thread = asyncio.run(run("thread", args, frames))
    base = asyncio.run(run("baseline", args, frames))
    r = lambda x: None if x is None else round(x, 3)  # noqa: E731
    print(json.dumps({
        **{k: r(v) if isinstance(v, float) else v for k, v in ours.items()},
        "baseline_p50_ms": r(base["p50_ms"]), "baseline_p99_ms": r(base["p99_ms"]), "baseline_max_ms": r(base["max_ms"]),
        "baseline_missed_trips": base["missed_trips"],
        "thread_design_p50_ms": r(thread["p50_ms"]), "thread_design_p99_ms": r(thread["p99_ms"]),
        "thread_design_p999_ms": r(thread["p999_ms"]), "thread_design_max_ms": r(thread["max_ms"]),
        "thread_design_missed_trips": thread["missed_trips"],
        "load": {"flood_frames_per_s": args.rate, "event_loop": "pure-Python bursts + 1 MB msgpack encodes",
                 "estimator_thread": "numpy einsum over 224 cells"},
    }))


if __name__ == "__main__":
    main()
