"""`make bench` must not rot: run it end to end at its smallest size against the real brokers.

Only completion and the shape of bench-results.json are checked; timings depend on the machine
and are never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

SMALLEST = ["--size", "small", "--pulses", "1000", "--naive-pulses", "20", "--latency-pulses", "10",
            "--edge-pulses", "500", "--edge-live-s", "2", "--power-days", "0.25"]
# scale_out has a smoke test of its own (it needs MariaDB too).
SINGLE_WRITER = ["--only", "ceiling,writer_drain,naive_baseline,live_latency,edge,power_truth,state_scaling"]

EXPECTED = {
    "meta": {"date", "revision", "python", "cpu", "cpus", "rabbitmq", "fsync_ms", "calibration_s", "sizes"},
    "ceiling": {"messages", "seconds", "rate_per_s", "runs", "rates_per_s"},
    "writer_drain": {"pulses", "seconds", "rate_per_s", "ratio_to_ceiling", "exact_total", "dead_letters",
                     "writer_cpu_s", "writer_peak_rss_mb", "runs", "rates_per_s"},
    "naive_baseline": {"pulses", "seconds", "rate_per_s", "ratio_to_ceiling", "speedup"},
    "live_latency": {"direct", "via_edge"},
    "edge": {"replay", "simulate_max", "live", "live_production", "live_production_household"},
    "power_truth": {"seeds", "days_each", "drops", "mae_day_w", "mae_after_drops_w", "ratio_after_drops",
                    "power_msgs_max_per_s", "tuning"},
    "state_scaling": {"batches", "drain_pulses", "sizes"},
}
RULES = {"emdc", "emdc_10s", "esphome", "ha_derivative"}
LATENCY = {"pulses", "p50_ms", "p99_ms", "max_ms"}
EDGE_LIVE = {"pulses_per_s", "cpu_s_per_1000_pulses", "peak_rss_mb", "pi_zero"}


def test_bench_runs_end_to_end_and_writes_well_formed_json(tmp_path: Path, brokers: None) -> None:
    output = tmp_path / "bench-results.json"
    result = subprocess.run([sys.executable, "-m", "bench", *SMALLEST, *SINGLE_WRITER, "--output", str(output)],
                            cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}"
    assert "writer drain" in result.stdout and "targets" in result.stdout

    results = json.loads(output.read_text())
    for section, keys in EXPECTED.items():
        assert results[section].keys() >= keys, f"{section} lacks {keys - results[section].keys()}"
    for path in ("direct", "via_edge"):
        assert results["live_latency"][path].keys() >= LATENCY
    for key in ("edge_to_broker", "broker_to_mqtt"):
        assert results["live_latency"]["via_edge"][key].keys() >= LATENCY - {"pulses"}
    for key in ("live", "live_production", "live_production_household"):
        assert results["edge"][key].keys() >= EDGE_LIVE
    assert results["edge"]["replay"].keys() >= {"rate_per_s", "pulses"}
    # Correctness, not speed: the measured runs counted every pulse exactly once.
    assert results["writer_drain"]["exact_total"] is True
    assert results["writer_drain"]["dead_letters"] == 0
    assert results["edge"]["replay"]["queued_at_broker"] == 500 + 1
    assert {t["name"] for t in results["targets"]} >= {"writer drain / ceiling", "live latency p99 (ms)",
                                                        "edge outbox replay (pulses/s)", "edge peak RSS (MB)"}
    assert all(isinstance(t["ok"], bool) for t in results["targets"])
    assert "power truth" in result.stdout
    scaling = results["state_scaling"]["sizes"]
    assert [run["meters"] for run in scaling] == [1, 1_000, 10_000]
    assert all(run.keys() >= {"batch_ms", "batch_ratio", "drain_per_s", "drain_ratio"} for run in scaling)
    assert {t["name"] for t in results["targets"]} >= {"state: one-pulse batch with 10,000 meters / 1 meter",
                                                        "state: drain rate with 10,000 meters / 1 meter"}


def test_power_truth_runs_without_brokers_and_scores_every_rule_on_held_out_households(tmp_path: Path) -> None:
    output = tmp_path / "bench-results.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--only", "power_truth", "--power-days", "0.25",
                             "--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}"
    assert "power truth" in result.stdout and "MAE after drops" in result.stdout
    power = json.loads(output.read_text())["power_truth"]
    assert power.keys() >= EXPECTED["power_truth"]
    assert power["tuning"]["seeds"] == [1] and 1 not in power["seeds"], "the tuning household is not reported on"
    for scope in ("mae_day_w", "mae_after_drops_w"):
        assert power[scope].keys() == RULES and all(v > 0 for v in power[scope].values())
    assert power["drops"] > 0
    assert power["power_msgs_per_hour"] > 0  # the replayed writer counts the household's meter and publishes
    # Not a timing: the writer never publishes a channel's power twice within a second.
    assert power["power_msgs_max_per_s"] <= 1


def test_scale_out_measures_a_failover_and_a_partitioned_drain_exactly(tmp_path: Path, brokers: None) -> None:
    output = tmp_path / "bench-results.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--size", "small", "--only", "scale_out", "--output",
                             str(output)], cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}"
    assert "failover to the standby" in result.stdout and "drain by 2 partitions" in result.stdout
    scale_out = json.loads(output.read_text())["scale_out"]
    failover, partitions = scale_out["failover"], scale_out["partitions"]
    assert failover.keys() >= {"rounds", "seconds", "median_s", "max_s", "exact_total"}
    assert failover["rounds"] == len(failover["seconds"]) == 2 and failover["exact_total"] is True
    assert partitions.keys() >= {"one", "two", "ratio"}
    assert [partitions[k]["partitions"] for k in ("one", "two")] == [1, 2]
    assert partitions["one"]["pulses"] == partitions["two"]["pulses"] == 2_000
