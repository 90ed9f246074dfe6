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


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a connection failure.

    pika nests the real one several levels deep (a connection error holding a
    workflow failure holding a connector error holding the socket's error)::

        >>> import pika.exceptions
        >>> from pika.adapters.utils.connection_workflow import (AMQPConnectionWorkflowFailed,
        ...                                                      AMQPConnectorSocketConnectError)
        >>> refused = AMQPConnectorSocketConnectError(ConnectionRefusedError(111, "Connection refused"))
        >>> root_cause(pika.exceptions.AMQPConnectionError(AMQPConnectionWorkflowFailed([refused])))
        ConnectionRefusedError(111, 'Connection refused')
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
    return error


def reason(error: BaseException) -> str:
    """A short, readable cause for a connection failure: its :func:`root_cause`'s text.

        >>> reason(ConnectionRefusedError(111, "Connection refused"))
        '[Errno 111] Connection refused'
    """
    error = root_cause(error)
    text = str(error) or type(error).__name__
    return text if len(text) < 200 else text[:200] + "..."


def diagnose(config: Config, error: BaseException) -> tuple[str, str]:
    """What a failure to connect to RabbitMQ means and how to fix it: refused, DNS, TLS, authentication, vhost.

        >>> from common.config import load_config
        >>> diagnose(load_config(env={}), ConnectionRefusedError(111, "Connection refused"))[0]
        'localhost:5672 refused the connection'
    """
    import socket

    import pika.exceptions

    params = pika.URLParameters(config.amqp_url)
    where = f"{params.host}:{params.port}"
    user = params.credentials.username if isinstance(params.credentials, pika.PlainCredentials) else "?"
    cause = root_cause(error)
    closed = cause.reply_code if isinstance(cause, pika.exceptions.ConnectionClosedByBroker) else None
    if isinstance(cause, pika.exceptions.ProbableAuthenticationError | pika.exceptions.AuthenticationError) or \
            closed == 403:
        return (f"authentication failed: {where} refused user {user!r} and its password",
                "correct the user and password in amqp_url (or the file EMDC_AMQP_URL_FILE names)")
    if isinstance(cause, pika.exceptions.ProbableAccessDeniedError) or closed == 530:
        return (f"user {user!r} may not use virtual host {params.virtual_host!r} on {where}",
                "correct the vhost at the end of amqp_url (%2F is /), or grant the user permissions on it")
    if isinstance(cause, pika.exceptions.ChannelClosedByBroker):  # logged in, then refused an operation
        if cause.reply_code == 404:
            return (f"{where} has no such exchange or queue ({cause.reply_text})",
                    "start the writer once with declare_topology = true, or load the broker definitions")
        return (f"{where} refused user {user!r} an operation ({cause.reply_text})",
                "give the account the permissions of the broker definitions (emdc doctor names the missing one)")
    if isinstance(cause, ConnectionRefusedError):
        return (f"{where} refused the connection",
                "start RabbitMQ, or correct the host and port in amqp_url (5672; amqps: 5671)")
    if isinstance(cause, socket.gaierror):
        return (f"the host name {params.host!r} does not resolve ({cause.strerror})",
                "correct the host in amqp_url, or check DNS on this machine")
    if isinstance(cause, ssl.SSLError | ssl.CertificateError):
        return (f"TLS with {where} failed ({reason(cause)})",
                "use amqps:// only with the broker's TLS port (5671), and set amqp_ca_file to the CA that signed "
                "its certificate")
    if isinstance(cause, TimeoutError):
        return (f"no answer from {where}", "check the host, the port and any firewall between here and the broker")
    if isinstance(cause, pika.exceptions.IncompatibleProtocolError):
        return (f"{where} does not speak AMQP 0-9-1", "correct the port in amqp_url: it is another service's")
    return (f"cannot connect to {where} ({reason(cause)})",
            "check amqp_url: a RabbitMQ listener must answer at that host and port")
