"""Read recorded CAN bus traces for ``bmsgw replay``.

Supported formats (names accepted by ``fmt``):

``candump``
    ``candump -L`` log lines, e.g. ``(1436509052.249713) can0 123#DEADBEEF``.
``printed``
    python-can's printed messages (``str(can.Message)``), e.g. the foxBMS test log.
``asc``, ``blf``, ``csv``, ``trc``, ``mf4``, ``sqlite``
    python-can's own log formats, read by python-can's readers (MF4 needs asammdf).

The format is detected from the content (magic bytes or the first non-empty
lines); the file suffix only decides when the content is inconclusive.
Gzip-compressed files are read transparently (except ``sqlite``).

A bad line (or record) is skipped and counted, also in ASC, CSV and TRC files;
a block of NUL bytes in a text trace (an SD card after a power loss) ends a
line; a truncated BLF file is reported as a problem after its last frame.
"""

from __future__ import annotations

import gzip
import logging
import math
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import can
from can.io.blf import FILE_HEADER_SIZE
from can.io.generic import MessageReader

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "Trace",
    "TraceError",
    "TraceProblem",
    "parse_candump",
    "parse_printed",
    "read_trace",
]

FORMATS: tuple[str, ...] = (
    "candump",
    "printed",
    "asc",
    "blf",
    "csv",
    "trc",
    "mf4",
    "sqlite",
)

_ALIASES = {"log": "candump", "db": "sqlite"}
_SUFFIX_HINTS = {
    ".log": "candump",
    ".asc": "asc",
    ".blf": "blf",
    ".csv": "csv",
    ".trc": "trc",
    ".mf4": "mf4",
    ".db": "sqlite",
    ".sqlite": "sqlite",
}
_PYCAN_READERS: dict[str, type[MessageReader]] = {
    "asc": can.ASCReader,
    "blf": can.BLFReader,
    "csv": can.CSVReader,
    "trc": can.TRCReader,
    "mf4": can.MF4Reader,
    "sqlite": can.SqliteReader,
}
_PYCAN_BINARY = frozenset({"blf", "mf4", "sqlite"})

_SNIFF_BYTES = 64 * 1024
_SNIFF_LINES = 50
_TEXT_LIMIT = 80
_HEADER_LINES = 1000  # lines before the first frame kept to restart a python-can text reader after a bad line
_BAD_IN_A_ROW = 100  # a python-can text reader failing on this many lines in a row cannot read the file
_TRC_EVENTS = frozenset({"ST", "EC", "ER", "EV", "Warng", "Error"})  # TRC line types that are not frames
_HEX_ID = re.compile(r"[0-9A-Fa-f]+x?")

CAN_ERR_FLAG = 0x20000000
_STD_MAX = 0x7FF
_EXT_MAX = 0x1FFFFFFF
_FD_LENGTHS = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64})
_CANFD_BRS = 0x01
_CANFD_ESI = 0x02

_CANDUMP_RE = re.compile(
    r"""
    \(\s*(?P<ts>\d+(?:\.\d*)?)\s*\)\s+
    (?P<channel>\S+)\s+
    (?P<id>[0-9A-Fa-f]+)\#
    (?:
        \#(?P<fdflags>[0-9A-Fa-f])(?P<fddata>[0-9A-Fa-f.]*)
      | [Rr](?P<rdlc>[0-9A-Fa-f])?(?:_(?P<rlen8>[0-9A-Fa-f]))?
      | (?P<data>[0-9A-Fa-f.]*)(?:_(?P<len8>[0-9A-Fa-f]))?
    )
    (?:\s+(?P<dir>[RrTt]))?   # direction, written by python-can's CanutilsLogWriter
    \s*$
    """,
    re.VERBOSE,
)

_PRINTED_RE = re.compile(
    r"""
    Timestamp:\s*(?P<ts>[-+]?\d+(?:\.\d*)?)\s+
    ID:\s*(?P<id>[0-9A-Fa-f]{1,8})\s+
    (?P<flags>(?:[A-Za-z]{1,2}\s+)*?)
    DLC?:\s*(?P<dl>\d+)
    (?P<data>(?:\s+[0-9A-Fa-f]{2}\b)*)
    (?:\s+'[^']*')?           # ASCII rendering python-can adds for alphanumeric data
    (?:\s+Channel:\s*(?P<channel>.*?))?
    \s*$
    """,
    re.VERBOSE,
)
_PRINTED_FLAGS = frozenset({"S", "X", "E", "R", "F", "BS", "EI", "Rx", "Tx"})

# Signatures for detection only: looser than the parsers so that a malformed first
# line still identifies the format (and is then reported as a bad line).
_SIGNATURES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("candump", re.compile(r"\(\s*\d+(?:\.\d*)?\s*\)\s+\S+\s+\S*#")),
    ("printed", re.compile(r"Timestamp:")),
    ("csv", re.compile(r"timestamp\s*,\s*arbitration_id\s*,", re.IGNORECASE)),
    (
        "asc",
        re.compile(
            r"(?:date\s|base\s+(?:hex|dec)\b|begin\s+triggerblock\b"
            r"|(?:no\s+)?internal\s+events\s+logged|//)",
            re.IGNORECASE,
        ),
    ),
    ("trc", re.compile(r";")),
    # Plain candump console output lacks reliable timestamps; reject it early.
    (
        "candump-console",
        re.compile(r"(?:\(\S+\)\s+)?\S+\s+[0-9A-Fa-f]{3,8}\s+\[\d{1,2}\]"),
    ),
)

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"LOGG", "blf"),
    (b"MDF     ", "mf4"),
    (b"UnFinMF ", "mf4"),
    (b"SQLite format 3\x00", "sqlite"),
)
_GZIP_MAGIC = b"\x1f\x8b"


class TraceError(Exception):
    """A trace file cannot be read at all (missing, unreadable, unknown format)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True, slots=True)
class TraceProblem:
    """One skipped line (text formats) or record (python-can formats), 1-based."""

    location: int
    reason: str
    text: str
    unit: Literal["line", "record"] = "line"

    def __str__(self) -> str:
        return f"{self.unit} {self.location}: {self.reason}: {self.text!r}"


def _shorten(text: str, limit: int = _TEXT_LIMIT) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _invalid(msg: can.Message) -> str | None:
    """Return why ``msg`` cannot be a real CAN frame, or None if it can."""
    if not math.isfinite(msg.timestamp) or msg.timestamp < 0:
        return f"timestamp {msg.timestamp} is not a finite non-negative number"
    n = len(msg.data)
    if msg.is_error_frame:
        # Error frames carry error-class bits, not an identifier: no range check.
        if msg.is_remote_frame or msg.is_fd:
            return "an error frame cannot also be a remote or CAN FD frame"
        return f"error frame with {n} data bytes (at most 8)" if n > 8 else None
    limit = _EXT_MAX if msg.is_extended_id else _STD_MAX
    if not 0 <= msg.arbitration_id <= limit:
        kind = "extended" if msg.is_extended_id else "standard"
        return f"{kind} id 0x{msg.arbitration_id:X} out of range"
    if msg.is_fd:
        if msg.is_remote_frame:
            return "CAN FD has no remote frames"
        if n not in _FD_LENGTHS:
            return f"{n} data bytes is not a valid CAN FD length"
        if msg.dlc != n:
            return f"DL {msg.dlc} does not match {n} data bytes"
        return None
    if msg.bitrate_switch or msg.error_state_indicator:
        return "BRS/ESI flags need a CAN FD frame"
    if n > 8:
        return f"{n} data bytes in a classic CAN frame (at most 8)"
    if msg.is_remote_frame:
        if n:
            return "remote frame with data"
        return None if 0 <= msg.dlc <= 15 else f"remote frame DL {msg.dlc} out of range"
    # DLC 9..15 on a full classic frame is legal on the wire (len8_dlc).
    if msg.dlc != n and not (n == 8 and 8 < msg.dlc <= 15):
        return f"DL {msg.dlc} does not match {n} data bytes"
    return None


def _checked(msg: can.Message) -> can.Message:
    reason = _invalid(msg)
    if reason is not None:
        raise ValueError(reason)
    return msg


def _hexbytes(text: str) -> bytes:
    text = text.replace(".", "")
    if len(text) % 2:
        raise ValueError("odd number of hex digits in data")
    return bytes.fromhex(text)


def parse_candump(line: str) -> can.Message:
    """Parse one ``candump -L`` line; raise ValueError(reason) if it is bad."""
    m = _CANDUMP_RE.fullmatch(line.strip())
    if m is None:
        if "###" in line:
            raise ValueError("CAN XL frames are not supported")
        raise ValueError("not a candump -L line")
    id_text = m["id"]
    value = int(id_text, 16)
    is_error = False
    if len(id_text) == 3:
        is_extended = False
    elif len(id_text) == 8:
        is_extended = True
        if value & CAN_ERR_FLAG:
            is_error = True
            value &= ~CAN_ERR_FLAG
        if value > _EXT_MAX:
            raise ValueError(f"id {id_text} has flag bits other than CAN_ERR_FLAG set")
    else:
        raise ValueError(
            f"id {id_text!r} must have 3 (standard) or 8 (extended) hex digits"
        )

    is_fd = m["fdflags"] is not None
    is_remote = False
    brs = esi = False
    dlc: int | None = None
    if is_fd:
        flags = int(m["fdflags"], 16)
        brs, esi = bool(flags & _CANFD_BRS), bool(flags & _CANFD_ESI)
        data = _hexbytes(m["fddata"])
    elif m["data"] is not None:
        data = _hexbytes(m["data"])
        if m["len8"] is not None:
            dlc = int(m["len8"], 16)
            if len(data) != 8 or dlc < 9:
                raise ValueError("raw DLC suffix _9.._F needs exactly 8 data bytes")
    else:
        is_remote = True
        data = b""
        dlc = int(m["rdlc"], 16) if m["rdlc"] is not None else 0
        if dlc > 8:
            raise ValueError(f"remote frame DLC {dlc} > 8")
        if m["rlen8"] is not None:
            raw = int(m["rlen8"], 16)
            if dlc != 8 or raw < 9:
                raise ValueError("raw DLC suffix _9.._F needs remote DLC 8")
            dlc = raw
    direction = m["dir"]
    return _checked(
        can.Message(
            timestamp=float(m["ts"]),
            arbitration_id=value,
            is_extended_id=is_extended,
            is_remote_frame=is_remote,
            is_error_frame=is_error,
            channel=m["channel"],
            dlc=dlc,
            data=data,
            is_fd=is_fd,
            is_rx=direction is None or direction in "Rr",
            bitrate_switch=brs,
            error_state_indicator=esi,
        )
    )


def parse_printed(line: str) -> can.Message:
    """Parse one ``str(can.Message)`` line; raise ValueError(reason) if it is bad."""
    m = _PRINTED_RE.fullmatch(line.strip())
    if m is None:
        raise ValueError("not a python-can printed message")
    flags = set(m["flags"].split())
    unknown = flags - _PRINTED_FLAGS
    if unknown:
        raise ValueError(f"unknown flag(s) {' '.join(sorted(unknown))}")
    if {"S", "X"} <= flags or {"Rx", "Tx"} <= flags:
        raise ValueError("conflicting flags S/X or Rx/Tx")
    id_text = m["id"]
    # Without an S/X flag (older python-can), 8 digits mean extended, 3-4 standard.
    is_extended = "X" in flags if flags & {"S", "X"} else len(id_text) > 4
    data = bytes.fromhex(m["data"])
    if "R" in flags and data:
        # can.Message silently drops data of remote frames, so check here.
        raise ValueError("remote frame with data")
    channel = m["channel"]
    return _checked(
        can.Message(
            timestamp=float(m["ts"]),
            arbitration_id=int(id_text, 16),
            is_extended_id=is_extended,
            is_remote_frame="R" in flags,
            is_error_frame="E" in flags,
            channel=channel if channel else None,
            dlc=int(m["dl"]),
            data=data,
            is_fd="F" in flags,
            is_rx="Tx" not in flags,
            bitrate_switch="BS" in flags,
            error_state_indicator="EI" in flags,
        )
    )


_LINE_PARSERS: dict[str, Callable[[str], can.Message]] = {
    "candump": parse_candump,
    "printed": parse_printed,
}


class Trace:
    """Lazy iterable of the good frames in a trace; collects what was skipped.

    Each iteration re-reads the file and resets ``frames``, ``bad`` and ``errors``.
    ``errors`` keeps the first ``max_errors`` problems; ``bad`` counts all of them.
    """

    def __init__(self, path: Path, fmt: str, *, gzipped: bool, max_errors: int) -> None:
        self.path = path
        self.format = fmt
        self.gzipped = gzipped
        self.max_errors = max_errors
        self.errors: list[TraceProblem] = []
        self.frames = 0
        self.bad = 0

    def __repr__(self) -> str:
        return (
            f"Trace({str(self.path)!r}, format={self.format!r}, "
            f"frames={self.frames}, bad={self.bad})"
        )

    def __iter__(self) -> Iterator[can.Message]:
        self.errors = []
        self.frames = 0
        self.bad = 0
        parse = _LINE_PARSERS.get(self.format)
        if parse is not None:
            return self._iter_lines(parse)
        return self._iter_pycan()

    def _problem(
        self, location: int, reason: str, text: str, unit: Literal["line", "record"]
    ) -> None:
        self.bad += 1
        if len(self.errors) < self.max_errors:
            self.errors.append(TraceProblem(location, reason, _shorten(text), unit))

    def _open_text(self) -> IO[str]:
        # errors="replace": a stray non-UTF-8 byte must cost one bad line, not the file;
        # utf-8-sig: a byte-order mark (Windows editors) must not cost the first line.
        if self.gzipped:
            return gzip.open(self.path, "rt", encoding="utf-8-sig", errors="replace")
        return self.path.open(encoding="utf-8-sig", errors="replace")

    def _iter_lines(self, parse: Callable[[str], can.Message]) -> Iterator[can.Message]:
        try:
            with self._open_text() as f:
                for lineno, line in _numbered_lines(f):
                    try:
                        msg = parse(line)
                    except ValueError as exc:
                        self._problem(lineno, str(exc), line, "line")
                        continue
                    self.frames += 1
                    yield msg
        except (OSError, EOFError, zlib.error) as exc:
            raise TraceError(self.path, f"read failed: {exc}") from exc

    def _open_reader(self) -> tuple[MessageReader, _CountingFile | None]:
        """The python-can reader, and for BLF the counted file under it."""
        cls = _PYCAN_READERS[self.format]
        source: str | IO[str] | gzip.GzipFile | _CountingFile = str(self.path)
        counted = None
        if self.gzipped and self.format == "sqlite":
            raise TraceError(self.path, "cannot read a gzip-compressed sqlite trace")
        try:
            # The reader owns the file and closes it in stop().
            if self.format == "blf":
                # python-can's BLFReader just stops at a cut: count what it reads to notice one
                raw = gzip.open(self.path, "rb") if self.gzipped else self.path.open("rb")  # noqa: SIM115
                source = counted = _CountingFile(raw)
            elif self.gzipped and self.format in _PYCAN_BINARY:
                source = gzip.open(self.path, "rb")  # noqa: SIM115
            elif self.format not in _PYCAN_BINARY:
                source = self._open_text()
            # python-can annotates only paths, but its file readers accept file objects.
            return cls(source), counted  # type: ignore[arg-type]
        except Exception as exc:  # python-can raises many types; all are fatal here
            if not isinstance(source, str):
                source.close()
            reason = f"{cls.__name__}: {type(exc).__name__}: {exc}"
            raise TraceError(self.path, reason) from exc

    def _iter_pycan(self) -> Iterator[can.Message]:
        if self.format not in _PYCAN_BINARY:
            return self._iter_pycan_text()
        return self._iter_pycan_binary()

    def _iter_pycan_binary(self) -> Iterator[can.Message]:
        reader, counted = self._open_reader()
        name = type(reader).__name__
        record = 0
        try:
            messages = iter(reader)
            while True:
                try:
                    msg = next(messages)
                except StopIteration:
                    break
                except Exception as exc:  # see _open_reader
                    if counted is not None and counted.short:
                        break  # a cut inside an object header: reported as truncated below
                    what = f"{name} failed after record {record}"
                    raise TraceError(
                        self.path, f"{what}: {type(exc).__name__}: {exc}"
                    ) from exc
                record += 1
                reason = _invalid(msg)
                if reason is not None:
                    self._problem(record, reason, str(msg), "record")
                    continue
                self.frames += 1
                yield msg
        finally:
            reader.stop()
        if counted is not None and isinstance(reader, can.BLFReader):
            self._check_blf_complete(reader.file_size, counted, record)

    def _check_blf_complete(self, file_size: int, counted: _CountingFile, records: int) -> None:
        """Report a BLF file shorter than its header says, or ending inside an object."""
        # a writer that died before writing its final header leaves the header's own size there
        cut = file_size > FILE_HEADER_SIZE and counted.pos < file_size
        if not (cut or counted.short):
            return
        size = f"the header gives {file_size} bytes, " if file_size > FILE_HEADER_SIZE else ""
        reason = f"truncated: {size}the file ends after {counted.pos}; frames after record {records} are lost"
        log.warning("%s: %s", self.path, reason)
        self._problem(records + 1, reason, str(self.path), "record")

    def _skipped(self, reader: str, lines: list[tuple[int, str]]) -> None:
        """Count the damaged frame lines among those a python-can reader passed over without a frame.

        python-can's ASC and TRC readers skip, without a word, every line they do not recognise:
        headers, comments and events, but also a frame line with a damaged timestamp, a cut line or an
        unknown frame type. Those are bad lines like any other; the legitimate kinds are not.
        """
        for lineno, line in lines:
            if _damaged_frame_line(self.format, line):
                self._problem(lineno, f"{reader} skipped it: not a frame line it can read", line, "line")

    def _iter_pycan_text(self) -> Iterator[can.Message]:
        """ASC, CSV, TRC through python-can's readers, restarted after a line they fail on.

        A reader's generator ends with its first exception, so a new reader goes on after
        the bad line; it first reads the lines before the first frame again, to learn the
        file's settings (number base, columns, start time) as the first one did.  A file
        of which no line can be read (a bad header) is a TraceError, as before.
        """
        cls = _PYCAN_READERS[self.format]
        try:
            lines = _ReplayableLines(self._open_text())
        except OSError as exc:
            raise TraceError(self.path, f"read failed: {exc}") from exc
        records = in_a_row = failed_at = 0
        first_failure = ""
        try:
            while True:
                try:
                    # python-can annotates only paths, but its file readers accept file objects
                    for msg in cls(lines):  # type: ignore[arg-type]
                        self._skipped(cls.__name__, lines.skipped(current_too=False))
                        lines.frame_read()
                        records += 1
                        in_a_row = 0
                        reason = _invalid(msg)
                        if reason is not None:
                            self._problem(lines.lineno, reason, lines.current, "line")
                            continue
                        self.frames += 1
                        yield msg
                    self._skipped(cls.__name__, lines.skipped(current_too=True))
                    break
                except (OSError, EOFError, zlib.error) as exc:
                    raise TraceError(self.path, f"read failed: {exc}") from exc
                except Exception as exc:  # python-can raises many types for a malformed line
                    if lines.lineno == failed_at:
                        break  # failed again before reading a new line: at the end of the file
                    failed_at = lines.lineno
                    self._skipped(cls.__name__, lines.skipped(current_too=False))
                    reason = f"{type(exc).__name__}: {exc}"
                    self._problem(lines.lineno, f"{cls.__name__}: {reason}", lines.current, "line")
                    failure = f"{cls.__name__} failed after record {records} on line {lines.lineno}: {reason}"
                    first_failure = first_failure or failure
                    in_a_row += 1
                    if in_a_row >= _BAD_IN_A_ROW:
                        raise TraceError(self.path, f"{failure} ({in_a_row} lines in a row)") from exc
                    lines.restart()
        finally:
            lines.close()
        if first_failure and not records:
            raise TraceError(self.path, first_failure)


def _damaged_frame_line(fmt: str, line: str) -> bool:
    """Whether a line a python-can text reader skipped is a damaged frame rather than a header,
    comment or event line (ASC: the timestamp and CAN channel of a frame line; TRC: any line but a
    ; comment or a status, error or event record)."""
    tokens = line.split()
    if fmt == "asc":
        if line.startswith("//") or len(tokens) < 2:
            return False
        if tokens[1].isdigit() or tokens[1] == "CANFD":  # "<time> <channel>" starts only frames and events
            return len(tokens) == 2 or bool(_HEX_ID.fullmatch(tokens[2]))  # events name themselves (Statistic:)
        return len(tokens) > 4 and tokens[3] in ("Rx", "Tx") and tokens[4] in ("d", "r")  # a damaged channel
    if fmt == "trc":
        return not line.startswith(";") and not _TRC_EVENTS.intersection(tokens)
    return False


def _numbered_lines(f: IO[str]) -> Iterator[tuple[int, str]]:
    """Non-empty stripped lines with their 1-based numbers; NUL runs end lines too."""
    for lineno, raw in enumerate(f, 1):
        # a NUL block (a text log on an SD card after a power loss) is no part of the lines around it
        for piece in raw.split("\x00") if "\x00" in raw else (raw,):
            line = piece.strip()
            if line:
                yield lineno, line


class _ReplayableLines:
    """A text file as a python-can reader's line source: numbered, the lines before the
    first frame (or first bad line) kept, so a new reader can be started after a bad line."""

    def __init__(self, f: IO[str]) -> None:
        self._f = f
        self._lines = ((n, piece + "\n") for n, piece in _numbered_lines(f))
        self.lineno = 0
        self.current = ""
        self._head: list[str] | None = None  # fixed at the first frame or the first bad line
        self._seen: list[str] = []
        self._replay: list[str] = []
        self._since_frame: list[tuple[int, str]] = []  # lines read from the file since the last frame

    def __iter__(self) -> _ReplayableLines:
        return self

    def __next__(self) -> str:
        if self._replay:
            return self._replay.pop(0)
        self.lineno, self.current = next(self._lines)
        self._since_frame.append((self.lineno, self.current.rstrip("\n")))
        if self._head is None and len(self._seen) <= _HEADER_LINES:
            self._seen.append(self.current)
        return self.current

    def skipped(self, current_too: bool) -> list[tuple[int, str]]:
        """The lines read since the last frame that made none (the current one too, with current_too:
        false when it made a frame or failed, which are counted on their own); then forgotten."""
        out = self._since_frame if current_too else self._since_frame[:-1]
        self._since_frame = []
        return out

    def frame_read(self) -> None:
        """The reader yielded a frame from the current line: what came before is the header."""
        if self._head is None:
            self._head = self._seen[:-1]

    def restart(self) -> None:
        """The current line failed: hand the header to the next reader, then the lines after it."""
        self.frame_read()
        assert self._head is not None
        self._replay = list(self._head)

    def close(self) -> None:
        self._f.close()


class _CountingFile:
    """A binary file that counts what is read from it and notices a short read (a cut file)."""

    def __init__(self, f: IO[bytes] | gzip.GzipFile) -> None:
        self._f = f
        self.pos = 0
        self.short = False

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.pos += len(data)
        # an empty read is the normal end between objects; a partial one is a cut
        self.short = self.short or 0 < len(data) < n
        return data

    def close(self) -> None:
        self._f.close()


def _normalise_format(fmt: str, path: Path) -> str:
    name = _ALIASES.get(fmt.lower(), fmt.lower())
    if name not in FORMATS:
        raise TraceError(path, f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    return name


def _suffix_hint(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return _SUFFIX_HINTS.get(suffixes[-1]) if suffixes else None


def _read_head(path: Path) -> tuple[bytes, bool]:
    """Return the first bytes of the (decompressed) file and whether it is gzipped."""
    try:
        with path.open("rb") as f:
            head = f.read(_SNIFF_BYTES)
        if not head.startswith(_GZIP_MAGIC):
            return head, False
        with gzip.open(path, "rb") as gz:
            return gz.read(_SNIFF_BYTES), True
    except (OSError, EOFError, zlib.error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TraceError(path, f"cannot open: {reason}") from exc


def _detect(path: Path, head: bytes) -> str:
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    hint = _suffix_hint(path)
    if b"\x00" in head:
        if hint in _PYCAN_BINARY:
            return hint
        # NUL blocks in a text log (an SD card after a power loss) do not make it binary
        if not _text_around_nuls(head):
            raise TraceError(path, "binary file of unknown format (force one with --format)")
        head = head.replace(b"\x00", b"\n")
    lines = head.decode("utf-8-sig", errors="replace").splitlines()
    if len(head) == _SNIFF_BYTES and lines:
        lines.pop()  # probably cut mid-line
    first = ""
    for line in [s.strip() for s in lines if s.strip()][:_SNIFF_LINES]:
        first = first or line
        for fmt, signature in _SIGNATURES:
            if signature.match(line):
                if fmt == "candump-console":
                    reason = "looks like candump console output; record with candump -L"
                    raise TraceError(path, reason)
                return fmt
    # python-can's readers tolerate headers our signatures miss, so their suffix is
    # trusted; candump and printed files must show themselves in the content.
    if hint is not None and (hint in _PYCAN_READERS or not first):
        return hint
    if not first:
        raise TraceError(path, "empty file, cannot determine its trace format")
    raise TraceError(
        path,
        "cannot determine trace format (not candump -L, python-can printed, ASC, BLF, "
        f"CSV, TRC, MF4 or sqlite); first line: {_shorten(first)!r}",
    )


def _text_around_nuls(head: bytes) -> bool:
    """Whether the NULs come in a few blocks between printable text (a lost SD card block), rather than
    everywhere (binary data, UTF-16 text)."""
    if len(re.findall(rb"\x00+", head)) * 16 > len(head):
        return False
    text = head.decode("utf-8-sig", errors="replace")
    return all(piece.isprintable() for piece in re.split(r"[\x00\r\n\t]+", text))


def read_trace(
    path: str | Path, fmt: str | None = None, *, max_errors: int = 1000
) -> Trace:
    """Open a CAN trace; detect its format unless ``fmt`` forces one of ``FORMATS``.

    Raises TraceError if the file cannot be opened or its format cannot be determined;
    bad lines are only counted and recorded in the returned ``Trace``.
    """
    path = Path(path)
    forced = _normalise_format(fmt, path) if fmt is not None else None
    head, gzipped = _read_head(path)
    name = forced or _detect(path, head)
    trace = Trace(path, name, gzipped=gzipped, max_errors=max_errors)
    if name in _PYCAN_READERS:
        # Fail now rather than mid-replay on what the reader checks up front
        # (BLF header, MF4 needing asammdf).
        trace._open_reader()[0].stop()
    return trace
