"""Sockets passed by systemd (sd_listen_fds(3)): which descriptors, under which names,
for which process; without sockets or a process (gateway/core/listen_fds.py)."""

from __future__ import annotations

import pytest

from gateway.core.listen_fds import ListenFdsError, passed_sockets


def env(count: str, names: str | None = None, pid: str = "42") -> dict[str, str]:
    found = {"LISTEN_PID": pid, "LISTEN_FDS": count}
    if names is not None:
        found["LISTEN_FDNAMES"] = names
    return found


def test_named_sockets_start_at_descriptor_3_in_order() -> None:
    assert passed_sockets(env("3", "ssh:ssh:api"), 42) == [("ssh", 3), ("ssh", 4), ("api", 5)]


def test_nothing_passed_or_passed_to_another_process_is_none() -> None:
    assert passed_sockets({}, 42) == []
    assert passed_sockets(env("1", "ssh", pid="41"), 42) == []  # inherited from a parent
    assert passed_sockets({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "ssh"}, 42) == []


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        (env("0", ""), "expected 1 to 12 sockets"),
        (env("x", "ssh"), "expected 1 to 12 sockets"),
        (env("13", ":".join(["ssh"] * 13)), "expected 1 to 12 sockets"),
        (env("2", "ssh"), "2 sockets passed with 1 names"),
        (env("1"), "1 sockets passed with 0 names"),
        (env("1", "unknown"), "passed socket 1 is named 'unknown'"),
        (env("2", "ssh:telnet"), "passed socket 2 is named 'telnet'"),
    ],
)
def test_sockets_that_cannot_be_told_apart_are_refused_with_the_fix(
    variables: dict[str, str], words: str
) -> None:
    with pytest.raises(ListenFdsError, match=words) as refused:
        passed_sockets(variables, 42)
    if "named" in words or "names" in words:
        assert "FileDescriptorName=" in str(refused.value)
