"""Tests of the simulated battery pack physics (drivers/sim_battery.py)."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.sim_battery import (
    LFP,
    NMC,
    Chemistry,
    SensorConfig,
    SimBatteryPack,
    StorageDayProfile,
    derate_current,
    get_chemistry,
)

QUIET = SensorConfig(
    cell_voltage_noise_v=0.0,
    cell_voltage_resolution_v=0.0,
    temp_noise_c=0.0,
    temp_resolution_c=0.0,
    current_noise_a=0.0,
    current_resolution_a=0.0,
    pack_voltage_noise_v=0.0,
    pack_voltage_resolution_v=0.0,
)


def run(pack: SimBatteryPack, seconds: float, current_a: float, dt: float = 1.0) -> None:
    for _ in range(round(seconds / dt)):
        pack.step(dt, current_a)


# ----------------------------------------------------------------- topology


def test_reference_topology_and_shapes() -> None:
    pack = SimBatteryPack()
    assert pack.n_cells == 224
    m = pack.measure()
    assert m.cell_voltages_v.shape == (224,)
    assert m.module_temps_c.shape == (16, 2)
    assert pack.soc.shape == (224,)
    assert pack.module_temps_c.shape == (16,)
    assert pack.cell_temps_c.shape == (224,)
    # ~800 V class string at mid SoC
    assert 780.0 < m.pack_voltage_v < 860.0
    assert m.pack_voltage_v == pytest.approx(pack.pack_voltage_v, abs=0.5)


def test_parameterised_topology() -> None:
    pack = SimBatteryPack(modules=3, cells_per_module=4, sensors_per_module=5, chemistry="LFP")
    m = pack.measure()
    assert m.cell_voltages_v.shape == (12,)
    assert m.module_temps_c.shape == (3, 5)
    pack.step(1.0, 10.0)
    assert pack.soc.shape == (12,)


def test_chemistry_lookup() -> None:
    assert get_chemistry("nmc") is NMC
    assert get_chemistry(LFP) is LFP
    with pytest.raises(ValueError):
        get_chemistry("NiMH")


def test_rejects_bad_input() -> None:
    pack = SimBatteryPack()
    with pytest.raises(ValueError):
        pack.step(-1.0, 0.0)
    with pytest.raises(ValueError):
        pack.step(1.0, float("nan"))
    with pytest.raises(IndexError):
        pack.inject_stuck_cell(224)
    with pytest.raises(IndexError):
        pack.inject_module_heating(16, 10.0)


# ------------------------------------------------------------- electrical


def test_voltage_falls_on_discharge_and_rises_on_charge() -> None:
    rest = SimBatteryPack(sensors=QUIET).cell_voltages_v

    dis = SimBatteryPack(sensors=QUIET)
    dis.step(1.0, -40.0)
    first = dis.cell_voltages_v
    assert np.all(first < rest)
    run(dis, 60.0, -40.0)
    # keeps sagging as the RC branches charge up
    assert np.all(dis.cell_voltages_v < first - 0.02)
    assert np.all(dis.cell_voltages_v < rest - 0.07)

    chg = SimBatteryPack(sensors=QUIET)
    chg.step(1.0, 30.0)
    assert np.all(chg.cell_voltages_v > rest)
    # The instantaneous jump is the ohmic drop I * R0.
    jump = chg.cell_voltages_v - rest
    assert np.all(jump > 30.0 * chg.r0_ohm)


def test_soc_follows_coulomb_counting() -> None:
    pack = SimBatteryPack(initial_soc=0.8)
    soc0 = pack.soc
    run(pack, 3600.0, -30.0)
    expected = 30.0 / pack.capacity_ah  # 1 h at 30 A
    np.testing.assert_allclose(soc0 - pack.soc, expected, rtol=1e-9)

    pack = SimBatteryPack(initial_soc=0.2)
    soc0 = pack.soc
    run(pack, 3600.0, 30.0)
    # Charging stores slightly less than it takes in.
    np.testing.assert_allclose(pack.soc - soc0, 0.995 * expected, rtol=1e-9)


def test_soc_is_clipped_as_a_guard() -> None:
    pack = SimBatteryPack(initial_soc=0.02, modules=1, cells_per_module=2)
    run(pack, 3600.0, -60.0, dt=10.0)
    assert np.all(pack.soc == 0.0)
    assert np.all(np.isfinite(pack.cell_voltages_v))


def test_rc_relaxation_after_current_step() -> None:
    pack = SimBatteryPack(sensors=QUIET, initial_soc=0.7)
    run(pack, 1200.0, -40.0)
    loaded = pack.cell_voltages_v
    pack.step(1.0, 0.0)
    v_1s = pack.cell_voltages_v
    run(pack, 59.0, 0.0)
    v_60s = pack.cell_voltages_v
    run(pack, 3540.0, 0.0)
    v_1h = pack.cell_voltages_v
    ocv = pack.ocv_v

    # Ohmic step back, then a monotone recovery toward OCV from below.
    assert np.all(v_1s - loaded > 0.04)
    assert np.all(v_1s < v_60s)
    assert np.all(v_60s < v_1h)
    assert np.all(v_1h <= ocv + 1e-9)
    assert np.max(ocv - v_1h) < 0.002
    assert np.max(ocv - v_1s) > 0.02


def test_small_and_large_steps_agree() -> None:
    # Exact RC discretisation: 100 x 0.01 s must match 1 x 1 s closely, and
    # thousands of tiny steps stay bounded.
    fine = SimBatteryPack(sensors=QUIET)
    coarse = SimBatteryPack(sensors=QUIET)
    for _ in range(120):
        run(fine, 1.0, -40.0, dt=0.01)
        coarse.step(1.0, -40.0)
    np.testing.assert_allclose(fine.cell_voltages_v, coarse.cell_voltages_v, atol=2e-4)
    np.testing.assert_allclose(fine.soc, coarse.soc, atol=1e-9)
    np.testing.assert_allclose(fine.module_temps_c, coarse.module_temps_c, atol=1e-3)
    assert fine.time_s == pytest.approx(120.0)


def test_cold_cells_have_higher_resistance() -> None:
    warm = SimBatteryPack(sensors=QUIET, ambient_c=25.0)
    cold = SimBatteryPack(sensors=QUIET, ambient_c=0.0)
    assert np.all(cold.r0_ohm > 1.5 * warm.r0_ohm)
    warm.step(1.0, -40.0)
    cold.step(1.0, -40.0)
    drop_warm = warm.ocv_v - warm.cell_voltages_v
    drop_cold = cold.ocv_v - cold.cell_voltages_v
    assert np.all(drop_cold > drop_warm)


def test_ocv_tables_shape() -> None:
    assert NMC.ocv(0.0) == pytest.approx(3.0)
    assert NMC.ocv(1.0) == pytest.approx(4.2)
    assert LFP.ocv(0.0) == pytest.approx(2.5)
    assert LFP.ocv(1.0) == pytest.approx(3.65)
    grid = np.linspace(0.0, 1.0, 101)
    for chem in (NMC, LFP):
        assert np.all(np.diff(chem.ocv(grid)) >= 0.0)
    plateau = LFP.ocv(np.linspace(0.15, 0.9, 50))
    assert np.all((plateau >= 3.2) & (plateau <= 3.35))
    # Small negative temperature coefficient, a few tenths of mV/K.
    for chem in (NMC, LFP):
        dvdt = (chem.ocv(0.5, 35.0) - chem.ocv(0.5, 25.0)) / 10.0
        assert -1e-3 < dvdt < 0.0


def test_lfp_plateau_flatter_than_nmc() -> None:
    # Same discharge from 70 % to 30 % on both packs: LFP voltage hardly moves.
    swings = {}
    for chem in ("NMC", "LFP"):
        pack = SimBatteryPack(chemistry=chem, sensors=QUIET, initial_soc=0.7, soc_spread=0.0)
        pack.step(1.0, -6.0)
        start = float(np.median(pack.cell_voltages_v))
        run(pack, 4.0 * 3600.0 - 1.0, -6.0, dt=10.0)
        assert float(np.mean(pack.soc)) == pytest.approx(0.3, abs=0.02)
        swings[chem] = start - float(np.median(pack.cell_voltages_v))
    assert swings["NMC"] > 0.1
    assert 0.0 < swings["LFP"] < swings["NMC"] / 3.0


# ---------------------------------------------------------------- thermal


def test_temperature_rises_with_current_and_relaxes_to_ambient() -> None:
    pack = SimBatteryPack(sensors=QUIET, initial_soc=0.9, ambient_c=20.0)
    run(pack, 3600.0, -40.0)
    hot = pack.module_temps_c
    assert np.all(hot > 22.0)

    idle = SimBatteryPack(sensors=QUIET, initial_soc=0.9, ambient_c=20.0)
    run(idle, 3600.0, 0.0)
    np.testing.assert_allclose(idle.module_temps_c, 20.0)

    run(pack, 600.0, 0.0)
    assert np.all(pack.module_temps_c < hot)
    run(pack, 24 * 3600.0, 0.0, dt=60.0)
    np.testing.assert_allclose(pack.module_temps_c, 20.0, atol=0.05)


def test_higher_current_heats_more() -> None:
    low = SimBatteryPack(sensors=QUIET, initial_soc=0.8)
    high = SimBatteryPack(sensors=QUIET, initial_soc=0.8)
    run(low, 1800.0, -15.0)
    run(high, 1800.0, -40.0)
    assert np.all(high.module_temps_c - 25.0 > 3.0 * (low.module_temps_c - 25.0))


def test_temperature_sensors_read_module_plus_offset() -> None:
    pack = SimBatteryPack(ambient_c=30.0)
    m = pack.measure()
    offsets = pack.sensor_offsets_c
    assert np.all(np.abs(offsets) < 1.0)
    assert np.any(offsets != 0.0)
    np.testing.assert_allclose(m.module_temps_c, 30.0 + offsets, atol=0.3)
    # 0.1 degC resolution
    tenths = m.module_temps_c * 10.0
    np.testing.assert_allclose(tenths, np.round(tenths), atol=1e-6)
    assert m.ambient_temp_c == pytest.approx(30.0, abs=0.3)
    assert m.pack_temp_c == pytest.approx(30.0, abs=0.3)


# ------------------------------------------------------------ measurement


def test_measurement_noise_and_quantisation() -> None:
    pack = SimBatteryPack(sensors=SensorConfig(current_offset_a=0.5))
    pack.step(1.0, -20.0)
    true_v = pack.cell_voltages_v
    readings = np.array([pack.measure().cell_voltages_v for _ in range(200)])
    err = readings - true_v
    assert 0.0007 < float(err.std()) < 0.0015
    assert abs(float(err.mean())) < 2e-4
    np.testing.assert_allclose(readings * 1000.0, np.round(readings * 1000.0), atol=1e-6)
    currents = np.array([pack.measure().pack_current_a for _ in range(200)])
    assert float(currents.mean()) == pytest.approx(-19.5, abs=0.02)


def test_dc_link_voltage_is_reported() -> None:
    pack = SimBatteryPack()
    assert abs(pack.measure().dc_link_voltage_v) < 0.5
    pack.dc_link_voltage_v = 650.0
    assert pack.measure().dc_link_voltage_v == pytest.approx(650.0, abs=0.3)


def test_deterministic_for_a_seed() -> None:
    def history(seed: int) -> list[np.ndarray]:
        pack = SimBatteryPack(seed=seed)
        out = [pack.capacity_ah, pack.soc, pack.r0_ohm, pack.sensor_offsets_c]
        for k in range(50):
            pack.step(0.1, -30.0 if k < 25 else 10.0)
            m = pack.measure()
            out += [m.cell_voltages_v, m.module_temps_c, np.array([m.pack_current_a])]
        return out

    a, b, c = history(7), history(7), history(8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_cell_spread() -> None:
    pack = SimBatteryPack(seed=3)
    cap = pack.capacity_ah
    assert cap.mean() == pytest.approx(60.0, rel=0.01)
    assert 0.015 < cap.std() / 60.0 < 0.045
    assert 0.01 < pack.soc.std() < 0.03
    assert 0.03 < pack.r0_ohm.std() / pack.r0_ohm.mean() < 0.07
    # 224 x 14 module-major: each module has its own cells' values.
    assert len(np.unique(cap)) == 224


def test_balancing_current_moves_only_that_cell() -> None:
    pack = SimBatteryPack(sensors=QUIET)
    soc0 = pack.soc
    bal = np.zeros(224)
    bal[10] = -1.0
    pack.set_balancing_currents(bal)
    run(pack, 3600.0, 0.0, dt=10.0)
    moved = soc0 - pack.soc
    assert moved[10] == pytest.approx(1.0 / pack.capacity_ah[10], rel=1e-9)
    assert np.all(np.delete(moved, 10) == 0.0)
    pack.set_balancing_currents(None)
    soc1 = pack.soc
    run(pack, 60.0, 0.0)
    np.testing.assert_array_equal(pack.soc, soc1)


def test_set_soc() -> None:
    pack = SimBatteryPack(sensors=QUIET)
    run(pack, 60.0, -40.0)
    pack.set_soc(0.95)
    np.testing.assert_allclose(pack.soc, 0.95)
    np.testing.assert_allclose(pack.cell_voltages_v, pack.ocv_v + pack.current_a * pack.r0_ohm)
    with pytest.raises(ValueError):
        pack.set_soc(1.2)


# ------------------------------------------------------------------ faults


def test_cell_drift_fault() -> None:
    pack = SimBatteryPack(sensors=QUIET)
    pack.inject_cell_drift(7, 5.0)
    run(pack, 10.0, 0.0)
    err = pack.measure().cell_voltages_v - pack.cell_voltages_v
    assert err[7] == pytest.approx(0.050, abs=1e-9)
    assert np.all(np.delete(err, 7) == 0.0)
    run(pack, 10.0, 0.0)
    err = pack.measure().cell_voltages_v - pack.cell_voltages_v
    assert err[7] == pytest.approx(0.100, abs=1e-9)
    assert pack.active_faults
    pack.clear_faults()
    assert pack.active_faults == ()
    np.testing.assert_array_equal(pack.measure().cell_voltages_v, pack.cell_voltages_v)


def test_module_heating_fault() -> None:
    pack = SimBatteryPack(sensors=QUIET)
    pack.inject_module_heating(3, 200.0)
    run(pack, 3600.0, 0.0, dt=10.0)
    temps = pack.module_temps_c
    assert temps[3] > 40.0
    np.testing.assert_allclose(np.delete(temps, 3), 25.0)
    assert np.all(pack.measure().module_temps_c[3] > 39.0)
    pack.clear_faults()
    run(pack, 600.0, 0.0, dt=10.0)
    assert pack.module_temps_c[3] < temps[3]
    run(pack, 48 * 3600.0, 0.0, dt=60.0)
    assert pack.module_temps_c[3] == pytest.approx(25.0, abs=0.05)


def test_fault_values_outside_physics_are_refused() -> None:
    pack = SimBatteryPack(sensors=QUIET)
    nan, inf = float("nan"), float("inf")
    for inject in (lambda: pack.inject_module_heating(0, nan), lambda: pack.inject_module_heating(0, -10.0),
                   lambda: pack.inject_current_offset(inf), lambda: pack.inject_cell_drift(0, nan)):
        with pytest.raises(ValueError, match="allowed: a finite value in"):
            inject()
    assert pack.active_faults == ()
    run(pack, 60.0, 10.0)
    assert np.isfinite(pack.module_temps_c).all() and pack.measure().pack_current_a == pytest.approx(10.0)


def test_clear_faults_brings_a_non_finite_state_back() -> None:
    pack = SimBatteryPack(sensors=QUIET)
    pack.ambient_c = float("nan")  # a caller's bad value reaches the thermal model
    run(pack, 10.0, 20.0)
    assert np.isnan(pack.module_temps_c).all() and np.isnan(pack.cell_voltages_v).all()
    pack.ambient_c = 25.0
    pack.clear_faults()
    np.testing.assert_array_equal(pack.module_temps_c, 25.0)
    run(pack, 10.0, 20.0)
    assert np.isfinite(pack.cell_voltages_v).all() and np.isfinite(pack.module_temps_c).all()


def test_current_offset_fault() -> None:
    pack = SimBatteryPack(sensors=QUIET)
    pack.step(1.0, 12.0)
    assert pack.measure().pack_current_a == pytest.approx(12.0)
    pack.inject_current_offset(-2.5)
    assert pack.measure().pack_current_a == pytest.approx(9.5)
    assert pack.current_a == 12.0  # physics unaffected
    pack.clear_faults()
    assert pack.measure().pack_current_a == pytest.approx(12.0)


def test_stuck_cell_fault() -> None:
    pack = SimBatteryPack()
    before = pack.measure().cell_voltages_v
    pack.inject_stuck_cell(5)
    run(pack, 300.0, -40.0)
    stuck = np.array([pack.measure().cell_voltages_v[5] for _ in range(20)])
    assert np.all(stuck == before[5])
    assert pack.cell_voltages_v[5] < before[5] - 0.1
    others = pack.measure().cell_voltages_v
    assert others[6] < before[6] - 0.1
    pack.clear_faults()
    assert pack.measure().cell_voltages_v[5] == pytest.approx(pack.cell_voltages_v[5], abs=0.005)


def test_stuck_before_any_measurement() -> None:
    pack = SimBatteryPack(sensors=QUIET)
    v = pack.cell_voltages_v[0]
    pack.inject_stuck_cell(0)
    run(pack, 60.0, 30.0)
    assert pack.measure().cell_voltages_v[0] == pytest.approx(v, abs=0.0005)


def test_pack_voltage_sense_is_independent_of_cell_channel_faults() -> None:
    pack = SimBatteryPack(sensors=QUIET)
    pack.inject_cell_drift(0, 100.0)
    run(pack, 10.0, 0.0)
    m = pack.measure()
    assert m.pack_voltage_v == pytest.approx(pack.pack_voltage_v)
    assert float(m.cell_voltages_v.sum()) == pytest.approx(pack.pack_voltage_v + 1.0)


# ------------------------------------------------------------ load profile


def test_profile_shape() -> None:
    prof = StorageDayProfile()
    hour = 3600.0
    assert prof.current_at(12.5 * hour) == pytest.approx(30.0)
    assert prof.current_at(10.0 * hour) > 0.0
    assert prof.current_at(15.5 * hour) > 0.0
    assert prof.current_at(20.0 * hour) == pytest.approx(-40.0)
    assert prof.current_at(18.1 * hour) < 0.0
    for night in (0.0, 3.0, 6.0, 8.9, 16.5, 17.5, 23.5):
        assert prof.current_at(night * hour) == 0.0
    # periodic over days
    assert prof.current_at(86400.0 * 3 + 12.0 * hour) == prof.current_at(12.0 * hour)
    samples = [prof.current_at(t) for t in np.arange(0.0, 86400.0, 60.0)]
    assert max(samples) <= 30.0 and min(samples) >= -40.0
    custom = StorageDayProfile(charge_peak_a=10.0, discharge_peak_a=5.0)
    assert custom.current_at(12.5 * hour) == pytest.approx(10.0)
    assert custom.current_at(20.0 * hour) == pytest.approx(-5.0)
    with pytest.raises(ValueError):
        StorageDayProfile(charge_window_h=(16.0, 9.0))


@pytest.mark.parametrize("chem", [NMC, LFP])
def test_derate_current(chem: Chemistry) -> None:
    c_start, c_end = chem.charge_taper_v
    d_start, d_end = chem.discharge_taper_v
    mid = 0.5 * (c_start + d_start)
    assert derate_current(30.0, mid, mid, chem) == 30.0
    assert derate_current(-40.0, mid, mid, chem) == -40.0
    assert derate_current(30.0, 0.5 * (c_start + c_end), mid, chem) == pytest.approx(15.0)
    assert derate_current(30.0, c_end, mid, chem) == 0.0
    assert derate_current(30.0, chem.v_max, mid, chem) == 0.0
    # a full cell still allows discharge and an empty one still allows charge
    assert derate_current(-40.0, chem.v_max, mid, chem) == -40.0
    assert derate_current(-40.0, mid, 0.5 * (d_start + d_end), chem) == pytest.approx(-20.0)
    assert derate_current(-40.0, mid, chem.v_min, chem) == 0.0
    assert derate_current(30.0, mid, chem.v_min, chem) == 30.0
    assert derate_current(0.0, chem.v_max, chem.v_min, chem) == 0.0


@pytest.mark.parametrize("chem", ["NMC", "LFP"])
def test_derated_day_stays_inside_voltage_window(chem: str) -> None:
    # Without derating, the day asks for more charge than the pack holds and then
    # more discharge than it has, so both tapers must engage.
    pack = SimBatteryPack(chemistry=chem, seed=11)
    window = get_chemistry(chem)
    prof = StorageDayProfile()
    v_max = np.empty(86400)
    v_min = np.empty(86400)
    current = np.empty(86400)
    for k in range(86400):
        m = pack.measure()
        current[k] = prof.derated_current_at(
            pack.time_s, float(m.cell_voltages_v.max()), float(m.cell_voltages_v.min()), chem
        )
        pack.step(1.0, current[k])
        v = pack.cell_voltages_v
        v_max[k] = v.max()
        v_min[k] = v.min()

    hour = 3600
    assert np.all(current[: 9 * hour] == 0.0)
    assert np.all(current[9 * hour + 1 : 11 * hour] > 0.0)
    assert np.all(current[18 * hour + 1 : 19 * hour] < 0.0)
    assert np.all(current[23 * hour + 1 :] == 0.0)
    # both tapers were exercised ...
    assert v_max.max() > window.charge_taper_v[0]
    assert v_min.min() < window.discharge_taper_v[0]
    assert current[12 * hour] < 0.5 * prof.current_at(12 * hour)
    # ... and the pack never left its window
    assert v_max.max() < window.v_max
    assert v_min.min() > window.v_min
    assert np.all(np.isfinite(pack.soc))
    assert pack.module_temps_c.max() < 40.0
