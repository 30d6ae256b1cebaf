"""The pre-auth rules (gateway/core/admission.py, prelimits.py, refusals.py), without
sockets or clocks: time is a number passed in."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.core.admission import (
    NO_WAITING,
    PER_NETBLOCK_PENDING,
    WAITING_ROOM_FULL,
    Admission,
    AdmissionLimits,
    NetblockSize,
    canonical_address,
    in_networks,
    netblock,
    parse_networks,
    startup_slots,
)
from gateway.core.prelimits import (
    MAX_ENV_VALUE,
    MAX_ENV_VARS,
    Penalized,
    PenaltyBox,
    env_allowed,
    filter_env,
)
from gateway.core.refusals import OTHER_SOURCES, RefusalDigest, Summary

# -- parsing ---------------------------------------------------------------------------


def test_max_startups_is_a_count_or_openssh_form() -> None:
    assert startup_slots("100") == 100
    assert startup_slots("10:30:100") == 100  # sshd's FULL: the most at once
    for bad in ("0", "-1", "10:30", "0:30:100", "10:101:100", "100:30:10", "a", "1:2:3:4", ""):
        with pytest.raises(ValueError):
            startup_slots(bad)


def test_netblock_size_parse() -> None:
    assert NetblockSize.parse("24:64") == NetblockSize(24, 64)
    assert NetblockSize.parse("32") == NetblockSize(32, 128)  # OpenSSH: V6 defaults to 128
    for bad in ("33", "24:129", "-1", "a:b", "24:64:1", ""):
        with pytest.raises(ValueError):
            NetblockSize.parse(bad)


def test_netblocks_group_addresses() -> None:
    size = NetblockSize(24, 64)
    assert netblock("192.0.2.77", size) == "192.0.2.0/24"
    assert netblock("2001:db8:1:2:3:4:5:6", size) == "2001:db8:1:2::/64"
    # A dual-stack listener sees IPv4 clients as mapped IPv6: the same netblock.
    assert canonical_address("::ffff:192.0.2.77") == "192.0.2.77"
    assert netblock("::ffff:192.0.2.77", size) == "192.0.2.0/24"
    assert netblock("192.0.2.77", NetblockSize(32, 128)) == "192.0.2.77/32"
    assert netblock("not-an-address", size) == "not-an-address"


def test_networks_parse_and_match() -> None:
    networks = parse_networks(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"])
    assert networks[1] == ipaddress.ip_network("192.0.2.7/32")
    assert in_networks("10.200.3.4", networks)
    assert in_networks("::ffff:10.1.1.1", networks)
    assert in_networks("192.0.2.7", networks) and not in_networks("192.0.2.8", networks)
    assert in_networks("2001:db8::1", networks) and not in_networks("2001:db9::1", networks)
    assert not in_networks("?", networks)
    for bad in (["10.0.0.0/33"], ["example.com"], ["10.0.0.1/8x"]):
        with pytest.raises(ValueError, match="not an address or CIDR block"):
            parse_networks(bad)


# -- admission ---------------------------------------------------------------------------


def _limits(**changes: object) -> AdmissionLimits:
    values: dict[str, object] = {
        "slots": 100, "per_source": 10, "per_netblock": 30, "waiting": 1000,
        "per_netblock_pending": 500, "wait_time": 30.0, "netblock": NetblockSize(24, 64),
    }  # fmt: skip
    values.update(changes)
    return AdmissionLimits(**values)  # type: ignore[arg-type]


def test_a_source_over_its_share_waits_first_in_first_out() -> None:
    rules = Admission(_limits(per_source=3))
    outcomes = [rules.arrive(i, "192.0.2.1", now=0).outcome for i in range(6)]
    assert outcomes == ["admitted"] * 3 + ["waiting"] * 3
    assert (rules.active, rules.waiting) == (3, 3)
    assert rules.active_from("192.0.2.1") == 3 and rules.waiting_from("192.0.2.1") == 3
    # Each slot that frees goes to the longest-waiting: 3, then 4, then 5.
    assert rules.settle(1) == [3]
    assert rules.settle(0) == [4]
    assert rules.settle(3) == [5]
    assert rules.settle(2) == []  # nobody left waiting
    assert (rules.active, rules.waiting) == (2, 0)


def test_a_burst_of_200_from_one_source_is_served_whole() -> None:
    rules = Admission(_limits())
    for i in range(200):
        assert rules.arrive(i, "192.0.2.1", now=i / 100).outcome in ("admitted", "waiting")
    assert (rules.active, rules.waiting) == (10, 190)
    served, in_handshake = [], list(range(10))
    while in_handshake:
        done = in_handshake.pop(0)
        served.append(done)
        in_handshake += rules.settle(done)
        assert rules.active <= 10
    assert served == list(range(200))  # every one, in order


def test_a_newcomer_from_elsewhere_is_not_stuck_behind_a_flood() -> None:
    rules = Admission(_limits())
    for i in range(500):  # a flood from one /24: 30 in the handshake, the rest wait
        rules.arrive(("flood", i), f"127.0.1.{i % 250 + 1}", now=0)
    assert (rules.active, rules.waiting) == (30, 470)
    assert rules.arrive("user", "127.0.0.1", now=1).outcome == "admitted"
    assert rules.arrive("user2", "203.0.113.9", now=1).outcome == "admitted"


def test_one_address_holds_at_most_its_share_of_the_slots() -> None:
    rules = Admission(_limits())
    for i in range(300):
        rules.arrive(("flood", i), "127.0.1.1", now=0)
    assert rules.active_from("127.0.1.1") == 10 and rules.waiting == 290
    # Its neighbours in the /24 still get slots, up to the netblock's share.
    neighbours = [rules.arrive(("n", i), f"127.0.1.{i + 2}", now=0).outcome for i in range(25)]
    assert neighbours.count("admitted") == 20 and neighbours.count("waiting") == 5
    # Other netblocks are unaffected.
    assert all(
        rules.arrive(("o", i), f"10.0.{i}.1", now=0).outcome == "admitted" for i in range(20)
    )


def test_freed_slots_go_to_the_source_holding_fewest() -> None:
    rules = Admission(_limits(slots=4, per_source=0, per_netblock=0))
    for i in range(4):
        assert rules.arrive(("a", i), "192.0.2.1", now=0).outcome == "admitted"
    for i in range(3):
        assert rules.arrive(("a", 4 + i), "192.0.2.1", now=1).outcome == "waiting"
    assert rules.arrive("b", "198.51.100.1", now=2).outcome == "waiting"  # arrived later
    # b's netblock holds no slot, a's holds three: b goes first despite arriving last.
    assert rules.settle(("a", 0)) == ["b"]
    assert rules.settle(("a", 1)) == [("a", 4)]


def test_total_slots_bound_everyone() -> None:
    rules = Admission(_limits(slots=5, per_source=0, per_netblock=0))
    outcomes = [rules.arrive(i, f"10.{i}.0.1", now=0).outcome for i in range(8)]
    assert outcomes == ["admitted"] * 5 + ["waiting"] * 3
    assert rules.settle(0) == [5]


def test_a_netblock_holds_at_most_its_pending_allowance() -> None:
    rules = Admission(_limits(per_netblock_pending=50))
    outcomes = [rules.arrive(i, "127.0.1.1", now=0) for i in range(60)]
    assert [o.outcome for o in outcomes[:50]] == ["admitted"] * 10 + ["waiting"] * 40
    assert all(o.outcome == "refused" and o.reason == PER_NETBLOCK_PENDING for o in outcomes[50:])
    # Another address of the netblock takes the newest waiting place of the fattest one.
    arrival = rules.arrive("neighbour", "127.0.1.2", now=1)
    assert arrival.outcome == "admitted" and arrival.displaced == 49
    assert not rules.is_waiting(49) and rules.waiting_from("127.0.1.1") == 39
    # Displacing goes on until the newcomer's address waits in about as many places.
    arrivals = [rules.arrive(("n", i), "127.0.1.2", now=1) for i in range(30)]
    displacing = [a for a in arrivals if a.displaced is not None]
    assert len(displacing) == 24  # 9 more into the handshake, then 15 waiting
    assert all(a.outcome == "refused" and a.reason == PER_NETBLOCK_PENDING for a in arrivals[24:])
    assert (rules.waiting_from("127.0.1.1"), rules.waiting_from("127.0.1.2")) == (15, 15)
    assert rules.active_from("127.0.1.1") == rules.active_from("127.0.1.2") == 10


def test_a_full_waiting_room_makes_room_from_the_fattest_netblock() -> None:
    rules = Admission(_limits(slots=1, per_source=0, per_netblock=0, waiting=10))
    rules.arrive("first", "192.0.2.1", now=0)
    for i in range(10):
        assert rules.arrive(("a", i), "192.0.2.1", now=0).outcome == "waiting"
    assert rules.arrive("x", "192.0.2.2", now=0).outcome == "refused"  # same netblock
    arrival = rules.arrive("b", "198.51.100.1", now=0)
    assert arrival.outcome == "waiting" and arrival.displaced == ("a", 9)
    assert rules.waiting == 10
    # With rooms held evenly, a newcomer is refused rather than displacing anyone.
    rules = Admission(_limits(slots=1, per_source=0, per_netblock=0, waiting=4))
    rules.arrive("first", "192.0.2.1", now=0)
    for i in range(4):
        rules.arrive(i, f"10.{i}.0.1", now=0)
    refused = rules.arrive("late", "10.9.0.1", now=0)
    assert refused.outcome == "refused" and refused.reason == WAITING_ROOM_FULL
    assert refused.displaced is None


def test_without_a_waiting_room_a_connection_with_no_slot_is_refused() -> None:
    rules = Admission(_limits(slots=2, waiting=0))
    assert [rules.arrive(i, "192.0.2.1", now=0).outcome for i in range(2)] == ["admitted"] * 2
    arrival = rules.arrive(2, "192.0.2.1", now=0)
    assert arrival.outcome == "refused" and arrival.reason == NO_WAITING


def test_waiting_ends_at_the_deadline() -> None:
    rules = Admission(_limits(per_source=1, wait_time=30))
    rules.arrive("a", "192.0.2.1", now=0)
    assert rules.next_deadline() is None  # nobody waits
    rules.arrive("b", "192.0.2.1", now=5)
    rules.arrive("c", "192.0.2.1", now=10)
    assert rules.next_deadline() == 35
    assert rules.expire(now=34.9) == []
    assert rules.expire(now=35) == ["b"]
    assert rules.next_deadline() == 40
    assert rules.settle("a") == ["c"]  # admitted in time: no deadline any more
    assert rules.next_deadline() is None and rules.expire(now=100) == []
    # No deadline at all when wait_time is 0.
    rules = Admission(_limits(per_source=1, wait_time=0))
    rules.arrive("a", "192.0.2.1", now=0)
    rules.arrive("b", "192.0.2.1", now=0)
    assert rules.next_deadline() is None and rules.expire(now=10**9) == []


def test_settling_is_idempotent_and_a_waiting_connection_can_leave() -> None:
    rules = Admission(_limits(per_source=1))
    rules.arrive("a", "192.0.2.1", now=0)
    rules.arrive("b", "192.0.2.1", now=0)
    rules.arrive("c", "192.0.2.1", now=0)
    assert rules.settle("b") == []  # left while waiting: frees no slot
    assert rules.settle("b") == [] and rules.settle("unknown") == []
    assert rules.settle("a") == ["c"]
    assert rules.settle("a") == []
    assert (rules.active, rules.waiting) == (1, 0)
    with pytest.raises(ValueError):
        rules.arrive("c", "192.0.2.1", now=0)


# -- per-source penalty -----------------------------------------------------------------


def test_penalty_after_n_failures_within_the_window() -> None:
    box = PenaltyBox(failures=10, window=60)
    for i in range(9):
        assert box.failure("192.0.2.1", now=100 + i) == Penalized()
        assert box.refused_for("192.0.2.1", now=100 + i) == 0.0
    assert box.failure("192.0.2.1", now=109).source  # the tenth starts the penalty
    assert box.refused_for("192.0.2.1", now=109) == 60
    assert box.refused_for("192.0.2.1", now=168.5) == pytest.approx(0.5)
    assert box.refused_for("192.0.2.1", now=169) == 0.0  # served


def test_another_source_is_unaffected() -> None:
    box = PenaltyBox(failures=3, window=60)
    for i in range(3):
        box.failure("192.0.2.1", now=i)
    assert box.refused_for("192.0.2.1", now=3) > 0
    assert box.refused_for("192.0.2.2", now=3) == 0.0
    assert not box.failure("192.0.2.2", now=3).source


def test_failures_older_than_the_window_do_not_count() -> None:
    box = PenaltyBox(failures=3, window=10)
    assert not box.failure("a", now=0).source
    assert not box.failure("a", now=5).source
    assert not box.failure("a", now=11).source  # the one at 0 has left the window
    assert box.refused_for("a", now=11) == 0.0
    assert box.failure("a", now=14).source  # 5, 11 and 14 are within 10 s
    assert box.refused_for("a", now=14) == 10


def test_counting_starts_afresh_after_a_penalty() -> None:
    box = PenaltyBox(failures=2, window=10)
    box.failure("a", now=0)
    assert box.failure("a", now=1).source
    # Connections that were already open when the penalty began do not extend it.
    assert not box.failure("a", now=2).source
    assert box.refused_for("a", now=10.5) == pytest.approx(0.5)
    assert box.refused_for("a", now=11) == 0.0
    assert not box.failure("a", now=12).source  # one failure after the penalty: not yet
    assert box.failure("a", now=13).source


def test_one_wrong_key_retried_does_not_lock_out_its_address() -> None:
    # A misconfigured client behind a NAT retries one wrong key: the key is refused from
    # that address, the address (everyone else behind it) is not.
    box = PenaltyBox(failures=10, window=60)
    key = "app SHA256:wrong"
    for i in range(9):
        assert box.failure("203.0.113.5", now=i, keys=[key]) == Penalized()
    assert box.failure("203.0.113.5", now=9, keys=[key]) == Penalized(keys=(key,))
    assert box.key_refused_for("203.0.113.5", key, now=9) == 60
    assert box.key_refused_for("203.0.113.5", "app SHA256:right", now=9) == 0.0
    assert box.key_refused_for("203.0.113.6", key, now=9) == 0.0  # only from there
    assert box.refused_for("203.0.113.5", now=9) == 0.0
    # A repeat weighs a tenth: the address goes only after 91 tries of one key.
    for i in range(10, 90):
        assert not box.failure("203.0.113.5", now=i / 10 + 9, keys=[key]).source
    assert box.failure("203.0.113.5", now=19, keys=[key]).source
    assert box.key_refused_for("203.0.113.5", key, now=68) == pytest.approx(1)


def test_many_keys_from_one_address_penalize_it() -> None:
    box = PenaltyBox(failures=10, window=60)
    for i in range(9):
        assert not box.failure("198.51.100.7", now=i, keys=[f"app SHA256:k{i}"]).source
    assert box.failure("198.51.100.7", now=9, keys=["app SHA256:k9"]).source
    # One connection trying several keys counts each once.
    box = PenaltyBox(failures=10, window=60)
    assert not box.failure("a", now=0, keys=[f"app k{i}" for i in range(6)]).source
    assert box.failure("a", now=1, keys=[f"other k{i}" for i in range(4)]).source


def test_the_same_key_for_another_app_is_another_key() -> None:
    box = PenaltyBox(failures=3, window=60)
    box.failure("a", now=0, keys=["app1 SHA256:k"])
    box.failure("a", now=1, keys=["app2 SHA256:k"])
    assert box.failure("a", now=2, keys=["app3 SHA256:k"]).source  # probing apps


def test_exempt_addresses_are_never_penalized() -> None:
    box = PenaltyBox(failures=2, window=60, exempt=parse_networks(["10.0.0.0/8", "192.0.2.9"]))
    for i in range(50):
        assert box.failure("10.1.2.3", now=i) == Penalized()
        assert box.failure("192.0.2.9", now=i, keys=["app k"]) == Penalized()
    assert box.refused_for("10.1.2.3", now=50) == 0.0
    assert box.key_refused_for("192.0.2.9", "app k", now=50) == 0.0
    assert box.is_exempt("::ffff:10.9.9.9") and not box.is_exempt("192.0.2.10")
    assert len(box) == 0  # nothing remembered for them
    box.failure("192.0.2.10", now=0)
    assert box.failure("192.0.2.10", now=1).source


def test_disabled_penalty() -> None:
    for box in (PenaltyBox(failures=0, window=60), PenaltyBox(failures=10, window=0)):
        assert not box.enabled
        for i in range(100):
            assert box.failure("a", now=i, keys=["app k"]) == Penalized()
        assert box.refused_for("a", now=100) == 0.0
        assert len(box) == 0


def test_the_table_is_bounded_and_evicts_the_least_recently_seen() -> None:
    box = PenaltyBox(failures=2, window=60, capacity=100)
    box.failure("penalized", now=0)
    assert box.failure("penalized", now=0).source
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


# -- refused connections in the record -------------------------------------------------


def test_the_first_refusal_is_written_the_rest_summarized() -> None:
    digest = RefusalDigest(interval=60, capacity=64)
    assert digest.refused("ssh", "192.0.2.1", "penalty", now=0)
    assert not any(digest.refused("ssh", "192.0.2.1", "penalty", now=i) for i in range(1, 50))
    assert digest.refused("ssh", "192.0.2.1", "max_waiting", now=50)  # another reason
    assert digest.refused("api", "192.0.2.1", "penalty", now=50)  # another listener
    assert digest.due() == 60
    assert digest.flush(now=59) == []  # the interval is not over
    assert digest.flush(now=60) == [Summary("ssh", "192.0.2.1", "penalty", 50, 0)]
    assert digest.due() is None  # a fresh interval: the next refusal is written again
    assert digest.refused("ssh", "192.0.2.1", "penalty", now=61)


def test_a_single_refusal_needs_no_summary_and_shutdown_flushes() -> None:
    digest = RefusalDigest(interval=60)
    digest.refused("ssh", "192.0.2.1", "penalty", now=0)
    assert digest.due() is None and digest.flush(now=100) == []
    digest.refused("ssh", "192.0.2.1", "penalty", now=200)
    digest.refused("ssh", "192.0.2.1", "penalty", now=201)
    assert digest.flush(now=202, force=True) == [Summary("ssh", "192.0.2.1", "penalty", 2, 200)]


def test_a_flood_from_many_sources_writes_a_bounded_record() -> None:
    digest = RefusalDigest(interval=60, capacity=64)
    written = summaries = 0
    for i in range(100_000):  # 10,000 sources, two reasons, within one interval
        source = f"10.{i % 10_000 // 256}.{i % 256}.1"
        reason = "penalty" if i % 2 else "max_waiting"
        written += digest.refused("ssh", source, reason, now=i / 10_000)
    found = digest.flush(now=60)
    summaries = len(found)
    assert written <= 64 * 2 + 2
    assert summaries <= 64 * 2 + 2
    assert sum(s.count for s in found) + written - summaries == 100_000
    assert {s.source for s in found if s.source == OTHER_SOURCES} == {OTHER_SOURCES}


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
