"""The front <-> manager protocol without sockets: both sides' conversations joined in
memory (as h11's tests join a client and a server), every sequence, every refusal."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import protocol as p


@dataclass
class Pair:
    """A client and a server conversation, and the packets between them."""

    client: p.Conversation = field(default_factory=lambda: p.Conversation(p.Role.CLIENT))
    server: p.Conversation = field(default_factory=lambda: p.Conversation(p.Role.SERVER))

    def up(self, message: p.Message, fds: int = 0) -> p.Message:
        """The front sends; the manager receives."""
        return self.server.receive(self.client.send(message, fds), fds)

    def down(self, message: p.Message, fds: int = 0) -> p.Message:
        return self.client.receive(self.server.send(message, fds), fds)

    @property
    def phases(self) -> tuple[p.Phase, p.Phase]:
        return self.client.phase, self.server.phase


def dyno(name: str = "run.1") -> p.DynoInfo:
    return p.DynoInfo(name, "standard-1x", "up", 1.0, "bash", True, 1.0, 3)


def run(**changes: object) -> p.Run:
    fields: dict[str, object] = {"app": "shop", "command": "rake db:migrate", "connection": "c1"}
    fields.update(changes)
    return p.Run(**fields)  # type: ignore[arg-type]


def test_an_attached_run_round_trips_every_message_intact() -> None:
    pair = Pair()
    request = run(pty=p.Pty("xterm", 80, 24), env={"LANG": "C"}, size="standard-2x")
    assert pair.up(request) == request
    assert pair.down(p.Started(dyno()), fds=1) == p.Started(dyno())
    assert pair.up(p.Signal("INT")) == p.Signal("INT")
    assert pair.phases == (p.Phase.RUNNING, p.Phase.RUNNING)
    assert pair.down(p.Exited(status=None, signal="HUP")) == p.Exited(None, "HUP")
    assert pair.phases == (p.Phase.DONE, p.Phase.DONE)


@pytest.mark.parametrize(
    ("changes", "streams"),
    [({}, 3), ({"merge_output": True}, 2), ({"pty": p.Pty("vt100", 1, 1)}, 1),
     ({"attach": False}, 0)],
)  # fmt: skip
def test_started_carries_as_many_descriptors_as_the_run_has_streams(
    changes: dict[str, object], streams: int
) -> None:
    pair = Pair()
    pair.up(run(**changes))
    for wrong in {0, 1, 2, 3} - {streams}:
        with pytest.raises(p.LocalProtocolError, match=f"{wrong} descriptors, not {streams}"):
            p.Conversation(p.Role.SERVER, p.Phase.AWAIT_STARTED, run(**changes)).send(
                p.Started(dyno()), fds=wrong
            )
        with pytest.raises(p.RemoteProtocolError, match="descriptors"):
            p.Conversation(p.Role.CLIENT, p.Phase.AWAIT_STARTED, run(**changes)).receive(
                p.encode(p.Started(dyno())), fds=wrong
            )
    pair.down(p.Started(dyno()), fds=streams)
    expected = p.Phase.DONE if changes.get("attach") is False else p.Phase.RUNNING
    assert pair.phases == (expected, expected)


def test_a_reserved_run_waits_for_attach() -> None:
    pair = Pair()
    pair.up(run(await_attach=True, merge_output=True))
    with pytest.raises(p.LocalProtocolError, match="may not send started while await reserved"):
        pair.server.send(p.Started(dyno()), fds=2)
    pair.down(p.Reserved(dyno()))
    with pytest.raises(p.LocalProtocolError, match="may not send signal while reserved"):
        pair.client.send(p.Signal("INT"))
    pair.up(p.Attach())
    pair.down(p.Started(dyno()), fds=2)
    assert pair.phases == (p.Phase.RUNNING, p.Phase.RUNNING)


def enter(**changes: object) -> p.Enter:
    fields: dict[str, object] = {
        "app": "shop", "dyno": "run.7", "command": "cat log/x", "connection": "c1",
    }  # fmt: skip
    fields.update(changes)
    return p.Enter(**fields)  # type: ignore[arg-type]


def forward(**changes: object) -> p.Forward:
    fields: dict[str, object] = {
        "app": "shop", "dyno": "run.7", "address": "127.0.0.1", "port": 5000,
        "connection": "c1",
    }  # fmt: skip
    fields.update(changes)
    return p.Forward(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "streams"),
    [(enter(), 3), (enter(pty=p.Pty("xterm", 80, 24), command=None), 1),
     (enter(subsystem="sftp", command=None), 2), (run(subsystem="sftp", command=None), 2)],
    ids=["pipes", "terminal", "sftp", "sftp-in-a-new-dyno"],
)  # fmt: skip
def test_an_entered_process_runs_like_an_attached_dyno(
    request_: p.Enter | p.Run, streams: int
) -> None:
    pair = Pair()
    assert pair.up(request_) == request_
    with pytest.raises(p.LocalProtocolError, match=f"with {streams + 1} descriptors"):
        p.Conversation(p.Role.SERVER, p.Phase.AWAIT_STARTED, request_).send(
            p.Started(dyno("run.7")), fds=streams + 1
        )
    pair.down(p.Started(dyno("run.7")), fds=streams)
    pair.up(p.Signal("TERM"))
    assert pair.phases == (p.Phase.RUNNING, p.Phase.RUNNING)
    pair.down(p.Exited(status=0, signal=None))
    assert pair.phases == (p.Phase.DONE, p.Phase.DONE)


def test_a_forward_carries_one_socket_and_ends_when_the_dyno_does() -> None:
    pair = Pair()
    assert pair.up(forward(address="::1", port=65535)) == forward(address="::1", port=65535)
    with pytest.raises(p.LocalProtocolError, match="0 descriptors, not 1"):
        p.Conversation(p.Role.SERVER, p.Phase.AWAIT_FORWARDED, forward()).send(p.Forwarded())
    pair.down(p.Forwarded(), fds=1)
    assert pair.phases == (p.Phase.FORWARDING, p.Phase.FORWARDING)
    with pytest.raises(p.LocalProtocolError, match="may not send signal while forwarding"):
        pair.client.send(p.Signal("INT"))
    pair.down(p.Ended())
    assert pair.phases == (p.Phase.DONE, p.Phase.DONE)


def test_dyno_info_carries_what_is_inside_it() -> None:
    busy = p.DynoInfo("run.7", "standard-1x", "up", 1.0, "bash", True, 1.0, 3, 2, 5)
    assert p.decode(p.encode(p.DynoList((busy,)))) == p.DynoList((busy,))
    assert dyno().sessions == 0 and dyno().forwards == 0


@pytest.mark.parametrize(
    "request_",
    [
        run(),
        run(await_attach=True),
        p.Stop("shop", "run.1"),
        p.Logs("shop"),
        p.ListDynos("shop"),
        p.CheckKey("shop", "SHA256:x"),
        p.Authorize("t0ken"),
        p.FrontHello(),
        enter(),
        forward(),
    ],
    ids=lambda r: r.kind,
)  # fmt: skip
def test_any_request_may_be_refused_and_that_ends_it(request_: p.Message) -> None:
    pair = Pair()
    pair.up(request_)
    assert pair.down(p.Refused("no such app: shop")) == p.Refused("no such app: shop")
    assert pair.phases == (p.Phase.DONE, p.Phase.DONE)
    with pytest.raises(p.RemoteProtocolError, match="may not send exited while done"):
        pair.client.receive(p.encode(p.Exited(0, None)))


def test_logs_and_metrics_stream_until_end() -> None:
    pair = Pair()
    pair.up(p.Logs("shop", dyno="run.2", lines=5, tail=True))
    pair.down(p.LogLines(("a", "b")))
    pair.down(p.Dropped(7))
    with pytest.raises(p.LocalProtocolError):
        pair.server.send(p.MetricsText(("x 1",)))  # not a logs stream's message
    pair.down(p.End())
    metrics = Pair()
    metrics.up(p.Metrics())
    assert metrics.down(p.MetricsText(("gateway_x 1",))) == p.MetricsText(("gateway_x 1",))
    metrics.down(p.End())
    assert metrics.phases == (p.Phase.DONE, p.Phase.DONE)


def test_stop_and_list_get_one_answer() -> None:
    stop = Pair()
    stop.up(p.Stop("shop", "run.4"))
    assert stop.down(p.Stopping("run.4")) == p.Stopping("run.4")
    listing = Pair()
    listing.up(p.ListDynos("shop"))
    answer = p.DynoList((dyno("run.1"), dyno("run.2")))
    assert listing.down(answer) == answer
    assert listing.phases == (p.Phase.DONE, p.Phase.DONE)


def test_key_checks_and_authorizations_get_one_answer() -> None:
    check = Pair()
    check.up(p.CheckKey("shop", "SHA256:abc"))
    assert check.down(p.KeyChecked(allowed=True)) == p.KeyChecked(True)
    assert check.phases == (p.Phase.DONE, p.Phase.DONE)
    auth = Pair()
    assert auth.up(p.Authorize("t0ken", app="shop")) == p.Authorize("t0ken", "shop")
    answer = p.Authorized(valid=True, apps=("blog", "shop"), app_created_at=12.5)
    assert auth.down(answer) == answer  # the apps come back a tuple, as sent
    with pytest.raises(p.LocalProtocolError, match="apps must be a list of strings"):
        p.Authorized(valid=True, apps=["shop"])  # type: ignore[arg-type]


def setup(listeners: tuple[str, ...] = ("ssh", "api")) -> p.FrontSetup:
    return p.FrontSetup(listeners, ("-----BEGIN OPENSSH PRIVATE KEY-----\n...",), "cert", "key")


def test_the_front_setup_carries_the_audit_trail_and_one_socket_per_listener() -> None:
    pair = Pair()
    pair.up(p.FrontHello())
    with pytest.raises(p.LocalProtocolError, match="front_setup came with 2 descriptors, not 3"):
        p.Conversation(p.Role.SERVER, p.Phase.AWAIT_SETUP).send(setup(), fds=2)
    assert pair.down(setup(), fds=3) == setup()
    with pytest.raises(p.LocalProtocolError, match="may not send front_hello while setting"):
        pair.client.send(p.FrontHello())
    pair.up(p.FrontReady())
    # From here the connection is the front's lifeline: nobody says anything more.
    assert pair.phases == (p.Phase.FRONT_UP, p.Phase.FRONT_UP)
    for message in (p.FrontReady(), p.Signal("INT"), p.Logs("shop")):
        with pytest.raises(p.LocalProtocolError, match="while front up"):
            p.Conversation(p.Role.CLIENT, p.Phase.FRONT_UP).send(message)


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: setup(("ssh", "telnet")), "unknown listener 'telnet'"),
        (lambda: setup(("ssh",) * 13), "listeners holds more than 12"),
        (lambda: p.FrontSetup(("ssh",), ()), "host_keys must hold from 1 to 8 keys"),
        (lambda: p.FrontSetup(("ssh",), ("k" * (p.MAX_SECRET + 1),)), "host key is over"),
    ],
)
def test_a_front_setup_is_checked_when_built(build: object, words: str) -> None:
    with pytest.raises(p.LocalProtocolError, match=words):
        build()  # type: ignore[operator]


def test_the_front_sends_one_request_and_only_what_it_allows() -> None:
    pair = Pair()
    pair.up(run())
    with pytest.raises(p.LocalProtocolError, match="may not send stop while await started"):
        pair.client.send(p.Stop("shop", "run.1"))
    server = p.Conversation(p.Role.SERVER)
    with pytest.raises(p.RemoteProtocolError, match="may not send attach while idle"):
        server.receive(p.encode(p.Attach()))
    with pytest.raises(p.LocalProtocolError, match="may not send run"):
        server.send(run())  # the manager never sends requests


def test_a_command_too_long_for_exec_is_our_error_with_words_for_the_user() -> None:
    with pytest.raises(p.LocalProtocolError) as too_long:
        run(command="x" * (p.MAX_COMMAND + 1))
    assert "more than the 131071 one process argument can hold" in str(too_long.value)
    assert "bash < script.sh" in str(too_long.value)
    longest = run(command="x" * p.MAX_COMMAND)
    assert p.decode(p.encode(longest)) == longest  # it fits one packet
    with pytest.raises(p.LocalProtocolError, match="NUL"):
        run(command="echo a\0b")


def test_a_message_too_large_for_a_packet_is_refused_before_sending() -> None:
    # Control characters take six bytes each in JSON: within MAX_COMMAND, over a packet.
    bulky = run(command="\x01" * (p.MAX_COMMAND // 2))
    with pytest.raises(p.LocalProtocolError, match="too large"):
        p.encode(bulky)
    lines = [f"line {i} " + "x" * 200 for i in range(5000)]
    groups = p.batches(lines)
    assert [line for group in groups for line in group] == lines
    assert all(len(p.encode(p.LogLines(group))) <= p.MAX_PACKET for group in groups)


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: run(app=""), "app must not be empty"),
        (lambda: run(app=1), "app must be a string"),
        (lambda: run(env={"A=B": "x"}), "not a variable name"),
        (lambda: run(env={"A": 1}), "env A must be a string"),
        (lambda: run(pty=p.Pty("xterm", 10001, 24)), "pty cols"),
        (lambda: run(attach=False, await_attach=True), "await_attach needs attach"),
        (lambda: run(attach="yes"), "attach must be true or false"),
        (lambda: p.Signal("STOP"), "not allowed"),
        (lambda: p.Logs("shop", lines=-1), "lines must be a whole number"),
        (lambda: p.Exited(status=256, signal=None), "status"),
        (lambda: enter(dyno=""), "dyno must not be empty"),
        (lambda: enter(subsystem="x11"), "subsystem 'x11' is not offered"),
        (lambda: enter(subsystem="sftp"), "without a command or a terminal"),
        (lambda: run(subsystem="sftp", command=None, merge_output=True), "stdout of its own"),
        (lambda: run(subsystem="sftp", command=None, attach=False), "is attached"),
        (lambda: forward(address="10.0.0.1"), "the dyno's loopback only"),
        (lambda: forward(address="localhost"), "the dyno's loopback only"),
        (lambda: forward(port=0), "port must be from 1 to 65535"),
        (lambda: forward(port=65536), "port must be a whole number"),
        (lambda: p.DynoInfo("run.1", "s", "up", 1.0, "", True, 1.0, 1, -1), "sessions"),
    ],
)
def test_messages_check_their_fields_when_built(build: object, words: str) -> None:
    with pytest.raises(p.LocalProtocolError, match=words):
        build()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("packet", "words"),
    [
        (b"\xff", "not JSON"),
        (b"[]", "not a message object"),
        (b'{"type": "launch"}', "unknown message type"),
        (b'{"type": "run", "app": "a"}', "run:"),  # fields missing
        (b'{"type": "run", "app": "a", "command": null, "connection": "c", "x": 1}', "unknown"),
        (b'{"type": "run", "app": "a", "command": null, "connection": "c", "pty": 3}', "pty"),
        (b'{"type": "signal", "name": "STOP"}', "not allowed"),
    ],
)
def test_bad_packets_are_the_peers_error(packet: bytes, words: str) -> None:
    with pytest.raises(p.RemoteProtocolError, match=words):
        p.Conversation(p.Role.SERVER).receive(packet)


@given(st.dictionaries(st.sampled_from([*sorted(p.MESSAGES), "x"]), st.from_type(object)))
def test_decoding_anything_raises_only_the_peers_error(body: dict[str, object]) -> None:
    try:
        data = json.dumps({"type": "run", **body}, default=repr).encode()
    except (TypeError, ValueError):
        return
    with contextlib.suppress(p.RemoteProtocolError):
        p.decode(data)
