"""``python -m bench``: run the measurements, print the table and write bench-results.json (see :mod:`bench`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pika

import bench
from bench.brokers import ROOT, unreachable_brokers
from bench.ceiling import measure_ceiling
from bench.edge import (
    HOUSEHOLD_RATE_PER_S,
    PI_ZERO_CALIBRATION_S,
    calibrate,
    edge_harness,
    measure_edge_live,
    measure_edge_replay,
    measure_edge_simulate,
)
from bench.harness import OVERRIDES, WORK_PARENT, Broker, pyspy
from bench.million import measure_million
from bench.power_truth import measure_power_truth
from bench.report import cpu_model, fsync_ms, git_revision, print_table, summarize_profile, targets
from bench.scale_out import measure_failover, measure_partitions
from bench.state_scaling import measure_state_scaling
from bench.writer import measure_edge_latency, measure_live_latency, measure_naive, measure_writer_drain

RESULTS = ROOT / "bench-results.json"


@dataclass(frozen=True)
class Sizes:
    pulses: int  # ceiling and writer-drain backlog (the same N for both)
    naive: int  # messages through the naive baseline (it is slow)
    latency: int  # live pulses per latency measurement
    edge_replay: int  # outbox rows replayed, and pulses of the simulate --speed max run
    edge_live_s: float  # measuring window of the live edge run
    warmup_s: float  # edge live: ignored after its first pulse
    repeat: int  # ceiling and writer drain run this many times, interleaved; medians are reported
    power_days: float  # days of each generated household in the power-truth replay
    state_meters: tuple[int, ...]  # meters in the writer's state for the state-scaling phase
    state_batches: int  # one-pulse batches timed per state size
    state_drain: int  # pulses drained per state size
    failover_rounds: int  # kills of the active writer of an active/standby pair
    partition_pulses: int  # backlog drained by one writer, then by two partitions


PRESETS = {
    "full": Sizes(pulses=30_000, naive=1_000, latency=200, edge_replay=30_000, edge_live_s=30.0, warmup_s=2.0,
                  repeat=3, power_days=7.0, state_meters=(1, 1_000, 10_000, 100_000), state_batches=300,
                  state_drain=20_000, failover_rounds=5, partition_pulses=30_000),
    "small": Sizes(pulses=2_000, naive=60, latency=30, edge_replay=2_000, edge_live_s=3.0, warmup_s=1.0, repeat=1,
                   power_days=1.0, state_meters=(1, 1_000, 10_000), state_batches=50, state_drain=2_000,
                   failover_rounds=2, partition_pulses=2_000),
}
PHASES = ("ceiling", "writer_drain", "naive_baseline", "live_latency", "edge", "power_truth", "state_scaling",
          "scale_out")
WITHOUT_BROKERS = {"power_truth", "state_scaling"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=bench.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(PRESETS), default="full", help="preset sizes (default full)")
    parser.add_argument("--pulses", type=int, help="N for the ceiling and the writer drain")
    parser.add_argument("--naive-pulses", type=int, help="messages through the naive baseline (default N/30)")
    parser.add_argument("--latency-pulses", type=int, help="pulses per live-latency measurement")
    parser.add_argument("--edge-pulses", type=int, help="outbox rows replayed / pulses simulated at --speed max")
    parser.add_argument("--edge-live-s", type=float, help="seconds of the live edge CPU/RSS window")
    parser.add_argument("--power-days", type=float, help="days of each household in the power-truth replay")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(PHASES)}")
    parser.add_argument("--million", nargs="?", type=int, const=1_000_000, default=None, metavar="N",
                        help="also run edge -> writer on N (default 1,000,000) pulses for flat memory")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for every emdc process, e.g. --set batch_size=2000 (repeatable)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record py-spy profiles of the writer drain and edge replay into DIR")
    parser.add_argument("--keep-work", action="store_true", help="keep the logs and state directories (printed)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS.name})")
    parser.add_argument("--repeat", type=int, help="runs of the ceiling and writer drain (median reported)")
    parser.add_argument("--edge-harness", nargs=2, type=float, metavar=("RATE", "SECONDS"), help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", action="store_true",
                        help="only time the CPU calibration workload (run it on a Pi Zero to replace the assumption)")
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = PRESETS[args.size]
    if args.pulses:
        sizes = replace(sizes, pulses=args.pulses, naive=max(20, args.pulses // 30))
    overrides = {"naive": args.naive_pulses, "latency": args.latency_pulses, "edge_replay": args.edge_pulses,
                 "edge_live_s": args.edge_live_s, "repeat": args.repeat, "power_days": args.power_days}
    return replace(sizes, **{k: v for k, v in overrides.items() if v})


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = sizes_from(args)
    phases = set(args.only.split(",")) if args.only else set(PHASES)
    unknown = phases - set(PHASES)
    if unknown:
        raise SystemExit(f"--only: unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    brokers = bool(phases - WITHOUT_BROKERS) or bool(args.million)
    missing = unreachable_brokers() if brokers else []
    if missing:
        raise SystemExit(f"{' and '.join(missing)} not reachable; start them (see .ci/run)")
    for setting in args.set:
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise SystemExit(f"--set expects NAME=VALUE, got {setting!r}")
        OVERRIDES[f"EMDC_{name.upper()}"] = value
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        pyspy()

    WORK_PARENT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=WORK_PARENT))
    broker = Broker() if brokers else None
    calibration_s = calibrate()
    results: dict[str, Any] = {"meta": {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "revision": git_revision(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "python": platform.python_version(), "cpu": cpu_model(), "cpus": os.cpu_count(),
        "rabbitmq": broker.version if broker else "-", "pika": pika.__version__, "fsync_ms": fsync_ms(work),
        "calibration_s": round(calibration_s, 4), "pi_zero_calibration_s": PI_ZERO_CALIBRATION_S,
        "load_average_at_start": os.getloadavg(), "sizes": asdict(sizes), "settings": dict(OVERRIDES)}}

    def phase(name: str, action: Callable[[], Any]) -> Any:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        value = action()
        print(f"[bench] {name} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return value

    try:
        ceilings: list[dict[str, Any]] = []
        drains: list[dict[str, Any]] = []
        for i in range(1, sizes.repeat + 1):  # interleaved, so drift in the machine's load hits both alike
            of = f" {i}/{sizes.repeat}" if sizes.repeat > 1 else ""
            if "ceiling" in phases:
                ceilings.append(phase(f"ceiling{of}", lambda: measure_ceiling(work, broker, sizes.pulses)))
            if "writer_drain" in phases:
                drains.append(phase(f"writer drain{of}", lambda i=i: measure_writer_drain(
                    work, broker, sizes.pulses, args.profile if i == 1 else None)))
        if ceilings:
            results["ceiling"] = median_run(ceilings)
        ceiling_rate = results.get("ceiling", {}).get("rate_per_s")
        if drains:
            drain = median_run(drains)
            if ceiling_rate:
                drain["ratio_to_ceiling"] = round(drain["rate_per_s"] / ceiling_rate, 3)
            results["writer_drain"] = drain
        if "naive_baseline" in phases:
            naive = phase("naive baseline", lambda: measure_naive(work, broker, sizes.naive, ceiling_rate))
            if "writer_drain" in results:
                naive["speedup"] = round(results["writer_drain"]["rate_per_s"] / naive["rate_per_s"], 1)
            results["naive_baseline"] = naive
        if "live_latency" in phases:
            results["live_latency"] = {
                "direct": phase("live latency (pika)", lambda: measure_live_latency(work, broker, sizes.latency)),
                "via_edge": phase("live latency (edge)", lambda: measure_edge_latency(work, broker, sizes.latency)),
            }
        if "edge" in phases:
            results["edge"] = {
                "replay": phase("edge replay",
                                lambda: measure_edge_replay(work, broker, sizes.edge_replay, args.profile)),
                "simulate_max": phase("edge simulate --speed max",
                                      lambda: measure_edge_simulate(work, broker, sizes.edge_replay)),
                "live": phase("edge live (simulate)", lambda: measure_edge_live(
                    work, broker, sizes.edge_live_s, sizes.warmup_s, calibration_s)),
                "live_production": phase("edge live (production chain)", lambda: measure_edge_live(
                    work, broker, sizes.edge_live_s, sizes.warmup_s, calibration_s, production=True)),
                "live_production_household": phase("edge live (production chain, household rate)",
                                                   lambda: measure_edge_live(
                    work, broker, sizes.edge_live_s, sizes.warmup_s, calibration_s, production=True,
                    rate=HOUSEHOLD_RATE_PER_S)),
            }
        if "power_truth" in phases:
            results["power_truth"] = phase("power truth", lambda: measure_power_truth(
                sizes.power_days, progress=lambda step: print(f"[bench]   {step}", file=sys.stderr, flush=True)))
        if "state_scaling" in phases:
            results["state_scaling"] = phase("state scaling", lambda: measure_state_scaling(
                work, sizes.state_meters, sizes.state_batches, sizes.state_drain))
        if "scale_out" in phases:
            results["scale_out"] = {
                "failover": phase("failover", lambda: measure_failover(work, broker, sizes.failover_rounds)),
                "partitions": phase("partitions", lambda: measure_partitions(work, broker, sizes.partition_pulses)),
            }
        if args.million:
            results["million"] = phase("million", lambda: measure_million(work, broker, args.million))
        if args.profile:
            results["profiles"] = {path.stem: summarize_profile(path) for path in sorted(args.profile.glob("*.txt"))}
    finally:
        if broker:
            broker.close()
        if args.keep_work:
            print(f"[bench] logs and state kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["meta"]["load_average_at_end"] = os.getloadavg()
    results["targets"] = targets(results)
    return results


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (the lower middle one for an even count), plus every run's rate."""
    ordered = sorted(runs, key=lambda run: run["rate_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs": len(runs), "rates_per_s": [run["rate_per_s"] for run in runs]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.edge_harness:
        edge_harness(*args.edge_harness)
        return 0
    if args.calibrate:
        seconds = calibrate()
        print(f"calibration workload: {seconds * 1000:.1f} ms (best of 20) on {cpu_model()}, "
              f"Python {platform.python_version()}")
        return 0
    results = run(args)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
