"""Names users type: app names, config var keys, dyno names."""

from __future__ import annotations

import re

_APP_NAME = re.compile(r"[a-z][a-z0-9-]{2,29}")
_CONFIG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DYNO_NAME = re.compile(r"run\.([1-9][0-9]*)")


class InvalidName(ValueError):
    """A name that breaks its rule; the message says the rule."""


def check_app_name(name: str) -> str:
    """Heroku's rule: lowercase letters, digits and dashes, starting with a letter, 3-30 long."""
    if not _APP_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid app name {name!r}: use 3-30 lowercase letters, digits and dashes, "
            "starting with a letter"
        )
    return name


def check_config_key(key: str) -> str:
    """Config var keys become environment variable names, so they follow that rule."""
    if not _CONFIG_KEY.fullmatch(key):
        raise InvalidName(
            f"invalid config var name {key!r}: use letters, digits and underscores, "
            "not starting with a digit"
        )
    return key


# Environment names every dyno gets from the gateway itself, set after the config vars
# (gateway/core/environment.py), so a config var of that name would be stored
# and shown but never seen by a dyno. PATH, HOME and LANG are defaults a config var
# may replace, as on Heroku, so they are not here.
PLATFORM_VARS = {
    "DYNO": "every dyno gets its own name there (run.N)",
    "PORT": "every dyno gets a port of its own to listen on there",
    "PWD": "every dyno gets its working directory there (the app dir)",
    "TERM": "a session with a terminal gets the client's terminal type there",
    "COLUMNS": "a session with a terminal gets the client's window width there",
    "LINES": "a session with a terminal gets the client's window height there",
}


def check_config_var(key: str) -> str:
    """A key `config:set` may store: a valid name that the platform does not set."""
    check_config_key(key)
    if key in PLATFORM_VARS:
        raise InvalidName(
            f"{key} is set by the gateway and cannot be a config var: {PLATFORM_VARS[key]}"
        )
    return key


def dyno_name(number: int) -> str:
    """The one-off dyno's name for run number `number` (`run.N`)."""
    return f"run.{number}"


def parse_dyno_name(name: str) -> int | None:
    """The run number in `run.N`, or None when `name` is not a one-off dyno name."""
    match = _DYNO_NAME.fullmatch(name)
    return int(match.group(1)) if match else None
