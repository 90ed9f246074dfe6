"""Send control messages (calibration, energy per pulse, forgetting a meter) through RabbitMQ, so the writer
applies them in order with the pulses."""

from __future__ import annotations

import pika

from common.amqp import connection_parameters
from common.config import Config
from common.message import CONTENT_TYPE, ControlCommand, encode_control


def send_control(config: Config, command: ControlCommand) -> None:
    """Publish ``command`` persistently with confirms.

    Raises ``pika.exceptions.UnroutableError`` if no queue takes it, or an
    ``AMQPError`` if the broker cannot be reached.
    """
    body = encode_control(command)
    connection = pika.BlockingConnection(connection_parameters(config, "emdc-control"))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(config.exchange, command.routing_key, body,
                              pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2), mandatory=True)
    finally:
        connection.close()
