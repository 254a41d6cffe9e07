"""Admission and signed requests on the coordinator (issue 14 items 1-2, contracts C2/C3).

In-process tests run the real aiohttp app on a real 127.0.0.1 socket and speak raw signed HTTP
(testing/signed.py), so they can send what a well-behaved client never would: replays, altered
paths and bodies, bearer tokens, proofs bound to another key. The CLI, HTTPS pinning and the
weak-token refusal run a real `coordinator start` process.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from coordinator.app import CoordinatorConfig, create_app
from coordinator.auth import AUTH, REVOCATION_REFRESH_S, create_invite, revoke
from coordinator.store import Store
from peer import admission, reqsign
from peer.credentials import Credential
from peer.errors import AuthError
from peer.identity import Identity
from peer.joinstring import JoinString
from testing import ROOT
from testing.signed import Signer

TOKEN = "admission-test-token-7f1c2a9e5b3d4c8a6e0f1b2d3c4a5e6f7a8b9c0d"
PY = sys.executable


class Coord:
    def __init__(self, server: TestServer, store: Store, app) -> None:
        self.server, self.store, self.app = server, store, app
        self.url = str(server.make_url("")).rstrip("/")
        self.signers: list[Signer] = []

    def signer(self, identity: Identity | None = None) -> Signer:
        s = Signer(self.url, identity)
        self.signers.append(s)
        return s

    async def invite(self, *roles: str, uses: int = 1, expires_s: float = 3600.0) -> tuple[str, bytes]:
        return await self.store.run(lambda c: create_invite(c, roles, expires_s=expires_s,
                                                            uses=uses, now=time.time()))

    async def member(self, *roles: str, join: bool = True) -> Signer:
        """An identity admitted by invite with ``roles`` (and joined, when it may)."""
        s = self.signer()
        assert (await s.admit_invite(*await self.invite(*roles))).status == 200
        if join and {"train", "serve"} & set(roles):
            assert (await s.join()).status == 200
        return s

    async def close(self) -> None:
        for s in self.signers:
            await s.close()
        await self.server.close()
        self.store.close()


async def start(data_dir, **config) -> Coord:
    store = Store(data_dir)
    store.open()
    config.setdefault("token", TOKEN)
    app = create_app(CoordinatorConfig(data_dir=data_dir, heartbeat_interval=0.5, peer_timeout=5.0,
                                       **config), store)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return Coord(server, store, app)


@pytest.fixture
async def coord(tmp_path):
    c = await start(tmp_path / "coord")
    yield c
    await c.close()


# -- signed requests ------------------------------------------------------------------------------
async def test_replayed_and_altered_requests_are_refused(coord):
    peer = await coord.member("train")
    body = json.dumps({"stats": {"x": 1}}).encode()
    headers = peer.headers("POST", "/api/heartbeat", body)
    first = await peer.send("POST", "/api/heartbeat", body, headers)
    assert first.status == 200, first.json
    replay = await peer.send("POST", "/api/heartbeat", body, headers)
    assert (replay.status, replay.code) == (403, "replayed")

    def fresh() -> dict:
        return peer.headers("POST", "/api/heartbeat", body)
    # another path, method or body under a valid signature: refused, nothing recorded
    moved = await peer.send("POST", "/api/leave", body, fresh())
    assert (moved.status, moved.code) == (403, "bad_signature")
    as_get = await peer.send("GET", "/api/peers", b"", peer.headers("POST", "/api/peers", b""))
    assert (as_get.status, as_get.code) == (403, "bad_signature")
    query = await peer.send("GET", "/api/peers?state=left", b"", peer.headers("GET", "/api/peers", b""))
    assert (query.status, query.code) == (403, "bad_signature")
    other = json.dumps({"stats": {"x": 2}}).encode()
    swapped = await peer.send("POST", "/api/heartbeat", other, fresh())
    assert (swapped.status, swapped.code) == (400, "body_mismatch")
    # a signature by another key under this peer's id
    forger = Identity.generate()
    forged = reqsign.sign_headers(forger, "POST", "/api/heartbeat", body)
    forged[reqsign.H_PEER] = peer.identity.peer_id
    bad = await peer.send("POST", "/api/heartbeat", body, forged)
    assert (bad.status, bad.code) == (403, "bad_signature")
    # a stale timestamp, signed correctly
    stale = reqsign.sign_headers(peer.identity, "POST", "/api/heartbeat", body, now=time.time() - 120)
    old = await peer.send("POST", "/api/heartbeat", body, stale)
    assert (old.status, old.code) == (401, "clock_skew")
    assert (await peer.request("POST", "/api/heartbeat", {"stats": {}})).status == 200  # still fine


async def test_bearer_token_alone_gets_nothing(coord):
    async with aiohttp.ClientSession() as s:
        for method, path in [("POST", "/api/join"), ("POST", "/api/heartbeat"), ("GET", "/api/peers"),
                             ("GET", "/api/runs"), ("POST", "/api/runs/r/sync"),
                             ("PUT", "/api/runs/r/chunks/" + "0" * 64),
                             ("PUT", "/api/runs/r/checkpoints/1"), ("POST", "/api/inference/offenses"),
                             ("POST", "/api/admit")]:
            async with s.request(method, coord.url + path, data=b"{}",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                doc = await r.json()
                assert r.status == 401 and doc["error"] == "bearer_not_accepted", (path, doc)
        async with s.get(coord.url + "/api/health") as r:  # the public routes stay public
            assert r.status == 200
        async with s.get(coord.url + "/api/status") as r:
            assert r.status == 200
    unknown = coord.signer()  # signed, but never admitted
    answer = await unknown.request("GET", "/api/peers")
    assert (answer.status, answer.code) == (403, "unknown_identity")


# -- admission ------------------------------------------------------------------------------------
async def test_invite_uses_expiry_revocation_and_binding(coord):
    invite_id, secret = await coord.invite("serve", uses=2)
    a, b, c = coord.signer(), coord.signer(), coord.signer()
    answer = await a.admit_invite(invite_id, secret)
    assert answer.status == 200 and answer.json["roles"] == ["serve"]
    cred = admission.AdmitAnswer.from_json(answer.json).credential
    cred.check(authority=coord.app[AUTH].authority.public_bytes,
               peer_public=a.identity.public_bytes, now=time.time())
    assert (await b.admit_invite(invite_id, secret)).status == 200
    used = await c.admit_invite(invite_id, secret)
    assert (used.status, used.code) == (403, "invite_used")

    # a proof is bound to the key it was made for: a captured proof admits nobody else
    invite_id, secret = await coord.invite("train")
    stolen = admission.invite_proof(secret, a.identity.public_bytes)
    d = coord.signer()
    refused = await d.admit(admission.AdmitRequest(invite=invite_id, proof=stolen))
    assert (refused.status, refused.code) == (403, "bad_invite")
    wrong = await d.admit_invite(invite_id, b"\x00" * 32)
    assert (wrong.status, wrong.code) == (403, "bad_invite")

    short_id, short_secret = await coord.invite("train", expires_s=0.2)
    await asyncio.sleep(0.3)
    expired = await d.admit_invite(short_id, short_secret)
    assert (expired.status, expired.code) == (403, "invite_expired")

    await coord.store.run(revoke, invite_id, time.time())
    revoked = await d.admit_invite(invite_id, secret)
    assert (revoked.status, revoked.code) == (403, "invite_revoked")


async def test_token_open_and_renewal_modes(tmp_path):
    closed = await start(tmp_path / "closed")
    try:
        peer = closed.signer()
        answer = await peer.admit_token(TOKEN)
        assert answer.status == 200 and answer.json["roles"] == ["client", "serve", "train"]
        # the coordinator proves it knows the token too
        assert answer.json["token_mac"] == admission.token_mac(
            TOKEN, bytes.fromhex(answer.json["authority"]), bytes.fromhex(answer.json["credential"]))
        wrong = await closed.signer().admit_token(TOKEN + "x")
        assert (wrong.status, wrong.code) == (403, "bad_token_proof")
        nothing = await closed.signer().admit({})
        assert (nothing.status, nothing.code) == (403, "not_admitted")
        renewed = await peer.admit({})  # an admitted key renews with {}
        assert renewed.status == 200
        old = Credential.decode(bytes.fromhex(answer.json["credential"]))
        new = Credential.decode(bytes.fromhex(renewed.json["credential"]))
        assert new.serial > old.serial and new.roles == old.roles
        garbage = await closed.signer().admit({"invite": "zz", "proof": 3})
        assert (garbage.status, garbage.code) == (400, "bad_admit")
    finally:
        await closed.close()
    opened = await start(tmp_path / "open", token=None, open=True)
    try:
        peer = opened.signer()
        answer = await peer.admit({})
        assert answer.status == 200 and "token_mac" not in answer.json
        token_tried = await opened.signer().admit_token(TOKEN)
        assert (token_tried.status, token_tried.code) == (403, "no_token_mode")
        assert (await peer.join()).status == 200
    finally:
        await opened.close()


async def test_admissions_per_address_are_rate_limited(tmp_path):
    c = await start(tmp_path / "c", token=None, open=True, admit_rate_per_s=0.01, admit_burst=3)
    try:
        statuses = [(await c.signer().admit({})).status for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
    finally:
        await c.close()


async def test_client_role_cannot_train_vote_or_upload(coord):
    client = await coord.member("client")
    trainer = await coord.member("train")
    assert (await trainer.request("POST", "/api/runs/r", {"config": {"preset": "micro"}})).status == 200
    refused = {
        "join": await client.join(),
        "run": await client.request("POST", "/api/runs/r", {"config": {"preset": "micro"}}),
        "sync": await client.request("POST", "/api/runs/r/sync", {"step": 1, "base_hash": "0" * 64}),
        "report": await client.request("POST", "/api/runs/r/report", {"step": 1, "state_hash": "0" * 64}),
        "offense": await client.request("POST", "/api/runs/r/offenses", {"step": 1, "offenses": []}),
        "chunk": await client.request("PUT", "/api/runs/r/chunks/" + hashlib.sha256(b"x").hexdigest(),
                                      b"x", content_type="application/octet-stream"),
        "manifest": await client.request("PUT", "/api/runs/r/checkpoints/1", {}),
        "missing": await client.request("POST", "/api/runs/r/checkpoints/missing", {"shas": []}),
    }
    for what, answer in refused.items():
        assert (answer.status, answer.code) == (403, "forbidden"), (what, answer.json)
    # what a client may do: read the swarm, report a bad server
    assert (await client.request("GET", "/api/peers")).status == 200
    report = await client.request("POST", "/api/inference/offenses",
                                  {"offender": trainer.identity.peer_id, "detail": {"why": "test"}})
    assert report.status == 200, report.json
    no_report = await trainer.request("POST", "/api/inference/offenses",
                                      {"offender": client.identity.peer_id})
    assert (no_report.status, no_report.code) == (403, "forbidden")


async def test_revoked_identity_is_refused_everywhere_and_listed(coord):
    bad = await coord.member("train", "client")
    good = await coord.member("train")
    assert (await bad.request("POST", "/api/runs/r", {"config": {"preset": "micro"}})).status == 200
    await coord.store.run(revoke, bad.identity.peer_id[:10], time.time())
    await asyncio.sleep(REVOCATION_REFRESH_S + 0.05)
    for method, path, body in [("POST", "/api/heartbeat", {"stats": {}}), ("POST", "/api/leave", {}),
                               ("POST", "/api/join", {"address": "127.0.0.1:9"}),
                               ("GET", "/api/peers", None), ("GET", "/api/runs", None),
                               ("POST", "/api/runs/r/sync", {"step": 1, "base_hash": "0" * 64}),
                               ("GET", "/api/runs/r/checkpoints", None),
                               ("POST", "/api/inference/offenses", {"offender": "0" * 40})]:
        answer = await bad.request(method, path, body)
        assert (answer.status, answer.code) == (403, "revoked"), (path, answer.json)
    again = await bad.admit({})
    assert (again.status, again.code) == (403, "revoked")
    beat = await good.request("POST", "/api/heartbeat", {"stats": {}})
    assert beat.status == 200 and bad.identity.peer_id in beat.json["revoked"]
    peers = {p["peer_id"]: p["state"] for p in (await good.request("GET", "/api/peers")).json["peers"]}
    assert peers[bad.identity.peer_id] == "left"


# -- the real process: CLI, HTTPS pinning, weak tokens -----------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "coordinator", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_weak_token_is_refused_at_startup(tmp_path):
    done = _cli("start", "--port", "0", "--data-dir", str(tmp_path), "--token", "correct horse battery")
    assert done.returncode == 2
    assert "128" in done.stderr and "coordinator token" in done.stderr, done.stderr
    strong = _cli("token").stdout.strip()
    assert len(strong) >= 43


async def _pinned_get(url: str, pin: str, path: str = "/api/health") -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + path, ssl=aiohttp.Fingerprint(bytes.fromhex(pin))) as r:
            return r.status


def test_cli_https_invite_revoke_on_a_running_coordinator(procs, tmp_path):
    data = tmp_path / "coord"
    coord = procs.python("-m", "coordinator", "start", "--host", "127.0.0.1", "--port", "0",
                         "--data-dir", str(data), "--tls", "self-signed", "--peer-timeout", "5")
    ready = coord.ready
    assert ready["url"].startswith("https://") and len(ready["fingerprint"]) == 64
    assert oct((data / "authority.key").stat().st_mode & 0o777) == "0o600"
    assert oct((data / "tls.key").stat().st_mode & 0o777) == "0o600"
    assert oct((data / "coordinator.sqlite3").stat().st_mode & 0o777) == "0o600"  # invite secrets

    done = _cli("invite", "--role", "train", "--role", "client", "--uses", "1", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    join = JoinString.decode(done.stdout.strip())
    assert (join.url, join.fingerprint, join.authority.hex()) == (ready["url"], ready["fingerprint"],
                                                                   ready["authority"])
    bare = JoinString.decode(_cli("join-string", "--data-dir", str(data)).stdout.strip())
    assert (bare.invite_id, bare.fingerprint, bare.authority) == (None, join.fingerprint, join.authority)

    async def scenario() -> None:
        # the pinned certificate works; another pin fails before any request is sent
        assert await _pinned_get(join.url, join.fingerprint) == 200
        with pytest.raises(aiohttp.ServerFingerprintMismatch):
            await _pinned_get(join.url, hashlib.sha256(b"another cert").hexdigest())
        pin = aiohttp.Fingerprint(bytes.fromhex(join.fingerprint))
        async with Signer(join.url, ssl=pin) as peer, Signer(join.url, ssl=pin) as late:
            answer = await peer.admit_invite(join.invite_id, join.invite_secret)
            assert answer.status == 200, answer.json
            cred = admission.AdmitAnswer.from_json(answer.json).credential
            cred.check(authority=join.authority, peer_public=peer.identity.public_bytes, now=time.time())
            assert (await peer.join()).status == 200
            used = await late.admit_invite(join.invite_id, join.invite_secret)
            assert used.code == "invite_used"

            listing = json.loads(_cli("credentials", "--json", "--data-dir", str(data)).stdout)
            assert [i["peer_id"] for i in listing["identities"]] == [peer.identity.peer_id]
            assert listing["invites"][0]["uses"] == 1 and "secret" not in listing["invites"][0]
            revoked = _cli("revoke", peer.identity.peer_id, "--data-dir", str(data))
            assert revoked.returncode == 0 and "revoked identity" in revoked.stdout
            await asyncio.sleep(REVOCATION_REFRESH_S + 0.1)
            beat = await peer.request("POST", "/api/heartbeat", {"stats": {}})
            assert (beat.status, beat.code) == (403, "revoked")
            with pytest.raises(AuthError):  # and the mesh would refuse its credential
                cred.check(authority=join.authority, peer_public=peer.identity.public_bytes,
                           now=time.time(), revoked=lambda pid: pid == peer.identity.peer_id)
        # plain TLS without the pin: the self-signed certificate is not trusted
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with s.get(join.url + "/api/health", ssl=ssl.create_default_context()):
                    pass

    asyncio.run(scenario())
    bad = _cli("revoke", "zz", "--data-dir", str(data))
    assert bad.returncode == 1 and "neither" in bad.stderr


def test_plain_http_off_loopback_needs_insecure(tmp_path):
    done = _cli("start", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path), "--tls", "off")
    assert done.returncode != 0 and "--insecure" in done.stderr


# -- sans-IO pieces -------------------------------------------------------------------------------
@pytest.mark.fast
def test_replay_guard_bounded_and_never_reopens_a_replay():
    guard = reqsign.ReplayGuard(60, max_entries=100)
    now = 1000.0
    for k in range(300):
        guard.check("p", f"{k:032x}", now - 50 + k * 0.1, now)
    assert len(guard) == 100
    # every nonce forgotten lies at or below the floor, so its replay is still refused
    with pytest.raises(reqsign.RequestAuthError) as e:
        guard.check("p", f"{0:032x}", now - 50, now)
    assert e.value.code == "replay_window_full"
    with pytest.raises(reqsign.RequestAuthError) as e:
        guard.check("p", f"{299:032x}", now - 50 + 29.9, now)
    assert e.value.code == "replayed"
    guard.check("p", "f" * 32, now, now)  # a fresh request passes
    with pytest.raises(reqsign.RequestAuthError):
        guard.check("q", "e" * 32, now + 61, now)
    # time passes: entries outside the window are dropped
    guard.check("p", "d" * 32, now + 200, now + 200)
    assert len(guard) == 1


@pytest.mark.fast
def test_join_string_round_trip_and_hostile_input():
    ident = Identity.generate()
    js = JoinString("https://203.0.113.5:8470", ident.public_bytes, "ab" * 32, "0123456789abcdef",
                    bytes(range(32)))
    assert JoinString.decode(js.encode()) == js
    assert JoinString.decode(JoinString("http://127.0.0.1:1", ident.public_bytes).encode()).invite_id is None
    from peer.errors import ProtocolError
    for text in ["", "lowband1:", "lowband1:!!!", "nope:abc", "lowband1:" + "A" * 5000,
                 js.encode()[:-5], "lowband1:e30", js.encode().replace("lowband1:", "lowband2:")]:
        with pytest.raises(ProtocolError):
            JoinString.decode(text)


@pytest.mark.fast
def test_signed_headers_hostile_values_raise_only_request_auth_errors():
    ident = Identity.generate()
    good = reqsign.sign_headers(ident, "POST", "/api/heartbeat", b"{}")
    now = time.time()
    assert reqsign.verify_headers(good, "POST", "/api/heartbeat", lambda p: ident.public_bytes,
                                  now=now) == ident.peer_id
    values = ["", " ", "0", "-1", "1e999", "nan", "zz" * 16, "0" * 31, "0" * 33, "\x00", "é" * 40,
              "A" * 64, "a" * 10_000, good[reqsign.H_SIG].upper(), "123.4567890123"]
    for name in (*reqsign.SIGNED_HEADERS, reqsign.H_KEY):
        for value in values:
            headers = {**good, name: value}
            with pytest.raises(reqsign.RequestAuthError) as e:
                reqsign.verify_headers(headers, "POST", "/api/heartbeat",
                                       lambda p: ident.public_bytes, now=now)
            assert e.value.code and 400 <= e.value.status < 500
        missing = {k: v for k, v in good.items() if k != name}
        if name != reqsign.H_KEY:
            with pytest.raises(reqsign.RequestAuthError, match=name):
                reqsign.verify_headers(missing, "POST", "/api/heartbeat",
                                       lambda p: ident.public_bytes, now=now)
    with pytest.raises(reqsign.RequestAuthError) as e:  # unknown signer
        reqsign.verify_headers(good, "POST", "/api/heartbeat", lambda p: None, now=now)
    assert e.value.code == "unknown_identity"


@pytest.mark.fast
def test_admission_schema_refuses_hostile_shapes():
    from peer.errors import ProtocolError
    for doc in [None, [], "x", {"invite": "0" * 16}, {"invite": 1, "proof": "0" * 64},
                {"invite": "0" * 16, "proof": "zz"}, {"token_proof": None}, {"token_proof": "0" * 63},
                {"x": 1}, {"invite": "0" * 16, "proof": "0" * 64, "token_proof": "0" * 64}]:
        with pytest.raises(ProtocolError):
            admission.AdmitRequest.from_json(doc)
    authority, peer = Identity.generate(), Identity.generate()
    from peer.credentials import issue
    cred = issue(authority, peer.public_bytes, ["client"], now=time.time(), lifetime_s=60, serial=1)
    answer = admission.AdmitAnswer(cred, "ab" * 32).to_json()
    assert admission.AdmitAnswer.from_json(answer) == admission.AdmitAnswer(cred, "ab" * 32)
    for broken in [{}, {**answer, "credential": "zz"}, {**answer, "credential": "00"},
                   {**answer, "roles": ["train"]}, {**answer, "authority": "00" * 32},
                   {**answer, "token_mac": 5}]:
        with pytest.raises(ProtocolError):
            admission.AdmitAnswer.from_json(broken)


async def test_stale_open_identities_are_forgotten(tmp_path):
    from coordinator.auth import FORGET_OPEN_AFTER_S, _admit
    c = await start(tmp_path / "c", token=None, open=True)
    try:
        old = c.signer()
        assert (await old.admit({})).status == 200
        revoked_one = c.signer()
        assert (await revoked_one.admit({})).status == 200
        await c.store.run(revoke, revoked_one.identity.peer_id, time.time())
        auth = c.app[AUTH]
        later = time.time() + auth.mode.credential_lifetime_s + FORGET_OPEN_AFTER_S + 1
        newcomer = Identity.generate()
        await c.store.run(_admit, auth.authority, newcomer.public_bytes, admission.AdmitRequest(),
                          auth.mode, "127.0.0.1", later)
        rows = await c.store.run(lambda conn: {r[0] for r in conn.execute("SELECT peer_id FROM identities")})
        # the stale open identity is gone, the revoked one stays refused, the newcomer is in
        assert rows == {revoked_one.identity.peer_id, newcomer.peer_id}
    finally:
        await c.close()
