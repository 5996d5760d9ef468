"""`bmsgw`: run the gateway and diagnose it over SSH.

Exit codes: 0 success, 1 runtime failure (or `doctor` found a failure), 2 bad config/DBC/map/arguments,
3 the daemon is not running (or its socket is not reachable), 4 the daemon
refused the request.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.schema import ConfigError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_NOT_RUNNING, EXIT_REFUSED = 0, 1, 2, 3, 4


def _interval(text: str) -> float:
    """An --interval: seconds, 0.05..3600."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} s: must be 0.05..3600 s")
    return value


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _socket(args: argparse.Namespace) -> Path:
    from gateway.config import default_socket, load_config, socket_path

    if args.socket:
        return Path(args.socket)
    if args.config:
        return socket_path(load_config(args.config).config)
    return default_socket()


# -- run -----------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from gateway.config import load_config, shipped_config
    from gateway.control import ControlError
    from gateway.daemon import Gateway
    from gateway.logsetup import setup_logging

    path = Path(args.config) if args.config else shipped_config()
    if not args.config and not args.sim:
        print("bmsgw run: give --config FILE, or --sim for the built-in simulated battery", file=sys.stderr)
        return EXIT_CONFIG
    loaded = load_config(path)
    setup_logging(loaded.config.gateway.log_level)
    for w in loaded.warnings:
        logging.getLogger("bmsgw").warning("%s", w)
    gw = Gateway(loaded, simulate=args.sim)
    try:
        gw.claim()  # before P0 opens any bus: a second gateway must not touch the first one's contactors
    except (ControlError, OSError) as exc:
        print(f"bmsgw run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    gw.start_p0()  # fork before this process starts any thread or event loop
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    anyio.run(gw.run, backend_options=options)
    return EXIT_OK


# -- config --------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    import tomli_w

    from gateway.config import load_config
    from gateway.schema import to_plain

    loaded = load_config(args.file)
    resolved = to_plain(loaded.config)
    for bus, dbcs in zip(resolved["bus"], loaded.config.bus, strict=True):
        bus["dbc"] = [str(d.path) for d in loaded.dbcs[dbcs.name]]
    summary: dict[str, Any] = {
        "file": str(loaded.path),
        "warnings": loaded.warnings,
        "buses": [{"name": s.bus, "messages": len(s.messages), "bound_signals": len(s.signal_map.bindings),
                   "map": s.signal_map.source} for s in loaded.sources],
        "image": {"signals": loaded.image.size, "sources": len(loaded.image.slot_names)},
    }
    if args.json:
        _print_json({"ok": True, "config": resolved, **summary})
        return EXIT_OK
    print(f"# {loaded.path}: OK")
    for w in loaded.warnings:
        print(f"# warning: {w}")
    for b in summary["buses"]:
        print(f"# bus {b['name']}: {b['messages']} messages, {b['bound_signals']} signals bound by {b['map']}")
    print(f"# process image: {summary['image']['signals']} signals from {summary['image']['sources']} sources")
    print(tomli_w.dumps(resolved), end="")
    return EXIT_OK


# -- diagnostics over the control socket ---------------------------------------------


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.control import request

    st = request(_socket(args), "status")
    if args.json:
        _print_json(st)
        return EXIT_OK
    p = st["pack"]
    cv, t = p["cell_voltage"], p["temperature"]
    lines = [
        f"bmsgw {st['version']}  gateway {st['gateway']}  up {st['uptime_s']:.0f} s",
        *([] if st["healthy"] else [f"UNHEALTHY: {st['health_problem']}"]),
        f"pack     {_fmt(p.get('voltage_v'), '.2f')} V ({p.get('voltage_quality', 'n/a')})   "
        f"{_fmt(p.get('current_a'), '.2f')} A ({p.get('current_quality', 'n/a')})   {_fmt(p.get('power_w'), '.0f')} W",
        f"cell V   min {_fmt(cv['min'])} V (cell {cv['min_index']})   max {_fmt(cv['max'])} V (cell {cv['max_index']})"
        f"   spread {_fmt(cv.get('spread') and cv['spread'] * 1000, '.0f')} mV   not good {cv['not_good']}",
        f"temp     min {_fmt(t['min'], '.1f')} C ({t.get('min_at', 'n/a')})   "
        f"max {_fmt(t['max'], '.1f')} C ({t.get('max_at', 'n/a')})   not good {t['not_good']}",
    ]
    est = st.get("estimates")
    if est and est["initialised"]:
        lim = est["limits"] or {}
        lines.append(f"soc      {_fmt(est['soc'] and est['soc'] * 100, '.1f')} %   soe "
                     f"{_fmt(est['soe'] and est['soe'] * 100, '.1f')} %   cells {_fmt(est['min_cell_soc'] and est['min_cell_soc'] * 100, '.1f')}"
                     f"..{_fmt(est['max_cell_soc'] and est['max_cell_soc'] * 100, '.1f')} %   limits charge "
                     f"{_fmt(lim.get('charge_current_a'), '.1f')} A{_by(lim.get('charge_limited_by'))}  discharge "
                     f"{_fmt(lim.get('discharge_current_a'), '.1f')} A{_by(lim.get('discharge_limited_by'))}")
    for b in st["buses"]:
        errs = b["decode_errors"]
        lines.append(f"bus {b['name']:<8} {b['state']:<6} {b['frames_per_s']:8.0f} frames/s  total {b['frames']}  "
                     f"unknown IDs {errs['unknown']}  bad length {errs['bad_length']}  bad mux {errs['bad_mux']}  "
                     f"error frames {b['error_frames']}  bus-off {b['bus_off']}  overruns {b['rx_overflow']}" +
                     (f"  LOST to handler errors {b['sink_errors']}" if b["sink_errors"] else ""))
        if b["last_error"]:
            lines.append(f"         last error: {b['last_error']}")
    for lp in st["loops"]:
        lines.append(f"loop {lp['name']:<12} {lp['lane']} every {lp['period_ms']:.0f} ms  runs {lp['runs']}  "
                     f"overruns {lp['overruns']}  errors {lp['errors']}  jitter p99 {lp['jitter_p99_ms']:.2f} ms  max {lp['jitter_max_ms']:.2f} ms")
        if lp["errors"]:
            lines.append(f"         last error: {lp['last_error']}")
    prot = st.get("protection")
    if prot:
        c = prot["contactors"]
        lines.append(f"contactors {c['state']}  active alarms {prot['active_alarms']}  trips {c['trips']}  "
                     f"missed deadlines {prot['missed_deadlines']}" +
                     (f"  causes: {_first(c['error_causes'])}" if c["error_causes"] else ""))
    if st.get("events_dropped"):
        lost = ", ".join(f"{n} {kind}" for kind, n in sorted(st["events_dropped"].items()))
        lines.append(f"events   LOST {lost}: P0 could not hand them to the main process in time")
    eis = st.get("eis")
    if eis:
        running = f" {eis['target']} {eis['points_received']}/{eis['points_total']}" if eis["target"] else ""
        line = (f"eis        {eis['phase']}{running}  module {eis['module_state'] or 'not heard'}  "
                f"analysed {eis['analysed']} (invalid {eis['invalid']})")
        last = eis["last"]
        if last:
            line += f"  last {last['target']} {'valid' if last['valid'] else 'INVALID'}"
            line += f" SoT {last['sot_c']:.1f} C" if last["sot_c"] is not None else ""
        lines.append(line)
    if st.get("simulator"):
        sim = st["simulator"]
        lines.append(f"simulator  time of day {sim['sim_time_h']:.2f} h  faults: {', '.join(sim['faults']) or 'none'}" +
                     (f"  failed ticks {sim['tick_errors']}" if sim["tick_errors"] else ""))
    print("\n".join(lines))
    return EXIT_OK


def cmd_signals(args: argparse.Namespace) -> int:
    from gateway.control import request

    rows = request(_socket(args), "signals", {"glob": args.glob})
    if args.json:
        _print_json(rows)
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        age = "never" if r["age_s"] is None else f"{r['age_s']:.2f} s"
        print(f"{r['name']:<{width}}  {_fmt(r['value'], '.4g'):>10}  {r['quality']:<7}  age {age}")
    return EXIT_OK


def _by(limiter: str | None) -> str:
    """Which limiter set a current limit, unless it is just the configured maximum."""
    return f" ({limiter.replace('_', ' ')})" if limiter and limiter != "max" else ""


def _frame_line(rec: dict[str, Any]) -> str:
    ident = f"{rec['id']:08X}" if rec["extended"] else f"{rec['id']:03X}"
    data = " ".join(rec["data"][i:i + 2] for i in range(0, len(rec["data"]), 2))
    line = f"({rec['timestamp']:.6f}) {rec['bus']}  {ident}  [{len(rec['data']) // 2}]  {data}"
    if rec.get("error"):
        line += "  ERRORFRAME"
    if "signals" in rec:
        line += f"  {rec['name']}: " + " ".join(f"{k}={v:g}" for k, v in rec["signals"].items())
    elif "decode_error" in rec:
        line += f"  ({rec['decode_error']})"
    return line


def cmd_candump(args: argparse.Namespace) -> int:
    from gateway.control import stream

    n = 0
    try:
        for rec in stream(_socket(args), "candump", {"bus": args.bus, "decode": args.decode}):
            if "dropped" in rec and not args.json:  # like candump's DROPCOUNT: the gap is not silent
                print(f"DROPCOUNT: {rec['dropped']} frames on {rec['bus']} not shown (this reader fell behind)",
                      file=sys.stderr, flush=True)
                continue
            print(json.dumps(rec) if args.json else _frame_line(rec), flush=True)
            n += "dropped" not in rec
            if args.count and n >= args.count:
                break
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from gateway.replay import Replay
    from gateway.tracefile import read_trace

    trace = read_trace(args.file, args.format)
    rp = Replay(trace, [Path(p) for p in args.dbc], Path(args.map) if args.map else None)
    for w in rp.warnings:
        print(f"warning: {w}", file=sys.stderr)
    frames = []
    for rec in rp.frames():
        if args.json:
            if args.frames:
                frames.append(rec)
        elif not args.summary:
            print(_frame_line(rec))
    result = {"file": str(args.file), "format": trace.format, **rp.stats.as_dict(), "bad_lines": trace.bad,
              "trace_problems": [str(p) for p in trace.errors[:20]]}
    if args.json:
        _print_json({"summary": result, "signals": rp.signals(), **({"frames": frames} if args.frames else {})})
        return EXIT_OK
    if args.map:
        for s in rp.signals():
            print(f"{s['name']:<32} {_fmt(s['value'], '.4g'):>10}  {s['quality']}")
    print(f"{result['frames']} frames: {result['decoded']} decoded, {result['unknown_id_frames']} unknown ID, "
          f"{result['decode_error_frames']} not decodable, {result['error_frames']} error frames, "
          f"{result['remote_frames']} remote frames, {result['bad_lines']} unreadable lines")
    for k in ("unknown_ids", "decode_errors"):
        if result[k]:
            print(f"  {k.replace('_', ' ')}: " + ", ".join(f"{i} x{n}" for i, n in result[k].items()))
    for problem in result["trace_problems"][:5]:  # where the file is damaged (a truncated BLF, bad lines)
        print(f"  {problem}")
    return EXIT_OK


def _first(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def cmd_alarms(args: argparse.Namespace) -> int:
    from gateway.control import request

    res = request(_socket(args), "alarms", {"recent": args.recent})
    if args.json:
        _print_json(res)
        return EXIT_OK
    c = res["contactors"]
    print(f"contactors {c['state']}" + (f"  causes: {_first(c['error_causes'])}" if c["error_causes"] else ""))
    print(f"active: {len(res['active'])}")
    for a in res["active"]:
        print(f"  {a['level']:<4} {a['check']:<34} element {a['element']}")
    print("recent events:")
    for e in res["recent"]:
        stamp = time.strftime("%H:%M:%S", time.localtime(e["time"])) + f".{int(e['time'] % 1 * 1000):03d}"
        state = "" if e["active"] else " (cleared)"
        print(f"  {stamp} {e['kind']:<9} {e['level']:<4} {e['message'] or e['name']}{state}")
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    from gateway.control import request

    res = request(_socket(args), "reset", {"clear_deep_discharge": args.clear_deep_discharge})
    print(json.dumps(res) if args.json else res["reason"])
    return EXIT_OK


def cmd_contactors(args: argparse.Namespace) -> int:
    from gateway.control import request

    res = request(_socket(args), "contactors", {"action": args.action})
    if args.json:
        _print_json(res)
        return EXIT_OK
    print(f"state {res['state']} for {res['since_s']:.1f} s   trips {res['trips']}   "
          f"precharge attempt {res['precharge_attempt']}")
    for name, cmd in res["commanded"].items():
        fb = res["feedback"].get(name)
        fb_text = "n/a" if fb is None else {0: "open", 1: "closed", 2: "WELDED", 3: "FAULT"}.get(int(fb), str(fb))
        print(f"  {name:<14} commanded {'closed' if cmd else 'open':<7} feedback {fb_text}")
    for cause in res["error_causes"]:
        print(f"  error cause: {cause}")
    if res["deep_discharge_latched"]:
        print(f"  deep discharge latched: {res['deep_discharge_latched']}")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from gateway import doctor
    from gateway.config import shipped_config

    path = Path(args.config) if args.config else Path("/etc/bmsgw/bmsgw.toml")
    if not path.exists() and not args.config:
        path = shipped_config()
    findings = doctor.run(path)
    if args.json:
        _print_json(doctor.as_json(findings))
    else:
        for f in findings:
            print(f"{f.status.upper():<4}  {f.check:<16} {f.detail}")
            if f.fix:
                print(f"      {'':<16} fix: {f.fix}")
    return EXIT_OK if all(f.status != "fail" for f in findings) else EXIT_FAIL


def render_top(st: dict[str, Any]) -> list[str]:
    """The lines of one `bmsgw top` screen."""
    p = st["pack"]
    cv = p["cell_voltage"]
    lines = [f"bmsgw {st['version']}  {st['gateway']}  up {st['uptime_s']:.0f} s  "
             f"{'healthy' if st.get('healthy') else 'UNHEALTHY'}  {time.strftime('%H:%M:%S')}", ""]
    lines.append(f"pack   {_fmt(p.get('voltage_v'), '8.2f')} V  {_fmt(p.get('current_a'), '8.2f')} A  "
                 f"{_fmt(p.get('power_w'), '8.0f')} W")
    lines.append(f"cells  min {_fmt(cv['min'])} V #{cv['min_index']}  max {_fmt(cv['max'])} V #{cv['max_index']}  "
                 f"spread {_fmt(cv.get('spread') and cv['spread'] * 1000, '.0f')} mV  not good {cv['not_good']}")
    t = p["temperature"]
    lines.append(f"temp   min {_fmt(t['min'], '.1f')} C  max {_fmt(t['max'], '.1f')} C  not good {t['not_good']}")
    prot = st.get("protection")
    if prot:
        c = prot["contactors"]
        lines.append(f"contactors {c['state']:<14} alarms {prot['active_alarms']:<4} trips {c['trips']}  "
                     f"derate {'yes' if prot['derate'] else 'no'}")
    lines += ["", f"{'bus':<10}{'state':<8}{'frames/s':>10}{'errors':>8}{'unknown':>9}"]
    for b in st["buses"]:
        lines.append(f"{b['name']:<10}{b['state']:<8}{b['frames_per_s']:>10.0f}{b['error_frames']:>8}"
                     f"{b['decode_errors']['unknown']:>9}")
    lines += ["", f"{'loop':<14}{'lane':<5}{'period':>9}{'p99 jitter':>12}{'overruns':>10}"]
    for lp in st["loops"]:
        lines.append(f"{lp['name']:<14}{lp['lane']:<5}{lp['period_ms']:>7.0f}ms{lp['jitter_p99_ms']:>10.2f}ms"
                     f"{lp['overruns']:>10}")
    return lines


def cmd_top(args: argparse.Namespace) -> int:
    from gateway.control import request

    tty = sys.stdout.isatty()
    n = 0
    try:
        if tty:
            sys.stdout.write("\x1b[?25l\x1b[2J")  # hide the cursor, clear once
        while True:
            lines = render_top(request(_socket(args), "status"))
            if tty:
                # redraw in place: home, each line cleared to its end, rest of screen cleared: no flicker
                sys.stdout.write("\x1b[H" + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
            else:
                sys.stdout.write("\n".join(lines) + "\n\n")
            sys.stdout.flush()
            n += 1
            if args.count and n >= args.count:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        if tty:
            sys.stdout.write("\x1b[?25h\n")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    hints = [
        ("follow the gateway's log", "journalctl -u bmsgw -f"),
        ("warnings and errors of the last hour", "journalctl -u bmsgw -p warning --since '1 hour ago'"),
        ("since the last start", "journalctl -u bmsgw -b -e"),
        ("why systemd restarted it", "systemctl status bmsgw; journalctl -u bmsgw | grep -i watchdog"),
        ("run in the foreground (not under systemd): the log goes to stderr", "bmsgw run --config FILE"),
    ]
    if args.json:
        _print_json([{"what": w, "command": c} for w, c in hints])
    else:
        for what, command in hints:
            print(f"{what}:\n    {command}")
    return EXIT_OK


def cmd_cloud_decode(args: argparse.Namespace) -> int:
    from cloudlink.batch import BatchError
    from cloudlink.cli import decode_file, format_batches

    try:
        items = decode_file(args.file, args.rows)
    except (BatchError, OSError) as exc:
        print(f"bmsgw: {args.file}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(items, indent=2, default=str) if args.json else format_batches(items))
    return EXIT_OK


def cmd_cloud_status(args: argparse.Namespace) -> int:
    from cloudlink.cli import format_status
    from gateway.control import request

    st = request(_socket(args), "cloud.status")
    print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
    return EXIT_OK


def cmd_opcua_hash(args: argparse.Namespace) -> int:
    from gateway.opcua_config import main as opcua_main

    return int(opcua_main(["hash-password", *(["--pbkdf2"] if args.pbkdf2 else [])]))


def cmd_balance(args: argparse.Namespace) -> int:
    from gateway.control import request

    sock = _socket(args)
    st = request(sock, "balance", {"action": args.action})
    while True:
        if args.json:
            print(json.dumps(st), flush=True)
        else:
            spread = "n/a" if st["spread_v"] is None else f"{st['spread_v'] * 1000:.0f} mV"
            elapsed = "" if st["elapsed_s"] is None else f"  running {st['elapsed_s']:.0f} s"
            print(f"balancing {st['status']}: spread {spread}, {st['bleeding']} cells bleeding{elapsed}"
                  + (f"  ({st['reason']})" if st["reason"] else ""), flush=True)
        if not args.follow or st["status"] in ("done", "timeout", "aborted", "idle"):
            return EXIT_OK
        time.sleep(args.interval)
        st = request(sock, "balance")


def _eis_target(args: argparse.Namespace) -> str | None:
    if args.cell is not None:
        return f"cell[{args.cell}]"
    if args.module is not None:
        return f"module[{args.module}]"
    return None


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else 0
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def cmd_eis_sweep(args: argparse.Namespace) -> int:
    """Queue a sweep and follow it to the end with a progress bar (a line per update without a TTY)."""
    from gateway.control import request

    sock = _socket(args)
    target = _eis_target(args)
    settings = {k: v for k, v in (("f_start_hz", args.f_start), ("f_stop_hz", args.f_stop),
                                  ("points_per_decade", args.points_per_decade)) if v is not None}
    queued = request(sock, "eis.sweep", {"target": target, "settings": settings})
    handle = queued["handle"]
    if not args.json:
        print(f"{target}: {queued['reason']}", flush=True)
    if args.no_wait:
        if args.json:
            print(json.dumps(queued))
        return EXIT_OK
    tty = sys.stdout.isatty() and not args.json
    last = ""
    while True:
        st = request(sock, "eis.status", {"handle": handle})
        outcome = st.get("outcome")
        if outcome is None and st.get("stage") is None:  # the daemon holds it nowhere: no outcome will come
            outcome = {"ok": False, "target": target, "reason": "ended without an outcome (the daemon no longer knows it)"}
        if outcome is not None:
            if tty:
                print()
            if args.json:
                print(json.dumps(outcome))
            else:
                print(f"{outcome['target']}: {outcome['reason']}")
            if not outcome["ok"]:
                return EXIT_FAIL
            if not args.json:
                print(f"bmsgw eis show --cell {args.cell}" if args.cell is not None else
                      f"bmsgw eis show --module {args.module}", "shows it")
            return EXIT_OK
        stage = st["stage"]
        if stage == "running":
            line = f"{target}: {st['phase']:<10} {_bar(st['points_received'], st['points_total'])}"
        elif stage in ("measured", "analysing"):
            line = f"{target}: measured, analysing (Kramers-Kronig, DRT, fit, SoT)"
        elif stage == "retry":
            line = f"{target}: waiting to try again (last failure: {st['last_failure']})"
        elif stage == "queued":
            wait = "waiting for a low, steady pack current" if not st["current_stable"] else "waiting"
            line = f"{target}: queued ({wait}; module {st['module_state'] or 'not heard yet'})"
        else:  # "failed": the outcome follows with the next status
            line = last
        if line != last:
            if args.json:
                print(json.dumps({"target": target, "phase": st["phase"], "points_received": st["points_received"],
                                  "points_total": st["points_total"]}), flush=True)
            elif tty:
                print("\r" + line.ljust(78), end="", flush=True)
            else:
                print(line, flush=True)
            last = line
        time.sleep(args.interval)


def cmd_eis_show(args: argparse.Namespace) -> int:
    """The last spectrum of a target: verdict, SoT, fit, points, and a Nyquist plot."""
    from gateway.control import request
    from gateway.nyquist import text_plot, write_png

    sock = _socket(args)
    target = _eis_target(args)
    if target is None and args.all:
        rows = request(sock, "eis.show", {"all": True})
        if args.json:
            _print_json(rows)
            return EXIT_OK
        print(f"{'target':<12} {'valid':<6} {'T sensor':>9} {'SoT':>7} {'SoC':>6} {'R0 mOhm':>9}  measured")
        for r in rows:
            r0 = r["fit"]["params"]["R0"] * 1e3 if r["fit"] else None
            print(f"{r['target']:<12} {'yes' if r['valid'] else 'NO':<6} {_fmt(r['temperature_c'], '.1f'):>9} "
                  f"{_fmt(r['sot_c'], '.1f'):>7} {_fmt(r['soc'] and r['soc'] * 100, '.1f'):>6} {_fmt(r0):>9}  "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['time'])) if r['time'] else '?'}")
        return EXIT_OK
    res = request(sock, "eis.show", {"target": target})
    sp = res["spectrum"]
    if args.png:
        try:
            write_png(args.png, sp["z_re_ohm"], sp["z_im_ohm"], res["fit_z_re"], res["fit_z_im"], title=res["target"])
        except OSError as exc:  # a path argument that cannot be written, as for the other file arguments
            print(f"bmsgw: {args.png}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_CONFIG
    if args.json:
        _print_json(res)
        return EXIT_OK
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(res["time"])) if res["time"] else "?"
    print(f"{res['target']}: measured {when}, {res['points']} points, "
          + ("valid (Kramers-Kronig)" if res["valid"] else f"INVALID: {res['kk_reason']} (no SoT, no fit)"))
    print(f"  at measurement: {_fmt(res['voltage_v'])} V, sensor {_fmt(res['temperature_c'], '.1f')} degC, "
          f"SoC {_fmt(res['soc'] and res['soc'] * 100, '.1f')} %")
    if res["sot_c"] is not None:
        m = res["mismatch"] or {}
        print(f"  SoT {_fmt(res['sot_c'], '.1f')} degC (+-{_fmt(res['sot_sigma_c'], '.1f')})"
              + (" extrapolated" if res["sot_extrapolated"] else "")
              + (f"  WARNING: {m['kind'].replace('_', ' ')} by {m['delta_c']:+.1f} degC" if m.get("warning") else ""))
    if res["fit"]:
        _print_fit(res["fit"])
    print()
    print(f"  {'f Hz':>10} {'Re mOhm':>10} {'-Im mOhm':>10} {'|Z| mOhm':>10} {'phase':>8}")
    for f, re, im, ab, ph in zip(sp["frequency_hz"], sp["z_re_ohm"], sp["z_im_ohm"], sp["abs_ohm"], sp["phase_deg"],
                                 strict=True):
        print(f"  {f:>10.4g} {re * 1e3:>10.4f} {-im * 1e3:>10.4f} {ab * 1e3:>10.4f} {ph:>8.2f}")
    print()
    print("\n".join(text_plot(sp["z_re_ohm"], sp["z_im_ohm"], res["fit_z_re"], res["fit_z_im"])))
    if args.png:
        print(f"\nNyquist plot written to {args.png}")
    return EXIT_OK


def _print_fit(fit: dict[str, Any]) -> None:
    """The ECM parameters, each with the 1-sigma uncertainty its spectrum leaves."""
    sd = fit.get("rel_sd") or {}
    print(f"  fit (rms {_fmt(fit['rel_rms'] * 100, '.2f')} %):")
    for k, v in fit["params"].items():
        if k[0] not in "RC" or v is None:
            continue
        value = f"{v * 1e3:.4g} mOhm" if k[0] == "R" else f"{v:.4g} F"
        u = sd.get(k)
        print(f"    {k:<3} {value:>14}  " + ("+-?" if u is None else f"+-{u * 100:.1f} %"))


def cmd_eis_status(args: argparse.Namespace) -> int:
    from gateway.control import request

    st = request(_socket(args), "eis.status")
    if args.json:
        _print_json(st)
        return EXIT_OK
    running = f"{st['target']} {_bar(st['points_received'], st['points_total'])}" if st["target"] else "nothing"
    print(f"EIS: {st['phase']}, measuring {running}; module {st['module_state'] or 'not heard yet'}"
          f" (error {st['module_error']}); queued: {', '.join(st['queued']) or 'none'}")
    print(f"  pack current steady: {'yes' if st['current_stable'] else 'no'}; analysed {st['analysed']}, invalid "
          f"{st['invalid']}, SoT mismatches {st['sot_mismatches']}; SoT calibration: {st['sot_calibration'] or 'none'}")
    if st["last_failure"]:
        print(f"  last failure: {st['last_failure']}")
    return EXIT_OK


def cmd_eis_cancel(args: argparse.Namespace) -> int:
    from gateway.control import request

    res = request(_socket(args), "eis.cancel")
    if args.json:
        _print_json(res)
        return EXIT_OK
    print("cancelled" if res["cancelled"] else "nothing to cancel")
    return EXIT_OK


def cmd_sim_fault(args: argparse.Namespace) -> int:
    from gateway.control import request

    result = request(_socket(args), "sim.fault", {"fault": args.fault, "target": args.target, "value": args.value})
    if args.json:
        _print_json({"fault": args.fault, "target": args.target, "value": args.value, "result": result})
        return EXIT_OK
    print(result)
    return EXIT_OK


def cmd_sim_serve(args: argparse.Namespace) -> int:
    from drivers.sim_serve import serve

    return serve(args.port, args.config, args.host)


# -- parser ----------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="bmsgw", description="Edge gateway for stationary batteries.",
                                  epilog="Exit codes: 0 ok, 1 failure, 2 bad config/arguments, "
                                         "3 daemon not running, 4 request refused.")
    top.add_argument("--version", action="version", version=f"bmsgw {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, daemon: bool = False,
            json_flag: bool = True, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if daemon:
            p.add_argument("--socket", help="control socket (default: from --config, $BMSGW_SOCKET or per-user)")
            p.add_argument("--config", help="config file whose control socket to use")
        return p

    p = add("run", cmd_run, "run the gateway daemon", json_flag=False)
    p.add_argument("--config", help="config file (TOML)")
    p.add_argument("--sim", action="store_true", help="run the built-in simulated battery (shipped config if no --config)")

    cfg = sub.add_parser("config", help="configuration tools").add_subparsers(dest="sub", required=True, metavar="SUB")
    p = add("check", cmd_config_check, "validate a config and print it resolved", parent=cfg)
    p.add_argument("file")

    add("status", cmd_status, "pack, buses, loops and uptime of the running gateway", daemon=True)
    p = add("signals", cmd_signals, "live signals of the process image", daemon=True)
    p.add_argument("glob", nargs="?", default="*", help="shell-style pattern, e.g. 'cell[1*].voltage' or 'pack.*'")
    p = add("candump", cmd_candump, "live frames from the running gateway", daemon=True)
    p.add_argument("--decode", action="store_true", help="decode with the bus's DBC")
    p.add_argument("--bus", help="only this bus")
    p.add_argument("--count", type=int, default=0, help="stop after N frames")

    p = add("alarms", cmd_alarms, "active alarms and recent protection events", daemon=True)
    p.add_argument("--recent", type=int, default=30, help="how many recent events")
    p = add("reset", cmd_reset, "request leaving ERROR (refused while a cause remains)", daemon=True)
    p.add_argument("--clear-deep-discharge", action="store_true",
                   help="also clear a latched deep discharge (only after checking the cells)")
    p = add("contactors", cmd_contactors, "contactor state; request open or close", daemon=True)
    p.add_argument("action", nargs="?", choices=["open", "close"])
    p = add("balance", cmd_balance, "request or cancel cell balancing, and see its progress", daemon=True)
    p.add_argument("action", nargs="?", choices=["start", "stop"])
    p.add_argument("--follow", action="store_true", help="print the progress until the run ends")
    p.add_argument("--interval", type=_interval, default=2.0, help="seconds between progress lines")
    p = add("doctor", cmd_doctor, "check config, CAN interfaces, daemon, disk and clock, and say what to fix")
    p.add_argument("--config", help="config file (default /etc/bmsgw/bmsgw.toml, else the shipped sim config)")
    p = add("top", cmd_top, "live full-screen view (plain snapshots without a terminal)", daemon=True,
            json_flag=False)
    p.add_argument("--interval", type=_interval, default=1.0, help="seconds between refreshes")
    p.add_argument("--count", type=int, default=0, help="stop after N screens")
    add("logs", cmd_logs, "where the logs are and how to read them")
    p = add("replay", cmd_replay, "decode a recorded trace (candump -L, ASC, BLF, CSV, TRC, printed python-can)")
    p.add_argument("file")
    p.add_argument("--dbc", action="append", required=True, help="DBC file (repeatable)")
    p.add_argument("--map", help="signal map: also show the resulting process image")
    p.add_argument("--format", help="force the trace format (candump, printed, asc, blf, csv, trc)")
    p.add_argument("--summary", action="store_true", help="only the summary, not every frame")
    p.add_argument("--frames", action="store_true", help="with --json: include every frame")

    cloud = sub.add_parser("cloud", help="the cloud link").add_subparsers(dest="sub", required=True, metavar="SUB")
    p = add("decode", cmd_cloud_decode, "print a batch payload file or a gateway's buffer (cloud.db)", parent=cloud)
    p.add_argument("file")
    p.add_argument("--rows", type=int, default=5, help="rows to show per stream")
    add("status", cmd_cloud_status, "connection, buffer, oldest unsent, drain estimate, losses", daemon=True,
        parent=cloud)
    opcua = sub.add_parser("opcua", help="the OPC UA server").add_subparsers(dest="sub", required=True, metavar="SUB")
    p = add("hash-password", cmd_opcua_hash, "hash a password for [[opcua.user]] (reads it from the terminal)",
            json_flag=False, parent=opcua)
    p.add_argument("--pbkdf2", action="store_true", help="PBKDF2-SHA256 instead of scrypt")
    eis = sub.add_parser("eis", help="impedance spectroscopy (EIS) sweeps and results").add_subparsers(
        dest="sub", required=True, metavar="SUB")
    for name, fn, text in (("sweep", cmd_eis_sweep, "measure a cell or module now, with a progress bar"),
                           ("show", cmd_eis_show, "the last spectrum of a cell or module: table, SoT, fit, Nyquist plot")):
        p = add(name, fn, text, daemon=True, parent=eis)
        which = p.add_mutually_exclusive_group(required=name == "sweep")
        which.add_argument("--cell", type=int, help="cell index over the whole string")
        which.add_argument("--module", type=int, help="module index")
        if name == "sweep":
            p.add_argument("--no-wait", action="store_true", help="queue it and return")
            p.add_argument("--f-start", type=float, metavar="HZ", help="first (highest) frequency (default: the config's)")
            p.add_argument("--f-stop", type=float, metavar="HZ", help="last (lowest) frequency")
            p.add_argument("--points-per-decade", type=int, metavar="N")
            p.add_argument("--interval", type=_interval, default=0.5, help="seconds between progress updates")
        else:
            which.add_argument("--all", action="store_true", help="one line per target measured so far")
            p.add_argument("--png", metavar="FILE", help="also write the Nyquist plot as a PNG file")
    add("status", cmd_eis_status, "the module, the running sweep, the queue", daemon=True, parent=eis)
    add("cancel", cmd_eis_cancel, "abort the running sweep and drop the queue", daemon=True, parent=eis)
    sim = sub.add_parser("sim", help="the simulated battery").add_subparsers(dest="sub", required=True, metavar="SUB")
    p = add("fault", cmd_sim_fault, "inject a fault into the running simulator", daemon=True, parent=sim)
    p.add_argument("fault", help="cell_drift, heating, current_offset, stuck, silent, welded, precharge_open, "
                                 "stall_lane or clear")
    p.add_argument("--target", type=int, default=0, help="cell, module or contactor index")
    p.add_argument("--value", type=float, default=0.0, help="mV/s, W or A depending on the fault")
    p = add("serve", cmd_sim_serve, "serve the simulated pack as SLCAN over loopback TCP", json_flag=False, parent=sim)
    p.add_argument("--port", type=int, default=0, help="TCP port (0: any free port, printed on start)")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    p.add_argument("--config", help="config with the [site] and [sim] sections (default: the shipped sim config)")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bmsgw` command."""
    from gateway.control import ConnectionLost, ControlError, NotRunning
    from gateway.tracefile import TraceError

    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        print(f"bmsgw: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TraceError as exc:
        print(f"bmsgw: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NotRunning as exc:
        print(f"bmsgw: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        print(f"bmsgw: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ConnectionLost as exc:
        print(f"bmsgw: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:
        # our reader went away (`bmsgw replay ... | head`): not an error; silence the final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
