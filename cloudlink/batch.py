"""The cloud batch format: one self-describing msgpack envelope per MQTT message.

Every message the gateway publishes for data is an *envelope* (a msgpack map)
that names the gateway, the boot, the stream and a 64-bit sequence number per
(boot, stream), carries a SHA-256 of its body, and holds the body compressed
with zlib.  Telemetry bodies are columnar: one timestamp column (milliseconds,
delta-encoded) and a matrix of values in which every column is stored as
integers at the sensor's resolution whenever that reproduces the float64
value bit for bit (``dec``: value = k / 10**d; ``lin``: value = k * s + o, the
DBC's own arithmetic), delta-encoded along time, zigzag-mapped and split into
byte planes before compression.  Columns that no integer form reproduces are
kept as float64 bits (``f64``), so decoding never changes a value.

docs/cloud-format.md specifies the bytes precisely; :func:`decode` is the
reference decoder for the cloud side.

Why zlib and not lzma: on the reference site's data zlib at level 9 is within
a few percent of LZMA (and smaller for short batches, whose xz headers cost
60 bytes), compresses several times faster on a Raspberry-Pi-class CPU, needs
about 256 KiB of memory where LZMA's default preset needs about 94 MiB, and
every language has it.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

FORMAT_VERSION = 1
CODEC = "zlib"
ZLIB_LEVEL = 9
MAX_DECIMALS = 6  # dec encoding tries 10**0 .. 10**6
MAX_BODY_BYTES = 64 * 1024 * 1024  # decompression bound for the decoder (a bomb is refused)
EXACT_LIMIT = float(2**53)  # integers beyond this are not exact in float64

# stream priority: 0 is never dropped before any telemetry (events, trips, flight records, EIS, gaps)
PRIO_KEEP = 0
PRIO_TELEMETRY = 1

KIND_TELEMETRY = "telemetry"
KIND_THINNED = "thinned"
KIND_EVENTS = "events"
KIND_FLIGHT = "flight"
KIND_EIS = "eis"
KIND_GAP = "gap"
KIND_RECORDS = "records"
KINDS = (KIND_TELEMETRY, KIND_THINNED, KIND_EVENTS, KIND_FLIGHT, KIND_EIS, KIND_GAP, KIND_RECORDS)

# quality codes as in gateway.image.Quality; bit 2 of a flag byte marks a missing (NaN) value
Q_GOOD, Q_STALE, Q_INVALID = 0, 1, 2
FLAG_NAN = 4

# the first bytes after the map header of every envelope (used to carve envelopes out of a broken file)
ENVELOPE_SIGNATURE = b"\xa1v\x01\xa2gw"

Chain = tuple[tuple[float, float], ...]  # value = ((k * s1 + o1) * s2 + o2) ...


class BatchError(ValueError):
    """A payload that is not a valid batch (wrong version, hash mismatch, malformed)."""


# -- integer arrays: zigzag + byte planes ------------------------------------------------------


def pack_ints(a: npt.NDArray[np.int64]) -> list[Any]:
    """[width, planes]: zigzag-mapped little-endian integers of the smallest width, split into byte planes."""
    a = np.asarray(a, dtype=np.int64).ravel()
    z = ((a << 1) ^ (a >> 63)).view(np.uint64)
    top = int(z.max()) if z.size else 0
    w = 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4 if top < 1 << 32 else 8
    return [w, _planes(z, w)]


def unpack_ints(packed: Sequence[Any], n: int) -> npt.NDArray[np.int64]:
    """Inverse of :func:`pack_ints` for ``n`` elements."""
    w, data = int(packed[0]), packed[1]
    z = _unplanes(data, w, n)
    return ((z >> np.uint64(1)) ^ (np.uint64(0) - (z & np.uint64(1)))).view(np.int64)


def _planes(z: npt.NDArray[np.uint64], w: int) -> bytes:
    if w not in (1, 2, 4, 8):
        raise ValueError(f"width {w}")
    b = z.astype(f"<u{w}").view(np.uint8).reshape(-1, w)
    return b.T.tobytes()


def _unplanes(data: bytes, w: int, n: int) -> npt.NDArray[np.uint64]:
    if w not in (1, 2, 4, 8) or len(data) != w * n:
        raise BatchError(f"integer array of {len(data)} bytes does not hold {n} elements of width {w}")
    b = np.frombuffer(data, dtype=np.uint8).reshape(w, n).T.copy()
    return b.view(f"<u{w}").ravel().astype(np.uint64)


# -- column lists and signal names ---------------------------------------------------------------

_LAST_INDEX = re.compile(r"\[(\d+)\](?!.*\[\d+\])")


def runs(cols: Sequence[int]) -> list[list[int]]:
    """Ascending column numbers as [first, count] runs of consecutive numbers."""
    out: list[list[int]] = []
    for c in cols:
        c = int(c)
        if out and c == out[-1][0] + out[-1][1]:
            out[-1][1] += 1
        else:
            out.append([c, 1])
    return out


def unruns(packed: Sequence[Sequence[int]]) -> list[int]:
    out: list[int] = []
    for first, count in packed:
        if count < 0 or count > 1 << 24:
            raise BatchError("bad column run")
        out.extend(range(int(first), int(first) + int(count)))
    return out


def pack_names(names: Sequence[str]) -> list[Any]:
    """Signal names, runs compressed: ``[template, first, count]`` stands for template % first .. first+count-1.

    The template has its last index replaced by ``{}`` (``cell[{}].voltage``); a name without an
    index, or one that does not continue a run, is a plain string.
    """
    out: list[Any] = []
    for name in names:
        m = _LAST_INDEX.search(name)
        if m is None or "{" in name or "}" in name:
            out.append(name)
            continue
        tpl = name[:m.start(1)] + "{}" + name[m.end(1):]
        idx = int(m.group(1))
        last = out[-1] if out else None
        if isinstance(last, list) and last[0] == tpl and last[1] + last[2] == idx:
            last[2] += 1
        else:
            out.append([tpl, idx, 1])
    return [x[0].replace("{}", str(x[1])) if isinstance(x, list) and x[2] == 1 else x for x in out]


def unpack_names(packed: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for x in packed:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, list | tuple) and len(x) == 3 and isinstance(x[0], str) and x[0].count("{}") == 1:
            first, count = int(x[1]), int(x[2])
            if count < 0 or count > 1 << 24:
                raise BatchError("bad signal name run")
            out.extend(x[0].replace("{}", str(first + i)) for i in range(count))
        else:
            raise BatchError(f"bad signal name entry {x!r}")
    return out


# -- value matrices ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """How one column becomes integers: dec (k / 10**d), lin (a chain of k * s + o) or f64 bits."""

    enc: str
    d: int = 0
    chain: Chain = ()

    def key(self) -> tuple[Any, ...]:
        return (self.enc, self.d, self.chain)


def forward(k: npt.NDArray[np.float64], chain: Chain) -> npt.NDArray[np.float64]:
    """Apply a lin chain (two roundings per step, never a fused multiply-add)."""
    x = k
    for s, o in chain:
        x = x * s
        x = x + o
    return x


def _ffill(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """NaN replaced by the column's previous value (leading NaN by 0): deltas stay zero there."""
    nan = np.isnan(v)
    if not nan.any():
        return v
    rows = v.shape[0]
    idx = np.where(nan, 0, np.arange(rows)[:, None])
    np.maximum.accumulate(idx, axis=0, out=idx)
    filled = np.take_along_axis(v, idx, axis=0)
    return np.where(np.isnan(filled), 0.0, filled)


def choose_specs(v: npt.NDArray[np.float64], hints: Sequence[Chain | None] = ()) -> list[Spec]:
    """The most compact exact encoding of each column of ``v`` (NaN already filled)."""
    rows, cols = v.shape
    specs: list[Spec | None] = [None] * cols
    with np.errstate(all="ignore"):
        finite = np.asarray(np.isfinite(v).all(axis=0), dtype=bool) if rows else np.ones(cols, dtype=bool)
        # the DBC's own arithmetic first: a binary scale (0.0625 degC) then costs one step per count
        by_chain: dict[Chain, list[int]] = {}
        for c in range(min(cols, len(hints))):
            chain = hints[c]
            if chain and finite[c]:
                by_chain.setdefault(chain, []).append(c)
        for chain, members in by_chain.items():
            sub = v[:, members]
            k = _invert(sub, chain)
            exact = (np.abs(k) < EXACT_LIMIT).all(axis=0) & _same_bits(forward(k, chain), sub).all(axis=0)
            for c, good in zip(members, np.atleast_1d(exact).tolist(), strict=True):
                if good:
                    specs[c] = Spec("lin", 0, chain)
        todo = np.array([s is None for s in specs], dtype=bool) & finite
        for d in range(MAX_DECIMALS + 1):
            if not todo.any():
                break
            sub = v[:, todo]
            scale = 10.0**d
            k = np.rint(sub * scale) + 0.0  # as the decoder sees it: an integer, so never -0.0
            ok = (np.abs(k) < EXACT_LIMIT).all(axis=0) & _same_bits(k / scale, sub).all(axis=0)
            for c in np.flatnonzero(todo)[ok]:
                specs[c] = Spec("dec", d)
            todo[np.flatnonzero(todo)[ok]] = False
        # a DBC scale of 10**-d without offset (k * 0.001 is not k / 1000 in float64)
        for d in range(1, MAX_DECIMALS + 1):
            if not todo.any():
                break
            chain = ((float(f"1e-{d}"), 0.0),)
            sub = v[:, todo]
            k = _invert(sub, chain)
            ok = (np.abs(k) < EXACT_LIMIT).all(axis=0) & _same_bits(forward(k, chain), sub).all(axis=0)
            for c in np.flatnonzero(todo)[ok]:
                specs[c] = Spec("lin", 0, chain)
            todo[np.flatnonzero(todo)[ok]] = False
    return [s if s is not None else Spec("f64") for s in specs]


def _invert(col: npt.NDArray[np.float64], chain: Chain) -> npt.NDArray[np.float64]:
    y = col
    for s, o in reversed(chain):
        y = (y - o) / s
    return np.rint(y) + 0.0  # an integer has no sign of zero (the decoder starts from +0.0)


def _same_bits(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Element-wise equality of float64 bit patterns: -0.0 is not 0.0 (the format promises bit for bit)."""
    return np.asarray(np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)
                      == np.ascontiguousarray(b, dtype=np.float64).view(np.uint64))


def encode_matrix(values: npt.NDArray[np.float64], flags: npt.NDArray[np.uint8] | None,
                  hints: Sequence[Chain | None] = ()) -> dict[str, Any]:
    """A (rows, cols) float64 matrix as column groups of delta-encoded integers (lossless)."""
    v = np.asarray(values, dtype=np.float64)
    rows, cols = v.shape
    nan = np.isnan(v)
    f = np.zeros((rows, cols), dtype=np.uint8) if flags is None else np.asarray(flags, dtype=np.uint8).copy()
    f[nan] |= FLAG_NAN
    filled = _ffill(v)
    specs = choose_specs(filled, hints)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for c, s in enumerate(specs):
        groups.setdefault(s.key(), []).append(c)
    out_groups = []
    for key, members in groups.items():
        spec = Spec(*key)
        sub = filled[:, members]
        g: dict[str, Any] = {"cols": runs(members), "enc": spec.enc}
        if spec.enc == "f64":
            bits = np.ascontiguousarray(sub).view(np.uint64)
            x = bits.copy()
            x[1:] ^= bits[:-1]
            g["w"] = 8
            g["data"] = _planes(np.ascontiguousarray(x.T).ravel(), 8)
        else:
            if spec.enc == "dec":
                g["d"] = spec.d
                k = np.rint(sub * 10.0**spec.d).astype(np.int64)
            else:
                g["chain"] = [list(p) for p in spec.chain]
                k = _invert(sub, spec.chain).astype(np.int64)
            g["k0"] = pack_ints(k[0] if rows else np.zeros(0, dtype=np.int64))
            dk = np.diff(k, axis=0)
            w, data = pack_ints(np.ascontiguousarray(dk.T).ravel())
            g["w"] = w
            g["data"] = data
        out_groups.append(g)
    m: dict[str, Any] = {"groups": out_groups}
    if f.any():
        m["flags"] = np.ascontiguousarray(f.T).tobytes()
    return m


def decode_matrix(m: Mapping[str, Any], rows: int, cols: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
    """Inverse of :func:`encode_matrix`: values (NaN where missing) and flag bytes."""
    v = np.full((rows, cols), np.nan)
    seen = np.zeros(cols, dtype=bool)
    for g in m["groups"]:
        members = np.asarray(unruns(g["cols"]), dtype=np.intp)
        if members.size and (members.min() < 0 or members.max() >= cols or seen[members].any()):
            raise BatchError("column groups overlap or point outside the matrix")
        seen[members] = True
        n = len(members)
        if g["enc"] == "f64":
            x = _unplanes(g["data"], 8, n * rows).reshape(n, rows).T.copy()
            np.bitwise_xor.accumulate(x, axis=0, out=x)
            v[:, members] = x.view(np.float64)
            continue
        k0 = unpack_ints(g["k0"], n if rows else 0)
        dk = unpack_ints([g["w"], g["data"]], n * max(rows - 1, 0)).reshape(n, max(rows - 1, 0)).T
        if rows:
            k = np.cumsum(np.vstack([k0[None, :], dk]), axis=0)
            kf = k.astype(np.float64)
            if g["enc"] == "dec":
                v[:, members] = kf / 10.0 ** int(g["d"])
            elif g["enc"] == "lin":
                v[:, members] = forward(kf, tuple((float(s), float(o)) for s, o in g["chain"]))
            else:
                raise BatchError(f"unknown column encoding {g['enc']!r}")
    if not seen.all():
        raise BatchError("some columns are in no group")
    flags = np.zeros((rows, cols), dtype=np.uint8)
    if "flags" in m:
        raw = m["flags"]
        if len(raw) != rows * cols:
            raise BatchError("flag matrix has the wrong size")
        flags = np.frombuffer(raw, dtype=np.uint8).reshape(cols, rows).T.copy()
    v[(flags & FLAG_NAN) != 0] = np.nan
    return v, flags


# -- content types -----------------------------------------------------------------------------


@dataclass
class Telemetry:
    """Samples of one signal class: one row per sampling instant, one column per signal."""

    signals: list[str]
    t_ms: npt.NDArray[np.int64]  # wall clock, ms since the Unix epoch, one per row
    values: npt.NDArray[np.float64]  # (rows, cols); NaN: no value
    quality: npt.NDArray[np.int8]  # (rows, cols): 0 good, 1 stale, 2 invalid
    rate_hz: float = 0.0

    @property
    def samples(self) -> int:
        return int(self.values.size)

    def rows(self, sl: slice) -> Telemetry:
        return Telemetry(self.signals, self.t_ms[sl], self.values[sl], self.quality[sl], self.rate_hz)

    def columns(self, idx: Sequence[int]) -> Telemetry:
        ii = list(idx)
        return Telemetry([self.signals[i] for i in ii], self.t_ms, self.values[:, ii], self.quality[:, ii],
                         self.rate_hz)


@dataclass
class Thinned:
    """Telemetry reduced under storage pressure: per window and signal the min, max and mean of good samples."""

    signals: list[str]
    t_ms: npt.NDArray[np.int64]  # window starts
    window_ms: int
    count: npt.NDArray[np.int64]  # (windows, cols): good samples that went into min/max/mean
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    mean: npt.NDArray[np.float64]  # rounded to 4 decimals
    quality: npt.NDArray[np.int8]  # worst quality seen in the window
    orig_rows: int
    orig_samples: int


@dataclass
class Flight:
    """Raw CAN frames around a trip (gateway.events.FlightRecord as columns)."""

    trip_event: int
    bus: str
    before_s: float
    after_s: float
    timestamp: npt.NDArray[np.float64]
    frame_id: npt.NDArray[np.uint32]
    length: npt.NDArray[np.uint8]
    data: npt.NDArray[np.uint8]  # (frames, width)


@dataclass
class Batch:
    """A decoded envelope with its content (one of telemetry, thinned, flight or records)."""

    version: int
    gateway: str
    boot: str
    stream: str
    seq: int
    kind: str
    t0_ms: int
    t1_ms: int
    samples: int
    created_ms: int
    hash: bytes
    size: int
    telemetry: Telemetry | None = None
    thinned: Thinned | None = None
    flight: Flight | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Sealed:
    """An encoded envelope, ready to store and publish."""

    stream: str
    seq: int
    kind: str
    prio: int
    t0_ms: int
    t1_ms: int
    samples: int
    payload: bytes
    boot: str


# -- bodies ------------------------------------------------------------------------------------


def telemetry_body(tel: Telemetry, hints: Sequence[Chain | None] = ()) -> dict[str, Any]:
    rows = len(tel.t_ms)
    t = np.asarray(tel.t_ms, dtype=np.int64)
    return {"signals": pack_names(tel.signals), "rows": rows, "rate": float(tel.rate_hz),
            "t0": int(t[0]) if rows else 0, "dt": pack_ints(np.diff(t)),
            "m": encode_matrix(tel.values, np.asarray(tel.quality, dtype=np.uint8) & np.uint8(3), hints)}


def _parse_telemetry(body: Mapping[str, Any]) -> Telemetry:
    signals = unpack_names(body["signals"])
    rows = int(body["rows"])
    t = np.cumsum(np.concatenate([[int(body["t0"])], unpack_ints(body["dt"], max(rows - 1, 0))])).astype(np.int64) \
        if rows else np.zeros(0, dtype=np.int64)
    v, f = decode_matrix(body["m"], rows, len(signals))
    return Telemetry(signals, t, v, (f & 3).astype(np.int8), float(body.get("rate", 0.0)))


def thin(tel: Telemetry, window_ms: int) -> Thinned:
    """Min/max/mean of the good samples per window (what survives storage pressure)."""
    t = tel.t_ms
    rows, cols = tel.values.shape
    if rows == 0:
        z = np.zeros((0, cols))
        return Thinned(tel.signals, t.copy(), window_ms, z.astype(np.int64), z, z, z, z.astype(np.int8), 0, 0)
    start = int(t[0])
    win = ((t - start) // max(1, window_ms)).astype(np.int64)
    uniq, inv = np.unique(win, return_inverse=True)
    nwin = len(uniq)
    good = (tel.quality == Q_GOOD) & ~np.isnan(tel.values)
    v = np.where(good, tel.values, np.nan)
    mn = np.full((nwin, cols), np.nan)
    mx = np.full((nwin, cols), np.nan)
    mean = np.full((nwin, cols), np.nan)
    count = np.zeros((nwin, cols), dtype=np.int64)
    worst = np.zeros((nwin, cols), dtype=np.int8)
    with np.errstate(all="ignore"):
        for w in range(nwin):
            sel = inv == w
            block = v[sel]
            count[w] = good[sel].sum(axis=0)
            has = count[w] > 0
            if has.any():
                mn[w, has] = np.nanmin(block[:, has], axis=0)
                mx[w, has] = np.nanmax(block[:, has], axis=0)
                mean[w, has] = np.round(np.nanmean(block[:, has], axis=0), 4)
            worst[w] = tel.quality[sel].max(axis=0)
    return Thinned(tel.signals, start + uniq * window_ms, window_ms, count, mn, mx, mean, worst, rows, tel.samples)


def thinned_body(th: Thinned, hints: Sequence[Chain | None] = ()) -> dict[str, Any]:
    q = np.asarray(th.quality, dtype=np.uint8) & np.uint8(3)
    return {"signals": pack_names(th.signals), "rows": len(th.t_ms), "window_ms": int(th.window_ms),
            "t0": int(th.t_ms[0]) if len(th.t_ms) else 0, "dt": pack_ints(np.diff(th.t_ms)),
            "count": pack_ints(np.ascontiguousarray(th.count.T).ravel()),
            "min": encode_matrix(th.min, q, hints), "max": encode_matrix(th.max, None, hints),
            "mean": encode_matrix(th.mean, None), "orig_rows": th.orig_rows, "orig_samples": th.orig_samples}


def _parse_thinned(body: Mapping[str, Any]) -> Thinned:
    signals = unpack_names(body["signals"])
    rows, cols = int(body["rows"]), len(signals)
    t = np.cumsum(np.concatenate([[int(body["t0"])], unpack_ints(body["dt"], max(rows - 1, 0))])).astype(np.int64) \
        if rows else np.zeros(0, dtype=np.int64)
    mn, f = decode_matrix(body["min"], rows, cols)
    mx, _ = decode_matrix(body["max"], rows, cols)
    mean, _ = decode_matrix(body["mean"], rows, cols)
    count = unpack_ints(body["count"], rows * cols).reshape(cols, rows).T.copy()
    return Thinned(signals, t, int(body["window_ms"]), count, mn, mx, mean, (f & 3).astype(np.int8),
                   int(body["orig_rows"]), int(body["orig_samples"]))


def flight_body(fl: Flight) -> dict[str, Any]:
    ts = np.ascontiguousarray(fl.timestamp, dtype=np.float64)
    bits = ts.view(np.uint64).copy()
    bits[1:] ^= ts.view(np.uint64)[:-1]
    data = np.ascontiguousarray(fl.data, dtype=np.uint8)
    width = int(data.shape[1]) if data.ndim == 2 else 8
    return {"trip_event": int(fl.trip_event), "bus": fl.bus, "before_s": float(fl.before_s),
            "after_s": float(fl.after_s), "frames": int(len(ts)), "width": width,
            "ts": _planes(bits, 8), "id": np.ascontiguousarray(fl.frame_id, dtype="<u4").tobytes(),
            "len": np.ascontiguousarray(fl.length, dtype=np.uint8).tobytes(), "data": data.tobytes()}


def _parse_flight(body: Mapping[str, Any]) -> Flight:
    n, width = int(body["frames"]), int(body["width"])
    x = _unplanes(body["ts"], 8, n).copy()
    np.bitwise_xor.accumulate(x, out=x)
    ids = np.frombuffer(body["id"], dtype="<u4").astype(np.uint32)
    lens = np.frombuffer(body["len"], dtype=np.uint8).copy()
    data = np.frombuffer(body["data"], dtype=np.uint8)
    if len(ids) != n or len(lens) != n or data.size != n * width:
        raise BatchError("flight record columns have different lengths")
    return Flight(int(body["trip_event"]), str(body["bus"]), float(body["before_s"]), float(body["after_s"]),
                  x.view(np.float64), ids, lens, data.reshape(n, width).copy())


def plain(obj: Any) -> Any:
    """Records as msgpack-able plain data (numpy arrays to lists, enums to names, dataclasses to maps)."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bool | int | str | bytes | type(None)):
        if isinstance(obj, int) and not isinstance(obj, bool) and not -(2**63) <= obj < 2**64:
            return str(obj)
        return obj
    if isinstance(obj, float):
        return obj
    name = getattr(obj, "name", None)
    if isinstance(name, str) and hasattr(obj, "value"):  # enum
        return name
    if hasattr(obj, "__dataclass_fields__"):
        return {k: plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    return str(obj)


# -- envelopes ---------------------------------------------------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


def compress(body: Mapping[str, Any]) -> bytes:
    return zlib.compress(msgpack.packb(body, use_bin_type=True), ZLIB_LEVEL)


def envelope(gateway: str, boot: str, stream: str, seq: int, kind: str, t0: int, t1: int, samples: int,
             comp: bytes, created_ms: int | None = None, extra: Mapping[str, Any] | None = None) -> bytes:
    env: dict[str, Any] = {"v": FORMAT_VERSION, "gw": gateway, "boot": boot, "stream": stream, "seq": int(seq),
                           "kind": kind, "t0": int(t0), "t1": int(t1), "n": int(samples),
                           "ct": now_ms() if created_ms is None else int(created_ms), "codec": CODEC,
                           "hash": hashlib.sha256(comp).digest(), "body": comp}
    if extra:
        env.update(extra)
    out: bytes = msgpack.packb(env, use_bin_type=True)
    return out


def envelope_overhead(gateway: str, boot: str, stream: str) -> int:
    """Bytes an envelope adds to its compressed body (upper bound)."""
    return 160 + len(gateway.encode()) + len(boot) + len(stream.encode())


def read_envelope(payload: bytes, verify: bool = True) -> dict[str, Any]:
    """The envelope map with its hash checked (BatchError when anything is off)."""
    try:
        env = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several exception types for malformed input
        raise BatchError(f"not a msgpack envelope: {exc}") from None
    if not isinstance(env, dict):
        raise BatchError("envelope is not a map")
    if env.get("v") != FORMAT_VERSION:
        raise BatchError(f"unsupported format version {env.get('v')!r} (this decoder reads {FORMAT_VERSION})")
    missing = [k for k in ("gw", "boot", "stream", "seq", "kind", "codec", "hash", "body") if k not in env]
    if missing:
        raise BatchError(f"envelope lacks {', '.join(missing)}")
    if not isinstance(env["body"], bytes) or not isinstance(env["hash"], bytes):
        raise BatchError("body and hash must be binary")
    if verify and hashlib.sha256(env["body"]).digest() != env["hash"]:
        raise BatchError(f"content hash mismatch in {env['stream']}#{env['seq']}")
    return env


def body_of(env: Mapping[str, Any]) -> Any:
    if env["codec"] == "zlib":
        d = zlib.decompressobj()
        try:
            raw = d.decompress(env["body"], MAX_BODY_BYTES)
        except zlib.error as exc:
            raise BatchError(f"body does not decompress: {exc}") from None
        if d.unconsumed_tail:
            raise BatchError(f"body larger than {MAX_BODY_BYTES} bytes")
    elif env["codec"] == "none":
        raw = env["body"]
    else:
        raise BatchError(f"unknown codec {env['codec']!r}")
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:
        raise BatchError(f"body is not msgpack: {exc}") from None


def decode(payload: bytes, verify: bool = True) -> Batch:
    """Decode one published payload (the public decoder for the cloud side)."""
    env = read_envelope(payload, verify)
    body = body_of(env)
    b = Batch(int(env["v"]), str(env["gw"]), str(env["boot"]), str(env["stream"]), int(env["seq"]), str(env["kind"]),
              int(env.get("t0", 0)), int(env.get("t1", 0)), int(env.get("n", 0)), int(env.get("ct", 0)),
              bytes(env["hash"]), len(payload))
    try:
        if b.kind == KIND_TELEMETRY:
            b.telemetry = _parse_telemetry(body)
        elif b.kind == KIND_THINNED:
            b.thinned = _parse_thinned(body)
        elif b.kind == KIND_FLIGHT:
            b.flight = _parse_flight(body)
        elif b.kind in KINDS:
            recs = body.get("records") if isinstance(body, dict) else None
            if not isinstance(recs, list):
                raise BatchError(f"{b.kind} body has no records list")
            b.records = recs
        else:
            raise BatchError(f"unknown kind {b.kind!r}")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, BatchError):
            raise
        raise BatchError(f"malformed {b.kind} body: {type(exc).__name__}: {exc}") from None
    return b


# -- sealing with sequence numbers and the payload limit ---------------------------------------


class Sealer:
    """Encodes content into envelopes of at most ``max_payload`` bytes, numbering them per stream."""

    def __init__(self, gateway: str, boot: str, max_payload: int) -> None:
        self.gateway = gateway
        self.boot = boot
        self.max_payload = max_payload
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()

    def _next(self, stream: str) -> int:
        with self._lock:
            s = self._seq.get(stream, 0)
            self._seq[stream] = s + 1
            return s

    def last_seq(self) -> dict[str, int]:
        with self._lock:
            return {k: v - 1 for k, v in self._seq.items()}

    def _budget(self, stream: str) -> int:
        return self.max_payload - envelope_overhead(self.gateway, self.boot, stream)

    def _seal(self, stream: str, kind: str, prio: int, comp: bytes, t0: int, t1: int, n: int,
              extra: Mapping[str, Any] | None = None) -> Sealed:
        seq = self._next(stream)
        payload = envelope(self.gateway, self.boot, stream, seq, kind, t0, t1, n, comp, extra=extra)
        if len(payload) > self.max_payload:  # the overhead bound is generous; this would be a bug
            raise AssertionError(f"envelope of {len(payload)} bytes exceeds {self.max_payload}")
        return Sealed(stream, seq, kind, prio, t0, t1, n, payload, self.boot)

    def telemetry(self, stream: str, tel: Telemetry, hints: Sequence[Chain | None] = ()) -> list[Sealed]:
        """One or more envelopes (split by rows, then by columns) of telemetry."""
        pieces = self._split_telemetry(stream, tel, list(hints) if hints else [None] * len(tel.signals))
        return [self._seal(stream, KIND_TELEMETRY, PRIO_TELEMETRY, comp, int(t.t_ms[0]), int(t.t_ms[-1]), t.samples)
                for t, comp in pieces]

    def _split_telemetry(self, stream: str, tel: Telemetry, hints: list[Chain | None]) -> list[tuple[Telemetry, bytes]]:
        if len(tel.t_ms) == 0 or not tel.signals:
            return []
        comp = compress(telemetry_body(tel, hints))
        if len(comp) <= self._budget(stream):
            return [(tel, comp)]
        rows = len(tel.t_ms)
        if rows > 1:
            mid = rows // 2
            return (self._split_telemetry(stream, tel.rows(slice(0, mid)), hints)
                    + self._split_telemetry(stream, tel.rows(slice(mid, rows)), hints))
        cols = len(tel.signals)
        if cols == 1:
            raise ValueError(f"one sample of {tel.signals[0]} does not fit in {self.max_payload} bytes")
        half = cols // 2
        a, b = list(range(half)), list(range(half, cols))
        return (self._split_telemetry(stream, tel.columns(a), [hints[i] for i in a])
                + self._split_telemetry(stream, tel.columns(b), [hints[i] for i in b]))

    def records(self, stream: str, kind: str, records: Iterable[Mapping[str, Any]], prio: int = PRIO_KEEP,
                rejected: list[tuple[Any, str]] | None = None) -> list[Sealed]:
        """Envelopes of plain records (events, EIS, gaps), packed greedily, oversize records split.

        Every record is split (or found unsplittable) before any sequence number is taken, so a
        failure leaves no hole in the stream's seqs.  A record that cannot be made to fit raises
        ValueError, or, with ``rejected``, is appended there with the reason and the others are sealed.
        """
        budget = self._budget(stream)
        raw_budget = budget - budget // 64 - 64  # zlib can expand incompressible input slightly
        chunks: list[list[Any]] = []
        chunk: list[Any] = []
        size = 0
        for rec in records:
            p = plain(rec)
            try:
                parts = split_record(p, raw_budget - 16)
            except ValueError as exc:
                if rejected is None:
                    raise
                rejected.append((p, str(exc)))
                continue
            for part in parts:
                n = _packed_len(part)
                if size + n > raw_budget and chunk:
                    chunks.append(chunk)
                    chunk, size = [], 0
                chunk.append(part)
                size += n
        if chunk:
            chunks.append(chunk)
        bodies = [(compress({"records": c}), *_record_times(c), len(c)) for c in chunks]
        return [self._seal(stream, kind, prio, comp, t0, t1, n) for comp, t0, t1, n in bodies]

    def flight(self, stream: str, fl: Flight) -> list[Sealed]:
        """Envelopes of a flight record, split by frames to fit."""
        out = []
        for part in self._split_flight(stream, fl):
            t0 = int(part.timestamp[0] * 1000) if len(part.timestamp) else now_ms()
            t1 = int(part.timestamp[-1] * 1000) if len(part.timestamp) else t0
            out.append(self._seal(stream, KIND_FLIGHT, PRIO_KEEP, compress(flight_body(part)), t0, t1,
                                  len(part.timestamp)))
        return out

    def _split_flight(self, stream: str, fl: Flight) -> list[Flight]:
        comp = compress(flight_body(fl))
        n = len(fl.timestamp)
        if len(comp) <= self._budget(stream) or n <= 1:
            if len(comp) > self._budget(stream):
                raise ValueError(f"one CAN frame does not fit in {self.max_payload} bytes")
            return [fl]
        mid = n // 2
        a = Flight(fl.trip_event, fl.bus, fl.before_s, fl.after_s, fl.timestamp[:mid], fl.frame_id[:mid],
                   fl.length[:mid], fl.data[:mid])
        b = Flight(fl.trip_event, fl.bus, fl.before_s, fl.after_s, fl.timestamp[mid:], fl.frame_id[mid:],
                   fl.length[mid:], fl.data[mid:])
        return self._split_flight(stream, a) + self._split_flight(stream, b)

    def reseal(self, payload: bytes, kind: str, comp: bytes, samples: int, extra: Mapping[str, Any]) -> bytes:
        """The same envelope identity (gateway, boot, stream, seq) with a new body (thinning)."""
        env = read_envelope(payload, verify=False)
        out = envelope(str(env["gw"]), str(env["boot"]), str(env["stream"]), int(env["seq"]), kind,
                       int(env.get("t0", 0)), int(env.get("t1", 0)), samples, comp, int(env.get("ct", 0)), extra)
        return out


def _record_times(records: Sequence[Any]) -> tuple[int, int]:
    ts = []
    for r in records:
        t = r.get("time") if isinstance(r, dict) else None
        if isinstance(t, int | float) and math.isfinite(t):
            ts.append(int(t * 1000) if t < 1e11 else int(t))
    if not ts:
        t = now_ms()
        return t, t
    return min(ts), max(ts)


_PART_KEYS = ("split", "part", "parts", "record")


def _packed_len(x: Any) -> int:
    return len(msgpack.packb(x, use_bin_type=True))


def split_record(rec: Any, budget: int) -> list[Any]:
    """A record too large for one message as parts whose ``split`` fields concatenate back exactly.

    The longest list fields of equal length are cut into ``parts`` consecutive slices; when even
    single elements of them do not fit, the next longest list fields are cut along with them (each
    into as many slices, some possibly empty).  Every other field is repeated.  Each part carries
    ``part``, ``parts``, ``split`` (the names of the cut fields) and ``record`` (the original ``id``).
    Raises ValueError when no cut makes the parts fit.
    """
    size = _packed_len(rec)
    if size <= budget:
        return [rec]
    if not isinstance(rec, dict):
        raise ValueError(f"a record of {size} bytes is not a map and cannot be split")
    groups: dict[int, list[str]] = {}
    for k, v in rec.items():
        if isinstance(v, list | bytes) and len(v) > 1 and k not in _PART_KEYS:
            groups.setdefault(len(v), []).append(k)
    if not groups:
        raise ValueError(f"record of {size} bytes has no list field to split")
    keys: list[str] = []
    for n in sorted(groups, reverse=True):
        keys += groups[n]
        longest = max(len(rec[k]) for k in keys)
        count = max(2, -(-size // budget))
        while True:
            count = min(count, longest)
            parts = _cut(rec, keys, count)
            if all(_packed_len(p) <= budget for p in parts):
                return parts
            if count == longest:
                break
            count += max(1, count // 8)
    raise ValueError(f"record of {size} bytes does not fit in {budget} bytes even with its lists cut to single elements")


def _cut(rec: dict[str, Any], keys: Sequence[str], count: int) -> list[dict[str, Any]]:
    """``count`` parts of ``rec`` with each field of ``keys`` cut into consecutive slices (exact partition)."""
    out = []
    for i in range(count):
        q = dict(rec)
        for k in keys:
            n = len(rec[k])
            q[k] = rec[k][i * n // count:(i + 1) * n // count]
        q["split"] = sorted(keys)
        q["part"], q["parts"] = i, count
        if "id" in rec:
            q["record"] = rec["id"]
        out.append(q)
    return out


def describe(b: Batch, max_rows: int = 5) -> dict[str, Any]:
    """A JSON-friendly summary of a decoded batch (for `bmsgw cloud decode`)."""
    out: dict[str, Any] = {"gateway": b.gateway, "boot": b.boot, "stream": b.stream, "seq": b.seq, "kind": b.kind,
                           "t0_ms": b.t0_ms, "t1_ms": b.t1_ms, "samples": b.samples, "created_ms": b.created_ms,
                           "bytes": b.size, "hash": b.hash.hex()}

    def num(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    if b.telemetry is not None:
        t = b.telemetry
        out["rate_hz"] = t.rate_hz
        out["signals"] = t.signals
        out["rows"] = len(t.t_ms)
        out["not_good"] = int((t.quality != 0).sum())
        out["first_rows"] = [{"t_ms": int(t.t_ms[i]), "values": [num(x) for x in t.values[i]]}
                             for i in range(min(max_rows, len(t.t_ms)))]
    elif b.thinned is not None:
        th = b.thinned
        out.update(signals=th.signals, windows=len(th.t_ms), window_ms=th.window_ms, orig_rows=th.orig_rows,
                   orig_samples=th.orig_samples)
        out["first_windows"] = [{"t_ms": int(th.t_ms[i]), "min": [num(x) for x in th.min[i]],
                                 "max": [num(x) for x in th.max[i]], "mean": [num(x) for x in th.mean[i]]}
                                for i in range(min(max_rows, len(th.t_ms)))]
    elif b.flight is not None:
        f = b.flight
        out.update(trip_event=f.trip_event, bus=f.bus, frames=len(f.timestamp))
        out["first_frames"] = [{"t": float(f.timestamp[i]), "id": f"0x{int(f.frame_id[i]) & 0x1FFFFFFF:X}",
                                "data": bytes(f.data[i][: int(f.length[i])]).hex()}
                               for i in range(min(max_rows, len(f.timestamp)))]
    else:
        out["records"] = [_jsonable(r) for r in b.records]
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, bytes):
        return x.hex()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x

