"""One result row: a measurement of both servers, and the goal it is held to."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Row:
    section: str  # groups rows into one table block and one plot
    label: str
    unit: str
    sshd: float
    gateway: float
    higher_is_better: bool = False
    # A goal on the ratio gateway/sshd ("<= 0.5", ">= 0.6"), or, when `goal_value` is
    # set, on that number alone (the gateway's RSS per session, its sandbox time).
    goal: str = ""
    goal_value: float | None = None
    x: float | None = None  # for sections plotted as lines (sessions held, release size)
    note: str = ""  # shown instead of the goal's verdict when there is nothing to judge
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if not self.sshd or math.isnan(self.sshd) or math.isnan(self.gateway):
            return float("nan")
        return self.gateway / self.sshd

    @property
    def met(self) -> bool | None:
        """Whether the goal holds; None without a goal or a number to judge."""
        if not self.goal:
            return None
        op, _, limit = self.goal.partition(" ")
        value = self.ratio if self.goal_value is None else self.goal_value
        if math.isnan(value):
            return None
        return value <= float(limit) if op == "<=" else value >= float(limit)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio, "met": self.met}
