"""The `gateway` command: local administration, `serve` and `demo`."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import secrets
import shlex
import socket
import stat
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import config as config_module
from gateway.audit import AuditLog
from gateway.config import Config, ConfigError, split_listen
from gateway.core.authorized_keys import BadKey, parse_text
from gateway.core.commands import format_ps
from gateway.core.names import InvalidName, check_app_name, check_config_var
from gateway.keys import HOST_KEY_NAMES, ensure_host_keys, public_key, write_key_pair
from gateway.manager_client import ManagerUnreachable, request
from gateway.store import Store, StoreError, StoreUnavailable, open_store
from gateway.tls import ensure_rendezvous_cert

Handler = Callable[[argparse.Namespace, Config], int]
COMMANDS: dict[str, tuple[Handler, str, Callable[[argparse.ArgumentParser], None]]] = {}


class UserError(Exception):
    """A mistake the user can fix; printed as `gateway: MESSAGE`, exit status 1."""


def command(name: str, help: str, *args: Callable[[argparse.ArgumentParser], None]) -> Any:
    def register(handler: Handler) -> Handler:
        def add_arguments(parser: argparse.ArgumentParser) -> None:
            for add in args:
                add(parser)

        COMMANDS[name] = (handler, help, add_arguments)
        return handler

    return register


def app_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("app", help="the app's name")


def json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _store(config: Config) -> Store:
    return open_store(config)


def _audit(config: Config, kind: str, **fields: Any) -> None:
    """An admin change, in the audit trail (who: the local user running the command)."""
    AuditLog(config.audit_path).event(kind, by=getpass.getuser(), **fields)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# -- apps ------------------------------------------------------------------------------


@command("apps:create", "create an app", app_arg, json_arg)
def apps_create(args: argparse.Namespace, config: Config) -> int:
    app = _store(config).create_app(check_app_name(args.app))
    _audit(config, "app_created", app=app.name)
    if args.json:
        _print_json({"name": app.name, "size": app.size, "created_at": _when(app.created_at)})
    else:
        print(f"Created {app.name}")
    return 0


@command("apps", "list the apps", json_arg)
def apps_list(args: argparse.Namespace, config: Config) -> int:
    apps = _store(config).list_apps()
    if args.json:
        _print_json(
            [{"name": a.name, "size": a.size, "created_at": _when(a.created_at)} for a in apps]
        )
    else:
        print("\n".join(app.name for app in apps) if apps else "No apps yet.")
    return 0


# -- releases --------------------------------------------------------------------------


def _release_json(release: Any) -> dict[str, Any]:
    data = asdict(release)
    data["created_at"] = _when(release.created_at)
    return data


@command(
    "releases:create",
    "import a slug (tar.gz of an app dir) as the app's next release",
    app_arg,
    lambda p: p.add_argument("slug", type=Path, help="the slug archive"),
    json_arg,
)
def releases_create(args: argparse.Namespace, config: Config) -> int:
    from gateway.slugs import SlugRefused, unpack

    store = _store(config)
    app = store.app(args.app)
    if not args.slug.is_file():
        raise UserError(f"{args.slug}: no such file")
    release_root = config.releases_dir / app.name
    release_root.mkdir(parents=True, exist_ok=True)
    incoming = release_root / f".incoming-{secrets.token_hex(4)}"
    try:
        unpacked = unpack(
            args.slug, incoming, config.slugs.max_unpacked_bytes, progress=_progress(args.slug)
        )
    except SlugRefused as exc:
        raise UserError(f"slug refused: {exc}") from None
    try:

        def place(version: int) -> None:
            incoming.rename(release_root / f"v{version}")

        # The store keeps the archive itself (its digest checked against the one just
        # unpacked): in the database, or under state_dir/slugs with SQLite.
        release = store.add_release(
            app.name,
            unpacked.sha256,
            unpacked.size,
            unpacked.unpacked_bytes,
            unpacked.procfile,
            place=place,
            slug=args.slug,
        )
    finally:
        from gateway.slugs import remove_tree

        if incoming.exists():
            remove_tree(incoming)
    _audit(config, "release_created", app=app.name, version=release.version, sha256=unpacked.sha256)
    if args.json:
        _print_json(_release_json(release))
    else:
        types = ", ".join(sorted(release.procfile)) or "none"
        print(f"Released v{release.version} of {app.name} (process types: {types})")
    return 0


def _progress(path: Path) -> Callable[[int, int], None] | None:
    """Progress on stderr for archives big enough to take a while."""
    if path.stat().st_size < 32 * 1024**2:
        return None
    shown = {"percent": -1}

    def report(done: int, total: int) -> None:
        percent = done * 100 // max(total, 1)
        if percent // 5 != shown["percent"] // 5:
            shown["percent"] = percent
            print(f"unpacking {path.name}: {percent}% of {total // 1024**2} MB", file=sys.stderr)

    return report


@command("releases", "list an app's releases", app_arg, json_arg)
def releases_list(args: argparse.Namespace, config: Config) -> int:
    releases = _store(config).list_releases(args.app)
    if args.json:
        _print_json([_release_json(r) for r in releases])
        return 0
    if not releases:
        print(f"{args.app} has no releases yet.")
    for r in reversed(releases):
        print(
            f"v{r.version}  {_when(r.created_at)}  sha256:{r.slug_sha256[:12]}  "
            f"{r.slug_size} bytes  types: {', '.join(sorted(r.procfile)) or '-'}"
        )
    return 0


# -- config vars -----------------------------------------------------------------------


@command(
    "config:set",
    "set config vars (K=V ...)",
    app_arg,
    lambda p: p.add_argument("pairs", nargs="+", metavar="K=V"),
)
def config_set(args: argparse.Namespace, config: Config) -> int:
    values = {}
    for pair in args.pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"{pair!r} is not KEY=VALUE")
        values[check_config_var(key)] = value
    _store(config).set_config(args.app, values)
    _audit(config, "config_set", app=args.app, keys=sorted(values))  # never the values
    print(f"Set {', '.join(values)} on {args.app}")
    return 0


@command("config:unset", "remove config vars", app_arg, lambda p: p.add_argument("keys", nargs="+"))
def config_unset(args: argparse.Namespace, config: Config) -> int:
    _store(config).unset_config(args.app, args.keys)
    _audit(config, "config_unset", app=args.app, keys=sorted(args.keys))
    print(f"Unset {', '.join(args.keys)} on {args.app}")
    return 0


@command("config", "show config vars", app_arg, json_arg)
def config_show(args: argparse.Namespace, config: Config) -> int:
    values = _store(config).get_config(args.app)
    if args.json:
        _print_json(values)
    else:
        for key, value in values.items():
            print(f"{key}={value}")
    return 0


# -- keys ------------------------------------------------------------------------------


@command(
    "keys:add",
    "authorize SSH public keys for an app (a .pub or authorized_keys file)",
    app_arg,
    lambda p: p.add_argument("file", type=Path),
)
def keys_add(args: argparse.Namespace, config: Config) -> int:
    try:
        text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{args.file}: {exc}") from None
    try:
        keys = parse_text(text)
    except BadKey as exc:
        public = Path(f"{args.file}.pub")
        if str(args.file) != "-" and "private key" in str(exc) and public.is_file():
            raise UserError(f"{args.file} is a private key: did you mean {public}?") from None
        raise UserError(f"{args.file}: {exc}") from None
    store = _store(config)
    for key in keys:
        added = store.add_key(args.app, key.fingerprint, key.line, key.comment)
        if added:
            _audit(config, "key_added", app=args.app, key=key.fingerprint)
        print(f"{'Added' if added else 'Already there'}: {key.fingerprint} {key.comment}".rstrip())
    return 0


@command("keys", "list an app's key fingerprints", app_arg, json_arg)
def keys_list(args: argparse.Namespace, config: Config) -> int:
    keys = _store(config).list_keys(args.app)
    if args.json:
        _print_json([asdict(key) for key in keys])
    else:
        for key in keys:
            print(f"{key.fingerprint} {key.comment}".rstrip())
    return 0


@command(
    "keys:remove",
    "revoke a key by fingerprint",
    app_arg,
    lambda p: p.add_argument("fingerprint"),
)
def keys_remove(args: argparse.Namespace, config: Config) -> int:
    if not _store(config).remove_key(args.app, args.fingerprint):
        raise UserError(f"no key {args.fingerprint} on {args.app}")
    _audit(config, "key_removed", app=args.app, key=args.fingerprint)
    print(f"Removed {args.fingerprint} from {args.app}")
    return 0


# -- the app log -----------------------------------------------------------------------


@command(
    "logs",
    "show the app log (Heroku's line format); --tail follows it",
    app_arg,
    lambda p: p.add_argument("-p", "--dyno", help="only this dyno's lines (run.N)"),
    lambda p: p.add_argument("-n", "--num", type=int, default=100, help="how many lines"),
    lambda p: p.add_argument("-t", "--tail", action="store_true", help="follow new lines"),
)
def logs(args: argparse.Namespace, config: Config) -> int:
    if not args.tail:
        for line in _store(config).read_log(args.app, dyno=args.dyno, lines=args.num):
            print(line.format())
        return 0
    fields = {"app": args.app, "dyno": args.dyno, "lines": args.num, "tail": True}
    for message in _manager(config, "logs", **fields):
        if message["type"] == "log":
            for line in message["lines"]:
                print(line, flush=True)
        elif message["type"] == "dropped":
            print(f"gateway: {message['count']} log lines dropped", file=sys.stderr)
    return 0


# -- dynos -----------------------------------------------------------------------------


@command("ps", "list an app's running one-off dynos", app_arg, json_arg)
def ps(args: argparse.Namespace, config: Config) -> int:
    rows = [dyno.row() for dyno in _store(config).list_dynos(args.app, running=True)]
    if args.json:
        _print_json([row.as_json() for row in rows])
    else:
        print(format_ps(rows, time.time()), end="")
    return 0


@command(
    "ps:stop",
    "stop a dyno: SIGTERM, stop_grace, SIGKILL",
    app_arg,
    lambda p: p.add_argument("dyno", help="run.N"),
)
def ps_stop(args: argparse.Namespace, config: Config) -> int:
    for _ in _manager(config, "stop", app=args.app, dyno=args.dyno):
        print(f"Stopping {args.dyno} dyno on {args.app}... done")
    return 0


@command(
    "apps:update",
    "change an app's default dyno size",
    app_arg,
    lambda p: p.add_argument("--size", required=True, help="a size from [sizes]"),
)
def apps_update(args: argparse.Namespace, config: Config) -> int:
    if args.size not in config.sizes:
        raise UserError(f"unknown dyno size {args.size!r}: choose one of {', '.join(config.sizes)}")
    _store(config).set_app_size(args.app, args.size)
    _audit(config, "app_updated", app=args.app, size=args.size)
    print(f"{args.app} now runs {args.size} dynos by default")
    return 0


@command(
    "usage",
    "dyno-seconds of ended dynos, per app and size",
    lambda p: p.add_argument("app", nargs="?", help="only this app"),
    lambda p: p.add_argument("--since", help="only dynos started on or after DATE (YYYY-MM-DD)"),
    json_arg,
)
def usage(args: argparse.Namespace, config: Config) -> int:
    since = 0.0
    if args.since:
        try:
            since = datetime.fromisoformat(args.since).replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise UserError(
                f"--since takes a date such as 2026-11-01, not {args.since!r}"
            ) from None
    rows = _store(config).usage(args.app, since)
    if args.json:
        _print_json([asdict(row) for row in rows])
        return 0
    for row in rows:
        print(f"{row.app}  {row.size}  {row.dynos} dynos  {row.seconds:.0f} dyno-seconds")
    return 0


def _manager(config: Config, kind: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """The running gateway's replies to one request; its errors become UserErrors."""
    try:
        for message in request(config.manager_socket, kind, **fields):
            if message["type"] == "error":
                raise UserError(str(message["message"]))
            yield message
    except ManagerUnreachable as exc:
        raise UserError(str(exc)) from None


# -- API tokens ------------------------------------------------------------------------


@command(
    "tokens:create",
    "make a Platform API token (HEROKU_API_KEY) for the given apps; prints it",
    lambda p: p.add_argument("--app", action="append", required=True, help="repeat for more"),
)
def tokens_create(args: argparse.Namespace, config: Config) -> int:
    token = secrets.token_urlsafe(32)
    _store(config).add_token(token, args.app)
    _audit(config, "token_created", apps=sorted(args.app))  # never the token
    print(token)
    return 0


# -- serving ---------------------------------------------------------------------------


def _front_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "gateway"]
    if args.config:
        argv += ["--config", str(args.config)]
    argv.append("_front")
    if getattr(args, "port_base", None) is not None:
        argv += ["--port-base", str(args.port_base)]
    return argv


def where_state_lives(config: Config) -> str:
    """`state in /x/state, keys in /x/keys (from FILE)`: said at start and by `gateway
    check`, since without a config file the answer is not obvious (config.default_home)."""
    if config.source == "<defaults>":
        home, why = config_module.default_home()
        origin = f"built-in defaults; {home} is {why}"
    else:
        origin = f"from {config.source}"
    return f"state in {config.state_dir}, keys in {config.keys_dir} ({origin})"


def _config_file_hint(config: Config, key: str, command: str) -> str:
    if config.source == "<defaults>":
        return f"set {key} in a config file (gateway --config FILE {command})"
    return f"set {key} in {config.source}"


def _start(
    config: Config,
    args: argparse.Namespace,
    on_ready: Callable[[], None],
    how_to_move: Callable[[str], str],
) -> int:
    from gateway.manager.main import run

    _setup_logging()
    config.state_dir.mkdir(parents=True, exist_ok=True)
    for path in ensure_host_keys(config.keys_dir):
        key = public_key(path)
        print(f"host key {key.key_type} {key.fingerprint}", file=sys.stderr)
    if config.rendezvous.listen:
        ensure_rendezvous_cert(config.keys_dir, config.rendezvous.san)
    return run(config, _front_argv(args), on_ready, how_to_move)


@command("serve", "run the gateway (SSH front and dyno manager)")
def serve(args: argparse.Namespace, config: Config) -> int:
    print(f"gateway: {where_state_lives(config)}", file=sys.stderr, flush=True)
    host, port = config.ssh.host_port

    def ready() -> None:
        print(f"gateway: SSH listening on {host}:{port}", file=sys.stderr, flush=True)

    def how_to_move(table: str) -> str:
        return _config_file_hint(config, f"[{table}] listen", "serve")

    return _start(config, args, ready, how_to_move)


def port_base_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port-base",
        type=int,
        metavar="N",
        help="listen on ports N (SSH), N+1 (rendezvous), N+2 (API), N+3 (metrics) "
        "instead of the configured ones",
    )


@command("_front", argparse.SUPPRESS, port_base_arg)
def front(args: argparse.Namespace, config: Config) -> int:
    from gateway.front.main import run

    _setup_logging()
    ready = os.environ.pop("GATEWAY_READY_FD", None)
    lifeline = os.environ.pop("GATEWAY_LIFELINE_FD", None)
    return run(config, int(ready) if ready else None, int(lifeline) if lifeline else None)


@command("check", "check config, keys, sandbox, state DB and ports; exit 1 on a problem")
def check(args: argparse.Namespace, config: Config) -> int:
    """For operators and for systemd (ExecStartPre): every line says what was checked."""
    from gateway.manager.main import SandboxUnavailable, choose_sandbox

    results: list[tuple[bool, str]] = [
        (
            True,
            "config: no file, built-in defaults (--config FILE or $GATEWAY_CONFIG names one)"
            if config.source == "<defaults>"
            else f"config: {config.source}",
        ),
        (True, where_state_lives(config)),
    ]
    for name in HOST_KEY_NAMES:
        path = config.keys_dir / name
        if not path.exists():
            writable = os.access(
                path.parent if path.parent.exists() else config.keys_dir.parent, os.W_OK
            )
            results.append(
                (
                    writable,
                    f"host key {path}: missing, made at first start"
                    if writable
                    else f"host key {path}: missing and cannot be made",
                )
            )
        elif stat.S_IMODE(path.stat().st_mode) & 0o077:
            results.append((False, f"host key {path}: readable by others (chmod 600)"))
        else:
            results.append((True, f"host key {path}: {public_key(path).fingerprint}"))
    results.append(_check_state(config))
    logging.disable(logging.WARNING)
    try:
        results.append((True, choose_sandbox(config).describe()))
    except SandboxUnavailable as exc:
        results.append((False, f"sandbox: {exc}"))
    finally:
        logging.disable(logging.NOTSET)
    for key, listen in (
        ("ssh.listen", config.ssh.listen),
        ("rendezvous.listen", config.rendezvous.listen),
        ("api.listen", config.api.listen),
        ("metrics.listen", config.metrics.listen),
    ):
        if listen:
            results.append(_port_free(key, listen))
    for ok, line in results:
        print(f"{'ok  ' if ok else 'FAIL'} {line}")
    return 0 if all(ok for ok, _ in results) else 1


def _check_state(config: Config) -> tuple[bool, str]:
    """The state database: reachable, and at which schema version (check changes nothing:
    the gateway migrates at start, or `gateway db:migrate` does)."""
    where = config.database_url or str(config.db_path)
    try:
        store = open_store(config, migrate=False)
        try:
            version, latest = store.schema_version, store.latest_version
            if version > latest:
                return False, (
                    f"state: {store.describe()}: schema v{version} is newer than this "
                    f"gateway's v{latest}; upgrade the gateway"
                )
            if version < latest:
                return True, (
                    f"state: {store.describe()} (schema v{version}, migrates to v{latest} "
                    "at start or with `gateway db:migrate`)"
                )
            apps = len(store.list_apps())
            return True, f"state: {store.describe()} (schema v{version}, {apps} apps)"
        finally:
            store.close()
    except Exception as exc:
        return False, f"state: {where}: {exc}"


@command("db:migrate", "create or upgrade the state database's schema; prints its version")
def db_migrate(args: argparse.Namespace, config: Config) -> int:
    store = open_store(config, migrate=False)
    try:
        before = store.schema_version
        after = store.migrate()
    finally:
        store.close()
    change = f"migrated from v{before}" if after != before else "up to date"
    print(f"{store.describe()}: schema v{after} ({change})")
    return 0


def _port_free(key: str, listen: str) -> tuple[bool, str]:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return False, f"{key} {listen}: cannot listen ({exc.strerror}; is the gateway running?)"
    return True, f"{key} {listen}: free"


DEMO_APP = "demo"


@command(
    "demo",
    "serve with a sample app and a generated client key; prints the ssh line",
    port_base_arg,
)
def demo(args: argparse.Namespace, config: Config) -> int:
    print(f"gateway: {where_state_lives(config)}", file=sys.stderr, flush=True)
    store = _store(config)
    if store.get_app(DEMO_APP) is None:
        store.create_app(DEMO_APP)
    client_key = config.keys_dir / "demo_client_ed25519"
    config.keys_dir.mkdir(parents=True, exist_ok=True)
    write_key_pair(client_key, "ed25519", "gateway-demo-client")
    key = public_key(client_key)
    store.add_key(DEMO_APP, key.fingerprint, key.line, key.comment)
    if store.latest_release(DEMO_APP) is None:
        sample = Path(__file__).resolve().parent.parent / "contrib" / "sample-app"
        slug = config.state_dir / "sample-app.tgz"
        pack_dir(sample, slug)
        ns = argparse.Namespace(app=DEMO_APP, slug=slug, json=False)
        releases_create(ns, config)
    host, port = config.ssh.public_address
    known_hosts = config.keys_dir / "known_hosts"
    ensure_host_keys(config.keys_dir)
    host_key = public_key(config.keys_dir / "ssh_host_ed25519_key")
    known_hosts.write_text(f"[{host}]:{port} {host_key.key_type} {_b64(host_key)}\n")
    # Absolute paths, so the lines work from any directory.
    ssh = (
        f"ssh -i {shlex.quote(str(client_key))} "
        f"-o UserKnownHostsFile={shlex.quote(str(known_hosts))} -p {port} {DEMO_APP}@{host}"
    )

    def ready() -> None:
        print(
            "\nThe gateway is up with the sample app 'demo'. Try, in another terminal:\n\n"
            f"    {ssh} 'echo hello from $DYNO'\n"
            f"    {ssh} worker 3\n"
            f"    {ssh} -t bash\n\n"
            "Ctrl-C here stops the gateway.\n",
            file=sys.stderr,
            flush=True,
        )

    def how_to_move(table: str) -> str:
        return (
            "move all four listeners with --port-base N (SSH on N, the others on N+1 to N+3), "
            f"or {_config_file_hint(config, f'[{table}] listen', 'demo')}"
        )

    return _start(config, args, ready, how_to_move)


def _b64(key: Any) -> str:
    return key.line.split()[1]


def pack_dir(app_dir: Path, out: Path) -> None:
    """Pack an app dir into a slug (a tar.gz of its contents), as contrib/pack-slug does."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for child in sorted(app_dir.iterdir()):
            tar.add(child, arcname=child.name, filter=_owner_root)


def _owner_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # asyncssh logs every channel step at INFO; our own lines carry app, dyno and conn.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


# -- entry point -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="SSH gateway for one-off dynos (what `heroku run` gives)."
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML settings file (default: $GATEWAY_CONFIG, else the built-in defaults, "
        "with state and keys under $GATEWAY_HOME or the checkout; gateway check says where)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (handler, help_text, add_arguments) in COMMANDS.items():
        kwargs = {} if help_text == argparse.SUPPRESS else {"help": help_text}
        sp = sub.add_parser(name, description=help_text, **kwargs)
        add_arguments(sp)
        sp.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_module.load(args.config)
        if getattr(args, "port_base", None) is not None:
            config = config_module.with_port_base(config, args.port_base)
        return args.handler(args, config)
    except (UserError, ConfigError, StoreError, StoreUnavailable, InvalidName) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
