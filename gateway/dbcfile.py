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
    text = read_dbc_text(path)
    precheck(path, text)
    try:
        return LoadedDbc(path, _load(path, text, strict=True))
    except ConfigError as strict_error:
        if strict_only:
            raise
        try:
            db = _load(path, text, strict=False)
        except ConfigError:
            raise strict_error from None
        return LoadedDbc(path, db, [f"strict parsing failed ({strict_error.reason}); loaded leniently"])


# The largest CAN (FD) frame: 64 bytes, 512 bits. A message cannot be longer; a signal cannot start
# or end beyond it in any frame. Signals beyond their own message's length but within this do
# occur in real DBCs (Tesla's Model3CAN, the IVT-S's 0-byte messages) and load leniently.
MAX_FRAME_BYTES = 64
_BO = re.compile(r"^\s*BO_\s+\d+\s+(\w+)\s*:\s*(\d+)")
_SG = re.compile(r"^\s*SG_\s+(\w+)[^:]*:\s*(\d+)\s*\|\s*(\d+)\s*@\s*([01])")


def read_dbc_text(path: Path) -> str:
    """A DBC's text: cp1252 (cantools' default for DBC), or UTF-8 after a byte-order mark."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # saved by a Windows editor as "UTF-8 with BOM"
        return data[3:].decode("utf-8", errors="replace")
    return data.decode("cp1252", errors="replace")


def precheck(path: Path, text: str) -> None:
    """Refuse, at their line, message lengths and signal bits no CAN frame can hold.

    cantools accepts a message longer than 64 bytes (which then fits no frame), and for a corrupted
    start bit such as 1000000000 builds bit tables of that size: 16 s and 2.3 GB before an empty error.
    """
    msg, length = "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if m := _BO.match(line):
            msg, length = m.group(1), int(m.group(2))
            if length > MAX_FRAME_BYTES:
                raise ConfigError(path, "", f"message {msg} is {length} bytes long; a CAN frame carries at most "
                                            f"{MAX_FRAME_BYTES} (a mistyped length?)", n)
        elif m := _SG.match(line):
            name, start, size, little = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) == "1"
            bits = 8 * MAX_FRAME_BYTES
            # the bit after its last, counted from bit 0 of byte 0 (a big-endian start bit is its MSB,
            # numbered within its byte from the least significant bit)
            end = start + size if little else 8 * (start // 8) + 7 - start % 8 + size
            if start >= bits or end > bits:
                raise ConfigError(path, "", f"signal {name} of {msg or 'no message'} (start bit {start}, {size} bits) "
                                            f"lies outside any CAN frame ({bits} bits at most; "
                                            f"{msg or 'the message'} has {8 * length})", n)


def _load(path: Path, text: str, strict: bool) -> Database:
    try:
        db = cantools.database.load_string(text, database_format="dbc", strict=strict)
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
