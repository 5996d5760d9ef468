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
from gateway.signalmap import SignalMap, resolve
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
            _check_indices(smap, map_path)
            try:
                self.image, ingests = build(covering_families(smap.targets()), [BusSource(BUS, messages, smap)])
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


def _check_indices(smap: SignalMap, path: Path) -> None:
    """Without a site layout the image grows to the largest index: a template error must not make it huge."""
    for b in smap.bindings:
        idx = family_of(b.target)[1]
        if math.prod(i + 1 for i in idx) > MAX_CELLS:
            text = path.read_text(encoding="utf-8")
            raise Loader(path, text).error(f"{b.entry}.to", f"{b.target}: index too large for one gateway "
                                                             f"(at most {MAX_CELLS} elements per family)")
