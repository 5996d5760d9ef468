"""gateway.tracefile on damaged traces: bad lines in python-can's text formats, a byte-order mark,
NUL blocks from an SD card, truncated BLF files. A bad line is counted and named; reading goes on."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import can
import pytest

from gateway.tracefile import TraceError, read_trace

ASC_HEAD = ("date Mon Jan 1 00:00:00.000 am 2024\nbase dec  timestamps absolute\ninternal events logged\n"
            "Begin TriggerBlock Mon Jan 1 00:00:00.000 am 2024\n")
TRC_HEAD = ";$FILEVERSION=2.1\n;$STARTTIME=45000.0\n;$COLUMNS=N,O,T,I,d,l,D\n"
CSV_HEAD = "timestamp,arbitration_id,extended,remote,error,dlc,data\n"


def asc_line(n: int, ident: str) -> str:  # base dec: a restarted reader must read the header again to know it
    return f"   {1 + n / 100:.6f} 1  {ident}             Rx   d 8 0 1 2 3 4 5 6 7\n"


def trc_line(n: int, ident: str) -> str:
    return f"      {n + 1}        {1000 + n:.3f} DT {ident:0>4} Rx 8 00 01 02 03 04 05 06 07\n"


def csv_line(n: int, ident: str) -> str:
    return f"{1 + n / 100},0x{ident},0,0,0,8,AAECAwQFBgc=\n"


FORMATS: dict[str, tuple[str, Callable[[int, str], str], Callable[[int], str]]] = {
    # format: (header, line writer, the text of ID i)
    "asc": (ASC_HEAD, asc_line, lambda i: str(256 + i)),
    "trc": (TRC_HEAD, trc_line, lambda i: f"{256 + i:X}"),
    "csv": (CSV_HEAD, csv_line, lambda i: f"{256 + i:X}"),
}


@pytest.mark.parametrize("bad_at", [0, 10, 19], ids=["first-line", "middle", "last-line"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_bad_line_in_asc_trc_csv_is_skipped_counted_and_named(tmp_path: Path, fmt: str, bad_at: int) -> None:
    head, line, ident = FORMATS[fmt]
    body = [line(i, ident(i) if i != bad_at else "1G0") for i in range(20)]
    path = tmp_path / f"t.{fmt}"
    path.write_text(head + "".join(body) + ("End TriggerBlock\n" if fmt == "asc" else ""), encoding="utf-8")
    trace = read_trace(path)
    frames = list(trace)
    assert trace.format == fmt
    assert [m.arbitration_id for m in frames] == [256 + i for i in range(20) if i != bad_at]
    assert (trace.frames, trace.bad) == (19, 1)
    [problem] = trace.errors
    assert (problem.unit, problem.location) == ("line", head.count("\n") + bad_at + 1)
    assert "1G0" in problem.text and str(problem).startswith(f"line {problem.location}: ")


def test_a_trc_whose_header_cannot_be_read_is_still_a_trace_error(tmp_path: Path) -> None:
    no_columns = ";$FILEVERSION=2.1\n;$STARTTIME=45000.0\n"
    short = tmp_path / "short.trc"
    short.write_text(no_columns + "".join(trc_line(i, "100") for i in range(3)), encoding="utf-8")
    trace = read_trace(short)
    with pytest.raises(TraceError, match=r"short\.trc: TRCReader failed after record 0 on line 3: .*no column"):
        list(trace)
    assert trace.bad == 3
    long = tmp_path / "long.trc"
    long.write_text(no_columns + "".join(trc_line(i, "100") for i in range(500)), encoding="utf-8")
    trace = read_trace(long)
    with pytest.raises(TraceError, match=r"no column information \(100 lines in a row\)"):
        list(trace)
    assert trace.bad == 100


@pytest.mark.parametrize("forced", [None, "candump"])
def test_a_byte_order_mark_costs_no_frame(tmp_path: Path, forced: str | None) -> None:
    one = tmp_path / "one.log"
    one.write_bytes("\ufeff(1.000000) can0 100#0001020304050607\n".encode())
    two = tmp_path / "two.log"
    two.write_bytes("\ufeff(1.000000) can0 100#00\n(1.100000) can0 101#01\n".encode())
    for path, ids in ((one, [0x100]), (two, [0x100, 0x101])):
        trace = read_trace(path, forced)
        assert [m.arbitration_id for m in trace] == ids and trace.bad == 0 and trace.format == "candump"
    asc = tmp_path / "bom.asc"
    asc.write_bytes(("\ufeff" + ASC_HEAD + asc_line(0, "256") + "End TriggerBlock\n").encode())
    trace = read_trace(asc)
    assert [m.arbitration_id for m in trace] == [256] and trace.bad == 0  # "base dec" was read


def test_a_printed_trace_with_a_byte_order_mark(tmp_path: Path, corpus: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + (corpus / "foxbms" / "test_log.txt").read_bytes())
    trace = read_trace(path)
    assert trace.format == "printed" and len(list(trace)) == 301 and trace.bad == 0


@pytest.mark.parametrize("name", ["sd.log", "sd.txt"])
def test_a_nul_block_in_a_text_log_costs_only_the_line_it_cut(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"(1.0) can0 100#00\n"
                     b"(1.1) can0 101#0" + b"\x00" * 600 + b"(1.2) can0 102#02\n"  # cut mid-line, then resumed
                     + b"\x00" * 512 + b"\n(1.3) can0 103#03\n")
    trace = read_trace(path)
    assert trace.format == "candump"
    assert [m.arbitration_id for m in trace] == [0x100, 0x102, 0x103]
    assert trace.bad == 1 and trace.errors[0].location == 2 and trace.errors[0].text == "(1.1) can0 101#0"


def test_binary_files_are_still_binary_and_the_error_names_the_cli_flag(tmp_path: Path) -> None:
    for name, data in (("junk.bin", b"\x00\x01\x02garbage"),
                       ("utf16.log", b"\xff\xfe" + "(1.0) can0 100#00\n".encode("utf-16-le") * 20)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(TraceError, match="binary") as info:
            read_trace(path)
        assert "--format" in info.value.reason and "fmt=" not in info.value.reason


def blf(tmp_path: Path, n: int = 1000) -> bytes:
    path = tmp_path / "full.blf"
    with can.BLFWriter(str(path)) as w:
        for i in range(n):
            w.on_message_received(can.Message(timestamp=1.0 + i * 0.01, arbitration_id=0x100,
                                              is_extended_id=False, data=bytes(8)))
    return path.read_bytes()


@pytest.mark.parametrize("cut", [37, 2000, 2381, 4000])
def test_a_truncated_blf_is_reported(tmp_path: Path, cut: int) -> None:
    data = blf(tmp_path)
    path = tmp_path / "cut.blf"
    path.write_bytes(data[: len(data) - cut])
    trace = read_trace(path)
    frames = list(trace)
    assert len(frames) < 1000 and trace.frames == len(frames)
    assert trace.bad == 1
    [problem] = trace.errors
    assert problem.reason.startswith("truncated: ") and problem.text == str(path)
    assert f"the header gives {len(data)} bytes, the file ends after {len(data) - cut}" in problem.reason


def test_a_truncated_blf_without_a_final_header_is_reported(tmp_path: Path) -> None:
    """A writer that died keeps the placeholder header (file size 144): a cut inside an object still shows."""
    data = bytearray(blf(tmp_path))
    struct.pack_into("<Q", data, 16, 144)  # the header's file size field
    path = tmp_path / "unfinished.blf"
    path.write_bytes(bytes(data))
    trace = read_trace(path)
    assert len(list(trace)) == 1000 and trace.bad == 0
    for cut in (37, len(data) // 2):
        path.write_bytes(bytes(data[: len(data) - cut]))
        trace = read_trace(path)
        assert len(list(trace)) < 1000
        assert trace.bad == 1 and trace.errors[0].reason.startswith("truncated: the file ends after")


def test_a_complete_blf_has_no_problem(tmp_path: Path) -> None:
    path = tmp_path / "ok.blf"
    path.write_bytes(blf(tmp_path, 300))
    trace = read_trace(path)
    assert len(list(trace)) == 300 and trace.bad == 0


ASC_FRAME = "1  100             Rx   d 8 1 2 3 4 5 6 7 8"


@pytest.mark.parametrize("damaged", [
    f"   2.0x0000 {ASC_FRAME}",  # a bit flip in the timestamp
    "   2.000000 1",  # cut after the channel
    "   2.000000 1  100             Rq   d 8 1 2 3 4 5 6 7 8",  # the direction damaged
    "   2.000000 X  100             Rx   d 8 1 2 3 4 5 6 7 8",  # the channel damaged
], ids=["timestamp", "cut", "direction", "channel"])
def test_a_damaged_asc_frame_line_python_can_skips_is_counted(tmp_path: Path, damaged: str) -> None:
    """python-can's ASCReader passes over lines it does not recognise without a word: a damaged frame
    line among them is a bad line like any other (the module docstring promises it is counted)."""
    path = tmp_path / "t.asc"
    path.write_text(ASC_HEAD + f"   1.000000 {ASC_FRAME}\n{damaged}\n   3.000000 {ASC_FRAME}\nEnd TriggerBlock\n")
    trace = read_trace(path)
    assert len(list(trace)) == 2
    assert (trace.frames, trace.bad) == (2, 1)
    [problem] = trace.errors
    assert (problem.unit, problem.location) == ("line", ASC_HEAD.count("\n") + 2)
    assert "ASCReader skipped it" in problem.reason


def test_asc_header_comment_and_event_lines_are_not_bad(tmp_path: Path) -> None:
    """What ASC files legitimately hold besides frames stays uncounted (no false alarms)."""
    path = tmp_path / "t.asc"
    path.write_text("date Mon Jan 1 00:00:00.000 am 2024\nbase hex  timestamps absolute\n// a comment, Rx 100\n"
                    "internal events logged\n// version 9.0.0\nBegin TriggerBlock Mon Jan 1 00:00:00.000 am 2024\n"
                    "   0.000000 Start of measurement\n"
                    f"   1.000000 {ASC_FRAME}\n"
                    "   1.500000 1  Statistic: D 0 R 0 XD 0 XR 0 E 0 O 0 B 0.00%\n"
                    "   1.600000 CAN 1 Status:chip status error active\n"
                    "   1.700000 Li 1f Rx 8 1 2 3 4 5 6 7 8\n"
                    "   1.800000 1  J1939TP FEE3p 6 0 0 - Rx d 23\n"
                    "   1.900000 SV: 1 0 1 ::Var 1\n"
                    f"   3.000000 {ASC_FRAME}\nEnd TriggerBlock\n")
    trace = read_trace(path)
    assert len(list(trace)) == 2
    assert (trace.frames, trace.bad) == (2, 0), trace.errors


def test_a_damaged_trc_frame_type_is_counted_and_status_records_are_not(tmp_path: Path) -> None:
    path = tmp_path / "t.trc"
    path.write_text(TRC_HEAD + trc_line(0, "100")
                    + "      2        1001.000 DX 0100 Rx 8 00 01 02 03 04 05 06 07\n"  # DT damaged
                    + "      3        1001.500 ST Rx 00000008\n"  # a status record: not a frame, not damage
                    + "      4        1001.700 EC Rx 02 00\n"
                    + trc_line(4, "104"))
    trace = read_trace(path)
    assert [m.arbitration_id for m in trace] == [0x100, 0x104]
    assert (trace.frames, trace.bad) == (2, 1), trace.errors
    assert trace.errors[0].location == TRC_HEAD.count("\n") + 2 and "DX" in trace.errors[0].text
