"""``emdc edge run`` with a meter on its mock pin: the real edge process, pulsed in real time.

Run as ``python -m tests.metered_edge [emdc options] edge run``: it installs
gpiozero's MockFactory, starts a meter thread that pulses the active pin
(S0: the line is pulled low for 30 ms per pulse) and then runs the ``emdc``
command line exactly as the installed command does. The meter is controlled
through files in ``EMDC_TEST_METER_DIR``, so a test can drive it from outside,
also under libfaketime:

* the meter pulses at ``EMDC_TEST_METER_RATE`` pulses/s (default 10) while
  ``<dir>/meter.on`` exists, and waits while it does not;
* after every pulse it writes the number of pulses produced so far to
  ``<dir>/meter.count`` (atomically): the truth a writer's total must equal;
* while it waits it keeps ``<dir>/meter.idle``, so a test knows no pulse is
  under way (a busy machine can pause the meter thread in mid-pulse for longer
  than any fixed wait).

The meter waits on an event, not with ``time.sleep``, which fails with EINVAL
under libfaketime with ``FAKETIME_DONT_FAKE_MONOTONIC=1``.

The counter survives restarts of the process: it starts from the count
already in ``meter.count``.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

PULSE_S = 0.03
POLL_S = 0.05


def meter(pin: object, directory: Path, rate: float, stop: threading.Event) -> None:
    count_path, on_path, idle_path = directory / "meter.count", directory / "meter.on", directory / "meter.idle"
    produced = int(count_path.read_text()) if count_path.exists() else 0
    while not stop.is_set():
        if not on_path.exists():
            idle_path.touch()
            stop.wait(POLL_S)
            continue
        idle_path.unlink(missing_ok=True)
        pin.drive_low()  # type: ignore[attr-defined]
        stop.wait(PULSE_S)
        pin.drive_high()  # type: ignore[attr-defined]
        produced += 1
        tmp = count_path.with_suffix(".tmp")
        tmp.write_text(str(produced))
        tmp.replace(count_path)
        stop.wait(max(1 / rate - PULSE_S, 0.001))


def main() -> None:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    from emdc.cli import main as emdc

    directory = Path(os.environ["EMDC_TEST_METER_DIR"])
    rate = float(os.environ.get("EMDC_TEST_METER_RATE", "10"))
    Device.pin_factory = MockFactory()
    pin = Device.pin_factory.pin(int(os.environ.get("EMDC_ACTIVE_PIN", "17")))
    stop = threading.Event()
    threading.Thread(target=meter, args=(pin, directory, rate, stop), name="meter", daemon=True).start()
    try:
        emdc(sys.argv[1:])
    finally:
        stop.set()


if __name__ == "__main__":
    main()
