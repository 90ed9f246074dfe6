"""`emdc simulate` end to end in one process, no broker: repeated runs on one state never overlap in time; every
channel (export, gas, water) simulated; `emdc edge simulate` through the real RabbitMQ."""

from __future__ import annotations

import collections
import os
import tempfile
import time
from pathlib import Path

import pika
import pytest

from backend.writer import load_ledger
from common.config import load_config
from common.message import decode
from common.topology import DB_WRITER_BINDINGS, dead_letter_queue
from tests.support import (
    AMQP_URL,
    Names,
    declare_queue,
    free_port,
    queue_depth,
    run_emdc,
    saved_total_uwh,
    start_writer,
    wait_until,
    writer_env,
)


def test_repeated_simulations_on_one_state_count_on_and_never_stamp_a_pulse_after_it_was_made(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "EMDC_STATE_DIR": str(tmp_path)}
    outputs, last_stamps, ends = [], [], []
    for _ in range(3):
        # 36 kW: 10 pulses a second, so each run covers 10 s of simulated time.
        outputs.append(run_emdc(["simulate", "--power", "36000", "--count", "100", "--speed", "max"], env))
        ends.append(time.time_ns())
        _, ledger = load_ledger(load_config(env={"EMDC_STATE_DIR": str(tmp_path)}))
        assert ledger is not None
        last_stamps.append(ledger.channel("main", "active").last_ts_ns)
    assert [o.stdout.splitlines()[0] for o in outputs] == [f"home/energy/active_energy = {n / 10:g}"
                                                            for n in (1, 2, 3)]
    assert all("WARNING" not in o.stderr for o in outputs[1:]), outputs[1].stderr
    _, ledger = load_ledger(load_config(env={"EMDC_STATE_DIR": str(tmp_path)}))
    assert ledger is not None
    state = ledger.channel("main", "active")
    assert state.ts_doubt == "" and state.held_back == 0
    # Never after now: each run's newest pulse is stamped before the run ended, and after the previous run's.
    assert all(stamp is not None and stamp <= end for stamp, end in zip(last_stamps, ends, strict=True)), \
        [(stamp - end) / 1e9 for stamp, end in zip(last_stamps, ends, strict=True) if stamp]
    assert last_stamps == sorted(last_stamps)
    # A repeat has no room before now for its 10 s: it goes on from the last pulse in real time, and says so.
    assert all("in real time" in o.stderr for o in outputs[1:]), outputs[1].stderr


@pytest.mark.parametrize("command", [["simulate"], ["edge", "simulate"]])
def test_a_repeat_that_would_run_long_in_real_time_is_refused_in_one_line_naming_the_state_dir(
        tmp_path: Path, command: list[str]) -> None:
    env = {"PATH": os.environ["PATH"], "EMDC_STATE_DIR": str(tmp_path)}
    run_emdc(["simulate", "--power", "3600", "--duration", "120", "--speed", "max"], env)
    # Two minutes more have no room before now: they would take two minutes in real time. (The refusal comes
    # before any broker is reached.)
    started = time.monotonic()
    result = run_emdc([*command, "--power", "3600", "--duration", "120", "--speed", "max"],
                      {**env, "EMDC_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"}
                      if command[0] == "edge" else env, check=False, timeout=60)
    assert time.monotonic() - started < 20
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"Error: state_dir {tmp_path} holds pulses up to "), result.stderr
    assert "give it another --state-dir" in lines[-1] and "Traceback" not in result.stderr
    assert all(" INFO " in line for line in lines[:-1]), result.stderr  # emdc simulate says what it uses first


def sent(stdout: str) -> dict[str, str]:
    """The ``sent <channel>: ...`` lines of a simulation's output, by channel."""
    return {line.split(":")[0].removeprefix("sent "): line.split(": ", 1)[1]
            for line in stdout.splitlines() if line.startswith("sent ")}


def test_edge_simulate_drives_export_gas_and_water_through_the_broker_on_their_channels(names: Names) -> None:
    declare_queue(names, DB_WRITER_BINDINGS)  # pulses alone: the edge's statuses would add to the depth
    result = run_emdc(["edge", "simulate", "--power", "500", "--export-power", "3600", "--gas-flow", "3.6",
                       "--water-flow", "60", "--duration", "95", "--speed", "max"], names.edge_env())
    # 500 W: 1 Wh every 7.2 s; 3600 W: 1 Wh a second; 3.6 m³/h: 0.01 m³ every 10 s; 60 L/min: 1 L a second.
    assert sent(result.stdout) == {"active": "13 pulses = 0.013 kWh", "export": "95 pulses = 0.095 kWh",
                                   "gas": "9 pulses = 0.09 m³", "water": "95 pulses = 95 L"}
    total = 13 + 95 + 9 + 95
    wait_until(lambda: queue_depth(names.queue) == total, 10, "every pulse at the broker")
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        channel = connection.channel()
        got = [channel.basic_get(names.queue, auto_ack=True) for _ in range(total)]
    seqs: dict[str, list[int]] = collections.defaultdict(list)
    quantities: dict[str, set[float]] = collections.defaultdict(set)
    for method, _, body in got:
        pulse = decode(body)
        assert method.routing_key == f"pulse.main.{pulse.channel}"
        seqs[pulse.channel].append(pulse.seq)
        quantities[pulse.channel].add(pulse.wh)
    assert {c: sorted(s) for c, s in seqs.items()} == {"active": list(range(1, 14)), "export": list(range(1, 96)),
                                                       "gas": list(range(1, 10)), "water": list(range(1, 96))}
    assert dict(quantities) == {"active": {1.0}, "export": {1.0}, "gas": {0.01}, "water": {1.0}}


def test_a_csv_profile_with_export_and_gas_columns_is_simulated_end_to_end(tmp_path: Path) -> None:
    profile = tmp_path / "sunny.csv"
    profile.write_text("seconds,active_w,reactive_var,export_w,gas_m3_per_h\n0,0,0,1800,0\n60,1800,0,0,1.8\n")
    env = {"PATH": os.environ["PATH"], "EMDC_STATE_DIR": str(tmp_path / "state")}
    result = run_emdc(["simulate", "--profile", str(profile), "--duration", "119", "--speed", "max"], env)
    # The edge sent each channel's pulses, and the writer counted every one of them (it waits for that).
    assert sent(result.stdout) == {"active": "29 pulses = 0.029 kWh", "export": "30 pulses = 0.03 kWh",
                                   "gas": "2 pulses = 0.02 m³"}
    assert "home/energy/active_energy = 0.029" in result.stdout.splitlines()
    _, ledger = load_ledger(load_config(env=env))
    assert ledger is not None
    counted = {c: max(cursor.seq for cursor in ledger.channel("main", c).epochs.values())
               for c in ("active", "export", "gas")}
    assert counted == {"active": 29, "export": 30, "gas": 2}


def test_the_default_household_returns_solar_power_and_burns_gas() -> None:
    env = {"PATH": os.environ["PATH"]}
    with tempfile.TemporaryDirectory() as state:
        result = run_emdc(["simulate", "--duration", "3600", "--speed", "max"], {**env, "EMDC_STATE_DIR": state})
    lines = sent(result.stdout)
    assert set(lines) == {"active", "reactive", "export", "gas", "water"}
    assert all(int(lines[channel].split()[0]) > 0 for channel in lines), lines


def test_repeated_edge_simulations_into_a_running_writer_are_never_stamped_ahead(names: Names, spawn) -> None:
    # A writer that allows 2 s of clock difference: a pulse stamped later than it was sent is held back.
    writer = start_writer(spawn, names, writer_env(names, EMDC_MAX_CLOCK_AHEAD_S=2))
    # 36 kW: 10 pulses a second, so each run covers 10 s of simulated time in much less at --speed max.
    args = ["edge", "simulate", "--power", "36000", "--count", "100", "--speed", "max"]
    for _ in range(2):
        run_emdc(args, names.edge_env())
    wait_until(lambda: saved_total_uwh(names.writer_dir) == 200_000_000, 30, "every pulse counted")
    assert queue_depth(dead_letter_queue(names.queue)) == 0
    assert writer.stop() == 0
    assert "ahead of the writer's clock" not in writer.log(), writer.log()
