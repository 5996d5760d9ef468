#!/usr/bin/env python3
"""Resource budget: run the reference site on the simulator and watch the daemon's process.

Starts `bmsgw run --sim` (224 cells, ~930 frames/s, protection lane, metrics, control socket),
samples /proc every ``--sample`` seconds for ``--seconds``, and prints one JSON object about
the daemon's two processes together (main and P0): RSS summed (shared pages counted twice)
and PSS (shared pages split: the memory they really take) at start (after warm-up), end and
max, the slope of RSS over the run, CPU % of one core (user + system, from /proc/PID/stat),
open file descriptors and threads.

The simulated pack runs inside the measured P0 process (it is what --sim is); its thread
measures its own CPU time, so ``cpu_pct`` (everything) splits into ``simulator_cpu_pct``
(the stand-in for the battery's hardware) and ``gateway_cpu_pct`` (what the gateway costs
on a real site). ``sim_only_cpu_pct`` is a daemon with protection off, for comparison.
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

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """The daemon and its P0 process."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(k) for k in kids)]


def proc_sample(pid: int) -> dict[str, float]:
    out = {"rss_mb": 0.0, "pss_mb": 0.0, "threads": 0, "cpu_s": 0.0, "fds": 0, "t": time.monotonic(), "procs": 0}
    for p in _tree(pid):
        status = Path(f"/proc/{p}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        pss = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
        out["rss_mb"] += int(fields["VmRSS"].split()[0]) / 1024
        out["pss_mb"] += pss / 1024  # shared pages (numpy, cantools, the image) counted once
        out["threads"] += int(fields["Threads"])
        out["cpu_s"] += (int(stat[11]) + int(stat[12])) / CLK_TCK
        out["fds"] += len(os.listdir(f"/proc/{p}/fd"))
        out["procs"] += 1
    return out


def soak(seconds: float, sample: float, warmup: float, extra: str = "") -> dict[str, float]:
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
        sim0 = sim_cpu()
        first = proc_sample(p.pid)
        samples = [first]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(sample)
            samples.append(proc_sample(p.pid))
        sim1 = sim_cpu()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(15)
    last = samples[-1]
    t = [s["t"] - first["t"] for s in samples]
    rss = [s["rss_mb"] for s in samples]
    n = len(t)
    mean_t, mean_r = sum(t) / n, sum(rss) / n
    slope = sum((a - mean_t) * (b - mean_r) for a, b in zip(t, rss, strict=True)) / max(
        1e-9, sum((a - mean_t) ** 2 for a in t))
    return {"pss_mb_start": round(first["pss_mb"], 1), "pss_mb_end": round(last["pss_mb"], 1),
            "rss_mb_start": round(first["rss_mb"], 1), "rss_mb_end": round(last["rss_mb"], 1),
            "rss_mb_max": round(max(rss), 1), "rss_mb_per_hour": round(slope * 3600, 2),
            "cpu_pct": round(100 * (last["cpu_s"] - first["cpu_s"]) / (last["t"] - first["t"]), 2),
            "gateway_cpu_pct": round(100 * (last["cpu_s"] - first["cpu_s"] - (sim1 - sim0)) / (last["t"] - first["t"]), 2),
            "simulator_cpu_pct": round(100 * (sim1 - sim0) / (last["t"] - first["t"]), 2),
            "fds": int(last["fds"]), "fds_start": int(first["fds"]), "threads": int(last["threads"]),
            "processes": int(last["procs"]),
            "exit_code": p.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--sample", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    args = ap.parse_args()
    result = soak(args.seconds, args.sample, args.warmup)
    sim_only = soak(min(args.seconds, 30.0), args.sample, args.warmup, "\n[protection]\nenabled = false\n")
    result["sim_only_cpu_pct"] = sim_only["cpu_pct"]
    result["seconds"] = args.seconds
    print(json.dumps(result))


if __name__ == "__main__":
    main()
