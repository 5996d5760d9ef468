"""The batch format: lossless columnar encoding, payload limit, hashes, records, thinning, size."""

from __future__ import annotations

import json
import tomllib
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudlink.batch import (
    FLAG_NAN,
    KIND_EIS,
    KIND_EVENTS,
    BatchError,
    Flight,
    Sealer,
    Telemetry,
    body_of,
    decode,
    describe,
    pack_ints,
    pack_names,
    read_envelope,
    runs,
    thin,
    unpack_ints,
    unpack_names,
    unruns,
)
from cloudlink.config import CloudSection
from drivers.sim_battery import SimBatteryPack
from gateway.schema import ConfigError, Loader

T0 = 1_700_000_000_000


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float64 bit patterns (NaN equal to NaN, -0.0 distinct from 0.0)."""
    return a.shape == b.shape and np.array_equal(np.asarray(a, np.float64).view(np.uint64),
                                                 np.asarray(b, np.float64).view(np.uint64))


def tel_of(values: np.ndarray, quality: np.ndarray | None = None, period_ms: int = 100) -> Telemetry:
    rows, cols = values.shape
    q = np.zeros((rows, cols), np.int8) if quality is None else quality
    return Telemetry([f"cell[{i}].voltage" for i in range(cols)], T0 + np.arange(rows, dtype=np.int64) * period_ms,
                     values, q, 10.0)


column = st.sampled_from(["dec0", "dec1", "dec3", "cantools", "offset", "float", "nan", "mixed"])


@st.composite
def matrices(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, list[tuple[tuple[float, float], ...] | None]]:
    rows = draw(st.integers(1, 40))
    kinds = draw(st.lists(column, min_size=1, max_size=8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cols, hints = [], []
    for kind in kinds:
        raw = np.cumsum(rng.integers(-5, 6, rows)) + rng.integers(-(10**6), 10**6)
        hint = None
        if kind == "dec0":
            c = raw.astype(np.float64)
        elif kind == "dec1":
            c = np.round(raw / 10.0, 1)
        elif kind == "dec3":
            c = raw / 1000.0
        elif kind == "cantools":  # raw * scale + offset as cantools computes it (not a decimal in float64)
            c = raw * 0.001 + 0.0
        elif kind == "offset":  # a binary scale with an offset, only exact with the DBC's arithmetic
            c = raw * 0.0625 + -40.0
            hint = ((0.0625, -40.0),)
        elif kind == "float":
            c = rng.normal(0, 1e3, rows) * np.exp(rng.normal(0, 5, rows))
        elif kind == "nan":
            c = np.full(rows, np.nan)
        else:
            c = raw / 100.0
            c[rng.random(rows) < 0.3] = np.nan
            if rows > 2:
                c[1] = np.inf
        cols.append(c)
        hints.append(hint)
    values = np.column_stack(cols)
    quality = rng.integers(0, 3, values.shape).astype(np.int8) * (rng.random(values.shape) < 0.2)
    return values, quality.astype(np.int8), hints


@settings(max_examples=150, deadline=None)
@given(matrices())
def test_telemetry_round_trip_is_bit_exact(m: tuple[np.ndarray, np.ndarray, list]) -> None:
    values, quality, hints = m
    tel = tel_of(values, quality)
    tel.t_ms = T0 + np.cumsum(np.random.default_rng(1).integers(0, 300, len(values))).astype(np.int64)
    sealed = Sealer("gw", "boot", 128 * 1024).telemetry("s", tel, hints)
    assert len(sealed) == 1
    b = decode(sealed[0].payload)
    assert b.telemetry is not None
    assert same_bits(b.telemetry.values, values)
    assert np.array_equal(b.telemetry.quality, quality)
    assert np.array_equal(b.telemetry.t_ms, tel.t_ms)
    assert b.telemetry.signals == tel.signals
    assert (b.gateway, b.boot, b.stream, b.seq, b.samples) == ("gw", "boot", "s", 0, values.size)


def test_integers_at_sensor_resolution_are_chosen() -> None:
    rng = np.random.default_rng(3)
    raw = np.cumsum(rng.integers(-2, 3, (50, 3)), axis=0) + 3700
    values = np.column_stack([raw[:, 0] / 1000.0, raw[:, 1] * 0.001, raw[:, 2] * 0.0625 - 40.0])
    hints = [None, None, ((0.0625, -40.0),)]
    payload = Sealer("gw", "b", 1 << 17).telemetry("s", tel_of(values), hints)[0].payload
    groups = body_of(read_envelope(payload))["m"]["groups"]
    by_col = {c: g for g in groups for c in unruns(g["cols"])}
    assert by_col[0]["enc"] == "dec" and by_col[0]["d"] == 3 and by_col[0]["w"] == 1  # mV steps fit one byte
    assert by_col[1]["enc"] == "lin" and by_col[1]["chain"] == [[0.001, 0.0]]  # k * 0.001, as cantools does
    assert by_col[2]["enc"] == "lin" and by_col[2]["chain"] == [[0.0625, -40.0]]  # the DBC's scale and offset
    assert not any(g["enc"] == "f64" for g in groups)
    assert same_bits(decode(payload).telemetry.values, values)  # type: ignore[union-attr]


def test_missing_values_and_quality_survive() -> None:
    values = np.full((5, 2), 3.7)
    values[2, 0] = np.nan
    q = np.zeros((5, 2), np.int8)
    q[2, 0] = 2
    q[4, 1] = 1
    b = decode(Sealer("gw", "b", 1 << 17).telemetry("s", tel_of(values, q))[0].payload)
    assert b.telemetry is not None
    assert np.isnan(b.telemetry.values[2, 0]) and b.telemetry.values[3, 0] == 3.7
    assert b.telemetry.quality[2, 0] == 2 and b.telemetry.quality[4, 1] == 1
    assert (b.telemetry.quality & FLAG_NAN).sum() == 0  # the NaN flag is not a quality


@pytest.mark.parametrize("limit", [1024, 3000, 20_000])
def test_payload_limit_splits_and_keeps_everything(limit: int) -> None:
    rng = np.random.default_rng(5)
    values = np.round(3.7 + rng.normal(0, 0.01, (200, 64)), 3)
    tel = tel_of(values)
    sealed = Sealer("gw", "b", limit).telemetry("cells", tel)
    assert all(len(s.payload) <= limit for s in sealed)
    assert [s.seq for s in sealed] == list(range(len(sealed)))
    if limit < 20_000:
        assert len(sealed) > 1
    # reassemble by timestamp and signal: every sample exactly once
    got: dict[tuple[int, str], float] = {}
    for s in sealed:
        t = decode(s.payload).telemetry
        assert t is not None
        for r, ts in enumerate(t.t_ms):
            for c, name in enumerate(t.signals):
                key = (int(ts), name)
                assert key not in got
                got[key] = float(t.values[r, c])
    assert len(got) == values.size
    assert all(got[(int(tel.t_ms[r]), tel.signals[c])] == values[r, c] for r in range(200) for c in range(64))
    assert sum(s.samples for s in sealed) == values.size


def test_one_sample_larger_than_the_limit_is_an_error() -> None:
    names = ["".join(chr(97 + int(c)) for c in np.random.default_rng(1).integers(0, 26, 3000))]  # incompressible
    tel = Telemetry(names, np.array([T0], np.int64), np.array([[1.0]]), np.zeros((1, 1), np.int8))
    with pytest.raises(ValueError, match="does not fit"):
        Sealer("gw", "b", 1024).telemetry("s", tel)


def test_tampering_truncation_and_versions_are_detected() -> None:
    payload = Sealer("gw", "b", 1 << 17).telemetry("s", tel_of(np.ones((4, 2))))[0].payload
    env = msgpack.unpackb(payload)
    body = bytearray(env["body"])
    body[len(body) // 2] ^= 0x01
    env["body"] = bytes(body)
    with pytest.raises(BatchError, match="hash"):
        decode(msgpack.packb(env))
    with pytest.raises(BatchError):
        decode(payload[: len(payload) // 2])
    env = msgpack.unpackb(payload)
    env["v"] = 2
    with pytest.raises(BatchError, match="version"):
        decode(msgpack.packb(env))
    env = msgpack.unpackb(payload)
    env["body"] = zlib.compress(b"\x00" * 100)
    env["hash"] = __import__("hashlib").sha256(env["body"]).digest()
    with pytest.raises(BatchError):
        decode(msgpack.packb(env))


def test_records_are_packed_and_large_ones_split() -> None:
    sealer = Sealer("gw", "b", 4096)
    events = [{"kind": "trip", "name": f"e{i}", "time": 1.7e9 + i, "value": float(i)} for i in range(300)]
    sealed = sealer.records("events", KIND_EVENTS, events)
    assert all(len(s.payload) <= 4096 for s in sealed) and len(sealed) > 1
    back = [r for s in sealed for r in decode(s.payload).records]
    assert back == events
    # an EIS record with 2000 points and equal-length columns: split into parts, reassembled exactly
    n = 2000
    rng = np.random.default_rng(2)
    eis = {"id": "sweep-1", "cell": 17, "time": 1.7e9, "freq_hz": np.geomspace(0.1, 1000, n),
           "z_re": rng.normal(1e-3, 1e-4, n), "z_im": rng.normal(-1e-4, 1e-5, n), "note": "x"}
    parts = [r for s in sealer.records("eis", KIND_EIS, [eis]) for r in decode(s.payload).records]
    assert len(parts) > 1 and all(p["record"] == "sweep-1" for p in parts)
    assert [p["part"] for p in parts] == list(range(len(parts))) and {p["parts"] for p in parts} == {len(parts)}
    for key in ("freq_hz", "z_re", "z_im"):
        assert np.array_equal(np.concatenate([p[key] for p in parts]), eis[key])
    assert all(p["cell"] == 17 and p["note"] == "x" for p in parts)


def test_flight_records_round_trip_and_split() -> None:
    n = 3000
    rng = np.random.default_rng(4)
    fl = Flight(7, "pack", 2.0, 1.0, 1.7e9 + np.cumsum(rng.random(n) * 1e-3), rng.integers(0, 2**31, n).astype(np.uint32),
                rng.integers(0, 9, n).astype(np.uint8), rng.integers(0, 256, (n, 8)).astype(np.uint8))
    sealed = Sealer("gw", "b", 8192).flight("flight", fl)
    assert len(sealed) > 1 and all(len(s.payload) <= 8192 for s in sealed)
    parts = [decode(s.payload).flight for s in sealed]
    assert all(p is not None and p.trip_event == 7 for p in parts)
    assert same_bits(np.concatenate([p.timestamp for p in parts if p]), fl.timestamp)
    assert np.array_equal(np.concatenate([p.frame_id for p in parts if p]), fl.frame_id)
    assert np.array_equal(np.vstack([p.data for p in parts if p]), fl.data)


def test_thinning_keeps_min_max_mean_of_good_samples() -> None:
    rng = np.random.default_rng(6)
    values = np.round(3.6 + rng.normal(0, 0.005, (100, 3)), 3)
    q = np.zeros((100, 3), np.int8)
    q[10:20, 1] = 2  # invalid samples are not in the statistics
    values[30, 2] = np.nan
    th = thin(tel_of(values, q), 2000)  # 100 ms rows, 2 s windows: 5 windows of 20 rows
    assert th.min.shape == (5, 3)
    for w in range(5):
        sel = slice(w * 20, (w + 1) * 20)
        good = (q[sel] == 0) & ~np.isnan(values[sel])
        for c in range(3):
            v = values[sel, c][good[:, c]]
            assert th.count[w, c] == len(v)
            assert th.min[w, c] == v.min() and th.max[w, c] == v.max()
            assert abs(th.mean[w, c] - v.mean()) < 1e-4
    assert th.quality[0, 1] == 2 and th.orig_samples == 300


def test_names_runs_and_integer_planes_round_trip() -> None:
    names = ["pack.current"] + [f"module[{m}].temperature[{k}]" for m in range(3) for k in range(2)] + \
            [f"cell[{i}].voltage" for i in range(224)] + ["cell[300].voltage", "odd{name}[2]"]
    packed = pack_names(names)
    assert unpack_names(packed) == names
    assert len(json.dumps(packed)) < 300  # 224 cells take one entry
    cols = [0, 1, 2, 5, 6, 9]
    assert unruns(runs(cols)) == cols and runs(cols) == [[0, 3], [5, 2], [9, 1]]


@given(st.lists(st.integers(-(2**60), 2**60), max_size=200))
def test_int_planes(xs: list[int]) -> None:
    a = np.array(xs, dtype=np.int64)
    assert np.array_equal(unpack_ints(pack_ints(a), len(a)), a)


def test_reference_site_costs_well_under_the_goal() -> None:
    """One minute of the simulated reference site's cell voltages (10 Hz) and pack V/I (100 Hz)."""
    pack = SimBatteryPack(seed=3)
    rows = 600
    cells = np.empty((rows, 224))
    for k in range(rows):
        pack.step(0.1, 20.0)
        cells[k] = pack.measure().cell_voltages_v
    sealer = Sealer("gw", "b", 128 * 1024)
    total = sum(len(s.payload) for i in range(0, rows, 50) for s in sealer.telemetry("cells", tel_of(cells[i:i + 50])))
    per_sample = total / cells.size
    baseline = np.mean([len(json.dumps({"ts": T0 + r * 100, "signal": f"cell[{c}].voltage", "value": float(cells[r, c]),
                                        "quality": "good"}, separators=(",", ":")))
                        for r in range(0, rows, 60) for c in range(224)])
    assert per_sample <= 1.5
    assert baseline / per_sample > 50


def test_describe_is_json() -> None:
    b = decode(Sealer("gw", "b", 1 << 17).telemetry("s", tel_of(np.ones((3, 2))))[0].payload)
    d = describe(b)
    json.dumps(d)
    assert d["rows"] == 3 and d["signals"] == ["cell[0].voltage", "cell[1].voltage"]


def test_the_documented_standalone_decoder_reads_real_payloads(repo: Any) -> None:
    """docs/cloud-format.md's decoder (msgpack, zlib, numpy only) agrees with the gateway, bit for bit."""
    text = (repo / "docs" / "cloud-format.md").read_text()
    code = text.split("## A standalone decoder", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    ns: dict[str, Any] = {}
    exec(compile(code, "cloud-format.md", "exec"), ns)  # noqa: S102 - our own documentation
    rng = np.random.default_rng(9)
    raw = np.cumsum(rng.integers(-3, 4, (40, 5)), axis=0) + 3700
    values = np.column_stack([raw[:, 0] / 1000.0, raw[:, 1] * 0.001, raw[:, 2] * 0.0625 - 40.0,
                              rng.normal(0, 1, 40) * 1e-3 + np.pi, raw[:, 4].astype(float)])
    values[5, 1] = np.nan
    q = np.zeros(values.shape, np.int8)
    q[5, 1], q[7, 3] = 2, 1
    tel = Telemetry(["pack.current", "pack.voltage"] + [f"cell[{i}].voltage" for i in range(3)],
                    T0 + np.cumsum(rng.integers(90, 110, 40)).astype(np.int64), values, q, 10.0)
    payload = Sealer("gw", "b", 1 << 17).telemetry("cells", tel, [None, None, ((0.0625, -40.0),), None, None])[0].payload
    stream, seq, names, t, v, quality = ns["decode_telemetry"](payload)
    assert (stream, seq, names) == ("cells", 0, tel.signals)
    assert np.array_equal(t, tel.t_ms)
    assert same_bits(v, values)
    assert np.array_equal(quality, q)


def test_config_checks_point_at_the_key() -> None:
    from cloudlink.config import CloudSection, CommandSettings, SignalClass, TlsSettings, Topics

    with pytest.raises(ValueError, match=r"^commands\.hmac_secret: "):
        CloudSection(enabled=True, host="broker").check()  # the default needs a secret (no silent empty key)
    CloudSection(enabled=True, host="broker", commands=CommandSettings(enabled=False)).check()
    CloudSection(enabled=True, host="broker", commands=CommandSettings(auth="tls_acl")).check()
    bad = [({"host": ""}, r"^host: "), ({"quota_bytes": 1024}, r"^quota_bytes: "),
           ({"backfill_share": 0.0}, r"^backfill_share: "),
           ({"telemetry": [SignalClass("events", ["x"])]}, r"^telemetry\[0\]\.name: "),
           ({"telemetry": [SignalClass("a", ["x"], rate_hz=500.0)]}, r"^telemetry\[0\]\.rate_hz: "),
           ({"tls": TlsSettings(enabled=True, cert_file="/nonexistent.pem", key_file="/k")}, r"^tls\.cert_file: "),
           ({"topics": Topics(data="{prefix}/x")}, r"^topics\.data: must contain \{stream\}"),
           ({"topics": Topics(hist="{prefix}/{site}/{gateway}/data/{stream}")}, r"^topics\.hist: ")]
    for kw, msg in bad:
        cfg = {"enabled": True, "host": "broker", "commands": CommandSettings(enabled=False), **kw}
        with pytest.raises(ValueError, match=msg):
            CloudSection(**cfg).check()


CLOUD_TOML = """
[cloud]
enabled = true
host = "broker.example.net"
protocol = "auto"
username = "gw-1"
max_payload = 131072
quota_bytes = 268435456
fsync_window_s = 1.0
bandwidth_cap = 50000
backfill_share = 0.3

[cloud.tls]
enabled = true

[cloud.topics]
prefix = "fleet"

[cloud.commands]
auth = "tls_acl"

[[cloud.telemetry]]
name = "cells"
signals = ["cell[*].voltage"]
rate_hz = 10.0
batch_s = 5.0

[[cloud.telemetry]]
name = "pack"
signals = ["pack.current", "pack.voltage"]
rate_hz = 100.0
max_rate_hz = 200.0
"""


@dataclass(frozen=True)
class Wrapper:
    """Stands for the gateway's Config with its [cloud] section."""

    cloud: CloudSection = field(default_factory=CloudSection)


def test_section_loads_with_the_gateway_loader() -> None:
    w = Loader("cfg.toml", CLOUD_TOML).load(Wrapper, tomllib.loads(CLOUD_TOML))
    c = w.cloud
    assert c.enabled and c.tls.enabled and c.broker_port() == 8883 and c.topics.prefix == "fleet"
    assert [t.name for t in c.telemetry] == ["cells", "pack"] and c.telemetry[1].max_rate_hz == 200.0
    assert c.topics.render("data", "s1", "gw-1", "cells") == "fleet/s1/gw-1/data/cells"
    broken = CLOUD_TOML.replace("rate_hz = 100.0", "rate_hz = 300.0")
    with pytest.raises(ConfigError) as err:
        Loader("cfg.toml", broken).load(Wrapper, tomllib.loads(broken))
    assert err.value.key == "cloud.telemetry[1].rate_hz" and err.value.line is not None
    typo = CLOUD_TOML.replace("backfill_share", "backfil_share")
    with pytest.raises(ConfigError, match="did you mean 'backfill_share'"):
        Loader("cfg.toml", typo).load(Wrapper, tomllib.loads(typo))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 0.1, -0.1, 1.5, -2.25, 3.0, 1e-3]), min_size=1, max_size=30),
       st.sampled_from([None, ((0.1, 0.0),), ((0.0625, -40.0),), ((-0.5, 0.0),)]))
def test_signed_zero_is_kept_bit_for_bit(col: list[float], hint: Any) -> None:
    """-0.0 passes a == check against 0.0; the exactness check must compare bits (the docs promise them)."""
    values = np.array(col, dtype=np.float64)[:, None]
    sealed = Sealer("gw", "boot", 128 * 1024).telemetry("s", tel_of(values), [hint])
    b = decode(sealed[0].payload)
    assert b.telemetry is not None and same_bits(b.telemetry.values, values)


def _reassembled(parts: list[dict[str, Any]], key: str) -> list[Any]:
    """The documented reassembly: concatenate a split field over parts 0 .. parts-1 (else it is repeated)."""
    assert [p["part"] for p in parts] == list(range(parts[0]["parts"]))
    if key in parts[0]["split"]:
        return [x for p in parts for x in p[key]]
    assert all(p[key] == parts[0][key] for p in parts)
    return list(parts[0][key])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(2, 400), min_size=1, max_size=4), st.sampled_from([1536, 4096, 16384]))
def test_split_records_reassemble_exactly_with_lists_of_any_lengths(lengths: list[int], limit: int) -> None:
    rng = np.random.default_rng(sum(lengths))
    rec: dict[str, Any] = {"id": "sweep-7", "kind": "eis", "time": 1.7e9, "valid": True,
                           "fit": {"params": {"R0": 1e-3, "C1": 2.0}, "tau_s": [0.1, 1.0]}}
    for i, n in enumerate(lengths):
        rec[f"list{i}"] = rng.random(n).tolist()
    sealed = Sealer("gw", "b", limit).records("eis", KIND_EIS, [rec])
    assert all(len(s.payload) <= limit for s in sealed)
    parts = [r for s in sealed for r in decode(s.payload).records]
    if len(parts) == 1:
        assert parts == [rec]
        return
    for key, value in rec.items():
        if isinstance(value, list):
            assert _reassembled(parts, key) == value, key
        else:
            assert all(p[key] == value for p in parts)


def test_a_record_that_cannot_fit_takes_no_seq_and_spares_the_others() -> None:
    sealer = Sealer("gw", "b", 1024)
    small = [{"kind": "eis", "sweep_id": f"s{i}", "time": 1.7e9 + i, "reason": "x" * 200} for i in range(6)]
    big = {"kind": "eis", "sweep_id": "s9", "time": 1.7e9, "fit": {"params": {f"p{i}": 0.1 * i for i in range(200)}}}
    with pytest.raises(ValueError, match="split"):  # after more small records than one message holds
        sealer.records("eis", KIND_EIS, small + [big])
    assert sealer.last_seq() == {}  # refused before any envelope was sealed: no hole
    rejected: list[tuple[Any, str]] = []
    sealed = sealer.records("eis", KIND_EIS, [small[0], big, *small[1:]], rejected=rejected)
    assert [s.seq for s in sealed] == list(range(len(sealed))) and sealer.last_seq() == {"eis": len(sealed) - 1}
    assert [r for s in sealed for r in decode(s.payload).records] == small
    assert [r["sweep_id"] for r, _ in rejected] == ["s9"]
