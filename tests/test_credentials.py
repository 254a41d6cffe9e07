"""Coordinator-issued credentials (peer/credentials.py): round trip, every refusal reason of
``check``, and a decoder that raises only ProtocolError on truncated, garbage or oversized input."""
from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.credentials import MAX_CREDENTIAL_BYTES, ROLES, Credential, issue
from peer.errors import AuthError, ProtocolError
from peer.identity import Identity

NOW = 1_800_000_000.0
AUTHORITY = Identity.generate()
HOLDER = Identity.generate()


def cred(roles=("train", "serve"), *, authority=AUTHORITY, holder=HOLDER, now=NOW, lifetime_s=3600.0, serial=7):
    return issue(authority, holder.public_bytes, roles, now=now, lifetime_s=lifetime_s, serial=serial)


def check(c: Credential, *, authority=AUTHORITY, holder=HOLDER, now=NOW + 10, revoked=None):
    c.check(authority=authority.public_bytes, peer_public=holder.public_bytes, now=now, revoked=revoked)


def test_round_trip_and_fields():
    c = cred(ROLES)
    data = c.encode()
    assert len(data) <= MAX_CREDENTIAL_BYTES
    d = Credential.decode(data)
    assert d == c and d.encode() == data
    assert d.peer_id == HOLDER.peer_id and d.roles == ROLES and d.serial == 7
    assert d.expires - d.issued == 3600.0 and d.authority == AUTHORITY.public_bytes
    assert d.has("operator") and cred(["client"]).has("client") and not cred(["client"]).has("train")
    assert d.signed_bytes().startswith(b"lowband-credential/v1\n")
    check(d)
    check(d, revoked=lambda pid: pid != HOLDER.peer_id)  # someone else is revoked: fine
    check(cred([]))  # no roles is a valid (useless) credential


@pytest.mark.parametrize("case, match", [
    ("wrong-authority", "issued by another coordinator"),
    ("altered-roles", "signature invalid"),
    ("altered-expiry", "signature invalid"),
    ("self-signed", "signature invalid"),
    ("other-key", "bound to another key"),
    ("expired", "expired"),
    ("future", "not yet valid"),
    ("revoked", "was revoked"),
])
def test_every_refusal_reason(case, match):
    c, kw = cred(["client"]), {}
    if case == "wrong-authority":
        kw["authority"] = Identity.generate()
    elif case == "altered-roles":  # a client promotes itself to operator
        c = dataclasses.replace(c, roles=frozenset({"client", "operator"}))
    elif case == "altered-expiry":
        c = dataclasses.replace(c, expires=c.expires + 10 * 365 * 86400)
    elif case == "self-signed":  # names the real authority, signed by the holder's own key
        forged = cred(["operator"], authority=HOLDER)
        c = dataclasses.replace(forged, authority=AUTHORITY.public_bytes)
    elif case == "other-key":  # a stolen credential shown by another peer
        kw["holder"] = Identity.generate()
    elif case == "expired":
        kw["now"] = NOW + 3600.0
    elif case == "future":
        kw["now"] = NOW - 301.0
    elif case == "revoked":
        kw["revoked"] = lambda pid: pid == HOLDER.peer_id
    with pytest.raises(AuthError, match=match):
        check(c, **kw)
    # the same credential round-tripped through the wire fails the same way
    with pytest.raises(AuthError, match=match):
        check(Credential.decode(c.encode()), **kw)


def test_small_clock_skew_is_tolerated():
    check(cred(), now=NOW - 299.0)


def test_issue_refuses_bad_arguments():
    with pytest.raises(ValueError, match="unknown roles"):
        cred(["train", "root"])
    with pytest.raises(ValueError, match="32 bytes"):
        issue(AUTHORITY, b"short", ["train"], now=NOW, lifetime_s=1, serial=1)
    with pytest.raises(ValueError, match="positive lifetime"):
        cred(lifetime_s=0)
    with pytest.raises(ValueError, match="serial"):
        cred(serial=-1)


def _fields(c: Credential) -> list:
    return msgpack.unpackb(c.encode(), raw=False)


@pytest.mark.parametrize("mutate, match", [
    (lambda f: f[:7], "array of 8"),
    (lambda f: f + [b""], "array of 8|exceeds max_array_len"),
    (lambda f: [2] + f[1:], "unsupported credential version"),
    (lambda f: [True] + f[1:], "unsupported credential version"),
    (lambda f: f[:1] + [b"k" * 31] + f[2:], "peer key must be 32 bytes"),
    (lambda f: f[:1] + ["k" * 32] + f[2:], "peer key must be 32 bytes"),
    (lambda f: f[:2] + [["train", "root"]] + f[3:], "unknown roles"),
    (lambda f: f[:2] + [["train", "serve", "serve"]] + f[3:], "sorted and unique"),
    (lambda f: f[:2] + [["train", "serve"]] + f[3:], "sorted and unique"),
    (lambda f: f[:2] + [[1]] + f[3:], "list of strings"),
    (lambda f: f[:2] + ["train"] + f[3:], "list of strings"),
    (lambda f: f[:3] + [int(f[3])] + f[4:], "finite float"),
    (lambda f: f[:4] + [float("inf")] + f[5:], "finite float"),
    (lambda f: f[:4] + [f[3] - 1.0] + f[5:], "before it was issued"),
    (lambda f: f[:5] + [-1] + f[6:], "serial"),
    (lambda f: f[:5] + [2**64 - 1] + f[6:], "serial"),
    (lambda f: f[:5] + [1.5] + f[6:], "serial"),
    (lambda f: f[:6] + [b"a" * 33] + f[7:], "authority key must be 32 bytes"),
    (lambda f: f[:7] + [b"s" * 63], "signature must be 64 bytes"),
])
def test_malformed_fields_are_protocol_errors(mutate, match):
    data = msgpack.packb(mutate(_fields(cred())), use_bin_type=True)
    with pytest.raises(ProtocolError, match=match):
        Credential.decode(data)


def test_truncated_garbage_oversized_and_non_canonical():
    data = cred().encode()
    for n in range(len(data)):
        with pytest.raises(ProtocolError):
            Credential.decode(data[:n])
    for bad in [b"", b"\xc1", b"GET / HTTP/1.1\r\n", data + b"\x00", msgpack.packb({"a": 1}),
                b"\x91" * 100 + b"\x90", b"\xdd\xff\xff\xff\xff"]:
        with pytest.raises(ProtocolError):
            Credential.decode(bad)
    with pytest.raises(ProtocolError, match="limit 400"):
        Credential.decode(b"\x00" * (MAX_CREDENTIAL_BYTES + 1))
    with pytest.raises(ProtocolError, match="must be bytes"):
        Credential.decode("text")  # type: ignore[arg-type]
    # float32 times: the same values, another encoding -> refused (one credential, one encoding)
    f = _fields(cred(now=1.5, lifetime_s=1.0))
    packer = msgpack.Packer(use_bin_type=True, use_single_float=True)
    with pytest.raises(ProtocolError, match="not canonically encoded"):
        Credential.decode(packer.pack(f))


@settings(max_examples=300, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=MAX_CREDENTIAL_BYTES + 20),
    # near-valid: a real encoding with a few bytes changed
    st.tuples(st.integers(0, 250), st.binary(min_size=1, max_size=4)).map(
        lambda t: (lambda d: d[:t[0]] + t[1] + d[t[0] + len(t[1]):])(cred().encode())),
))
def test_decode_fuzz_raises_only_protocol_error(data):
    try:
        c = Credential.decode(data)
    except ProtocolError:
        return
    assert c.encode() == data  # whatever decodes is canonical...
    try:  # ...and a mutated one never passes the signature check
        check(c)
    except AuthError:
        return
    assert data == cred().encode()
