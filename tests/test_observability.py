"""What an operator sees: the audit trail and the Prometheus metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pexpect
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, wait_until


def _audit(gateway: Gateway) -> list[dict[str, object]]:
    path = gateway.state_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _fingerprint(gateway: Gateway) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-lf", f"{gateway.client_key}.pub"], capture_output=True, text=True
    )
    return out.stdout.split()[1]


def test_the_audit_trail_holds_a_sessions_events(gateway: Gateway) -> None:
    app = gateway.new_app()
    content = b"zq-secret-8e1f"  # a session's bytes; they must not reach the audit trail
    assert gateway.ssh(app, "cat; exit 5", input=content).returncode == 5

    def session_ended() -> list[dict[str, object]]:
        return [e for e in _audit(gateway) if e["event"] == "session_end" and e.get("app") == app]

    assert wait_until(session_ended, 5)
    events = [e for e in _audit(gateway) if e.get("app") == app or e["event"] == "connect"]
    end = session_ended()[0]
    conn = end["conn"]
    kinds = [e["event"] for e in events if e.get("conn") == conn]
    assert kinds == ["connect", "auth", "session_start", "session_end"]
    auth = next(e for e in events if e["event"] == "auth" and e["conn"] == conn)
    assert auth["key"] == _fingerprint(gateway) and auth["result"] == "accepted"
    assert auth["source"] == "127.0.0.1"
    start = next(e for e in events if e["event"] == "session_start" and e["conn"] == conn)
    assert start["command"] == "cat; exit 5" and start["terminal"] is False
    assert end["exit_status"] == 5 and end["bytes_in"] == end["bytes_out"] == len(content)
    assert isinstance(end["duration"], float)
    admin = [e["event"] for e in _audit(gateway) if e.get("app") == app and "by" in e]
    assert admin[:3] == ["app_created", "key_added", "release_created"]
    assert content.decode() not in (gateway.state_dir / "audit.jsonl").read_text()


def test_metrics_parse_and_count_a_session(gateway: Gateway) -> None:
    app = gateway.new_app()

    def scrape() -> dict[str, float]:
        url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("app", app) == app:
                    key = sample.name + json.dumps(sample.labels, sort_keys=True)
                    values[key] = sample.value
        return values

    before = scrape()
    assert gateway.ssh(app, "echo counted").stdout == b"counted\n"
    after = scrape()
    label = json.dumps({"app": app, "size": "standard-1x", "via": "ssh"}, sort_keys=True)
    assert after[f"gateway_sessions_total{label}"] == 1
    starts = json.dumps({"app": app, "size": "standard-1x"}, sort_keys=True)
    assert after[f"gateway_dyno_starts_total{starts}"] == 1
    ended = json.dumps({"app": app, "result": "exited", "size": "standard-1x"}, sort_keys=True)
    assert wait_until(lambda: scrape().get(f"gateway_dyno_ends_total{ended}") == 1, 5)
    admitted = 'gateway_connections_total{"outcome": "admitted"}'
    assert after[admitted] >= before.get(admitted, 0) + 1
    assert after["gateway_dyno_start_seconds_count{}"] >= 1


def test_gateway_logs_and_ps_escape_a_dynos_terminal_codes_on_a_terminal(
    gateway: Gateway,
) -> None:
    app = gateway.new_app()
    # The codes themselves are in the command, so both its output and ps show them.
    codes = "\x1b]0;pwned\x07 and a clear \x1b[2J"
    assert gateway.ssh(app, "run:detached", f"printf '{codes}\\n'; sleep 30").returncode == 0
    raw = codes.encode()
    assert wait_until(lambda: raw in gateway.cli("logs", app).stdout.encode(), 15)  # piped: raw
    argv = [sys.executable, "-m", "gateway", "--config", str(gateway.config_path)]
    for command, escaped in (
        ("logs", b"\\x1b]0;pwned\\x07 and a clear \\x1b[2J"),
        ("ps", b"printf '\\x1b]0;pwned\\x07"),  # the command as ps shows it
    ):
        terminal = pexpect.spawn(argv[0], [*argv[1:], command, app], timeout=30)
        terminal.expect(pexpect.EOF)
        seen = terminal.before
        assert escaped in seen, seen
        assert b"\x1b" not in seen and b"\x07" not in seen
    gateway.ssh(app, "run:stop", "run.1")
