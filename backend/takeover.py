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

from backend.mqtt_publisher import MqttFailure, publish_once
from backend.topics import writer_state_topic
from common.config import Config

log = logging.getLogger("emdc.writer")


def takeover_refusal(own: str, *, published: str | None, forced: bool) -> str:
    """Why a writer with state ``own`` must not take over from the state that ``published`` last ("" if it may)."""
    if forced or published in (None, "", own):
        return ""
    return (f"the totals in Home Assistant were published from state {published}, this writer's state is {own}: "
            "another writer with a separate state dir counted here. Share one state dir, or, if this state is "
            "the right one, start this writer once with --take-over")


def claim(config: Config, own: str, *, forced: bool) -> str | None:
    """Read the published state identity, and publish ``own`` unless refused: the refusal, ``""`` when the
    takeover may go ahead, or None when the MQTT broker cannot be asked (ask again before publishing)."""
    topic = writer_state_topic(config.topic_prefix, config.partition_label())
    refusal = ""

    def decide(retained: dict[str, str]) -> list[tuple[str, str]]:
        nonlocal refusal
        refusal = takeover_refusal(own, published=retained.get(topic), forced=forced)
        return [] if refusal else [(topic, own)]

    try:
        publish_once(config, [topic], decide)
    except (MqttFailure, OSError):
        # The MQTT publisher says in its own line what is wrong with the broker; this is what it means here.
        log.info("not yet checked whose totals Home Assistant holds (%s): no answer from MQTT; checking before "
                 "the first publish", topic)
        return None
    return refusal
