"""Commands that change an app: apps, releases, config vars, keys, API tokens."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gateway.cli.registry import (
    UserError,
    _audit,
    _print_json,
    _store,
    _when,
    app_arg,
    command,
    json_arg,
)
from gateway.config import Config
from gateway.core.authorized_keys import BadKey, parse_text
from gateway.core.names import check_app_name, check_config_var

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
    from gateway.slugs import SlugRefused, import_release

    store = _store(config)
    app = store.app(args.app)
    if not args.slug.is_file():
        raise UserError(f"{args.slug}: no such file")
    # As root, the release is the app's from the start: its dynos' /app is an overlay of
    # it, as the app's own uid (the namespaces sandbox), with no copy made at first use.
    owner = None
    if os.geteuid() == 0:
        uid = store.app_uid(app.name, *config.dynos.uid_range_bounds)
        owner = (uid, uid)
    try:
        release, unpacked = import_release(
            store, app.name, args.slug, config.releases_dir, config.slugs.max_unpacked_bytes,
            progress=_progress(args.slug), owner=owner,
        )  # fmt: skip
    except SlugRefused as exc:
        raise UserError(f"slug refused: {exc}") from None
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
