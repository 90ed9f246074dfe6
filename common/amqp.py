"""Connection parameters for RabbitMQ, built from :class:`~common.config.Config`."""

from __future__ import annotations

import ssl

import pika

from common.config import Config, redact_url

HEARTBEAT_S = 30
# A broker memory/disk alarm blocks publishers; give up on the connection after
# this long so the reconnect loop (and its log line) takes over.
BLOCKED_CONNECTION_TIMEOUT_S = 60


def connection_parameters(config: Config, name: str) -> pika.URLParameters:
    """Parameters for ``config.amqp_url``; ``name`` shows in the management UI's connection list."""
    params = pika.URLParameters(config.amqp_url)
    params.heartbeat = HEARTBEAT_S
    params.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT_S
    params.connection_attempts = 1
    params.socket_timeout = 10
    params.client_properties = {"connection_name": name}
    if config.amqp_url.startswith("amqps://"):
        context = ssl.create_default_context(cafile=config.amqp_ca_file or None)
        params.ssl_options = pika.SSLOptions(context, params.host)
    return params


def describe(config: Config) -> str:
    """The broker URL without its password, for log lines."""
    return redact_url(config.amqp_url)


def reason(error: BaseException) -> str:
    """A short, readable cause for a connection failure.

    pika nests the real one several levels deep (a connection error holding a
    workflow failure holding a connector error holding the socket's error)::

        >>> import pika.exceptions
        >>> from pika.adapters.utils.connection_workflow import (AMQPConnectionWorkflowFailed,
        ...                                                      AMQPConnectorSocketConnectError)
        >>> refused = AMQPConnectorSocketConnectError(ConnectionRefusedError(111, "Connection refused"))
        >>> reason(pika.exceptions.AMQPConnectionError(AMQPConnectionWorkflowFailed([refused])))
        '[Errno 111] Connection refused'
    """
    for _ in range(10):  # pika's nesting is shallow; never loop on a cycle
        nested = getattr(error, "exceptions", None) or getattr(error, "exception", None)
        if nested is None and error.args and isinstance(error.args[0], BaseException):
            nested = error.args[0]
        if isinstance(nested, list | tuple) and nested:
            nested = nested[-1]
        if not isinstance(nested, BaseException):
            break
        error = nested
    text = str(error) or type(error).__name__
    return text if len(text) < 200 else text[:200] + "..."
