"""The pre-auth limits' rules (gateway/core/prelimits.py), without sockets or clocks."""

from __future__ import annotations

import pytest

from gateway.core.prelimits import (
    MAX_ENV_VALUE,
    MAX_ENV_VARS,
    PenaltyBox,
    Startups,
    drop_probability,
    env_allowed,
    filter_env,
    should_drop,
)

# -- MaxStartups random early drop ------------------------------------------------------


def test_startups_parse() -> None:
    assert Startups.parse("10:30:100") == Startups(10, 30, 100)
    for bad in ("10:30", "0:30:100", "10:101:100", "100:30:10", "a:b:c"):
        with pytest.raises(ValueError):
            Startups.parse(bad)


def test_no_drop_below_start() -> None:
    for waiting in range(10):
        assert drop_probability(waiting, 10, 30, 100) == 0.0
        assert not should_drop(waiting, 10, 30, 100, random_value=0.0)


def test_rate_at_start_rising_linearly_to_full() -> None:
    assert drop_probability(10, 10, 30, 100) == pytest.approx(0.30)
    assert drop_probability(55, 10, 30, 100) == pytest.approx(0.65)
    assert drop_probability(99, 10, 30, 100) == pytest.approx(0.30 + 0.70 * 89 / 90)
    assert drop_probability(100, 10, 30, 100) == 1.0
    assert drop_probability(5000, 10, 30, 100) == 1.0
    previous = 0.0
    for waiting in range(10, 101):
        probability = drop_probability(waiting, 10, 30, 100)
        assert previous <= probability <= 1.0
        previous = probability


def test_drop_decision_follows_the_random_value() -> None:
    # At START the chance is RATE: values under 0.30 drop, the rest pass.
    assert should_drop(10, 10, 30, 100, random_value=0.29)
    assert not should_drop(10, 10, 30, 100, random_value=0.30)
    assert not should_drop(10, 10, 30, 100, random_value=0.99)
    # At FULL everything drops, whatever the draw.
    assert should_drop(100, 10, 30, 100, random_value=0.999999)


def test_drop_share_matches_the_probability() -> None:
    draws = [i / 1000 for i in range(1000)]  # evenly spread over [0, 1)
    dropped = sum(should_drop(55, 10, 30, 100, value) for value in draws)
    assert dropped == 650


def test_start_equal_to_full_is_a_hard_cap() -> None:
    assert not should_drop(9, 10, 0, 10, random_value=0.0)
    assert should_drop(10, 10, 0, 10, random_value=0.999)


def test_rate_zero_and_hundred() -> None:
    assert not should_drop(10, 10, 0, 100, random_value=0.0)
    assert should_drop(10, 10, 100, 100, random_value=0.999)


# -- per-source penalty -----------------------------------------------------------------


def test_penalty_after_n_failures_within_the_window() -> None:
    box = PenaltyBox(failures=10, window=60)
    for i in range(9):
        assert not box.failure("192.0.2.1", now=100 + i)
        assert box.refused_for("192.0.2.1", now=100 + i) == 0.0
    assert box.failure("192.0.2.1", now=109)  # the tenth starts the penalty
    assert box.refused_for("192.0.2.1", now=109) == 60
    assert box.refused_for("192.0.2.1", now=168.5) == pytest.approx(0.5)
    assert box.refused_for("192.0.2.1", now=169) == 0.0  # served


def test_another_source_is_unaffected() -> None:
    box = PenaltyBox(failures=3, window=60)
    for i in range(3):
        box.failure("192.0.2.1", now=i)
    assert box.refused_for("192.0.2.1", now=3) > 0
    assert box.refused_for("192.0.2.2", now=3) == 0.0
    assert not box.failure("192.0.2.2", now=3)


def test_failures_older_than_the_window_do_not_count() -> None:
    box = PenaltyBox(failures=3, window=10)
    assert not box.failure("a", now=0)
    assert not box.failure("a", now=5)
    assert not box.failure("a", now=11)  # the one at 0 has left the window
    assert box.refused_for("a", now=11) == 0.0
    assert box.failure("a", now=14)  # 5, 11 and 14 are within 10 s
    assert box.refused_for("a", now=14) == 10


def test_counting_starts_afresh_after_a_penalty() -> None:
    box = PenaltyBox(failures=2, window=10)
    box.failure("a", now=0)
    assert box.failure("a", now=1)
    # Connections that were already open when the penalty began do not extend it.
    assert not box.failure("a", now=2)
    assert box.refused_for("a", now=10.5) == pytest.approx(0.5)
    assert box.refused_for("a", now=11) == 0.0
    assert not box.failure("a", now=12)  # one failure after the penalty: not yet
    assert box.failure("a", now=13)


def test_disabled_penalty() -> None:
    for box in (PenaltyBox(failures=0, window=60), PenaltyBox(failures=10, window=0)):
        assert not box.enabled
        for i in range(100):
            assert not box.failure("a", now=i)
        assert box.refused_for("a", now=100) == 0.0
        assert len(box) == 0


def test_the_table_is_bounded_and_evicts_the_least_recently_seen() -> None:
    box = PenaltyBox(failures=2, window=60, capacity=100)
    box.failure("penalized", now=0)
    assert box.failure("penalized", now=0)
    for i in range(10_000):
        box.failure(f"10.0.{i // 256}.{i % 256}", now=1)
        if i % 50 == 0:
            # A source that keeps knocking while refused counts as recently seen.
            assert box.refused_for("penalized", now=1) > 0
    assert len(box) <= 100
    assert box.refused_for("penalized", now=1) > 0
    # One that stays away is forgotten once a flood of others passes through.
    for i in range(200):
        box.failure(f"10.1.{i // 256}.{i % 256}", now=2)
    assert box.refused_for("penalized", now=2) == 0.0
    assert len(box) == 100


# -- environment allow-list -------------------------------------------------------------

DEFAULT_ACCEPT = ("LANG", "LC_*", "TZ")


def test_env_patterns() -> None:
    assert env_allowed("LANG", DEFAULT_ACCEPT)
    assert env_allowed("LC_ALL", DEFAULT_ACCEPT)
    assert env_allowed("LC_", DEFAULT_ACCEPT)
    assert env_allowed("TZ", DEFAULT_ACCEPT)
    assert not env_allowed("LANGUAGE", DEFAULT_ACCEPT)  # exact, not a prefix
    assert not env_allowed("XLC_ALL", DEFAULT_ACCEPT)
    assert not env_allowed("PATH", DEFAULT_ACCEPT)
    assert not env_allowed("LANG", ())
    assert env_allowed("ANYTHING", ("*",))


def test_filter_env_keeps_only_allowed_well_formed_variables() -> None:
    accepted, refused = filter_env(
        {
            "LANG": "de_DE.UTF-8",
            "LC_TIME": "C",
            "TZ": "Europe/Berlin",
            "PATH": "/evil",
            "LD_PRELOAD": "/tmp/x.so",
            "LC_X=Y": "z",  # not a variable name
            "LC_NUL": "a\0b",
            "LC_BIG": "x" * (MAX_ENV_VALUE + 1),
        },
        DEFAULT_ACCEPT,
    )
    assert accepted == {"LANG": "de_DE.UTF-8", "LC_TIME": "C", "TZ": "Europe/Berlin"}
    assert sorted(refused) == sorted(["PATH", "LD_PRELOAD", "LC_X=Y", "LC_NUL", "LC_BIG"])


def test_filter_env_caps_the_count() -> None:
    env = {f"LC_V{i}": "x" for i in range(MAX_ENV_VARS + 5)}
    accepted, refused = filter_env(env, DEFAULT_ACCEPT)
    assert len(accepted) == MAX_ENV_VARS
    assert len(refused) == 5
