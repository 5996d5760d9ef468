"""Safety levels in the process image: protection conditions mapped to cells, limit proximity, SoT."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from estimators.sos import SafetyReason
from gateway.config import load_config, shipped_config
from gateway.image import Quality
from gateway.safety import SafetyIndicators, protection_levels
from tests.test_estimation import SMALL, feed, site


def test_protection_conditions_land_on_the_cells_they_concern() -> None:
    site = load_config(shipped_config()).config.site  # 16 modules x 14 cells, 2 sensors per module
    n = site.cells
    levels = protection_levels([
        {"check": "cell_voltage_high", "level": "MSL", "element": 3},
        {"check": "cell_temperature_high_charge", "level": "RSL", "element": 5},  # sensor 5: module 2
        {"check": "stale_data", "level": "RSL", "element": n + 1},  # the second sensor: module 0
        {"check": "pack_current_charge", "level": "MOL", "element": 0},  # the whole pack
    ], site)
    assert levels[3] == 3
    assert (levels[28:42] == 2).all() and (levels[:14][np.arange(14) != 3] == 2).all()
    assert levels[100] == 1 and levels.min() == 1


def test_levels_reasons_and_pack_level_are_image_signals_that_go_stale() -> None:
    loaded = load_config(shipped_config())
    img = loaded.image
    limits = loaded.config.limit_table()
    n = img.families["cell.voltage"].size
    v = np.full(n, 3.7)
    v[7] = limits.cell_voltage_high.msl - 0.01  # inside the warning margin of the MSL
    t = np.full(n, 25.0)
    safety = SafetyIndicators(img, loaded.config.site, lambda now: (v, np.ones(n, bool), t, 0.0, float(v.sum())))
    # a recent SoT far above the sensor of cell 20: internal heating the sensors do not see
    sot = img.index("cell[20].sot")
    slot = int(img.slot_of[sot])
    img.value[sot], img.rx_mono[slot] = 40.0, time.monotonic()
    img.seq[slot] += 1
    now = time.monotonic()
    safety.step(limits, [], now)
    level, reason = img.array("cell.safety_level"), img.array("cell.safety_reason").astype(int)
    assert level[7] == 2 and reason[7] & SafetyReason.VOLTAGE_NEAR_LIMIT
    assert level[20] == 2 and reason[20] & SafetyReason.EIS_SENSOR_MISMATCH
    assert level[0] == 0 and reason[0] == 0
    pack = img.read("pack.safety_level", now)
    assert pack.value == 2 and pack.quality == Quality.GOOD
    # the loop stopped: its signals say so
    assert img.read("pack.safety_level", now + 10).quality == Quality.STALE
    # an hour-old SoT is no evidence of anything now
    img.rx_mono[slot] = now - 4000
    safety.step(limits, [], now + 1)
    assert not int(img.array("cell.safety_reason")[20]) & SafetyReason.EIS_SENSOR_MISMATCH


def test_sensor_temperatures_reach_the_levels_unaveraged_and_unknown_ones_as_missing(tmp_path: Path) -> None:
    """The estimators' inputs as they are: each module's coldest and hottest sensor, NaN where none is good."""
    est, img = site(tmp_path)
    limits = load_config(shipped_config()).config.limit_table()
    safety = SafetyIndicators(img, SMALL, est.inputs, est.plating)
    hot = max(limits.cell_temperature_high_charge.msl, limits.cell_temperature_high_discharge.msl) - 1.0
    cold = min(limits.cell_temperature_low_charge.msl, limits.cell_temperature_low_discharge.msl) + 1.0
    feed(img, 100.0, temps=[[hot, 20.0], [cold, 20.0]])  # module means far from any limit
    safety.step(limits, [], 100.0)
    reason = img.array("cell.safety_reason").astype(int)
    assert (img.array("cell.safety_level") == 2).all() and (reason & SafetyReason.TEMPERATURE_NEAR_LIMIT).all()
    feed(img, 110.0, temps=None)  # no temperature frame for 10 s: every sensor stale
    safety.step(limits, [], 110.0)
    reason = img.array("cell.safety_reason").astype(int)
    assert (img.array("cell.safety_level") == 2).all() and (reason & SafetyReason.DATA_MISSING).all()
    feed(img, 111.0, temps=[[math.nan, math.nan], [20.0, 21.0]])  # module 0's sensors invalid
    safety.step(limits, [], 111.0)
    reason = img.array("cell.safety_reason").astype(int)
    assert (reason[:14] & SafetyReason.DATA_MISSING).all() and not (reason[14:] & SafetyReason.DATA_MISSING).any()
