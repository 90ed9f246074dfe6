"""Two Pis with one meter id (a copied configuration): the real `emdc edge run` twice and the real writer.

The Pi that counted first counts on, exactly; the second is held back from
its first pulse, since its epoch began while the first counted on, with one
error line, and the writer stays up.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.topology import dead_letter_queue
from tests.support import MeteredEdge, Names, queue_depth, saved_total_uwh, start_writer, wait_until, writer_env

pytestmark = pytest.mark.slow


def test_a_second_pi_on_the_same_meter_id_is_held_back_and_the_first_counts_exactly(
        names: Names, spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    writer = start_writer(spawn, names, writer_env(names))
    first = MeteredEdge(names, tmp_path / "first", rate=5)
    second = MeteredEdge(names, tmp_path / "second", rate=2)  # another rate: the counts cannot pass for each other
    try:
        first.start()
        first.meter_on()
        wait_until(lambda: (saved_total_uwh(names.writer_dir) or 0) >= 3 * 10**6, 30, "the first Pi counted")
        second.start(EMDC_STATE_DIR=str(tmp_path / "second-state"))
        time.sleep(7)  # the second Pi's epoch begins while the first counts on (more than the clocks' margin)
        second.meter_on()
        wait_until(lambda: second.produced() >= 5, 30, "the second Pi's meter")
        refused = second.meter_off()
        counted = first.meter_off()
        wait_until(lambda: saved_total_uwh(names.writer_dir) == counted * 10**6, 60,
                   f"the first Pi's {counted} pulses, and the second's {refused} not")
        wait_until(lambda: queue_depth(dead_letter_queue(names.queue)) == refused, 30, "the second's held back")
        assert saved_total_uwh(names.writer_dir) == counted * 10**6, "nothing of the second Pi counted"
        assert writer.proc.poll() is None
        errors = [line for line in writer.log().splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "two edges count under meter id 'main'" in errors[0], errors
    finally:
        first.end()
        second.end()
