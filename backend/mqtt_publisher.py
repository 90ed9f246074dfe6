"""Publish the writer's values to Mosquitto with paho-mqtt 2.x.

Values are retained at QoS 1. While the broker is unreachable nothing is
queued in memory (the state file, not paho's queue, is what survives); after
every (re)connect the owner re-publishes the current values, which is
signalled through :attr:`MqttPublisher.republish_requested` so that all ledger
access stays on the writer's own thread.

Example::

    mqtt = MqttPublisher(config, client_name="emdc-writer")
    mqtt.start()
    mqtt.publish("home/energy/active_energy", "1.234")
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from backend.topics import availability_topic
from common.config import Config

log = logging.getLogger("emdc.mqtt")


class MqttPublisher:
    """A paho client that publishes retained values and an availability topic with a last will."""

    def __init__(self, config: Config, client_name: str = "emdc-writer") -> None:
        self.config = config
        self.availability = availability_topic(config.topic_prefix)
        self.republish_requested = threading.Event()
        self.connected = threading.Event()
        self._extra_subscriptions: dict[str, Any] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{client_name}-{secrets.token_hex(4)}")
        if config.mqtt_username:
            self.client.username_pw_set(config.mqtt_username, config.mqtt_password or None)
        if config.mqtt_tls:
            self.client.tls_set(ca_certs=config.mqtt_ca_file or None, certfile=config.mqtt_cert_file or None,
                                keyfile=config.mqtt_key_file or None)
        self.client.will_set(self.availability, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

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
            self.client.publish(self.availability, "offline", qos=1, retain=True).wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("MQTT broker %s:%d refused the connection: %s", self.config.mqtt_host,
                      self.config.mqtt_port, reason)
            return
        log.info("connected to MQTT broker %s:%d", self.config.mqtt_host, self.config.mqtt_port)
        self.connected.set()
        client.publish(self.availability, "online", qos=1, retain=True)
        for topic in self._extra_subscriptions:
            client.subscribe(topic, qos=1)
        self.republish_requested.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self.connected.is_set():
            log.warning("lost the MQTT broker %s:%d (%s); values will be re-published on reconnect",
                        self.config.mqtt_host, self.config.mqtt_port, reason)
        self.connected.clear()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        callback = self._extra_subscriptions.get(message.topic)
        if callback:
            callback(message.payload)
