"""The ``[cloud]`` section of the gateway configuration (loaded by gateway.schema like every section).

Every ``check()`` raises ``ValueError("key: reason")`` so the loader can point at the key.
"""

from __future__ import annotations

import math
import os
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from gateway.schema import lookup_path

KiB = 1024
MiB = 1024 * KiB

_STREAM = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
RESERVED_STREAMS = ("events", "flight", "eis", "gaps", "records")
TOPIC_FIELDS = ("prefix", "site", "gateway", "stream")


def _file(key: str, name: str, base: Path | None) -> Path | None:
    """The existing file a path key names, a relative name against ``base`` (the config's folder).

    With ``base`` None a relative name is not looked up yet (None): CloudSection.resolve does it
    once the config's folder is known, never against the working directory. ValueError("key: reason")
    for a missing file or a name that cannot be looked up (unknown ~user, no permission, too long).
    """
    try:
        found = lookup_path(name, () if base is None else (base,))
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    if found is None and (base is not None or name.startswith("~") or Path(name).is_absolute()):
        raise ValueError(f"{key}: file '{name}' not found" + (f" (looked in {base})" if base is not None else ""))
    return found


def _read(key: str, path: Path) -> bytes:
    """A file's bytes; ValueError("key: reason") when it cannot be read (so at config check, not at run time)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{key}: cannot read '{path}': {exc.strerror or exc}") from None


def _template_fields(tpl: str) -> set[str]:
    """The fields of a topic template; ValueError(reason) unless it uses only plain ``{name}`` fields.

    str.format would accept ``{prefix.x}``, ``{prefix[9]}``, conversions and format specs and fail only
    when the link publishes (or crash on a stray brace): refused here so `config check` catches them.
    """
    names = set()
    try:
        parts = list(string.Formatter().parse(tpl))
    except ValueError as exc:  # a single { or }
        raise ValueError(f"'{tpl}': {exc} (write {{{{ or }}}} for a literal brace)") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in TOPIC_FIELDS or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"unknown field {{{shown}}} (known: {', '.join(TOPIC_FIELDS)}; plain {{name}} only)")
        names.add(name)
    return names


@dataclass(frozen=True)
class SignalClass:
    """Signals sampled from the process image at one rate, published as one stream."""

    name: str
    signals: list[str]  # canonical names or globs (``cell[*].voltage``); unbound or absent names are skipped
    rate_hz: float = 1.0
    batch_s: float = 5.0  # a batch closes after this long (also the loss window of a process crash)
    max_rate_hz: float = 100.0  # the highest rate a remote set_report_rates may ask for
    resolution: float = 0.0  # >0: the sensor step, tried as k * resolution when the DBC scale is unknown

    def check(self) -> None:
        if not _STREAM.match(self.name):
            raise ValueError(f"name: '{self.name}' must be 1-32 lower-case letters, digits or _ (starting with a letter)")
        if self.name in RESERVED_STREAMS:
            raise ValueError(f"name: '{self.name}' is reserved ({', '.join(RESERVED_STREAMS)})")
        if not self.signals:
            raise ValueError("signals: at least one signal name or glob is needed")
        if not 0 < self.max_rate_hz <= 1000:
            raise ValueError("max_rate_hz: must be in (0, 1000]")
        if not 0 < self.rate_hz <= self.max_rate_hz:
            raise ValueError(f"rate_hz: must be in (0, max_rate_hz = {self.max_rate_hz}]")
        if not 0.1 <= self.batch_s <= 600:
            raise ValueError("batch_s: must be 0.1..600 s")
        if self.resolution < 0 or not math.isfinite(self.resolution):
            raise ValueError("resolution: must be >= 0")


def default_classes() -> list[SignalClass]:
    """The reference site: pack V/I at 100 Hz, cell voltages at 10 Hz, temperatures and status at 1 Hz."""
    return [
        SignalClass("pack", ["pack.current", "pack.voltage", "pack.link_voltage", "string.current[*]",
                             "string.voltage[*]"], rate_hz=100.0, max_rate_hz=200.0),
        SignalClass("cells", ["cell[*].voltage"], rate_hz=10.0),
        SignalClass("temperatures", ["module[*].temperature[*]", "module[*].board_temperature", "cell[*].temperature",
                                     "pack.*temperature*"], rate_hz=1.0, batch_s=30.0),
        SignalClass("status", ["module[*].voltage", "module[*].state", "module[*].fault", "cell[*].balancing",
                               "contactor.*"], rate_hz=1.0, batch_s=30.0),
    ]


@dataclass(frozen=True)
class TlsSettings:
    """TLS towards the broker: CA to trust, optional client certificate and key (mutual TLS)."""

    enabled: bool = False
    ca_file: str = ""  # empty: the system's trust store
    cert_file: str = ""
    key_file: str = ""  # the broker's certificate must name the configured host

    def check(self) -> None:
        # the files themselves are checked by CloudSection (only when the link and TLS are on)
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: a client certificate needs its key_file (and the other way round)")


@dataclass(frozen=True)
class CommandSettings:
    """Downlink commands: authentication, freshness and the staging of config changes."""

    enabled: bool = True
    auth: Literal["hmac", "tls_acl"] = "hmac"  # tls_acl: trust the TLS identity and the broker's ACLs alone
    hmac_secret: str = ""  # the per-gateway secret (prefer hmac_secret_file)
    hmac_secret_file: str = ""
    max_ttl_s: float = 3600.0  # expires_at - issued_at may not exceed this
    clock_skew_s: float = 300.0  # issued_at may lie this far in the future
    health_check_s: float = 2.0  # a staged config change must stay healthy this long, else it is rolled back
    remember_s: float = 86400.0  # command ids are remembered at least this long after they expire

    def check(self) -> None:
        if not self.enabled:
            return
        if not 1 <= self.max_ttl_s <= 7 * 86400:
            raise ValueError("max_ttl_s: must be 1 s .. 7 days")
        if not 0 <= self.clock_skew_s <= 3600:
            raise ValueError("clock_skew_s: must be 0..3600 s")
        if not 0 <= self.health_check_s <= 60:
            raise ValueError("health_check_s: must be 0..60 s")
        if self.remember_s < 0:
            raise ValueError("remember_s: must be >= 0")

    def check_auth(self, base: Path | None) -> None:
        """The HMAC key is configured and usable, its file read now (ValueError "key: reason").

        Checked by CloudSection only while the cloud link is on (an unused secret is no error).
        ``base``: the config's folder for a relative hmac_secret_file; None leaves relative names to
        CloudSection.resolve.
        """
        if not self.enabled or self.auth != "hmac":
            return
        if bool(self.hmac_secret) == bool(self.hmac_secret_file):
            raise ValueError("hmac_secret: set exactly one of hmac_secret and hmac_secret_file (auth = 'hmac'), "
                             "or auth = 'tls_acl', or enabled = false")
        if self.hmac_secret and len(self.hmac_secret.encode()) < 16:
            raise ValueError("hmac_secret: must be at least 16 bytes")
        if self.hmac_secret_file:
            path = _file("hmac_secret_file", self.hmac_secret_file, base)
            if path is not None and len(_read("hmac_secret_file", path).strip()) < 16:
                raise ValueError(f"hmac_secret_file: '{self.hmac_secret_file}' holds fewer than 16 bytes")

    def secret(self) -> bytes:
        """The HMAC key (from the file when configured; surrounding whitespace stripped)."""
        if self.hmac_secret_file:
            data = Path(self.hmac_secret_file).expanduser().read_bytes().strip()
            if len(data) < 16:
                raise ValueError(f"hmac_secret_file: '{self.hmac_secret_file}' holds fewer than 16 bytes")
            return data
        return self.hmac_secret.encode()


@dataclass(frozen=True)
class Topics:
    """Topic templates; fields: {prefix}, {site}, {gateway} and, for data, {stream}."""

    prefix: str = "bmsgw"
    data: str = "{prefix}/{site}/{gateway}/data/{stream}"  # live lane
    hist: str = "{prefix}/{site}/{gateway}/hist/{stream}"  # backfill lane (historical)
    birth: str = "{prefix}/{site}/{gateway}/birth"  # retained
    state: str = "{prefix}/{site}/{gateway}/state"  # retained: online, or offline from the will
    cmd: str = "{prefix}/{site}/{gateway}/cmd"  # commands arrive on cmd/<command>
    cmd_ack: str = "{prefix}/{site}/{gateway}/cmd-ack"

    def check(self) -> None:
        for key in ("data", "hist", "birth", "state", "cmd", "cmd_ack"):
            tpl = getattr(self, key)
            try:
                names = _template_fields(tpl)
                self.render(key, "site", "gateway", "stream")  # what the link will do, with dummy values
            except (ValueError, KeyError, IndexError, AttributeError) as exc:
                raise ValueError(f"{key}: {exc}") from None
            if key in ("data", "hist") and "stream" not in names:
                raise ValueError(f"{key}: must contain {{stream}}")
            if key not in ("data", "hist") and "stream" in names:
                raise ValueError(f"{key}: {{stream}} is only for data and hist")
            if not tpl.strip():
                raise ValueError(f"{key}: must not be empty")
            if any(c in tpl for c in "#+"):
                raise ValueError(f"{key}: wildcards (# +) are not allowed in a topic")
        if self.data == self.hist:
            raise ValueError("hist: must differ from data (the cloud tells live from historical data by topic)")
        if any(c in self.prefix for c in "#+"):
            raise ValueError("prefix: wildcards (# +) are not allowed")

    def check_rendered(self, site: str, gateway: str, streams: list[str]) -> None:
        """Every topic as the link will publish or subscribe it, with this gateway's site and id.

        A wildcard (# +), a NUL, an empty topic level or a leading $ in a topic name makes the broker
        refuse the PUBLISH (and end the connection) every time, so the link would never deliver.
        ValueError names the key to change: gateway.site, gateway.id, or cloud.topics.KEY / prefix.
        """
        values = {"prefix": ("cloud.topics.prefix", self.prefix), "site": ("gateway.site", site),
                  "gateway": ("gateway.id", gateway)}
        for key in ("data", "hist", "birth", "state", "cmd", "cmd_ack"):
            names = _template_fields(getattr(self, key))
            for name in sorted(names - {"stream"}):
                vkey, value = values[name]
                bad = sorted({c for c in value if c in "#+\0"})
                if bad:
                    shown = ", ".join("NUL" if c == "\0" else c for c in bad)
                    raise ValueError(f"{vkey}: '{value}' is used in MQTT topics ({key}) and must not contain {shown}")
                if "" in value.split("/"):
                    raise ValueError(f"{vkey}: '{value}' makes an empty level in the MQTT topic {key} "
                                     "(empty, or a leading, trailing or double /)")
            for stream in streams if "stream" in names else [""]:
                topic = self.render(key, site, gateway, stream)
                if "" in topic.split("/") or topic.startswith("$") or len(topic.encode()) > 65535:
                    raise ValueError(f"cloud.topics.{key}: '{topic}' is not a topic a broker accepts "
                                     "(an empty level, a leading $, or longer than 65535 bytes)")

    def render(self, key: str, site: str, gateway: str, stream: str = "") -> str:
        tpl: str = getattr(self, key)
        return tpl.format(prefix=self.prefix, site=site, gateway=gateway, stream=stream)


@dataclass(frozen=True)
class CloudSection:
    """Store-and-forward to an MQTT broker (docs/cloud-format.md; docs/configuration.md)."""

    enabled: bool = False
    host: str = ""
    port: int = 0  # 0: 1883, or 8883 with TLS
    protocol: Literal["auto", "5", "3.1.1"] = "auto"  # auto: MQTT 5, falling back to 3.1.1 when refused
    client_id: str = ""  # empty: the gateway id
    username: str = ""
    password: str = ""
    password_file: str = ""
    tls: TlsSettings = field(default_factory=TlsSettings)
    keepalive_s: int = 30
    connect_timeout_s: float = 15.0
    ack_timeout_s: float = 30.0  # a PUBACK later than this ends the connection (the row is sent again)
    topics: Topics = field(default_factory=Topics)
    inflight: int = 16  # QoS 1 messages awaiting PUBACK at once
    live_depth: int = 4  # newest batches per stream kept in the live lane; older ones go to backfill
    max_payload: int = 128 * KiB  # AWS IoT Core's limit; Azure IoT Hub takes 256 KiB
    quota_bytes: int = 256 * MiB  # stored payload bytes before telemetry is thinned, then dropped
    min_free_bytes: int = 64 * MiB  # free disk the buffer always leaves
    fsync_window_s: float = 1.0  # committed batches reach the disk within this (0: fsync every commit)
    bandwidth_cap: int = 0  # bytes/s for everything published; 0: no cap
    backfill_share: float = 0.5  # of the cap (or, without a cap, of the in-flight window) for the backfill lane
    backoff_min_s: float = 1.0
    backoff_max_s: float = 120.0
    event_flush_s: float = 0.25  # events, trips, flight and EIS records are committed this often
    thin_window_s: float = 60.0  # thinned telemetry keeps min/max/mean per window of this length
    telemetry: list[SignalClass] = field(default_factory=default_classes)
    commands: CommandSettings = field(default_factory=CommandSettings)
    store_file: str = "cloud.db"  # in the gateway's state_dir unless absolute

    def check(self) -> None:
        if self.enabled and not self.host.strip():
            raise ValueError("host: the broker's host name is needed when enabled = true")
        if not 0 <= self.port <= 65535:
            raise ValueError("port: must be 0..65535")
        if self.password and self.password_file:
            raise ValueError("password: set password or password_file, not both")
        if (self.password or self.password_file) and not self.username:
            raise ValueError("username: a password needs a username")
        if not 1 <= self.keepalive_s <= 65535:
            raise ValueError("keepalive_s: must be 1..65535")
        if not 0.1 <= self.connect_timeout_s <= 600:
            raise ValueError("connect_timeout_s: must be 0.1..600 s")
        if not 0.1 <= self.ack_timeout_s <= 600:
            raise ValueError("ack_timeout_s: must be 0.1..600 s")
        if not 1 <= self.inflight <= 1024:
            raise ValueError("inflight: must be 1..1024")
        if not 1 <= self.live_depth <= 1000:
            raise ValueError("live_depth: must be 1..1000")
        if not 1 * KiB <= self.max_payload <= 256 * MiB:
            raise ValueError("max_payload: must be 1 KiB .. 256 MiB")
        if self.quota_bytes < 16 * self.max_payload:
            raise ValueError(f"quota_bytes: must be at least 16 x max_payload ({16 * self.max_payload})")
        if self.min_free_bytes < 0:
            raise ValueError("min_free_bytes: must be >= 0")
        if not 0 <= self.fsync_window_s <= 60:
            raise ValueError("fsync_window_s: must be 0..60 s")
        if self.bandwidth_cap < 0:
            raise ValueError("bandwidth_cap: must be >= 0 (0: no cap)")
        if self.bandwidth_cap and self.bandwidth_cap < 1024:
            raise ValueError("bandwidth_cap: below 1024 bytes/s nothing useful gets through")
        if not 0 < self.backfill_share <= 1:
            raise ValueError("backfill_share: must be in (0, 1]")
        if not 0 < self.backoff_min_s <= self.backoff_max_s <= 3600:
            raise ValueError("backoff_min_s: must be > 0 and <= backoff_max_s <= 3600")
        if not 0.01 <= self.event_flush_s <= 10:
            raise ValueError("event_flush_s: must be 0.01..10 s")
        if not 0.1 <= self.thin_window_s <= 3600:
            raise ValueError("thin_window_s: must be 0.1..3600 s")
        names = [c.name for c in self.telemetry]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"telemetry[{i}].name: '{n}' is used twice")
        if self.client_id and (len(self.client_id) > 128 or any(c in self.client_id for c in "#+/")):
            raise ValueError("client_id: at most 128 characters, no # + /")
        if not self.store_file.strip():
            raise ValueError("store_file: must not be empty")
        # nested tables are checked by the loader when present; defaults are checked here. With the
        # link off, its commands, TLS and files are never used: `enabled = false` must not need them
        for key in ("tls", "topics", "commands") if self.enabled else ("topics",):
            try:
                getattr(self, key).check()
            except ValueError as exc:
                raise ValueError(f"{key}.{exc}") from None
        for i, cls in enumerate(self.telemetry):
            try:
                cls.check()
            except ValueError as exc:
                raise ValueError(f"telemetry[{i}].{exc}") from None
        if self.enabled:
            self._check_files(None)

    def _check_files(self, base: Path | None) -> dict[str, str]:
        """Look up (and read) every file the link will use; the resolved path of each, by key.

        ``base``: the config's folder for relative names (None: they are left to resolve()).
        ValueError("key: reason"), so a file the link could not use stops `config check`, not the run.
        """
        out: dict[str, str] = {}
        if self.password_file:
            path = _file("password_file", self.password_file, base)
            if path is not None:
                try:
                    _read("password_file", path).decode("utf-8")
                except UnicodeError as exc:
                    raise ValueError(f"password_file: '{path}' is not UTF-8 text ({exc})") from None
                out["password_file"] = str(path)
        for key in ("ca_file", "cert_file", "key_file") if self.tls.enabled else ():
            name = getattr(self.tls, key)
            if name and (path := _file(f"tls.{key}", name, base)) is not None:
                _read(f"tls.{key}", path)
                out[f"tls.{key}"] = str(path)
        try:
            self.commands.check_auth(base)
        except ValueError as exc:
            raise ValueError(f"commands.{exc}") from None
        if self.commands.enabled and self.commands.auth == "hmac" and self.commands.hmac_secret_file:
            path = _file("commands.hmac_secret_file", self.commands.hmac_secret_file, base)
            if path is not None:
                out["commands.hmac_secret_file"] = str(path)
        try:
            lookup_path(self.store_file)  # store_path() expands ~user: an unknown one must fail here
        except ValueError as exc:
            raise ValueError(f"store_file: {exc}") from None
        return out

    def resolve(self, base: Path) -> CloudSection:
        """Relative file names made absolute against the config's folder (as for DBCs, maps and OPC UA
        certificates), every file checked and read; ValueError("key: reason").

        load_config calls it, so the link never looks in the working directory (systemd's is /).
        """
        found = self._check_files(base)
        tls = replace(self.tls, ca_file=found.get("tls.ca_file", self.tls.ca_file),
                      cert_file=found.get("tls.cert_file", self.tls.cert_file),
                      key_file=found.get("tls.key_file", self.tls.key_file))
        commands = replace(self.commands, hmac_secret_file=found.get("commands.hmac_secret_file",
                                                                     self.commands.hmac_secret_file))
        return replace(self, password_file=found.get("password_file", self.password_file), tls=tls,
                       commands=commands)

    def broker_port(self) -> int:
        return self.port or (8883 if self.tls.enabled else 1883)

    def read_password(self) -> str | None:
        if self.password_file:
            return Path(self.password_file).expanduser().read_text(encoding="utf-8").strip()
        return self.password or None

    def store_path(self, state_dir: str | os.PathLike[str]) -> Path:
        p = Path(self.store_file).expanduser()
        return p if p.is_absolute() else Path(state_dir) / p
