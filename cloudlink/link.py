"""CloudLink: sampler -> batches -> durable store -> MQTT (live and backfill lanes), and commands back.

One ``run()`` holds everything in an anyio task group: a sampler task per signal
class, the record loop (events, flight and EIS records), the writer (encode +
store in a worker thread), housekeeping (deleting acknowledged rows, fsync
window, free-disk floor) and the connection loop.  Cancelling ``run()`` flushes
what was sampled into the store, says goodbye to the broker and closes the
database; no task outlives it.

Lanes: while connected, a batch committed to the store goes to the *live* lane
(at most ``live_depth`` per stream, newest kept; older ones fall back to the
backfill lane).  Everything stored before the connection is *backlog*, sent
oldest first (events and other kept records before telemetry) on the
``hist`` topic, using at most ``backfill_share`` of the in-flight window (or of
the bandwidth cap), so a long outage never delays live data.  A row is deleted
only after its PUBACK; any failure ends the connection and every unacknowledged
row is sent again on the next one (the cloud de-duplicates by boot, stream,
seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import anyio.abc
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from cloudlink.batch import (
    KIND_EIS,
    KIND_EVENTS,
    PRIO_KEEP,
    PRIO_TELEMETRY,
    Chain,
    Flight,
    Sealed,
    Sealer,
    Telemetry,
)
from cloudlink.commands import COMMANDS, CommandProcessor, Context, Result
from cloudlink.config import CloudSection
from cloudlink.mqtt import (
    Backoff,
    Client,
    Pacer,
    PublishRefused,
    client_kwargs,
    historical_properties,
    publish_packet_size,
    tls_context,
)
from cloudlink.sampler import ClassSampler, Intake, resolve_signals
from cloudlink.store import Row, Store
from gateway import __version__
from gateway.events import FlightRecord, Recorder
from gateway.image import ProcessImage
from gateway.limits import HardwareLimits, LimitTable

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 0.1
DELETE_EVERY_S = 0.2
RELIEVE_EVERY_S = 5.0
PURGE_EVERY_S = 3600.0  # expired command ids are forgotten this often
PAGE_ROWS = 64
PAGE_BYTES = 4 << 20


@dataclass(frozen=True)
class SignalInfo:
    """What the birth message tells about a signal, and how its values become exact integers."""

    unit: str = ""
    chain: Chain = ()  # value = ((raw * s1 + o1) * s2 + o2) ..., the DBC's arithmetic (empty: unknown)


def catalogue_from_sources(sources: Iterable[Any]) -> dict[str, SignalInfo]:
    """Units and DBC arithmetic of every mapped signal (from gateway.pipeline.BusSource objects)."""
    out: dict[str, SignalInfo] = {}
    for src in sources:
        for b in src.signal_map.bindings:
            sig = b.signal
            chain: list[tuple[float, float]] = []
            if not getattr(sig, "is_float", False):
                scale, offset = float(sig.scale), float(sig.offset)
                if (scale, offset) != (1.0, 0.0):
                    chain.append((scale, offset))
                if (b.factor, b.add) != (1.0, 0.0):
                    chain.append((float(b.factor), float(b.add)))
            unit = sig.unit or ""
            if b.factor != 1.0 and unit:
                unit = f"{unit} x {b.factor:g}"
            out[b.target] = SignalInfo(unit if b.bit is None else "", tuple(chain) if b.bit is None else ())
    return out


def dbc_hash(paths: Iterable[str | Path]) -> str:
    """SHA-256 over the DBC files' bytes, in sorted path order (in the birth message)."""
    h = hashlib.sha256()
    for p in sorted(str(x) for x in paths):
        h.update(Path(p).read_bytes())
    return h.hexdigest()


class _Rates:
    """set_report_rates as a staged config change: snapshot, apply, health (samplers running), restore."""

    def __init__(self, link: CloudLink) -> None:
        self.link = link
        self._runs: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._applied_at = 0.0

    def snapshot(self) -> dict[str, float]:
        return {s.name: s.rate_hz for s in self.link.samplers}

    def apply(self, args: dict[str, Any]) -> Result:
        by = {s.name: s for s in self.link.samplers}
        missing = [n for n in args["rates"] if n not in by]
        if missing:
            return False, f"signal class '{missing[0]}' has no signals on this gateway"
        for name, hz in args["rates"].items():
            self.link._set_rate(by[name], hz)
        self._runs = {n: by[n].stats.runs for n in args["rates"]}
        self._errors = {n: by[n].stats.errors for n in args["rates"]}
        self._applied_at = time.monotonic()
        return True, "rates " + ", ".join(f"{n}={hz:g} Hz" for n, hz in args["rates"].items())

    def health(self) -> Result:
        by = {s.name: s for s in self.link.samplers}
        waited = time.monotonic() - self._applied_at
        for name, runs in self._runs.items():
            s = by[name]
            if s.rate_hz * waited >= 2 and s.stats.runs <= runs:
                return False, f"sampler {name} did not run at {s.rate_hz:g} Hz"
            if s.stats.errors > self._errors[name]:  # errors from before the change are not its fault
                return False, f"sampler {name}: {s.stats.last_error}"
        return True, "samplers running"

    def restore(self, snapshot: dict[str, float]) -> None:
        for s in self.link.samplers:
            if s.name in snapshot and s.rate_hz != snapshot[s.name]:
                self.link._set_rate(s, snapshot[s.name])


class CloudLink:
    """Store-and-forward of samples, events and records to an MQTT broker, with commands back."""

    def __init__(self, cfg: CloudSection, image: ProcessImage, recorder: Recorder | None,
                 handlers: Mapping[str, Any] | None, state_dir: str | Path | None, gateway_id: str, site: str, *,
                 catalogue: Mapping[str, SignalInfo] | None = None, dbc_hash: str = "", version: str = __version__,
                 hardware_limits: HardwareLimits | None = None,
                 current_limits: Callable[[], LimitTable] | None = None,
                 free_bytes: Callable[[Path], int] | None = None) -> None:
        self.cfg = cfg
        self.image = image
        self.recorder = recorder
        self.gateway = gateway_id
        self.site = site
        self.version = version
        self.dbc_hash = dbc_hash
        self.catalogue = dict(catalogue or {})
        self.boot = secrets.token_hex(8)
        self.sealer = Sealer(gateway_id, self.boot, cfg.max_payload)
        taken: set[str] = set()
        self.samplers: list[ClassSampler] = []
        self.empty_classes: list[str] = []
        self._resolution: dict[str, float] = {}
        for cls in cfg.telemetry:
            names = resolve_signals(image, cls.signals, taken)
            if names:
                self.samplers.append(ClassSampler(image, cls, names))
                for n in names:
                    self._resolution[n] = cls.resolution
            else:
                self.empty_classes.append(cls.name)
        self.intake = Intake()
        # From now on, not from run(): the events of start-up (a latched ERROR coming back, the first
        # trips) happen while the store still opens, and they are the ones a fleet operator needs.
        self._listen(backlog=True)
        path = cfg.store_path(state_dir) if state_dir is not None else None
        kw: dict[str, Any] = {"free_bytes": free_bytes} if free_bytes is not None else {}
        self.store = Store(path, self.sealer, quota_bytes=cfg.quota_bytes, min_free_bytes=cfg.min_free_bytes,
                           fsync_window_s=cfg.fsync_window_s, thin_window_ms=int(cfg.thin_window_s * 1000),
                           hints=self.hints, busy=self._busy, **kw)
        t = cfg.topics
        self.topic_birth = t.render("birth", site, gateway_id)
        self.topic_state = t.render("state", site, gateway_id)
        self.topic_cmd = t.render("cmd", site, gateway_id)
        self.topic_ack = t.render("cmd_ack", site, gateway_id)
        all_handlers: dict[str, Any] = {"request_birth": self._request_birth, "set_report_rates": _Rates(self)}
        all_handlers.update({k: v for k, v in (handlers or {}).items() if k in COMMANDS})
        self.unknown_handlers = sorted(set(handlers or {}) - set(COMMANDS))
        fam = image.families
        ctx = Context(cells=fam["cell.voltage"].size if "cell.voltage" in fam else 0,
                      modules=fam["module.voltage"].size if "module.voltage" in fam else 0,
                      rate_limits={s.name: s.cls.max_rate_hz for s in self.samplers},
                      hardware_limits=hardware_limits, current_limits=current_limits)
        self.processor = CommandProcessor(cfg.commands, gateway_id, all_handlers, self.store, ctx) \
            if cfg.commands.enabled else None
        self.on_commit: list[Callable[[Row], None]] = []  # observers of every committed row (event loop thread)
        # state shared by the tasks (event loop thread only, except _claimed which the store copies)
        self._items: MemoryObjectSendStream[tuple[Any, ...]] | None = None
        self._recv: MemoryObjectReceiveStream[tuple[Any, ...]] | None = None
        self._claimed: set[int] = set()  # rows in a lane, in flight, or acknowledged but not yet deleted
        self._acked: list[int] = []
        self._acked_pending: set[int] = set()
        self._live: dict[str, deque[Row]] = {}
        self._live_on = False
        self._buf: deque[Row] = deque()
        self._cursor = {PRIO_KEEP: 0, PRIO_TELEMETRY: 0}
        self._backfill_idle = False
        self._backfill_inflight = 0
        self._wake = anyio.Event()
        self._birth_due = False
        self._pacer = Pacer(cfg.bandwidth_cap, cfg.backfill_share)
        self._ack_window: deque[tuple[float, int]] = deque()
        self._rr = 0
        self._running = False
        self._lost_outside: list[tuple[str, str, int, int, int]] = []  # losses before a batch had a sequence number
        self._socket_opened = False
        self._connacked = False
        self.conn: dict[str, Any] = {"state": "stopped", "broker": f"{cfg.host}:{cfg.broker_port()}",
                                     "protocol": None, "since": None, "session": None, "attempts": 0,
                                     "connections": 0, "last_error": "", "last_error_at": None,
                                     "broker_max_packet": None, "last_refused": ""}
        self.counters: dict[str, int] = {"published_live": 0, "published_hist": 0, "published_bytes": 0,
                                         "acked": 0, "committed": 0, "store_errors": 0, "overflow": 0,
                                         "refused": 0}
        self._refused: dict[int, tuple[float, Row]] = {}  # rows the broker refused, retried after a pause
        self._paused: dict[tuple[str, str], float] = {}  # (lane, stream) refused by the broker -> retry time
        self.last_ack: float | None = None
        self.inflight = 0  # publishes awaiting their PUBACK
        self.warnings: list[str] = []
        if self.unknown_handlers:
            self.warnings.append(f"handlers for unknown commands ignored: {', '.join(self.unknown_handlers)}")
        if self.empty_classes:
            self.warnings.append(f"signal classes without signals on this site: {', '.join(self.empty_classes)}")

    # -- public -------------------------------------------------------------------------------

    def hints(self, names: Sequence[str]) -> list[Chain | None]:
        """Exact-integer candidates per signal: the DBC arithmetic, else the class's resolution."""
        out: list[Chain | None] = []
        for n in names:
            info = self.catalogue.get(n)
            if info is not None and info.chain:
                out.append(info.chain)
            elif self._resolution.get(n):
                out.append(((self._resolution[n], 0.0),))
            else:
                out.append(None)
        return out

    def submit_eis(self, record: Mapping[str, Any]) -> None:
        """Queue an EIS measurement record (a plain dict) for the cloud; thread-safe, never blocks."""
        self.intake.submit_eis(record)

    @property
    def loops(self) -> list[Any]:
        """LoopStats of the samplers (for the daemon's loop table)."""
        return [s.stats for s in self.samplers]

    def status(self) -> dict[str, Any]:
        """Connection, buffer, oldest unsent age, drain estimate, last ack, losses (cheap: no I/O)."""
        st = self.store.stats()
        now = time.time()
        oldest = st.pop("oldest_created")
        rate = self._ack_rate()
        drain = None
        if self.conn["state"] == "connected" and rate > 0:
            drain = round(st["total_bytes"] / rate, 1)
        losses = st.pop("losses")
        if self.intake.overflow:
            losses["intake_overflow"] = {"batches": 0, "samples": self.intake.overflow, "bytes": 0}
        return {
            "gateway": self.gateway, "site": self.site, "boot": self.boot,
            "connection": dict(self.conn),
            "buffer": {**st, "oldest_unsent_age_s": None if oldest is None else round(now - oldest, 1),
                       "in_flight": self.inflight, "backfill_pending": not self._backfill_idle},
            "drain_estimate_s": drain,
            "ack_rate_bytes_s": round(rate, 1),
            "last_ack": self.last_ack,
            "losses": losses,
            "counters": dict(self.counters),
            "commands": None if self.processor is None else {**self.processor.counts, "last": self.processor.last},
            "samplers": [{**s.stats.summary(), "name": s.name, "rate_hz": s.rate_hz, "signals": len(s.signals),
                          "samples": s.samples, "missed_ticks": s.missed} for s in self.samplers],
            "intake_pending": self.intake.pending(),
            "warnings": list(self.warnings),
        }

    def _listen(self, backlog: bool = False) -> None:
        """Take the recorder's new events and flight records (and, with ``backlog``, those it holds)."""
        rec = self.recorder
        if rec is None or self.intake.on_event in rec.subscribers:
            return
        rec.subscribers.append(self.intake.on_event)
        rec.record_subscribers.append(self.intake.on_flight_record)
        if not backlog:
            return
        # subscribed first, then the backlog: one recorded in between is not taken twice
        queued = {id(e) for e in list(self.intake.events)}
        self.intake.events.extendleft(reversed([e for e in list(rec.events) if id(e) not in queued]))
        queued = {id(r) for r in list(self.intake.flights)}
        self.intake.flights.extendleft(reversed([r for r in list(rec.flight_records) if id(r) not in queued]))

    async def run(self) -> None:
        """Run until cancelled; on the way out, what was sampled is stored and the database closed."""
        if self._running:
            raise RuntimeError("CloudLink.run() is already running")
        self._running = True
        self._wake = anyio.Event()
        rec = await anyio.to_thread.run_sync(self.store.open)
        if rec.state in ("recovered", "memory"):
            self.warnings.append(f"store {rec.state}: {rec.detail}")
            log.warning("cloud store %s: %s", rec.state, rec.detail)
        self._listen()
        send, recv = anyio.create_memory_object_stream[tuple[Any, ...]](max_buffer_size=1024)
        self._items, self._recv = send, recv
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer, recv)
                for s in self.samplers:
                    tg.start_soon(s.run, self._emit_telemetry)
                tg.start_soon(self._records_loop)
                tg.start_soon(self._housekeeping)
                tg.start_soon(self._connection_loop)
        finally:
            with anyio.CancelScope(shield=True):
                if self.recorder is not None:
                    with contextlib.suppress(ValueError):
                        self.recorder.subscribers.remove(self.intake.on_event)
                    with contextlib.suppress(ValueError):
                        self.recorder.record_subscribers.remove(self.intake.on_flight_record)
                try:
                    await self._final_flush()
                finally:
                    send.close()
                    recv.close()
                self.conn["state"] = "stopped"
                self._running = False

    # -- intake -> store ------------------------------------------------------------------------

    def _emit_telemetry(self, stream: str, tel: Telemetry) -> None:
        self._emit(("tel", stream, tel), stream, tel.samples, tel.t_ms)

    def _emit(self, item: tuple[Any, ...], stream: str, samples: int, t_ms: Any = None) -> None:
        assert self._items is not None
        try:
            self._items.send_nowait(item)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.counters["overflow"] += 1
            t0 = int(t_ms[0]) if t_ms is not None and len(t_ms) else 0
            t1 = int(t_ms[-1]) if t_ms is not None and len(t_ms) else 0
            self._lost_outside.append(("overflow", stream, samples, t0, t1))

    def _set_rate(self, sampler: ClassSampler, hz: float) -> None:
        tel = sampler.set_rate(hz)
        if tel is not None:
            self._emit_telemetry(sampler.name, tel)

    def _seal(self, item: tuple[Any, ...], rejected: list[tuple[Any, str]]) -> list[Sealed]:
        """Envelopes of one item; records that cannot be encoded are appended to ``rejected`` (the rest is sealed)."""
        kind = item[0]
        if kind == "tel":
            _, stream, tel = item
            return self.sealer.telemetry(stream, tel, self.hints(tel.signals))
        if kind == "rec":
            _, stream, rkind, records = item
            return self.sealer.records(stream, rkind, records, PRIO_KEEP, rejected=rejected)
        if kind == "flight":
            fr: FlightRecord = item[1]
            return self.sealer.flight("flight", Flight(fr.trip_event, fr.bus, fr.before_s, fr.after_s,
                                                       np.asarray(fr.timestamp, dtype=np.float64),
                                                       np.asarray(fr.frame_id, dtype=np.uint32),
                                                       np.asarray(fr.length, dtype=np.uint8),
                                                       np.asarray(fr.data, dtype=np.uint8)))
        raise ValueError(f"unknown item {kind!r}")

    def _seal_and_put(self, items: Sequence[tuple[Any, ...]]) -> tuple[list[Row], str]:
        """Worker thread: encode and store; a failure is counted as a loss with gap records."""
        sealed: list[Sealed] = []
        rows: list[Row] = []
        error = ""
        for item in items:
            stream = item[1] if item[0] != "flight" else "flight"
            rejected: list[tuple[Any, str]] = []
            try:
                sealed.extend(self._seal(item, rejected))
            except Exception as exc:  # an item that cannot be encoded is a loss, not a crash
                error = f"encode {item[0]}: {type(exc).__name__}: {exc}"
                log.error("cloud: %s", error)
                rows += self.store.note_loss("encode_error", stream=stream, samples=_samples_of(item))
            for rec, why in rejected:  # only that record is lost, with its own gap record (no seq was taken)
                error = f"encode {item[0]}: {why}"
                log.error("cloud: %s record: %s", stream, why)
                t = _record_ms(rec)
                rows += self.store.note_loss("encode_error", stream=stream, samples=1, t0=t, t1=t)
        if not sealed:
            return rows, error
        try:
            return rows + self.store.put(sealed), error
        except Exception as exc:  # disk full, I/O error: count every sealed batch as lost
            error = f"store: {type(exc).__name__}: {exc}"
            log.error("cloud: %s", error)
            return rows + self.store.note_loss("store_error", sealed), error

    async def _writer(self, recv: MemoryObjectReceiveStream[tuple[Any, ...]]) -> None:
        # recv stays open when this task is cancelled: what is still queued is _final_flush's to store
        while True:
            first = await recv.receive()
            items = [first]
            while len(items) < 32:  # whatever else is waiting goes into the same transaction
                try:
                    items.append(recv.receive_nowait())
                except anyio.WouldBlock:
                    break
            await self._store_items(items)

    async def _store_items(self, items: Sequence[tuple[Any, ...]]) -> None:
        rows, error = await anyio.to_thread.run_sync(self._seal_and_put, items)
        if error:
            self.counters["store_errors"] += 1
            self._error(error)
        self._committed(rows)

    def _committed(self, rows: Sequence[Row]) -> None:
        for r in rows:
            self.counters["committed"] += 1
            for fn in self.on_commit:
                fn(r)
            if self._live_on:
                self._to_live(r)
            else:
                self._backfill_idle = False
        if rows:
            self._notify()

    async def _records_loop(self) -> None:
        while True:
            await anyio.sleep(self.cfg.event_flush_s)
            self._collect_records()

    def _collect_records(self) -> None:
        events = self.intake.drain_events()
        if events:
            self._emit(("rec", "events", KIND_EVENTS, events), "events", len(events))
        for fr in self.intake.drain_flights():
            self._emit(("flight", fr), "flight", len(fr.timestamp))
        eis = self.intake.drain_eis()
        if eis:
            self._emit(("rec", "eis", KIND_EIS, eis), "eis", len(eis))

    async def _final_flush(self) -> None:
        """Shutdown: sampled rows, pending records and queued items into the store; acked rows deleted."""
        items: list[tuple[Any, ...]] = []
        if self._recv is not None:
            while True:
                try:
                    items.append(self._recv.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
        for s in self.samplers:
            tel = s.take()
            if tel is not None:
                items.append(("tel", s.name, tel))
        events = self.intake.drain_events()
        if events:
            items.append(("rec", "events", KIND_EVENTS, events))
        items += [("flight", fr) for fr in self.intake.drain_flights()]
        eis = self.intake.drain_eis()
        if eis:
            items.append(("rec", "eis", KIND_EIS, eis))
        if self.store.con is None:  # closed under us: nothing can be stored, nor noted as lost there
            if items or self._lost_outside:
                log.error("cloud: store closed at shutdown; %d queued items and %d noted losses not stored",
                          len(items), len(self._lost_outside))
            return
        try:
            rows: list[Row] = []
            if items:  # what cannot be stored, _seal_and_put counts as lost (store_error, encode_error)
                rows, _ = await anyio.to_thread.run_sync(self._seal_and_put, items)
            rows += await self._note_lost_outside()  # e.g. overflow since housekeeping last ran
            for r in rows:
                for fn in self.on_commit:
                    fn(r)
            await self._delete_acked()
        finally:
            await anyio.to_thread.run_sync(self.store.close)

    # -- housekeeping ---------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        last_delete = last_relieve = last_purge = time.monotonic()
        while True:
            await anyio.sleep(HOUSEKEEPING_S)
            now = time.monotonic()
            if self._lost_outside:
                self._committed(await self._note_lost_outside())
            if self._acked and (len(self._acked) >= 256 or now - last_delete >= DELETE_EVERY_S):
                await self._delete_acked()
                last_delete = now
            if self.cfg.fsync_window_s > 0 and self.store.commits_since_sync:
                await anyio.to_thread.run_sync(self.store.sync)
            if now - last_relieve >= RELIEVE_EVERY_S:
                last_relieve = now
                self._committed(await anyio.to_thread.run_sync(self.store.relieve))
            if now - last_purge >= PURGE_EVERY_S:
                last_purge = now
                try:
                    await anyio.to_thread.run_sync(self.store.forget_commands, time.time())
                except sqlite3.Error as exc:  # e.g. disk full: old ids stay remembered until the next purge
                    self._error(f"purge commands: {type(exc).__name__}: {exc}")
                    log.warning("cloud: %s", self.conn["last_error"])

    async def _note_lost_outside(self) -> list[Row]:
        """Losses counted before their batch reached the store: into its loss counters and gap records."""
        lost = list(self._lost_outside)
        if not lost:
            return []
        rows = await anyio.to_thread.run_sync(self._note_losses, lost)
        # removed only once noted: a call cancelled before it ran leaves them to _final_flush
        del self._lost_outside[:len(lost)]
        return rows

    def _note_losses(self, lost: Sequence[tuple[str, str, int, int, int]]) -> list[Row]:
        """Worker thread: one note_loss per loss (each keeps its own stream and time range)."""
        rows: list[Row] = []
        for reason, stream, n, t0, t1 in lost:
            rows += self.store.note_loss(reason, stream=stream, samples=n, t0=t0, t1=t1)
        return rows

    async def _delete_acked(self) -> None:
        ids, self._acked = self._acked, []
        if not ids:
            return
        try:
            await anyio.to_thread.run_sync(self.store.delete, ids)
        except Exception as exc:  # the rows are sent again later: duplicates, not losses
            self._error(f"delete: {type(exc).__name__}: {exc}")
        for i in ids:
            self._acked_pending.discard(i)
            self._claimed.discard(i)
        self._notify()

    def _busy(self) -> frozenset[int]:
        return frozenset(self._claimed)

    # -- lanes ----------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._wake.set()

    async def _wait(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self._wake.wait()
        self._wake = anyio.Event()

    def _claim(self, row_id: int) -> bool:
        if row_id in self._claimed:
            return False
        self._claimed.add(row_id)
        return True

    def _to_live(self, row: Row) -> None:
        if not self._claim(row.id):
            self._backfill_idle = False
            return
        q = self._live.setdefault(row.stream, deque())
        q.append(row)
        while len(q) > self.cfg.live_depth:  # the oldest goes back to the backfill lane
            old = q.popleft()
            self._claimed.discard(old.id)
            self._cursor[old.prio] = min(self._cursor[old.prio], old.id - 1)
            self._backfill_idle = False

    def _start_lanes(self) -> None:
        # refused rows stay paused across connections (mosquitto, for one, disconnects after a refusal)
        self._claimed = set(self._acked_pending) | set(self._refused)
        self._live = {}
        self._buf = deque()
        self._cursor = {PRIO_KEEP: 0, PRIO_TELEMETRY: 0}
        self._backfill_idle = False
        self._backfill_inflight = 0
        self._live_on = True

    def _stop_lanes(self) -> None:
        self._live_on = False
        self._live = {}
        self._buf = deque()
        self._claimed = set(self._acked_pending) | set(self._refused)
        self._backfill_inflight = 0

    def _pick_live(self) -> Row | None:
        keep = [q for q in self._live.values() if q and q[0].prio == PRIO_KEEP]
        if keep:
            return min(keep, key=lambda q: q[0].id).popleft()
        tele = [q for q in self._live.values() if q]
        if not tele:
            return None
        self._rr += 1
        return tele[self._rr % len(tele)].popleft()

    async def _load_page(self) -> None:
        """The next page of the backlog (kept records first); idle only when nothing is left to read."""
        fetched = False
        for prio in (PRIO_KEEP, PRIO_TELEMETRY):
            rows = await anyio.to_thread.run_sync(self.store.fetch, prio, self._cursor[prio], PAGE_ROWS, PAGE_BYTES)
            if rows:
                fetched = True
                self._cursor[prio] = max(self._cursor[prio], rows[-1].id)
                for r in rows:
                    if self._claim(r.id):  # rows already live, in flight or acknowledged are skipped
                        self._buf.append(r)
                if self._buf:
                    return
        if not fetched:
            self._backfill_idle = True

    def _backfill_slots(self) -> int:
        w = self.cfg.inflight
        if self.cfg.bandwidth_cap:
            return max(1, w - 1)
        return max(1, min(w - 1, math.floor(w * self.cfg.backfill_share))) if w > 1 else 1

    async def _dispatch(self, client: Client, tg: anyio.abc.TaskGroup, protocol: str) -> None:
        slots = anyio.Semaphore(self.cfg.inflight)
        while True:
            await slots.acquire()
            row, lane, wait = self._pick_next()
            if row is None:
                slots.release()
                if wait is None and not self._buf and not self._backfill_idle \
                        and self._backfill_inflight < self._backfill_slots():
                    await self._load_page()
                    continue
                await self._wait(wait if wait is not None else 1.0)
                continue
            self._pacer.take(row.size, lane == "hist")
            if lane == "hist":
                self._backfill_inflight += 1
            tg.start_soon(self._publish, client, row, lane, slots, protocol)

    def _retry_refused(self) -> None:
        """Refused rows whose pause is over go back to the backfill lane."""
        if not self._refused:
            return
        now = time.monotonic()
        for rid, (when, row) in list(self._refused.items()):
            if when <= now:
                del self._refused[rid]
                self._claimed.discard(rid)
                self._cursor[row.prio] = min(self._cursor[row.prio], rid - 1)
                self._backfill_idle = False

    def _held(self, row: Row, lane: str) -> bool:
        """Whether the row's topic is paused after a refusal (it then waits with the refused rows)."""
        until = self._paused.get((lane, row.stream))
        if until is None:
            return False
        if until <= time.monotonic():
            del self._paused[(lane, row.stream)]
            return False
        self._refused[row.id] = (until, row)
        return True

    def _pick_next(self) -> tuple[Row | None, str, float | None]:
        """The next row to publish (live first), or how long to wait for the pacer."""
        self._retry_refused()
        wait: float | None = None
        if any(self._live.values()):
            w = self._pacer.wait_live(0)
            if w <= 0:
                while (row := self._pick_live()) is not None:
                    if not self._held(row, "live"):
                        return row, "live", None
            else:
                wait = w
        while self._buf and self._backfill_inflight < self._backfill_slots():
            if self._held(self._buf[0], "hist"):
                self._buf.popleft()
                continue
            w = self._pacer.wait_backfill(self._buf[0].size)
            if w <= 0:
                return self._buf.popleft(), "hist", None
            wait = w if wait is None else min(wait, w)
            break
        return None, "", wait

    async def _publish(self, client: Client, row: Row, lane: str, slots: anyio.Semaphore, protocol: str) -> None:
        topic = self.cfg.topics.render("data" if lane == "live" else "hist", self.site, self.gateway, row.stream)
        props = historical_properties() if lane == "hist" and protocol == "5" else None
        limit = client.max_packet_size
        if limit and publish_packet_size(topic, row.payload, 1, props, protocol == "5") > limit:
            try:
                await self._too_big(row, limit)
            finally:
                slots.release()
                if lane == "hist":
                    self._backfill_inflight -= 1
            return
        self.inflight += 1
        try:
            await client.publish_acked(topic, row.payload, qos=1, properties=props, timeout=self.cfg.ack_timeout_s)
        except PublishRefused as exc:
            # MQTT 5: refused; keep the row and pause it (across reconnects), so the rest keeps flowing
            self.counters["refused"] += 1
            self._error(str(exc))
            self.conn["last_refused"] = str(exc)
            until = time.monotonic() + self.cfg.backoff_max_s
            self._refused[row.id] = (until, row)
            self._paused[(lane, row.stream)] = until
            return
        finally:
            self.inflight -= 1
            slots.release()
            if lane == "hist":
                self._backfill_inflight -= 1
        self._acked.append(row.id)
        self._acked_pending.add(row.id)
        now = time.time()
        self.last_ack = now
        self._ack_window.append((time.monotonic(), row.size))
        self.counters["acked"] += 1
        self.counters["published_live" if lane == "live" else "published_hist"] += 1
        self.counters["published_bytes"] += row.size
        self._notify()

    async def _too_big(self, row: Row, limit: int) -> None:
        """A batch above the broker's Maximum Packet Size (CONNACK): the broker would end the session on
        it, on every connection, so it can never be delivered.  It is dropped and reported (gap record,
        reason ``refused_by_broker``) instead of blocking the link."""
        text = (f"{row.stream}#{row.seq} ({row.size} bytes) exceeds the broker's maximum packet size ({limit}): "
                "dropped and reported as refused_by_broker")
        self.counters["refused"] += 1
        self._error(text)
        self.conn["last_refused"] = text
        log.warning("cloud: %s", text)
        try:
            gaps = await anyio.to_thread.run_sync(self.store.discard, [row.id], "refused_by_broker")
        except sqlite3.Error as exc:  # kept: tried again with the next page (no disconnect either way)
            self._error(f"discard: {type(exc).__name__}: {exc}")
            gaps = []
        self._claimed.discard(row.id)
        self._committed(gaps)

    def _ack_rate(self) -> float:
        now = time.monotonic()
        while self._ack_window and now - self._ack_window[0][0] > 30:
            self._ack_window.popleft()
        if not self._ack_window:
            return 0.0
        span = max(1.0, now - self._ack_window[0][0])
        return sum(b for _, b in self._ack_window) / span

    # -- connection -----------------------------------------------------------------------------

    def _error(self, text: str) -> None:
        self.conn["last_error"] = text
        self.conn["last_error_at"] = time.time()

    def _state_payload(self, state: str, session: int, clean: bool = False) -> bytes:
        return json.dumps({"state": state, "gateway": self.gateway, "site": self.site, "boot": self.boot,
                           "session": session, "clean": clean, "time": time.time()},
                          separators=(",", ":")).encode()

    def birth_payload(self, session: int | None, max_packet: int | None = None) -> bytes:
        """The retained birth message: version, DBC hash, streams and the signal catalogue.

        Without per-signal details when it would exceed ``max_payload`` or the broker's Maximum Packet
        Size (``max_packet``, from its CONNACK): a broker ends the session on a larger packet.
        """
        classes: dict[str, dict[str, Any]] = {
            s.name: {"rate_hz": s.rate_hz, "batch_s": s.batch_s, "signals": s.signals} for s in self.samplers}
        signals: dict[str, dict[str, Any]] = {}
        for s in self.samplers:
            for n in s.signals:
                info = self.catalogue.get(n)
                if info is not None and (info.unit or info.chain):
                    signals[n] = {"unit": info.unit, "chain": [list(p) for p in info.chain]}
        body: dict[str, Any] = {
            "format": 1, "gateway": self.gateway, "site": self.site, "version": self.version, "boot": self.boot,
            "session": session, "time": time.time(), "dbc_hash": self.dbc_hash, "max_payload": self.cfg.max_payload,
            "classes": classes, "signals": signals,
            "streams": {"events": "events", "flight": "flight", "eis": "eis", "gaps": "gaps"},
            "commands": sorted(self.processor.handlers) if self.processor is not None else [],
            "command_auth": self.cfg.commands.auth if self.cfg.commands.enabled else None}
        out = json.dumps(body, separators=(",", ":")).encode()
        if len(out) > self.cfg.max_payload or (max_packet and publish_packet_size(
                self.topic_birth, out, 1, None, True) > max_packet):  # too big for the broker: no per-signal details
            body["signals"] = {}
            body["classes"] = {k: {**v, "signals": len(v["signals"])} for k, v in classes.items()}
            body["truncated"] = True
            out = json.dumps(body, separators=(",", ":")).encode()
        return out

    def _request_birth(self, args: dict[str, Any]) -> Result:
        self._birth_due = True
        return True, "birth will be published"

    async def _connection_loop(self) -> None:
        backoff = Backoff(self.cfg.backoff_min_s, self.cfg.backoff_max_s)
        protocol = "5" if self.cfg.protocol in ("auto", "5") else "3.1.1"
        confirmed = False
        tls = None
        while True:
            self.conn["attempts"] += 1
            started = time.monotonic()
            try:
                if self.cfg.tls.enabled and tls is None:
                    tls = await anyio.to_thread.run_sync(tls_context, self.cfg)
                await self._session(protocol, tls)
            except Exception as exc:
                self._error(_describe(exc))
                log.info("cloud: connection to %s ended: %s", self.conn["broker"], self.conn["last_error"])
            if self._connacked:
                confirmed = True
                if time.monotonic() - started > 10:
                    backoff.reset()
            elif self.cfg.protocol == "auto" and not confirmed and self._socket_opened:
                protocol = "3.1.1" if protocol == "5" else "5"  # connected, but no CONNACK: try the other version
            self.conn["state"] = "waiting"
            delay = backoff.next()
            self.conn["retry_in_s"] = round(delay, 2)
            await anyio.sleep(delay)

    async def _session(self, protocol: str, tls: Any) -> None:
        """One connection: birth, state, command subscription, lanes; raises when it ends."""
        session = await anyio.to_thread.run_sync(self.store.next_session)
        password = await anyio.to_thread.run_sync(self.cfg.read_password)
        self.conn.update(state="connecting", protocol=protocol, session=session)
        kw = client_kwargs(self.cfg, self.cfg.client_id or self.gateway, protocol, self.topic_state,
                           self._state_payload("offline", session), tls, password)
        client = _TrackingClient(**kw)
        self._socket_opened = False
        self._connacked = False
        client.link = self
        entered = False
        graceful = False
        try:
            try:
                await client.__aenter__()
            except aiomqtt.MqttError as exc:
                cause = client.disconnect_cause()
                if cause and cause not in str(exc):  # e.g. TLS 1.3: a certificate alert after the handshake
                    raise aiomqtt.MqttError(f"{exc} ({cause})") from exc
                raise
            entered = True
            self._connacked = True
            self.conn.update(state="connected", since=time.time(), confirmed=protocol, connected_once=True)
            self.conn["connections"] += 1
            self.conn["broker_max_packet"] = client.max_packet_size
            if client.max_packet_size and client.max_packet_size < self.cfg.max_payload + 512:
                warning = (f"broker accepts packets up to {client.max_packet_size} bytes, max_payload is "
                           f"{self.cfg.max_payload}: larger batches are dropped (gap records, refused_by_broker)")
                if warning not in self.warnings:
                    self.warnings.append(warning)
            t = self.cfg.ack_timeout_s
            await client.publish_acked(self.topic_birth, self.birth_payload(session, client.max_packet_size),
                                       retain=True, timeout=t)
            await client.publish_acked(self.topic_state, self._state_payload("online", session), retain=True,
                                       timeout=t)
            if self.processor is not None:
                await client.subscribe(self.topic_cmd + "/#", qos=1, timeout=t)
            self._start_lanes()
            self._notify()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._dispatch, client, tg, protocol)
                tg.start_soon(self._receive, client, session)
        except anyio.get_cancelled_exc_class():
            graceful = True
            raise
        finally:
            self._stop_lanes()
            self.conn["state"] = "disconnected"
            # a clean goodbye only on shutdown: after a failure the broker publishes the will (offline)
            if entered and graceful:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                    with contextlib.suppress(Exception):
                        await client.publish_acked(self.topic_state, self._state_payload("offline", session, True),
                                                   retain=True, timeout=1.0)
                    with contextlib.suppress(Exception):
                        await client.__aexit__(None, None, None)
            client.force_close()

    async def _receive(self, client: Client, session: int) -> None:
        prefix = self.topic_cmd + "/"
        async for msg in client.messages:
            topic = str(msg.topic)
            if not topic.startswith(prefix) or self.processor is None:
                continue
            payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else str(msg.payload or "").encode()
            with anyio.CancelScope(shield=True):  # a staged change is finished (or rolled back), never cut
                outcome = await self.processor.handle(topic[len(prefix):], bytes(payload))
            if self._birth_due:
                self._birth_due = False
                await client.publish_acked(self.topic_birth, self.birth_payload(session, client.max_packet_size),
                                           retain=True,
                                           timeout=self.cfg.ack_timeout_s)
            await client.publish_acked(self.topic_ack, outcome.ack, qos=1, timeout=self.cfg.ack_timeout_s)


class _TrackingClient(Client):
    """Records whether the TCP/TLS connection opened (to tell a refused protocol from an absent broker)."""

    link: CloudLink | None = None

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        if self.link is not None:
            self.link._socket_opened = True
        super()._on_socket_open(client, userdata, sock)

    def disconnect_cause(self) -> str:
        """Why the connection dropped, when the reader saw an error (SSL alert, reset)."""
        fut = self._disconnected
        if fut.done() and not fut.cancelled() and fut.exception() is not None:
            return _describe(fut.exception())  # type: ignore[arg-type]
        return self.last_error

    def force_close(self) -> None:
        """Close the socket even when the broker never answered (no leaked descriptors).

        aiomqtt registers the socket's reader and writer through ``call_soon_threadsafe``; closing
        right away could leave such a callback to run on a closed (or, worse, reused) descriptor, so
        the close is queued behind them and the registrations are removed first.
        """
        paho_client = self._client
        for fut in (self._connected, self._disconnected):  # an exception nobody will await is not "lost"
            if fut.done() and not fut.cancelled():
                fut.exception()
        sock = getattr(paho_client, "_sock", None)
        if sock is None:
            return
        loop = asyncio.get_running_loop()

        def finish() -> None:
            with contextlib.suppress(Exception):
                fd = sock.fileno()
                if fd >= 0:
                    loop.remove_reader(fd)
                    loop.remove_writer(fd)
            with contextlib.suppress(Exception):
                paho_client._sock_close()

        loop.call_soon(finish)


def _samples_of(item: tuple[Any, ...]) -> int:
    if item[0] == "tel":
        return int(item[2].samples)
    if item[0] == "rec":
        return len(item[3])
    if item[0] == "flight":
        return len(item[1].timestamp)
    return 0


def _record_ms(rec: Any) -> int:
    """A record's time in ms since the epoch (``time`` or ``timestamp``, in s), 0 when it has none."""
    for key in ("time", "timestamp"):
        t = rec.get(key) if isinstance(rec, dict) else None
        if isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and 0 < t < 1e11:
            return int(t * 1000)
    return 0


def _describe(exc: BaseException) -> str:
    """The innermost message of an exception (groups unwrapped)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiomqtt.MqttError):
        return f"MQTT: {text}"
    return f"{type(exc).__name__}: {text}"
