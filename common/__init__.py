"""What the edge (Raspberry Pi) and the backend (server) share: the message schema, channels and
units, configuration, broker topology, the AMQP connection, backoff, and what every command shares.
Nothing here imports either side."""

__version__ = "0.1.0"
