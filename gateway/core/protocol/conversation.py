"""The order of messages: what each side may send next, with how many descriptors (in
the manner of h11's transition tables)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.core.protocol.codec import decode, encode
from gateway.core.protocol.fields import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from gateway.core.protocol.messages import (
    Attach,
    Authorize,
    Authorized,
    CheckKey,
    Dropped,
    DynoList,
    End,
    Ended,
    Enter,
    Exited,
    Forward,
    Forwarded,
    FrontHello,
    FrontReady,
    FrontSetup,
    KeyChecked,
    ListDynos,
    LogLines,
    Logs,
    Message,
    Metrics,
    MetricsText,
    Refused,
    Reserved,
    Run,
    Signal,
    Started,
    Stop,
    Stopping,
)


class Role(enum.Enum):
    CLIENT = "client"  # the front
    SERVER = "server"  # the manager


class Phase(enum.Enum):
    IDLE = "idle"  # nothing sent yet
    AWAIT_RESERVED = "await reserved"
    RESERVED = "reserved"  # waiting for the client's Attach
    AWAIT_STARTED = "await started"
    RUNNING = "running"  # attached (or entered): signals up, Exited down
    AWAIT_FORWARDED = "await forwarded"
    FORWARDING = "forwarding"  # until the dyno ends (Ended) or either side closes
    STOPPING = "await stopping"
    LOG_STREAM = "streaming logs"  # LogLines and Dropped, until End (never, when tailing)
    METRICS_STREAM = "streaming metrics"
    LISTING = "await dyno list"
    CHECKING_KEY = "await key check"
    AUTHORIZING = "await authorization"
    AWAIT_SETUP = "await front setup"
    SETTING_UP = "setting up the front"  # the front opens its listeners, then says ready
    FRONT_UP = "front up"  # nothing more is said: the connection is the front's lifeline
    DONE = "done"


# (phase, message) -> the next phase, for what each side may send. Run, Started,
# Forwarded and FrontSetup are not here: where they lead, and with how many descriptors,
# depends on the message or the request (see Conversation._advance).
_FROM_CLIENT: dict[tuple[Phase, type[Message]], Phase] = {
    (Phase.IDLE, Stop): Phase.STOPPING,
    (Phase.IDLE, Logs): Phase.LOG_STREAM,
    (Phase.IDLE, Metrics): Phase.METRICS_STREAM,
    (Phase.IDLE, ListDynos): Phase.LISTING,
    (Phase.IDLE, CheckKey): Phase.CHECKING_KEY,
    (Phase.IDLE, Authorize): Phase.AUTHORIZING,
    (Phase.IDLE, FrontHello): Phase.AWAIT_SETUP,
    (Phase.SETTING_UP, FrontReady): Phase.FRONT_UP,
    (Phase.IDLE, Enter): Phase.AWAIT_STARTED,
    (Phase.IDLE, Forward): Phase.AWAIT_FORWARDED,
    (Phase.RESERVED, Attach): Phase.AWAIT_STARTED,
    (Phase.RUNNING, Signal): Phase.RUNNING,
}
_FROM_SERVER: dict[tuple[Phase, type[Message]], Phase] = {
    (Phase.AWAIT_RESERVED, Reserved): Phase.RESERVED,
    (Phase.RUNNING, Exited): Phase.DONE,
    (Phase.STOPPING, Stopping): Phase.DONE,
    (Phase.LISTING, DynoList): Phase.DONE,
    (Phase.FORWARDING, Ended): Phase.DONE,
    (Phase.LOG_STREAM, LogLines): Phase.LOG_STREAM,
    (Phase.LOG_STREAM, Dropped): Phase.LOG_STREAM,
    (Phase.LOG_STREAM, End): Phase.DONE,
    (Phase.METRICS_STREAM, MetricsText): Phase.METRICS_STREAM,
    (Phase.METRICS_STREAM, End): Phase.DONE,
    (Phase.CHECKING_KEY, KeyChecked): Phase.DONE,
    (Phase.AUTHORIZING, Authorized): Phase.DONE,
    **{
        (phase, Refused): Phase.DONE
        for phase in (
            Phase.AWAIT_RESERVED, Phase.AWAIT_STARTED, Phase.STOPPING, Phase.LOG_STREAM,
            Phase.LISTING, Phase.CHECKING_KEY, Phase.AUTHORIZING, Phase.AWAIT_SETUP,
            Phase.AWAIT_FORWARDED,
        )
    },
}  # fmt: skip


@dataclass
class Conversation:
    """One side of one connection: what each side may send next, and with how many
    descriptors. `send` checks our message (LocalProtocolError), `receive` the peer's
    (RemoteProtocolError); both move the phase on."""

    role: Role
    phase: Phase = Phase.IDLE
    request: Message | None = None

    def send(self, message: Message, fds: int = 0) -> bytes:
        self._advance(message, fds, self.role, LocalProtocolError)
        return encode(message)

    def receive(self, data: bytes, fds: int = 0) -> Message:
        message = decode(data)
        peer = Role.SERVER if self.role is Role.CLIENT else Role.CLIENT
        self._advance(message, fds, peer, RemoteProtocolError)
        return message

    def _advance(
        self, message: Message, fds: int, sender: Role, error: type[ProtocolError]
    ) -> None:
        phase, kind = self.phase, type(message)
        table = _FROM_CLIENT if sender is Role.CLIENT else _FROM_SERVER
        wanted_fds = 0
        if sender is Role.CLIENT and phase is Phase.IDLE and isinstance(message, Run):
            after = Phase.AWAIT_RESERVED if message.await_attach else Phase.AWAIT_STARTED
        elif sender is Role.SERVER and phase is Phase.AWAIT_STARTED and kind is Started:
            assert isinstance(self.request, Run | Enter)
            wanted_fds = self.request.stream_count
            after = Phase.RUNNING if self.request.attach else Phase.DONE
        elif sender is Role.SERVER and phase is Phase.AWAIT_FORWARDED and kind is Forwarded:
            wanted_fds, after = 1, Phase.FORWARDING
        elif sender is Role.SERVER and phase is Phase.AWAIT_SETUP and kind is FrontSetup:
            assert isinstance(message, FrontSetup)
            wanted_fds = message.fd_count
            after = Phase.SETTING_UP
        elif (phase, kind) in table:
            after = table[phase, kind]
        else:
            who = "front" if sender is Role.CLIENT else "manager"
            raise error(f"the {who} may not send {message.kind} while {phase.value}")
        if fds != wanted_fds:
            raise error(f"{message.kind} came with {fds} descriptors, not {wanted_fds}")
        if phase is Phase.IDLE:
            self.request = message
        self.phase = after
