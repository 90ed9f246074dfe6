"""backend.shared_state: the writer's state in a MariaDB or PostgreSQL database shared by an active/standby pair,
fenced by a generation, against the real database servers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from backend.batch import Delivery
from backend.ledger import Changed, Ledger
from backend.memory_transport import MemorySink
from backend.shared_state import Fenced, SharedStateStore
from backend.state_store import StateError, StateStore, open_store
from backend.writer import EnergyWriter
from common.config import load_config
from common.message import encode
from tests.support import (
    T0,
    MqttWatcher,
    Names,
    S,
    port_open,
    publish,
    pulse,
    queue_depth,
    start_writer,
    wait_until,
    writer_env,
)
from tests.test_writer_failover import count_calibrate_count, energy_history, fresh_pulses

SERVERS = {
    "mariadb": os.environ.get("EMDC_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/"),
    "postgresql": os.environ.get("EMDC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
}


@pytest.fixture(params=sorted(SERVERS))
def state_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database of this test's own on the shared MariaDB or PostgreSQL server."""
    url = sa.make_url(SERVERS[request.param])
    if not port_open(url.host or "127.0.0.1", url.port or 0):
        pytest.fail(f"{request.param} not reachable at {url.host}:{url.port}; start it (see .ci/run)")
    server = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    name = f"emdc_state_{uuid.uuid4().hex[:10]}"
    with server.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with server.connect() as conn:
            if request.param == "postgresql":  # connections of the stores under test may linger in their pools
                conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                                     f"'{name}'"))
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        server.dispose()


def counted(*meters: str, seq: int = 3) -> Ledger:
    ledger = Ledger(100_000, fixed_wh=True)
    for meter in meters:
        ledger.admit(meter, T0)
        ledger.apply(pulse(seq, seq, meter=meter), T0 + 10 * S)
    return ledger


def everything(ledger: Ledger) -> Changed:
    return Changed(frozenset(key for key, _ in ledger), frozenset(ledger.meters()))


def test_a_saved_ledger_loads_back_equal_and_only_changed_rows_are_written(state_url: str) -> None:
    store = SharedStateStore.open(state_url)
    assert store.load() is None
    store.acquire()
    ledger = counted("main", "Main")  # meter ids differ by case only: two rows, also on MariaDB
    store.save(ledger, everything(ledger))
    assert SharedStateStore.open(state_url).load() == ledger.to_json()
    ledger.apply(pulse(4, 4, meter="main"), T0 + 10 * S)
    ledger.apply(pulse(4, 4, meter="Main"), T0 + 10 * S)
    store.save(ledger, Changed(frozenset({("main", "active")})))
    saved = SharedStateStore.open(state_url).load()
    assert saved is not None
    assert saved["meters"]["main"]["active"]["total_uwh"] == 4_000_000
    assert saved["meters"]["Main"]["active"]["total_uwh"] == 3_000_000
    ledger.forget("Main")
    store.save(ledger, Changed(frozenset({("Main", "active")}), frozenset({"Main"})))
    saved = SharedStateStore.open(state_url).load()
    assert saved is not None and list(saved["meters"]) == ["main"] and list(saved["admitted"]) == ["main"]


def test_a_writer_whose_generation_was_taken_over_saves_nothing(state_url: str) -> None:
    first, second = SharedStateStore.open(state_url), SharedStateStore.open(state_url)
    first.acquire()
    ledger = counted("main")
    first.save(ledger, everything(ledger))
    second.acquire()
    assert second.generation == (first.generation or 0) + 1
    stale = counted("main", seq=99)
    with pytest.raises(Fenced, match=r"taken over by another writer \(generation 2, this writer's 1\)"):
        first.save(stale, everything(stale))
    assert second.load() == ledger.to_json(), "nothing of the fenced save was written"
    newer = counted("main", seq=5)
    second.save(newer, everything(newer))
    assert first.load() == newer.to_json()


def test_a_writer_that_never_became_active_saves_nothing(state_url: str) -> None:
    store = SharedStateStore.open(state_url)
    with pytest.raises(Fenced):
        store.save(counted("main"), everything(counted("main")))
    assert store.load() is None


def test_both_writers_of_a_pair_have_the_identity_of_the_first_ones_state(state_url: str, tmp_path: Path) -> None:
    local = StateStore(tmp_path / "a")
    ledger = counted("main", seq=42)
    local.save(ledger, everything(ledger))
    own = local.identity()
    first = open_store(load_config(env={"EMDC_STATE_DIR": str(tmp_path / "a"), "EMDC_STATE_URL": state_url}))
    second = open_store(load_config(env={"EMDC_STATE_DIR": str(tmp_path / "b"), "EMDC_STATE_URL": state_url}))
    assert first.identity() == second.identity() == own
    assert second.load() == ledger.to_json(), "the shared state starts from the first writer's own"
    assert local.load() == ledger.to_json(), "the local copy is kept"


def _writer(state_url: str, state_dir: Path, now: list[int]) -> tuple[EnergyWriter, MemorySink]:
    sink = MemorySink()
    config = load_config(env={"EMDC_STATE_DIR": str(state_dir), "EMDC_STATE_URL": state_url,
                              "EMDC_DISCOVERY": "off"})
    return EnergyWriter.open(config, sink=sink, clock=lambda: now[0]), sink


def _batch(*seqs: int) -> list[Delivery]:
    return [Delivery(i, "pulse.main.active", encode(pulse(seq, seq))) for i, seq in enumerate(seqs, 1)]


def test_a_standby_that_takes_over_counts_on_and_the_old_active_one_stops(state_url: str, tmp_path: Path) -> None:
    now = [T0 + 3600 * S]
    active, active_sink = _writer(state_url, tmp_path / "a", now)
    standby, standby_sink = _writer(state_url, tmp_path / "b", now)
    assert active.store.acquire()
    active.reload()
    active.handle_batch(_batch(1, 2, 3))
    assert standby.store.acquire()  # the lease moved: the standby is active now
    standby.reload()
    assert standby.ledger.channel("main", "active").total_uwh == 3_000_000
    published = dict(active_sink.retained)
    with pytest.raises(Fenced):
        active.handle_batch(_batch(4, 5))  # the old active one, not knowing yet
    assert active_sink.retained == published, "nothing published after losing the state"
    assert active.ledger.channel("main", "active").total_uwh == 3_000_000, "rolled back"
    standby.handle_batch(_batch(4, 5))  # the redelivered batch
    standby.publish_all()
    assert standby_sink.retained["home/energy/active_energy"] == "0.005"
    assert SharedStateStore.open(state_url).load() == standby.ledger.to_json()


def test_an_unusable_state_url_is_one_clear_line(tmp_path: Path) -> None:
    for url, says in (("sqlite:///x.db", "unsupported database 'sqlite'"),
                      ("mysql+pymysql://emdc:s3cret@127.0.0.1:1/emdc", "cannot be used"),
                      ("not a url", "is not a URL")):
        with pytest.raises(StateError, match=says) as info:
            SharedStateStore.open(url)
        assert "s3cret" not in str(info.value) and "\n" not in str(info.value)


def test_two_writers_on_one_shared_state_take_over_from_each_other_exactly(state_url: str, names: Names,
                                                                           watch: MqttWatcher, spawn,
                                                                           tmp_path: Path) -> None:
    energy = f"{names.prefix}/active_energy"
    env_a = writer_env(names, EMDC_STATE_URL=state_url)
    env_b = {**env_a, "EMDC_STATE_DIR": str(tmp_path / "b-state")}  # another server: its own state dir
    a = start_writer(spawn, names, env_a)
    b = spawn(["writer"], env_b, "writer-b")
    wait_until(lambda: "standby" in b.log(), 30, "the second writer to stand by")
    count_calibrate_count(names, watch, env_a, kwh=50, after=5)  # a calibration only the shared state knows
    a.kill9()
    publish(names.exchange, fresh_pulses(16, 5))
    watch.wait_for(energy, lambda v: v == "50.01", timeout=60)  # the standby counts on from the shared state
    again = spawn(["writer"], env_a, "writer-a-again")
    wait_until(lambda: "standby" in again.log(), 30, "the restarted writer to stand by")
    b.kill9()
    publish(names.exchange, fresh_pulses(21, 5))
    watch.wait_for(energy, lambda v: v == "50.015", timeout=60)
    assert again.stop() == 0
    history = energy_history(watch, names)
    assert history == sorted(history), f"the retained total dropped: {history}"
    saved = SharedStateStore.open(state_url).load()
    assert saved is not None and saved["meters"]["main"]["active"]["total_uwh"] == 50_015_000_000
    assert "took generation 3 of the shared state" in again.log()
    assert "not taking over" not in again.log() + b.log(), "both writers have the shared state's identity"


def test_a_writer_fenced_by_a_newer_generation_stops_saving_and_publishing_in_one_line(
        state_url: str, names: Names, watch: MqttWatcher, spawn) -> None:
    energy = f"{names.prefix}/active_energy"
    env = writer_env(names, EMDC_STATE_URL=state_url)
    writer = start_writer(spawn, names, env)
    publish(names.exchange, fresh_pulses(1, 3))
    watch.wait_for(energy, lambda v: v == "0.003")
    SharedStateStore.open(state_url).acquire()  # what a writer taking over on another server does first
    publish(names.exchange, fresh_pulses(4, 2))
    wait_until(lambda: "was taken over by another writer" in writer.log(), 30, "the writer to notice")
    wait_until(lambda: queue_depth(names.queue) == 2, 30, "the batch to go back to the queue")
    assert writer.stop() == 0
    assert watch.values[energy] == "0.003", "nothing published after losing the state"
    [line] = [line for line in writer.log().splitlines() if "taken over by another writer" in line]
    assert "this writer stopped saving and publishing, and stands by" in line
    saved = SharedStateStore.open(state_url).load()
    assert saved is not None and saved["meters"]["main"]["active"]["total_uwh"] == 3_000_000
    again = start_writer(spawn, names, env)  # the lease and a new generation: it counts again, exactly
    watch.wait_for(energy, lambda v: v == "0.005")
    assert again.stop() == 0
