"""Pure protocol logic: reserved commands, the rendezvous handshake, the Platform API."""

from __future__ import annotations

import pytest

from gateway.core import commands, platform_api
from gateway.core.commands import DynoRow, ago, format_ps, size_label
from gateway.core.rendezvous import BadHandshake, exit_marker, read_secret, strip_exit_suffix


def test_reserved_commands_keep_the_command_text_verbatim() -> None:
    run = commands.parse("run:detached --size standard-2x -e A=1 -e 'B=two words' echo 'hi'; ls")
    assert run == commands.Run(
        command="echo 'hi'; ls", attach=False, size="standard-2x", env={"A": "1", "B": "two words"}
    )
    assert commands.parse("run -- -v --size") == commands.Run(command="-v --size", attach=True)
    assert commands.parse("rake db:migrate") is None  # a colon later in the line is the app's
    assert commands.parse("run") is None
    assert commands.parse("run:list --json") == commands.RunList(json=True)
    assert commands.parse("run:logs -p run.3 -n 5 --tail") == commands.RunLogs("run.3", 5, True)
    assert commands.parse("run:stop run.12") == commands.RunStop("run.12")
    for bad in ("run:stop web.1", "run:stop", "run:list -x", "run:nope", "run:detached -e X"):
        with pytest.raises(commands.UsageError):
            commands.parse(bad)


def test_ps_format_matches_heroku() -> None:
    rows = [DynoRow("run.1", "standard-1x", "up", 0.0, "bash")]
    assert format_ps(rows, now=90.0) == (
        "=== run: one-off processes (1)\n"
        "run.1 (Standard-1X): up 1970/01/01 00:00:00 +0000 (~ 1m ago): bash\n"
    )
    assert size_label("performance-m") == "Performance-M"
    assert [ago(s) for s in (5, 120, 7200, 200000)] == ["~ 5s", "~ 2m", "~ 2h", "~ 2d"]


def test_rendezvous_secret_line() -> None:
    assert read_secret(b"abcdefghijklmnop1234") is None  # no CRLF yet
    assert read_secret(b"abcdefghijklmnop1234\r\nrest") == ("abcdefghijklmnop1234", b"rest")
    assert read_secret(b"abcdefghijklmnop1234?x=1\r\n") == ("abcdefghijklmnop1234", b"")
    for bad in (b"short\r\n", b"../../etc/passwd-aaaaaaaaaa\r\n", b"\x00" * 20 + b"\r\n"):
        with pytest.raises(BadHandshake):
            read_secret(bad)
    with pytest.raises(BadHandshake):
        read_secret(b"a" * 300)
    assert exit_marker(3) == "\uffff heroku-command-exit-status: 3\n".encode()
    suffixed = 'exit 3 ; echo "\uffff heroku-command-exit-status: $?"'
    assert strip_exit_suffix(suffixed) == "exit 3"
    assert strip_exit_suffix("echo hi") == "echo hi"


def test_api_routes_and_errors() -> None:
    assert platform_api.route("GET", "/apps/x/dynos") == ("list_dynos", {"app": "x"})
    assert platform_api.route("POST", "/apps/x/dynos/run.1/actions/stop")[0] == "stop_dyno"
    with pytest.raises(platform_api.APIError) as error:
        platform_api.route("DELETE", "/apps/x")
    assert error.value.status == 405
    with pytest.raises(platform_api.APIError) as error:
        platform_api.route("GET", "/nope")
    assert error.value.status == 404
    assert platform_api.bearer_token("Bearer abc") == "abc"
    assert platform_api.bearer_token("Basic abc") is None


def test_dyno_create_body_as_the_cli_sends_it() -> None:
    create = platform_api.parse_dyno_create(
        {
            "command": 'bash ; echo "\uffff heroku-command-exit-status: $?"',
            "attach": True,
            "env": {"TERM": "screen", "COLUMNS": 120, "LINES": "40", "X": None},
            "size": "Standard-2X",
        }
    )
    assert create.command == "bash"
    assert create.terminal == ("screen", 120, 40)
    assert create.size == "standard-2x"
    assert "X" not in create.env
    no_tty = platform_api.parse_dyno_create(
        {"command": "cat", "attach": True, "force_no_tty": True}
    )
    assert no_tty.terminal is None
    for bad in (
        {},
        {"command": ""},
        {"command": "x", "attach": "yes"},
        {"command": "x", "env": []},
        [],
    ):
        with pytest.raises(platform_api.APIError):
            platform_api.parse_dyno_create(bad)


def test_log_session_body() -> None:
    assert platform_api.parse_log_session(None) == platform_api.LogSessionRequest(None, 100, False)
    assert platform_api.parse_log_session({"dyno": "run.1", "lines": 5, "tail": True}).tail
    with pytest.raises(platform_api.APIError):
        platform_api.parse_log_session({"lines": 99999})
