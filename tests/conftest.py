"""Shared fixtures: real brokers, isolated names, running `emdc` processes, an MQTT watcher, a mock pin factory.

Every test that talks to a broker gets its own queue, topic prefix and state
directories, so tests never see each other's messages. Brokers that are down
make the session fail loudly instead of skipping: CI must not pass vacuously.

Every test that needs a broker or database server is marked ``brokers``
(:func:`pytest_collection_modifyitems`), so ``pytest -m "not brokers"`` (``make
test-fast``) is a quick inner loop without them. The helpers the fixtures
build on are plain functions and classes in tests/support.py.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from tests.support import EmdcProcess, MqttWatcher, Names, unreachable_brokers

# Fixtures that reach a broker or database server, the shared ones or one the test starts itself. A test
# that uses any of them, directly or through another fixture, is marked `brokers`. A test that reaches a
# server without such a fixture carries the mark itself (and the MariaDB half of `db_url` carries it).
BROKER_FIXTURES = frozenset({
    "brokers", "names", "watch",  # the shared RabbitMQ and Mosquitto (below)
    "mariadb",  # tests/test_db_writer.py: the shared MariaDB
    "state_url",  # tests/test_shared_state.py: the shared MariaDB and PostgreSQL
    "mosquitto_broker",  # tests/test_deploy.py: a private Mosquitto
    "private_mosquitto",  # tests/test_reliability.py: a Mosquitto the test kills and restarts
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.brokers)


@pytest.fixture(scope="session")
def brokers() -> None:
    missing = unreachable_brokers()
    if missing:
        pytest.fail(f"{' and '.join(missing)} not reachable; start them (see .ci/run)")


@pytest.fixture
def names(tmp_path: Path, brokers: None) -> Iterator[Names]:
    n = Names(tmp_path)
    yield n
    n.remove()


@pytest.fixture
def watch(names: Names) -> Iterator[MqttWatcher]:
    watcher = MqttWatcher(f"{names.prefix}/#")
    yield watcher
    watcher.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., EmdcProcess]]:
    """Start `emdc ...` processes (``spawn(args, env, name)``); any still running at the end are killed."""
    started: list[EmdcProcess] = []

    def start(args: list[str], env: dict[str, str], name: str = "emdc") -> EmdcProcess:
        process = EmdcProcess(args, env, tmp_path / f"{name}-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.stop(signal.SIGKILL)


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    """gpiozero's MockFactory, reset afterwards: pins the test drives by hand."""
    f = MockFactory()
    yield f
    f.reset()
