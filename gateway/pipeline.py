"""Assembles DBCs, signal maps and the site layout into a process image and per-bus ingests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cantools.database.can import Message

from gateway.image import ProcessImage, family_of
from gateway.ingest import Ingest
from gateway.signalmap import SignalMap

MAX_CELLS = 20_000  # far beyond one edge box's CAN bandwidth (the reference site has 224)


# where cell temperatures come from (docs/configuration.md section 11): a map binds the sensors per
# module, per cell, or both; protection, the estimators and the status read whichever it binds
TEMPERATURE_FAMILIES = ("module.temperature", "cell.temperature")


@dataclass(frozen=True)
class Layout:
    """Site layout: strings of modules of cells in series, sensors per module."""

    strings: int = 1
    modules_per_string: int = 16
    cells_per_module: int = 14
    sensors_per_module: int = 2

    @property
    def modules(self) -> int:
        return self.strings * self.modules_per_string

    @property
    def cells(self) -> int:
        return self.modules * self.cells_per_module

    def check(self) -> None:
        for name in ("strings", "modules_per_string", "cells_per_module"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if self.sensors_per_module < 0:
            raise ValueError("sensors_per_module: must be >= 0")
        # a typo such as 140000 cells would otherwise end in a MemoryError while the image is built
        if self.cells > MAX_CELLS:
            raise ValueError(f"cells_per_module: {self.cells} cells in all; one gateway handles at most {MAX_CELLS}")
        if self.modules * self.sensors_per_module > MAX_CELLS:
            raise ValueError(f"sensors_per_module: {self.modules * self.sensors_per_module} sensors in all; "
                             f"one gateway handles at most {MAX_CELLS}")

    def families(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the per-cell/per-module families every image carries."""
        cells, modules = (self.cells,), (self.modules,)
        return {
            "cell.voltage": cells,
            "cell.temperature": cells,
            "cell.balancing": cells,
            "module.temperature": (self.modules, self.sensors_per_module),
            "module.board_temperature": modules,
            "module.voltage": modules,
            "module.state": modules,
            "module.fault": modules,
            "string.current": (self.strings,),
            "string.voltage": (self.strings,),
        }


@dataclass(frozen=True)
class BusSource:
    """What one bus contributes: its DBC messages and resolved signal map."""

    bus: str
    messages: Sequence[Message]
    signal_map: SignalMap


def covering_families(targets: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Family shapes just large enough for the given targets (for replay without a site layout)."""
    shapes: dict[str, list[int]] = {}
    for t in targets:
        fam, idx = family_of(t)
        if idx:
            cur = shapes.setdefault(fam, [0] * len(idx))
            shapes[fam] = [max(a, i + 1) for a, i in zip(cur, idx, strict=False)]
    return {k: tuple(v) for k, v in shapes.items()}


def build(families: dict[str, tuple[int, ...]], sources: Sequence[BusSource], stale_cycles: float = 3.0,
          derived: Mapping[str, tuple[float | None, Sequence[str]]] | None = None,
          ) -> tuple[ProcessImage, dict[str, Ingest]]:
    """Create the image and one compiled ingest per bus.

    ``derived`` adds sources the gateway computes rather than receives (EIS results, safety
    levels): slot name -> (cycle time, the signals it carries). Without a cycle time a value,
    once written, stays good with the time of its measurement.

    Raises ValueError naming the map when a target is outside the families'
    shapes (the site layout) or bound twice.
    """
    derived = derived or {}
    scalars: list[str] = [n for _, names in derived.values() for n in names if not family_of(n)[1]]
    for src in sources:
        for target in src.signal_map.targets():
            fam, idx = family_of(target)
            if not idx:
                scalars.append(target)
            elif fam not in families:
                raise ValueError(f"{src.signal_map.source}: {target}: unknown family '{fam}' "
                                 f"(known: {', '.join(families)})")
    image = ProcessImage(families, scalars, stale_cycles)
    for src in sources:
        for b in src.signal_map.bindings:
            try:
                image.index(b.target)
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{src.signal_map.source}: {b.entry}.to: {b.target}: {exc}") from None
    ingests = {}
    for src in sources:
        try:
            ingests[src.bus] = Ingest(src.bus, image, src.messages, src.signal_map.bindings, src.signal_map.cycle_s)
        except ValueError as exc:
            raise ValueError(f"{src.signal_map.source}: {exc}") from None
    for slot_name, (period, signals) in derived.items():
        slot = image.add_slot(slot_name, period)
        for name in signals:
            image.bind(image.index(name), slot)
    image.freeze()
    for ingest in ingests.values():
        ingest.compile()
    return image, ingests
