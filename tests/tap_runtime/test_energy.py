"""EnergyMonitor: measured readings say so, estimates say so, and RAPL counters wrap correctly."""

from pathlib import Path

import pytest
import torch

from tap_runtime.energy import HOROWITZ_45NM, EnergyEstimator, EnergyMonitor, WorkCounts, available_counters


def _fake_rapl(root: Path, energy_uj: int, max_uj: int = 1_000_000) -> Path:
    domain = root / "intel-rapl:0"
    domain.mkdir(parents=True, exist_ok=True)
    (domain / "name").write_text("package-0\n")
    (domain / "energy_uj").write_text(f"{energy_uj}\n")
    (domain / "max_energy_range_uj").write_text(f"{max_uj}\n")
    sub = root / "intel-rapl:0:0"  # a core sub-domain: must not be counted twice
    sub.mkdir(exist_ok=True)
    (sub / "energy_uj").write_text("5\n")
    (sub / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return domain


def test_rapl_counter_is_measured_and_handles_wraparound(tmp_path):
    domain = _fake_rapl(tmp_path, energy_uj=900_000)
    monitor = EnergyMonitor("cpu", counter="rapl", powercap_root=tmp_path)
    monitor.begin_window("w")
    (domain / "energy_uj").write_text("100000\n")  # wrapped: 900k -> 1M -> 100k = 200k uJ
    reading = monitor.end_window("w", work=WorkCounts(weight_bytes=1e6))
    assert reading.method == "measured-rapl" and reading.measured
    assert reading.joules == pytest.approx(0.2)
    assert "RAPL" in reading.source
    # The estimate rides along for comparison but is kept apart from the measurement.
    assert reading.details["estimated_joules"] == pytest.approx(1e6 * HOROWITZ_45NM["dram_pj_per_byte"] * 1e-12)


def test_without_counters_the_reading_is_an_estimate_with_its_constants(tmp_path):
    monitor = EnergyMonitor("cpu", powercap_root=tmp_path)  # empty powercap tree
    assert monitor.method == "estimated"
    work = WorkCounts(weight_bytes=2e6, cache_bytes=1e5, macs_by_dtype={"int4": 1e9, "bf16": 1e7})
    with monitor:
        monitor.work = work
    reading = monitor.last
    assert reading.method == "estimated" and not reading.measured
    expected = ((2e6 + 1e5) * HOROWITZ_45NM["dram_pj_per_byte"] + 1e9 * 0.23 + 1e7 * 1.5) * 1e-12
    assert reading.joules == pytest.approx(expected)
    assert "Horowitz" in reading.source and "rapl" in reading.details["counters_unavailable"]


def test_estimate_needs_work_counts_and_names_what_is_missing(tmp_path):
    monitor = EnergyMonitor("cpu", powercap_root=tmp_path)
    monitor.begin_window("w")
    with pytest.raises(ValueError, match="pass work=WorkCounts"):
        monitor.end_window("w")
    with pytest.raises(ValueError, match="never begun"):
        monitor.end_window("other")
    with pytest.raises(ValueError, match="no energy per MAC for 'fp8'"):
        EnergyEstimator().joules(WorkCounts(macs_by_dtype={"fp8": 1.0}))


def test_asking_for_an_unreadable_counter_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="'rapl' is not readable"):
        EnergyMonitor("cpu", counter="rapl", powercap_root=tmp_path)


def test_fewer_bits_read_estimate_less_energy():
    estimator = EnergyEstimator()
    four_bit = WorkCounts(weight_bytes=0.5e6, macs_by_dtype={"int4": 1e6})
    sixteen_bit = WorkCounts(weight_bytes=2e6, macs_by_dtype={"bf16": 1e6})
    assert estimator.joules(four_bit) < estimator.joules(sixteen_bit)
    assert (four_bit + sixteen_bit).weight_bytes == 2.5e6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVML needs an NVIDIA GPU")
def test_nvml_counter_measures_a_busy_gpu():
    monitor = EnergyMonitor("cuda")
    assert monitor.method == "measured-nvml", available_counters("cuda")
    monitor.begin_window("matmul")
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(200):
        a = (a @ a).clamp(-1, 1)
    reading = monitor.end_window("matmul")
    assert reading.joules > 0 and reading.watts > 10


def test_amdsmi_counter_through_a_stand_in_module(monkeypatch):
    """No AMD GPU here: a stand-in with amdsmi's calls checks the reading and its label."""
    import sys
    import types

    readings = iter([1000, 1000, 1000 + 2_000_000])  # opening check, window start, window end
    fake = types.SimpleNamespace(
        amdsmi_init=lambda: None,
        amdsmi_get_processor_handles=lambda: ["gpu0"],
        amdsmi_get_energy_count=lambda handle: {"energy_accumulator": next(readings), "counter_resolution": 15.25},
    )
    monkeypatch.setitem(sys.modules, "amdsmi", fake)
    monitor = EnergyMonitor("cpu", counter="amdsmi")
    monitor.begin_window("w")
    reading = monitor.end_window("w")
    assert reading.method == "measured-amdsmi" and "amdsmi" in reading.source
    assert reading.joules == pytest.approx(2_000_000 * 15.25e-6)
