"""Tests for gateway.tracefile (reading recorded CAN traces)."""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Iterable
from pathlib import Path

import can
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tracefile import (
    FORMATS,
    TraceError,
    TraceProblem,
    parse_candump,
    parse_printed,
    read_trace,
)

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
FOXBMS_LOG = CORPUS / "foxbms" / "test_log.txt"

needs_corpus = pytest.mark.skipif(
    not CORPUS.is_dir(), reason=f"shared corpus folder {CORPUS} is absent"
)

FD_LENGTHS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64]


def same_frame(a: can.Message, b: can.Message, *, channel: bool = True) -> bool:
    return a.equals(b, timestamp_delta=1e-6, check_channel=channel)


def sample_messages() -> list[can.Message]:
    """Frames every python-can writer under test can represent."""
    return [
        can.Message(
            timestamp=1700000000.25,
            arbitration_id=0x123,
            is_extended_id=False,
            data=b"\xde\xad\xbe\xef",
            channel="can0",
        ),
        can.Message(
            timestamp=1700000000.5,
            arbitration_id=0x18FF50E5,
            is_extended_id=True,
            data=bytes(range(8)),
            channel="can0",
        ),
        can.Message(
            timestamp=1700000000.75,
            arbitration_id=0x7FF,
            is_extended_id=False,
            data=b"",
            channel="can1",
        ),
        can.Message(
            timestamp=1700000001.0,
            arbitration_id=0x321,
            is_extended_id=False,
            is_remote_frame=True,
            dlc=5,
            channel="can0",
        ),
    ]


def fd_messages() -> list[can.Message]:
    return [
        can.Message(
            timestamp=1700000002.0,
            arbitration_id=0x456,
            is_extended_id=False,
            is_fd=True,
            bitrate_switch=True,
            data=bytes(range(12)),
            channel="can0",
        ),
        can.Message(
            timestamp=1700000003.0,
            arbitration_id=0x1ABCDEF0,
            is_extended_id=True,
            is_fd=True,
            error_state_indicator=True,
            data=bytes(range(64)),
            channel="can0",
        ),
    ]


def write_with(
    writer_cls: type[can.io.generic.MessageWriter],
    path: Path,
    messages: Iterable[can.Message],
) -> None:
    with writer_cls(path) as writer:
        for msg in messages:
            writer.on_message_received(msg)


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- real trace -----------------------------------------------------------


@needs_corpus
def test_foxbms_trace_reads_all_301_frames() -> None:
    trace = read_trace(FOXBMS_LOG)
    frames = list(trace)
    assert trace.format == "printed"
    assert len(frames) == 301
    assert (trace.frames, trace.bad, trace.errors) == (301, 0, [])

    first, last = frames[0], frames[-1]
    assert first.timestamp == pytest.approx(132.072247, abs=1e-9)
    assert (first.arbitration_id, first.is_extended_id) == (0x241, False)
    assert first.data == bytes.fromhex("0007ecbf61fb2fd9")
    assert first.dlc == 8 and first.is_rx and first.channel is None
    assert last.timestamp == pytest.approx(134.078012, abs=1e-9)
    assert (last.arbitration_id, last.is_extended_id) == (0x221, False)
    assert last.data == bytes.fromhex("8000000000000000")
    assert all(not (m.is_fd or m.is_remote_frame or m.is_error_frame) for m in frames)
    assert [m.timestamp for m in frames] == sorted(m.timestamp for m in frames)


@needs_corpus
def test_foxbms_trace_forced_format_and_reprinted_lines_agree(tmp_path: Path) -> None:
    original = list(read_trace(FOXBMS_LOG, fmt="printed"))
    # Today's python-can prints 3-digit ids and other spacing than the recording.
    reprinted = write_lines(tmp_path / "reprinted.txt", (str(m) for m in original))
    again = list(read_trace(reprinted))
    assert len(again) == 301
    assert all(same_frame(a, b) for a, b in zip(original, again, strict=True))


# --- candump -L -----------------------------------------------------------


def test_candump_frame_kinds() -> None:
    msg = parse_candump("(1436509052.249713) can0 123#DEADBEEF")
    assert msg.timestamp == pytest.approx(1436509052.249713, abs=1e-6)
    assert (msg.channel, msg.arbitration_id, msg.is_extended_id) == (
        "can0",
        0x123,
        False,
    )
    assert msg.data == b"\xde\xad\xbe\xef" and msg.dlc == 4 and msg.is_rx

    ext = parse_candump("(1.000000) vcan1 12345678#0102")
    assert (ext.arbitration_id, ext.is_extended_id, ext.data) == (
        0x12345678,
        True,
        b"\1\2",
    )

    remote = parse_candump("(1.0) can0 123#R")
    assert remote.is_remote_frame and remote.dlc == 0 and remote.data == b""
    assert parse_candump("(1.0) can0 123#R5").dlc == 5

    fd = parse_candump("(1.0) can0 123##1DEADBEEF")
    assert fd.is_fd and fd.bitrate_switch and not fd.error_state_indicator
    assert fd.data == b"\xde\xad\xbe\xef"
    esi = parse_candump("(1.0) can0 1ABCDEF0##2" + "00" * 64)
    assert esi.is_fd and esi.error_state_indicator and not esi.bitrate_switch
    assert len(esi.data) == 64 and esi.is_extended_id
    both = parse_candump("(1.0) can0 123##3")
    assert both.bitrate_switch and both.error_state_indicator and both.data == b""

    err = parse_candump("(1.0) can0 20000080#0000000000000000")
    assert err.is_error_frame and err.arbitration_id == 0x80
    assert len(err.data) == 8

    assert parse_candump("(1.0) can0 123#DE.AD.BE.EF").data == b"\xde\xad\xbe\xef"
    assert not parse_candump("(1.0) can0 123#11 T").is_rx
    assert parse_candump("(1.0) can0 123#11 R").is_rx
    raw_dlc = parse_candump("(1.0) can0 123#1122334455667788_C")
    assert raw_dlc.dlc == 12 and len(raw_dlc.data) == 8


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("(1.0) can0 123#ABC", "odd number"),
        ("(1.0) can0 1234#AB", r"3 \(standard\) or 8 \(extended\)"),
        ("(1.0) can0 800#AB", "standard id 0x800 out of range"),
        ("(1.0) can0 40000000#", "flag bits"),
        ("(1.0) can0 123#001122334455667788", "at most 8"),
        ("(1.0) can0 123##1" + "00" * 9, "not a valid CAN FD length"),
        ("(1.0) can0 123#R9", "remote frame DLC 9"),
        ("(1.0) can0 123#0011_C", "exactly 8 data bytes"),
        ("(1.0) can0 123###00", "CAN XL"),
        ("can0 123#00", "not a candump -L line"),
        ("(1.0) can0 123#GG", "not a candump -L line"),
    ],
)
def test_candump_bad_lines(line: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_candump(line)


def test_candump_round_trip_against_python_can_writer(tmp_path: Path) -> None:
    originals = [*sample_messages(), *fd_messages()]
    for msg in originals:
        if msg.is_remote_frame:
            msg.dlc = 0  # python-can's writer drops the remote DLC ("R", not "R5")
    error = can.Message(timestamp=1700000004.0, is_error_frame=True, channel="can0")
    tx = can.Message(
        timestamp=1700000005.0,
        arbitration_id=0x42,
        is_extended_id=False,
        is_rx=False,
        data=b"\x01",
        channel="vcan0",
    )
    path = tmp_path / "dump.log"
    write_with(can.CanutilsLogWriter, path, [*originals, error, tx])

    trace = read_trace(path)
    frames = list(trace)
    assert trace.format == "candump" and trace.bad == 0
    assert len(frames) == len(originals) + 2
    for want, got in zip([*originals, tx], [*frames[:-2], frames[-1]], strict=True):
        assert same_frame(want, got), (want, got)
    assert frames[-2].is_error_frame and frames[-2].channel == "can0"

    # python-can's own reader agrees (it turns "can0" into channels the same way).
    theirs = list(can.CanutilsLogReader(path))
    for ours, other in zip(frames, theirs, strict=True):
        if not ours.is_error_frame:
            assert same_frame(ours, other)


def test_candump_file_with_malformed_lines(tmp_path: Path) -> None:
    long_garbage = "x" * 500
    path = write_lines(
        tmp_path / "mixed.log",
        [
            "(0.000100) can0 123#00",
            "(0.000200) can0 123#0",  # odd digits
            "",
            long_garbage,
            "(0.000300) can0 12345678#AABB",
            "(0.000400) can0 9999#00",  # 4-digit id
            "(0.000500) can0 7FF#R8",
        ],
    )
    trace = read_trace(path)
    frames = list(trace)
    assert [m.arbitration_id for m in frames] == [0x123, 0x12345678, 0x7FF]
    assert (trace.frames, trace.bad) == (3, 3)
    assert [p.location for p in trace.errors] == [2, 4, 6]
    assert all(p.unit == "line" for p in trace.errors)
    assert "odd number" in trace.errors[0].reason
    assert len(trace.errors[1].text) <= 80 and trace.errors[1].text.startswith("xxx")
    assert str(trace.errors[2]).startswith("line 6: ")


def test_candump_gzip(tmp_path: Path) -> None:
    path = tmp_path / "dump.log.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("(1.0) can0 123#00\n(2.0) can0 124#01\n")
    trace = read_trace(path)
    assert trace.format == "candump"
    assert [m.arbitration_id for m in trace] == [0x123, 0x124]


# --- python-can printed format ---------------------------------------------


def test_printed_variants() -> None:
    old = parse_printed(
        "Timestamp:      132.072247        ID: 0241    S Rx"
        "                DL:  8    00 07 ec bf 61 fb 2f d9"
    )
    assert (old.arbitration_id, old.is_extended_id, old.dlc) == (0x241, False, 8)
    # No S/X flag (older python-can): 8 digits mean extended.
    assert parse_printed("Timestamp: 1.0 ID: 00000241 DL: 0").is_extended_id
    assert not parse_printed("Timestamp: 1.0 ID: 0241 DL: 0").is_extended_id
    text = parse_printed(
        "Timestamp: 1.000000 ID: 123 S Tx DL:  2 41 42 'AB' Channel: vcan 0"
    )
    assert text.data == b"AB" and not text.is_rx and text.channel == "vcan 0"
    fd = parse_printed("Timestamp: 1.0 ID: 00000001 X Rx F BS EI DL: 12 " + "00 " * 12)
    assert fd.is_fd and fd.bitrate_switch and fd.error_state_indicator
    remote = parse_printed("Timestamp: 1.0 ID: 7ff S Rx R DL:  3")
    assert remote.is_remote_frame and remote.dlc == 3 and remote.data == b""
    assert parse_printed("Timestamp: 1.0 ID: 00000000 X Rx E DL: 0").is_error_frame


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("Timestamp: 1.0 ID: 123 S Rx DL: 3 01 02", "DL 3 does not match 2"),
        ("Timestamp: 1.0 ID: 123 S Rx DL: 1 01 02", "DL 1 does not match 2"),
        ("Timestamp: 1.0 ID: 123 S Q DL: 0", "unknown flag"),
        ("Timestamp: 1.0 ID: 123 S X DL: 0", "conflicting"),
        ("Timestamp: 1.0 ID: 800 S DL: 0", "out of range"),
        ("Timestamp: 1.0 ID: 123 S R DL: 1 00", "remote frame with data"),
        ("Timestamp: 1.0 ID: 123 S BS DL: 0", "BRS/ESI"),
        ("Timestamp: 1.0 ID: 123 S F DL: 9 " + "00 " * 9, "not a valid CAN FD"),
        ("Timestamp: 1.0 ID: 123 S DL: 1 0g", "not a python-can printed"),
        ("Timestamp: x ID: 123 DL: 0", "not a python-can printed"),
    ],
)
def test_printed_bad_lines(line: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_printed(line)


@st.composite
def messages(draw: st.DrawFn) -> can.Message:
    kind = draw(st.sampled_from(["data", "remote", "fd", "error"]))
    extended = draw(st.booleans())
    arbitration_id = draw(st.integers(0, 0x1FFFFFFF if extended else 0x7FF))
    fd = kind == "fd"
    if fd:
        data = draw(
            st.binary(min_size=0, max_size=64).filter(lambda b: len(b) in FD_LENGTHS)
        )
    elif kind == "remote":
        data = b""
    else:
        data = draw(st.binary(max_size=8))
    return can.Message(
        timestamp=draw(st.integers(0, 2 * 10**15)) / 1e6,
        arbitration_id=arbitration_id,
        is_extended_id=extended,
        is_remote_frame=kind == "remote",
        is_error_frame=kind == "error",
        channel=draw(st.none() | st.from_regex(r"[A-Za-z0-9_]{1,12}", fullmatch=True)),
        dlc=draw(st.integers(0, 8)) if kind == "remote" else None,
        data=data,
        is_fd=fd,
        is_rx=draw(st.booleans()),
        bitrate_switch=fd and draw(st.booleans()),
        error_state_indicator=fd and draw(st.booleans()),
    )


@settings(max_examples=300, deadline=None)
@given(messages())
def test_printed_round_trip_property(msg: can.Message) -> None:
    parsed = parse_printed(str(msg))
    assert same_frame(msg, parsed), (str(msg), parsed)


def test_printed_file_round_trip(tmp_path: Path) -> None:
    originals = [
        *sample_messages(),
        *fd_messages(),
        can.Message(timestamp=5.0, is_error_frame=True, data=bytes(8)),
    ]
    path = write_lines(tmp_path / "printed.txt", (str(m) for m in originals))
    frames = list(read_trace(path))
    assert all(same_frame(a, b) for a, b in zip(originals, frames, strict=True))


def test_printed_file_with_malformed_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "printed.txt",
        [
            "Timestamp: 1.0 ID: 123 S Rx DL: 1 01",
            "Timestamp: 2.0 ID: 123 S Rx DL: 2 01",
            "garbage",
            "Timestamp: 3.0 ID: 124 S Rx DL: 0",
        ],
    )
    trace = read_trace(path)
    assert [m.timestamp for m in trace] == [1.0, 3.0]
    assert trace.errors[0] == TraceProblem(
        2, "DL 2 does not match 1 data bytes", "Timestamp: 2.0 ID: 123 S Rx DL: 2 01"
    )
    assert trace.errors[1].location == 3 and trace.bad == 2


# --- python-can's own formats -----------------------------------------------


@pytest.mark.parametrize(
    ("writer_cls", "suffix", "fmt", "with_fd"),
    [
        (can.ASCWriter, ".asc", "asc", True),
        (can.BLFWriter, ".blf", "blf", True),
        (can.CSVWriter, ".csv", "csv", False),
        (can.TRCWriter, ".trc", "trc", False),
        (can.SqliteWriter, ".db", "sqlite", False),
    ],
)
def test_python_can_formats_round_trip(
    tmp_path: Path,
    writer_cls: type[can.io.generic.MessageWriter],
    suffix: str,
    fmt: str,
    with_fd: bool,
) -> None:
    originals = sample_messages() + (fd_messages() if with_fd else [])
    if fmt == "trc":  # python-can's TRCWriter cannot log remote frames
        originals = [m for m in originals if not m.is_remote_frame]
    path = tmp_path / f"trace{suffix}"
    write_with(writer_cls, path, originals)

    trace = read_trace(path)
    ours = list(trace)
    assert trace.format == fmt and trace.bad == 0
    with can.LogReader(path) as reader:
        theirs = list(reader)
    assert len(ours) == len(theirs) == len(originals)
    for want, got, other in zip(originals, ours, theirs, strict=True):
        assert same_frame(got, other)
        # Writers differ in what they keep (channel, direction, timestamps).
        assert (got.arbitration_id, got.is_extended_id) == (
            want.arbitration_id,
            want.is_extended_id,
        )
        assert got.data == want.data and got.dlc == want.dlc
        assert (got.is_remote_frame, got.is_fd) == (want.is_remote_frame, want.is_fd)
        assert got.bitrate_switch == want.bitrate_switch

    # The content decides, not the suffix; fmt forces.
    renamed = path.rename(tmp_path / "renamed.bin")
    assert read_trace(renamed).format == fmt
    assert len(list(read_trace(renamed, fmt=fmt))) == len(originals)


def test_asc_gzip(tmp_path: Path) -> None:
    plain = tmp_path / "trace.asc"
    write_with(can.ASCWriter, plain, sample_messages())
    packed = tmp_path / "trace.asc.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    trace = read_trace(packed)
    assert trace.format == "asc" and len(list(trace)) == len(sample_messages())


def test_python_can_failure_becomes_trace_error(tmp_path: Path) -> None:
    broken_blf = tmp_path / "broken.blf"
    broken_blf.write_bytes(b"LOGG" + b"\xff" * 10)
    with pytest.raises(TraceError, match="broken.blf"):
        list(read_trace(broken_blf))

    broken_csv = write_lines(
        tmp_path / "broken.csv",
        ["timestamp,arbitration_id,extended,remote,error,dlc,data", "1.0,zz"],
    )
    trace = read_trace(broken_csv)
    with pytest.raises(
        TraceError, match=r"broken\.csv.*CSVReader failed after record 0"
    ):
        list(trace)


def test_python_can_invalid_records_are_skipped(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "odd.csv",
        [
            "timestamp,arbitration_id,extended,remote,error,dlc,data",
            "1.0,0x123,0,0,0,1,AQ==",
            "2.0,0x900,0,0,0,1,AQ==",  # standard id out of range
            "3.0,0x124,0,0,0,2,AQ==",  # dlc 2, one byte
            "4.0,0x125,0,0,0,1,AQ==",
        ],
    )
    trace = read_trace(path)
    assert [m.arbitration_id for m in trace] == [0x123, 0x125]
    # a text format names the file line (a binary one the record)
    assert [(p.unit, p.location) for p in trace.errors] == [
        ("line", 3),
        ("line", 4),
    ]
    assert "out of range" in trace.errors[0].reason


@pytest.mark.skipif(
    importlib.util.find_spec("asammdf") is not None, reason="asammdf is installed"
)
def test_mf4_without_asammdf_is_a_trace_error(tmp_path: Path) -> None:
    path = tmp_path / "trace.mf4"
    path.write_bytes(b"MDF     4.10    " + bytes(48))
    with pytest.raises(TraceError, match=r"trace\.mf4.*asammdf"):
        read_trace(path)


# --- detection and errors ----------------------------------------------------


def test_unknown_format_names_the_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "mystery.txt", ["hello world", "42"])
    with pytest.raises(TraceError, match="mystery.txt.*cannot determine") as info:
        read_trace(path)
    assert info.value.path == path and "hello world" in info.value.reason

    binary = tmp_path / "mystery.bin"
    binary.write_bytes(b"\x00\x01\x02garbage")
    with pytest.raises(TraceError, match="mystery.bin.*binary"):
        read_trace(binary)


def test_missing_file_and_bad_fmt(tmp_path: Path) -> None:
    missing = tmp_path / "nope.log"
    with pytest.raises(TraceError, match="nope.log.*cannot open"):
        read_trace(missing)
    path = write_lines(tmp_path / "x.log", ["(1.0) can0 123#00"])
    with pytest.raises(TraceError, match="unknown format 'pcap'"):
        read_trace(path, fmt="pcap")
    assert read_trace(path, fmt="LOG").format == "candump"
    assert set(FORMATS) >= {"candump", "printed", "asc", "blf", "csv", "trc"}


def test_empty_files(tmp_path: Path) -> None:
    empty_log = tmp_path / "empty.log"
    empty_log.write_text("\n\n")
    trace = read_trace(empty_log)
    assert list(trace) == [] and trace.format == "candump"
    empty_txt = tmp_path / "empty.txt"
    empty_txt.touch()
    with pytest.raises(TraceError, match=r"empty\.txt.*empty file"):
        read_trace(empty_txt)


def test_detection_skips_a_malformed_first_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.txt", ["(1.0) can0 12#00", "(2.0) can0 123#00"])
    trace = read_trace(path)
    assert trace.format == "candump"
    assert len(list(trace)) == 1 and trace.errors[0].location == 1


def test_candump_console_output_is_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "screen.txt", ["  can0  123   [4]  DE AD BE EF"])
    with pytest.raises(TraceError, match="candump -L"):
        read_trace(path)


def test_forced_format_overrides_content(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.log", ["(1.0) can0 123#00"])
    trace = read_trace(path, fmt="printed")
    assert list(trace) == [] and trace.bad == 1


def test_iteration_is_lazy_and_repeatable(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.log",
        [f"({i}.0) can0 123#{i % 256:02X}" for i in range(1000)] + ["bad"],
    )
    trace = read_trace(path)
    first = next(iter(trace))
    assert first.data == b"\x00" and trace.frames == 1
    assert len(list(trace)) == 1000 and (trace.frames, trace.bad) == (1000, 1)
    assert len(list(trace)) == 1000 and (trace.frames, trace.bad) == (1000, 1)


def test_error_list_is_capped_but_all_bad_lines_count(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.log", ["(1.0) can0 123#00"] + ["(1.0) can0 1#"] * 50
    )
    trace = read_trace(path, max_errors=5)
    assert len(list(trace)) == 1
    assert trace.bad == 50 and len(trace.errors) == 5
