"""Running the gateway: serve, demo, check, and the front's own entry point."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import socket
import stat
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import config as config_module
from gateway.cli.admin import releases_create
from gateway.cli.registry import (
    _store,
    command,
)
from gateway.config import Config, split_listen
from gateway.keys import HOST_KEY_NAMES, ensure_host_keys, public_key, write_key_pair
from gateway.modes import loose, make_private_dir, tighten
from gateway.privileges import PrivilegeError, front_user
from gateway.store import open_store
from gateway.tls import ensure_rendezvous_cert

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
    make_private_dir(config.state_dir)
    make_private_dir(config.keys_dir)
    for path in database_files(config):
        tighten(path)
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
    from gateway.manager.front import BROKER_ENV

    _setup_logging()
    broker = os.environ.pop(BROKER_ENV, None)
    return run(config, int(broker) if broker else None)


@command("check", "check config, keys, sandbox, state DB and ports; exit 1 on a problem")
def check(args: argparse.Namespace, config: Config) -> int:
    """For operators and for systemd (ExecStartPre): every line says what was checked."""
    import trio

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
    results += _check_sizes(config)
    results.append(_check_uid_range(config))
    results.extend(_check_modes(config))
    results.append(_check_front_user(config))
    results.append(_check_sftp(config))
    logging.disable(logging.WARNING)
    try:
        results.append((True, trio.run(choose_sandbox, config).describe()))
    except SandboxUnavailable as exc:
        results.append((False, f"sandbox: {exc}"))
    finally:
        logging.disable(logging.NOTSET)
    for key, listen in (
        ("ssh.listen", config.ssh.listen),
        ("rendezvous.listen", config.rendezvous.listen),
        ("api.listen", config.api.listen),
        ("metrics.listen", config.metrics.listen),
        # Served only with a shared database (gateway/manager/main.py).
        ("cluster.agent_listen", config.cluster.agent_listen if config.database_url else ""),
    ):
        if listen:
            results.append(_port_free(key, listen))
    for ok, line in results:
        print(f"{'ok  ' if ok else 'FAIL'} {line}")
    return 0 if all(ok for ok, _ in results) else 1


def _check_sizes(config: Config) -> list[tuple[bool, str]]:
    """Sizes no dyno could get here (more memory, processes or CPUs than the host has)."""
    from gateway.core.sizes import oversized
    from gateway.manager.limits import host_figures

    host = host_figures()
    found = oversized(config.sizes, host)
    if not found:
        return [(True, f"sizes: {', '.join(config.sizes)} fit this host")]
    fix = f"lower or remove it in [sizes] ({config.source})"
    return [(False, f"size {line}: {fix}") for line in found]


def _check_sftp(config: Config) -> tuple[bool, str]:
    """The SFTP server dynos run for `sftp` and `scp` (docs/exec.md)."""
    from gateway.manager.sftp import missing

    server = config.dynos.sftp_server
    if not server:
        return True, 'sftp: turned off ([dynos] sftp_server = "")'
    if os.access(server, os.X_OK):
        return True, f"sftp: {server}"
    return False, (
        f"sftp: {missing(server)}; or set [dynos] sftp_server in {config.source} "
        '("" turns sftp and scp off)'
    )


def _check_uid_range(config: Config) -> tuple[bool, str]:
    """No host user or group may hold an id the gateway grants to apps: its files and
    processes would be an app's."""
    import grp
    import pwd

    first, last = config.dynos.uid_range_bounds
    taken = [f"user {u.pw_name} ({u.pw_uid})" for u in pwd.getpwall() if first <= u.pw_uid <= last]
    taken += [
        f"group {g.gr_name} ({g.gr_gid})" for g in grp.getgrall() if first <= g.gr_gid <= last
    ]
    if taken:
        return False, (
            f"uid_range {config.dynos.uid_range}: held on this host by {', '.join(taken[:5])}; "
            f"set [dynos] uid_range in {config.source} to ids no host user or group has"
        )
    return True, f"uid_range {config.dynos.uid_range}: no host user or group in it"


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


def _check_front_user(config: Config) -> tuple[bool, str]:
    """Who the network-facing front will run as (docs/security.md)."""
    try:
        user = front_user(config)
    except PrivilegeError as exc:
        return False, f"front: {exc}"
    if user is None:
        return True, f"front: runs as this user (uid {os.geteuid()}): not started as root"
    return True, f"front: runs as {user.name} (uid {user.uid}), no capabilities"


def database_files(config: Config) -> list[Path]:
    """The SQLite database and its WAL files (none with PostgreSQL)."""
    if config.database_url:
        return []
    return [config.db_path.with_name(config.db_path.name + end) for end in ("", "-wal", "-shm")]


def _check_modes(config: Config) -> list[tuple[bool, str]]:
    """A FAIL line for each part of the state other users could read or enter: the two
    roots, the database, the audit trail and what keys_dir holds (docs/security.md)."""
    paths = [config.state_dir, config.keys_dir, *database_files(config), config.audit_path]
    if config.keys_dir.is_dir():
        paths += sorted(config.keys_dir.iterdir())
    problems = [(False, f"modes: {problem}") for path in paths if (problem := loose(path))]
    return problems or [(True, "modes: state_dir, keys_dir and the database are private")]


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
        sample = Path(__file__).resolve().parents[2] / "contrib" / "sample-app"
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
    return str(key.line.split()[1])


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
