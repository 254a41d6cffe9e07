"""Hole punching (peer/punch.py): the offer/answer schema and its hostile inputs, the prediction
and initiator rules, the bounded connect loop on loopback, and -- in NatLab topologies (real nft
NAT between network namespaces, testing/nat.py) -- real child processes (tests/punch_child.py)
that swap offer and answer through the parent, punch, and run a credential-mode handshake and one
AEAD record each way over the punched socket.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from peer.errors import PeerUnavailable, ProtocolError
from peer.identity import Identity
from peer.punch import (MAX_LEAD_S, MAX_WINDOW_S, PunchAnswer, PunchBook, PunchFailed, PunchOffer,
                        classify_mapping, is_initiator, plan, predict, punch_socket, simultaneous_open)
from testing.netns import unavailable_reason

_ROOT = Path(__file__).resolve().parent.parent
_REASON = unavailable_reason(need_nat=True)
needs_netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
A, B = "a" * 40, "b" * 40
WINDOW_S = 4.0  # a SYN the far router dropped is resent after 1 s and 3 s


def offer_answer(**answer_kw) -> tuple[PunchOffer, PunchAnswer]:
    offer = PunchOffer.make(A, ("10.77.0.1", 40000), "preserving")
    return offer, PunchAnswer.to(offer, B, ("10.77.0.2", 41000), "preserving", **answer_kw)


# ------------------------------------------------------------------------------ schema and rules
@pytest.mark.fast
def test_offer_and_answer_round_trip_and_plan_both_sides():
    offer, answer = offer_answer(lead_s=0.5, window_s=3.0)
    assert PunchOffer.decode(offer.encode()) == offer and PunchAnswer.decode(answer.encode()) == answer
    assert len(offer.attempt) == 16 and answer.attempt == offer.attempt
    assert len(offer.encode()) < 128 and len(answer.encode()) < 128
    # the answerer starts lead_s after sending; the offerer lead_s after receiving, less rtt/2
    sent, received = 1000.0, 1000.1
    theirs, mine = plan(B, offer, answer, now=sent), plan(A, offer, answer, now=received, rtt_s=0.2)
    assert (mine.peer_id, mine.remote, mine.initiator) == (B, ("10.77.0.2", 41000), True)
    assert (theirs.peer_id, theirs.remote, theirs.initiator) == (A, ("10.77.0.1", 40000), False)
    assert theirs.at == 1000.5 and mine.at == pytest.approx(1000.5) and mine.window_s == theirs.window_s == 3.0
    assert plan(A, offer, answer, now=received, rtt_s=5.0).at == received  # already late: start at once
    assert mine.prediction.worth_trying


def _packed(*fields) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


GOOD_OFFER = [1, "offer", b"\x01" * 16, A, ["10.77.0.1", 40000], "preserving"]


@pytest.mark.fast
@pytest.mark.parametrize("data, message", [
    (b"\xc1", "undecodable"),
    (b"\x00" * 300, "more than 256"),
    (_packed(*GOOD_OFFER[:5]), "msgpack array"),
    (_packed(2, *GOOD_OFFER[1:]), "version 1"),
    (_packed(1, "answer", *GOOD_OFFER[2:]), "msgpack array"),
    (_packed(*GOOD_OFFER[:2], b"\x01" * 15, *GOOD_OFFER[3:]), "attempt id"),
    (_packed(*GOOD_OFFER[:3], "A" * 40, *GOOD_OFFER[4:]), "peer id"),
    (_packed(*GOOD_OFFER[:4], ["example.org", 40000], "preserving"), "IP address literal"),
    (_packed(*GOOD_OFFER[:4], ["10.77.0.1", 0], "preserving"), "port 1..65535"),
    (_packed(*GOOD_OFFER[:4], ["10.77.0.1", 65536], "preserving"), "port 1..65535"),
    (_packed(*GOOD_OFFER[:4], ["10.77.0.1", True], "preserving"), "port 1..65535"),
    (_packed(*GOOD_OFFER[:4], ["0.0.0.0", 40000], "preserving"), "not a unicast"),
    (_packed(*GOOD_OFFER[:4], ["224.0.0.1", 40000], "preserving"), "not a unicast"),
    (_packed(*GOOD_OFFER[:4], ["127.0.0.1", 22], "preserving"), "not a unicast"),
    (_packed(*GOOD_OFFER[:4], ["169.254.169.254", 80], "preserving"), "not a unicast"),
    (_packed(*GOOD_OFFER[:4], ["::1", 22], "preserving"), "not a unicast"),
    (_packed(*GOOD_OFFER[:4], ["::ffff:127.0.0.1", 22], "preserving"), "not a unicast"),
    (_packed(*GOOD_OFFER[:5], "cone"), "mapping must be one of"),
    (_packed({"x": 1}), "undecodable"),
    ("not bytes", "must be bytes"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_malformed_offers_are_refused_with_a_reason(data, message):
    with pytest.raises(ProtocolError, match=message):
        PunchOffer.decode(data)


@pytest.mark.fast
@pytest.mark.parametrize("lead, window, message", [
    (float("nan"), 1.0, "lead"), (float("inf"), 1.0, "lead"), (-1.0, 1.0, "lead"), (1, 1.0, "lead"),
    (MAX_LEAD_S + 1, 1.0, "lead"), (0.5, 0.0, "window"), (0.5, MAX_WINDOW_S + 1, "window"),
    (0.5, 5, "window"), (0.5, float("nan"), "window"),
])
def test_malformed_answers_are_refused(lead, window, message):
    with pytest.raises(ProtocolError, match=message):
        PunchAnswer.decode(_packed(1, "answer", *GOOD_OFFER[2:], lead, window))


@pytest.mark.fast
def test_plans_that_do_not_fit_are_refused():
    now = time.time()
    offer, answer = offer_answer()
    other, _ = offer_answer()
    with pytest.raises(ProtocolError, match="another attempt"):
        plan(A, other, answer, now=now)
    with pytest.raises(ProtocolError, match="does not involve us"):
        plan("c" * 40, offer, answer, now=now)
    with pytest.raises(ProtocolError, match="same peer"):
        plan(A, offer, PunchAnswer.to(offer, A, ("10.77.0.2", 1), "public"), now=now)
    # a public peer is not made to aim SYNs into a private network (no traffic: plans only)
    public = PunchAnswer.to(offer, B, ("1.1.1.1", 41000), "public")
    with pytest.raises(ProtocolError, match="non-public address 10.77.0.1"):
        plan(B, offer, public, now=now)
    assert plan(A, offer, public, now=now).remote == ("1.1.1.1", 41000)  # private -> public is fine
    with pytest.raises(ValueError, match="rtt_s"):
        plan(A, offer, answer, now=now, rtt_s=-1)
    with pytest.raises(ValueError, match="lead"):  # a far-future start would pin a punch slot
        PunchAnswer.to(offer, B, ("10.77.0.2", 1), "public", lead_s=MAX_LEAD_S + 1)
    with pytest.raises(ValueError, match="window"):
        PunchAnswer.to(offer, B, ("10.77.0.2", 1), "public", window_s=0)


@pytest.mark.fast
def test_mapping_classification_and_prediction():
    local = ("192.168.1.2", 40000)
    assert classify_mapping(local, None) == "unknown"
    assert classify_mapping(local, ("192.168.1.2", 40000)) == "public"
    assert classify_mapping(local, ("10.77.0.1", 40000)) == "preserving"
    assert classify_mapping(local, ("10.77.0.1", 51234)) == "random"
    for ours, theirs, worth in [("preserving", "preserving", True), ("public", "preserving", True),
                                ("unknown", "public", True), ("preserving", "random", False),
                                ("random", "public", False), ("random", "random", False)]:
        p = predict(ours, theirs)
        assert p.worth_trying is worth, (ours, theirs, p)
        assert ("relay" in p.reason) is not worth
    with pytest.raises(ValueError, match="mapping must be one of"):
        predict("symmetric", "public")


@pytest.mark.fast
def test_lower_peer_id_initiates_and_book_matches_inbound():
    assert is_initiator(A, B) and not is_initiator(B, A)
    with pytest.raises(ValueError, match="ourselves"):
        is_initiator(A, A)
    offer, answer = offer_answer()
    book = PunchBook(max_live=1)
    p = plan(A, offer, answer, now=time.time())
    book.add(p)
    assert book.inbound(("10.77.0.2", 41000)) is p and book.inbound(("10.77.0.2", 41001)) is None
    with pytest.raises(PunchFailed, match="already in flight"):
        book.add(p)
    book.remove(p)
    assert book.inbound(("10.77.0.2", 41000)) is None


# ------------------------------------------------------------------------------ loopback
def _listener(reuse_port: bool, host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, 0))
    s.listen(4)
    return s


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])  # PeerHost may listen on every interface
async def test_connects_from_the_listening_port(host):
    mine, target = _listener(True, host), _listener(False)
    local, remote = mine.getsockname(), target.getsockname()
    try:
        sock = await simultaneous_open(local, remote, at=time.time(), window_s=2.0)
        with sock:
            assert sock.getsockname() == ("127.0.0.1", local[1]) and sock.getpeername() == remote
    finally:
        mine.close()
        target.close()


async def test_refused_punch_fails_cleanly_within_the_window():
    mine, closed = _listener(True), _listener(False)
    remote = closed.getsockname()
    closed.close()  # nothing listens there: every attempt is refused (the RST race, lost every time)
    start = time.monotonic()
    try:
        with pytest.raises(PunchFailed, match=r"ECONNREFUSED.*relay") as info:
            await simultaneous_open(mine.getsockname(), remote, at=time.time() + 0.2, window_s=0.6)
    finally:
        mine.close()
    elapsed = time.monotonic() - start
    assert 0.75 <= elapsed < 1.5, elapsed
    assert isinstance(info.value, PeerUnavailable)
    assert "attempts)" in str(info.value)  # several retries, summarized


async def test_listener_without_reuseport_gives_a_clear_error():
    plain, other = _listener(False), _listener(False)
    try:
        with pytest.raises(PunchFailed, match="reuse_port=True"):
            await simultaneous_open(plain.getsockname(), other.getsockname(), at=time.time(), window_s=1.0)
        with pytest.raises(PunchFailed, match="reuse_port=True"):
            punch_socket(plain.getsockname())
    finally:
        plain.close()
        other.close()


async def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="window_s"):
        await simultaneous_open(("127.0.0.1", 1), ("127.0.0.1", 2), at=0, window_s=0)
    with pytest.raises(ValueError, match="itself"):
        await simultaneous_open(("127.0.0.1", 1), ("127.0.0.1", 1), at=0)
    with pytest.raises(PunchFailed, match="address families differ"):
        await simultaneous_open(("127.0.0.1", 1), ("2001:db8::1", 2), at=0)
    with pytest.raises(ValueError, match="attempt|peer id"):
        PunchOffer.make("not-an-id", ("10.77.0.1", 1), "public")
    with pytest.raises(ValueError, match="ahead"):
        await simultaneous_open(("127.0.0.1", 1), ("127.0.0.1", 2), at=time.time() + MAX_LEAD_S + 5)


# ------------------------------------------------------------------------------ NatLab
def topology():
    from testing.nat import Host, NatLab, Router
    return NatLab([Host("a0", "home"), Host("a1", "home2"), Host("b0", "cgn"), Host("pub0"),
                   Host("pub1", firewall=True), Host("pub2")],
                  {"home": Router("preserving"), "home2": Router("preserving"), "cgn": Router("random")})


def _lines(proc: subprocess.Popen, until: str) -> dict:
    out: dict = {}
    while until not in out:
        line = proc.stdout.readline()
        assert line, f"punch child exited early: {out}"
        kind, _, data = line.strip().partition(" ")
        out[kind] = data
    return out


def punch_pair(lab, x: str, y: str, late: dict[str, float] | None = None,
               lower: str | None = None) -> tuple[dict, dict, dict]:
    """x offers, y answers, the parent carries the messages; returns each side's PLAN and RESULT.
    late: a side's start lag; lower: the side given the lower peer id (the handshake initiator)."""
    from testing import natprobe
    observer = lab.popen("pub0", natprobe.argv("serve", lab.address("pub0")), stdout=subprocess.PIPE, text=True)
    port = json.loads(observer.stdout.readline())["port"]
    authority = Identity.generate()
    keys = {x: Identity.generate(), y: Identity.generate()}
    while lower is not None and min(keys, key=lambda name: keys[name].peer_id) != lower:
        keys = {x: Identity.generate(), y: Identity.generate()}
    procs = {}
    for name in (x, y):
        env = {**os.environ, "LOWBAND_TEST_KEY": keys[name].private_bytes().hex(),
               "LOWBAND_TEST_AUTHORITY": authority.private_bytes().hex()}
        procs[name] = lab.popen(name, [sys.executable, "-m", "tests.punch_child", "--host", lab.address(name),
                                       "--observer", f"{lab.address('pub0')}:{port}", "--hello", name,
                                       "--window", str(WINDOW_S), "--late", str((late or {}).get(name, 0))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=_ROOT)
    seen = {name: _lines(procs[name], "READY") for name in (x, y)}

    def tell(name: str, line: str) -> None:
        procs[name].stdin.write(line + "\n")
        procs[name].stdin.flush()

    tell(x, "GO")
    seen[x].update(_lines(procs[x], "OFFER"))
    tell(y, f"OFFER {seen[x]['OFFER']}")
    seen[y].update(_lines(procs[y], "ANSWER"))
    tell(x, f"ANSWER {seen[y]['ANSWER']}")
    for name in (x, y):
        seen[name].update(_lines(procs[name], "RESULT"))
        procs[name].communicate(timeout=15)
        assert procs[name].returncode == 0, (name, procs[name].returncode)
    out = {name: {"plan": json.loads(seen[name]["PLAN"]), "result": json.loads(seen[name]["RESULT"])}
           for name in (x, y)}
    return out[x], out[y], {name: k.peer_id for name, k in keys.items()}


@pytest.mark.root
@needs_netns
@pytest.mark.parametrize("x, y, mappings", [("a0", "a1", ("preserving", "preserving")),
                                            ("a0", "pub1", ("preserving", "public"))],
                         ids=["preserving-preserving", "preserving-firewalled-public"])
def test_punch_connects_and_carries_a_real_handshake(x, y, mappings):
    with topology() as lab:
        rx, ry, ids = punch_pair(lab, x, y)
    print(x, y, json.dumps(rx), json.dumps(ry))
    assert (rx["plan"]["mapping"], ry["plan"]["mapping"]) == mappings
    assert rx["plan"]["worth_trying"] and ry["plan"]["worth_trying"]
    assert rx["result"]["ok"] and ry["result"]["ok"], (rx, ry)
    a, b = rx["result"], ry["result"]
    # both sides dialled (a true simultaneous open) from their listening port, each seen at the
    # public address the other was told
    assert a["via"] == b["via"] == "connect"
    assert a["local"] == rx["plan"]["listen"] and b["local"] == ry["plan"]["listen"]
    assert a["peer"] == ry["plan"]["observed"] and b["peer"] == rx["plan"]["observed"]
    # one initiator (the lower id), mutual authentication with credentials, one session
    assert a["initiator"] is (ids[x] < ids[y]) and b["initiator"] is not a["initiator"]
    assert (a["peer_id"], b["peer_id"]) == (ids[y], ids[x])
    assert a["roles"] == b["roles"] == ["train"]
    assert a["th"] == b["th"]
    assert (a["got"], b["got"]) == (y, x)  # one AEAD record each way
    assert a["seconds"] < 2.0 and b["seconds"] < 2.0


@pytest.mark.root
@needs_netns
def test_punch_through_fully_random_nat_fails_cleanly_within_the_window():
    with topology() as lab:
        start = time.monotonic()
        rx, ry, _ = punch_pair(lab, "a0", "b0")
        elapsed = time.monotonic() - start
    print(json.dumps(rx), json.dumps(ry), f"{elapsed:.1f} s")
    assert rx["plan"]["mapping"] == "preserving" and ry["plan"]["mapping"] == "random"
    assert not rx["plan"]["worth_trying"] and "relay" in rx["plan"]["reason"]
    for side in (rx, ry):
        assert side["result"]["ok"] is False
        assert "did not connect within 4 s: no answer to our SYNs" in side["result"]["error"]
        assert WINDOW_S - 0.2 <= side["result"]["seconds"] <= WINDOW_S + 1.0, side
    assert elapsed < WINDOW_S + 10


@pytest.mark.root
@needs_netns
def test_a_late_public_peer_takes_the_punch_on_its_listener():
    """pub2 (no NAT, no firewall) starts 0.5 s late: a0's SYN reaches its listener before pub2
    dials. The PunchBook hands that inbound connection to the punch, with the handshake role the
    initiator rule gives: pub2 has the lower id, so the side that *accepted* initiates (as an
    ordinary inbound responder, both sides would wait for the other's HELLO)."""
    with topology() as lab:
        rx, ry, ids = punch_pair(lab, "a0", "pub2", late={"pub2": 0.5}, lower="pub2")
    print(json.dumps(rx), json.dumps(ry))
    a, b = rx["result"], ry["result"]
    assert a["ok"] and b["ok"], (a, b)
    assert (a["via"], b["via"]) == ("connect", "accept")
    assert b["initiator"] and not a["initiator"]
    assert a["th"] == b["th"] and (a["got"], b["got"]) == ("pub2", "a0")
    assert a["seconds"] < 1.0 and b["seconds"] < 0.5  # pub2 had it before its own start
