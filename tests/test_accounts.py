"""Every RabbitMQ account of the deployment against a private broker that runs the rendered definitions and config.

The broker is the machine's RabbitMQ started a second time as its own node
(own name, ports, data directory), booted with deploy/compose/rabbitmq/20-emdc.conf
and the definitions render_secrets.py makes from a scratch ``init`` with two
Pis, so max_message_size, the policies and every permission are the ones a
deployment gets. Each account is tried with everything it must not do, and
with what it needs. The upgrade of an install of the earlier layout (one
shared edge user, queues without single-active-consumer, a direct
dead-letter exchange) is replayed step by step as docs/security.md gives it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from common import topology
from common.message import Pulse, encode
from tests.private_rabbitmq import PrivateRabbitMQ
from tests.support import EmdcProcess, MqttWatcher, Names, S, wait_until, writer_env
from tests.test_deploy import COMPOSE, DEFINITIONS, render_secrets, scratch_compose
from tests.test_doctor import doctor, edge_env, failures

pytestmark = pytest.mark.brokers

PULSE = json.dumps({"v": 1, "meter": "garage", "channel": "active", "epoch": "ab", "seq": 1, "ts_ns": 1, "wh": 1})
QUEUES = ("queue_mqtt_writer", "queue_mqtt_writer.dead", "queue_mqtt_writer.active", "queue_mqtt_writer.status",
          "queue_db_writer", "queue_db_writer.dead", "queue_db_writer.active")
METERS = ("garage", "shed")


def render(compose_dir: Path, out: Path) -> Path:
    """What rabbitmq-init does: the definitions from the template and secrets/rabbitmq/."""
    assert render_secrets.main(["rabbitmq", str(DEFINITIONS), str(out), "--secrets",
                                str(compose_dir / "secrets/rabbitmq")], compose_dir=compose_dir) == 0
    return out


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    """The deployment's broker after ``init`` and ``add-edge`` for two Pis."""
    root = tmp_path_factory.mktemp("accounts")
    compose_dir = scratch_compose(root)  # init, and add-edge garage
    assert render_secrets.main(["add-edge", "shed", "--host", "broker.example.org"], compose_dir=compose_dir) == 0
    broker = PrivateRabbitMQ(root / "rabbitmq", compose_dir / "secrets/rabbitmq")
    try:
        broker.start(render(compose_dir, root / "definitions.json"))
        wait_until(lambda: all(broker.api("GET", f"queues/%2F/{q}")[0] == 200 for q in QUEUES), 60,
                   "the definitions to load")
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def clean(rabbit: PrivateRabbitMQ) -> PrivateRabbitMQ:
    with rabbit.connect("emdc-admin") as conn:
        channel = conn.channel()
        for q in QUEUES:
            channel.queue_purge(q)
    return rabbit


def refused(action: Callable[[], Any], code: int = 403) -> bool:
    """True if the broker answers ``action`` with ``code`` (403 ACCESS_REFUSED) by closing the channel."""
    try:
        action()
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == code, exc
        return True
    return False


def publish(conn: pika.BlockingConnection, exchange: str, key: str, body: bytes | str = PULSE,
            properties: pika.BasicProperties | None = None, mandatory: bool = True) -> None:
    """Publish confirmed (and mandatory) on a fresh channel, so a refusal or a return arrives before this returns."""
    channel = conn.channel()
    channel.confirm_delivery()
    channel.basic_publish(exchange, key, body, properties or pika.BasicProperties(delivery_mode=2), mandatory=mandatory)


def publish_refused(conn: pika.BlockingConnection, exchange: str, key: str, code: int = 403, **kwargs: Any) -> bool:
    return refused(lambda: publish(conn, exchange, key, **kwargs), code)


def depth(rabbit: PrivateRabbitMQ, queue: str) -> int:
    """Messages in ``queue`` now (the management API's numbers lag by seconds)."""
    with rabbit.connect("emdc-admin") as conn:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)


def take(rabbit: PrivateRabbitMQ, queue: str) -> list[tuple[str, bytes]]:
    """Everything in ``queue`` (routing key, body), taken by the admin."""
    got = []
    with rabbit.connect("emdc-admin") as conn:
        channel = conn.channel()
        while (message := channel.basic_get(queue, auto_ack=True))[0] is not None:
            got.append((message[0].routing_key, message[2]))
    return got


ACCOUNTS = ("emdc-edge-garage", "emdc-writer", "emdc-db-writer")
OWN_QUEUE = {"emdc-writer": "queue_mqtt_writer", "emdc-db-writer": "queue_db_writer"}
# What each account may publish, (exchange, routing key); everything else in FORBIDDEN_KEYS is refused.
MAY_PUBLISH = {
    "emdc-edge-garage": {("EMDC", "pulse.garage.active"), ("EMDC", "pulse.garage.reactive"), ("EMDC", "status.garage")},
    "emdc-writer": {("EMDC", "control.garage"), ("EMDC", "control.shed"), ("EMDC.dead", "queue_mqtt_writer"),
                    ("EMDC.dead", "queue_mqtt_writer.1")},  # a partition's dead letters
    "emdc-db-writer": {("EMDC.dead", "queue_db_writer")},
}
PUBLISH_TRIES = (
    ("EMDC", "pulse.garage.active"), ("EMDC", "pulse.garage.reactive"), ("EMDC", "status.garage"),
    ("EMDC", "pulse.shed.active"), ("EMDC", "pulse.garageX.active"), ("EMDC", "pulse.garage"),
    ("EMDC", "status.shed"), ("EMDC", "status.garage.x"), ("EMDC", "control.garage"), ("EMDC", "control.shed"),
    ("EMDC", "control.garage.x"), ("EMDC", "x.pulse.garage.active"),
    ("EMDC.dead", "queue_mqtt_writer"), ("EMDC.dead", "queue_db_writer"),
    ("EMDC.dead", "queue_mqtt_writer.1"), ("EMDC.dead", "queue_db_writer.1"), ("EMDC.dead", "queue_mqtt_writer.x"),
    ("", "queue_mqtt_writer"), ("", "queue_db_writer"), ("", "queue_mqtt_writer.dead"),
    ("amq.topic", "pulse.garage.active"), ("amq.direct", "queue_mqtt_writer"), ("amq.fanout", ""),
)


@pytest.mark.parametrize("account", ACCOUNTS)
def test_each_account_publishes_only_what_it_may(clean: PrivateRabbitMQ, account: str):
    with clean.connect(account) as conn:
        for exchange, key in PUBLISH_TRIES:
            allowed = (exchange, key) in MAY_PUBLISH[account]
            routed = allowed and key != "queue_mqtt_writer.1"  # no partition's queue exists here
            refused_now = refused(lambda e=exchange, k=key, m=routed: publish(conn, e, k, mandatory=m))
            verb = "may not" if allowed else "may"
            assert refused_now != allowed, f"{account} {verb} publish {key!r} to {exchange!r}"


@pytest.mark.parametrize("account", ACCOUNTS)
def test_each_account_reads_declares_and_deletes_nothing_of_others(clean: PrivateRabbitMQ, account: str):
    own = {OWN_QUEUE[account], topology.lease_queue(OWN_QUEUE[account])} if account in OWN_QUEUE else set()
    if account == "emdc-writer":
        own.add(topology.status_queue(OWN_QUEUE[account]))
    with clean.connect(account) as conn:
        for q in QUEUES:
            if q in own:
                continue
            assert refused(lambda q=q: conn.channel().basic_get(q)), f"{account} consumed {q}"
            assert refused(lambda q=q: conn.channel().queue_purge(q)), f"{account} purged {q}"
            assert refused(lambda q=q: conn.channel().queue_bind(q, "EMDC", "pulse.#")), f"{account} bound {q}"
        for q in QUEUES:
            assert refused(lambda q=q: conn.channel().queue_delete(q)), f"{account} deleted {q}"
        assert refused(lambda: conn.channel().queue_declare(f"{account}-private"))
        assert refused(lambda: conn.channel().queue_declare("queue_mqtt_writer", durable=True))
        assert refused(lambda: conn.channel().exchange_declare("EMDC", "topic", durable=True))
        assert refused(lambda: conn.channel().exchange_declare(f"{account}-x", "topic"))
        assert refused(lambda: conn.channel().exchange_delete("EMDC.dead"))
        conn.channel().exchange_declare("EMDC", passive=True)  # a passive check, as the Pi may make, needs no right
    # No management tag: neither the UI nor the HTTP API takes these users.
    assert clean.api("GET", "whoami", account)[0] == 401
    assert clean.api("GET", "whoami")[0] == 200


def test_each_pi_publishes_only_its_own_meter(clean: PrivateRabbitMQ):
    for meter, other in (METERS, METERS[::-1]):
        with clean.connect(f"emdc-edge-{meter}") as conn:
            publish(conn, "EMDC", f"pulse.{meter}.active")
            assert publish_refused(conn, "EMDC", f"pulse.{other}.active")
            publish(conn, "EMDC", f"status.{meter}")
            assert publish_refused(conn, "EMDC", f"status.{other}")
    # Statuses reach the MQTT writer, which judges the edges' liveness; the database writer counts pulses only.
    assert [key for key, _ in take(clean, "queue_mqtt_writer")] == ["pulse.garage.active", "pulse.shed.active"]
    assert [key for key, _ in take(clean, "queue_mqtt_writer.status")] == ["status.garage", "status.shed"]
    assert len(take(clean, "queue_db_writer")) == 2
    # One Pi's password is no other account's.
    for user in ("emdc-edge-shed", "emdc-writer", "emdc-admin"):
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            clean.connect(user, clean.password("emdc-edge-garage"))


def test_the_broker_stamps_whom_a_message_is_from(clean: PrivateRabbitMQ):
    """``user_id`` is checked by the broker: a Pi can name only itself, so a writer may trust it."""
    with clean.connect("emdc-edge-garage") as conn:
        publish(conn, "EMDC", "pulse.garage.active", properties=pika.BasicProperties(user_id="emdc-edge-garage"))
        for other in ("emdc-edge-shed", "emdc-writer", "emdc-admin"):
            assert publish_refused(conn, "EMDC", "pulse.garage.active", code=406,
                                   properties=pika.BasicProperties(user_id=other))
    with clean.connect("emdc-admin") as conn:
        _method, properties, _body = conn.channel().basic_get("queue_mqtt_writer", auto_ack=True)
        assert properties.user_id == "emdc-edge-garage"


@pytest.mark.parametrize("size", [10 * 2**20, 100 * 2**20])
def test_the_broker_refuses_big_bodies_from_a_pi(clean: PrivateRabbitMQ, size: int):
    with clean.connect("emdc-edge-garage") as conn:
        assert publish_refused(conn, "EMDC", "pulse.garage.active", code=406, body=b"x" * size)
        limit = int(re.search(r"^max_message_size = (\d+)$", (COMPOSE / "rabbitmq/20-emdc.conf").read_text(),
                              re.M)[1])
        assert publish_refused(conn, "EMDC", "pulse.garage.active", code=406, body=b"x" * (limit + 1))
        publish(conn, "EMDC", "pulse.garage.active", body=b"x" * limit)  # the connection is still good
    assert [len(body) for _key, body in take(clean, "queue_mqtt_writer")] == [limit]


def test_writers_dead_letter_into_their_own_queue_only(clean: PrivateRabbitMQ):
    with clean.connect("emdc-writer") as conn:
        # As backend/amqp_consumer.py parks a refused message: to EMDC.dead, keyed by its own queue.
        publish(conn, "EMDC.dead", "queue_mqtt_writer", body="bad for mqtt")
        assert publish_refused(conn, "EMDC.dead", "queue_db_writer", body="forged for db")
    with clean.connect("emdc-db-writer") as conn:
        publish(conn, "EMDC.dead", "queue_db_writer", body="bad for db")
        assert publish_refused(conn, "EMDC.dead", "queue_mqtt_writer", body="forged for mqtt")
    assert take(clean, "queue_mqtt_writer.dead") == [("queue_mqtt_writer", b"bad for mqtt")]
    assert take(clean, "queue_db_writer.dead") == [("queue_db_writer", b"bad for db")]


def test_writers_consume_their_own_queue_and_rejections_dead_letter(clean: PrivateRabbitMQ):
    with clean.connect("emdc-edge-garage") as conn:
        publish(conn, "EMDC", "pulse.garage.active")
    for account, q in OWN_QUEUE.items():
        with clean.connect(account) as conn:
            channel = conn.channel()
            channel.queue_declare(q, passive=True)
            method, _properties, body = channel.basic_get(q)
            assert method is not None and body.decode() == PULSE
            channel.basic_reject(method.delivery_tag, requeue=False)  # the queue's own dead-letter arguments apply
        wait_until(lambda q=q: depth(clean, f"{q}.dead") == 1, 10, f"{q}'s rejection to dead-letter")


def test_only_one_writer_is_active_on_a_queue(clean: PrivateRabbitMQ):
    """x-single-active-consumer: a second consumer of the writer's account gets nothing while the first lives."""
    assert clean.queue("queue_mqtt_writer")["arguments"]["x-single-active-consumer"] is True
    assert clean.queue("queue_db_writer")["arguments"]["x-single-active-consumer"] is True
    got: dict[str, list[bytes]] = {"first": [], "second": []}
    with clean.connect("emdc-writer") as first, clean.connect("emdc-writer") as second:
        channels = {"first": first.channel(), "second": second.channel()}
        for name, channel in channels.items():
            channel.basic_consume("queue_mqtt_writer", lambda _c, m, _p, b, n=name: got[n].append(b), auto_ack=True)
        with clean.connect("emdc-edge-garage") as edge:
            for _ in range(5):
                publish(edge, "EMDC", "pulse.garage.active")

        def delivered() -> bool:
            for connection in (first, second):
                connection.process_data_events(time_limit=0.05)
            return len(got["first"]) + len(got["second"]) == 5
        wait_until(delivered, 10, "the pulses to be delivered")
        assert (len(got["first"]), len(got["second"])) == (5, 0)
        first.close()  # the active writer stops: the standby takes over
        with clean.connect("emdc-edge-garage") as edge:
            publish(edge, "EMDC", "pulse.garage.active")
        wait_until(lambda: second.process_data_events(time_limit=0.05) or got["second"], 10, "the standby to take over")


def test_each_writer_account_takes_its_own_writer_lease_only(clean: PrivateRabbitMQ):
    """The lease (an exclusive consumer on ``<queue>.active``) tells a standby writer that it is one."""
    for account, own in OWN_QUEUE.items():
        other = next(q for q in OWN_QUEUE.values() if q != own)
        with clean.connect(account) as active, clean.connect(account) as standby:
            active.channel().basic_consume(topology.lease_queue(own), lambda *_: None, exclusive=True)
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="in exclusive use"):
                standby.channel().basic_consume(topology.lease_queue(own), lambda *_: None, exclusive=True)
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="access to queue"):
                standby.channel().basic_consume(topology.lease_queue(other), lambda *_: None, exclusive=True)


def test_queues_are_capped_in_bytes(clean: PrivateRabbitMQ):
    applied = dict(line.split("\t") for line in clean.ctl("list_queues", "name", "policy").splitlines()[1:])
    caps = {}
    for q in QUEUES:
        status, policy = clean.api("GET", f"policies/%2F/{applied[q]}")
        assert status == 200 and policy["definition"]["max-length-bytes"] > 0, q
        caps[q] = policy["definition"]["max-length-bytes"]
    cap = caps["queue_db_writer.dead"]
    body = b"x" * 8192
    with clean.connect("emdc-db-writer") as conn:
        channel = conn.channel()
        for _ in range(cap // len(body) + 100):
            channel.basic_publish("EMDC.dead", "queue_db_writer", body)
        channel.confirm_delivery()
        channel.basic_publish("EMDC.dead", "queue_db_writer", body, mandatory=True)  # all before it are in
    assert 0 < depth(clean, "queue_db_writer.dead") <= cap // len(body)
    sizes = dict(line.split("\t") for line in clean.ctl("list_queues", "name", "message_bytes").splitlines()[1:])
    assert 0 < int(sizes["queue_db_writer.dead"]) <= cap


# ====================================================================== the real writer on the deployment's broker


def consumers_of(rabbit: PrivateRabbitMQ, queue: str) -> int:
    with rabbit.connect("emdc-admin") as conn:
        try:
            return int(conn.channel().queue_declare(queue, passive=True).method.consumer_count)
        except pika.exceptions.ChannelClosedByBroker:
            return 0


def deployment_writer(rabbit: PrivateRabbitMQ, names: Names, spawn: Callable[..., EmdcProcess], queue: str,
                      **env: object) -> EmdcProcess:
    """``emdc writer`` as compose runs it (the writer account, the broker's topology), publishing to the test
    Mosquitto under this test's prefix; started once it consumes ``queue``."""
    settings = {"EMDC_AMQP_URL": rabbit.url("emdc-writer", rabbit.password("emdc-writer")), "EMDC_EXCHANGE": "EMDC",
                "EMDC_QUEUE": "queue_mqtt_writer", "EMDC_DECLARE_TOPOLOGY": "false", "EMDC_METERS": ",".join(METERS),
                **env}
    writer = spawn(["writer"], writer_env(names, **settings), "writer")
    wait_until(lambda: writer.proc.poll() is not None or consumers_of(rabbit, queue) > 0, 60, "the writer to consume")
    assert writer.proc.poll() is None, writer.log()
    return writer


def pulses_of(meter: str, count: int, epoch: str = "e1") -> list[Pulse]:
    """``count`` plausible 1 Wh pulses of ``meter``, a second apart, the last one now."""
    now = time.time_ns()
    return [Pulse(meter, "active", epoch, seq, now - (count - seq) * S, 1.0) for seq in range(1, count + 1)]


def forged(key_meter: str, body: Pulse, key_channel: str = "active") -> tuple[str, bytes]:
    """``body`` published under the routing key of ``key_meter``/``key_channel``: what a Pi may send, naming
    another meter or channel inside."""
    return topology.pulse_routing_key(key_meter, key_channel), encode(body)


def dead_reasons(rabbit: PrivateRabbitMQ, queue: str) -> list[str]:
    """Why each message in ``queue`` (a dead-letter queue) was refused, as the writer says in its header."""
    reasons = []
    with rabbit.connect("emdc-admin") as conn:
        channel = conn.channel()
        while (message := channel.basic_get(queue, auto_ack=False))[0] is not None:
            reasons.append(str((message[1].headers or {}).get(topology.ERROR_HEADER)))
        channel.close()  # unacknowledged: they stay
    return reasons


def edge_publish(rabbit: PrivateRabbitMQ, user: str, messages: list[Pulse | tuple[str, bytes]],
                 password: str | None = None) -> None:
    with rabbit.connect(user, password) as conn:
        for message in messages:
            key, body = (message.routing_key, encode(message)) if isinstance(message, Pulse) else message
            publish(conn, "EMDC", key, body)


@pytest.fixture
def shared_edge(clean: PrivateRabbitMQ) -> Iterator[str]:
    """The shared edge user of earlier releases, rendered while its password file exists (as after an upgrade's
    first step); removed again afterwards. Yields its password."""
    assert clean.secrets is not None
    compose_dir = clean.secrets.parent.parent
    path = clean.secrets / render_secrets.SHARED_EDGE
    path.write_text(uuid.uuid4().hex + uuid.uuid4().hex + "\n")
    try:
        clean.ctl("import_definitions", str(render(compose_dir, compose_dir.parent / "with-shared.json")))
        yield path.read_text().strip()
    finally:
        path.unlink()
        clean.ctl("delete_user", render_secrets.SHARED_EDGE)


def test_a_body_naming_another_meter_than_its_key_is_dead_lettered_by_the_running_writer(
        clean: PrivateRabbitMQ, names: Names, spawn: Callable[..., EmdcProcess], shared_edge: str) -> None:
    """Each Pi's account (and the shared one of earlier releases) may publish its key; the writer refuses a body
    that names another meter or channel, so the per-Pi permission cannot be bypassed through the body."""
    watch = MqttWatcher(f"{names.prefix}/#")
    try:
        writer = deployment_writer(clean, names, spawn, "queue_mqtt_writer")
        genuine = pulses_of("garage", 5)
        shed = pulses_of("shed", 2, epoch="5e")
        hostile = [forged("garage", shed[0]),  # garage's Pi writing shed's total
                   forged("garage", Pulse("garage", "reactive", "e1", 1, genuine[0].ts_ns, 1.0))]
        edge_publish(clean, "emdc-edge-garage", [*genuine[:2], *hostile, *genuine[2:]])
        legacy = [forged("garage", shed[1]), forged("shed", genuine[4])]
        edge_publish(clean, render_secrets.SHARED_EDGE, legacy, shared_edge)
        watch.wait_for(f"{names.prefix}/garage/active_energy", lambda v: v == "0.005")
        try:
            wait_until(lambda: depth(clean, "queue_mqtt_writer.dead") == len(hostile) + len(legacy), 20,
                       "the forged messages to be dead-lettered")
        finally:
            reasons = dead_reasons(clean, "queue_mqtt_writer.dead")
        assert len(reasons) == 4 and all("does not match the body's meter and channel" in r for r in reasons), reasons
        assert writer.proc.poll() is None
        assert f"{names.prefix}/shed/active_energy" not in watch.values, "a forged body moved shed's total"
        assert f"{names.prefix}/garage/reactive_energy" not in watch.values
        assert writer.stop() == 0
        assert watch.values[f"{names.prefix}/garage/active_energy"] == "0.005"
    finally:
        watch.close()


def test_a_partitioned_writer_declares_and_consumes_its_partition_and_touches_nothing_else(
        clean: PrivateRabbitMQ, names: Names, spawn: Callable[..., EmdcProcess]) -> None:
    """With partitions the writers declare their own queues (the definitions cannot know the meters): the writer
    account may declare, bind and consume ``queue_mqtt_writer.<k>`` and its lease and dead letters, which the
    policies cap like the unpartitioned ones, and no other queue or exchange."""
    assert topology.partition_of("garage", 2) == 1 and topology.partition_of("main", 2) == 0
    queue = topology.partition_queue("queue_mqtt_writer", 1, 2)
    partition = (queue, topology.dead_letter_queue(queue), topology.lease_queue(queue))
    watch = MqttWatcher(f"{names.prefix}/#")
    try:
        writer = deployment_writer(clean, names, spawn, queue, EMDC_DECLARE_TOPOLOGY="true", EMDC_PARTITIONS=2,
                                   EMDC_PARTITION=1, EMDC_METERS="garage,main")
        genuine = pulses_of("garage", 3)
        edge_publish(clean, "emdc-edge-garage", [genuine[0], forged("garage", pulses_of("shed", 1)[0]), *genuine[1:]])
        watch.wait_for(f"{names.prefix}/garage/active_energy", lambda v: v == "0.003")
        wait_until(lambda: depth(clean, partition[1]) == 1, 20, "the forged pulse in the partition's dead letters")
        assert writer.proc.poll() is None
        applied = dict(line.split("\t") for line in clean.ctl("list_queues", "name", "policy").splitlines()[1:])
        assert [applied[q] for q in partition] == ["emdc-backlog-cap", "emdc-dead-letter-cap", "emdc-lease-cap"]
        with clean.connect("emdc-writer") as conn:
            for other in ("queue_db_writer.1", "queue_mqtt_writerx", "queue_mqtt_writer.1x", "queue_mqtt_writer"):
                assert refused(lambda q=other: conn.channel().queue_declare(q, durable=True)), f"declared {other}"
            for other in ("queue_db_writer", "queue_db_writer.dead", "queue_mqtt_writer.dead", partition[1]):
                assert refused(lambda q=other: conn.channel().basic_get(q)), f"consumed {other}"
            assert refused(lambda: conn.channel().queue_bind("queue_db_writer", "EMDC", "pulse.#"))
            assert refused(lambda: conn.channel().queue_bind(queue, "amq.topic", "#"))
            assert refused(lambda: conn.channel().exchange_delete("EMDC"))
            assert refused(lambda: conn.channel().exchange_declare("EMDC", "topic", durable=True))
            assert refused(lambda: conn.channel().queue_delete("queue_mqtt_writer"))
            assert publish_refused(conn, "EMDC.dead", "queue_db_writer")
        with clean.connect("emdc-db-writer") as conn:
            assert refused(lambda: conn.channel().basic_get(queue))
            assert refused(lambda: conn.channel().queue_declare("queue_db_writer.1", durable=True))
        assert writer.stop() == 0
        assert watch.values[f"{names.prefix}/garage/active_energy"] == "0.003"
    finally:
        watch.close()
        with clean.connect("emdc-admin") as conn:
            for q in partition:
                conn.channel().queue_delete(q)


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set (VmHWM), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB$", status, re.M)[1])


def writer_peak_over_a_backlog(rabbit: PrivateRabbitMQ, names: Names, spawn: Callable[..., EmdcProcess],
                               label: str, body: bytes, count: int) -> int:
    """Queue ``count`` copies of ``body`` on ``pulse.garage.active`` between 5 genuine pulses of garage, let a
    fresh writer drain it all, and return its peak RSS in KiB; the genuine total must come out exact."""
    for q in QUEUES:
        with rabbit.connect("emdc-admin") as conn:
            conn.channel().queue_purge(q)
    genuine = pulses_of("garage", 5)
    with rabbit.connect("emdc-edge-garage") as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=2)
        for i in range(count):
            if i % (count // 4) == 0:
                channel.basic_publish("EMDC", genuine[i * 4 // count].routing_key, encode(genuine[i * 4 // count]),
                                      props)
            channel.basic_publish("EMDC", "pulse.garage.active", body, props)
        channel.basic_publish("EMDC", genuine[4].routing_key, encode(genuine[4]), props)
    assert depth(rabbit, "queue_mqtt_writer") == count + 5
    prefix = f"{names.prefix}/{label}"
    watch = MqttWatcher(f"{prefix}/#")
    try:
        writer = deployment_writer(rabbit, names, spawn, "queue_mqtt_writer", EMDC_TOPIC_PREFIX=prefix,
                                   EMDC_STATE_DIR=names.writer_dir / label)
        watch.wait_for(f"{prefix}/garage/active_energy", lambda v: v == "0.005", 60)
        wait_until(lambda: depth(rabbit, "queue_mqtt_writer.dead") == count, 60, "the backlog to be dead-lettered")
        assert writer.proc.poll() is None
        peak = peak_rss_kib(writer.proc.pid)
        assert writer.stop() == 0
        assert watch.values[f"{prefix}/garage/active_energy"] == "0.005"
    finally:
        watch.close()
    return peak


def test_the_writers_memory_does_not_grow_with_the_size_of_what_is_queued(
        clean: PrivateRabbitMQ, names: Names, spawn: Callable[..., EmdcProcess]) -> None:
    """3,000 bodies of the broker's largest size (24 MiB queued) against as many of 100 bytes: the writer holds
    at most a prefetch of them (``batch_size`` x ``max_message_size``, 4 MiB), so its peak RSS stays within
    that and some headroom of the small run's, far below what was queued."""
    limit = int(re.search(r"^max_message_size = (\d+)$", (COMPOSE / "rabbitmq/20-emdc.conf").read_text(), re.M)[1])
    count = 3000
    small = writer_peak_over_a_backlog(clean, names, spawn, "small", b"x" * 100, count)
    big = writer_peak_over_a_backlog(clean, names, spawn, "big", b"x" * limit, count)
    queued_kib = count * limit // 1024
    prefetch_kib = 500 * limit // 1024
    assert big - small <= 2 * prefetch_kib + 8 * 1024, (
        f"peak RSS {big} KiB with {queued_kib} KiB queued, {small} KiB with small bodies")
    assert big - small < queued_kib / 2


# ====================================================================== upgrade of an earlier install


def legacy(definitions: dict[str, Any]) -> dict[str, Any]:
    """The same definitions as the earlier layout had them: direct dead-letter exchange, no single active consumer."""
    old = json.loads(json.dumps(definitions))
    for exchange in old["exchanges"]:
        if exchange["name"] == "EMDC.dead":
            exchange["type"] = "direct"
    for q in old["queues"]:
        q["arguments"].pop("x-single-active-consumer", None)
    old["topic_permissions"] = [p for p in old["topic_permissions"] if p["exchange"] != "EMDC.dead"]
    return old


def test_upgrade_of_an_install_with_one_shared_edge_user(tmp_path: Path):
    """The steps of docs/security.md, "Upgrade": nothing a Pi sent is lost, the old weaknesses are gone."""
    compose_dir = tmp_path / "compose"
    shutil.copytree(COMPOSE, compose_dir, ignore=shutil.ignore_patterns(".env", "secrets"))
    old_env = {var: uuid.uuid4().hex for var in render_secrets.LEGACY_VARIABLES}
    (compose_dir / ".env").write_text("RABBITMQ_HOST=rabbitmq\n" + "".join(f"{k}={v}\n" for k, v in old_env.items()))
    # 1. init moves the passwords into files; the shared user stays (its file exists) and still works.
    assert render_secrets.main(["init"], compose_dir=compose_dir) == 0
    definitions = render(compose_dir, tmp_path / "definitions.json")
    definitions.write_text(json.dumps(legacy(json.loads(definitions.read_text()))))
    broker = PrivateRabbitMQ(tmp_path / "rabbitmq", compose_dir / "secrets/rabbitmq")
    try:
        broker.start(definitions)  # the broker as the earlier release left it
        wait_until(lambda: broker.api("GET", "queues/%2F/queue_mqtt_writer")[0] == 200, 60, "the definitions")
        assert "x-single-active-consumer" not in broker.queue("queue_mqtt_writer")["arguments"]
        with broker.connect("emdc-edge", old_env["RABBITMQ_EDGE_PASSWORD"]) as conn:
            publish(conn, "EMDC", "pulse.shed.active")  # the weakness: any meter
        with broker.connect("emdc-writer") as conn:
            publish(conn, "EMDC.dead", "queue_db_writer")  # and into the other writer's dead letters

        # 2. A user per Pi, loaded without a restart; each Pi is switched to its own URL.
        assert render_secrets.main(["add-edge", "garage", "--host", "h"], compose_dir=compose_dir) == 0
        broker.ctl("import_definitions", str(render(compose_dir, definitions)))
        with broker.connect("emdc-edge-garage") as conn:
            publish(conn, "EMDC", "pulse.garage.active")
            assert publish_refused(conn, "EMDC", "pulse.shed.active")

        # 3. The queues and the dead-letter exchange, re-created: unbind (the Pis keep their pulses while
        # nothing is bound), let the writers drain, delete, re-import.
        with broker.connect("emdc-edge-garage") as conn:
            publish(conn, "EMDC", "pulse.garage.active")
        for q, key in (("queue_mqtt_writer", "pulse.%23"), ("queue_mqtt_writer", "control.%23"),
                       ("queue_db_writer", "pulse.%23")):
            assert broker.api("DELETE", f"bindings/%2F/e/EMDC/q/{q}/{key}")[0] == 204
        # Unroutable: the Pi keeps it in its outbox, and retries.
        with broker.connect("emdc-edge-garage") as conn, pytest.raises(pika.exceptions.UnroutableError):
            publish(conn, "EMDC", "pulse.garage.active")
        for q in ("queue_mqtt_writer", "queue_db_writer"):  # what the writers drain before they stop
            assert [key for key, _ in take(broker, q)] == ["pulse.shed.active", "pulse.garage.active",
                                                           "pulse.garage.active"], q
        for q in ("queue_mqtt_writer", "queue_db_writer"):
            broker.ctl("delete_queue", q)
        assert broker.api("DELETE", "exchanges/%2F/EMDC.dead")[0] == 204
        broker.ctl("import_definitions", str(definitions))
        for q in ("queue_mqtt_writer", "queue_db_writer"):
            assert broker.queue(q)["arguments"]["x-single-active-consumer"] is True
        status, exchange = broker.api("GET", "exchanges/%2F/EMDC.dead")
        assert status == 200 and exchange["type"] == "topic"
        assert depth(broker, "queue_db_writer.dead") == 1, "dead letters survive the upgrade"
        with broker.connect("emdc-edge-garage") as conn:
            publish(conn, "EMDC", "pulse.garage.active")  # the Pi's retry routes again
        with broker.connect("emdc-writer") as conn:
            assert publish_refused(conn, "EMDC.dead", "queue_db_writer")

        # 4. The shared user goes: its file, then the broker's user (an import never deletes).
        (compose_dir / "secrets/rabbitmq/emdc-edge").unlink()
        broker.ctl("import_definitions", str(render(compose_dir, definitions)))
        broker.ctl("delete_user", "emdc-edge")
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            broker.connect("emdc-edge", old_env["RABBITMQ_EDGE_PASSWORD"])
        assert "emdc-edge" not in {user["name"] for user in json.loads(definitions.read_text())["users"]}
    finally:
        broker.stop()


def test_emdc_doctor_tells_what_each_account_may_do(clean: PrivateRabbitMQ, names: Names) -> None:
    def env(user: str, **extra: object) -> dict[str, str]:
        url = f"amqp://{user}:{clean.password(user)}@127.0.0.1:{clean.port}/%2F"
        return edge_env(names, EMDC_AMQP_URL=url, EMDC_EXCHANGE="EMDC", EMDC_QUEUE="queue_mqtt_writer",
                        EMDC_DECLARE_TOPOLOGY="false", EMDC_METER_ID="garage", **extra)

    status, lines = doctor(env("emdc-edge-garage"), "--edge")
    assert status == 0, lines
    assert "✓ publish pulse.garage.active: permitted on exchange EMDC (probe rolled back, nothing delivered)" in lines
    assert "✓ publish status.garage: permitted on exchange EMDC (probe rolled back, nothing delivered)" in lines
    assert depth(clean, "queue_mqtt_writer") == 0

    status, lines = doctor(env("emdc-edge-shed"), "--edge")
    assert status == 1
    assert failures(lines)[0].startswith("✗ publish pulse.garage.active: RabbitMQ refused it (ACCESS_REFUSED - "
                                         "access to topic 'pulse.garage.active' in exchange 'EMDC'")

    status, lines = doctor(env("emdc-db-writer", EMDC_DISCOVERY="off"), "--db-writer")
    assert status == 0, lines
    assert "✓ consume queue_db_writer: permitted; 0 message(s) waiting, 0 consumer(s)" in lines
    status, lines = doctor(env("emdc-db-writer", EMDC_DISCOVERY="off"), "--writer")
    assert status == 1
    assert failures(lines)[0].startswith(
        "✗ consume queue_mqtt_writer: RabbitMQ refused it (ACCESS_REFUSED - access to queue 'queue_mqtt_writer' in "
        "vhost '/' refused for user 'emdc-db-writer'). Fix: give the account read permission on queue_mqtt_writer")
