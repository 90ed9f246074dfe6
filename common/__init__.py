"""Code shared by the edge (Raspberry Pi) and the backend (server): the pulse
message schema, configuration loading, broker topology and the CLI."""

__version__ = "0.1.0"
