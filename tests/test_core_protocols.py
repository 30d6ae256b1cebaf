"""Pure protocol logic: reserved commands, the rendezvous handshake, the Platform API."""

from __future__ import annotations

import subprocess

import pytest

from gateway.core import commands, platform_api
from gateway.core.commands import ago, format_ps, size_label
from gateway.core.protocol import DynoInfo
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


def test_run_with_one_quoted_word_runs_the_text_inside() -> None:
    """`run:detached 'echo a; echo b'`, as a heroku command is written: as one word it
    could only name a program called `echo a; echo b`."""
    for name, attach in (("run:detached", False), ("run", True)):
        assert commands.parse(f"{name} 'echo a; echo b'") == commands.Run(
            command="echo a; echo b", attach=attach
        )
        assert commands.parse(f'{name} -e A=1 -- "echo \\"$A\\""') == commands.Run(
            command='echo "$A"', attach=attach, env={"A": "1"}
        )
        # More than one word, or not starting with a quote: the text as it came.
        for kept in ("'echo a' b", "echo 'a b'", "'a';b"):
            assert commands.parse(f"{name} {kept}") == commands.Run(command=kept, attach=attach)
        with pytest.raises(commands.UsageError, match="no command given"):
            commands.parse(f"{name} ''")
    # A plain command is the user's shell text, as sshd passes it: never unquoted.
    assert commands.parse("'echo a; echo b'") is None


@pytest.mark.parametrize(
    "word",
    [
        "'echo a; echo b'",
        '"echo a; echo b"',
        "'it'\\''s'",
        '"say \\"hi\\" \\\\ \\x"',
        "'a'b-c.d",
        "'two\nlines'",
        '"tab\there"',
        "''",
    ],
)
def test_unquote_word_gives_what_sh_gives(word: str) -> None:
    """The value matches the shell's own reading of the same word."""
    printed = subprocess.run(
        ["sh", "-c", f"printf %s {word}"], capture_output=True, text=True, check=True
    ).stdout
    assert commands.unquote_word(word) == printed


@pytest.mark.parametrize(
    "text", ["echo", "'a' 'b'", "'a';ls", "'a'|b", "'a'$x", "'a'*", "'open", '"open', "a'b'"]
)
def test_unquote_word_leaves_everything_else(text: str) -> None:
    assert commands.unquote_word(text) is None


def test_ps_format_matches_heroku() -> None:
    rows = [DynoInfo("run.1", "standard-1x", "up", 0.0, "bash", True, 0.0, 1)]
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
