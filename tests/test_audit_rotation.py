"""The audit trail rotated by the real logrotate with contrib/logrotate/gateway, while the
gateway runs: the rotated file holds what came before, the new one what came after,
whole lines only, and nobody restarts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, Gateway, wait_until

SNIPPET = REPO / "contrib" / "logrotate" / "gateway"
# Debian keeps it in /usr/sbin, which an ordinary user's PATH may not have.
LOGROTATE = Path(shutil.which("logrotate") or "/usr/sbin/logrotate")


def events(path: Path) -> list[dict[str, object]]:
    data = path.read_bytes()
    assert b"\0" not in data  # a writer without O_APPEND would leave a hole of NULs
    return [json.loads(line) for line in data.decode().splitlines()]


def session_ended(path: Path, app: str, count: int) -> bool:
    """Whether `count` sessions of `app` have their last event (the front's session_end)."""
    return sum(e["event"] == "session_end" and e["app"] == app for e in events(path)) == count


@pytest.mark.skipif(not LOGROTATE.exists(), reason="needs logrotate (./dev test installs it)")
def test_logrotate_rotates_the_audit_trail_of_a_running_gateway(
    own_gateway: Gateway, tmp_path: Path
) -> None:
    gw = own_gateway
    gw.start()
    app = gw.new_app()
    audit = gw.state_dir / "audit.jsonl"
    assert gw.ssh(app, "echo before").stdout == b"before\n"
    assert wait_until(lambda: session_ended(audit, app, 1), 10)
    before = events(audit)

    config = SNIPPET.read_text().replace("/var/lib/gateway/audit.jsonl", str(audit))
    state, conf = tmp_path / "state", tmp_path / "logrotate.conf"
    conf.write_text(config)
    result = subprocess.run([LOGROTATE, "--force", "--state", state, conf],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr

    rotated = audit.with_name("audit.jsonl.1")  # delaycompress: the newest stays plain
    assert events(rotated) == before
    assert audit.stat().st_size == 0
    assert rotated.stat().st_mode & 0o777 == audit.stat().st_mode & 0o777 == 0o600
    # The front and the manager (the file open since their start: copytruncate) and the
    # admin CLI write their next events to the emptied file, from its start.
    assert gw.ssh(app, "echo after").stdout == b"after\n"
    gw.cli("config:set", app, "ROTATED=yes")
    assert wait_until(lambda: session_ended(audit, app, 1), 10)
    after = sorted(str(e["event"]) for e in events(audit))
    assert after == sorted(["connect", "auth", "session_start", "dyno_start", "dyno_end",
                            "session_end", "config_set"])  # fmt: skip
    assert events(rotated) == before  # a copy: nothing more goes there
