"""The PROXY protocol v2 parser (gateway/core/proxy_protocol.py), without sockets: the
headers HAProxy sends, and each kind of bad input refused with its reason."""

from __future__ import annotations

import pytest

from gateway.core.proxy_protocol import (
    MAX_HEADER,
    SIGNATURE,
    BadProxyHeader,
    ProxyHeader,
    build,
    parse,
)

# What HAProxy 2.6 sent (captured) for a client 127.0.0.9:40000 reaching 127.0.0.1:2222,
# with its default TLV (PP2_TYPE_NOOP padding is not sent; none here).
HAPROXY_IPV4 = (
    SIGNATURE + bytes([0x21, 0x11, 0x00, 0x0C]) + bytes([127, 0, 0, 9, 127, 0, 0, 1])
    + (40000).to_bytes(2, "big") + (2222).to_bytes(2, "big")
)  # fmt: skip


def test_an_ipv4_header_names_the_client_and_where_its_bytes_start() -> None:
    data = HAPROXY_IPV4 + b"SSH-2.0-OpenSSH_9.2\r\n"
    header = parse(data)
    assert header == ProxyHeader(("127.0.0.9", 40000), ("127.0.0.1", 2222), 28)
    assert data[header.length :] == b"SSH-2.0-OpenSSH_9.2\r\n"
    assert build(("127.0.0.9", 40000), ("127.0.0.1", 2222)) == HAPROXY_IPV4


def test_an_ipv6_header_and_a_v4_mapped_client() -> None:
    header = parse(build(("2001:db8::7", 5555), ("2001:db8::1", 22)))
    assert header is not None and header.source == ("2001:db8::7", 5555)
    mapped = parse(build(("::ffff:198.18.0.5", 1), ("::1", 22)))
    assert mapped is not None and mapped.source == ("198.18.0.5", 1)


def test_tlvs_are_skipped() -> None:
    tlv = bytes([0x04, 0x00, 0x03]) + b"abc"  # PP2_TYPE_NOOP
    data = build(("10.1.2.3", 9), ("10.0.0.1", 22), tlvs=tlv) + b"rest"
    header = parse(data)
    assert header is not None and header.source == ("10.1.2.3", 9)
    assert data[header.length :] == b"rest"


def test_local_is_the_proxy_itself_and_keeps_the_real_peer() -> None:
    header = parse(build(None) + b"x")
    assert header == ProxyHeader(None, None, 16) and header.local
    # HAProxy's health checks send LOCAL with an address block: skipped.
    with_block = SIGNATURE + bytes([0x20, 0x11, 0, 12]) + bytes(12)
    assert parse(with_block) == ProxyHeader(None, None, 28)


def test_unspec_and_unix_families_carry_no_ip_client() -> None:
    assert parse(SIGNATURE + bytes([0x21, 0x00, 0, 0])) == ProxyHeader(None, None, 16)
    unix = SIGNATURE + bytes([0x21, 0x31, 0, 216]) + bytes(216)
    assert parse(unix) == ProxyHeader(None, None, 232)


@pytest.mark.parametrize("cut", range(len(HAPROXY_IPV4)))
def test_a_header_cut_short_asks_for_more(cut: int) -> None:
    assert parse(HAPROXY_IPV4[:cut]) is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "no PROXY protocol v2 signature"),
        (b"S", "no PROXY protocol v2 signature"),
        (b"\x16\x03\x01", "no PROXY protocol v2 signature"),  # a TLS ClientHello
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol v2 signature"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY protocol v2 signature"),  # v1
        (SIGNATURE + bytes([0x11, 0x11, 0, 12]), "PROXY protocol version 1, not 2"),
        (SIGNATURE + bytes([0x22, 0x11, 0, 12]), "unknown PROXY protocol command 0x2"),
        (SIGNATURE + bytes([0x21, 0x41, 0, 12]), "unknown address family or transport 0x41"),
        (SIGNATURE + bytes([0x21, 0x13, 0, 12]), "unknown address family or transport 0x13"),
        (SIGNATURE + bytes([0x21, 0x12, 0, 12]) + bytes(12), "datagram"),
        (SIGNATURE + bytes([0x21, 0x11, 0, 4]) + bytes(4), "shorter than its addresses"),
        (SIGNATURE + bytes([0x21, 0x21, 0, 12]) + bytes(12), "shorter than its addresses"),
        (SIGNATURE + bytes([0x20, 0x11, 0, 4]) + bytes(4), "shorter than its addresses"),
        (SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]), f"over {MAX_HEADER}"),
    ],
)
def test_what_is_refused_and_why(data: bytes, reason: str) -> None:
    with pytest.raises(BadProxyHeader, match=reason):
        parse(data)
