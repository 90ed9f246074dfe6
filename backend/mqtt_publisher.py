"""Publish the writer's values to Mosquitto with paho-mqtt 2.x.

Values are retained at QoS 1. While the broker is unreachable nothing is
queued in memory (the state file, not paho's queue, is what survives); after
every (re)connect the owner re-publishes the current values, which is
signalled through :meth:`MqttPublisher.take_republish` so that all ledger
access stays on the writer's own thread. The same happens, after a short
random delay, when Home Assistant announces itself with its birth message.

Mosquitto drops a publish its ACL denies without telling the client. So the
publisher sends itself a message on ``<topic_prefix>/echo`` after every
connect, and on ``<discovery_prefix>/echo`` unless discovery is off (no
discovery config, so Home Assistant ignores it), and watches for each to
come back (:class:`EchoWatch`); if one does not, :meth:`MqttPublisher.trouble`
says so. :meth:`MqttPublisher.delivered` sends both again and waits for them:
the broker delivers a client's messages in order, so once they are back,
everything published before them has arrived. The topic_prefix echo also marks the end of the
retained messages of a scan (:meth:`MqttPublisher.scan_retained`): the broker
sends a subscription's retained messages before anything published later.
:meth:`MqttPublisher.hold` keeps a topic's next values back for a moment, so
that a subscriber arriving late (Home Assistant setting up a sensor it has just
discovered) still finds the value before them retained.

Example::

    mqtt = MqttPublisher(config, client_name="emdc-writer")
    mqtt.start()
    mqtt.publish("home/energy/active_energy", "1.234")
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from backend.topics import availability_topic, echo_topic
from common.config import Config

log = logging.getLogger("emdc.mqtt")
UNREACHABLE = "cannot reach the MQTT broker"
# How long the writer's own message may take to come back before the broker counts as dropping it.
ECHO_TIMEOUT_S = 5.0
# How long Home Assistant may take, after discovering a sensor, to subscribe to its state topic.
SETTLE_S = 3.0


class MqttFailure(RuntimeError):
    """A one-shot publication failed; the message names the broker, the reason and the fix."""


def acl_trouble(config: Config, setting: str = "topic_prefix") -> str:
    """The one line for publishes the broker drops under the prefix ``setting`` names: the topic, the ACL and
    the fix."""
    who = f"user {config.mqtt_username!r}" if config.mqtt_username else "anonymous clients"
    prefix = getattr(config, setting)
    return (f"the MQTT broker {config.mqtt_host}:{config.mqtt_port} drops what is published on "
            f"{echo_topic(prefix)} (nothing came back): its ACL does not let {who} read and write "
            f"{setting} {prefix!r}; add 'topic readwrite {prefix}/#' for that user to the ACL, or set {setting} "
            "to a topic it allows")


def echo_settings(config: Config) -> dict[str, str]:
    """Echo topic -> the setting of the prefix it proves: topic_prefix, and discovery_prefix unless discovery
    is off.

    >>> from common.config import load_config
    >>> echo_settings(load_config(env={}))
    {'home/energy/echo': 'topic_prefix', 'homeassistant/echo': 'discovery_prefix'}
    """
    settings = {echo_topic(config.topic_prefix): "topic_prefix"}
    if config.discovery != "off":
        settings.setdefault(echo_topic(config.discovery_prefix), "discovery_prefix")
    return settings


class EchoWatch:
    """Whether the messages a client sends itself come back in time: the only sign of an ACL that drops them.

    Example::

        >>> echo = EchoWatch(timeout_s=5)
        >>> echo.sent(now=100.0)
        >>> echo.lost(now=104.0), echo.lost(now=106.0)
        (False, True)
        >>> echo.sent(now=110.0)  # still waiting for the first one
        >>> echo.came_back()
        >>> echo.lost(now=200.0)
        False
    """

    def __init__(self, timeout_s: float = ECHO_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._waiting_since: float | None = None

    def sent(self, now: float) -> None:
        if self._waiting_since is None:
            self._waiting_since = now

    def came_back(self) -> None:
        """An echo arrived (or the connection is new): nothing is outstanding."""
        self._waiting_since = None

    def lost(self, now: float) -> bool:
        return self._waiting_since is not None and now - self._waiting_since > self.timeout_s


class RetainedScan:
    """The retained messages on some topic filters, collected until the client's own echo ``token`` arrives on
    ``echo``: the broker sends a subscription's retained messages before anything published after it."""

    def __init__(self, filters: Sequence[str], echo: str, token: str) -> None:
        self.filters = list(filters)
        self.echo = echo
        self.token = token
        self.found: dict[str, str] = {}
        self.done = threading.Event()

    def offer(self, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.echo:
            if message.payload == self.token.encode():
                self.done.set()
        elif message.retain and any(mqtt.topic_matches_sub(f, message.topic) for f in self.filters):
            self.found[message.topic] = message.payload.decode(errors="replace")


def new_client(config: Config, name: str) -> mqtt.Client:
    """A paho client with the configured credentials and TLS, and a unique client id."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{secrets.token_hex(4)}")
    if config.mqtt_username:
        client.username_pw_set(config.mqtt_username, config.mqtt_password or None)
    if config.mqtt_tls:
        client.tls_set(ca_certs=config.mqtt_ca_file or None, certfile=config.mqtt_cert_file or None,
                       keyfile=config.mqtt_key_file or None)
    return client


class MqttPublisher:
    """A paho client that publishes retained values and an availability topic with a last will."""

    def __init__(self, config: Config, client_name: str = "emdc-writer") -> None:
        self.config = config
        self.availability = availability_topic(config.topic_prefix, config.partition_label())
        self.connected = threading.Event()
        self._republish_at: float | None = None
        self._lock = threading.Lock()
        self._extra_subscriptions: dict[str, Any] = {}
        self.client = new_client(config, client_name)
        self.echo_topic = echo_topic(config.topic_prefix)
        self._echo_id = secrets.token_hex(6)  # tells this client's echoes from those of another one
        self._echo_count = itertools.count(1)  # next() on it is atomic: both the paho and the writer thread use it
        self._echo_settings = echo_settings(config)
        self._echoes = {topic: EchoWatch() for topic in self._echo_settings}
        self._echo = self._echoes[self.echo_topic]
        self._returned: collections.deque[str] = collections.deque(maxlen=64)  # the latest echoes back
        self._echo_back = threading.Condition(self._lock)
        self._scan: RetainedScan | None = None
        self._scan_lock = threading.Lock()
        self._held: dict[str, tuple[float, tuple[str, bool] | None]] = {}  # topic -> (until, what to publish)
        self.client.will_set(self.availability, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._where = f"{config.mqtt_host}:{config.mqtt_port}"
        # Why values cannot reach the broker; "" while connected.
        self._trouble = f"not connected to the MQTT broker {self._where} yet"

    def trouble(self) -> str:
        """Why values do not reach the broker right now, or ``""``: the writer's health check reads it, because
        a writer that counts while Home Assistant receives nothing is not healthy."""
        with self._lock:
            lost = [topic for topic, echo in self._echoes.items() if echo.lost(time.monotonic())]
            if not self._trouble and lost:
                self._trouble = acl_trouble(self.config, self._echo_settings[lost[0]])
                log.error("%s", self._trouble)
            return self._trouble

    def delivered(self, timeout_s: float = ECHO_TIMEOUT_S) -> str:
        """Whether what was published so far reached the broker's subscribers: ``""``, or why not.

        Sends an echo under every watched prefix (after what is held back) and waits for them to come back:
        the broker delivers a client's messages in order. For a one-shot run (``emdc simulate``) that must
        not say done before its values arrived.
        """
        self._release(everything=True)
        if not self.connected.is_set():
            return self.trouble() or f"not connected to the MQTT broker {self._where}"
        tokens = {topic: self._echo_token() for topic in self._echoes}
        for topic, token in tokens.items():
            self._send_echo(token, topic)
        deadline = time.monotonic() + timeout_s
        with self._echo_back:
            while (missing := [t for t, token in tokens.items() if token not in self._returned]) and \
                    (left := deadline - time.monotonic()) > 0:
                self._echo_back.wait(left)
        if not missing:
            return ""
        return self.trouble() or acl_trouble(self.config, self._echo_settings[missing[0]])

    def _in_trouble(self, why: str) -> None:
        """One log line when values stop reaching the broker, or when the reason changes."""
        if why != self._trouble:
            log.warning("%s; values are published again once it is back", why)
        self._trouble = why

    def request_republish(self, delay_s: float = 0.0) -> None:
        """Ask the owner to re-publish everything after ``delay_s`` (thread-safe)."""
        with self._lock:
            due = time.monotonic() + delay_s
            self._republish_at = due if self._republish_at is None else min(self._republish_at, due)

    def take_republish(self) -> bool:
        """True once when a requested re-publication is due."""
        with self._lock:
            if self._republish_at is None or time.monotonic() < self._republish_at:
                return False
            self._republish_at = None
            return True

    def on_home_assistant_birth(self, payload: bytes) -> None:
        """Home Assistant (re)started: re-announce after a random delay, so many devices don't answer at once."""
        if payload == b"online":
            self.request_republish(random.uniform(0, self.config.ha_birth_delay_s))

    def subscribe(self, topic: str, callback: Any) -> None:
        """Call ``callback(payload: bytes)`` for messages on ``topic`` (renewed on every connect)."""
        self._extra_subscriptions[topic] = callback
        if self.connected.is_set():
            self.client.subscribe(topic, qos=1)

    def start(self) -> None:
        self.client.connect_async(self.config.mqtt_host, self.config.mqtt_port, self.config.mqtt_keepalive)
        self.client.loop_start()

    def publish(self, topic: str, payload: str, retain: bool = True) -> bool:
        """Publish retained at QoS 1; False if not connected (then nothing is sent: the owner re-publishes
        everything after the next connect). On a held topic the payload waits for the end of the hold."""
        if not self.connected.is_set():
            return False
        with self._lock:
            if topic in self._held:
                self._held[topic] = (self._held[topic][0], (payload, retain))
                return True
        self.client.publish(topic, payload, qos=1, retain=retain)
        return True

    def hold(self, topic: str, seconds: float = SETTLE_S) -> None:
        """Hold back what is published on ``topic`` for ``seconds`` (the last payload wins): a sensor's first
        total right after its 0, so that Home Assistant, still setting the sensor up when both arrive, finds
        the 0 retained when it subscribes and takes it as the zero point."""
        with self._lock:
            self._held.setdefault(topic, (time.monotonic() + seconds, None))
        timer = threading.Timer(seconds, self._release)
        timer.daemon = True
        timer.start()

    def _release(self, everything: bool = False) -> None:
        """Publish what waits on the topics whose hold is over (all of them with ``everything``)."""
        now = time.monotonic()
        with self._lock:
            due = [topic for topic, (until, _) in self._held.items() if everything or until <= now + 0.05]
            waiting = [self._held.pop(topic)[1] for topic in due]
        for topic, pending in zip(due, waiting, strict=True):
            if pending is not None and self.connected.is_set():
                self.client.publish(topic, pending[0], qos=1, retain=pending[1])

    def scan_retained(self, filters: Sequence[str]) -> dict[str, str] | None:
        """The retained messages on ``filters`` now (topic → payload); None if that cannot be known (not
        connected, or the broker drops the echo that ends the scan)."""
        if not filters:
            return {}  # an empty SUBSCRIBE is a protocol error: the broker would drop the connection
        if not self.connected.is_set() or self._echo.lost(time.monotonic()):
            return None
        with self._scan_lock:
            self._scan = scan = RetainedScan(filters, self.echo_topic, self._echo_token())
            try:
                self.client.subscribe([(f, 1) for f in filters])
                self._send_echo(scan.token)
                complete = scan.done.wait(self._echo.timeout_s)
                self.client.unsubscribe(list(filters))
            finally:
                self._scan = None
        return scan.found if complete else None

    def _echo_token(self) -> str:
        return f"{self._echo_id} {next(self._echo_count)}"

    def _send_echo(self, token: str, topic: str | None = None) -> None:
        topic = topic or self.echo_topic
        with self._lock:
            self._echoes[topic].sent(time.monotonic())
        self.client.publish(topic, token, qos=1, retain=False)

    def stop(self) -> None:
        """Say ``offline`` and disconnect cleanly."""
        self._release(everything=True)
        connected = self.connected.is_set()
        self.connected.clear()  # from here on a disconnect is ours, not worth a warning
        if connected:
            # The link may drop meanwhile; the last will then says offline for us.
            with contextlib.suppress(RuntimeError, ValueError):
                self.client.publish(self.availability, "offline", qos=1, retain=True).wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._in_trouble(f"the MQTT broker {self._where} refused the connection: {reason} "
                             "(check mqtt_username and mqtt_password)")
            return
        log.info("connected to MQTT broker %s", self._where)
        with self._lock:
            self._trouble = ""
            for echo in self._echoes.values():
                echo.came_back()
        self.connected.set()
        client.publish(self.availability, "online", qos=1, retain=True)
        for topic in [*self._extra_subscriptions, *self._echoes]:
            client.subscribe(topic, qos=1)
        for topic in self._echoes:
            self._send_echo(self._echo_token(), topic)
        self.request_republish()

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        if not self._trouble.startswith(UNREACHABLE):  # one probe for the reason per outage, not per retry
            self._in_trouble(f"{UNREACHABLE} {self._where} ({connect_failure(self.config)})")

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self.connected.is_set():
            self._in_trouble(f"lost the MQTT broker {self._where} ({reason})")
        self.connected.clear()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        scan = self._scan
        if scan is not None:
            scan.offer(message)
        if message.topic in self._echoes:
            self._echo_came_back(message.topic, message.payload)
            return
        callback = self._extra_subscriptions.get(message.topic)
        if callback:
            callback(message.payload)

    def _echo_came_back(self, topic: str, payload: bytes | bytearray) -> None:
        if not payload.startswith(f"{self._echo_id} ".encode()):
            return  # another client with the same prefix
        with self._lock:
            self._echoes[topic].came_back()
            self._returned.append(payload.decode(errors="replace"))
            self._echo_back.notify_all()
            if self._trouble == acl_trouble(self.config, self._echo_settings[topic]):
                log.info("the MQTT broker %s delivers what is published on %s again", self._where, topic)
                self._trouble = ""


def connect_failure(config: Config) -> str:
    """Why a TCP connection to the MQTT broker fails right now (paho does not say): for the log line."""
    try:
        with socket.create_connection((config.mqtt_host, config.mqtt_port), timeout=5):
            return "connected at TCP, then failed: TLS or the MQTT handshake"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def publish_once(config: Config, filters: Sequence[str],
                 decide: Callable[[dict[str, str]], list[tuple[str, str]]], timeout_s: float = 10.0) -> int:
    """Connect, scan the retained messages on ``filters``, publish what ``decide`` makes of them (retained,
    QoS 1), wait for the broker's acks, disconnect; return how many were published.

    Deliberately a separate client without a last will, so it can run beside
    a writer without touching the writer's availability. Raises MqttFailure
    (naming the ACL if the echo that ends the scan never comes back), or
    OSError if the broker cannot be reached.
    """
    client = new_client(config, "emdc-cli")
    echo = echo_topic(config.topic_prefix)
    scan = RetainedScan(filters, echo, secrets.token_hex(6))
    client.on_message = lambda _c, _u, message: scan.offer(message)
    answers: list[Any] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: answers.append(reason)
    client.connect(config.mqtt_host, config.mqtt_port, config.mqtt_keepalive)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout_s
        while not answers and time.monotonic() < deadline:
            time.sleep(0.01)
        if not answers or answers[0].is_failure:
            reason = answers[0] if answers else f"no answer in {timeout_s:.0f} s"
            raise MqttFailure(f"the MQTT broker {config.mqtt_host}:{config.mqtt_port} refused the connection: "
                              f"{reason} (check mqtt_username and mqtt_password)")
        client.subscribe([(echo, 1), *((f, 1) for f in filters)])
        client.publish(echo, scan.token, qos=1, retain=False)
        if not scan.done.wait(ECHO_TIMEOUT_S):
            raise MqttFailure(acl_trouble(config))
        messages = decide(scan.found)
        infos = [client.publish(topic, payload, qos=1, retain=True) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=timeout_s)
            if not info.is_published():
                raise MqttFailure(f"the MQTT broker {config.mqtt_host}:{config.mqtt_port} did not acknowledge "
                                  f"{len(messages)} messages in {timeout_s:g} s")
        return len(messages)
    finally:
        client.disconnect()
        client.loop_stop()
