"""The process image: latest value, timestamp and quality of every canonical signal.

The buffers live in anonymous shared memory (mmap), so the P0 process that
decodes and protects writes them and the daemon's main process reads the very
same memory. Writers store through typed memoryviews, whose item assignment is
several times cheaper from Python than numpy's; readers get zero-copy numpy
views, so protection, estimators, OPC UA and the recorder read per-cell arrays
without copying anything per frame.

Timestamps are kept per *slot* (one slot per frame ID and multiplexer page),
not per signal: every signal a frame carries shares the frame's time, so a
frame costs one timestamp write however many signals it holds.  A signal's
quality is derived when read: INVALID when its validity flag says so or its
value is NaN, STALE when its slot has not been refreshed within
``stale_cycles`` cycle times (or never), GOOD otherwise.

Nothing locks the image, so each slot carries two frame counters that let a
reader tell a whole frame from one being written (a seqlock): the writer
stores ``begun[slot] = seq[slot] + 1`` before its first store and ``seq[slot]``
to that number after its last; a reader loads ``seq``, then the data, then
``begun``, and its copy is one frame's when ``begun <= seq`` (no write was in
progress when it started, none began since).  Without this a reader pairs one
frame's value with the next frame's validity flag or time: a value its sensor
flagged invalid would read as GOOD.  Writers that only count ``seq`` (values
the main process derives and writes itself) leave ``begun`` at 0 and are read
as before.  The order of plain stores and loads between cores that this needs
is what x86-64 guarantees; AArch64 promises it only with barriers, which
Python cannot issue.
"""

from __future__ import annotations

import fnmatch
import math
import mmap
import re
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from operator import itemgetter
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

_NAME = re.compile(r"^([a-z_][a-z0-9_]*)(\[\d+\])?(\.[a-z_][a-z0-9_]*(\[\d+\])?)*$")
_INDEX = re.compile(r"\[(\d+)\]")


class Quality(IntEnum):
    """Quality of a value; the worst of these wins everywhere downstream."""

    GOOD = 0
    STALE = 1
    INVALID = 2


# the members as plain module globals: an enum class attribute costs ~0.1 us per lookup on 3.11, and
# quality_of runs on every protection tick
_GOOD, _STALE, _INVALID = Quality.GOOD, Quality.STALE, Quality.INVALID

# Pauses before each new attempt at a slot whose writer was between its first and last store. A frame's
# stores take well under a microsecond, so the first retries come at once (even a writer rewriting one slot
# back to back leaves gaps a retry finds); a sleep then releases the GIL (a writer thread of this process may
# be waiting for it mid-frame, for up to P0's 0.5 ms switch interval) and the CPU. After the last, the slot
# reads STALE (no current whole frame, whatever the mixed flags say) rather than waiting behind a writer that
# stopped: a handler that failed mid-frame leaves its slot so until the slot's next frame.
_RETRY_PAUSES_S = (0.0,) * 8 + (1e-5, 1e-4, 1e-3)

_T = TypeVar("_T")


def family_of(name: str) -> tuple[str, tuple[int, ...]]:
    """Split ``module[3].temperature[1]`` into (``module.temperature``, (3, 1))."""
    if not _NAME.match(name):
        raise ValueError(f"'{name}' is not a canonical signal name (like pack.current or cell[3].voltage)")
    return _INDEX.sub("", name), tuple(int(i) for i in _INDEX.findall(name))


@dataclass(frozen=True)
class Family:
    """A block of signals with one shape, e.g. cell.voltage of shape (224,)."""

    name: str
    start: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def element(self, index: tuple[int, ...]) -> int:
        """Flat position of an element, or ValueError when outside the shape."""
        if len(index) != len(self.shape) or any(not 0 <= i < n for i, n in zip(index, self.shape, strict=True)):
            raise ValueError(f"index {list(index)} is outside {self.name} of shape {list(self.shape)}")
        return self.start + int(np.ravel_multi_index(index, self.shape))

    def element_name(self, flat: int) -> str:
        idx = iter(np.unravel_index(flat - self.start, self.shape))
        parts = self.name.split(".")
        return ".".join(f"{p}[{next(idx)}]" if k < len(self.shape) else p for k, p in enumerate(parts))


_DTYPES = {"d": np.float64, "b": np.int8, "Q": np.uint64}


def _shared(fmt: str, n: int, fill: float) -> tuple[memoryview, Any]:
    """A typed memoryview and a numpy view over new anonymous shared memory (kept across fork)."""
    dtype = np.dtype(_DTYPES[fmt])
    mm = mmap.mmap(-1, max(1, n) * dtype.itemsize)
    view = np.frombuffer(mm, dtype=dtype, count=n)
    view[:] = fill
    return memoryview(mm)[: n * dtype.itemsize].cast(fmt), view  # type: ignore[call-overload]


@dataclass(frozen=True)
class Reading:
    """One signal as read from the image."""

    name: str
    value: float
    quality: Quality
    timestamp: float  # adapter receive time (wall clock, s); NaN when never received
    age_s: float  # monotonic seconds since the last update; inf when never received


class Snapshot(NamedTuple):
    """Selected signals read together: the entries of the signals of one slot come from one frame."""

    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.int8]
    timestamp: npt.NDArray[np.float64]  # as in Reading
    age_s: npt.NDArray[np.float64]
    seq: npt.NDArray[np.uint64]  # frames the signal's slot has received: tells a new frame from the last one


class ProcessImage:
    """Latest values of all canonical signals, shaped by families and scalars."""

    def __init__(self, families: dict[str, tuple[int, ...]], scalars: Iterable[str], stale_cycles: float = 3.0) -> None:
        self.stale_cycles = stale_cycles
        self.families: dict[str, Family] = {}
        pos = 0
        for name, shape in families.items():
            fam = Family(name, pos, tuple(shape))
            self.families[name] = fam
            pos += fam.size
        self.scalars: dict[str, int] = {}
        for name in scalars:
            if name not in self.scalars:
                self.scalars[name] = pos
                pos += 1
        self.size = pos
        # writer side: memoryviews; reader side: numpy views of the same (shared) memory
        self.w_value, self.value = _shared("d", pos, math.nan)
        self.w_valid, self.valid = _shared("b", pos, 1)
        self.w_slot = array("i", [-1]) * pos  # fixed once built: private to each process
        self.slot_of: npt.NDArray[np.int32] = np.frombuffer(self.w_slot, dtype=np.int32)
        self.slot_names: list[str] = []
        self._slot_period: list[float] = []
        self._frozen = False

    # -- building ---------------------------------------------------------

    def index(self, name: str) -> int:
        """Flat position of a canonical signal; KeyError names what exists."""
        if name in self.scalars:
            return self.scalars[name]
        fam_name, idx = family_of(name)
        fam = self.families.get(fam_name)
        if fam is None or not idx:
            raise KeyError(f"no signal '{name}' in the process image")
        return fam.element(idx)

    def add_slot(self, name: str, period_s: float | None) -> int:
        """Register a source (frame ID + page) and its expected cycle time."""
        if self._frozen:
            raise RuntimeError("slots must be added before freeze()")
        self.slot_names.append(name)
        self._slot_period.append(period_s if period_s and period_s > 0 else math.inf)
        return len(self.slot_names) - 1

    def period(self, slot: int) -> float:
        """Expected cycle time of a slot in seconds (inf when unknown or unbound)."""
        return self._slot_period[slot] if 0 <= slot < len(self._slot_period) else math.inf

    def bind(self, signal: int, slot: int) -> None:
        """Declare that a slot's frames carry a signal."""
        if self.w_slot[signal] not in (-1, slot):
            raise ValueError(f"{self.name_of(signal)} already has a source ({self.slot_names[self.w_slot[signal]]})")
        self.w_slot[signal] = slot

    def freeze(self) -> None:
        """Allocate the per-slot buffers once every slot is known."""
        n = len(self.slot_names) + 1  # last slot: "never" for unbound signals
        self.w_rx_time, self.rx_time = _shared("d", n, math.nan)
        self.w_rx_mono, self.rx_mono = _shared("d", n, -math.inf)
        self.w_seq, self.seq = _shared("Q", n, 0)  # frames finished; written after a frame's last store
        self.w_begun, self.begun = _shared("Q", n, 0)  # frames begun; written before its first (module doc)
        self._positions = np.arange(self.size, dtype=np.intp)  # a selection as flat positions
        self.stale_after = np.array([*self._slot_period, math.inf], dtype=np.float64) * self.stale_cycles
        self._slot_idx = np.where(self.slot_of < 0, n - 1, self.slot_of).astype(np.intp)
        # plain-Python copies for single-signal reads, where numpy's per-call overhead dominates
        self._slot_list: list[int] = self._slot_idx.tolist()
        self._stale_after_list: list[float] = self.stale_after.tolist()
        self._frozen = True

    # -- reading ----------------------------------------------------------

    def slots(self, sel: slice | npt.NDArray[np.intp] | Sequence[int]) -> npt.NDArray[np.intp]:
        """Slot of each selected signal (unbound signals point at a never-updated slot)."""
        return self._slot_idx[sel]

    def name_of(self, flat: int) -> str:
        for fam in self.families.values():
            if fam.start <= flat < fam.start + fam.size:
                return fam.element_name(flat)
        for name, pos in self.scalars.items():
            if pos == flat:
                return name
        raise IndexError(flat)

    def names(self) -> list[str]:
        """Every canonical signal name, in image order."""
        out = [fam.element_name(i) for fam in self.families.values() for i in range(fam.start, fam.start + fam.size)]
        return out + list(self.scalars)

    def span(self, family: str) -> slice:
        fam = self.families[family]
        return slice(fam.start, fam.start + fam.size)

    def array(self, family: str) -> npt.NDArray[np.float64]:
        """Zero-copy view of a family's values in its shape (do not write to it)."""
        fam = self.families[family]
        return self.value[fam.start : fam.start + fam.size].reshape(fam.shape)

    def snapshot(self, sel: slice | npt.NDArray[np.intp] | Sequence[int], now: float | None = None) -> Snapshot:
        """Values, qualities and times of the selected signals, each slot's from one frame (vectorised).

        Read values together with their quality here: a frame arriving between a read of :attr:`value`
        and a call of :meth:`quality` pairs one frame's value with the next one's flag.
        """
        now = time.monotonic() if now is None else now
        idx = self._positions[sel]
        slots = self._slot_idx[idx]
        seq = self.seq[slots]  # (fancy indexing copies: the check below holds for exactly these copies)
        value, valid, wall, mono = self.value[idx], self.valid[idx], self.rx_time[slots], self.rx_mono[slots]
        torn = self.begun[slots] > seq
        # the few slots a writer was in are read again one by one, without numpy: such a read's window is far
        # shorter than this one's, short enough to fit between the frames of a writer rewriting a slot flat out
        for slot in np.unique(slots[torn]).tolist():
            k = np.flatnonzero(slots == slot)  # all of the slot's signals, so that they stay one frame's
            get = itemgetter(*idx[k].tolist())  # a scalar for one signal, a tuple for more: both assign to [k]
            (value[k], valid[k]), wall[k], mono[k], seq[k], whole = self._load(
                slot, lambda: (get(self.w_value), get(self.w_valid)))  # noqa: B023 - called at once
            torn[k] = not whole
        # never received is missing data (stale), not a bad value; a torn copy is not judged by its mixed flags
        received = seq > 0
        stale = torn | ~received | ((now - mono) > self.stale_after[slots])
        invalid = ~torn & ((valid == 0) | (np.isnan(value) & received))
        quality = np.where(invalid, _INVALID, np.where(stale, _STALE, _GOOD)).astype(np.int8)
        return Snapshot(value, quality, wall, now - mono, seq)

    def quality(self, sel: slice | npt.NDArray[np.intp] | Sequence[int], now: float | None = None) -> npt.NDArray[np.int8]:
        """Quality codes of the selected signals (vectorised)."""
        return self.snapshot(sel, now).quality

    def family_snapshot(self, family: str, now: float | None = None) -> Snapshot:
        """:meth:`snapshot` of a whole family, every array in the family's shape."""
        shape = self.families[family].shape
        s = self.snapshot(self.span(family), now)
        return Snapshot(s.value.reshape(shape), s.quality.reshape(shape), s.timestamp.reshape(shape),
                        s.age_s.reshape(shape), s.seq.reshape(shape))

    def family_quality(self, family: str, now: float | None = None) -> npt.NDArray[np.int8]:
        return self.family_snapshot(family, now).quality

    def _load(self, slot: int, load: Callable[[], _T]) -> tuple[_T, float, float, int, bool]:
        """What ``load`` reads of a slot's signals, the slot's receive times and seq, and whether all of it is
        one frame's (False once the retries are spent)."""
        seq, begun = self.w_seq, self.w_begun
        pauses = iter(_RETRY_PAUSES_S)
        while True:
            s = seq[slot]
            got, wall, mono = load(), self.w_rx_time[slot], self.w_rx_mono[slot]
            if begun[slot] <= s:
                return got, wall, mono, s, True
            if (pause := next(pauses, None)) is None:
                return got, wall, mono, s, False
            if pause:
                time.sleep(pause)

    def _one(self, i: int, now: float) -> tuple[float, Quality, float, float]:
        """Value, quality, receive time and monotonic receive time of one signal, from one frame.

        The same rules as :meth:`snapshot`, without numpy, whose per-call cost dominates a single read.
        """
        slot = self._slot_list[i]
        value, valid = self.w_value, self.w_valid
        (v, ok), wall, mono, s, whole = self._load(slot, lambda: (value[i], valid[i]))
        if not whole:
            return v, _STALE, wall, mono
        if not ok or (v != v and s > 0):
            return v, _INVALID, wall, mono
        if not s or now - mono > self._stale_after_list[slot]:
            return v, _STALE, wall, mono
        return v, _GOOD, wall, mono

    def quality_of(self, i: int, now: float) -> Quality:
        """Quality of one signal (the same rule as :meth:`quality`, without numpy)."""
        return self._one(i, now)[1]

    def read(self, name: str, now: float | None = None) -> Reading:
        """One signal with its quality and age."""
        now = time.monotonic() if now is None else now
        v, q, wall, mono = self._one(self.index(name), now)
        return Reading(name, v, q, wall, now - mono)

    def select(self, pattern: str = "*") -> list[str]:
        """Names matching a shell-style glob (``cell[1*].voltage``, ``pack.*``)."""
        names = self.names()
        if pattern == "*":
            return names
        # [ and ] are literal in our names, not glob character classes
        literal = "".join({"[": "[[]", "]": "[]]"}.get(c, c) for c in pattern)
        rx = re.compile(fnmatch.translate(literal))
        return [n for n in names if rx.match(n)]
