"""Replaying a recorded trace through the same decode pipeline as the live daemon."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.dbcfile import load_dbc, merge
from gateway.decode import Decoder, frame_record
from gateway.image import ProcessImage, Quality
from gateway.ingest import Ingest
from gateway.pipeline import BusSource, build, covering_families
from gateway.signalmap import resolve
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

    def as_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "decoded": self.decoded, "unknown_id_frames": sum(self.unknown_id.values()),
                "unknown_ids": self.unknown_id, "decode_error_frames": sum(self.errors.values()),
                "decode_errors": self.errors, "error_frames": self.error_frames}


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
            self.image, ingests = build(covering_families(smap.targets()), [BusSource(BUS, messages, smap)])
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
