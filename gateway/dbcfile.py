"""Loading DBC files: strict parsing first, lenient fallback with a warning that names the problem."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import cantools
from cantools.database.can import Database, Message

from gateway.schema import ConfigError


@dataclass
class LoadedDbc:
    """A parsed DBC, with what strict parsing objected to."""

    path: Path
    db: Database
    warnings: list[str] = field(default_factory=list)


def load_dbc(path: Path, strict_only: bool = False) -> LoadedDbc:
    """Parse a DBC; ConfigError (file, line, reason) when it cannot be used."""
    try:
        return LoadedDbc(path, _load(path, strict=True))
    except ConfigError as strict_error:
        if strict_only:
            raise
        try:
            db = _load(path, strict=False)
        except ConfigError:
            raise strict_error from None
        return LoadedDbc(path, db, [f"strict parsing failed ({strict_error.reason}); loaded leniently"])


def _load(path: Path, strict: bool) -> Database:
    try:
        db = cantools.database.load_file(str(path), database_format="dbc", strict=strict)
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    except (cantools.database.Error, ValueError, KeyError, IndexError) as exc:
        text = str(exc).strip('"').removeprefix('DBC: "').rstrip('"')
        m = re.search(r"line (\d+)", text)
        raise ConfigError(path, "", text, int(m.group(1)) if m else None) from None
    if not isinstance(db, Database):
        raise ConfigError(path, "", "not a CAN database")
    return db


def merge(dbcs: list[LoadedDbc], key: str) -> list[Message]:
    """Messages of several DBCs on one bus; the same frame ID twice is an error."""
    seen: dict[tuple[int, bool], Path] = {}
    out: list[Message] = []
    for d in dbcs:
        for m in d.db.messages:
            k = (m.frame_id, m.is_extended_frame)
            if k in seen:
                raise ConfigError(d.path, key, f"frame ID 0x{m.frame_id:X} ({m.name}) is also defined in {seen[k]}")
            seen[k] = d.path
            out.append(m)
    return out
