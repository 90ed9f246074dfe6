"""A minute without RabbitMQ costs a few log lines, not thousands: one line per state change, no library noise.

The edge (``emdc edge run`` on a mock pin with a meter pulsing it) and the
writer each reach the real RabbitMQ through a :class:`~tests.support.TcpProxy`.
Both proxies go down together and stay down for :data:`OUTAGE_S` (reconnects
are refused all that time), then come back. One shared outage keeps the wall
time near a minute; each service has its own test of its log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support import (
    EmdcProcess,
    MeteredEdge,
    Names,
    TcpProxy,
    amqp_parameters,
    amqp_url_at,
    consumers,
    declare_queue,
    saved_total_uwh,
    wait_until,
    writer_env,
)

pytestmark = pytest.mark.slow
OUTAGE_S = 60
AMQP_PORT = amqp_parameters().port
# A log line is "<date> <time> <LEVEL> <logger>: <message>" (common.command.configure_logging).
LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+)\s+(?P<logger>[\w.]+): (?P<message>.*)$")
# A service's lines during the outage, one per state change: the link is lost, a reconnect is refused
# (the reason changed, so it is said once; further refusals say nothing new), the link is back.
MAX_LINES = 3


@dataclass
class Episode:
    """What a service logged from the cut until every pulse had arrived."""

    lines: list[str]

    def third_party(self) -> list[str]:
        return [line for line in self.lines
                if (match := LOG_LINE.match(line)) and match["logger"].split(".")[0] in {"pika", "paho"}]


@dataclass
class Outage:
    edge: Episode
    writer: Episode
    produced: int
    total_uwh: int | None


def proxies_down_for(seconds: float, proxies: list[TcpProxy]) -> list[TcpProxy]:
    """Stop the proxies (every connection cut, every reconnect refused) for ``seconds``; new ones on their ports."""
    for proxy in proxies:
        proxy.stop()
    time.sleep(seconds)  # the outage itself: what is measured is what the services log meanwhile
    return [TcpProxy(AMQP_PORT, port=proxy.port).start() for proxy in proxies]


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory, brokers: None) -> Iterator[Outage]:
    directory = tmp_path_factory.mktemp("outage")
    names = Names(directory)
    declare_queue(names)
    proxies = [TcpProxy(AMQP_PORT).start(), TcpProxy(AMQP_PORT).start()]
    writer = EmdcProcess(["writer"], writer_env(names, EMDC_AMQP_URL=amqp_url_at(proxies[0].port)),
                         directory / "writer.log")
    edge = MeteredEdge(names, directory / "meter", rate=10, EMDC_AMQP_URL=amqp_url_at(proxies[1].port))
    try:
        wait_until(lambda: writer.proc.poll() is not None or consumers(names.queue) > 0, 30, "the writer to consume")
        edge.start()
        edge.meter_on()
        wait_until(lambda: saved_total_uwh(names.writer_dir), 30, "the first pulses at the writer")
        marks = len(edge.log()), len(writer.log())
        proxies = proxies_down_for(OUTAGE_S, proxies)
        wait_until(lambda: consumers(names.queue) > 0, 60, "the writer to consume again")
        produced = edge.meter_off()
        wait_until(lambda: saved_total_uwh(names.writer_dir) == produced * 10**6, 60, "every pulse at the writer")
        yield Outage(Episode(edge.log()[marks[0]:].splitlines()), Episode(writer.log()[marks[1]:].splitlines()),
                     produced, saved_total_uwh(names.writer_dir))
    finally:
        edge.end()
        writer.stop()
        for proxy in proxies:
            proxy.stop()
        names.remove()


@pytest.mark.parametrize(("service", "lost", "back"), [("edge", "lost RabbitMQ", "publishing to exchange"),
                                                     ("writer", "disconnected from", "consuming")])
def test_each_service_logs_each_change_of_the_link_once(outage: Outage, service: str, lost: str, back: str) -> None:
    log = outage.edge if service == "edge" else outage.writer
    lines = log.lines
    assert "Traceback" not in "\n".join(lines), lines
    assert log.third_party() == [], lines
    assert len(lines) <= MAX_LINES, lines
    assert lost in lines[0] and back in lines[-1], lines
    assert outage.total_uwh == outage.produced * 10**6
