#!/usr/bin/env python3
"""Generate dbc/bmsgw_eis.dbc, the CAN protocol of the EIS (impedance spectroscopy) module.

docs/eis-can-protocol.md explains the protocol; re-run this script after changing it:

    python scripts/gen_eis_dbc.py > dbc/bmsgw_eis.dbc

The IDs live in 0x300 ... 0x33F, clear of dbc/bmsgw_pack.dbc (0x100 ... 0x2BF) and of the
inverter "BMS-CAN" range (0x351 ... 0x35E). Frequencies of a sweep request are coded as
log10(Hz) because the sweep grid is logarithmic; measured points carry IEEE-754 float32.
"""

from __future__ import annotations

import argparse

# the SG_/BO_ writers are shared with the pack protocol's generator (this file runs as a script)
from gen_pack_dbc import Msg, Sig

VERSION = "bmsgw-eis 1.0"
PROTOCOL_VERSION = 1  # sent in EIS_Capabilities.ProtocolVersion; bump with VERSION on wire changes

ID_ABORT = 0x300
ID_SWEEP_REQUEST = 0x301
ID_RESEND_REQUEST = 0x302
ID_ACK = 0x308
ID_STATUS = 0x310
ID_CAPABILITIES = 0x311
ID_RESULT_POINT = 0x320
ID_RESULT_POINTS_FD = 0x321

FD_POINTS_PER_FRAME = 5
FD_LENGTH = 64

# log10(Hz) coding of frequencies in requests and capabilities: 12 bits, 0.002 decade, from 1 mHz
LOG_F_SCALE = 0.002
LOG_F_OFFSET = -3.0
LOG_F_MAX = LOG_F_OFFSET + LOG_F_SCALE * 4095  # 5.19 -> 155 kHz
AMPLITUDE_SCALE = 0.005  # A per bit, 12 bits -> 20.475 A

STATES = {0: "Idle", 1: "Settling", 2: "Measuring", 3: "Done", 4: "Aborted", 5: "Error"}
ERROR_CODES = {
    0: "None",
    1: "Busy",
    2: "InvalidSweepId",
    3: "InvalidTarget",
    4: "InvalidFrequency",
    5: "InvalidPoints",
    6: "InvalidAmplitude",
    7: "FdNotSupported",
    8: "UnknownSweep",
    9: "DcCurrentTooHigh",
    10: "VoltageOutOfRange",
    11: "Overload",
    12: "Drift",
    13: "OverTemperature",
    14: "HardwareFault",
    15: "AbortedByGateway",
    16: "GatewayLost",
    17: "InternalError",
}
ABORT_REASONS = {0: "Unspecified", 1: "Operator", 2: "ProtectionEvent", 3: "CurrentChange", 4: "Timeout",
                 5: "Shutdown"}
TARGET_TYPES = {0: "Cell", 1: "Module"}
RESULT_FORMATS = {0: "Classic", 1: "FD"}
COMMANDS = {0: "Abort", 1: "SweepRequest", 2: "ResendRequest"}
PARTS = {0: "Frequency", 1: "Real", 2: "Imag"}


def _logf(name: str, start: int, comment: str) -> Sig:
    return Sig(name, start, 12, LOG_F_SCALE, LOG_F_OFFSET, LOG_F_OFFSET, round(LOG_F_MAX, 3), "log10(Hz)",
               comment=comment)


F32_MAX = 3.4028234663852886e38


def _f32(name: str, start: int, unit: str, comment: str, mux: str = "") -> Sig:
    return Sig(name, start, 32, 1, 0, -F32_MAX, F32_MAX, unit, is_float=True, mux=mux, comment=comment)


def _sweep_id(start: int, comment: str = "Sweep tag chosen by the gateway (1..255), echoed in every answer.") -> Sig:
    return Sig("SweepId", start, 8, maximum=255, comment=comment)


def _flags(name: str, start: int, mux: str = "") -> Sig:
    return Sig(name, start, 2, maximum=3, mux=mux,
               comment="Bit 0: Clipped (excitation or response saturated); bit 1: LowQuality (SNR or distortion "
                       "outside the module's limits). 0 = good point.")


def messages() -> list[Msg]:
    error_comment = "0 = accepted / no error; see the value table (docs/eis-can-protocol.md section 6)."
    fd_sigs: list[Sig] = [
        _sweep_id(0),
        Sig("FirstPoint", 8, 10, maximum=1023, comment="Index of the point in slot 0; slot k holds point FirstPoint + k."),
        Sig("PointCount", 18, 3, maximum=FD_POINTS_PER_FRAME, comment="Number of valid slots (1..5); later slots are 0."),
    ]
    fd_sigs += [_flags(f"Point{k}_Flags", 21 + 2 * k) for k in range(FD_POINTS_PER_FRAME)]
    for k in range(FD_POINTS_PER_FRAME):
        base = 32 + 96 * k
        fd_sigs += [
            _f32(f"Point{k}_Frequency", base, "Hz", f"Frequency of slot {k} as measured."),
            _f32(f"Point{k}_ZReal", base + 32, "Ohm", f"Real part of the impedance of slot {k}."),
            _f32(f"Point{k}_ZImag", base + 64, "Ohm", f"Imaginary part of slot {k}; < 0 = capacitive."),
        ]
    return [
        Msg(ID_ABORT, "EIS_Abort", "GW", 0, (
            _sweep_id(0, "Sweep to abort; 0 = whatever sweep is running."),
            Sig("AbortReason", 8, 8, maximum=255, choices=ABORT_REASONS, comment="Why; for the module's log only."),
        ), "Abort the running sweep now (excitation off within 50 ms). Sent on demand.", receiver="EIS"),
        Msg(ID_SWEEP_REQUEST, "EIS_SweepRequest", "GW", 0, (
            _sweep_id(0, "Tag of this sweep, 1..255 (0 is invalid); echoed in Ack, Status and every result."),
            Sig("TargetType", 8, 2, maximum=3, choices=TARGET_TYPES, comment="0 = one cell, 1 = one module."),
            Sig("TargetIndex", 10, 10, maximum=1023,
                comment="Cell index (module * cells_per_module + cell) or module index, counted from 0."),
            _logf("StartFreqLog10", 20, "log10 of the first frequency in Hz."),
            _logf("StopFreqLog10", 32, "log10 of the last frequency in Hz (may be above or below the first)."),
            Sig("PointsPerDecade", 44, 6, maximum=63, comment="Logarithmic grid density, 1..63."),
            Sig("ExcitationAmplitude", 50, 12, AMPLITUDE_SCALE, 0, 0, round(AMPLITUDE_SCALE * 4095, 3), "A",
                comment="Peak current amplitude of the sine excitation; 0 = the module's default."),
            Sig("ResultFormat", 62, 2, maximum=3, choices=RESULT_FORMATS,
                comment="0 = classic frames (EIS_ResultPoint), 1 = CAN FD frames (EIS_ResultPointsFD)."),
        ), "Start a frequency sweep on one cell or module. Sent on demand.", receiver="EIS"),
        Msg(ID_RESEND_REQUEST, "EIS_ResendRequest", "GW", 0, (
            _sweep_id(0, "Sweep whose points are asked for again."),
            Sig("FirstPoint", 8, 10, maximum=1023),
            Sig("PointCount", 18, 10, maximum=1023, comment="Number of points from FirstPoint, 1..1023."),
        ), "Ask for result points again (frames lost). Sent on demand.", receiver="EIS"),
        Msg(ID_ACK, "EIS_Ack", "EIS", 0, (
            _sweep_id(0, "SweepId of the command answered."),
            Sig("Command", 8, 4, maximum=15, choices=COMMANDS, comment="Which command: frame ID - 0x300."),
            Sig("Result", 12, 8, maximum=255, choices=ERROR_CODES, comment=error_comment),
            Sig("PointsTotal", 20, 10, maximum=1023,
                comment="Sweep request: points the sweep will have; resend: points that will be resent."),
            Sig("EstimatedDuration", 30, 16, 1, 0, 0, 65535, "s",
                comment="Sweep request: expected duration of the whole sweep, rounded up; 0 otherwise."),
        ), "Answer to every command frame, within 50 ms."),
        Msg(ID_STATUS, "EIS_Status", "EIS", 100, (
            Sig("State", 0, 4, maximum=15, choices=STATES),
            _sweep_id(4, "Sweep the state refers to (the last one accepted; 0 after power-up)."),
            Sig("ErrorCode", 12, 8, maximum=255, choices=ERROR_CODES,
                comment="Why the sweep ended in Error or Aborted; 0 in the other states."),
            Sig("TargetType", 20, 2, maximum=3, choices=TARGET_TYPES),
            Sig("TargetIndex", 22, 10, maximum=1023),
            Sig("PointsDone", 32, 10, maximum=1023, comment="Points measured and sent so far."),
            Sig("PointsTotal", 42, 10, maximum=1023),
            Sig("AliveCounter", 60, 4, maximum=15, comment="Incremented by one per frame."),
        ), "Module state: every 100 ms while Settling or Measuring, every 1000 ms otherwise, and at once on a change."),
        Msg(ID_CAPABILITIES, "EIS_Capabilities", "EIS", 5000, (
            Sig("ProtocolVersion", 0, 8, maximum=255, comment=f"Version of this protocol the module speaks ({PROTOCOL_VERSION})."),
            _logf("MinFreqLog10", 8, "Lowest frequency the module can measure."),
            _logf("MaxFreqLog10", 20, "Highest frequency the module can measure."),
            Sig("MaxAmplitude", 32, 12, AMPLITUDE_SCALE, 0, 0, round(AMPLITUDE_SCALE * 4095, 3), "A",
                comment="Largest excitation amplitude the module accepts."),
            Sig("MaxPoints", 44, 10, maximum=1023, comment="Largest number of points per sweep."),
            Sig("FdCapable", 54, 1, maximum=1, comment="1 = the module can send EIS_ResultPointsFD."),
            Sig("ModuleTargets", 55, 1, maximum=1, comment="1 = TargetType Module is supported."),
            Sig("AliveCounter", 60, 4, maximum=15, comment="Incremented by one per frame."),
        ), "What the module can do: every 5 s and once right after power-up."),
        Msg(ID_RESULT_POINT, "EIS_ResultPoint", "EIS", 0, (
            Sig("Part", 0, 2, maximum=2, mux="M", choices=PARTS,
                comment="Which value of the point this frame carries; a point is 3 frames, Part 0, 1, 2."),
            _sweep_id(2, "Sweep the point belongs to."),
            Sig("PointIndex", 10, 10, maximum=1023, comment="Index of the point in the sweep grid, from 0."),
            _flags("PointFlags", 20, mux="m0"),
            _f32("Frequency", 32, "Hz", "Frequency as measured (may differ from the grid value).", mux="m0"),
            _f32("ZReal", 32, "Ohm", "Real part of the impedance.", mux="m1"),
            _f32("ZImag", 32, "Ohm", "Imaginary part of the impedance; < 0 = capacitive.", mux="m2"),
        ), "One measured point over classic CAN: three frames per point, sent as soon as the point is measured."),
        Msg(ID_RESULT_POINTS_FD, "EIS_ResultPointsFD", "EIS", 0, tuple(fd_sigs),
            "Up to 5 measured points in one CAN FD frame (64 bytes).", length=FD_LENGTH, fd=True),
    ]


def render() -> str:
    msgs = messages()
    out = [f'VERSION "{VERSION}"', "", "NS_ :", "", "BS_:", "", "BU_: GW EIS", ""]
    for msg in msgs:
        out.append(f"BO_ {msg.frame_id} {msg.name}: {msg.length} {msg.sender}")
        out += [s.line(msg.receiver) for s in msg.signals]
        out.append("")
    out.append('CM_ "CAN protocol of the bmsgw EIS module (docs/eis-can-protocol.md). Generated by scripts/gen_eis_dbc.py.";')
    out.append('CM_ BU_ EIS "Impedance spectroscopy module: measures one cell or module at a time on command.";')
    for msg in msgs:
        out.append(f'CM_ BO_ {msg.frame_id} "{msg.comment}";')
        out += [f'CM_ SG_ {msg.frame_id} {s.name} "{s.comment}";' for s in msg.signals if s.comment]
    # the usual Vector enumeration; index 14 = StandardCAN_FD (what cantools reads as is_fd)
    frame_formats = ["StandardCAN", "ExtendedCAN", "reserved", "J1939PG", *(["reserved"] * 10),
                     "StandardCAN_FD", "ExtendedCAN_FD"]
    formats = ",".join(f'"{c}"' for c in frame_formats)
    out += [
        'BA_DEF_ BO_ "GenMsgCycleTime" INT 0 65535;',
        f'BA_DEF_ BO_ "VFrameFormat" ENUM {formats};',
        'BA_DEF_ BO_ "CANFD_BRS" ENUM "0","1";',
        'BA_DEF_DEF_ "GenMsgCycleTime" 0;',
        'BA_DEF_DEF_ "VFrameFormat" "StandardCAN";',
        'BA_DEF_DEF_ "CANFD_BRS" "1";',
    ]
    out += [f'BA_ "GenMsgCycleTime" BO_ {msg.frame_id} {msg.cycle_ms};' for msg in msgs if msg.cycle_ms]
    out += [f'BA_ "VFrameFormat" BO_ {msg.frame_id} 14;' for msg in msgs if msg.fd]
    for msg in msgs:
        for s in msg.signals:
            if s.choices:
                out.append(f"VAL_ {msg.frame_id} {s.name} " + " ".join(f'{k} "{v}"' for k, v in s.choices.items()) + " ;")
    for msg in msgs:
        out += [f"SIG_VALTYPE_ {msg.frame_id} {s.name} : 1;" for s in msg.signals if s.is_float]
    return "\n".join(out) + "\n"


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    print(render(), end="")


if __name__ == "__main__":
    main()
