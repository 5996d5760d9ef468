#!/usr/bin/env python3
"""Generate dbc/bmsgw_pack.dbc, the CAN protocol of the bmsgw reference pack.

The per-module messages repeat 16 times with only the ID and name changing, so
they are generated rather than hand-edited. docs/pack-can-protocol.md explains
the protocol; re-run this script after changing it:

    python scripts/gen_pack_dbc.py > dbc/bmsgw_pack.dbc
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

MODULES = 16
CELLS_PER_MODULE = 14
CELLS_PER_PAGE = 4
PAGES = -(-CELLS_PER_MODULE // CELLS_PER_PAGE)

ID_PACK_MEASUREMENT = 0x100
ID_PACK_TEMPERATURES = 0x101
ID_CONTACTOR_COMMAND = 0x110
ID_CONTACTOR_FEEDBACK = 0x111
ID_BALANCING_COMMAND = 0x120
ID_GATEWAY_HEARTBEAT = 0x130
ID_CELL_VOLTAGES = 0x200  # + module
ID_TEMPERATURES = 0x240  # + module
ID_MODULE_STATUS = 0x280  # + module


@dataclass(frozen=True)
class Sig:
    """One SG_ line (little-endian, like every signal of the bmsgw protocols; also used by gen_eis_dbc.py)."""

    name: str
    start: int
    length: int
    scale: float = 1
    offset: float = 0
    minimum: float = 0
    maximum: float = 0
    unit: str = ""
    signed: bool = False
    is_float: bool = False  # IEEE 754 (declared with SIG_VALTYPE_ by the caller)
    mux: str = ""  # "M" for the multiplexer, "m3" for page 3, "" otherwise
    comment: str = ""
    choices: dict[int, str] | None = None  # value table (written as VAL_ by the caller)

    def line(self, receiver: str) -> str:
        mux = f" {self.mux}" if self.mux else ""
        sign = "-" if self.signed or self.is_float else "+"
        return (
            f' SG_ {self.name}{mux} : {self.start}|{self.length}@1{sign} '
            f'({_num(self.scale)},{_num(self.offset)}) [{_num(self.minimum)}|{_num(self.maximum)}] '
            f'"{self.unit}" {receiver}'
        )


@dataclass(frozen=True)
class Msg:
    frame_id: int
    name: str
    sender: str
    cycle_ms: int
    signals: tuple[Sig, ...]
    comment: str
    receiver: str = "GW"
    length: int = 8
    fd: bool = False


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(round(x, 12))


def _counter(start: int) -> Sig:
    return Sig("AliveCounter", start, 4, maximum=15,
               comment="Incremented by one per frame; a repeated or skipped value shows a stuck or lost sender.")


def pack_messages() -> list[Msg]:
    return [
        Msg(ID_PACK_MEASUREMENT, "PACK_Measurement", "PCU", 10, (
            Sig("PackCurrent", 0, 24, 0.001, 0, -8388.608, 8388.607, "A", signed=True,
                comment="Pack current; positive = charging."),
            Sig("PackVoltage", 24, 16, 0.02, 0, 0, 1310.7, "V", comment="Battery-side voltage."),
            Sig("LinkVoltage", 40, 16, 0.02, 0, 0, 1310.7, "V", comment="DC-link (inverter side) voltage, for precharge."),
            Sig("CurrentValid", 56, 1, maximum=1, comment="1 = current measurement valid."),
            Sig("VoltageValid", 57, 1, maximum=1, comment="1 = voltage measurements valid."),
            _counter(60),
        ), "Pack current and voltages from the pack control unit, 100 Hz."),
        Msg(ID_PACK_TEMPERATURES, "PACK_Temperatures", "PCU", 1000, (
            Sig("AmbientTemperature", 0, 16, 0.1, 0, -100, 200, "degC", signed=True),
            Sig("CoolantInletTemperature", 16, 16, 0.1, 0, -100, 200, "degC", signed=True),
            Sig("CoolantOutletTemperature", 32, 16, 0.1, 0, -100, 200, "degC", signed=True),
            _counter(60),
        ), "Pack-level temperatures, 1 Hz."),
        Msg(ID_CONTACTOR_COMMAND, "CONTACTOR_Command", "GW", 100, (
            Sig("MainPositiveRequest", 0, 1, maximum=1, comment="1 = close."),
            Sig("MainNegativeRequest", 1, 1, maximum=1, comment="1 = close."),
            Sig("PrechargeRequest", 2, 1, maximum=1, comment="1 = close."),
            _counter(60),
        ), "Contactor requests from the gateway, 10 Hz and on every change.", receiver="PCU"),
        Msg(ID_CONTACTOR_FEEDBACK, "CONTACTOR_Feedback", "PCU", 100, (
            Sig("MainPositiveState", 0, 2, maximum=3, comment="Auxiliary-contact feedback."),
            Sig("MainNegativeState", 2, 2, maximum=3),
            Sig("PrechargeState", 4, 2, maximum=3),
            _counter(60),
        ), "Contactor auxiliary-contact feedback, 10 Hz."),
        Msg(ID_BALANCING_COMMAND, "BALANCING_Command", "GW", 1000, (
            Sig("BalancingModule", 0, 8, maximum=255, mux="M", comment="Module the mask is for."),
            *(Sig(f"BalancingMask{m:02d}", 8, CELLS_PER_MODULE, maximum=2**CELLS_PER_MODULE - 1, mux=f"m{m}",
                  comment=f"Bit n = 1: bleed cell n of module {m}.") for m in range(MODULES)),
        ), "Balancing request per module, multiplexed by module, 1 Hz while balancing.", receiver="MMU"),
        Msg(ID_GATEWAY_HEARTBEAT, "GATEWAY_Heartbeat", "GW", 100, (
            Sig("GatewayState", 0, 8, maximum=255),
            _counter(60),
        ), "Gateway alive message, 10 Hz; module units may fall back to safe mode without it.", receiver="PCU"),
    ]


def module_messages(m: int) -> list[Msg]:
    cell_sigs: list[Sig] = [Sig("Page", 0, 4, maximum=PAGES - 1, mux="M",
                                comment=f"Page p carries cells {CELLS_PER_PAGE}p..{CELLS_PER_PAGE}p+3 of the module.")]
    for page in range(PAGES):
        for k in range(CELLS_PER_PAGE):
            cell = page * CELLS_PER_PAGE + k
            if cell >= CELLS_PER_MODULE:
                break
            cell_sigs.append(Sig(f"Cell{cell:02d}_Voltage", 8 + 13 * k, 13, 0.001, 0, 0, 8.191, "V", mux=f"m{page}"))
            cell_sigs.append(Sig(f"Cell{cell:02d}_Invalid", 60 + k, 1, maximum=1, mux=f"m{page}"))
    cell_sigs.append(_counter(4))
    temp_sigs = (
        Sig("Sensor0_Temperature", 0, 16, 0.1, 0, -100, 200, "degC", signed=True),
        Sig("Sensor1_Temperature", 16, 16, 0.1, 0, -100, 200, "degC", signed=True),
        Sig("Board_Temperature", 32, 16, 0.1, 0, -100, 200, "degC", signed=True),
        Sig("Sensor0_Invalid", 48, 1, maximum=1),
        Sig("Sensor1_Invalid", 49, 1, maximum=1),
        _counter(60),
    )
    status_sigs = (
        Sig("BalancingActive", 0, CELLS_PER_MODULE, maximum=2**CELLS_PER_MODULE - 1,
            comment="Bit n = 1: cell n of the module is bleeding."),
        Sig("ModuleVoltage", 16, 16, 0.002, 0, 0, 131.07, "V", comment="Module voltage measured by the MMU."),
        Sig("MmuState", 32, 4, maximum=15),
        Sig("MmuFault", 36, 8, maximum=255, comment="Bit field, 0 = no fault."),
        _counter(60),
    )
    n = f"MMU{m:02d}"
    return [
        Msg(ID_CELL_VOLTAGES + m, f"{n}_CellVoltages", n, 100, tuple(cell_sigs),
            f"Cell voltages of module {m}, 4 cells per page, each page every 100 ms."),
        Msg(ID_TEMPERATURES + m, f"{n}_Temperatures", n, 1000, temp_sigs, f"Temperatures of module {m}, 1 Hz."),
        Msg(ID_MODULE_STATUS + m, f"{n}_Status", n, 100, status_sigs, f"Status of module {m}, 10 Hz."),
    ]


def render() -> str:
    msgs = pack_messages()
    for m in range(MODULES):
        msgs += module_messages(m)
    nodes = ["GW", "PCU", "MMU", *(f"MMU{m:02d}" for m in range(MODULES))]
    out = ['VERSION "bmsgw-pack 1.0"', "", "NS_ :", "", "BS_:", "", "BU_: " + " ".join(nodes), ""]
    for msg in msgs:
        out.append(f"BO_ {msg.frame_id} {msg.name}: {msg.length} {msg.sender}")
        out += [s.line(msg.receiver) for s in msg.signals]
        out.append("")
    out.append('CM_ "CAN protocol of the bmsgw reference pack (docs/pack-can-protocol.md). Generated by scripts/gen_pack_dbc.py.";')
    for msg in msgs:
        out.append(f'CM_ BO_ {msg.frame_id} "{msg.comment}";')
        out += [f'CM_ SG_ {msg.frame_id} {s.name} "{s.comment}";' for s in msg.signals if s.comment]
    out += ['BA_DEF_ BO_ "GenMsgCycleTime" INT 0 65535;', 'BA_DEF_DEF_ "GenMsgCycleTime" 0;']
    out += [f'BA_ "GenMsgCycleTime" BO_ {msg.frame_id} {msg.cycle_ms};' for msg in msgs]
    states = '0 "Open" 1 "Closed" 2 "Welded" 3 "Fault"'
    out += [f"VAL_ {ID_CONTACTOR_FEEDBACK} {s} {states} ;" for s in ("MainPositiveState", "MainNegativeState", "PrechargeState")]
    out += [f'VAL_ {ID_PACK_MEASUREMENT} {s} 0 "Invalid" 1 "Valid" ;' for s in ("CurrentValid", "VoltageValid")]
    for m in range(MODULES):
        out += [f'VAL_ {ID_CELL_VOLTAGES + m} Cell{c:02d}_Invalid 0 "Valid" 1 "Invalid" ;' for c in range(CELLS_PER_MODULE)]
        out += [f'VAL_ {ID_TEMPERATURES + m} Sensor{k}_Invalid 0 "Valid" 1 "Invalid" ;' for k in range(2)]
    return "\n".join(out) + "\n"


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    print(render(), end="")


if __name__ == "__main__":
    main()
