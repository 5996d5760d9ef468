#!/usr/bin/env python3
"""Ingest benchmark: adapter -> decode -> map -> process image, against the naive loop.

Both pipelines are fed the same pre-generated frames of the reference site
(16 x 14 cells, recorded from the simulated pack) through the same python-can
bus class, whose recv() hands out the next frame from memory:

* bmsgw: the real CanAdapter receive thread, the prepared per-ID handlers,
  signal mapping, validity flags and timestamps into the process image;
* baseline: what a user would write: ``bus.recv()`` + cantools
  ``decode_message`` + ``dict.update``.

Rounds alternate between the two so that machine noise hits both alike; the
best round of each is reported.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import can
import cantools

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drivers.canbus import AdapterSettings, CanAdapter  # noqa: E402
from drivers.sim_pack import SimPack  # noqa: E402
from gateway.config import load_config  # noqa: E402


class MemoryBus(can.BusABC):
    """A python-can bus that receives a fixed list of frames, then reports the end."""

    def __init__(self, frames: list[can.Message], **kwargs: Any) -> None:
        super().__init__(channel="memory", **kwargs)
        self._frames = frames
        self._i = 0
        self.done = threading.Event()

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        i = self._i
        if i < len(self._frames):
            self._i = i + 1
            return self._frames[i], False
        # the end: the reader has processed every frame; behave like an idle bus
        self.done.set()
        time.sleep(timeout or 0)
        return None, False

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        pass


def reference_frames(seconds: float) -> list[can.Message]:
    """Frames of the simulated reference site (wall-clock rates), recorded in memory."""
    out: list[can.Message] = []
    sim = SimPack(str(ROOT / "dbc" / "bmsgw_pack.dbc"), out.append, seed=7)
    for _ in range(int(seconds / 0.01)):
        sim.tick()
    return out


def run_bmsgw(frames: list[can.Message]) -> tuple[float, Any]:
    loaded = load_config(ROOT / "gateway" / "configs" / "sim.toml")
    ingest = loaded.ingests["pack"]
    bus = MemoryBus(frames)
    adapter = CanAdapter(AdapterSettings("pack", "memory", "memory"), ingest.on_frame, open_bus=lambda **kw: bus)
    t0 = time.perf_counter()
    adapter.start()
    bus.done.wait()
    dt = time.perf_counter() - t0
    adapter.stop()
    assert adapter.stats.frames == len(frames), (adapter.stats.frames, len(frames))
    return dt, loaded.image


def run_baseline(frames: list[can.Message], db: Any) -> tuple[float, dict[str, Any]]:
    bus = MemoryBus(frames)
    values: dict[str, Any] = {}
    decode = db.decode_message
    recv = bus.recv
    t0 = time.perf_counter()
    for _ in range(len(frames)):
        msg = recv(0.2)
        values.update(decode(msg.arbitration_id, msg.data))
    dt = time.perf_counter() - t0
    bus.shutdown()
    return dt, values


def image_matches(image: Any, frames: list[can.Message], db: Any) -> bool:
    """The image's cell voltages and pack current equal cantools' decode of the last frames."""
    expected = image.array("cell.voltage").copy()
    current = None
    for msg in frames:
        d = db.decode_message(msg.arbitration_id, msg.data, decode_choices=False)
        if 0x200 <= msg.arbitration_id < 0x210:
            m = msg.arbitration_id - 0x200
            for k, v in d.items():
                if k.endswith("_Voltage"):
                    expected[m * 14 + int(k[4:6])] = v
        elif msg.arbitration_id == 0x100:
            current = d["PackCurrent"]
    return bool((abs(expected - image.array("cell.voltage")) < 1e-9).all()) and \
        abs(float(image.read("pack.current").value) - float(current or 0)) < 1e-9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON (the only output format; kept for symmetry)")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of reference-site traffic per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    frames = reference_frames(args.seconds)
    db = cantools.database.load_file(str(ROOT / "dbc" / "bmsgw_pack.dbc"))
    ours, base = [], []
    image = values = None
    for _ in range(args.rounds):
        dt, image = run_bmsgw(frames)
        ours.append(dt)
        dt, values = run_baseline(frames, db)
        base.append(dt)
    assert image is not None and values is not None
    n = len(frames)
    best, best_base = min(ours), min(base)
    result = {
        "frames": n,
        "rounds": args.rounds,
        "frames_per_s": round(n / best),
        "baseline_frames_per_s": round(n / best_base),
        "ratio": round(best_base / best, 3),
        "us_per_frame": round(best / n * 1e6, 3),
        "baseline_us_per_frame": round(best_base / n * 1e6, 3),
        "median_us_per_frame": round(statistics.median(ours) / n * 1e6, 3),
        "median_baseline_us_per_frame": round(statistics.median(base) / n * 1e6, 3),
        "image_matches_cantools": image_matches(image, frames, db),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
