"""The gateway configuration: one TOML file, validated completely before any bus is opened.

``load_config`` parses the file, checks every key and type, resolves DBC and
signal-map paths (next to the config first, then the DBCs shipped in ``dbc/``),
parses the DBCs and resolves the maps against them.  Any problem raises a
ConfigError naming the file, the key path (and line where known) and the reason.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Literal

from cloudlink.config import CloudSection
from drivers.canbus import AdapterSettings, socket_address
from gateway.contactors import CONTACTORS, ContactorSettings
from gateway.dbcfile import LoadedDbc, load_dbc, merge
from gateway.eis import EisSection, eis_families, eis_slots, module_frame_ids
from gateway.estimation import EstimatorSection
from gateway.image import ProcessImage
from gateway.ingest import Ingest
from gateway.lane import LaneSettings
from gateway.limits import (
    PRESETS,
    Debounce,
    HardwareLimits,
    HardwareSection,
    LevelOverride,
    LimitTable,
    validate,
    with_overrides,
)
from gateway.metrics import MetricsSection
from gateway.opcua_config import OpcuaSection
from gateway.pipeline import BusSource, Layout, build
from gateway.protection import PlausibleRanges, Protection
from gateway.safety import safety_families, safety_slots
from gateway.schema import ConfigError, Loader, lookup_path, read_toml
from gateway.signalmap import resolve

Chemistry = Literal["NMC", "LFP", "LTO"]
MAX_DEBOUNCE_MS = 10_000.0  # see ProtectionSection.check


@dataclass(frozen=True)
class GatewaySection:
    """Identity and local paths of this gateway."""

    id: str = "bmsgw"
    site: str = "site"
    state_dir: str = ""  # empty: the default for this user (see default_state_dir)
    control_socket: str = ""  # empty: the default for this user (see default_socket)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    stale_cycles: float = 3.0  # a signal is stale after this many missed cycle times

    def check(self) -> None:
        if self.stale_cycles < 1:
            raise ValueError("stale_cycles: must be >= 1")
        if not self.id.strip():
            raise ValueError("id: must not be empty")


@dataclass(frozen=True)
class SiteSection(Layout):
    """The battery: layout and chemistry."""

    chemistry: Chemistry = "NMC"


@dataclass(frozen=True)
class BusSection(AdapterSettings):
    """One CAN bus: the python-can adapter, its DBC files and signal map."""

    dbc: list[str] = field(default_factory=list)
    map: str = ""
    strict_dbc: bool = False  # refuse DBCs that only parse leniently

    def check(self) -> None:
        if not self.name.strip():
            raise ValueError("name: must not be empty")
        if not self.dbc:
            raise ValueError("dbc: at least one DBC file is needed")
        if not 10_000 <= self.bitrate <= 1_000_000:
            raise ValueError("bitrate: must be 10000..1000000 bit/s")
        if self.data_bitrate and not self.fd:
            raise ValueError("data_bitrate: only with fd = true")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("reconnect_min_s: must be > 0 and <= reconnect_max_s")
        if self.channel.startswith("socket://") and isinstance(addr := socket_address(self.channel), str):
            raise ValueError(f"channel: {addr}; write it as socket://HOST:PORT (IPv6: socket://[::1]:PORT)")


@dataclass(frozen=True)
class SimSection:
    """The built-in simulated pack (``bmsgw run --sim``)."""

    speed: float = 1.0  # simulated seconds per wall-clock second
    seed: int = 1
    start_hour: float = 12.0  # time of day the simulation starts at
    initial_soc: float = 0.5
    ambient_c: float = 25.0
    peak_charge_a: float = 30.0
    peak_discharge_a: float = 40.0
    bus: str = "pack"  # the bus it talks on
    eis_speed: float = 1.0  # the simulated EIS module measures this much faster than real time

    def check(self) -> None:
        if not 0 < self.speed <= 1000:
            raise ValueError("speed: must be in (0, 1000]")
        if not 0 < self.eis_speed <= 1000:
            raise ValueError("eis_speed: must be in (0, 1000]")
        if not 0 <= self.start_hour < 24:
            raise ValueError("start_hour: must be in [0, 24)")
        if not 0 <= self.initial_soc <= 1:
            raise ValueError("initial_soc: must be in [0, 1]")


@dataclass(frozen=True)
class ProtectionSection:
    """Limits, debounce, contactors and timing of the protection lane (docs/protection.md)."""

    enabled: bool = True
    preset: Literal["", "NMC", "LFP", "LTO"] = ""  # empty: the site's chemistry
    limits: dict[str, LevelOverride] = field(default_factory=dict)  # per-check overrides of the preset
    deep_discharge_v: float | None = None  # empty: the preset's
    debounce: Debounce = field(default_factory=Debounce)
    plausible: PlausibleRanges = field(default_factory=PlausibleRanges)
    contactors: ContactorSettings = field(default_factory=ContactorSettings)
    contactor_bus: str = ""  # empty: the first bus
    contactor_message: str = "CONTACTOR_Command"
    charge_threshold_a: float = 0.5  # above this the charge temperature limits apply
    lane: LaneSettings = field(default_factory=LaneSettings)
    switch_interval_ms: float = 0.5  # Python's GIL switch interval; see docs/design.md
    main_process_nice: int = 5  # the main process yields the CPU to the P0 process by this much
    realtime_priority: int = 20  # SCHED_FIFO priority of the P0 process; 0 = normal scheduling

    def check(self) -> None:
        # A debounce delay postpones every trip of its checks by that long; beyond MAX_DEBOUNCE_MS a
        # persistent MSL violation would stay unhandled far past the field's reaction norm ("a few
        # hundred ms"; the slowest default, temperature, is 1 s of 1 Hz sensors)
        d = self.debounce
        delays = [(f.name, getattr(d, f.name)) for f in fields(d) if f.name != "per_check"]
        for name, ms in [*delays, *((f"per_check.{k}", v) for k, v in d.per_check.items())]:
            if ms > MAX_DEBOUNCE_MS:
                raise ValueError(f"debounce.{name}: {ms:g} ms would hold off its trips that long; at most "
                                 f"{MAX_DEBOUNCE_MS:g} ms (10 x the slowest default, temperature's 1 s)")
        if not 0.05 <= self.switch_interval_ms <= 5:
            raise ValueError("switch_interval_ms: must be 0.05..5")
        if not 0 <= self.main_process_nice <= 19:
            raise ValueError("main_process_nice: must be 0..19")
        if not 0 <= self.realtime_priority <= 99:
            raise ValueError("realtime_priority: must be 0..99 (0 = normal scheduling)")


@dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    gateway: GatewaySection = field(default_factory=GatewaySection)
    site: SiteSection = field(default_factory=SiteSection)
    bus: list[BusSection] = field(default_factory=list)
    hardware_limits: HardwareSection = field(default_factory=HardwareSection)
    protection: ProtectionSection = field(default_factory=ProtectionSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    opcua: OpcuaSection = field(default_factory=OpcuaSection)
    estimators: EstimatorSection = field(default_factory=EstimatorSection)
    cloud: CloudSection = field(default_factory=CloudSection)
    eis: EisSection = field(default_factory=EisSection)
    sim: SimSection | None = None

    def limit_table(self) -> LimitTable:
        """The preset of the site's chemistry with the configured overrides (not yet validated)."""
        p = self.protection
        return with_overrides(PRESETS[p.preset or self.site.chemistry], p.limits, p.deep_discharge_v)

    def hardware(self) -> HardwareLimits:
        """The fixed hardware limits: the chemistry's defaults with what [hardware_limits] sets."""
        return self.hardware_limits.resolve(self.protection.preset or self.site.chemistry)

    def contactor_bus(self) -> str:
        return self.protection.contactor_bus or self.bus[0].name

    def eis_bus(self) -> str:
        return self.eis.bus or self.bus[0].name

    def check(self) -> None:
        if not self.bus:
            raise ValueError("bus: at least one [[bus]] is needed")
        names = [b.name for b in self.bus]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"bus[{i}].name: '{n}' is used twice")
        if self.sim is not None and self.sim.bus not in names:
            raise ValueError(f"sim.bus: no [[bus]] named '{self.sim.bus}'")
        if self.estimators.enabled and self.site.chemistry not in ("NMC", "LFP"):
            raise ValueError(f"estimators: no cell model for {self.site.chemistry} yet (set estimators.enabled = false)")
        if self.eis.bus and self.eis.bus not in names:
            raise ValueError(f"eis.bus: no [[bus]] named '{self.eis.bus}'")
        if self.protection.contactor_bus and self.protection.contactor_bus not in names:
            raise ValueError(f"protection.contactor_bus: no [[bus]] named '{self.protection.contactor_bus}'")
        if self.cloud.enabled:  # the topics with this gateway's site and id (the broker refuses wildcards)
            self.cloud.topics.check_rendered(self.gateway.site, self.gateway.id, [c.name for c in self.cloud.telemetry])
        try:
            table = self.limit_table()
        except ValueError as exc:
            raise ValueError(f"protection.limits.{exc}") from None
        try:
            self.hardware().check()
        except ValueError as exc:
            raise ValueError(f"hardware_limits.{exc}") from None
        if self.estimators.enabled:
            try:
                self.estimators.check(self.hardware(), self.site.strings)
            except ValueError as exc:
                raise ValueError(f"estimators.{exc}") from None
        for problem in validate(table, self.hardware()):
            key = problem.split(":", 1)[0]
            prefix = "protection." if key == "deep_discharge_v" else "protection.limits."
            raise ValueError(f"{prefix}{problem}")


@dataclass
class Loaded:
    """A validated config with its DBCs and maps resolved and the decode pipeline built."""

    path: Path
    config: Config
    dbcs: dict[str, list[LoadedDbc]]
    sources: list[BusSource]
    warnings: list[str]
    image: ProcessImage
    ingests: dict[str, Ingest]


def shipped_dbc_dir() -> Path:
    return Path(str(resources.files("dbc")))


def shipped_config(name: str = "sim.toml") -> Path:
    return Path(str(resources.files("gateway") / "configs" / name))


def find_file(name: str, base: Path, sub: str = "") -> Path | None:
    """A file next to the config, else among the shipped DBCs/maps (ValueError: see lookup_path)."""
    return lookup_path(name, (base, shipped_dbc_dir() / sub))


def load_config(path: str | Path) -> Loaded:
    """Parse, validate and resolve a config file (raises ConfigError)."""
    path = Path(path)
    data, text = read_toml(path)
    loader = Loader(path, text)
    cfg = loader.load(Config, data)
    base = path.resolve().parent
    try:
        cfg = replace(cfg, opcua=cfg.opcua.resolve(base))
    except ValueError as exc:
        key, _, reason = str(exc).partition(": ")
        raise loader.error(f"opcua.{key}", reason) from None
    if cfg.eis.enabled and cfg.eis.sot_calibration:  # unused (and not looked up) while the module is off
        cfg = replace(cfg, eis=replace(cfg.eis, sot_calibration=str(_path(loader, "eis.sot_calibration",
                                                                          cfg.eis.sot_calibration, base))))
    if cfg.cloud.enabled:
        try:
            cfg = replace(cfg, cloud=cfg.cloud.resolve(base))
        except ValueError as exc:
            key, _, reason = str(exc).partition(": ")
            raise loader.error(f"cloud.{key}", reason) from None
    warnings: list[str] = []
    dbcs: dict[str, list[LoadedDbc]] = {}
    sources = []
    for i, bus in enumerate(cfg.bus):
        loaded = []
        for j, name in enumerate(bus.dbc):
            found = _found(loader, f"bus[{i}].dbc[{j}]", name, base)
            if found is None:
                raise loader.error(f"bus[{i}].dbc[{j}]", f"DBC file '{name}' not found (looked in {base} and {shipped_dbc_dir()})")
            try:
                d = load_dbc(found, strict_only=bus.strict_dbc)
            except ConfigError as exc:
                raise ConfigError(exc.file, exc.key, f"{exc.reason} (loaded by {path}: bus[{i}].dbc[{j}])",
                                  exc.line) from None
            warnings += [f"{found}: {w}" for w in d.warnings]
            loaded.append(d)
        dbcs[bus.name] = loaded
        messages = merge(loaded, f"bus[{i}].dbc")
        if not bus.map:
            raise loader.error(f"bus[{i}].map", "a signal map is needed (see dbc/maps/)")
        map_path = _found(loader, f"bus[{i}].map", bus.map, base, "maps")
        if map_path is None:
            raise loader.error(f"bus[{i}].map", f"map file '{bus.map}' not found (looked in {base} and {shipped_dbc_dir() / 'maps'})")
        sources.append(BusSource(bus.name, messages, resolve(map_path, messages)))
    families = cfg.site.families()
    derived: dict[str, tuple[float | None, list[str]]] = {}
    if cfg.estimators.enabled:
        families, derived = families | safety_families(cfg.site), derived | safety_slots(cfg.site)
    if cfg.eis.enabled:
        _check_eis(cfg, sources, loader)
        families, derived = families | eis_families(cfg.site), derived | eis_slots(cfg.site)
    try:
        image, ingests = build(families, sources, cfg.gateway.stale_cycles, derived)
    except ValueError as exc:
        raise loader.error("site", f"the signal maps do not fit the site layout: {exc}") from None
    if cfg.protection.enabled:
        _check_protection(cfg, image, sources, dbcs, loader)
    return Loaded(path, cfg, dbcs, sources, warnings, image, ingests)


def _found(loader: Loader, key: str, name: str, base: Path, sub: str = "") -> Path | None:
    """find_file for a path key: a name that cannot be looked up is that key's ConfigError."""
    try:
        return find_file(name, base, sub)
    except ValueError as exc:
        raise loader.error(key, str(exc)) from None


def _path(loader: Loader, key: str, name: str, base: Path) -> Path:
    """A path key's file, relative names against the config's folder (ConfigError: missing, unusable name)."""
    try:
        found = lookup_path(name, (base,))
    except ValueError as exc:
        raise loader.error(key, str(exc)) from None
    if found is None:
        raise loader.error(key, f"file '{name}' not found (looked in {base})")
    return found


def _check_eis(cfg: Config, sources: list[BusSource], loader: Loader) -> None:
    """The module's frame IDs are its own on its bus, and a SoT calibration file is readable."""
    bus = cfg.eis_bus()
    ids = module_frame_ids()
    clash = sorted(m.name for s in sources if s.bus == bus for m in s.messages
                   if not m.is_extended_frame and m.frame_id in ids)
    if clash:
        raise loader.error("eis.bus", f"bus '{bus}' DBCs use the EIS module's frame IDs 0x300..0x321 ({', '.join(clash)}): "
                                      "put the module on another bus or renumber the pack's frames")
    if cfg.eis.sot_calibration:
        from gateway.eis import load_calibration

        try:
            load_calibration(Path(cfg.eis.sot_calibration))
        except ValueError as exc:
            raise loader.error("eis.sot_calibration", str(exc)) from None


def _check_protection(cfg: Config, image: ProcessImage, sources: list[BusSource],
                      dbcs: dict[str, list[LoadedDbc]], loader: Loader) -> None:
    """What protection needs from the maps and DBCs is there (else it could not protect)."""
    p = cfg.protection
    try:
        prot = Protection(image, cfg.limit_table(), p.debounce, p.plausible,
                          p.charge_threshold_a, p.lane.tick_ms / 1000.0)
    except ValueError as exc:
        raise loader.error("protection", f"{exc} (or set protection.enabled = false)") from None
    feedback = {image.index(f"contactor.{c}") for c in CONTACTORS if f"contactor.{c}" in image.scalars}
    _check_watched_periods(cfg, image, {int(i) for i in prot.watched} | feedback, sources, dbcs, loader)
    bus = cfg.contactor_bus()
    messages = next(s.messages for s in sources if s.bus == bus)
    if not any(m.name == p.contactor_message for m in messages):
        raise loader.error("protection.contactor_message",
                           f"bus '{bus}' has no message '{p.contactor_message}' in its DBC to command the contactors")


def _check_watched_periods(cfg: Config, image: ProcessImage, watched: set[int], sources: list[BusSource],
                           dbcs: dict[str, list[LoadedDbc]], loader: Loader) -> None:
    """Every signal protection or the contactor machine watches comes from a message with a cycle time.

    Without one the message's slot never goes stale, so a sender that falls silent leaves its last
    values GOOD forever and protection keeps judging them: missing data must be a fault instead.
    """
    for n, (bus, src) in enumerate(zip(cfg.bus, sources, strict=True)):
        missing: dict[str, list[str]] = {}  # message name -> the watched signals it carries
        for b in src.signal_map.bindings:
            i = image.index(b.target)
            if i in watched and not math.isfinite(image.period(int(image.slot_of[i]))):
                missing.setdefault(b.message.name, []).append(b.target)
        if not missing:
            continue
        names = sorted(missing)
        carried = "; ".join(f"{m} ({_some(missing[m])})" for m in names)
        where = sorted({str(d.path) for d in dbcs[bus.name] for m in d.db.messages if m.name in missing})
        raise loader.error(f"bus[{n}].map",
                           f"protection watches signals of messages with no cycle time: {carried}. "
                           "A sender that stops would never be detected (its last values would stay good). "
                           f"Give each a [[message]] entry with cycle_ms in {src.signal_map.source}, "
                           f"or a GenMsgCycleTime attribute in {', '.join(where)} "
                           "(or set protection.enabled = false)")


def _some(names: list[str], shown: int = 2) -> str:
    """A few names and how many more, for error messages about many signals."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


SYSTEM_SOCKET = Path("/run/bmsgw/control.sock")


def _service_socket_present() -> bool:
    try:
        return SYSTEM_SOCKET.exists()
    except PermissionError:  # the service's own folder (0750): there, only not for us; connecting says so
        return True


def default_socket() -> Path:
    """Where the daemon listens and the CLI looks when the config does not say.

    $BMSGW_SOCKET; else the system service's socket when it exists (so a technician's shell
    finds the service); else root's /run/bmsgw, or the user's runtime directory.
    """
    env = os.environ.get("BMSGW_SOCKET")
    if env:
        return Path(env)
    if _service_socket_present() or os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "bmsgw" if runtime else Path(tempfile.gettempdir()) / f"bmsgw-{os.getuid()}"
    return base / "control.sock"


def default_state_dir() -> Path:
    """systemd's $STATE_DIRECTORY, else $XDG_STATE_HOME/bmsgw, else /var/lib/bmsgw (root) or ~/.local/state/bmsgw."""
    for env, sub in (("STATE_DIRECTORY", ""), ("XDG_STATE_HOME", "bmsgw")):
        value = os.environ.get(env)
        if value:
            return Path(value.split(":")[0]) / sub
    if os.geteuid() == 0:
        return Path("/var/lib/bmsgw")
    return Path.home() / ".local" / "state" / "bmsgw"


def socket_path(cfg: Config) -> Path:
    return Path(cfg.gateway.control_socket) if cfg.gateway.control_socket else default_socket()


def state_dir(cfg: Config) -> Path:
    return Path(cfg.gateway.state_dir) if cfg.gateway.state_dir else default_state_dir()
