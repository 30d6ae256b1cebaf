"""Every parser that reads bytes from the network or the manager socket, fed arbitrary
input: it answers or raises its own documented error, never anything else, never hangs."""

from __future__ import annotations

import contextlib
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core import commands, platform_api, proxy_protocol, rendezvous
from gateway.core import protocol as p
from gateway.core.authorized_keys import BadKey, parse_line
from gateway.core.slug import Member, SlugRefused, plan
from gateway.ipc import read_packet

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)


@FAST
@given(st.binary(max_size=2048))
def test_manager_packets(data: bytes) -> None:
    for role in p.Role:
        try:
            message, fds = read_packet(p.Conversation(role), data, [], 0)
        except p.RemoteProtocolError:
            continue
        assert fds == [] and isinstance(message, p.Message)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "type",
                "app",
                "command",
                "pty",
                "env",
                "connection",
                "size",
                "attach",
                "await_attach",
                "merge_output",
                "name",
                "dyno",
                "lines",
                "tail",
            ]
        ),
        json_values,
    )
)
def test_manager_messages(fields: dict[str, object]) -> None:
    for kind in p.MESSAGES:
        data = json.dumps({**fields, "type": kind}).encode()
        with contextlib.suppress(p.RemoteProtocolError):
            p.decode(data)


@FAST
@given(st.binary(max_size=600))
def test_rendezvous_secret_line(data: bytes) -> None:
    with contextlib.suppress(rendezvous.BadHandshake):
        rendezvous.read_secret(data)


@FAST
@given(st.text(max_size=300))
def test_reserved_commands(text: str) -> None:
    with contextlib.suppress(commands.UsageError):
        commands.parse(text)


@FAST
@given(json_values)
def test_api_bodies(body: object) -> None:
    for check in (platform_api.parse_dyno_create, platform_api.parse_log_session):
        with contextlib.suppress(platform_api.APIError):
            check(body)
    json.dumps(body)


@FAST
@given(st.sampled_from(["GET", "POST", "PUT", "DELETE"]), st.text(max_size=200))
def test_api_routes(method: str, path: str) -> None:
    try:
        name, params = platform_api.route(method, path)
    except platform_api.APIError as error:
        assert error.status in (404, 405)
    else:
        assert isinstance(name, str) and isinstance(params, dict)


@FAST
@given(st.text(max_size=400))
def test_public_key_lines(line: str) -> None:
    with contextlib.suppress(BadKey):
        parse_line(line)


members = st.builds(
    Member,
    name=st.text(max_size=40),
    kind=st.sampled_from(
        ["file", "dir", "symlink", "hardlink", "chardev", "blockdev", "fifo", "other"]
    ),
    size=st.integers(min_value=0, max_value=10**6),
    mode=st.integers(min_value=0, max_value=0o7777),
    linkname=st.text(max_size=40),
)


@FAST
@given(st.lists(members, max_size=12))
def test_slug_member_lists(listed: list[Member]) -> None:
    with contextlib.suppress(SlugRefused):
        plan(listed, max_bytes=10**6)


@FAST
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_proxy_headers(head: bytes, tail: bytes) -> None:
    # Arbitrary bytes, and arbitrary bytes behind a real signature.
    for data in (head, proxy_protocol.SIGNATURE + head[:4] + tail):
        try:
            header = proxy_protocol.parse(data)
        except proxy_protocol.BadProxyHeader:
            continue
        if header is not None:
            assert 16 <= header.length <= len(data)
            assert (header.source is None) == (header.destination is None)
