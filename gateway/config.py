"""The gateway's settings: one TOML file, every key known, every type checked.

Unknown keys and wrong types are errors that name the key and the file, because a
misspelt `idle_timout` silently ignored is a production incident waiting to happen.
Relative paths are taken relative to the config file's directory; without a file,
relative to `default_home()`, never to the working directory.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import parse_qs, urlsplit

from gateway.cluster_settings import ClusterSettings
from gateway.core.admission import NetblockSize, parse_networks, startup_slots

SANDBOXES = ("auto", "namespaces", "bwrap", "process")
NETWORKS = ("outbound", "none", "host")
# Read-only system dirs a bwrap dyno sees (the "stack"); those missing on the host are skipped.
DEFAULT_STACK = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc")


# Names the directory that holds state/ and keys/ when no config file is given.
HOME_ENV = "GATEWAY_HOME"
# `gateway demo --port-base N` puts the listeners on N, N+1, N+2, N+3, in this order.
PORT_BASE_ORDER = ("ssh", "rendezvous", "api", "metrics")
# Addresses that mean "every interface": no use as the host a client connects to.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key and file."""


@dataclass(frozen=True)
class SSHSettings:
    listen: str = "127.0.0.1:2222"
    # What users type to reach `listen` (printed in hints such as run:detached's): ""
    # means the listen host, or this machine's name when that is a wildcard; 0 means
    # the listen port.
    public_host: str = ""
    public_port: int = 0
    # Seconds between server keepalives, and how many may go unanswered.
    keepalive_interval: int = 15
    keepalive_count_max: int = 4
    login_grace_time: int = 30
    # Admission of connections not yet authenticated (docs/security.md): at most
    # `max_startups` in the handshake at once (N, or OpenSSH's START:RATE:FULL, whose FULL
    # counts), of them at most `per_source_max_startups` from one address and
    # `per_netblock_max_startups` from one netblock (`per_source_netblock_size`, V4:V6
    # prefix lengths); the others wait, up to `login_grace_time`, at most `max_waiting`
    # of them; one netblock holds at most `per_netblock_max_pending`, waiting or not.
    # The same rules, with their own slots, apply to the rendezvous and API listeners.
    max_startups: str = "100"
    per_source_max_startups: int = 10
    per_netblock_max_startups: int = 30
    per_source_netblock_size: str = "24:64"
    max_waiting: int = 1000
    per_netblock_max_pending: int = 500
    max_auth_tries: int = 6
    # Failed authentications from one address within `penalty_time` seconds weighing
    # `penalty_failures` refuse that address for `penalty_time` seconds (a repeated key
    # weighs a tenth; a key failing that often is refused from that address on its own).
    # Addresses in `penalty_exempt` (CIDR blocks) are never penalized.
    penalty_failures: int = 10
    penalty_time: int = 60
    penalty_exempt: tuple[str, ...] = ()
    max_sessions: int = 10
    # Client environment variables that reach a dyno (`*` matches a suffix).
    accept_env: tuple[str, ...] = ("LANG", "LC_*", "TZ")
    # Behind HAProxy (send-proxy-v2): every connection must start with a PROXY protocol
    # v2 header, whose client address counts for admission, penalties, audit and logs.
    proxy_protocol: bool = False

    @property
    def host_port(self) -> tuple[str, int]:
        return split_listen(self.listen)

    @property
    def public_address(self) -> tuple[str, int]:
        """The host and port users connect to: `public_host`/`public_port`, else the
        listen address, with this machine's name standing in for a wildcard host."""
        host, port = self.host_port
        if self.public_host:
            host = self.public_host
        elif host in WILDCARD_HOSTS:
            host = socket.getfqdn()
        return host, self.public_port or port


@dataclass(frozen=True)
class DynoSettings:
    idle_timeout: int = 3600
    max_lifetime: int = 86400
    stop_grace: int = 30
    sandbox: str = "auto"
    # The shell run when a client asks for one (`ssh APP@host`): bash where the dyno has
    # it, else sh.
    shell: str = "bash"
    # Show `Running ... attached to terminal... up, run.N` on stderr for PTY sessions.
    banner: bool = True
    # Concurrent one-off dynos: per app (Heroku's 50) and on this host.
    max_per_app: int = 50
    max_per_host: int = 200
    # The dyno's network, the host dirs it sees read-only, and the bytes it may write in
    # all: /app's changes, /tmp and /dev/shm together (namespaces sandbox; bwrap: /tmp).
    network: str = "outbound"
    stack: tuple[str, ...] = DEFAULT_STACK
    tmp_max_bytes: int = 256 * 1024**2
    # Namespaces sandbox: each app's own uid (and gid), granted once from this range
    # (no host user may own one); the dynos' addresses (a /30 each).
    uid_range: str = "100000-165535"
    subnet: str = "10.199.0.0/16"
    # Sandboxes made ahead, so that a session starts with one message: up to `prepared`
    # per app, release and size used lately, `prepared_max` in all, each kept at most
    # `prepared_idle` seconds unused.
    prepared: int = 2
    prepared_max: int = 16
    prepared_idle: int = 120
    # The largest size an app's dynos may ask for, unless the operator sets another for
    # the app (`gateway apps:update APP --max-size SIZE`); "" allows every size.
    max_size: str = "standard-2x"
    # What all dynos together leave of the host (the gateway's parent cgroup caps them):
    # memory in MB, and processes.
    host_reserve_memory: int = 1024
    host_reserve_pids: int = 1024
    # The SFTP server a dyno runs for `sftp` and `scp` (a path inside the dyno: the
    # stack's /usr); "" refuses the sftp subsystem.
    sftp_server: str = "/usr/lib/openssh/sftp-server"

    @property
    def uid_range_bounds(self) -> tuple[int, int]:
        first, _, last = self.uid_range.partition("-")
        return int(first), int(last)


@dataclass(frozen=True)
class SizeSettings:
    """A dyno size: memory in MB, the most processes, and a CPU share (1.0 = one core)."""

    memory: int = 512
    pids: int = 256
    cpu: float = 1.0


# Heroku's documented limits (HEROKU-COMPAT.md); `[sizes.NAME]` adds or replaces.
DEFAULT_SIZES = {
    "standard-1x": SizeSettings(memory=512, pids=256, cpu=1.0),
    "standard-2x": SizeSettings(memory=1024, pids=512, cpu=2.0),
    "performance-m": SizeSettings(memory=2560, pids=16384, cpu=2.0),
    "performance-l": SizeSettings(memory=14336, pids=32768, cpu=2.0),
}
DEFAULT_SIZE = "standard-1x"


@dataclass(frozen=True)
class SlugSettings:
    # The most bytes a slug may unpack to.
    max_unpacked_bytes: int = 2 * 1024**3


@dataclass(frozen=True)
class LogSettings:
    # Heroku keeps an app's last 1500 log lines.
    lines_per_app: int = 1500
    # What one dyno may add to the app log each second (a burst of that size passes);
    # past it lines are dropped and counted (error L12, docs/cli.md).
    rate_lines: int = 100
    rate_bytes: int = 64 * 1024


@dataclass(frozen=True)
class RendezvousSettings:
    # The TLS listener the heroku CLI attaches to; "" disables it.
    listen: str = "127.0.0.1:5000"
    # The host put in attach_url: what clients use to reach `listen`.
    public_host: str = "127.0.0.1"
    # Names and IP addresses in the server certificate (public_host should be one).
    san: tuple[str, ...] = ("127.0.0.1", "localhost")
    # Seconds a dyno made through the API waits for its client (then R13, status 128).
    attach_timeout: int = 30
    proxy_protocol: bool = False  # as [ssh] proxy_protocol, for this listener


@dataclass(frozen=True)
class APISettings:
    # The Platform API subset the heroku CLI uses (HEROKU_HOST=http://...); "" disables it.
    listen: str = "127.0.0.1:5001"
    proxy_protocol: bool = False  # as [ssh] proxy_protocol, for this listener


@dataclass(frozen=True)
class AuditSettings:
    # JSON lines, one event each; "" puts it at STATE_DIR/audit.jsonl.
    path: str = ""


@dataclass(frozen=True)
class MetricsSettings:
    # Prometheus text endpoint; "" disables it.
    listen: str = "127.0.0.1:9464"


@dataclass(frozen=True)
class FrontSettings:
    # The user the network-facing front runs as when the gateway starts as root (no
    # capabilities, no_new_privs, a syscall filter; docs/security.md). It must exist:
    # useradd --system --no-create-home --shell /usr/sbin/nologin gateway-front.
    # Started as another user, the gateway runs both processes as that user.
    user: str = "gateway-front"
    # true: `gateway serve` starts the front itself. false: the front is started on its
    # own (`gateway _front`, contrib/systemd/gateway-front.service) and connects to `socket`.
    spawn: bool = True
    # The manager's socket, for a front started on its own and for the admin CLI;
    # "" is STATE_DIR/manager.sock. A front started on its own needs one it can reach.
    socket: str = ""


@dataclass(frozen=True)
class ShutdownSettings:
    # On SIGTERM: seconds attached sessions may take to end before they are hung up.
    drain_timeout: int = 10


@dataclass(frozen=True)
class Config:
    state_dir: Path = Path("state")
    keys_dir: Path = Path("keys")
    # postgresql://USER@HOST:PORT/DB: the state in PostgreSQL, shared by every node;
    # "" keeps it in SQLite in state_dir. Never a password (see check_database_url).
    database_url: str = ""
    ssh: SSHSettings = field(default_factory=SSHSettings)
    dynos: DynoSettings = field(default_factory=DynoSettings)
    slugs: SlugSettings = field(default_factory=SlugSettings)
    logs: LogSettings = field(default_factory=LogSettings)
    sizes: dict[str, SizeSettings] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    rendezvous: RendezvousSettings = field(default_factory=RendezvousSettings)
    api: APISettings = field(default_factory=APISettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    shutdown: ShutdownSettings = field(default_factory=ShutdownSettings)
    front: FrontSettings = field(default_factory=FrontSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    source: str = "<defaults>"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "gateway.db"

    @property
    def releases_dir(self) -> Path:
        return self.state_dir / "releases"

    @property
    def slugs_dir(self) -> Path:
        return self.state_dir / "slugs"

    @property
    def dynos_dir(self) -> Path:
        return self.state_dir / "dynos"

    @property
    def audit_path(self) -> Path:
        return Path(self.audit.path) if self.audit.path else self.state_dir / "audit.jsonl"

    @property
    def manager_socket(self) -> Path:
        return Path(self.front.socket) if self.front.socket else self.state_dir / "manager.sock"

    @property
    def attach_host(self) -> str:
        """This node's host in attach_url and logplex_url ([cluster], else [rendezvous])."""
        return self.cluster.public_host or self.rendezvous.public_host


def split_listen(value: str) -> tuple[str, int]:
    """Split `HOST:PORT` (or `[V6]:PORT`) into its parts."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _build(cls: Any, data: dict[str, Any], where: str, source: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}{key}"
        if key not in known:
            raise ConfigError(f"{source}: unknown key {name!r}")
        expected = hints[key]
        if is_dataclass(expected):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name!r} must be a table")
            kwargs[key] = _build(expected, value, f"{name}.", source)
        elif key == "sizes":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name!r} must be a table")
            sizes = dict(DEFAULT_SIZES)
            for size, table in value.items():
                if not isinstance(table, dict):
                    raise ConfigError(f"{source}: 'sizes.{size}' must be a table")
                sizes[size] = _build(SizeSettings, table, f"sizes.{size}.", source)
            kwargs[key] = sizes
        elif expected == tuple[str, ...]:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{source}: {name!r} must be a list of strings")
            kwargs[key] = tuple(value)
        elif expected is float:
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{source}: {name!r} must be a positive number")
            kwargs[key] = float(value)
        elif expected is Path:
            if not isinstance(value, str):
                raise ConfigError(f"{source}: {name!r} must be a string (a path)")
            kwargs[key] = Path(value)
        elif expected is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{source}: {name!r} must be an integer")
            if value < 0:
                raise ConfigError(f"{source}: {name!r} must not be negative")
            kwargs[key] = value
        elif not isinstance(value, expected):
            raise ConfigError(f"{source}: {name!r} must be a {expected.__name__}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def parse(data: dict[str, Any], source: str = "<defaults>", base: Path | None = None) -> Config:
    """Build a Config from parsed TOML, checking every key and value."""
    config: Config = _build(Config, data, "", source)
    if config.dynos.sandbox not in SANDBOXES:
        raise ConfigError(
            f"{source}: 'dynos.sandbox' must be one of {', '.join(SANDBOXES)}, "
            f"got {config.dynos.sandbox!r}"
        )
    try:
        uid_first, uid_last = config.dynos.uid_range_bounds
    except ValueError:
        raise ConfigError(
            f"{source}: 'dynos.uid_range' must be FIRST-LAST, such as 100000-165535"
        ) from None
    if not 1000 <= uid_first <= uid_last < 2**31:
        raise ConfigError(
            f"{source}: 'dynos.uid_range' must lie between 1000 and 2147483647, "
            "above every host user's uid"
        )
    try:
        subnet = ipaddress.IPv4Network(config.dynos.subnet)
    except ValueError:
        raise ConfigError(f"{source}: 'dynos.subnet' must be an IPv4 network") from None
    if subnet.prefixlen > 28:
        raise ConfigError(f"{source}: 'dynos.subnet' {subnet} has room for too few dynos")
    if config.dynos.max_size and config.dynos.max_size not in config.sizes:
        raise ConfigError(
            f"{source}: 'dynos.max_size' {config.dynos.max_size!r} is not a size: choose "
            f'one of {", ".join(config.sizes)} (or "" for every size)'
        )
    if config.dynos.sftp_server and not config.dynos.sftp_server.startswith("/"):
        raise ConfigError(
            f"{source}: 'dynos.sftp_server' must be an absolute path inside the dyno "
            '(or "" to refuse sftp)'
        )
    if config.dynos.network not in NETWORKS:
        raise ConfigError(
            f"{source}: 'dynos.network' must be one of {', '.join(NETWORKS)}, "
            f"got {config.dynos.network!r}"
        )
    for key, value in (
        ("ssh.listen", config.ssh.listen),
        ("rendezvous.listen", config.rendezvous.listen or "x:0"),
        ("api.listen", config.api.listen or "x:0"),
        ("metrics.listen", config.metrics.listen or "x:0"),
        ("cluster.agent_listen", config.cluster.agent_listen or "x:0"),
    ):
        try:
            split_listen(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key!r}: {exc}") from None
    if not 0 <= config.ssh.public_port <= 65535:
        raise ConfigError(f"{source}: 'ssh.public_port' must be a port number (0: the listen port)")
    if config.database_url:
        check_database_url(config.database_url, source)
    if problem := config.cluster.problem():
        raise ConfigError(f"{source}: {problem}")
    base = base or default_home()[0]
    for key, check in (
        ("max_startups", startup_slots),
        ("per_source_netblock_size", NetblockSize.parse),
        ("penalty_exempt", parse_networks),
    ):
        try:
            check(getattr(config.ssh, key))
        except ValueError as exc:
            raise ConfigError(f"{source}: 'ssh.{key}': {exc}") from None
    if config.audit.path:
        config = replace(config, audit=AuditSettings(str((base / config.audit.path).resolve())))
    if config.front.socket:
        socket_path = str((base / config.front.socket).resolve())
        config = replace(config, front=replace(config.front, socket=socket_path))
    if config.front.user in ("", "root"):
        raise ConfigError(f"{source}: 'front.user' must name an unprivileged user")
    return replace(
        config,
        state_dir=(base / config.state_dir).resolve(),
        keys_dir=(base / config.keys_dir).resolve(),
        source=source,
    )


def default_home(package: Path = Path(__file__)) -> tuple[Path, str]:
    """The directory holding `state/` and `keys/` when no config file names them, and
    why that one (for `gateway check` and the start-up line):

    1. `$GATEWAY_HOME` (./dev sets it to its checkout);
    2. the source checkout `package` belongs to (a checkout has `pyproject.toml` and
       `dev` next to `gateway/`), where ./dev demo has always put them;
    3. `$XDG_STATE_HOME/gateway`, by default `~/.local/state/gateway`, for an installed
       package.

    Never the working directory: `gateway apps` must mean the same from anywhere."""
    named = os.environ.get(HOME_ENV)
    if named:
        return Path(named).resolve(), f"${HOME_ENV}"
    checkout = package.resolve().parent.parent
    try:
        in_checkout = (checkout / "pyproject.toml").is_file() and (checkout / "dev").is_file()
    except OSError:  # not ours to look into
        in_checkout = False
    if in_checkout:
        return checkout, "the checkout the gateway runs from"
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg).resolve() / "gateway", "the per-user state directory ($XDG_STATE_HOME)"


def with_port_base(config: Config, base: int) -> Config:
    """`config` with its enabled listeners moved to ports base, base+1, ... in
    PORT_BASE_ORDER, each on its configured host (`gateway demo --port-base`)."""
    if not 1 <= base <= 65535 - len(PORT_BASE_ORDER) + 1:
        raise ConfigError(
            f"--port-base must be from 1 to {65535 - len(PORT_BASE_ORDER) + 1}, got {base}"
        )
    changes = {}
    for offset, table in enumerate(PORT_BASE_ORDER):
        settings = getattr(config, table)
        if settings.listen:
            host, _ = split_listen(settings.listen)
            shown = f"[{host}]" if ":" in host else host
            changes[table] = replace(settings, listen=f"{shown}:{base + offset}")
    return replace(config, **changes)


def check_database_url(url: str, source: str) -> None:
    """ConfigError unless `url` is a PostgreSQL URL without a password in it (the config
    file is not where secrets go; libpq reads them from its own places)."""
    try:
        parts = urlsplit(url)
        password = parts.password
        query = parse_qs(parts.query)
    except ValueError as exc:
        raise ConfigError(f"{source}: 'database_url' is not a URL: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"{source}: 'database_url' must look like postgresql://USER@HOST:PORT/DB "
            f"(scheme {parts.scheme or '(none)'!r} is not PostgreSQL's)"
        )
    if password is not None or "password" in query:
        # The message never repeats the URL: it holds the password.
        raise ConfigError(
            f"{source}: 'database_url' must not hold a password: give it in the "
            "PGPASSWORD environment variable, in ~/.pgpass, or in a passfile named by "
            "?passfile=PATH in the URL"
        )


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config from `path`, else `$GATEWAY_CONFIG`, else the built-in defaults
    (with paths under `default_home()`)."""
    if path is None:
        path = os.environ.get("GATEWAY_CONFIG") or None
    if path is None:
        return parse({})
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse(data, source=str(file), base=file.resolve().parent)
