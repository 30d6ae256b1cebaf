"""Dyno sizes as the operator allows them: pure rules, no host needed."""

from __future__ import annotations

from gateway.config import DEFAULT_SIZES, SizeSettings
from gateway.core import sizes

SMALL_HOST = sizes.Host(memory=4096, pids=32768, cpus=2)


def test_a_size_above_the_apps_cap_is_refused_with_what_it_may_use() -> None:
    assert sizes.refusal(DEFAULT_SIZES, "standard-2x", "standard-2x", "shop") is None
    assert sizes.refusal(DEFAULT_SIZES, "performance-l", None, "shop") is None  # no cap
    why = sizes.refusal(DEFAULT_SIZES, "performance-l", "standard-2x", "shop")
    assert why == (
        "shop may not use performance-l dynos (the largest it may use is standard-2x: "
        "standard-1x, standard-2x); the operator decides, with "
        "`gateway apps:update shop --max-size SIZE`"
    )
    assert "unknown dyno size 'huge'" in str(sizes.refusal(DEFAULT_SIZES, "huge", None, "shop"))


def test_larger_means_more_of_anything() -> None:
    base = SizeSettings(memory=512, pids=256, cpu=1.0)
    assert not sizes.larger(base, base)
    assert sizes.larger(SizeSettings(512, 257, 1.0), base)  # more processes alone
    assert sizes.larger(SizeSettings(256, 256, 1.5), base)  # more CPU, less memory


def test_sizes_the_host_cannot_give_are_named_with_why() -> None:
    found = sizes.oversized(DEFAULT_SIZES, SMALL_HOST)
    assert found == ["performance-l: 14336 MB of memory, the host has 4096"]
    tiny_host = sizes.Host(memory=4096, pids=300, cpus=1)
    assert "standard-2x: 512 processes, the host allows 300; 2 CPUs, the host has 1" in (
        sizes.oversized(DEFAULT_SIZES, tiny_host)
    )


def test_all_dynos_together_leave_the_host_its_reserve() -> None:
    assert sizes.all_dynos_cap(SMALL_HOST, 1024, 1024) == (3072 << 20, 31744)
    # A reserve larger than half the host still leaves dynos half of it.
    assert sizes.all_dynos_cap(SMALL_HOST, 4000, 30000) == (2048 << 20, 16384)
