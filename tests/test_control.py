"""The control socket in-process: bad requests, idle and surplus clients never end the server."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway import control
from gateway.control import (
    ConnectionLost,
    ControlError,
    ControlServer,
    NotAnswered,
    NotRunning,
    arg_bool,
    arg_int,
    arg_str,
    claim,
    request,
    stream,
)


async def _echo(args: dict[str, Any]) -> Any:
    return args


async def _boom(args: dict[str, Any]) -> Any:
    raise RuntimeError("a bug in a handler")


async def _recent(args: dict[str, Any]) -> Any:
    return int(args["recent"])  # 1e400 arrives as inf: OverflowError, the request's fault


async def _p0_hangs(args: dict[str, Any]) -> Any:
    raise NotAnswered("the P0 process did not answer 'contactors' within 3.0 s")


async def _hang(args: dict[str, Any]) -> None:
    await anyio.sleep(60)


async def _ticks(args: dict[str, Any]) -> AsyncIterator[int]:
    for i in range(int(args.get("n", 3))):
        yield i


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ControlServer]:
    server = ControlServer(tmp_path / "c.sock", {"echo": _echo, "boom": _boom, "hang": _hang, "recent": _recent,
                                                 "p0_hangs": _p0_hangs}, {"ticks": _ticks})
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(server.serve)
        yield server
        future.cancel()


def raw(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        return s.makefile("rb").readline()


def test_unexpected_errors_are_answered_and_the_server_goes_on(served: ControlServer) -> None:
    reply = json.loads(raw(served.path, b'{"cmd": "boom", "args": {}}\n'))
    assert not reply["ok"] and "internal error: RuntimeError" in reply["error"]
    assert request(served.path, "echo", {"a": 1}) == {"a": 1}
    assert served.errors == 1


def test_bad_input_is_a_rejected_request_not_a_daemon_error(served: ControlServer) -> None:
    """Numbers beyond any integer and nesting beyond the decoder are the request's fault: refused with
    a clear reason and counted as rejected, never "internal error" (which is logged as a daemon bug)."""
    reply = json.loads(raw(served.path, b'{"cmd": "recent", "args": {"recent": 1e400}}\n'))
    assert not reply["ok"] and "internal error" not in reply["error"] and "infinity" in reply["error"]
    deep = b'{"cmd": "echo", "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    reply = json.loads(raw(served.path, deep[:60_000] + b"\n"))
    assert not reply["ok"] and reply["error"] == "request nested too deeply"
    assert (served.errors, served.rejected) == (0, 2)
    assert request(served.path, "echo", {"a": 1}) == {"a": 1}


def test_arguments_of_the_wrong_type_are_refused_not_converted() -> None:
    """bool("false") is True: a reset must never clear the deep-discharge latch on the string "false"."""
    bad: object
    for bad in ("false", "no", 0, 1, [], {}):
        with pytest.raises(ControlError, match="'clear_deep_discharge' must be true or false"):
            arg_bool({"clear_deep_discharge": bad}, "clear_deep_discharge")
    assert arg_bool({}, "x") is False and arg_bool({"x": None}, "x") is False and arg_bool({"x": True}, "x") is True
    for bad in (1e309, float("nan"), 2.0, "5", True):
        with pytest.raises(ControlError, match="'recent' must be an integer"):
            arg_int({"recent": bad}, "recent", 50)
    with pytest.raises(ControlError, match="'recent' must be 0..100"):
        arg_int({"recent": 101}, "recent", 50, 0, 100)
    assert arg_int({}, "recent", 50) == 50 and arg_int({"recent": 7}, "recent", 50) == 7
    with pytest.raises(ControlError, match="'bus' must be a string"):
        arg_str({"bus": ["pack"]}, "bus")
    assert arg_str({"bus": "pack"}, "bus") == "pack" and arg_str({}, "bus") is None


def test_a_part_of_the_daemon_that_does_not_answer_is_not_a_refusal(served: ControlServer,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """P0 hung or gone: the CLI says it was not answered and exits 1 (docs/operations.md), not 4 "refused"."""
    from gateway.cli import main

    with pytest.raises(NotAnswered, match="did not answer 'contactors'"):
        request(served.path, "p0_hangs")
    assert issubclass(NotAnswered, ConnectionLost) and not issubclass(NotAnswered, ControlError)
    assert served.unanswered == 1 and served.rejected == 0 and served.errors == 0
    served.handlers["contactors"] = _p0_hangs
    assert main(["contactors", "open", "--socket", str(served.path)]) == 1
    err = capsys.readouterr().err
    assert "did not answer 'contactors'" in err and "refused" not in err


def test_idle_and_surplus_clients_are_dropped(served: ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT_S", 0.3)
    monkeypatch.setattr(control, "MAX_CLIENTS", 4)
    idle = [socket.socket(socket.AF_UNIX) for _ in range(6)]
    try:
        for s in idle:
            s.connect(str(served.path))
            s.settimeout(10)
        # the server closes the two beyond MAX_CLIENTS at once and the other four after the timeout
        assert all(s.recv(1) == b"" for s in idle)
    finally:
        for s in idle:
            s.close()
    assert served.rejected >= 2
    assert request(served.path, "echo", {"b": 2}) == {"b": 2}


def test_streams_and_lost_connections(served: ControlServer) -> None:
    got = stream(served.path, "ticks", {"n": 3})
    assert [next(got) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ConnectionLost):  # the daemon ended the stream: the caller is told, not left waiting
        next(got)
    with pytest.raises(ConnectionLost, match="did not answer"):
        request(served.path, "hang", timeout=0.3)
    with pytest.raises(ControlError, match="unknown command"):
        request(served.path, "nope")


def test_a_control_socket_path_that_holds_a_file_is_never_deleted(tmp_path: Path) -> None:
    """A gateway.control_socket mistyped as the config (or the buffer) must refuse to start, not delete it."""
    victim = tmp_path / "bmsgw.toml"
    victim.write_text("precious\n")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        claim(victim)
    link = tmp_path / "link.sock"
    link.symlink_to(victim)
    with pytest.raises(ControlError, match="exists and is not a socket"):
        claim(link)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ControlError):
        claim(tmp_path / "folder")
    assert victim.read_text() == "precious\n" and link.is_symlink() and (tmp_path / "folder").is_dir()


def test_claim_takes_the_socket_so_that_a_second_claim_is_refused(tmp_path: Path) -> None:
    """The claim binds and listens: of two daemons that claim before either serves, one is refused."""
    path = tmp_path / "run" / "c.sock"
    first = claim(path)
    try:
        assert path.is_socket() and oct(path.stat().st_mode & 0o777) == oct(0o660)
        with pytest.raises(ControlError, match="another gateway is already listening"):
            claim(path)
        assert path.is_socket()
    finally:
        first.close()
    # the first one was killed: its socket file is stale and the next claim takes it over
    again = claim(path)
    again.close()


def test_of_many_claims_at_once_exactly_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    stale = claim(path)
    stale.close()  # a socket file nobody listens on, as a killed daemon leaves it
    won: list[socket.socket] = []
    refused: list[str] = []
    start = threading.Barrier(8)

    def one() -> None:
        start.wait()
        try:
            won.append(claim(path))
        except ControlError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len(won) == 1 and len(refused) == 7, refused
        assert all("another gateway is already listening" in r for r in refused)
    finally:
        for s in won:
            s.close()


def test_a_claimed_socket_is_served_and_removed_on_the_way_out(tmp_path: Path) -> None:
    server = ControlServer(tmp_path / "c.sock", {"echo": _echo}, {})
    server.claim()
    assert server.fileno() is not None
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(server.serve)
        assert request(server.path, "echo", {"x": 1}) == {"x": 1}
        future.cancel()
    assert not server.path.exists()
    unserved = ControlServer(tmp_path / "d.sock", {}, {})
    unserved.claim()
    unserved.release()  # the daemon ended before serving: its socket file goes too
    assert not unserved.path.exists() and unserved.fileno() is None


def test_eis_cancel_and_sim_fault_take_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    async def cancel(args: dict[str, Any]) -> dict[str, Any]:
        return {"cancelled": True}

    async def fault(args: dict[str, Any]) -> str:
        return f"{args['fault']} done"

    server = ControlServer(tmp_path / "c.sock", {"eis.cancel": cancel, "sim.fault": fault}, {})
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(server.serve)
        assert main(["eis", "cancel", "--json", "--socket", str(server.path)]) == 0
        assert json.loads(capsys.readouterr().out) == {"cancelled": True}
        assert main(["sim", "fault", "clear", "--json", "--socket", str(server.path)]) == 0
        assert json.loads(capsys.readouterr().out) == {"fault": "clear", "target": 0, "value": 0.0,
                                                       "result": "clear done"}
        assert main(["sim", "fault", "clear", "--socket", str(server.path)]) == 0
        assert capsys.readouterr().out == "clear done\n"
        future.cancel()


def test_socket_paths_that_cannot_work_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="too long"):
        claim(tmp_path / ("x" * 120) / "c.sock")
    (tmp_path / "file").write_text("")
    with pytest.raises(ControlError, match="control socket"):
        claim(tmp_path / "file" / "c.sock")
    with pytest.raises(NotRunning):
        request(tmp_path / "file" / "c.sock", "status")


def test_candump_tells_how_many_frames_its_reader_missed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    frame = {"bus": "pack", "timestamp": 1.0, "id": 0x123, "extended": False, "fd": False, "error": False,
             "remote": False, "data": "01"}

    async def candump(args: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield frame
        yield {"bus": "pack", "dropped": 7}
        yield frame

    server = ControlServer(tmp_path / "c.sock", {}, {"candump": candump})
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(server.serve)
        assert main(["candump", "--socket", str(server.path), "--count", "2"]) == 0
        out, err = capsys.readouterr()
        assert out.count("123  [1]  01") == 2  # the dropped record does not count as a frame
        assert "DROPCOUNT: 7 frames on pack not shown" in err
        assert main(["candump", "--socket", str(server.path), "--count", "2", "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines == [frame, {"bus": "pack", "dropped": 7}, frame]
        future.cancel()
