"""Which addresses a peer may be made to dial: address scopes (sans-IO, stdlib only).

A peer dials addresses that others name (a hole punch's observed address, a connection
reversal's address). Identities are free, so a named address must never point our traffic at
services that only we can reach: our own host (loopback), our link (link-local), a private
network we sit next to while the namer is out on the internet. The rule: an address is at least
as far out as a *reference* address that the same exchange proves (our own public address, the
relay's): scopes rank loopback < private (any non-global unicast) < global, and unspecified,
multicast and reserved addresses are never dialled. An IPv4-mapped IPv6 address counts as the
IPv4 address it maps.
"""
from __future__ import annotations

import ipaddress

LOOPBACK, PRIVATE, GLOBAL = 0, 1, 2
_NAMES = {LOOPBACK: "loopback", PRIVATE: "private", GLOBAL: "public"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress:
    """The IP of a literal (``::ffff:a.b.c.d`` -> ``a.b.c.d``); ValueError if it is not one."""
    ip = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def unicast_error(ip: IPAddress) -> str | None:
    """Why ``ip`` is no address another host can have, or None."""
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved:
        return f"{ip} is not a unicast address another host can have"
    return None


def scope(ip: IPAddress) -> int:
    if ip.is_loopback:
        return LOOPBACK
    return GLOBAL if ip.is_global else PRIVATE


def dial_error(target: str, reference: str) -> str | None:
    """Why we must not dial ``target`` (an IP literal) when ``reference`` is the address the
    exchange that named it came through, or None if we may."""
    try:
        ip, ref = parse_ip(target), parse_ip(reference)
    except ValueError:
        return f"{target[:64]!r} is not an IP address literal"
    bad = unicast_error(ip)
    if bad is not None:
        return bad
    if scope(ip) < scope(ref):
        return (f"{ip} is a {_NAMES[scope(ip)]} address while {ref} is {_NAMES[scope(ref)]}: refused (it "
                f"would aim our traffic into a network the naming peer should not reach through us)")
    return None


def same_ip(a: str, b: str) -> bool:
    """Whether two IP literals name one address (IPv4-mapped forms included); False if either is not one."""
    try:
        return parse_ip(a) == parse_ip(b)
    except ValueError:
        return False
