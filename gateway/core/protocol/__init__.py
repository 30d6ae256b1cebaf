"""The front <-> manager protocol, without I/O, in the manner of h11.

One conversation per SEQPACKET connection. The front (the client) opens it with a
request; the request fixes what may follow. Each message is a frozen dataclass that
checks its fields when it is built; `encode` and `decode` turn one into one packet of
JSON and back; a `Conversation` on each side enforces the order of messages and the
descriptors each one carries.

    request           then (C: the front, S: the manager)
    Run, attached     S Started+fds | Refused;  C Signal*;  S Exited
    Run, await_attach S Reserved | Refused;  C Attach;  S Started+fds | Refused;  ...
    Run, detached     S Started | Refused
    Stop              S Stopping | Refused
    Logs              S (LogLines | Dropped)*, End unless tailing | Refused
    Metrics           S MetricsText*, End
    ListDynos         S DynoList | Refused
    CheckKey          S KeyChecked | Refused
    Authorize         S Authorized | Refused
    FrontHello        S FrontSetup+fds | Refused;  C FrontReady;  then silence until closed
    Enter             S Started+fds | Refused;  C Signal*;  S Exited
    Forward           S Forwarded+fd | Refused;  then S Ended when the dyno ends

The descriptors with Started: a PTY master; or stdin, stdout and stderr; or stdin and one
merged output; or, for a subsystem, stdin and stdout. With Forwarded: the connection's
socket, made inside the dyno's network. With FrontSetup: the audit trail's, then one
listening socket per listener (the front holds no database, key file or privileged port
of its own). Closing the connection ends the conversation; the front closing a running
one is its client's hang-up, and the front's setup connection closing means that the
front (or the manager) is gone.

Faults are split as h11 splits them: LocalProtocolError when *we* are about to break the
protocol (our bug, or a value too large for it, such as a command no exec could take),
RemoteProtocolError when the peer did. The message of either is fit for a log line; a
LocalProtocolError raised while building a request from user input is fit for the user.
"""

from gateway.core.protocol.codec import batches, decode, encode
from gateway.core.protocol.conversation import Conversation, Phase, Role
from gateway.core.protocol.fields import (
    MAX_COMMAND,
    SUBSYSTEMS,
    LocalProtocolError,
    ProtocolError,
    Pty,
    RemoteProtocolError,
)
from gateway.core.protocol.messages import (
    LISTENER_NAMES,
    LOOPBACK_ADDRESSES,
    MAX_LISTENERS,
    MAX_PACKET,
    MAX_SECRET,
    MESSAGES,
    REQUESTS,
    SIGNALS,
    Attach,
    Authorize,
    Authorized,
    CheckKey,
    Dropped,
    DynoInfo,
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

__all__ = [
    "LISTENER_NAMES",
    "LOOPBACK_ADDRESSES",
    "MAX_COMMAND",
    "MAX_LISTENERS",
    "MAX_PACKET",
    "MAX_SECRET",
    "MESSAGES",
    "REQUESTS",
    "SIGNALS",
    "SUBSYSTEMS",
    "Attach",
    "Authorize",
    "Authorized",
    "CheckKey",
    "Conversation",
    "Dropped",
    "DynoInfo",
    "DynoList",
    "End",
    "Ended",
    "Enter",
    "Exited",
    "Forward",
    "Forwarded",
    "FrontHello",
    "FrontReady",
    "FrontSetup",
    "KeyChecked",
    "ListDynos",
    "LocalProtocolError",
    "LogLines",
    "Logs",
    "Message",
    "Metrics",
    "MetricsText",
    "Phase",
    "ProtocolError",
    "Pty",
    "Refused",
    "RemoteProtocolError",
    "Reserved",
    "Role",
    "Run",
    "Signal",
    "Started",
    "Stop",
    "Stopping",
    "batches",
    "decode",
    "encode",
]  # fmt: skip
