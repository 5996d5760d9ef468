"""Replaying a recorded trace through the same decode pipeline as the live daemon."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.dbcfile import load_dbc, merge
from gateway.decode import Decoder, frame_record
from gateway.image import ProcessImage, Quality, family_of
from gateway.ingest import Ingest
from gateway.pipeline import MAX_CELLS, BusSource, build, covering_families
from gateway.schema import ConfigError, Loader
from gateway.signalmap import Binding, SignalMap, resolve
from gateway.tracefile import Trace

BUS = "replay"


@dataclass
class ReplayStats:
    """What the replay decoded and what it could not."""

    frames: int = 0
    decoded: int = 0
    unknown_id: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    error_frames: int = 0
    remote_frames: int = 0  # RTR requests: carry no data, so neither decoded nor errors

    def as_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "decoded": self.decoded, "unknown_id_frames": sum(self.unknown_id.values()),
                "unknown_ids": self.unknown_id, "decode_error_frames": sum(self.errors.values()),
                "decode_errors": self.errors, "error_frames": self.error_frames, "remote_frames": self.remote_frames}


class Replay:
    """Decodes a trace frame by frame; with a map, also fills a process image."""

    def __init__(self, trace: Trace, dbc_paths: list[Path], map_path: Path | None = None) -> None:
        self.trace = trace
        dbcs = [load_dbc(p) for p in dbc_paths]
        self.warnings = [f"{d.path}: {w}" for d in dbcs for w in d.warnings]
        messages = merge(dbcs, "--dbc")
        self.decoder = Decoder(messages)
        self.stats = ReplayStats()
        self.image: ProcessImage | None = None
        self.ingest: Ingest | None = None
        self._now = 0.0
        if map_path is not None:
            smap = resolve(map_path, messages)
            families = covering_families(smap.targets())
            _check_sizes(families, smap, map_path)
            try:
                self.image, ingests = build(families, [BusSource(BUS, messages, smap)])
            except ValueError as exc:  # a bad map is a bad input (exit 2), not a crash
                raise ConfigError(map_path, "", str(exc).removeprefix(f"{smap.source}: ")) from None
            self.ingest = ingests[BUS]
            # staleness follows the trace's own clock, not the replay's speed
            self.ingest.clock = lambda: self._now

    def frames(self) -> Iterator[dict[str, Any]]:
        """Each frame as a record with its decoded signals or the reason it was not decoded."""
        st = self.stats
        for msg in self.trace:
            st.frames += 1
            self._now = msg.timestamp
            rec = frame_record(msg, BUS, self.decoder)
            if msg.is_error_frame:
                st.error_frames += 1
            elif msg.is_remote_frame:
                st.remote_frames += 1
            elif "signals" in rec:
                st.decoded += 1
            else:
                key = f"0x{msg.arbitration_id:X}"
                table = st.unknown_id if rec.get("decode_error") == "unknown ID" else st.errors
                table[key] = table.get(key, 0) + 1
            if self.ingest is not None and not msg.is_error_frame:
                self.ingest.on_frame(msg)
            yield rec

    def signals(self) -> list[dict[str, Any]]:
        """The process image at the end of the trace (mapped signals that were received)."""
        img = self.image
        if img is None:
            return []
        out = []
        for name in img.names():
            i = img.index(name)
            if img.slot_of[i] < 0 or img.seq[img.slots([i])[0]] == 0:
                continue
            r = img.read(name, self._now)
            out.append({"name": name, "value": r.value, "quality": Quality(r.quality).name.lower(),
                        "timestamp": r.timestamp})
        return out


def _check_sizes(families: dict[str, tuple[int, ...]], smap: SignalMap, path: Path) -> None:
    """Without a site layout each family grows to the largest index of each dimension over all bindings:
    a template error, or bindings that are small one by one, must not make it huge. The error names the
    entries that set those largest indices (the last of them, in map order, is where it is reported)."""
    for fam, shape in families.items():
        if math.prod(shape) <= MAX_CELLS:
            continue
        culprits: list[Binding] = []
        claimed: set[int] = set()
        for b in smap.bindings:
            name, idx = family_of(b.target)
            if name != fam:
                continue
            reach = {d for d, (i, n) in enumerate(zip(idx, shape, strict=False)) if i + 1 == n} - claimed
            if reach:
                claimed |= reach
                culprits.append(b)
        last, others = culprits[-1], ", ".join(f"{b.entry} ({b.target})" for b in culprits[:-1])
        size = " x ".join(map(str, shape))
        raise Loader(path, path.read_text(encoding="utf-8")).error(
            f"{last.entry}.to", f"{last.target}: {f'with {others} ' if others else ''}the family {fam} grows to "
                                f"{size} elements, too large for one gateway (at most {MAX_CELLS} per family)")
