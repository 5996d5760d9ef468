"""Limit checks with debounce counters, evaluated on every new sample.

Each checked element (a cell, a temperature sensor, the pack current) has an
up/down counter per level. A counter moves only when a *new sample* of that
element arrives (the receive thread calls :meth:`Protection.on_sample` with the
refreshed slot), never on re-reading a stale value: up by 2 when the level is
exceeded, down by 1 when not, so an intermittent fault still accumulates. A
level becomes active when its counter reaches 2 x N, N being the debounce delay
in samples of that element; it clears when the counter is back at 0.

Missing and bad data are faults of their own (MSL, they open the contactors):
a NaN, an invalid flag or a value outside the physical range on a new sample,
and a signal that stops arriving (checked on the 10 ms tick, by its age: whatever
its last frame said). Temperatures are those of ``module[m].temperature[k]`` and
``cell[i].temperature``, whichever the map binds (at least one must be).

An MSL activation calls ``on_trip`` first, so the contactor-open frame is on
the bus before the event is published to anyone else.

Both paths skip work that provably changes nothing, so that the checks stay
cheap at ~1,000 samples/s and 100 ticks/s: a sample of an element whose counters
are all at zero and whose value lies inside every check's first threshold (and
the plausible range) would only step those counters by "not exceeded", which
leaves them at zero; the tick looks at staleness per element only once some
watched source could be stale (see :meth:`Protection.tick`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from gateway.events import Event, Kind, Level
from gateway.image import ProcessImage, Quality
from gateway.limits import CHECKS, Debounce, LimitTable
from gateway.pipeline import TEMPERATURE_FAMILIES

UP, DOWN = 2, 1
STALE = int(Quality.STALE)
# sources that go stale within this many ticks are checked on every tick in plain Python; the others
# through the earliest moment any of them could go stale (see Protection.tick)
FAST_STALE_TICKS = 10
TripHandler = Callable[[Event], None]
EventHandler = Callable[[Event], None]


@dataclass(frozen=True)
class PlausibleRanges:
    """Physical ranges: a value outside is a sensor or wiring fault, not a battery state."""

    cell_voltage_min: float = 0.5
    cell_voltage_max: float = 5.5
    temperature_min: float = -45.0
    temperature_max: float = 130.0
    current_abs_max: float = 2000.0

    def check(self) -> None:
        if not self.cell_voltage_min < self.cell_voltage_max:
            raise ValueError("cell_voltage_min: must be below cell_voltage_max")
        if not self.temperature_min < self.temperature_max:
            raise ValueError("temperature_min: must be below temperature_max")
        if self.current_abs_max <= 0:  # |I| > a negative bound: every current sample would be bad data
            raise ValueError("current_abs_max: must be > 0")


def samples_for(delay_s: float, period_s: float) -> int:
    """Debounce delay in samples of a source with the given period (at least one sample)."""
    if not math.isfinite(period_s) or period_s <= 0:
        return 1
    return max(1, math.ceil(delay_s / period_s - 1e-9))


class LevelCounters:
    """Up/down counters and active flags for one check over n elements and 1 or 3 levels."""

    def __init__(self, name: str, kind: str, thresholds: tuple[float, ...], high: bool, need: list[int]) -> None:
        self.name = name
        self.kind = kind
        self.thresholds = thresholds  # ascending severity: (MOL, RSL, MSL) or (MSL,)
        self.high = high
        self.levels = (Level.MOL, Level.RSL, Level.MSL)[-len(thresholds):]
        n = len(need)
        self.need = [UP * k for k in need]
        self.count = [[0] * n for _ in thresholds]
        self.active = [[False] * n for _ in thresholds]
        self.n_active = [0] * len(thresholds)  # per level, kept in step() so queries need no scan
        self.pending: set[int] = set()  # elements with a non-zero counter at some level

    def severity(self, value: float) -> int:
        """How many levels the value exceeds (0 = none)."""
        n = 0
        for t in self.thresholds:
            if (value > t) if self.high else (value < t):
                n += 1
            else:
                break
        return n

    def step(self, k: int, exceeded: int, value: float, index: int | None, prot: Protection) -> None:
        """One new sample of element k that exceeds ``exceeded`` levels."""
        for j, level in enumerate(self.levels):
            counts, act = self.count[j], self.active[j]
            c = counts[k]
            if exceeded > j:
                c = min(c + UP, self.need[k])
            elif c:
                c -= DOWN
            counts[k] = c
            if not act[k] and c >= self.need[k] and exceeded > j:
                act[k] = True
                self.n_active[j] += 1
                prot.raise_event(self, level, True, index, value, self.thresholds[j])
            elif act[k] and c == 0:
                act[k] = False
                self.n_active[j] -= 1
                prot.raise_event(self, level, False, index, value, self.thresholds[j])
        # count[0] >= count[j] for every level j (level 0 rises whenever a higher one does, all fall
        # together, all saturate at need[k]), so "not pending" means every counter of k is 0 and inactive
        if self.count[0][k]:
            self.pending.add(k)
        else:
            self.pending.discard(k)

    def quiet(self) -> tuple[float, float]:
        """The closed range of values that exceed no level (a NaN is never inside)."""
        t = self.thresholds[0]
        return (-math.inf, t) if self.high else (t, math.inf)

    def any_active(self, level: Level) -> bool:
        return level in self.levels and self.n_active[self.levels.index(level)] > 0

    def active_elements(self) -> list[tuple[Level, int]]:
        # levels with nothing active are not scanned (the status asks once a second)
        return [(lv, k) for j, lv in enumerate(self.levels) if self.n_active[j]
                for k, a in enumerate(self.active[j]) if a]


@dataclass
class _ElementGroup:
    """Checked elements of one family that share a slot: their image and local positions."""

    image_index: list[int]
    local: list[int]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.image_index, self.local, strict=True))


class Protection:
    """All checks of one site; thread-safe (receive threads and the tick thread call in)."""

    def __init__(self, image: ProcessImage, limits: LimitTable, debounce: Debounce, plausible: PlausibleRanges,
                 charge_threshold_a: float = 0.5,
                 tick_s: float = 0.01) -> None:
        self.image = image
        self.limits = limits
        self.debounce = debounce
        self.plausible = plausible
        # the lane connects these: trips to the contactor machine, events to the recorder
        self.on_trip: TripHandler = lambda event: None
        self.on_event: EventHandler = lambda event: None
        self.charge_threshold_a = charge_threshold_a
        self.tick_s = tick_s
        self.lock = threading.RLock()
        self.charging = False
        self.events_raised = 0
        self._msl_active = 0  # active MSL conditions over all checks: tripping() without a scan
        self.deep_discharge_cells: set[int] = set()
        self.on_deep_discharge: Callable[[int, float], None] | None = None
        self._deep_pending: list[tuple[int, float]] = []  # (cell, value) deep discharges not latched yet
        self._exhaustive = False
        self._bind()

    # -- construction ---------------------------------------------------------------

    def _bind(self) -> None:
        img = self.image
        self.cells = self._bound(img.span("cell.voltage"))
        # the temperature elements of every family, one numbering (k) for the temperature checks
        self._temp_groups = [(fam, self._bound(img.span(fam))) for fam in TEMPERATURE_FAMILIES if fam in img.families]
        self.sensors = np.concatenate([np.zeros(0, np.intp), *(idx for _, idx in self._temp_groups)]).astype(np.intp)
        if not self.cells.size:
            raise ValueError("protection needs cell voltages: the signal map binds no cell[i].voltage")
        if not self.sensors.size:  # else no temperature limit would ever be checked, and nothing would say so
            raise ValueError("protection needs temperatures: the signal map binds neither module[m].temperature[k] "
                             "nor cell[i].temperature")
        if "pack.current" not in img.scalars or img.slot_of[img.index("pack.current")] < 0:
            raise ValueError("protection needs pack.current: the signal map does not bind it")
        self.current_index = img.index("pack.current")
        lim, db = self.limits, self.debounce
        self.checks: dict[str, LevelCounters] = {}

        def need(indices: np.ndarray, check: str) -> list[int]:
            return [samples_for(db.delay_s(check), img.period(int(img.slot_of[i]))) for i in indices]

        for name in CHECKS:
            high = CHECKS[name][0] == "high"
            if name.startswith("cell_voltage_") and name != "cell_voltage_spread":
                idx = self.cells
            elif name.startswith("cell_temperature_") and name != "cell_temperature_spread":
                idx = self.sensors
            elif name.startswith("pack_current_"):
                idx = np.array([self.current_index])
            else:  # aggregates: evaluated on the tick at most once per cell-voltage cycle, one element
                period = min(img.period(int(s)) for s in np.unique(img.slot_of[self.cells]))
                self.checks[name] = LevelCounters(name, Kind.LIMIT, lim.get(name).as_tuple(), high,
                                                  [samples_for(db.delay_s(name), period)])
                continue
            self.checks[name] = LevelCounters(name, Kind.LIMIT, lim.get(name).as_tuple(), high, need(idx, name))
        self.deep = LevelCounters("cell_deep_discharge", Kind.LIMIT, (lim.deep_discharge_v,), False,
                                  need(self.cells, "cell_voltage_low"))
        data_delay = db.delay_s("data")

        def bad_data(fam: str, idx: np.ndarray) -> LevelCounters:
            return LevelCounters(f"{fam}_bad_data", Kind.DATA, (0.5,), True,
                                 [samples_for(data_delay, img.period(int(img.slot_of[i]))) for i in idx])

        # one bad-data check per temperature family that is bound (module.temperature always: its name is
        # known to OPC UA), each over all temperature elements (k) so that the checks share one numbering
        temp_bad = [fam for fam, idx in self._temp_groups if idx.size or fam == "module.temperature"]
        self.bad_data = {"cell.voltage": bad_data("cell.voltage", self.cells),
                         **{fam: bad_data(fam, self.sensors) for fam in temp_bad},
                         "pack.current": bad_data("pack.current", np.array([self.current_index]))}
        #: every signal protection depends on (a stale one is a fault)
        self.watched = np.concatenate([self.cells, self.sensors, [self.current_index]]).astype(np.intp)
        self._watched_slots = img.slots(self.watched)
        self._watched_stale_after = img.stale_after[self._watched_slots]
        self._cell_slots = np.unique(img.slots(self.cells))
        stale_ticks = max(1, math.ceil(data_delay / self.tick_s))
        self.stale = LevelCounters("stale_data", Kind.DATA, (0.5,), True, [stale_ticks] * len(self.watched))
        # per slot: which elements of which family it refreshes
        self.by_slot: dict[int, list[tuple[str, _ElementGroup]]] = {}
        first = np.cumsum([0, *(idx.size for _, idx in self._temp_groups)])  # each family's first k
        families = [("cell.voltage", self.cells, 0),
                    *((fam, idx, int(k0)) for (fam, idx), k0 in zip(self._temp_groups, first, strict=False)),
                    ("pack.current", np.array([self.current_index]), 0)]
        for fam, idx, k0 in families:
            for local, i in enumerate(idx, start=k0):
                slot = int(img.slot_of[i])
                groups = self.by_slot.setdefault(slot, [])
                grp = next((g for f, g in groups if f == fam), None)
                if grp is None:
                    grp = _ElementGroup([], [])
                    groups.append((fam, grp))
                grp.image_index.append(int(i))
                grp.local.append(local)
        # what on_sample runs per slot: the family's check with its (image index, element) pairs
        run: dict[str, Callable[[list[tuple[int, int]]], None]] = {
            "cell.voltage": self._cells, "pack.current": self._current,
            **{fam: partial(self._temperatures, self.bad_data[fam], img.families[fam].start)
               for fam, idx in self._temp_groups if idx.size}}
        self._on_slot: dict[int, list[tuple[Callable[[list[tuple[int, int]]], None], list[tuple[int, int]]]]] = {
            slot: [(run[fam], grp.pairs) for fam, grp in groups] for slot, groups in self.by_slot.items()}
        self._cell_checks = (self.checks["cell_voltage_high"], self.checks["cell_voltage_low"], self.deep,
                             self.bad_data["cell.voltage"])
        self._agg_seq = -1
        self._agg_time = -math.inf
        self._agg_period = min(img.period(int(s)) for s in self._cell_slots)
        self._agg_index = np.concatenate([self.cells, self.sensors]).astype(np.intp)
        # staleness on the tick: the sources of the watched signals, split by how soon they go stale
        slots = np.unique(self._watched_slots)
        after = img.stale_after[slots]
        fast = after < FAST_STALE_TICKS * self.tick_s
        self._watched_unique = slots
        self._fast_slots: list[tuple[int, float]] = [(int(s), float(a)) for s, a in zip(slots[fast], after[fast],
                                                                                          strict=True)]
        self._bulk_slots = slots[~fast & np.isfinite(after)]
        self._bulk_after = img.stale_after[self._bulk_slots]
        self._all_received = False
        self._stale_check_at = -math.inf
        self._quiet_bands()

    @property
    def exhaustive(self) -> bool:
        """Step every counter on every sample and look at every element on every tick (no shortcut).

        The reference the shortcuts are tested against: both give the same events in the same order.
        """
        return self._exhaustive

    @exhaustive.setter
    def exhaustive(self, on: bool) -> None:
        with self.lock:
            self._exhaustive = on
            self._quiet_bands()

    def _quiet_bands(self) -> None:
        """Per family, the values that leave an element with all counters at zero untouched (see on_sample)."""
        if self._exhaustive:  # empty bands: no value is quiet
            self._cell_band = self._current_band = (math.inf, -math.inf)
            self._temp_band = {True: self._cell_band, False: self._cell_band}
            return
        p = self.plausible

        def band(*checks: LevelCounters, lo: float, hi: float) -> tuple[float, float]:
            for c in checks:
                a, b = c.quiet()
                lo, hi = max(lo, a), min(hi, b)
            return lo, hi

        c = self.checks
        self._cell_band = band(c["cell_voltage_high"], c["cell_voltage_low"], self.deep,
                               lo=p.cell_voltage_min, hi=p.cell_voltage_max)
        self._temp_band = {
            True: band(c["cell_temperature_high_charge"], c["cell_temperature_low_charge"],
                       lo=p.temperature_min, hi=p.temperature_max),
            False: band(c["cell_temperature_high_discharge"], c["cell_temperature_low_discharge"],
                        lo=p.temperature_min, hi=p.temperature_max)}
        # the discharge check sees -current
        dlo, dhi = c["pack_current_discharge"].quiet()
        self._current_band = band(c["pack_current_charge"], lo=max(-p.current_abs_max, -dhi),
                                  hi=min(p.current_abs_max, -dlo))

    def _bound(self, span: slice) -> np.ndarray:
        idx = np.arange(span.start, span.stop)
        return idx[self.image.slot_of[idx] >= 0]


    # -- events ---------------------------------------------------------------------

    def raise_event(self, check: LevelCounters, level: Level, active: bool, index: int | None, value: float,
                    limit: float) -> None:
        if level == Level.MSL:  # every activation and clearing passes here, right after n_active changed
            self._msl_active += 1 if active else -1
        message = _describe(check, level, active, index, value, limit)
        if check is self.stale and index is not None:
            message = f"{self.image.name_of(index)}: {'stopped arriving' if active else 'arriving again'}"
        ev = Event(check.kind, check.name, level, active, index, _finite(value), _finite(limit), message)
        self.events_raised += 1
        if active and level == Level.MSL:
            self.on_trip(ev)  # the contactors open before anyone else hears of it
            if check is self.deep and index is not None:
                # the latch is written (fsynced) once the lock is released, by this same thread before it
                # goes on (see _latch_deep_discharge): the other threads need not wait for the disk
                self._deep_pending.append((index, value))
        self.on_event(ev)

    # -- per sample (receive threads) -----------------------------------------------------

    def on_sample(self, slot: int) -> None:
        """A slot was refreshed: step the counters of the elements it carries."""
        work = self._on_slot.get(slot)
        if work is None:
            return
        with self.lock:
            for run, pairs in work:
                run(pairs)
        if self._deep_pending:
            self._latch_deep_discharge()

    def _latch_deep_discharge(self) -> None:
        """Hand the deep discharges found under the lock to ``on_deep_discharge`` (a disk write), outside it.

        The contactors are already open, and a reset stays refused while the cell is below the limit (an
        active MSL), so nothing can close them before the latch is on disk.
        """
        with self.lock:
            pending, self._deep_pending = self._deep_pending, []
        if self.on_deep_discharge is not None:
            for cell, value in pending:
                self.on_deep_discharge(cell, value)

    def _value(self, i: int, lo: float, hi: float) -> float | None:
        """The sample's value, or None when it is bad data (flag, NaN, implausible)."""
        v = self.image.w_value[i]
        if not self.image.w_valid[i] or not lo <= v <= hi:  # NaN fails the range test too
            return None
        return v

    def _cells(self, pairs: list[tuple[int, int]]) -> None:
        hi, lo, deep, bad = self._cell_checks
        values, valid = self.image.w_value, self.image.w_valid
        qlo, qhi = self._cell_band
        hp, lp, dp, bp = hi.pending, lo.pending, deep.pending, bad.pending
        for i, k in pairs:
            if valid[i] and qlo <= values[i] <= qhi and k not in hp and k not in lp and k not in dp and k not in bp:
                continue  # every step would be "not exceeded" on counters at zero: nothing changes
            p = self.plausible
            v = self._value(i, p.cell_voltage_min, p.cell_voltage_max)
            cell = self._cell_number(i)
            if v is None:
                bad.step(k, 1, self.image.w_value[i], cell, self)
                continue
            bad.step(k, 0, v, cell, self)
            hi.step(k, hi.severity(v), v, cell, self)
            lo.step(k, lo.severity(v), v, cell, self)
            deep.step(k, deep.severity(v), v, cell, self)

    def _temperatures(self, bad: LevelCounters, first: int, pairs: list[tuple[int, int]]) -> None:
        """Temperature elements of one family (``bad``: its bad-data check; ``first``: its image start).

        Events name the element by its position in its family (sensor or cell number).
        """
        p = self.plausible
        charging = self.charging
        modes = ((self.checks["cell_temperature_high_charge"], charging),
                 (self.checks["cell_temperature_low_charge"], charging),
                 (self.checks["cell_temperature_high_discharge"], not charging),
                 (self.checks["cell_temperature_low_discharge"], not charging))
        values, valid = self.image.w_value, self.image.w_valid
        qlo, qhi = self._temp_band[charging]
        pending = [bad.pending, *(chk.pending for chk, _ in modes)]
        for i, k in pairs:
            if valid[i] and qlo <= values[i] <= qhi and not any(k in s for s in pending):
                continue
            v = self._value(i, p.temperature_min, p.temperature_max)
            sensor = i - first
            if v is None:
                bad.step(k, 1, self.image.w_value[i], sensor, self)
                continue
            bad.step(k, 0, v, sensor, self)
            for chk, applies in modes:
                # the other mode's limits do not apply: its counters decay and clear
                chk.step(k, chk.severity(v) if applies else 0, v, sensor, self)

    def _current(self, pairs: list[tuple[int, int]] | None = None) -> None:
        lim = self.plausible.current_abs_max
        bad = self.bad_data["pack.current"]
        chg, dis = self.checks["pack_current_charge"], self.checks["pack_current_discharge"]
        i = self.current_index
        raw = self.image.w_value[i]
        qlo, qhi = self._current_band
        if self.image.w_valid[i] and qlo <= raw <= qhi and not (bad.pending or chg.pending or dis.pending):
            self.charging = raw > self.charge_threshold_a
            return
        v = self._value(i, -lim, lim)
        if v is None:
            bad.step(0, 1, self.image.w_value[self.current_index], None, self)
            return
        bad.step(0, 0, v, None, self)
        self.charging = v > self.charge_threshold_a
        chg.step(0, chg.severity(v), v, None, self)
        dis.step(0, dis.severity(-v), -v, None, self)

    def _cell_number(self, i: int) -> int:
        return i - self.image.families["cell.voltage"].start

    # -- the 10 ms tick (supervision thread) ----------------------------------------------

    def tick(self, now: float) -> None:
        """Staleness of every watched signal, and the aggregate checks when their inputs are new."""
        img = self.image
        fresh = not (self.stale.pending or self._exhaustive or self._maybe_stale(now))
        if not fresh:
            self._staleness(now)
        # the aggregates' "sample": new cell data, taken at most at the cell-voltage cycle
        if now - self._agg_time >= self._agg_period:
            seq = int(img.seq[self._cell_slots].sum())
            if seq != self._agg_seq:
                with self.lock:
                    self._agg_seq = seq
                    self._agg_time = now
                    self._aggregates(now)

    def _maybe_stale(self, now: float) -> bool:
        """Whether some watched source could be stale at ``now`` (False: none is, so no element is STALE).

        Sources only ever move their receive time forward, so the earliest moment any of the slow ones
        could go stale is computed once and holds until it has passed; the fast ones (the pack current)
        are looked at every tick. Until every watched source has been received once, always True.
        """
        img = self.image
        if not self._all_received:
            self._all_received = bool((img.seq[self._watched_unique] > 0).all())
            return True
        mono = img.w_rx_mono
        for slot, after in self._fast_slots:
            if now - mono[slot] > after:
                return True
        if now > self._stale_check_at:
            if self._bulk_slots.size:
                # a margin far above float rounding, so that now <= this really means now - rx <= stale_after
                self._stale_check_at = float((img.rx_mono[self._bulk_slots] + self._bulk_after).min()) - 1e-6
            else:
                self._stale_check_at = math.inf
            return now > self._stale_check_at
        return False

    def _staleness(self, now: float) -> None:
        img = self.image
        watched = self.watched
        snap = img.snapshot(watched, now)  # the values reported are those the qualities were judged on
        with self.lock:
            stale = self.stale
            # a signal never received yet is not "stopped": the contactor machine stays in INIT instead
            received = snap.seq > 0
            # by age, not by quality alone: INVALID outranks STALE there, so a source whose last frames were
            # flagged invalid and that then falls silent would read INVALID forever, and the bad-data check
            # (moved by new samples only) would never see another one. Silence is a fault whatever came last.
            is_stale = (snap.quality == STALE) | (snap.age_s > self._watched_stale_after)
            counts, need = stale.count[0], stale.need
            for k in np.flatnonzero(is_stale & received).tolist():
                if counts[k] < need[k]:  # saturated and active: nothing changes
                    stale.step(k, 1, float(snap.value[k]), int(watched[k]), self)
            for j in [j for j in stale.pending if not is_stale[j]]:
                stale.step(j, 0, float(snap.value[j]), int(watched[j]), self)

    def _aggregates(self, now: float) -> None:
        """Spreads and the pack voltage mismatch over the good cells and sensors."""
        img = self.image
        n = self.cells.size  # cells and sensors in one read and one quality evaluation
        # one snapshot, not the value then its flag: P0's receive threads write between any two reads of this thread
        snap = img.snapshot(self._agg_index, now)
        values, q = snap.value, snap.quality == Quality.GOOD
        cv, good, tv, tgood = values[:n], q[:n], values[n:], q[n:]
        n_good, t_good = int(good.sum()), int(tgood.sum())
        if n_good >= 2:
            g = cv if n_good == n else cv[good]
            spread = float(g.max() - g.min())
            c = self.checks["cell_voltage_spread"]
            c.step(0, c.severity(spread), spread, None, self)
        if t_good >= 2:
            g = tv if t_good == tv.size else tv[tgood]
            spread = float(g.max() - g.min())
            c = self.checks["cell_temperature_spread"]
            c.step(0, c.severity(spread), spread, None, self)
        if "pack.voltage" in img.scalars and n_good == n:
            pv = img.read("pack.voltage", now)
            if pv.quality == Quality.GOOD:
                diff = abs(pv.value - float(cv.sum()))
                c = self.checks["pack_voltage_mismatch"]
                c.step(0, c.severity(diff), diff, None, self)

    def set_limits(self, table: LimitTable) -> None:
        """New thresholds (already validated against the hardware limits); counters carry on."""
        with self.lock:
            self.limits = table
            for name, chk in self.checks.items():
                chk.thresholds = table.get(name).as_tuple()
            self.deep.thresholds = (table.deep_discharge_v,)
            self._quiet_bands()

    # -- state for reset, alarms and derating ----------------------------------------------

    def tripping(self) -> bool:
        """Some MSL condition is active: :meth:`trip_causes` is not empty (without a scan; every tick asks)."""
        return self._msl_active > 0

    def trip_causes(self) -> list[str]:
        """Active MSL conditions (each prevents leaving ERROR)."""
        with self.lock:
            out = []
            for chk in [*self.checks.values(), self.deep, *self.bad_data.values(), self.stale]:
                if chk.any_active(Level.MSL):
                    out.append(f"{chk.name} ({chk.n_active[-1]} active)")
            return out

    def active(self) -> list[dict[str, Any]]:
        """Every active condition with its level and element."""
        with self.lock:
            rows = []
            for chk in [*self.checks.values(), self.deep, *self.bad_data.values(), self.stale]:
                for level, k in chk.active_elements():
                    rows.append({"check": chk.name, "level": level.name, "element": k})
            return rows

    def derate(self) -> bool:
        """An RSL condition is active: the control loop should reduce the current limits."""
        with self.lock:
            return any(c.any_active(Level.RSL) for c in self.checks.values())


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _describe(check: LevelCounters, level: Level, active: bool, index: int | None, value: float,
              limit: float) -> str:
    where = f" at {index}" if index is not None else ""
    state = "exceeded" if active else "cleared"
    if check.kind == Kind.DATA:
        return f"{check.name}{where}: {'bad or missing data' if active else 'data good again'}"
    unit = CHECKS.get(check.name, ("", "V", ""))[1]
    return f"{check.name}{where} {level.name} {state}: {value:.4g} {unit} (limit {limit:.4g})"
