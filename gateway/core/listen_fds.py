"""Sockets handed over by systemd (socket activation, sd_listen_fds(3)): which
descriptors, under which names. Pure: the environment and our pid come in.

systemd passes them from descriptor 3 on, with LISTEN_FDS (how many), LISTEN_PID (the
process they are meant for: a child that inherited the variables must not take them) and
LISTEN_FDNAMES (colon-separated, from each socket's FileDescriptorName=). The gateway
knows a socket's job only by its name: ssh, rendezvous, api or metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

FIRST_FD = 3  # SD_LISTEN_FDS_START
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
NAMES = ("ssh", "rendezvous", "api", "metrics")
MAX_FDS = 12


class ListenFdsError(ValueError):
    """Sockets were passed but cannot be used as they are; the message says how to fix it."""


def passed_sockets(environ: Mapping[str, str], pid: int) -> list[tuple[str, int]]:
    """(name, descriptor) for each socket passed to process `pid`; none when nothing
    was passed, or it was meant for another process."""
    if "LISTEN_FDS" not in environ or environ.get("LISTEN_PID", "") != str(pid):
        return []
    count_text = environ["LISTEN_FDS"]
    if not count_text.isdigit() or not 0 < int(count_text) <= MAX_FDS:
        raise ListenFdsError(f"LISTEN_FDS={count_text[:16]!r}: expected 1 to {MAX_FDS} sockets")
    count = int(count_text)
    names = environ.get("LISTEN_FDNAMES", "").split(":") if "LISTEN_FDNAMES" in environ else []
    if len(names) != count:
        raise ListenFdsError(
            f"{count} sockets passed with {len(names)} names (LISTEN_FDNAMES): name each "
            f"with FileDescriptorName= one of {', '.join(NAMES)}"
        )
    for position, name in enumerate(names):
        if name not in NAMES:
            raise ListenFdsError(
                f"passed socket {position + 1} is named {name[:32]!r}: name it with "
                f"FileDescriptorName= one of {', '.join(NAMES)}"
            )
    return [(name, FIRST_FD + position) for position, name in enumerate(names)]
