"""``emdc doctor``'s checks for the server: may the account consume its queue, and do values reach MQTT.

The queue check declares the queue passively (it must exist; RabbitMQ asks
no permission for that), then starts a consumer with a prefetch of one and
cancels it at once, because only ``basic.consume`` shows the read
permission. If a message arrives meanwhile it is not acknowledged: closing
the channel returns it to the queue, and a writer counts it then (pulses
are counted by their sequence number, so the order they arrive in does not
matter).

Mosquitto drops a publish its ACL denies without telling the client, so the
MQTT checks subscribe to a probe topic under each prefix the writer
publishes to (``<prefix>/emdc-doctor/<random>``), publish one non-retained
message there and wait for it to come back. A refused subscription or no
echo within :data:`ECHO_TIMEOUT_S` means the ACL does not let this user use
that prefix. Home Assistant ignores the probe topics: they are no discovery
config and no state topic.
"""

from __future__ import annotations

import queue
import secrets
import socket
import ssl
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from common.config import Config
from common.doctor import Check, CheckFunction, RabbitMQ, bad, good

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

ECHO_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0


def queue_consume(config: Config, rabbit: RabbitMQ, queue_name: str, setting: str) -> Check | None:
    """Does ``queue_name`` exist, and may this account consume it?"""
    import pika.exceptions

    if rabbit.connection is None:
        return None
    name = f"consume {queue_name}"
    channel = rabbit.connection.channel()
    try:
        declared = channel.queue_declare(queue_name, passive=True).method
        channel.basic_qos(prefetch_count=1)
        channel.basic_cancel(channel.basic_consume(queue_name, on_message_callback=lambda *_args: None))
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return bad(name, f"the queue does not exist ({exc.reply_text})",
                       f"start the writer once with declare_topology = true, load the broker definitions, or "
                       f"correct {setting}")
        return bad(name, f"RabbitMQ refused it ({exc.reply_text})",
                   f"give the account read permission on {queue_name} "
                   "(deploy/compose/rabbitmq/definitions.template.json), or correct the user in amqp_url")
    channel.close()  # returns a message that arrived meanwhile to the queue
    return good(name, f"permitted; {declared.message_count} message(s) waiting, "
                      f"{declared.consumer_count} consumer(s)")


def mqtt_failure(config: Config, error: OSError) -> tuple[str, str]:
    """What a failure to connect to Mosquitto means and how to fix it."""
    where = f"{config.mqtt_host}:{config.mqtt_port}"
    if isinstance(error, ConnectionRefusedError):
        return f"{where} refused the connection", "start Mosquitto, or correct mqtt_host and mqtt_port"
    if isinstance(error, socket.gaierror):
        return (f"the host name {config.mqtt_host!r} does not resolve ({error.strerror})",
                "correct mqtt_host, or check DNS on this machine")
    if isinstance(error, ssl.SSLError | ssl.CertificateError):
        return (f"TLS with {where} failed ({error})",
                "use mqtt_tls only with the broker's TLS port (8883), and set mqtt_ca_file to the CA that signed "
                "its certificate")
    if isinstance(error, TimeoutError):
        return f"no answer from {where}", "check mqtt_host, mqtt_port and any firewall between here and the broker"
    return f"cannot connect to {where} ({error.strerror or error})", "check mqtt_host and mqtt_port"


class Mqtt:
    """One MQTT connection for the MQTT checks: :meth:`login`, then :meth:`echo` for each prefix."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.client: mqtt.Client | None = None
        self._connack: queue.Queue[Any] = queue.Queue()
        self._subacks: queue.Queue[list[Any]] = queue.Queue()
        self._messages: queue.Queue[tuple[str, bytes | bytearray]] = queue.Queue()
        self._user = config.mqtt_username or "anonymous"

    def __enter__(self) -> Mqtt:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def login(self) -> Check:
        """Connect with the configured credentials and TLS."""
        from backend.mqtt_publisher import new_client

        where = f"{self.config.mqtt_host}:{self.config.mqtt_port}"
        client = new_client(self.config, "emdc-doctor")
        client.on_connect = lambda _c, _u, _flags, reason, _props: self._connack.put(reason)
        client.on_subscribe = lambda _c, _u, _mid, reasons, _props: self._subacks.put(list(reasons))
        client.on_message = lambda _c, _u, message: self._messages.put((message.topic, message.payload))
        try:
            client.connect(self.config.mqtt_host, self.config.mqtt_port, keepalive=60)
        except OSError as exc:  # refused, DNS, TLS (ssl.SSLError is an OSError)
            what, fix = mqtt_failure(self.config, exc)
            return bad("MQTT", what, fix)
        client.loop_start()
        self.client = client
        try:
            reason = self._connack.get(timeout=CONNECT_TIMEOUT_S)
        except queue.Empty:
            return bad("MQTT", f"{where} accepted TCP but sent no MQTT answer in {CONNECT_TIMEOUT_S:g} s",
                       "correct mqtt_port (is it another service's?) and mqtt_tls")
        if reason.is_failure:
            self.client = None
            client.loop_stop()
            return bad("MQTT", f"{where} refused user {self._user} ({reason})",
                       "correct mqtt_username and mqtt_password (the broker's password file must list the user)")
        return good("MQTT", f"logged in at {where} as {self._user}")

    def echo(self, setting: str, prefix: str) -> Check | None:
        """Subscribe to a probe topic under ``prefix``, publish to it, and wait for the message to come back."""
        client = self.client
        if client is None:
            return None
        name = f"MQTT {setting}"
        token = secrets.token_hex(6)
        topic = f"{prefix}/emdc-doctor/{token}"
        acl = (f"allow user {self._user} `topic readwrite {prefix}/#` in Mosquitto's ACL "
               f"(deploy/compose/mosquitto/config/acl), or set {setting} to a prefix the ACL allows")
        client.subscribe(topic, qos=1)
        try:
            granted = self._subacks.get(timeout=ECHO_TIMEOUT_S)
        except queue.Empty:
            return bad(name, f"no answer to a subscription to {topic} in {ECHO_TIMEOUT_S:g} s", acl)
        if any(code.is_failure for code in granted):
            return bad(name, f"the broker refused a subscription to {topic}", acl)
        client.publish(topic, token, qos=1, retain=False)
        echoed = self._wait_for(topic, ECHO_TIMEOUT_S)
        client.unsubscribe(topic)
        if not echoed:
            return bad(name, f"a message published to {topic} did not come back in {ECHO_TIMEOUT_S:g} s: the "
                             f"broker's ACL drops what user {self._user} publishes or reads there", acl)
        return good(name, f"published to {topic} and received it back")

    def _wait_for(self, topic: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                got, _payload = self._messages.get(timeout=left)
            except queue.Empty:
                return False
            if got == topic:
                return True
        return False


def writer_checks(config: Config, rabbit: RabbitMQ, mqtt: Mqtt) -> list[CheckFunction]:
    """The MQTT writer's checks, in the order they are shown."""
    checks: list[CheckFunction] = [partial(queue_consume, config, rabbit, config.writer_queue(), "queue"), mqtt.login,
                                   partial(mqtt.echo, "topic_prefix", config.topic_prefix)]
    if config.discovery != "off":
        checks.append(partial(mqtt.echo, "discovery_prefix", config.discovery_prefix))
    return checks


def db_writer_checks(config: Config, rabbit: RabbitMQ) -> list[CheckFunction]:
    """The database writer's checks."""
    return [partial(queue_consume, config, rabbit, config.db_queue, "db_queue")]
