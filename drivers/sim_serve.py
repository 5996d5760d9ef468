"""The simulated pack as a separate process, served as SLCAN over loopback TCP.

The gateway then opens it with python-can's real slcan interface
(``interface = "slcan"``, ``channel = "socket://127.0.0.1:PORT"``), which is
how tests cross a process boundary on machines without SocketCAN.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from drivers.sim_pack import SimPack, SimRunner
from drivers.slcan_server import SlcanServer


def serve(port: int, config: str | None = None, host: str = "127.0.0.1") -> int:
    """Run until SIGTERM/SIGINT; prints the channel URL on the first line of stdout."""
    from gateway.config import load_config, shipped_config

    loaded = load_config(Path(config) if config else shipped_config())
    cfg = loaded.config
    sim_cfg = cfg.sim
    if sim_cfg is None:
        print(f"{loaded.path}: no [sim] section", file=sys.stderr)
        return 2
    dbc = loaded.dbcs[sim_cfg.bus][0].path
    holder: list[SimPack] = []
    server = SlcanServer(host, port, on_frame=lambda msg: holder[0].receive(msg) if holder else None)
    sim = SimPack(str(dbc), server.send, modules=cfg.site.modules, cells_per_module=cfg.site.cells_per_module,
                  sensors_per_module=cfg.site.sensors_per_module, chemistry=cfg.site.chemistry,
                  speed=sim_cfg.speed, start_hour=sim_cfg.start_hour, initial_soc=sim_cfg.initial_soc,
                  ambient_c=sim_cfg.ambient_c, peak_charge_a=sim_cfg.peak_charge_a,
                  peak_discharge_a=sim_cfg.peak_discharge_a, seed=sim_cfg.seed)
    holder.append(sim)
    runner = SimRunner(sim)
    done = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: done.set())
    with server:
        print(server.url, flush=True)
        runner.start()
        done.wait()
        runner.stop()
    return 0
