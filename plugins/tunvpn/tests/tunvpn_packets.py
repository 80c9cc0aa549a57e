"""Builders and parsers of IPv4/IPv6 TCP/ICMP packets for the tunvpn tests."""

from __future__ import annotations

import struct

from kairos_plugin_tunvpn.vnet import fold, internet_checksum, ones_sum

IPV4_A = bytes([10, 201, 0, 1])
IPV4_B = bytes([10, 201, 0, 2])


def tcp_header(seq: int, flags: int, options: bytes = b"", ack: int = 7, window: int = 512) -> bytearray:
    """A TCP header from port 5000 to 5201 with checksum 0."""
    doff = (20 + len(options)) // 4
    header = bytearray(struct.pack("!HHIIBBHHH", 5000, 5201, seq, ack, doff << 4, flags, window, 0, 0))
    return header + options


def ipv4_tcp(
    payload: bytes,
    *,
    seq: int = 1000,
    flags: int = 0x18,
    src: bytes = IPV4_A,
    dst: bytes = IPV4_B,
    ip_id: int = 77,
    options: bytes = b"",
    partial: bool = True,
) -> bytearray:
    """An IPv4 TCP packet; its TCP checksum is partial (pseudo-header only) or complete."""
    tcp = tcp_header(seq, flags, options)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), ip_id, 0x4000, 64, 6, 0, src, dst))
    struct.pack_into("!H", ip, 10, internet_checksum(ip))
    packet = ip + tcp + payload
    pseudo = fold(ones_sum(src + dst) + 6 + len(tcp) + len(payload))
    if partial:
        struct.pack_into("!H", packet, 36, pseudo)
    else:
        struct.pack_into("!H", packet, 36, ~fold(pseudo + ones_sum(packet[20:])) & 0xFFFF)
    return packet


def ipv6_tcp(payload: bytes, *, seq: int = 1000, flags: int = 0x18, partial: bool = True) -> bytearray:
    """An IPv6 TCP packet between fd00::1 and fd00::2."""
    src = bytes.fromhex("fd000000000000000000000000000001")
    dst = bytes.fromhex("fd000000000000000000000000000002")
    tcp = tcp_header(seq, flags)
    ip = bytearray(struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64, src, dst))
    packet = ip + tcp + payload
    pseudo = fold(ones_sum(src + dst) + 6 + len(tcp) + len(payload))
    struct.pack_into("!H", packet, 56, pseudo if partial else ~fold(pseudo + ones_sum(packet[40:])) & 0xFFFF)
    return packet


def icmp_echo(src: bytes = IPV4_A, dst: bytes = IPV4_B, payload: bytes = b"ping" * 8) -> bytearray:
    """An IPv4 ICMP echo request with valid checksums."""
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 1, 1)) + payload
    struct.pack_into("!H", icmp, 2, internet_checksum(icmp))
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, src, dst))
    struct.pack_into("!H", ip, 10, internet_checksum(ip))
    return ip + icmp


def tcp_checksum_ok(packet: bytes | bytearray) -> bool:
    """True if the TCP checksum of an IPv4/IPv6 packet is complete and right."""
    if packet[0] >> 4 == 4:
        offset, pseudo_addresses = (packet[0] & 15) * 4, packet[12:20]
    else:
        offset, pseudo_addresses = 40, packet[8:40]
    segment = packet[offset:]
    return fold(ones_sum(bytes(pseudo_addresses)) + 6 + len(segment) + ones_sum(bytes(segment))) == 0xFFFF


def ipv4_header_ok(packet: bytes | bytearray) -> bool:
    """True if an IPv4 header checksum is right."""
    return ones_sum(bytes(packet[: (packet[0] & 15) * 4])) == 0xFFFF
