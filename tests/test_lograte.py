"""The app log's rate limit per dyno (issue 12, item 7): the rule without a clock of its
own (gateway/core/lograte.py), then a flooding dyno against a real gateway."""

from __future__ import annotations

import re

from gateway.core.applog import LineSplitter
from gateway.core.lograte import LogRate
from tests.conftest import Gateway, wait_until


def test_a_burst_of_one_seconds_worth_passes_then_lines_are_dropped_and_counted() -> None:
    rate = LogRate(lines_per_second=10, bytes_per_second=10_000, notice_interval=1.0)
    lines = [f"line {i}" for i in range(25)]
    assert rate.admit(lines, now=0.0) == lines[:10]
    assert rate.over(0.0)
    assert rate.due(0.5) == 0  # within the interval: no notice yet
    rate.drop(100)  # a chunk counted unread
    assert not rate.over(0.5)  # half a second refilled five lines
    assert rate.admit(lines, now=0.5) == lines[:5]
    assert rate.due(1.0) == 15 + 100 + 20
    assert rate.due(1.5, final=True) == 0  # nothing new to say
    assert rate.admit(lines, now=10.0) == lines[:10]  # a full bucket holds one second's
    assert rate.due(10.1, final=True) == 15  # the dyno ended: said at once


def test_bytes_count_as_well_as_lines() -> None:
    rate = LogRate(lines_per_second=1000, bytes_per_second=100)
    assert rate.admit(["x" * 60, "y" * 60], now=0.0) == ["x" * 60]
    assert rate.dropped == 1


def test_the_splitter_keeps_lines_whole_across_chunks() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\r\nb\nc") == ["a", "b"]
    assert splitter.feed(b"d\n\n") == ["cd", ""]
    assert splitter.flush() == []


def test_a_flooding_dynos_lines_are_capped_and_the_drop_is_told(own_gateway: Gateway) -> None:
    gw = own_gateway
    gw.top_config = "[logs]\nrate_lines = 50\n"
    gw.write_config()
    app = gw.new_app()
    gw.start()
    total = 20000
    assert gw.ssh(app, "run:detached", f"seq 1 {total}").returncode == 0

    def log() -> str:
        return gw.cli("logs", app, "-n", "1500").stdout

    assert wait_until(lambda: "State changed from up to complete" in log(), 30)
    text = log()
    kept = [line for line in text.splitlines() if " app[run.1]: " in line]
    notices = re.findall(
        r"heroku\[run\.1\]: Error L12 \(Local buffer overflow\) -> (\d+) log lines dropped: "
        r"the dyno logged more than 50 lines or 65536 bytes a second",
        text,
    )
    assert notices, text[-2000:]
    assert 50 <= len(kept) <= 150  # one second's burst, and what refilled meanwhile
    assert len(kept) + sum(int(count) for count in notices) == total  # every line counted
    assert any("app log lines dropped" in line and "dyno=run.1" in line for line in gw.log)
