"""Plain functions behind ``bmsgw cloud decode FILE`` and ``bmsgw cloud status`` (the CLI wires them)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from cloudlink.batch import BatchError, decode, describe

SQLITE_MAGIC = b"SQLite format 3\x00"


def decode_file(path: str | Path, max_rows: int = 5) -> list[dict[str, Any]]:
    """Decode a payload file (bytes as received from MQTT), or every batch of a gateway's buffer file.

    Raises BatchError (a payload that is not a valid batch) or OSError (unreadable file).
    """
    p = Path(path)
    with p.open("rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head == SQLITE_MAGIC:
        return _decode_store(p, max_rows)
    return [describe(decode(p.read_bytes()), max_rows)]


def _decode_store(p: Path, max_rows: int) -> list[dict[str, Any]]:
    try:
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        rows = con.execute("SELECT id, payload FROM batches ORDER BY id").fetchall()
        con.close()
    except sqlite3.Error as exc:
        raise BatchError(f"{p}: not a readable cloud buffer ({exc})") from None
    out = []
    for rid, payload in rows:
        try:
            d = describe(decode(bytes(payload)), max_rows)
        except BatchError as exc:
            d = {"error": str(exc)}
        d["row"] = rid
        out.append(d)
    return out


def format_batches(items: list[dict[str, Any]]) -> str:
    """Text for ``bmsgw cloud decode`` without --json."""
    lines = []
    for d in items:
        if "error" in d:
            lines.append(f"row {d.get('row')}: INVALID: {d['error']}")
            continue
        span = (d["t1_ms"] - d["t0_ms"]) / 1000.0
        head = (f"{d['gateway']} boot {d['boot']} {d['stream']}#{d['seq']} {d['kind']}: {d['samples']} samples, "
                f"{d['bytes']} bytes, {_ts(d['t0_ms'])} +{span:.1f} s")
        lines.append((f"row {d['row']}: " if "row" in d else "") + head)
        if "signals" in d and "rows" in d:
            names = d["signals"]
            lines.append(f"  {len(names)} signals ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}), "
                         f"{d['rows']} rows at {d.get('rate_hz', 0):g} Hz, {d.get('not_good', 0)} values not good")
            for r in d.get("first_rows", []):
                vals = " ".join("-" if v is None else f"{v:g}" for v in r["values"][:8])
                lines.append(f"  {_ts(r['t_ms'])}  {vals}{' ...' if len(r['values']) > 8 else ''}")
        elif "windows" in d:
            lines.append(f"  thinned: {d['windows']} windows of {d['window_ms']} ms from {d['orig_samples']} samples")
        elif "frames" in d:
            lines.append(f"  flight record of trip event {d['trip_event']} on {d['bus']}: {d['frames']} frames")
        else:
            for rec in d.get("records", [])[:10]:
                lines.append(f"  {rec}")
    return "\n".join(lines)


def format_status(st: dict[str, Any]) -> str:
    """Text for ``bmsgw cloud status`` without --json (``st`` is CloudLink.status())."""
    c = st["connection"]
    b = st["buffer"]
    lines = [f"cloud link of {st['gateway']} (site {st['site']}, boot {st['boot']})",
             f"  broker      {c['broker']} {c['state']}" + (f" (MQTT {c['protocol']}, session {c['session']}, "
                                                            f"since {_ts(c['since'] * 1000)})"
                                                            if c["state"] == "connected" and c.get("since") else "")]
    if c.get("last_error"):
        lines.append(f"  last error  {c['last_error']} ({_ago(c.get('last_error_at'))})")
    rows = ", ".join(f"{k} {n} rows/{_size(b['bytes'].get(k, 0))}" for k, n in sorted(b["rows"].items()) if n)
    lines.append(f"  buffer      {_size(b['total_bytes'])} of {_size(b['quota_bytes'])}"
                 + (f": {rows}" if rows else " (empty)") + (" [IN MEMORY ONLY]" if b.get("memory_only") else ""))
    if b.get("oldest_unsent_age_s") is not None:
        lines.append(f"  oldest      {b['oldest_unsent_age_s']:.1f} s unsent")
    drain = st.get("drain_estimate_s")
    lines.append("  drain       " + (f"~{drain:.0f} s" if drain is not None else "unknown (not connected or no acks yet)"))
    lines.append(f"  last ack    {_ago(st.get('last_ack'))}")
    if st["losses"]:
        for reason, v in sorted(st["losses"].items()):
            lines.append(f"  lost        {reason}: {v['samples']} samples in {v['batches']} batches")
    else:
        lines.append("  lost        nothing")
    rec = b.get("recovery") or {}
    if rec.get("state") in ("recovered", "memory"):
        lines.append(f"  store       {rec['state']}: {rec.get('detail', '')}")
    for w in st.get("warnings", []):
        lines.append(f"  warning     {w}")
    return "\n".join(lines)


def _ts(ms: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000.0)) + f".{int(ms) % 1000:03d}"


def _ago(t: float | None) -> str:
    return "never" if not t else f"{time.time() - t:.1f} s ago"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
