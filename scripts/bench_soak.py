#!/usr/bin/env python3
"""Resource budget: run the reference site on the simulator and watch the daemon's process.

Starts `bmsgw run --sim` (224 cells, ~930 frames/s, protection lane, metrics, control socket),
waits ``--warmup`` seconds (start-up: imports, the simulated EIS module's calibration, the first
estimator steps), then samples /proc every ``--sample`` seconds for ``--seconds`` and prints one
JSON object about the daemon's two processes together (main and P0):

- ``rss_mb_*``: RSS summed over both processes (pages they share, such as everything loaded
  before the fork, counted twice) at start (after warm-up), end and max; ``pss_mb_*``: PSS
  (shared pages split: the memory they really take); ``main_*`` / ``p0_*``: each process alone.
- ``rss_mb_per_hour``: the least-squares slope of RSS over the whole run after warm-up;
  ``rss_mb_per_hour_settled``: over its second half only (bounded buffers such as the loops'
  timing deques and the event history fill during the first minutes: growth that stops there is
  warm-up, growth that goes on in the second half is a leak); ``rss_curve``: [minutes, RSS, PSS]
  at 1, 2, 5, 10, 15, 20, 30, 45, 60, ... minutes after warm-up and at the end.
- ``cpu_pct``: CPU of one core (user + system, /proc/PID/stat) of both processes. The simulated
  pack and EIS module run inside the measured P0 process (it is what --sim is); their threads
  measure their own CPU time, so it splits into ``simulator_cpu_pct`` (the stand-in for the
  battery's hardware) and ``gateway_cpu_pct`` (what the gateway costs on a real site), itself
  ``main_cpu_pct`` + ``p0_gateway_cpu_pct``. ``sim_only_cpu_pct``: a daemon with protection
  off, for comparison (``--no-sim-only`` skips it).
- ``fds``, ``threads``, ``loadavg_start`` / ``loadavg_end`` (the machine may be shared: other
  load inflates every figure here).

``--progress`` prints one line per minute to stderr (for long soaks).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
CURVE_MIN = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 240)


def _tree(pid: int) -> list[int]:
    """The daemon and its P0 process."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(k) for k in kids)]


def _proc(p: int) -> dict[str, float]:
    status = Path(f"/proc/{p}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
    rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
    pss = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            "pss_mb": pss / 1024,  # shared pages (numpy, cantools, the image) counted once
            "threads": int(fields["Threads"]),
            "cpu_s": (int(stat[11]) + int(stat[12])) / CLK_TCK,
            "fds": len(os.listdir(f"/proc/{p}/fd"))}


def proc_sample(pid: int) -> dict[str, Any]:
    procs = [_proc(p) for p in _tree(pid)]
    out: dict[str, Any] = {k: sum(p[k] for p in procs) for k in ("rss_mb", "pss_mb", "threads", "cpu_s", "fds")}
    out["t"] = time.monotonic()
    out["procs"] = len(procs)
    out["main"] = procs[0]
    out["p0"] = procs[1] if len(procs) > 1 else {k: 0.0 for k in procs[0]}
    return out


def slope_per_hour(t: list[float], y: list[float]) -> float:
    """Least-squares slope of y over t (seconds), per hour."""
    n = len(t)
    if n < 2:
        return 0.0
    mean_t, mean_y = sum(t) / n, sum(y) / n
    den = sum((a - mean_t) ** 2 for a in t)
    return 3600 * sum((a - mean_t) * (b - mean_y) for a, b in zip(t, y, strict=True)) / max(1e-9, den)


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def soak(seconds: float, sample: float, warmup: float, extra: str = "", progress: bool = False) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bmsgw-soak-"))
    cfg = tmp / "soak.toml"
    cfg.write_text((ROOT / "gateway/configs/sim.toml").read_text() + "\n[metrics]\nport = 0\n" + extra)
    env = {**os.environ, "BMSGW_SOCKET": str(tmp / "c.sock"), "XDG_STATE_HOME": str(tmp / "state")}
    p = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--sim", "--config", str(cfg)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)

    def sim_cpu() -> float:
        st = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "--json"], env=env, capture_output=True,
                            text=True, cwd=ROOT, timeout=30)
        return float(json.loads(st.stdout)["simulator"]["cpu_s"])

    try:
        time.sleep(warmup)
        load0 = _loadavg()
        sim0 = sim_cpu()
        first = proc_sample(p.pid)
        samples = [first]
        end = first["t"] + seconds
        next_note = first["t"] + 60
        while time.monotonic() < end:
            time.sleep(min(sample, max(0.0, end - time.monotonic())))
            samples.append(proc_sample(p.pid))
            if progress and samples[-1]["t"] >= next_note:
                s = samples[-1]
                print(f"bench_soak: {(s['t'] - first['t']) / 60:5.1f} min  RSS {s['rss_mb']:.1f} MB  "
                      f"PSS {s['pss_mb']:.1f} MB  CPU {100 * (s['cpu_s'] - first['cpu_s']) / (s['t'] - first['t']):.2f} %"
                      f"  load {_loadavg():.2f}", file=sys.stderr, flush=True)
                next_note += 60
        sim1 = sim_cpu()
        load1 = _loadavg()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(15)
    last = samples[-1]
    span = last["t"] - first["t"]
    t = [s["t"] - first["t"] for s in samples]
    rss = [s["rss_mb"] for s in samples]
    half = [i for i, x in enumerate(t) if x >= span / 2]
    curve = []
    for m in CURVE_MIN:
        k = next((i for i, x in enumerate(t) if x >= 60 * m), None)
        if k is not None:
            curve.append([round(t[k] / 60, 1), round(rss[k], 1), round(samples[k]["pss_mb"], 1)])
    curve.append([round(span / 60, 1), round(last["rss_mb"], 1), round(last["pss_mb"], 1)])

    def pct(cpu_s: float) -> float:
        return round(100 * cpu_s / span, 2)

    sim = sim1 - sim0
    return {"pss_mb_start": round(first["pss_mb"], 1), "pss_mb_end": round(last["pss_mb"], 1),
            "rss_mb_start": round(first["rss_mb"], 1), "rss_mb_end": round(last["rss_mb"], 1),
            "rss_mb_max": round(max(rss), 1), "rss_mb_per_hour": round(slope_per_hour(t, rss), 2),
            "rss_mb_per_hour_settled": round(slope_per_hour([t[i] for i in half], [rss[i] for i in half]), 2),
            "rss_curve": curve,
            "main_rss_mb_end": round(last["main"]["rss_mb"], 1), "p0_rss_mb_end": round(last["p0"]["rss_mb"], 1),
            "main_pss_mb_end": round(last["main"]["pss_mb"], 1), "p0_pss_mb_end": round(last["p0"]["pss_mb"], 1),
            "cpu_pct": pct(last["cpu_s"] - first["cpu_s"]),
            "gateway_cpu_pct": pct(last["cpu_s"] - first["cpu_s"] - sim),
            "main_cpu_pct": pct(last["main"]["cpu_s"] - first["main"]["cpu_s"]),
            "p0_gateway_cpu_pct": pct(last["p0"]["cpu_s"] - first["p0"]["cpu_s"] - sim),
            "simulator_cpu_pct": pct(sim),
            "fds": int(last["fds"]), "fds_start": int(first["fds"]), "threads": int(last["threads"]),
            "processes": int(last["procs"]), "loadavg_start": load0, "loadavg_end": load1,
            "exit_code": p.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--sample", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--no-sim-only", action="store_true", help="skip the comparison run with protection off")
    ap.add_argument("--progress", action="store_true", help="one line per minute on stderr")
    args = ap.parse_args()
    result = soak(args.seconds, args.sample, args.warmup, progress=args.progress)
    if not args.no_sim_only:
        sim_only = soak(min(args.seconds, 30.0), args.sample, args.warmup, "\n[protection]\nenabled = false\n")
        result["sim_only_cpu_pct"] = sim_only["cpu_pct"]
    result["seconds"] = args.seconds
    result["warmup_s"] = args.warmup
    print(json.dumps(result))


if __name__ == "__main__":
    main()
