"""A dyno's environment, the same in every sandbox: what Heroku sets, then the app's
config vars, then the names the platform owns (a config var cannot rename the dyno;
`config:set` refuses them: gateway/core/names.py PLATFORM_VARS)."""

from __future__ import annotations

from gateway.core.protocol import Pty

BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


def dyno_env(
    *,
    name: str,
    config_vars: dict[str, str],
    app_dir: str,
    port: int,
    pty: Pty | None,
) -> dict[str, str]:
    """`app_dir` is where the dyno sees its app (`/app` in a bwrap sandbox, the private
    copy's path in the process sandbox); it is also HOME, as on Heroku."""
    env = {"PATH": BASE_PATH, "HOME": app_dir, "LANG": "C.UTF-8"}
    env.update(config_vars)
    env["DYNO"] = name
    env["PORT"] = str(port)
    env["PWD"] = app_dir
    return with_terminal(env, pty)


TERMINAL_VARS = ("TERM", "COLUMNS", "LINES")


def with_terminal(env: dict[str, str], pty: Pty | None) -> dict[str, str]:
    """`env` with the terminal's variables of `pty` (none without one): a dyno's own
    environment, for another process on another terminal (ssh APP.run.N)."""
    env = {key: value for key, value in env.items() if key not in TERMINAL_VARS}
    if pty is not None:
        env["TERM"] = pty.term or "xterm"
        env["COLUMNS"], env["LINES"] = str(pty.cols), str(pty.rows)
    return env
