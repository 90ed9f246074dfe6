"""Commands that talk to RabbitMQ fail in one line naming the broker (never its password) and the reason."""

from __future__ import annotations

import pytest

from tests.support import free_port, run_emdc


@pytest.mark.parametrize("args", [["dead-letters", "list"], ["dead-letters", "readmit"],
                                  ["state", "set-total", "--meter", "main", "--channel", "active", "--kwh", "1"]])
@pytest.mark.parametrize(("host", "why"), [("127.0.0.1", "Connection refused"), ("nonexistent.invalid", "")])
def test_an_unreachable_broker_is_one_line_with_its_address_and_reason(args: list[str], host: str, why: str) -> None:
    url = f"amqp://guest:Secret123@{host}:{free_port()}/%2F"
    result = run_emdc(args, {"EMDC_AMQP_URL": url, "PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: RabbitMQ at amqp://guest:***@{host}:") and why in lines[0]
    assert "Secret123" not in result.stderr + result.stdout
