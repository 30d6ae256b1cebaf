"""Into a running dyno, the pure parts: the SSH user APP.DYNO, where a forward may go,
what sftp-server's log says, the dyno's own user in its passwd, an entered process's
environment. The real thing, end to end: tests/test_into_dyno.py."""

from __future__ import annotations

import pytest

from gateway.core.commands import dyno_json, format_ps, inside
from gateway.core.dyno_access import (
    FileChange,
    FileTransfer,
    Login,
    forward_addresses,
    parse_sftp_log,
)
from gateway.core.environment import dyno_env, with_terminal
from gateway.core.platform_api import dyno_body
from gateway.core.protocol import DynoInfo, Pty
from gateway.manager.namespace_spec import account_files


@pytest.mark.parametrize(
    ("user", "app", "dyno"),
    [("shop", "shop", None), ("shop.run.7", "shop", "run.7"), ("shop.", "shop", ""),
     ("shop.web.1", "shop", "web.1"), ("a.b.c.d", "a", "b.c.d")],
)  # fmt: skip
def test_the_user_is_the_app_then_the_dyno(user: str, app: str, dyno: str | None) -> None:
    assert Login.parse(user) == Login(app, dyno)


def test_a_dyno_part_that_names_no_one_off_dyno_says_so() -> None:
    assert Login.parse("shop.run.7").dyno_problem() is None
    assert Login.parse("shop").dyno_problem() is None
    for user in ("shop.web.1", "shop.run.0", "shop.run.07", "shop."):
        problem = Login.parse(user).dyno_problem()
        assert problem is not None and "is not a dyno name" in problem and "run.N" in problem


@pytest.mark.parametrize(
    ("host", "addresses"),
    [("localhost", ("127.0.0.1", "::1")), ("LocalHost", ("127.0.0.1", "::1")),
     ("127.0.0.1", ("127.0.0.1",)), ("::1", ("::1",)), ("[::1]", ("::1",)),
     ("0:0:0:0:0:0:0:1", ("::1",)),
     ("127.0.0.2", None), ("10.199.0.2", None), ("example.com", None), ("", None),
     ("0.0.0.0", None), ("::", None), ("localhost.", None), ("::ffff:127.0.0.1", None)],
)  # fmt: skip
def test_a_forward_reaches_only_the_dyno_s_own_loopback(
    host: str, addresses: tuple[str, ...] | None
) -> None:
    assert forward_addresses(host) == addresses


@pytest.mark.parametrize(
    ("line", "event"),
    [
        ('close "/app/log/x" bytes read 1234 written 0\r\n',
         FileTransfer("/app/log/x", 1234, 0)),
        ('close "up load" bytes read 0 written 99', FileTransfer("up load", 0, 99)),
        ('close "a "quoted" name" bytes read 1 written 2',
         FileTransfer('a "quoted" name', 1, 2)),
        ('remove name "/app/x"', FileChange("remove", "/app/x")),
        ('mkdir name "/app/d" mode 0777', FileChange("mkdir", "/app/d")),
        ('rmdir name "/app/d"', FileChange("rmdir", "/app/d")),
        ('posix-rename old "/app/a" new "/app/b"', FileChange("rename", "/app/a", "/app/b")),
        ('rename old "/app/a" new "/app/b"', FileChange("rename", "/app/a", "/app/b")),
        ('symlink old "t" new "/app/l"', FileChange("symlink", "t", "/app/l")),
        ('set "/app/x" mode 0644', FileChange("setstat", "/app/x")),
        ('set "/app/x" modtime 20260101-00:00:00', FileChange("setstat", "/app/x")),
        ('open "/app/x" flags READ mode 0666', None),
        ('opendir "/app"', None),
        ("sent status No such file", None),
        ("session opened for local user u100000 from [UNKNOWN]", None),
        ('close "/app/x" bytes read many written 0', None),
        ("", None),
    ],
)  # fmt: skip
def test_sftp_server_log_lines_become_file_events(
    line: str, event: FileTransfer | FileChange | None
) -> None:
    assert parse_sftp_log(line) == event


def test_a_dyno_s_user_is_added_to_the_host_s_accounts() -> None:
    files = dict(account_files("root:x:0:0::/root:/bin/sh", "root:x:0:\n", 100007, 100007,
                               "/bin/bash"))  # fmt: skip
    assert (
        files["/etc/passwd"]
        == "root:x:0:0::/root:/bin/sh\nu100007:x:100007:100007::/app:/bin/bash\n"
    )
    assert files["/etc/group"] == "root:x:0:\nu100007:x:100007:\n"
    assert dict(account_files("", "", 5, 6, "/bin/sh"))["/etc/group"] == "u5:x:6:\n"


def test_an_entered_process_gets_the_dyno_s_environment_with_its_own_terminal() -> None:
    env = dyno_env(name="run.7", config_vars={"DATABASE_URL": "postgres://db"}, app_dir="/app",
                   port=5000, pty=Pty("screen", 100, 30))  # fmt: skip
    plain = with_terminal(env, None)
    assert "TERM" not in plain and "COLUMNS" not in plain and "LINES" not in plain
    assert plain["DYNO"] == "run.7" and plain["DATABASE_URL"] == "postgres://db"
    own = with_terminal(env, Pty("xterm-256color", 80, 24))
    assert (own["TERM"], own["COLUMNS"], own["LINES"]) == ("xterm-256color", "80", "24")
    assert env["TERM"] == "screen"  # the dyno's own is left as it was


def test_run_list_and_the_api_say_what_is_inside_a_dyno() -> None:
    def dyno(sessions: int, forwards: int) -> DynoInfo:
        return DynoInfo("run.7", "standard-1x", "up", 0.0, "bash", True, 0.0, 1, sessions, forwards)

    assert [inside(dyno(s, f)) for s, f in ((0, 0), (1, 0), (2, 1), (0, 3))] == [
        "", " (1 session)", " (2 sessions, 1 forwarded connection)", " (3 forwarded connections)",
    ]  # fmt: skip
    assert format_ps([dyno(1, 0)], 60.0).splitlines()[1].endswith("ago): bash (1 session)")
    assert dyno_json(dyno(2, 1))["sessions"] == 2
    listed, one = dyno_body("shop", dyno(2, 0), listing=True), dyno_body("shop", dyno(2, 0))
    assert (listed["command"], one["command"]) == ("bash (2 sessions)", "bash")
    assert listed["sessions"] == one["sessions"] == 2 and one["forwarded_connections"] == 0
