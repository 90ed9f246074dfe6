"""``[[inputs]]``: a Pi's pulse inputs from the TOML file, strictly checked, and the single-meter settings that
describe the same inputs (exactly as the edge always read them) when the file has none."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import ConfigError, load_config
from common.inputs import Input
from edge.pulse_filter import PulseFilter
from emdc.cli import main
from tests.support import HOUSE_INPUTS

HOUSE = HOUSE_INPUTS + """

[[inputs]]
pin = 23
channel = "water"
type = "reed"
per_pulse = 1
bounce_ms = 10
min_pulse_ms = 50
min_interval_ms = 250
"""


@pytest.fixture
def toml(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "emdc.toml"
        path.write_text(text)
        return path
    return write


def test_every_meter_of_the_house_from_inputs_tables(toml) -> None:
    cfg = load_config(toml(HOUSE), env={})
    assert cfg.inputs() == (
        Input(17, "active", "s0", 0.1, min_pulse_ms=25.0, bounce_ms=0.0, min_interval_ms=1.8),
        Input(27, "export", "s0", 0.1, min_pulse_ms=25.0, bounce_ms=0.0, min_interval_ms=1.8),
        Input(22, "gas", "reed", 0.01, min_pulse_ms=80.0, bounce_ms=20.0, min_interval_ms=1125.0),
        Input(23, "water", "reed", 1.0, min_pulse_ms=50.0, bounce_ms=10.0, min_interval_ms=250.0),
    )
    assert [one.setting for one in cfg.inputs()] == [f"[[inputs]] #{n}" for n in range(1, 5)]
    assert [one.pull_up for one in cfg.inputs()] == [True, True, True, True]


def test_an_led_sensor_input_has_no_pull_up(toml) -> None:
    cfg = load_config(toml('[[inputs]]\npin = 4\nchannel = "active"\ntype = "led"\n'), env={})
    (led,) = cfg.inputs()
    assert (led.pull_up, led.per_pulse, led.min_pulse_ms, led.min_interval_ms) == (False, 1.0, 2.0, 18.0)


# --- without [[inputs]]: the single-meter settings --------------------------------------------------

@pytest.mark.parametrize(("env", "expected"), [
    ({}, [Input(17, "active", "s0", 1.0, 2.0, 0.0, 20.0)]),
    ({"EMDC_REACTIVE_PIN": "27", "EMDC_WH_PER_PULSE": "0.5"},
     [Input(17, "active", "s0", 0.5, 2.0, 0.0, 20.0), Input(27, "reactive", "s0", 0.5, 2.0, 0.0, 20.0)]),
    ({"EMDC_ACTIVE_PIN": "4", "EMDC_PULL_UP": "false", "EMDC_MIN_PULSE_MS": "5", "EMDC_MIN_INTERVAL_MS": "40"},
     [Input(4, "active", "led", 1.0, 5.0, 0.0, 40.0)]),
])
def test_the_single_meter_settings_map_onto_inputs(env: dict[str, str], expected: list[Input]) -> None:
    cfg = load_config(env=env)
    assert list(cfg.inputs()) == expected
    assert all(one.pull_up == cfg.pull_up for one in cfg.inputs())
    assert [one.setting for one in cfg.inputs()] == ["active_pin", "reactive_pin"][:len(expected)]


def test_the_single_meter_settings_in_the_file_map_onto_inputs_too(toml) -> None:
    cfg = load_config(toml("[edge]\nactive_pin = 5\nreactive_pin = 6\npull_up = false\n"), env={})
    assert [(one.pin, one.channel, one.type) for one in cfg.inputs()] == [(5, "active", "led"), (6, "reactive", "led")]


class TodaysFilter:
    """The filter the edge used before inputs had types, verbatim: the single-meter settings must still get it."""

    def __init__(self, min_width_s: float, min_interval_s: float) -> None:
        self.min_width_s, self.min_interval_s, self.rejected = min_width_s, min_interval_s, 0
        self._rise: float | None = None
        self._last: float | None = None

    def edge(self, ticks: float, active: bool) -> float | None:
        if active:
            self._rise = ticks
            return None
        rise, self._rise = self._rise, None
        if rise is None:
            return None
        if ticks - rise < self.min_width_s or (self._last is not None and ticks - self._last < self.min_interval_s):
            self.rejected += 1
            return None
        self._last = ticks
        return ticks


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.1), st.booleans()), max_size=80),
       st.sampled_from([0.0, 2.0, 5.0, 30.0]), st.sampled_from([0.0, 20.0, 50.0]))
def test_an_existing_single_meter_config_filters_exactly_as_before(steps: list[tuple[float, bool]],
                                                                   min_pulse_ms: float, min_interval_ms: float) -> None:
    cfg = load_config(env={"EMDC_MIN_PULSE_MS": str(min_pulse_ms), "EMDC_MIN_INTERVAL_MS": str(min_interval_ms)})
    new, old = PulseFilter.for_input(cfg.inputs()[0]), TodaysFilter(min_pulse_ms / 1000, min_interval_ms / 1000)
    ticks = 0.0
    for dt, active in steps:
        ticks += dt
        assert new.edge(ticks, active) == old.edge(ticks, active)
    assert new.rejected == old.rejected


@pytest.mark.parametrize("variable", ["EMDC_ACTIVE_PIN", "EMDC_WH_PER_PULSE", "EMDC_PULL_UP", "EMDC_MIN_PULSE_MS"])
def test_a_single_meter_setting_next_to_inputs_is_refused(toml, variable: str) -> None:
    value = "false" if variable == "EMDC_PULL_UP" else "5"
    with pytest.raises(ConfigError) as info:
        load_config(toml(HOUSE), env={variable: value})
    name = variable.removeprefix("EMDC_").lower()
    assert str(info.value) == (f"{variable}: {name} applies only without [[inputs]]; with [[inputs]] in "
                               f"{toml(HOUSE)}, set it in each input's table")


# --- mistakes: one clear error each, naming the input ------------------------------------------------

ONE = '[[inputs]]\npin = 17\nchannel = "active"\ntype = "s0"\n'


@pytest.mark.parametrize(("text", "message"), [
    (ONE + "per_puls = 0.1\n", "[[inputs]] #1: unknown key 'per_puls' (did you mean 'per_pulse'?); an input has "
                              "pin, channel, type, per_pulse, min_pulse_ms, bounce_ms, min_interval_ms"),
    (ONE.replace('"active"', '"solar"'), "[[inputs]] #1: unknown channel 'solar'; one of active, reactive, export, "
                                         "gas, water"),
    (ONE.replace('"s0"', '"hall"'), "[[inputs]] #1: unknown type 'hall'; one of s0, led, reed"),
    (ONE.replace("17", "28"), "[[inputs]] #1: pin must be a BCM GPIO number from 0 to 27 (GPIO17 is header pin "
                              "11), got 28"),
    (ONE.replace("17", "-1"), "[[inputs]] #1: pin must be a BCM GPIO number from 0 to 27 (GPIO17 is header pin "
                              "11), got -1"),
    (ONE.replace("17", '"17"'), "[[inputs]] #1: pin: expected int, got '17'"),
    (ONE + ONE.replace('"active"', '"export"'), "[[inputs]] #2: GPIO17 is already the pin of [[inputs]] #1 "
                                                "(active): each input needs its own pin"),
    (ONE + ONE.replace("17", "27"), "[[inputs]] #2: channel active is already read by [[inputs]] #1 (GPIO17): one "
                                    "input per channel (a meter's export output is channel export)"),
    (ONE + "per_pulse = 0\n", "[[inputs]] #1: per_pulse must be > 0 and at most 1000, got 0.0"),
    (ONE + "per_pulse = -0.5\n", "[[inputs]] #1: per_pulse must be > 0 and at most 1000, got -0.5"),
    (ONE + "per_pulse = nan\n", "[[inputs]] #1: per_pulse must be > 0 and at most 1000, got nan"),
    (ONE + "bounce_ms = -1\n", "[[inputs]] #1: bounce_ms must be from 0 to 3600000 (an hour), got -1.0"),
    (ONE.replace("pin = 17\n", ""), "[[inputs]] #1: pin is missing (BCM GPIO number, 0 to 27 (GPIO17 is header "
                                    "pin 11); one input per pin)"),
    ("inputs = []\n", "inputs must be one or more [[inputs]] tables, got []"),
    ("inputs = 17\n", "inputs must be one or more [[inputs]] tables, got 17"),
])
def test_each_mistake_is_one_error_naming_the_input(toml, text: str, message: str) -> None:
    path = toml(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: {message}"


def test_a_misspelt_inputs_table_is_an_unknown_setting_with_a_suggestion(toml) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'input' \(did you mean 'inputs'\?\)"):
        load_config(toml(ONE.replace("[[inputs]]", "[[input]]")), env={})


def test_config_show_lists_the_inputs_and_where_they_come_from(toml) -> None:
    path = toml(HOUSE)
    shown = CliRunner().invoke(main, ["--config", str(path), "config", "show"], env={}).output.splitlines()
    assert shown[-5:] == [
        f"# inputs ({path})",
        "input GPIO17: active, s0, 0.1 Wh per pulse, pulses >= 25 ms, >= 1.8 ms apart  # [[inputs]] #1",
        "input GPIO27: export, s0, 0.1 Wh per pulse, pulses >= 25 ms, >= 1.8 ms apart  # [[inputs]] #2",
        "input GPIO22: gas, reed, 0.01 m³ per pulse, pulses >= 80 ms, bounce 20 ms, >= 1125 ms apart  # [[inputs]] #3",
        "input GPIO23: water, reed, 1 L per pulse, pulses >= 50 ms, bounce 10 ms, >= 250 ms apart  # [[inputs]] #4",
    ]
    legacy = CliRunner().invoke(main, ["config", "show"], env={"EMDC_REACTIVE_PIN": "27"}).output.splitlines()
    assert legacy[-3:] == [
        "# inputs (no [[inputs]]: from reactive_pin)",
        "input GPIO17: active, s0, 1 Wh per pulse, pulses >= 2 ms, >= 20 ms apart  # active_pin",
        "input GPIO27: reactive, s0, 1 varh per pulse, pulses >= 2 ms, >= 20 ms apart  # reactive_pin",
    ]


def test_derived_values_are_finite_for_every_channel_and_type(toml) -> None:
    for channel in ("active", "reactive", "export", "gas", "water"):
        for kind in ("s0", "led", "reed"):
            one = load_config(toml(ONE.replace('"active"', f'"{channel}"').replace('"s0"', f'"{kind}"')),
                              env={}).inputs()[0]
            assert all(math.isfinite(v) and v > 0 for v in (one.per_pulse, one.min_pulse_ms, one.min_interval_ms))


def test_the_shipped_example_s_inputs_tables_load_when_uncommented(tmp_path: Path) -> None:
    example = (Path(__file__).resolve().parent.parent / "deploy/edge/emdc.example.toml").read_text()
    block = example.split("Inputs (the Pi)", 1)[1]
    tables = [line.removeprefix("# ") for line in block.splitlines()
              if line.startswith("# [[inputs]]") or (line.startswith("# ") and " = " in line and "#" not in line[2:])]
    path = tmp_path / "emdc.toml"
    path.write_text("\n".join(tables) + "\n")
    inputs = load_config(path, env={}).inputs()
    assert [(one.pin, one.channel, one.type, one.per_pulse) for one in inputs] == [
        (17, "active", "s0", 1.0), (27, "export", "s0", 1.0), (22, "gas", "reed", 0.01), (23, "water", "reed", 1.0)]


def test_inputs_tables_may_sit_in_the_edge_table_like_the_other_edge_settings(toml) -> None:
    cfg = load_config(toml(ONE.replace("[[inputs]]", "[[edge.inputs]]")), env={})
    assert [(one.pin, one.channel) for one in cfg.inputs()] == [(17, "active")]
