"""The protocol's messages: frozen, and checked when built (a bad value raises
LocalProtocolError, which `decode` turns into RemoteProtocolError for the peer's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from gateway.core.protocol.fields import (
    MAX_COMMAND,
    LocalProtocolError,
    Pty,
    check_count,
    check_flag,
    check_lines,
    check_names,
    check_optional_text,
    check_process,
    check_text,
    count_streams,
)

# The largest message. A SEQPACKET message must fit the socket's send buffer (212,992
# bytes by default on Linux, and an unprivileged process cannot raise it past wmem_max).
MAX_PACKET = 200 * 1024
MAX_SECRET = 64 * 1024  # a private key or certificate chain, as PEM text
MAX_LISTENERS = 12  # listening sockets handed to the front (systemd may pass several)
LISTENER_NAMES = frozenset({"ssh", "rendezvous", "api", "metrics"})

# RFC 4254 section 6.10 signal names: the only ones a client may send to a dyno.
SIGNALS = frozenset(
    {"ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT", "SEGV", "TERM",
     "USR1", "USR2"}
)  # fmt: skip
# What a forwarded connection may reach: the dyno's own loopback, nothing else.
LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "::1"})


# -- the messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """Every message: `kind` names it on the wire."""

    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class Run(Message):
    """Start a one-off dyno of `app` running `command` (None: a shell)."""

    kind: ClassVar[str] = "run"
    app: str
    command: str | None
    connection: str  # the front's id of the client connection, for the manager's log
    pty: Pty | None = None
    env: dict[str, str] = field(default_factory=dict)
    size: str | None = None
    attach: bool = True
    # The rendezvous: reserve run.N now, start the process when the client arrives.
    await_attach: bool = False
    # One stream for stdout and stderr (the rendezvous carries them merged).
    merge_output: bool = False
    # A subsystem instead of a command: its stderr is the manager's (sftp-server's log,
    # for the audit trail), so Started carries stdin and stdout.
    subsystem: str | None = None

    def __post_init__(self) -> None:
        check_text(self.app, "app")
        check_process(self)
        check_optional_text(self.size, "size")
        for name in ("attach", "await_attach", "merge_output"):
            check_flag(getattr(self, name), name)
        if self.await_attach and not self.attach:
            raise LocalProtocolError("await_attach needs attach")
        if self.subsystem is not None and (not self.attach or self.merge_output):
            raise LocalProtocolError("a subsystem is attached, with stdout of its own")

    @property
    def stream_count(self) -> int:
        """How many descriptors Started carries for this request."""
        if not self.attach:
            return 0
        return count_streams(self.pty, self.subsystem, self.merge_output)


@dataclass(frozen=True)
class Enter(Message):
    """Start a process inside the running dyno `dyno` of `app` (`ssh APP.run.N`): in its
    namespaces, cgroup and root, as its user, with its environment. `command` None: a
    shell; `subsystem`: sftp-server, as with Run."""

    kind: ClassVar[str] = "enter"
    app: str
    dyno: str
    command: str | None
    connection: str
    pty: Pty | None = None
    env: dict[str, str] = field(default_factory=dict)
    subsystem: str | None = None

    def __post_init__(self) -> None:
        check_text(self.app, "app")
        check_text(self.dyno, "dyno")
        check_process(self)

    @property
    def attach(self) -> bool:
        return True

    @property
    def stream_count(self) -> int:
        return count_streams(self.pty, self.subsystem, False)


@dataclass(frozen=True)
class Forward(Message):
    """A TCP connection to `port` on `address` (its loopback) inside the running dyno
    `dyno` of `app`, for an SSH direct-tcpip channel (`ssh -L`, `-D`)."""

    kind: ClassVar[str] = "forward"
    app: str
    dyno: str
    address: str
    port: int
    connection: str

    def __post_init__(self) -> None:
        check_text(self.app, "app")
        check_text(self.dyno, "dyno")
        if self.address not in LOOPBACK_ADDRESSES:
            raise LocalProtocolError("a forwarded connection goes to the dyno's loopback only")
        check_count(self.port, "port", 65535)
        if self.port == 0:
            raise LocalProtocolError("port must be from 1 to 65535")
        check_text(self.connection, "connection")


@dataclass(frozen=True)
class Stop(Message):
    """run:stop: SIGTERM, stop_grace, SIGKILL; the answer comes at once."""

    kind: ClassVar[str] = "stop"
    app: str
    dyno: str

    def __post_init__(self) -> None:
        check_text(self.app, "app")
        check_text(self.dyno, "dyno")


@dataclass(frozen=True)
class Logs(Message):
    """The app log's last `lines` (of one dyno, if given); with `tail`, new ones too."""

    kind: ClassVar[str] = "logs"
    app: str
    dyno: str | None = None
    lines: int = 100
    tail: bool = False

    def __post_init__(self) -> None:
        check_text(self.app, "app")
        check_optional_text(self.dyno, "dyno")
        check_count(self.lines, "lines", 100_000)
        check_flag(self.tail, "tail")


@dataclass(frozen=True)
class Metrics(Message):
    """The manager's Prometheus text."""

    kind: ClassVar[str] = "metrics"


@dataclass(frozen=True)
class ListDynos(Message):
    """The app's running dynos (or the one named), from the one source of truth."""

    kind: ClassVar[str] = "list_dynos"
    app: str
    dyno: str | None = None

    def __post_init__(self) -> None:
        check_text(self.app, "app")
        check_optional_text(self.dyno, "dyno")


@dataclass(frozen=True)
class Attach(Message):
    """The rendezvous client arrived: start the reserved dyno."""

    kind: ClassVar[str] = "attach"


@dataclass(frozen=True)
class Signal(Message):
    """An SSH `signal` request, for the dyno's foreground job."""

    kind: ClassVar[str] = "signal"
    name: str

    def __post_init__(self) -> None:
        if self.name not in SIGNALS:
            raise LocalProtocolError(f"signal {str(self.name)[:16]!r} is not allowed")


@dataclass(frozen=True)
class DynoInfo:
    """A dyno as clients are told of it (run:list, ps, the Platform API)."""

    name: str
    size: str
    state: str
    since: float  # when it entered its state, seconds since the epoch
    command: str
    attached: bool
    created_at: float
    release_version: int
    sessions: int = 0  # processes entered into it now (ssh APP.run.N, sftp)
    forwards: int = 0  # forwarded connections into it now

    def __post_init__(self) -> None:
        for name in ("name", "size", "state"):
            check_text(getattr(self, name), f"dyno {name}")
        check_text(self.command, "dyno command", limit=MAX_COMMAND, empty=True)
        for name in ("since", "created_at"):
            if isinstance(getattr(self, name), bool) or not isinstance(
                getattr(self, name), int | float
            ):
                raise LocalProtocolError(f"dyno {name} must be a time")
        check_flag(self.attached, "dyno attached")
        check_count(self.release_version, "dyno release_version", 2**31)
        check_count(self.sessions, "dyno sessions", 2**31)
        check_count(self.forwards, "dyno forwards", 2**31)


@dataclass(frozen=True)
class Reserved(Message):
    """Run with await_attach: the dyno is named and waits for its client."""

    kind: ClassVar[str] = "reserved"
    dyno: DynoInfo


@dataclass(frozen=True)
class Started(Message):
    """The dyno is up; its streams come with this message when attached."""

    kind: ClassVar[str] = "started"
    dyno: DynoInfo


@dataclass(frozen=True)
class Exited(Message):
    """How the dyno's command ended: a status, or the signal that killed it."""

    kind: ClassVar[str] = "exited"
    status: int | None
    signal: str | None

    def __post_init__(self) -> None:
        if self.status is not None:
            check_count(self.status, "status", 255)
        check_optional_text(self.signal, "signal")


@dataclass(frozen=True)
class Forwarded(Message):
    """The forwarded connection: its socket comes with this message (still connecting:
    writable once it is connected, or failed)."""

    kind: ClassVar[str] = "forwarded"


@dataclass(frozen=True)
class Ended(Message):
    """The dyno a forwarded connection went into has ended: close it."""

    kind: ClassVar[str] = "ended"


@dataclass(frozen=True)
class Stopping(Message):
    kind: ClassVar[str] = "stopping"
    dyno: str

    def __post_init__(self) -> None:
        check_text(self.dyno, "dyno")


@dataclass(frozen=True)
class LogLines(Message):
    kind: ClassVar[str] = "log"
    lines: tuple[str, ...]

    def __post_init__(self) -> None:
        check_lines(self.lines, "lines")


@dataclass(frozen=True)
class Dropped(Message):
    """Lines a slow reader missed (its queue was full), counted."""

    kind: ClassVar[str] = "dropped"
    count: int

    def __post_init__(self) -> None:
        check_count(self.count, "count", 2**62)


@dataclass(frozen=True)
class MetricsText(Message):
    kind: ClassVar[str] = "metrics_text"
    lines: tuple[str, ...]

    def __post_init__(self) -> None:
        check_lines(self.lines, "lines")


@dataclass(frozen=True)
class DynoList(Message):
    kind: ClassVar[str] = "dyno_list"
    dynos: tuple[DynoInfo, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.dynos, tuple) or not all(
            isinstance(d, DynoInfo) for d in self.dynos
        ):
            raise LocalProtocolError("dynos must be a list of dynos")


@dataclass(frozen=True)
class End(Message):
    """The end of a stream of LogLines or MetricsText."""

    kind: ClassVar[str] = "end"


@dataclass(frozen=True)
class Refused(Message):
    """The manager will not carry out the request; `message` is for the user."""

    kind: ClassVar[str] = "refused"
    message: str

    def __post_init__(self) -> None:
        check_text(self.message, "message", limit=4096)


# -- what the front asks of the privileged side: it holds no database, keys or ports ----


@dataclass(frozen=True)
class CheckKey(Message):
    """May the key with this SHA256 fingerprint log in to `app`?"""

    kind: ClassVar[str] = "check_key"
    app: str
    fingerprint: str

    def __post_init__(self) -> None:
        check_text(self.app, "app")
        check_text(self.fingerprint, "fingerprint")


@dataclass(frozen=True)
class KeyChecked(Message):
    kind: ClassVar[str] = "key_checked"
    allowed: bool

    def __post_init__(self) -> None:
        check_flag(self.allowed, "allowed")


@dataclass(frozen=True)
class Authorize(Message):
    """A Platform API token: which apps it may use, and whether `app` (if given) is
    one of them and exists."""

    kind: ClassVar[str] = "authorize"
    token: str
    app: str | None = None

    def __post_init__(self) -> None:
        check_text(self.token, "token", limit=1024)
        check_optional_text(self.app, "app")


@dataclass(frozen=True)
class Authorized(Message):
    """`valid`: the token is known; `apps`: the ones it may use; `app_created_at`: when
    the asked-for app was made, None if it is not one of them (or was not asked for)."""

    kind: ClassVar[str] = "authorized"
    valid: bool
    apps: tuple[str, ...] = ()
    app_created_at: float | None = None

    def __post_init__(self) -> None:
        check_flag(self.valid, "valid")
        check_names(self.apps, "apps", 100_000)
        if self.app_created_at is not None and (
            isinstance(self.app_created_at, bool)
            or not isinstance(self.app_created_at, int | float)
        ):
            raise LocalProtocolError("app_created_at must be a time")


@dataclass(frozen=True)
class FrontHello(Message):
    """The front has started (and dropped its privileges): it asks for its listeners,
    keys and audit trail. Its connection then stays open for the front's life."""

    kind: ClassVar[str] = "front_hello"


@dataclass(frozen=True)
class FrontSetup(Message):
    """What the front needs from the privileged side, in memory: the audit trail's
    descriptor and one listening socket per name in `listeners` (in that order), the
    host keys and the rendezvous certificate chain and key (PEM; empty without one)."""

    kind: ClassVar[str] = "front_setup"
    listeners: tuple[str, ...]
    host_keys: tuple[str, ...]
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        check_names(self.listeners, "listeners", MAX_LISTENERS)
        unknown = set(self.listeners) - LISTENER_NAMES
        if unknown:
            raise LocalProtocolError(f"unknown listener {sorted(unknown)[0][:32]!r}")
        check_lines(self.host_keys, "host_keys")
        if not self.host_keys or len(self.host_keys) > 8:
            raise LocalProtocolError("host_keys must hold from 1 to 8 keys")
        for key in self.host_keys:
            check_text(key, "host key", limit=MAX_SECRET)
        check_text(self.tls_cert, "tls_cert", limit=MAX_SECRET, empty=True)
        check_text(self.tls_key, "tls_key", limit=MAX_SECRET, empty=True)

    @property
    def fd_count(self) -> int:
        """The audit trail, then the listeners."""
        return 1 + len(self.listeners)


@dataclass(frozen=True)
class FrontReady(Message):
    """The front accepts connections on every listener it was given."""

    kind: ClassVar[str] = "front_ready"


REQUESTS: tuple[type[Message], ...] = (
    Run, Stop, Logs, Metrics, ListDynos, CheckKey, Authorize, FrontHello, Enter, Forward,
)  # fmt: skip
_ALL: tuple[type[Message], ...] = (
        *REQUESTS, Attach, Signal, Reserved, Started, Exited, Stopping, LogLines, Dropped,
        MetricsText, DynoList, End, Refused, KeyChecked, Authorized, FrontSetup, FrontReady,
        Forwarded, Ended,
    )  # fmt: skip
MESSAGES: dict[str, type[Message]] = {cls.kind: cls for cls in _ALL}
