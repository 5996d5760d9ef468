"""gateway.image.ProcessImage: quality, names and shapes, selection, zero-copy views.

Time is always passed explicitly (``now``, and monotonic receive times written
into the slot buffers), so nothing here sleeps or depends on the wall clock.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from gateway.image import Family, ProcessImage, Quality, family_of

CYCLE = 0.1  # s, cycle time of the cell-voltage slot
STALE_CYCLES = 3.0


def make_image() -> tuple[ProcessImage, dict[str, int]]:
    """24 cells, 4 modules x 2 sensors, two scalars; slots: cells (100 ms), pack (no cycle time)."""
    img = ProcessImage({"cell.voltage": (24,), "module.temperature": (4, 2)}, ["pack.current", "pack.voltage"],
                       stale_cycles=STALE_CYCLES)
    slots = {"cells": img.add_slot("pack:Cells", CYCLE), "pack": img.add_slot("pack:Pack", None),
             "temps": img.add_slot("pack:Temps", 1.0)}
    for i in range(24):
        img.bind(img.index(f"cell[{i}].voltage"), slots["cells"])
    img.bind(img.index("pack.current"), slots["pack"])
    for m in range(4):
        for k in range(2):
            img.bind(img.index(f"module[{m}].temperature[{k}]"), slots["temps"])
    img.freeze()
    return img, slots


def receive(img: ProcessImage, slot: int, mono: float, wall: float = 1.7e9) -> None:
    """A frame of a slot arrives, written as the main process's own writers do: counted in seq only (the
    generated ingest handlers also set begun first, tests/test_ingest.py races them against readers)."""
    img.w_rx_time[slot] = wall
    img.w_rx_mono[slot] = mono
    img.w_seq[slot] += 1


def write(img: ProcessImage, name: str, value: float, valid: bool = True) -> None:
    i = img.index(name)
    img.w_value[i] = value
    img.w_valid[i] = 1 if valid else 0


# -- quality -----------------------------------------------------------------------


def test_fresh_value_is_good() -> None:
    img, slots = make_image()
    write(img, "cell[3].voltage", 3.71)
    receive(img, slots["cells"], mono=100.0, wall=1.7e9 + 5)
    r = img.read("cell[3].voltage", now=100.05)
    assert r.name == "cell[3].voltage"
    assert r.value == 3.71
    assert r.quality is Quality.GOOD
    assert r.timestamp == 1.7e9 + 5
    assert r.age_s == pytest.approx(0.05)


def test_stale_after_stale_cycles_times_the_cycle_time() -> None:
    img, slots = make_image()
    write(img, "cell[0].voltage", 3.6)
    receive(img, slots["cells"], mono=50.0)
    limit = STALE_CYCLES * CYCLE
    assert img.read("cell[0].voltage", now=50.0).quality is Quality.GOOD
    assert img.read("cell[0].voltage", now=50.0 + limit * 0.99).quality is Quality.GOOD
    stale = img.read("cell[0].voltage", now=50.0 + limit * 1.01)
    assert stale.quality is Quality.STALE
    assert stale.value == 3.6  # the last value is kept, only its quality changes
    assert stale.age_s == pytest.approx(limit * 1.01)
    # a new frame makes it good again
    receive(img, slots["cells"], mono=50.5)
    assert img.read("cell[0].voltage", now=50.55).quality is Quality.GOOD


def test_stale_cycles_scales_the_limit() -> None:
    img = ProcessImage({}, ["x.y"], stale_cycles=10)
    slot = img.add_slot("s", 0.1)
    img.bind(img.index("x.y"), slot)
    img.freeze()
    write(img, "x.y", 1.0)
    receive(img, slot, mono=0.0)
    assert img.read("x.y", now=0.9).quality is Quality.GOOD
    assert img.read("x.y", now=1.1).quality is Quality.STALE


def test_slot_without_cycle_time_never_goes_stale_once_received() -> None:
    img, slots = make_image()
    write(img, "pack.current", -12.5)
    receive(img, slots["pack"], mono=1.0)
    assert img.read("pack.current", now=1e9).quality is Quality.GOOD


def test_never_received_is_stale_with_nan() -> None:
    img, _ = make_image()
    for name in ("cell[5].voltage", "pack.current", "pack.voltage", "module[2].temperature[1]"):
        r = img.read(name, now=1000.0)
        assert math.isnan(r.value), name
        assert math.isnan(r.timestamp), name
        assert r.age_s == math.inf, name
        assert r.quality is Quality.STALE, f"{name}: never received must be STALE, got {r.quality.name}"


def test_nan_value_is_invalid() -> None:
    img, slots = make_image()
    write(img, "cell[1].voltage", math.nan)
    receive(img, slots["cells"], mono=10.0)
    assert img.read("cell[1].voltage", now=10.0).quality is Quality.INVALID


def test_validity_flag_makes_invalid_and_invalid_beats_stale() -> None:
    img, slots = make_image()
    write(img, "cell[2].voltage", 3.3, valid=False)
    receive(img, slots["cells"], mono=10.0)
    assert img.read("cell[2].voltage", now=10.0).quality is Quality.INVALID
    assert img.read("cell[2].voltage", now=99.0).quality is Quality.INVALID
    write(img, "cell[2].voltage", 3.3, valid=True)
    assert img.read("cell[2].voltage", now=10.0).quality is Quality.GOOD


def test_quality_is_vectorised_and_matches_read() -> None:
    img, slots = make_image()
    for i in range(24):
        write(img, f"cell[{i}].voltage", 3.0 + i / 100, valid=i % 5 != 0)
    write(img, "cell[7].voltage", math.nan)
    receive(img, slots["cells"], mono=20.0)
    q = img.family_quality("cell.voltage", now=20.0)
    assert q.shape == (24,)
    expected = [Quality.INVALID if i % 5 == 0 or i == 7 else Quality.GOOD for i in range(24)]
    assert q.tolist() == [int(e) for e in expected]
    for i in range(24):
        assert img.read(f"cell[{i}].voltage", now=20.0).quality == q[i]
    stale = img.quality(img.span("cell.voltage"), now=25.0)
    assert set(stale.tolist()) == {Quality.STALE, Quality.INVALID}


def test_snapshot_is_read_and_quality_vectorised() -> None:
    """Every signal, fresh, stale, invalid, NaN or never received, reads the same one by one and in arrays."""
    img, slots = make_image()
    for i in range(24):
        write(img, f"cell[{i}].voltage", 3.0 + i / 100, valid=i % 5 != 0)
    write(img, "cell[7].voltage", math.nan)
    write(img, "pack.current", -3.5)
    receive(img, slots["cells"], mono=20.0, wall=1.7e9 + 20)
    receive(img, slots["pack"], mono=10.0, wall=1.7e9 + 10)
    receive(img, slots["pack"], mono=19.0, wall=1.7e9 + 19)
    for now in (20.1, 25.0):
        snap = img.snapshot(np.arange(img.size), now)
        assert snap.seq.tolist() == [1] * 24 + [0] * 8 + [2, 0]
        assert snap.quality.tolist() == img.quality(slice(None), now).tolist()
        for i, name in enumerate(img.names()):
            r = img.read(name, now)
            got = (snap.value[i], Quality(int(snap.quality[i])), snap.timestamp[i], snap.age_s[i])
            np.testing.assert_equal(got, (r.value, r.quality, r.timestamp, r.age_s), err_msg=name)
            assert img.quality_of(i, now) == r.quality
    cells = img.snapshot(img.span("cell.voltage"), 20.1)
    assert cells.value.shape == (24,) and not np.shares_memory(cells.value, img.value)  # a copy, not a view


def test_a_slot_its_writer_is_in_the_middle_of_is_not_good() -> None:
    """Between a writer's first and last store (or after it failed there) no reader pairs the new value with
    the old flag or time: the slot is STALE, whatever its flags say, until a frame is whole again."""
    img, slots = make_image()
    i, slot = img.index("pack.current"), slots["pack"]
    write(img, "pack.current", 10.0)
    receive(img, slot, mono=5.0)
    img.w_begun[slot] = img.w_seq[slot] + 1  # a new frame begun: its value is in, its flag and time are not
    img.w_value[i] = -8000.0
    for valid in (1, 0):
        img.w_valid[i] = valid
        assert img.read("pack.current", now=5.0).quality is Quality.STALE
        assert img.quality_of(i, now=5.0) is Quality.STALE
        assert img.quality([i], now=5.0).tolist() == [Quality.STALE]
        assert img.snapshot([i, img.index("cell[0].voltage")], now=5.0).quality.tolist() == [Quality.STALE] * 2
    img.w_seq[slot] = img.w_begun[slot]  # the writer's last store: the frame is whole
    assert img.read("pack.current", now=5.0).quality is Quality.INVALID


def test_quality_order_worst_wins() -> None:
    assert Quality.GOOD < Quality.STALE < Quality.INVALID
    assert max(Quality.GOOD, Quality.INVALID, Quality.STALE) is Quality.INVALID


# -- names, families and shapes ---------------------------------------------------


def test_family_of() -> None:
    assert family_of("module[3].temperature[1]") == ("module.temperature", (3, 1))
    assert family_of("cell[17].voltage") == ("cell.voltage", (17,))
    assert family_of("pack.current") == ("pack.current", ())
    for bad in ("Cell[1].voltage", "cell[x].voltage", "cell[1]voltage", "", "pack..current", "pack.current[-1]"):
        with pytest.raises(ValueError):
            family_of(bad)


def test_family_shapes_and_layout() -> None:
    img, _ = make_image()
    assert img.families["cell.voltage"] == Family("cell.voltage", 0, (24,))
    assert img.families["module.temperature"] == Family("module.temperature", 24, (4, 2))
    assert img.scalars == {"pack.current": 32, "pack.voltage": 33}
    assert img.size == 34
    assert img.array("cell.voltage").shape == (24,)
    assert img.array("module.temperature").shape == (4, 2)
    assert img.family_quality("module.temperature", now=0.0).shape == (4, 2)
    assert img.index("module[2].temperature[1]") == 24 + 2 * 2 + 1  # row-major
    assert img.name_of(24 + 2 * 2 + 1) == "module[2].temperature[1]"
    assert img.name_of(33) == "pack.voltage"
    names = img.names()
    assert len(names) == img.size == len(set(names))
    assert names[:2] == ["cell[0].voltage", "cell[1].voltage"]
    assert names[24:26] == ["module[0].temperature[0]", "module[0].temperature[1]"]
    assert names[-2:] == ["pack.current", "pack.voltage"]
    assert [img.index(n) for n in names] == list(range(img.size))
    assert all(img.name_of(i) == n for i, n in enumerate(names))


def test_index_errors() -> None:
    img, _ = make_image()
    with pytest.raises(ValueError, match="outside"):
        img.index("cell[24].voltage")
    with pytest.raises(ValueError, match="outside"):
        img.index("module[0].temperature[2]")
    with pytest.raises(ValueError, match="outside"):
        img.index("module[1].temperature")  # too few indices
    with pytest.raises(KeyError):
        img.index("cell.voltage")  # a family, not a signal
    with pytest.raises(KeyError):
        img.index("pack.power")
    with pytest.raises(IndexError):
        img.name_of(img.size)


def test_duplicate_scalars_get_one_position() -> None:
    img = ProcessImage({}, ["a.b", "a.b", "c.d"])
    assert img.scalars == {"a.b": 0, "c.d": 1}


def test_bind_refuses_a_second_source() -> None:
    img = ProcessImage({}, ["a.b"])
    s1, s2 = img.add_slot("bus:One", 0.1), img.add_slot("bus:Two", 0.1)
    img.bind(0, s1)
    img.bind(0, s1)  # the same source again is fine
    with pytest.raises(ValueError, match="bus:One"):
        img.bind(0, s2)


def test_slots_cannot_be_added_after_freeze() -> None:
    img, _ = make_image()
    with pytest.raises(RuntimeError):
        img.add_slot("late", 0.1)


# -- select ----------------------------------------------------------------------


def test_select_globs_with_brackets() -> None:
    img = ProcessImage({"cell.voltage": (224,), "module.temperature": (16, 2)}, ["pack.current", "pack.voltage"])
    ones = img.select("cell[1*].voltage")
    assert ones == ["cell[1].voltage"] + [f"cell[{i}].voltage" for i in range(10, 20)] + \
        [f"cell[{i}].voltage" for i in range(100, 200)]
    assert img.select("cell[?].voltage") == [f"cell[{i}].voltage" for i in range(10)]
    assert img.select("cell[22?].voltage") == [f"cell[{i}].voltage" for i in range(220, 224)]
    assert img.select("module[3].temperature[*]") == ["module[3].temperature[0]", "module[3].temperature[1]"]
    assert img.select("module[*].temperature[1]") == [f"module[{m}].temperature[1]" for m in range(16)]
    assert img.select("pack.*") == ["pack.current", "pack.voltage"]
    assert img.select("*") == img.names()
    assert img.select() == img.names()
    assert img.select("cell[1]") == []  # full match, not prefix
    assert img.select("nothing.*") == []


def test_select_brackets_are_literal_not_character_classes() -> None:
    img = ProcessImage({"cell.voltage": (30,)}, [])
    # as a shell character class, [12] would match "cell1.voltage"-like names; here it is the index 12
    assert img.select("cell[12].voltage") == ["cell[12].voltage"]
    assert img.select("cell[1-2].voltage") == []


# -- zero copy ---------------------------------------------------------------------


def test_numpy_views_see_writes_through_the_array_buffers() -> None:
    img, slots = make_image()
    view = img.array("cell.voltage")
    temps = img.array("module.temperature")
    assert np.shares_memory(view, img.value)
    assert np.shares_memory(np.frombuffer(img.w_value, dtype=np.float64), img.value)
    assert len(img.w_value) == img.value.size
    assert not img.value.flags.owndata
    img.w_value[img.index("cell[9].voltage")] = 3.99
    img.w_value[img.index("module[1].temperature[0]")] = 25.5
    assert view[9] == 3.99  # the view taken before the write sees it
    assert temps[1, 0] == 25.5
    img.w_valid[img.index("cell[9].voltage")] = 0
    assert img.valid[img.index("cell[9].voltage")] == 0
    receive(img, slots["cells"], mono=7.0, wall=123.0)
    assert img.rx_mono[slots["cells"]] == 7.0
    assert img.rx_time[slots["cells"]] == 123.0
    assert img.seq[slots["cells"]] == 1
    assert np.shares_memory(img.rx_mono, np.frombuffer(img.w_rx_mono, dtype=np.float64))


def test_the_image_is_shared_with_a_forked_writer() -> None:
    """The P0 process writes after fork; the daemon's main process reads the same memory."""
    img, slots = make_image()
    i = img.index("cell[4].voltage")
    pid = os.fork()
    if pid == 0:  # the child: write as the receive thread does, then leave at once
        img.w_value[i] = 3.777
        receive(img, slots["cells"], mono=9.0, wall=321.0)
        os._exit(0)
    os.waitpid(pid, 0)
    assert img.value[i] == 3.777 and img.rx_time[slots["cells"]] == 321.0
