"""Publish the writer's values to Mosquitto with paho-mqtt 2.x.

Values are retained at QoS 1. While the broker is unreachable nothing is
queued in memory (the state file, not paho's queue, is what survives); after
every (re)connect the owner re-publishes the current values, which is
signalled through :meth:`MqttPublisher.take_republish` so that all ledger
access stays on the writer's own thread. The same happens, after a short
random delay, when Home Assistant announces itself with its birth message.

Example::

    mqtt = MqttPublisher(config, client_name="emdc-writer")
    mqtt.start()
    mqtt.publish("home/energy/active_energy", "1.234")
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from backend.topics import availability_topic
from common.config import Config

log = logging.getLogger("emdc.mqtt")
UNREACHABLE = "cannot reach the MQTT broker"


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
        self.availability = availability_topic(config.topic_prefix)
        self.connected = threading.Event()
        self._republish_at: float | None = None
        self._lock = threading.Lock()
        self._extra_subscriptions: dict[str, Any] = {}
        self.client = new_client(config, client_name)
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
        return self._trouble

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

    def publish(self, topic: str, payload: str, retain: bool = True) -> None:
        if self.connected.is_set():
            self.client.publish(topic, payload, qos=1, retain=retain)

    def stop(self) -> None:
        """Say ``offline`` and disconnect cleanly."""
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
        self._trouble = ""
        self.connected.set()
        client.publish(self.availability, "online", qos=1, retain=True)
        for topic in self._extra_subscriptions:
            client.subscribe(topic, qos=1)
        self.request_republish()

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        if not self._trouble.startswith(UNREACHABLE):  # one probe for the reason per outage, not per retry
            self._in_trouble(f"{UNREACHABLE} {self._where} ({connect_failure(self.config)})")

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self.connected.is_set():
            self._in_trouble(f"lost the MQTT broker {self._where} ({reason})")
        self.connected.clear()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        callback = self._extra_subscriptions.get(message.topic)
        if callback:
            callback(message.payload)


def connect_failure(config: Config) -> str:
    """Why a TCP connection to the MQTT broker fails right now (paho does not say): for the log line."""
    try:
        with socket.create_connection((config.mqtt_host, config.mqtt_port), timeout=5):
            return "connected at TCP, then failed: TLS or the MQTT handshake"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def publish_once(config: Config, messages: list[tuple[str, str]], timeout_s: float = 10.0) -> None:
    """Connect, publish ``messages`` retained at QoS 1, wait for the broker's acks, disconnect.

    Deliberately a separate client without a last will, so it can run beside
    a writer without touching the writer's availability.
    """
    client = new_client(config, "emdc-cli")
    client.connect(config.mqtt_host, config.mqtt_port, config.mqtt_keepalive)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1, retain=True) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=timeout_s)
            if not info.is_published():
                raise TimeoutError(f"MQTT broker did not acknowledge {len(messages)} messages in {timeout_s} s")
    finally:
        client.disconnect()
        client.loop_stop()
