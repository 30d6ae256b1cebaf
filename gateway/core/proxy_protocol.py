"""The PROXY protocol, version 2: the binary header HAProxy (`send-proxy-v2`) puts at the
start of each connection it forwards, naming the client it came from.

Pure parsing, no I/O (haproxy.org's doc/proxy-protocol.txt, section 2.2):

    12 bytes  signature \\r\\n\\r\\n\\0\\r\\nQUIT\\n
    1 byte    version (high nibble, 2) and command (low: 0 LOCAL, 1 PROXY)
    1 byte    address family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) and
              transport (low: 0 UNSPEC, 1 STREAM, 2 DGRAM)
    2 bytes   length of what follows (network order): the addresses, then TLVs

A LOCAL header is the proxy speaking for itself (its health checks): the connection's
own peer is the client. So is a PROXY header with an UNSPEC or UNIX family, which carries
no IP address. TLVs are skipped. What is not a v2 header is refused as soon as a byte
shows it (an SSH version line fails on its first byte), so a client that connects
without the proxy learns nothing and costs nothing.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED = 16  # signature, version and command, family, length
# The largest header taken (addresses and TLVs): HAProxy's, even with its SSL TLVs, fit;
# it is also what a waiting connection may send before its reading pauses.
MAX_HEADER = 4096

LOCAL, PROXY = 0x0, 0x1
UNSPEC, INET, INET6, UNIX = 0x0, 0x1, 0x2, 0x3
STREAM, DGRAM = 0x1, 0x2
# Address block sizes: source and destination address, then source and destination port.
_ADDRESS_SIZES = {INET: 12, INET6: 36, UNIX: 216}


class BadProxyHeader(ValueError):
    """Bytes that are not a PROXY protocol v2 header (or one we do not take); the
    connection is closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header. `source` is the client's (address, port) as the proxy saw it, or
    None when the header names no IP client (LOCAL, UNSPEC, UNIX): then the connection's
    own peer stands. `length` is how many bytes the header took; the client's first
    bytes follow it."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int

    @property
    def local(self) -> bool:
        return self.source is None


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None while more bytes are needed to tell.
    BadProxyHeader as soon as `data` cannot be the start of a v2 header."""
    start = data[: len(SIGNATURE)]
    if not SIGNATURE.startswith(start):
        raise BadProxyHeader("no PROXY protocol v2 signature")
    if len(data) < FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise BadProxyHeader(f"PROXY protocol version {version}, not 2")
    if command not in (LOCAL, PROXY):
        raise BadProxyHeader(f"unknown PROXY protocol command {command:#x}")
    family, transport = data[13] >> 4, data[13] & 0x0F
    if family not in (UNSPEC, INET, INET6, UNIX) or transport not in (0, STREAM, DGRAM):
        raise BadProxyHeader(f"unknown address family or transport {data[13]:#04x}")
    length = int.from_bytes(data[14:16], "big")
    if FIXED + length > MAX_HEADER:
        raise BadProxyHeader(f"PROXY header of {FIXED + length} bytes, over {MAX_HEADER}")
    if len(data) < FIXED + length:
        return None
    total = FIXED + length
    if command == LOCAL or family in (UNSPEC, UNIX):
        if family in _ADDRESS_SIZES and length < _ADDRESS_SIZES[family]:
            raise BadProxyHeader("PROXY header shorter than its addresses")
        return ProxyHeader(None, None, total)
    if transport != STREAM:
        raise BadProxyHeader("PROXY header for a datagram connection")
    size = _ADDRESS_SIZES[family]
    if length < size:
        raise BadProxyHeader("PROXY header shorter than its addresses")
    block = data[FIXED : FIXED + size]
    half = (size - 4) // 2
    source = _address(family, block[:half])
    destination = _address(family, block[half : 2 * half])
    ports = block[2 * half :]
    return ProxyHeader(
        (source, int.from_bytes(ports[:2], "big")),
        (destination, int.from_bytes(ports[2:4], "big")),
        total,
    )


def _address(family: int, raw: bytes) -> str:
    if family == INET:
        return str(ipaddress.IPv4Address(raw))
    address = ipaddress.IPv6Address(raw)
    # An IPv4 client seen through an IPv6 socket: as the client's own address.
    return str(address.ipv4_mapped or address)


def build(
    source: tuple[str, int] | None, destination: tuple[str, int] | None = None, tlvs: bytes = b""
) -> bytes:
    """A v2 header, as HAProxy sends it: PROXY for TCP between `source` and `destination`,
    or LOCAL when `source` is None. For tests and benchmarks (HAProxy is the real sender)."""
    if source is None:
        return SIGNATURE + bytes([0x20, 0x00]) + len(tlvs).to_bytes(2, "big") + tlvs
    destination = destination or (
        ("0.0.0.0", 0) if ipaddress.ip_address(source[0]).version == 4 else ("::", 0)
    )
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be of one address family")
    family = INET if src.version == 4 else INET6
    block = (
        src.packed + dst.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    )
    body = block + tlvs
    return SIGNATURE + bytes([0x21, (family << 4) | STREAM]) + len(body).to_bytes(2, "big") + body
