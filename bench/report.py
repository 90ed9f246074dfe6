"""The results: targets met or missed, the printed table, py-spy summaries and the facts of the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.brokers import ROOT
from bench.edge import EDGE_LIVE_RATE_PER_S, PI_ZERO_BUDGET_SHARE, PI_ZERO_KEEPS_UP_SHARE

# Targets (informative only).
DRAIN_RATIO_TARGET = 0.6
LATENCY_P99_TARGET_MS = 20.0
REPLAY_TARGET_PER_S = 3000.0
EDGE_RSS_TARGET_MB = 40.0
POWER_AFTER_DROPS_RATIO_TARGET = 0.5  # EMDC's error after load drops / ESPHome pulse_meter's
POWER_MSGS_PER_S_TARGET = 1
STATE_BATCH_RATIO_TARGET = 2.0  # a one-pulse batch with 10,000 meters in the state / with 1
STATE_DRAIN_RATIO_TARGET = 0.8  # the drain rate with 10,000 meters in the state / with 1
STATE_TARGET_METERS = 10_000
FAILOVER_TARGET_S = 10.0  # SIGKILL of the active writer -> the standby's first counted pulse on MQTT

EDGE_LIVE_RUNS = (("live", "edge simulate"), ("live_production", "edge production chain"),
                  ("live_production_household", "edge production chain"))


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, each with the measured value and whether it is met (informative only)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, target: str, ok: bool) -> None:
        out.append({"name": name, "value": value, "target": target, "ok": ok})

    drain = results.get("writer_drain", {})
    if "ratio_to_ceiling" in drain:
        add("writer drain / ceiling", drain["ratio_to_ceiling"], f">= {DRAIN_RATIO_TARGET}",
            drain["ratio_to_ceiling"] >= DRAIN_RATIO_TARGET)
    live = results.get("live_latency", {})
    if "direct" in live:
        add("live latency p99 (ms)", live["direct"]["p99_ms"], f"<= {LATENCY_P99_TARGET_MS:g}",
            live["direct"]["p99_ms"] <= LATENCY_P99_TARGET_MS)
    if "via_edge" in live:
        p99 = live["via_edge"]["broker_to_mqtt"]["p99_ms"]
        add("live latency via edge, broker -> MQTT p99 (ms)", p99, f"<= {LATENCY_P99_TARGET_MS:g}",
            p99 <= LATENCY_P99_TARGET_MS)
    edge = results.get("edge", {})
    if "replay" in edge:
        add("edge outbox replay (pulses/s)", edge["replay"]["rate_per_s"], f">= {REPLAY_TARGET_PER_S:g}",
            edge["replay"]["rate_per_s"] >= REPLAY_TARGET_PER_S)
    if "live" in edge:  # the harness process also carries the bench's imports, so RSS comes from simulate
        add("edge peak RSS (MB)", edge["live"]["peak_rss_mb"], f"<= {EDGE_RSS_TARGET_MB:g}",
            edge["live"]["peak_rss_mb"] <= EDGE_RSS_TARGET_MB)
    for key, what in EDGE_LIVE_RUNS[1:]:  # the production chain: the simulator's own machinery is no Pi's load
        if key in edge:
            pi = edge[key]["pi_zero"]
            rate = f"{pi['rate_per_s']:g} pulses/s"
            if pi["rate_per_s"] >= EDGE_LIVE_RATE_PER_S:
                add(f"{what}: Pi Zero keeps up at {rate} (projected share of its core)", pi["cpu_share"],
                    f"<= {PI_ZERO_KEEPS_UP_SHARE}", pi["cpu_share"] <= PI_ZERO_KEEPS_UP_SHARE)
            add(f"{what}: Pi Zero unnoticed at {rate} (projected share of its core)", pi["cpu_share"],
                f"<= {PI_ZERO_BUDGET_SHARE}", pi["cpu_share"] <= PI_ZERO_BUDGET_SHARE)
    power = results.get("power_truth")
    if power:
        add("power truth: error after drops, EMDC / ESPHome hold (held-out households)", power["ratio_after_drops"],
            f"<= {POWER_AFTER_DROPS_RATIO_TARGET}", power["ratio_after_drops"] <= POWER_AFTER_DROPS_RATIO_TARGET)
        add("power truth: power messages per second per channel (max)", power["power_msgs_max_per_s"],
            f"<= {POWER_MSGS_PER_S_TARGET}", power["power_msgs_max_per_s"] <= POWER_MSGS_PER_S_TARGET)
    scaling = {run["meters"]: run for run in results.get("state_scaling", {}).get("sizes", [])}
    if STATE_TARGET_METERS in scaling:
        run = scaling[STATE_TARGET_METERS]
        add(f"state: one-pulse batch with {STATE_TARGET_METERS:,} meters / 1 meter", run["batch_ratio"],
            f"<= {STATE_BATCH_RATIO_TARGET:g}", run["batch_ratio"] <= STATE_BATCH_RATIO_TARGET)
        add(f"state: drain rate with {STATE_TARGET_METERS:,} meters / 1 meter", run["drain_ratio"],
            f">= {STATE_DRAIN_RATIO_TARGET:g}", run["drain_ratio"] >= STATE_DRAIN_RATIO_TARGET)
    failover = results.get("scale_out", {}).get("failover")
    if failover:
        add("failover: kill -9 of the active writer -> standby's first counted pulse (s, max)", failover["max_s"],
            f"< {FAILOVER_TARGET_S:g}", failover["max_s"] < FAILOVER_TARGET_S)
    million = results.get("million", {})
    for side in ("writer", "edge"):
        growth = million.get(side, {}).get("growth_mb_per_100k")
        if growth is not None:
            add(f"million: {side} RSS growth (MB per 100k pulses)", growth, "< 0.1", growth < 0.1)
    if "rss_mb_max" in million.get("edge", {}):
        peak = million["edge"]["rss_mb_max"]
        add("million: edge peak RSS (MB)", peak, f"<= {EDGE_RSS_TARGET_MB:g}", peak <= EDGE_RSS_TARGET_MB)
    if "state_bytes" in million:
        sizes = million["state_bytes"]
        add("million: writer state file growth (bytes)", sizes["max"] - sizes["min"], "< 64",
            sizes["max"] - sizes["min"] < 64)
    return out


def scale_out_rows(scale_out: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    failover = scale_out.get("failover")
    if failover:
        rows.append((f"failover to the standby, {failover['rounds']} round(s)", f"{failover['median_s']:.2f} s",
                     f"median; max {failover['max_s']:.2f} s; exact total: {failover['exact_total']}"))
    partitions = scale_out.get("partitions")
    if partitions:
        one, two = partitions["one"], partitions["two"]
        rows.append((f"drain by 2 partitions, {two['pulses']:,} pulses", f"{fmt_rate(two['rate_per_s'])}/s",
                     f"x{partitions['ratio']:.2f} of one writer ({fmt_rate(one['rate_per_s'])}/s)"))
    return rows


def print_table(results: dict[str, Any]) -> None:
    meta = results["meta"]
    rows: list[tuple[str, str, str]] = []
    ceiling = results.get("ceiling")
    if ceiling:
        rows.append((f"ceiling: pika consume+ack, {ceiling['messages']:,} msgs", f"{fmt_rate(ceiling['rate_per_s'])}/s",
                     f"median of {runs(ceiling)}; consumer CPU {ceiling['consumer_cpu_share']:.0%}"))
    drain = results.get("writer_drain")
    if drain:
        ratio = f"{drain['ratio_to_ceiling']:.2f} x ceiling; " if "ratio_to_ceiling" in drain else ""
        rows.append((f"writer drain, {drain['pulses']:,} pulses", f"{fmt_rate(drain['rate_per_s'])}/s",
                     f"{ratio}median of {runs(drain)}; writer CPU {drain['writer_cpu_share']:.0%}"))
    naive = results.get("naive_baseline")
    if naive:
        extra = f"{naive['ratio_to_ceiling']:.3f} x ceiling" if "ratio_to_ceiling" in naive else ""
        if "speedup" in naive:
            extra += f"; the writer drains {naive['speedup']:.0f}x faster"
        rows.append((f"naive per-message baseline, {naive['pulses']:,} pulses", f"{naive['rate_per_s']:,.0f}/s",
                     extra))
    live = results.get("live_latency", {})
    if "direct" in live:
        rows.append((f"live latency, {live['direct']['pulses']} pulses at 10/s (pika -> writer -> MQTT)",
                     latency_text(live["direct"]), "p50 / p99 / max"))
    if "via_edge" in live:
        via = live["via_edge"]
        rows.append((f"live latency, {via['pulses']} pulses at 10/s (edge simulate -> ... -> MQTT)",
                     latency_text(via), "from the simulator's ts_ns"))
        rows.append(("  of which edge -> broker", latency_text(via["edge_to_broker"]),
                     "incl. the simulator's clock offset"))
        rows.append(("  of which broker -> writer -> MQTT", latency_text(via["broker_to_mqtt"]), ""))
    edge = results.get("edge", {})
    if "replay" in edge:
        r = edge["replay"]
        rows.append((f"edge outbox replay, {r['pulses']:,} pulses", f"{fmt_rate(r['rate_per_s'])}/s",
                     f"with confirms; edge CPU {r['edge_cpu_share']:.0%}"))
    if "simulate_max" in edge:
        r = edge["simulate_max"]
        rows.append((f"edge simulate --speed max, {r['pulses']:,} pulses", f"{fmt_rate(r['rate_per_s'])}/s",
                     f"recorded + published; process {r['process_wall_s']:.1f} s"))
    for key, what in EDGE_LIVE_RUNS:
        if key in edge:
            r = edge[key]
            pi = r["pi_zero"]
            rss_note = " (+ the bench's imports)" if key.startswith("live_production") else ""
            rows.append((f"{what} at {r['pulses_per_s']:.0f} pulses/s: peak RSS", f"{r['peak_rss_mb']:.1f} MB",
                         f"RSS {r['rss_mb_first']:.1f} -> {r['rss_mb_last']:.1f} MB over {r['window_s']:.0f} s"
                         f"{rss_note}"))
            rows.append((f"{what}: CPU per 1,000 pulses", f"{r['cpu_s_per_1000_pulses']:.3f} s",
                         f"Pi Zero (x{pi['factor']}): {pi['cpu_s_per_1000_pulses']:.1f} s, "
                         f"{pi['cpu_share']:.0%} of its core at {pi['rate_per_s']:g}/s"))
    power = results.get("power_truth")
    if power:
        rows += power_rows(power)
    for run in results.get("state_scaling", {}).get("sizes", []):
        rows.append((f"state of {run['meters']:,} meter(s): one-pulse batch", f"{run['batch_ms']:.3f} ms",
                     f"x{run['batch_ratio']:.2f} of 1 meter; drain {fmt_rate(run['drain_per_s'])}/s "
                     f"(x{run['drain_ratio']:.2f})"))
    rows += scale_out_rows(results.get("scale_out", {}))
    million = results.get("million")
    if million:
        rows.append((f"million: edge -> writer, {million['pulses']:,} pulses", f"{fmt_rate(million['rate_per_s'])}/s",
                     f"{million['seconds']:.0f} s, exact total: {million['exact_total']}"))
        for side in ("writer", "edge"):
            m = million[side]
            if "rss_mb_last" in m:
                rows.append((f"million: {side} RSS at 10 % -> end", f"{m['rss_mb_at_10pct']} -> {m['rss_mb_last']} MB",
                             f"{m['growth_mb_per_100k']:+.3f} MB per 100k pulses; peak {m['rss_mb_max']} MB"))
        rows.append(("million: writer state file", f"{million['state_bytes']['min']}-{million['state_bytes']['max']} B",
                     f"edge outbox files <= {million['outbox_bytes_max'] / 1e6:.1f} MB"))
    print(f"\nEMDC benchmark  {meta['date']}  rev {meta['revision']}  {meta['cpus']} x {meta['cpu']}")
    print(f"  Python {meta['python']}, {meta['rabbitmq']}, fsync {meta['fsync_ms']} ms, calibration "
          f"{meta['calibration_s'] * 1000:.0f} ms, load average {meta['load_average_at_start'][0]:.2f}\n")
    width = max((len(r[0]) for r in rows), default=10)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>22}  {note}")
    if results["targets"]:
        print("\n  targets (informative):")
        for t in results["targets"]:
            print(f"    {'PASS' if t['ok'] else 'MISS'}  {t['name']}: {t['value']} (target {t['target']})")
    for name, profile in results.get("profiles", {}).items():
        print(f"\n  py-spy {name}: {profile['samples']} samples (wall clock, imports excluded)")
        for thread, summary in profile["threads"].items():
            print(f"    thread {thread} ({summary['pct']:.0f}% of samples); where its time goes:")
            for frame, pct in summary["self_pct"][:8]:
                print(f"      {pct:5.1f}%  {frame}")
    print()


def power_rows(power: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The power-truth rows: MAE in W of EMDC / ESPHome hold / HA derivative, the ratios, the message rate."""

    def maes(scope: dict[str, float]) -> str:
        return f"{scope['emdc']:.1f} / {scope['esphome']:.1f} / {scope['ha_derivative']:.1f} W"

    where = f"{len(power['seeds'])} held-out households x {power['days_each']:g} d"
    tuning = power["tuning"]
    return [
        (f"power truth, {where}: MAE after drops", maes(power["mae_after_drops_w"]),
         f"EMDC / ESPHome hold / HA derivative; EMDC {power['ratio_after_drops']:.2f} x ESPHome "
         f"(at the old 10 s refresh {power['ratio_after_drops_10s']:.2f} x); {power['drops']} drops"),
        ("  after drops of 1 kW or more", maes(power["mae_after_big_drops_w"]),
         f"EMDC {power['ratio_after_big_drops']:.2f} x ESPHome"),
        ("  over the whole run", maes(power["mae_day_w"]), f"EMDC {power['ratio_day']:.2f} x ESPHome; "
         f"mean load {power['mean_load_w']} W"),
        ("  power messages per channel", f"max {power['power_msgs_max_per_s']}/s",
         f"{power['power_msgs_per_hour']:.0f} per hour; closest {power['min_power_spacing_s']:.2f} s apart; "
         f"all topics max {power['all_msgs_max_per_s']}/s"),
        (f"  tuning household (seed {tuning['seeds'][0]}): MAE after drops", maes(tuning["mae_after_drops_w"]),
         f"EMDC {tuning['ratio_after_drops']:.2f} x ESPHome; not part of the figures above"),
    ]


def runs(result: dict[str, Any]) -> str:
    rates = result.get("rates_per_s", [result["rate_per_s"]])
    return f"{len(rates)} ({', '.join(fmt_rate(r) for r in rates)})" if len(rates) > 1 else "1"


def latency_text(summary: dict[str, Any]) -> str:
    return f"{summary['p50_ms']:.1f} / {summary['p99_ms']:.1f} / {summary['max_ms']:.1f} ms"


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Wall-clock shares from py-spy's raw (collapsed) output, start-up imports excluded.

    Per thread (named by the function it was started with): its share of all samples, where its
    samples were (``self_pct``, with line numbers, so a wait shows as the call that waits) and
    per function including callees (``inclusive_pct``); shares are of that thread's samples.
    """
    per_thread: dict[str, tuple[Counter[str], Counter[str]]] = {}
    sizes: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or "_find_and_load" in stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        role = thread_role(frames)
        self_time, inclusive = per_thread.setdefault(role, (Counter(), Counter()))
        sizes[role] += count
        self_time[frames[-1]] += count
        for frame in {strip_line(frame) for frame in frames}:
            inclusive[frame] += count
    total = sum(sizes.values())
    threads = {}
    for role, samples in sizes.most_common():
        self_time, inclusive = per_thread[role]
        threads[role] = {
            "pct": round(100 * samples / total, 1),
            "self_pct": [(name, round(100 * n / samples, 1)) for name, n in self_time.most_common(top)],
            "inclusive_pct": [(name, round(100 * n / samples, 1)) for name, n in inclusive.most_common(top)]}
    return {"samples": total, "threads": threads}


def thread_role(frames: list[str]) -> str:
    """The function a thread was started with (the frame after ``Thread.run``), or ``main``."""
    names = [strip_line(frame).split(" (")[0] for frame in frames]
    if "Thread.run" in names and names.index("Thread.run") + 1 < len(names):
        return names[names.index("Thread.run") + 1]
    if "Thread._bootstrap_inner" in names and names.index("Thread._bootstrap_inner") + 1 < len(names):
        return names[names.index("Thread._bootstrap_inner") + 1]
    return "main"


def strip_line(frame: str) -> str:
    """``f (pkg/mod.py:12)`` -> ``f (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def fsync_ms(directory: Path, repeat: int = 50) -> float:
    """Median cost of writing and fsyncing a small file where the state lives."""
    probe = directory / "fsync-probe"
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        with probe.open("wb") as fh:
            fh.write(b"x" * 300)
            fh.flush()
            os.fsync(fh.fileno())
        times.append(time.perf_counter() - start)
    probe.unlink()
    return round(statistics.median(times) * 1000, 3)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
