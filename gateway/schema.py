"""Typed loading of TOML files into frozen dataclasses, with errors that point.

Every error names the file, the key path and, where it can be found, the line,
so a technician can fix a config over SSH without guessing.  Sections are plain
dataclasses; their field types drive the conversion (bool, int, float, str,
Literal, tuples/lists, dicts, nested dataclasses, optionals).  Unknown keys are
errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import stat
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(Exception):
    """A bad config, map or DBC: file, key path, line (when known) and reason."""

    def __init__(self, file: str | Path, key: str, reason: str, line: int | None = None) -> None:
        self.file = str(file)
        self.key = key
        self.reason = reason
        self.line = line
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """Parse a TOML file; syntax errors become ConfigError with the line."""
    try:
        text = read_text(path)
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(path, "", f"TOML syntax: {exc}", int(m.group(1)) if m else None) from None


def read_text(path: Path) -> str:
    """A UTF-8 text file, without the byte-order mark some Windows editors put first (it is no syntax error)."""
    return path.read_text(encoding="utf-8-sig")


def lookup_path(name: str, bases: Sequence[Path] = (), folders: bool = False) -> Path | None:
    """The path of the existing file (with ``folders``: or folder) that a path key names.

    ``~`` and ``~user`` are expanded; a relative name is tried against each of ``bases`` in turn
    (the config's folder first), an absolute one as it is.  None when it exists in none of them.
    ValueError(reason) when the name cannot be looked up at all (an unknown ``~user``, a NUL, a name
    too long for the file system, a folder the gateway's user may not enter) or names something
    that is not a file: every path key turns this into a ConfigError naming the key, instead of a
    traceback (exit code 1) from deep in pathlib.
    """
    if "\0" in name:
        raise ValueError(f"'{name}' contains a NUL character")
    try:
        p = Path(name).expanduser()
    except RuntimeError:  # ~user of an unknown user, or ~ without a home directory
        raise ValueError(f"'{name}': cannot expand '{name.split('/', 1)[0]}' (no such user, or no home "
                         "directory)") from None
    for cand in [p] if p.is_absolute() else [b / p for b in bases]:
        try:
            st = cand.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:  # EACCES on a folder on the way, ENAMETOOLONG, ELOOP, EIO
            raise ValueError(f"cannot look up '{cand}': {exc.strerror or exc}") from None
        if stat.S_ISREG(st.st_mode) or (folders and stat.S_ISDIR(st.st_mode)):
            return cand if p.is_absolute() else cand.resolve()  # messages name an absolute path as given
        raise ValueError(f"'{cand}' is not a file{' or folder' if folders else ''}")
    return None


def locate(text: str, key: str) -> int | None:
    """Best-effort line of a key path such as ``bus[1].interface`` in TOML text."""
    parts = [(m.group(1), int(m.group(2)) if m.group(2) else None)
             for m in re.finditer(r"([^.\[\]]+)(?:\[(\d+)\])?", key)]
    lines = text.splitlines()
    is_header = re.compile(r"^\s*\[")
    start, end, found, consumed = 0, len(lines), None, 0
    # descend through [table] / [[array]] headers as far as the key path names them
    for k in range(len(parts)):
        table = ".".join(name for name, _ in parts[: k + 1])
        header = re.compile(rf"^\s*\[\[?\s*{re.escape(table)}\s*\]\]?\s*(#.*)?$")
        hits = [i for i in range(start, end) if header.match(lines[i])]
        nth = parts[k][1] or 0
        if nth >= len(hits):  # [a.b] may stand without [a]
            continue
        found = hits[nth]
        start = found + 1
        end = next((i for i in range(start, len(lines)) if is_header.match(lines[i])
                    and not re.match(rf"^\s*\[\[?\s*{re.escape(table)}\.", lines[i])), len(lines))
        consumed = k + 1
    if consumed < len(parts):
        assign = re.compile(rf"^\s*[\"']?{re.escape(parts[consumed][0])}[\"']?\s*=")
        for i in range(start, end):
            if assign.match(lines[i]):
                return i + 1
    return found + 1 if found is not None else None


class Loader:
    """Converts parsed TOML into dataclasses, collecting the file and text for errors."""

    def __init__(self, file: str | Path, text: str = "") -> None:
        self.file = str(file)
        self.text = text

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.file, key, reason, locate(self.text, key) if self.text else None)

    def load(self, cls: type[T], data: Any, key: str = "") -> T:
        """Build ``cls`` from a TOML table, checking every key and type."""
        if not isinstance(data, dict):
            raise self.error(key, f"expected a table, got {_kind(data)}")
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for k in data:
            if k not in fields:
                close = difflib.get_close_matches(k, fields, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
                raise self.error(_join(key, k), f"unknown key{hint}")
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            sub = _join(key, name)
            if name in data:
                kwargs[name] = self.convert(hints[name], data[name], sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.error(sub, "missing required key")
        try:
            obj = cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise self.error(key, str(exc)) from None
        check: Callable[[], None] | None = getattr(obj, "check", None)
        if check is not None:
            try:
                check()
            except ValueError as exc:
                # a check may name a sub-key as "key: reason"
                sub, sep, reason = str(exc).partition(": ")
                if sep and re.fullmatch(r"[\w\[\].]+", sub):
                    raise self.error(_join(key, sub), reason) from None
                raise self.error(key, str(exc)) from None
        return obj

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        origin = get_origin(tp)
        args = get_args(tp)
        if tp is Any:
            return value
        if origin in (typing.Union, types.UnionType):
            alts = [a for a in args if a is not type(None)]
            if len(alts) == 1:  # Optional[X]: X's own errors are the precise ones
                return self.convert(alts[0], value, key)
            errors = []
            for alt in args:
                if alt is type(None):
                    continue
                try:
                    return self.convert(alt, value, key)
                except ConfigError as exc:
                    errors.append(exc.reason)
            raise self.error(key, " or ".join(dict.fromkeys(errors)))
        if origin is typing.Literal:
            if value not in args:
                raise self.error(key, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
            return value
        if dataclasses.is_dataclass(tp):
            return self.load(tp, value, key)  # type: ignore[arg-type]
        if origin in (list, tuple):
            if not isinstance(value, list):
                raise self.error(key, f"expected an array, got {_kind(value)}")
            item = args[0] if args else Any
            items = [self.convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(value, dict):
                raise self.error(key, f"expected a table, got {_kind(value)}")
            return {k: self.convert(args[1], v, _join(key, k)) for k, v in value.items()}
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self.error(key, f"expected a number, got {_kind(value)}")
            if not math.isfinite(value):  # TOML has nan and inf; every range check below would let them by
                raise self.error(key, f"must be a finite number, got {value}")
            return float(value)
        if tp in (int, str, bool):
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise self.error(key, f"expected {_NAMES[tp]}, got {_kind(value)}")
            return value
        raise TypeError(f"unsupported config type {tp!r} at {key}")


_NAMES = {int: "an integer", str: "a string", bool: "true or false"}


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__) + (f" ({value!r})" if not isinstance(value, list | dict) else "")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain TOML-compatible data (for printing, hashing)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
