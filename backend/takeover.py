"""Whose state Home Assistant's totals came from, so that a writer with other state never replaces them.

Two writers with separate state dirs on one queue (a second container by
mistake) would each count part of the pulses; the lease lets only one count
at a time, but when the active one dies the standby takes over with its own,
different totals, and publishing them would make Home Assistant's total drop
(which it reads as a meter reset). So every state dir has an identity
(:meth:`~backend.state_store.StateStore.identity`), the active writer
publishes it retained on ``<topic_prefix>/writer_state``, and a writer
taking over first reads it: another state's identity means "not mine", and
the takeover is refused until a person decides (``emdc writer --take-over``).

The decision is pure::

    >>> takeover_refusal("a1", published="a1", forced=False)
    ''
    >>> takeover_refusal("b2", published=None, forced=False)
    ''
    >>> takeover_refusal("b2", published="a1", forced=True)
    ''
    >>> takeover_refusal("b2", published="a1", forced=False)[:59]
    'the totals in Home Assistant were published from state a1, '
"""

from __future__ import annotations

import logging
import threading

import paho.mqtt.client as mqtt

from backend.mqtt_publisher import new_client
from backend.topics import writer_state_topic
from common.config import Config

log = logging.getLogger("emdc.writer")
# How long to wait for the retained identity once the subscription is acknowledged.
RETAINED_GRACE_S = 1.0


def takeover_refusal(own: str, *, published: str | None, forced: bool) -> str:
    """Why a writer with state ``own`` must not take over from the state that ``published`` last ("" if it may)."""
    if forced or published in (None, "", own):
        return ""
    return (f"the totals in Home Assistant were published from state {published}, this writer's state is {own}: "
            "another writer with a separate state dir counted here. Share one state dir, or, if this state is "
            "the right one, start this writer once with --take-over")


def claim(config: Config, own: str, *, forced: bool, timeout_s: float = 10.0) -> str:
    """Read the published state identity, and publish ``own`` unless refused; return the refusal ("" if none).

    When the MQTT broker cannot be reached the takeover goes ahead (counting
    is safe whatever MQTT does) and a later takeover checks again.
    """
    topic = writer_state_topic(config.topic_prefix)
    client = new_client(config, "emdc-writer-claim")
    subscribed, found = threading.Event(), threading.Event()
    published: list[str] = []

    def on_subscribe(*_: object) -> None:
        subscribed.set()

    def on_message(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        published.append(message.payload.decode(errors="replace"))
        found.set()

    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(config.mqtt_host, config.mqtt_port, config.mqtt_keepalive)
    except OSError as exc:
        # The MQTT publisher says loudly that the broker is out of reach; this is only what it means here.
        log.info("taking over without checking %s: %s:%s is out of reach (%s)", topic, config.mqtt_host,
                 config.mqtt_port, exc.strerror or exc)
        return ""
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        if subscribed.wait(timeout_s):
            found.wait(RETAINED_GRACE_S)
        refusal = takeover_refusal(own, published=published[-1] if published else None, forced=forced)
        if not refusal:
            client.publish(topic, own, qos=1, retain=True).wait_for_publish(timeout=timeout_s)
        return refusal
    finally:
        client.disconnect()
        client.loop_stop()
