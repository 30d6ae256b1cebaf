"""The one-off dyno's life, as Heroku tells it: states, transitions and end results."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from signal import Signals


class State(enum.StrEnum):
    STARTING = "starting"
    UP = "up"
    COMPLETE = "complete"
    CRASHED = "crashed"


ENDED = frozenset({State.COMPLETE, State.CRASHED})

_NEXT: dict[State, frozenset[State]] = {
    # complete from starting: a dyno reserved for a rendezvous client that never came
    # (R13, status 128) ends without having been up.
    State.STARTING: frozenset({State.UP, State.COMPLETE, State.CRASHED}),
    State.UP: frozenset({State.COMPLETE, State.CRASHED}),
    State.COMPLETE: frozenset(),
    State.CRASHED: frozenset(),
}


class BadTransition(ValueError):
    pass


def transition(current: State, new: State) -> State:
    """Check a state change; a dyno never comes back from an end state (no restarts)."""
    if new not in _NEXT[current]:
        raise BadTransition(f"a dyno cannot go from {current} to {new}")
    return new


@dataclass(frozen=True)
class Exit:
    """How a dyno's process ended: a status, or the signal that killed it."""

    status: int | None = None
    signal: str | None = None

    @classmethod
    def from_returncode(cls, returncode: int) -> Exit:
        """Decode a Popen-style return code (negative means killed by that signal)."""
        if returncode < 0:
            try:
                name = Signals(-returncode).name.removeprefix("SIG")
            except ValueError:
                name = str(-returncode)
            return cls(signal=name)
        return cls(status=returncode)

    @property
    def shell_status(self) -> int:
        """The status a shell would report: 128+N for a signal, as Heroku logs it."""
        if self.signal is None:
            return self.status if self.status is not None else 255
        try:
            return 128 + Signals["SIG" + self.signal].value
        except KeyError:
            return 255
