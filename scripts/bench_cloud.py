#!/usr/bin/env python3
"""Cloud link benchmark on the reference site (224 cells, 16 modules x 2 sensors, pack V/I).

* ``bytes_per_sample``: one hour of the simulated reference site (pack current and voltage at
  100 Hz, cell voltages at 10 Hz, temperatures at 1 Hz; sensor noise and resolution as the
  simulator's measurement layer) encoded into the batches the gateway publishes (default signal
  classes and batch lengths), payload bytes per sample.  ``baseline_bytes_per_sample``: the same
  samples as one JSON message per sample (``{"ts", "signal", "value", "quality"}``), what common
  gateways send.
* ``replay_samples_per_s``: that hour as a backlog in the store, drained to a local Mosquitto (on
  127.0.0.1) while live data flows (the same site fed in real time through a process image by a
  thread, like the CAN path), measured from the connection to the last historical batch received
  by a consumer in another process; ``live_samples_per_s``: the live sampling rate;
  ``live_latency_p99_ms``: batch creation to receipt of live batches during the replays, next to
  ``live_latency_p99_ms_idle`` without backlog.  Live batches are short (0.1 s during replays,
  0.5 s idle) so the percentiles rest on many messages.  The uncapped replay of an hour takes well
  under a second on loopback, so ``capped_*`` repeats it at a bandwidth cap (default 1 MiB/s,
  half of it for the backfill lane), where the live lane's latency is measured over many seconds.

Usage: ``scripts/bench_cloud.py [--json] [--rounds N] [--hours H]``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import numpy as np  # noqa: E402

from cloudlink.batch import Sealer, Telemetry  # noqa: E402
from cloudlink.config import CloudSection, CommandSettings, SignalClass, default_classes  # noqa: E402
from cloudlink.link import CloudLink  # noqa: E402
from cloudlink.store import Store  # noqa: E402
from drivers.sim_battery import SensorConfig, SimBatteryPack, StorageDayProfile  # noqa: E402
from gateway.image import ProcessImage  # noqa: E402

MODULES, CELLS_PER_MODULE, SENSORS = 16, 14, 2
CELLS = MODULES * CELLS_PER_MODULE
T0_MS = 1_700_000_000_000
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
BACKLOG_BOOT = "0000000000000000"


# -- the reference site's data -----------------------------------------------------------------


def names() -> dict[str, list[str]]:
    return {"pack": ["pack.current", "pack.voltage"],
            "cells": [f"cell[{i}].voltage" for i in range(CELLS)],
            "temperatures": [f"module[{m}].temperature[{k}]" for m in range(MODULES) for k in range(SENSORS)]
            + ["pack.ambient_temperature"]}


def simulate(seconds: int, seed: int = 7, start_hour: float = 12.0) -> Iterator[tuple[str, Telemetry]]:
    """Blocks of site data in 1 s steps: ('pack', 100 rows), ('cells', 10 rows), ('temperatures', 1 row)."""
    sens = SensorConfig()
    pack = SimBatteryPack(modules=MODULES, cells_per_module=CELLS_PER_MODULE, sensors_per_module=SENSORS, seed=seed)
    profile = StorageDayProfile()
    rng = np.random.default_rng(seed + 1)
    n = names()
    t_day = start_hour * 3600.0
    prev_v = pack.pack_voltage_v
    for s in range(seconds):
        base = T0_MS + s * 1000
        cells = np.empty((10, CELLS))
        pv_true = np.empty(10)
        i_true = np.empty(10)
        for k in range(10):
            current = profile.current_at(t_day + s + k / 10)
            pack.step(0.1, current)
            m = pack.measure()
            cells[k] = m.cell_voltages_v
            pv_true[k] = pack.pack_voltage_v
            i_true[k] = current
        # pack current and voltage at 100 Hz: the physics at 10 Hz, interpolated, with the sensors' noise and steps
        v100 = np.interp(np.arange(100) / 100, np.arange(-1, 10) / 10 + 0.1, np.concatenate([[prev_v], pv_true]))
        i100 = np.repeat(i_true, 10)
        prev_v = pv_true[-1]
        i100 = np.round(np.round((i100 + rng.normal(0, sens.current_noise_a, 100)) / 0.001) * 0.001, 4)
        v100 = np.round(np.round((v100 + rng.normal(0, sens.pack_voltage_noise_v, 100)) / 0.01) * 0.01, 3)
        t100 = base + np.arange(100, dtype=np.int64) * 10
        yield "pack", Telemetry(n["pack"], t100, np.column_stack([i100, v100]), np.zeros((100, 2), np.int8), 100.0)
        yield "cells", Telemetry(n["cells"], base + np.arange(10, dtype=np.int64) * 100, cells,
                                 np.zeros((10, CELLS), np.int8), 10.0)
        temps = np.concatenate([m.module_temps_c.ravel(), [m.ambient_temp_c]])
        yield "temperatures", Telemetry(n["temperatures"], np.array([base], dtype=np.int64), temps[None, :],
                                        np.zeros((1, len(temps)), np.int8), 1.0)


def batches(seconds: int, batch_s: dict[str, float]) -> Iterator[tuple[str, Telemetry]]:
    """The simulated hour grouped into the gateway's batch lengths per class."""
    acc: dict[str, list[Telemetry]] = {k: [] for k in batch_s}
    rows: dict[str, int] = dict.fromkeys(batch_s, 0)
    per_s = {"pack": 100, "cells": 10, "temperatures": 1}
    for cls, tel in simulate(seconds):
        acc[cls].append(tel)
        rows[cls] += len(tel.t_ms)
        if rows[cls] >= batch_s[cls] * per_s[cls]:
            yield cls, _concat(acc[cls])
            acc[cls], rows[cls] = [], 0
    for cls, parts in acc.items():
        if parts:
            yield cls, _concat(parts)


def _concat(parts: list[Telemetry]) -> Telemetry:
    return Telemetry(parts[0].signals, np.concatenate([p.t_ms for p in parts]),
                     np.vstack([p.values for p in parts]), np.vstack([p.quality for p in parts]), parts[0].rate_hz)


def json_baseline(tel: Telemetry, limit_rows: int = 50) -> tuple[int, int]:
    """Bytes and samples of one JSON message per sample (what common gateways publish)."""
    total = n = 0
    for r in range(min(limit_rows, len(tel.t_ms))):
        for c, name in enumerate(tel.signals):
            msg = {"ts": int(tel.t_ms[r]), "signal": name, "value": float(tel.values[r, c]), "quality": "good"}
            total += len(json.dumps(msg, separators=(",", ":")))
            n += 1
    return total, n


def build_backlog(state: Path, seconds: int) -> dict[str, Any]:
    """Encode the simulated period with the default classes into a store (the backlog); sizes and counts."""
    batch_s = {c.name: c.batch_s for c in default_classes() if c.name in ("pack", "cells", "temperatures")}
    cfg = CloudSection()
    sealer = Sealer("bench-gw", BACKLOG_BOOT, cfg.max_payload)
    store = Store(cfg.store_path(state), sealer, quota_bytes=cfg.quota_bytes, min_free_bytes=0,
                  fsync_window_s=cfg.fsync_window_s, thin_window_ms=60_000)
    store.open()
    payload = samples = jbytes = jsamples = 0
    t_enc = 0.0
    for cls, tel in batches(seconds, batch_s):
        t = time.perf_counter()
        sealed = sealer.telemetry(cls, tel)
        t_enc += time.perf_counter() - t
        store.put(sealed)
        payload += sum(len(s.payload) for s in sealed)
        samples += tel.samples
        jb, js = json_baseline(tel)
        jbytes += jb
        jsamples += js
    store.sync(force=True)
    rows = store.count()
    store.close()
    return {"payload_bytes": payload, "samples": samples, "rows": rows, "encode_s": t_enc,
            "json_bytes_per_sample": jbytes / jsamples}


# -- the live site: a process image fed by a thread ---------------------------------------------


def site_image() -> ProcessImage:
    img = ProcessImage({"cell.voltage": (CELLS,), "module.temperature": (MODULES, SENSORS)},
                       ["pack.current", "pack.voltage", "pack.ambient_temperature"])
    s_pack, s_cells, s_temp = img.add_slot("pack", 0.01), img.add_slot("cells", 0.1), img.add_slot("temps", 1.0)
    for n in ("pack.current", "pack.voltage"):
        img.bind(img.index(n), s_pack)
    for i in range(CELLS):
        img.bind(img.index(f"cell[{i}].voltage"), s_cells)
    for n in names()["temperatures"]:
        img.bind(img.index(n), s_temp)
    img.freeze()
    return img


class SiteFeeder:
    """Writes the simulated site into the image at its real rates, as the CAN receive threads would."""

    def __init__(self, img: ProcessImage) -> None:
        self.img = img
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        img = self.img
        ic, iv = img.index("pack.current"), img.index("pack.voltage")
        cell0 = img.index("cell[0].voltage")
        t0 = img.index("module[0].temperature[0]")
        ia = img.index("pack.ambient_temperature")
        gen = simulate(24 * 3600, seed=11)
        next_t = time.monotonic()
        while not self.stop_event.is_set():
            blocks = {cls: tel for cls, tel in (next(gen), next(gen), next(gen))}
            for k in range(100):
                next_t += 0.01
                delay = next_t - time.monotonic()
                if delay > 0 and self.stop_event.wait(delay):
                    return
                now, mono = time.time(), time.monotonic()
                p = blocks["pack"].values[k]
                img.w_value[ic], img.w_value[iv] = float(p[0]), float(p[1])
                self._touch(0, now, mono)
                if k % 10 == 0:
                    img.value[cell0:cell0 + CELLS] = blocks["cells"].values[k // 10]
                    self._touch(1, now, mono)
                if k == 0:
                    tv = blocks["temperatures"].values[0]
                    img.value[t0:t0 + MODULES * SENSORS] = tv[:-1]
                    img.w_value[ia] = float(tv[-1])
                    self._touch(2, now, mono)

    def _touch(self, slot: int, now: float, mono: float) -> None:
        self.img.w_rx_time[slot] = now
        self.img.w_rx_mono[slot] = mono
        self.img.w_seq[slot] += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(2)


# -- broker and consumer -----------------------------------------------------------------------

CONSUMER = r"""
import sys, time, json, threading
sys.path.insert(0, sys.argv[2])
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from cloudlink.batch import read_envelope
out = sys.stdout
lock = threading.Lock()
def on_connect(c, u, f, rc, p=None):
    c.subscribe("bench/#", qos=0)
def on_subscribe(c, u, mid, rcs, p=None):
    out.write("READY\n"); out.flush()
def on_message(c, u, m):
    now = time.time()
    lane = "hist" if "/hist/" in m.topic else "data" if "/data/" in m.topic else None
    if lane is None:
        return
    env = read_envelope(m.payload, verify=True)
    with lock:
        out.write(f"{lane} {now:.6f} {env['ct']} {env['stream']} {env['seq']} {env['n']} {env['boot']}\n")
        out.flush()
c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-consumer", protocol=paho.MQTTv5)
c.on_connect, c.on_message, c.on_subscribe = on_connect, on_message, on_subscribe
c.connect("127.0.0.1", int(sys.argv[1]), 60)
c.loop_forever()
"""


class Consumer:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CONSUMER, str(port), str(ROOT)], stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "READY":
            raise RuntimeError("consumer did not start")
        self.lines: list[tuple[str, float, int, str, int, int, str]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            lane, recv, ct, stream, seq, n, boot = line.split()
            with self.lock:
                self.lines.append((lane, float(recv), int(ct), stream, int(seq), int(n), boot))

    def snapshot(self) -> list[tuple[str, float, int, str, int, int, str]]:
        with self.lock:
            return list(self.lines)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    import socket
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def live_config(port: int, batch_s: float = 0.5, cap: int = 0) -> CloudSection:
    classes = [SignalClass(c.name, c.signals, rate_hz=c.rate_hz, batch_s=batch_s, max_rate_hz=c.max_rate_hz)
               for c in default_classes()]
    return CloudSection(enabled=True, host="127.0.0.1", port=port, telemetry=classes,
                        topics=CloudSection().topics.__class__(prefix="bench"), bandwidth_cap=cap,
                        backfill_share=0.5, commands=CommandSettings(enabled=False), backoff_min_s=0.05,
                        backoff_max_s=0.5)


async def run_link(link: CloudLink, until: Any, timeout: float) -> None:
    """Run the link until ``until()`` is true (or the timeout)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(link.run)
        end = time.monotonic() + timeout
        while time.monotonic() < end and not until():
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


def p99(xs: list[float]) -> float | None:
    return round(float(np.percentile(xs, 99)), 1) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="replays of the backlog (default 3)")
    ap.add_argument("--hours", type=float, default=1.0, help="backlog length (default 1 hour)")
    ap.add_argument("--idle-s", type=float, default=8.0, help="live-only phase for the idle latency")
    ap.add_argument("--cap", type=int, default=1 << 20, help="bandwidth cap of the capped replay, bytes/s")
    args = ap.parse_args()
    seconds = int(args.hours * 3600)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cloud_"))
    broker = consumer = None
    try:
        master = tmp / "backlog"
        t = time.perf_counter()
        info = build_backlog(master, seconds)
        build_s = time.perf_counter() - t
        bytes_per_sample = info["payload_bytes"] / info["samples"]
        broker, port = start_broker(tmp)
        consumer = Consumer(port)
        img = site_image()
        feeder = SiteFeeder(img)
        time.sleep(1.2)  # every slot written once

        # idle: live data only
        link = CloudLink(live_config(port), img, None, {}, tmp / "idle", "bench-gw", "site")
        t_idle = time.time()
        anyio.run(run_link, link, lambda: False, args.idle_s)
        idle = [(r - ct / 1000) * 1000 for lane, r, ct, *_ in consumer.snapshot() if lane == "data" and r >= t_idle]
        live_samples = sum(s.samples for s in link.samplers)
        live_rate = live_samples / args.idle_s

        def replay(k: int, cap: int) -> tuple[float, list[float], float]:
            """Drain a copy of the backlog while live data flows: samples/s, live latencies, seconds."""
            state = tmp / f"round{k}"
            shutil.copytree(master, state)
            link = CloudLink(live_config(port, batch_s=0.1, cap=cap), img, None, {}, state, "bench-gw", "site")
            mark = len(consumer.snapshot())

            def hist_done() -> bool:
                got = sum(1 for x in consumer.snapshot()[mark:] if x[0] == "hist" and x[6] == BACKLOG_BOOT)
                return got >= info["rows"]

            anyio.run(run_link, link, hist_done, 600.0)
            lines = consumer.snapshot()[mark:]
            hist = [x for x in lines if x[0] == "hist" and x[6] == BACKLOG_BOOT]
            if len(hist) < info["rows"]:
                raise RuntimeError(f"round {k}: only {len(hist)} of {info['rows']} backlog batches arrived")
            t_end = max(x[1] for x in hist)
            first_live = min((x[1] for x in lines if x[0] == "data"), default=math.inf)
            t_start = min(min(x[1] for x in hist), first_live)  # the new connection's first message
            dur = max(t_end - t_start, 1e-3)
            lat = [(r - ct / 1000) * 1000 for lane, r, ct, *_ in lines if lane == "data" and r <= t_end]
            return sum(x[5] for x in hist) / dur, lat, dur

        replay_rates, replay_lat, replay_s = [], [], []
        for k in range(args.rounds):
            rate, lat, dur = replay(k, 0)
            replay_rates.append(rate)
            replay_lat += lat
            replay_s.append(dur)
        capped_rate, capped_lat, capped_s = replay(args.rounds, args.cap)
        feeder.stop()
        result = {
            "bytes_per_sample": round(bytes_per_sample, 3),
            "baseline_bytes_per_sample": round(info["json_bytes_per_sample"], 1),
            "ratio": round(info["json_bytes_per_sample"] / bytes_per_sample, 1),
            "replay_samples_per_s": round(float(np.median(replay_rates))),
            "live_samples_per_s": round(live_rate),
            "replay_vs_live": round(float(np.median(replay_rates)) / live_rate, 1),
            "live_latency_p99_ms": p99(replay_lat),
            "live_latency_p99_ms_idle": p99(idle),
            "live_messages_during_replay": len(replay_lat),
            "capped_bandwidth_bytes_s": args.cap,
            "capped_replay_samples_per_s": round(capped_rate),
            "capped_replay_s": round(capped_s, 1),
            "capped_live_latency_p99_ms": p99(capped_lat),
            "capped_live_messages_during_replay": len(capped_lat),
            "backlog_hours": args.hours,
            "backlog_samples": info["samples"],
            "backlog_batches": info["rows"],
            "backlog_bytes": info["payload_bytes"],
            "replay_s": [round(x, 3) for x in replay_s],
            "encode_us_per_sample": round(info["encode_s"] / info["samples"] * 1e6, 3),
            "build_s": round(build_s, 1),
            "codec": "zlib",
        }
        if args.json:
            print(json.dumps(result))
        else:
            for k, v in result.items():
                print(f"{k:32s} {v}")
        return 0
    finally:
        if consumer is not None:
            consumer.stop()
        if broker is not None:
            broker.send_signal(signal.SIGTERM)
            broker.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
