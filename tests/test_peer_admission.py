"""Admission from the peer's side (issue 14 items 1-2), with a real coordinator and real
`peer join` processes on 127.0.0.x: joining by invite string, by the closed swarm's token and
openly; a revoked peer cut from the mesh; the http:// rule; the pinned TLS certificate.

Revocation behaviour, as documented in peer/daemon.py: the revoked peer's next heartbeat is
refused (403 ``revoked``) and it exits 1 with a line naming the revocation, rather than
retrying a key that will never be accepted again; the others close its connections and refuse
its handshakes although its credential has not expired.
"""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from peer.access import CredentialCache
from peer.errors import LowbandError
from peer.identity import Identity
from peer.joinstring import JoinString
from peer.transport import PeerHost
from testing.api import coordinator_cli, invite, operator_api
from tests.harness import ROOT, Procs, wait_until

TOKEN = "admission-test-token-5c1e9b7d3a2f4e6c8b0a9d7f5e3c1b2a"
FAST = ["--heartbeat-interval", "0.5", "--peer-timeout", "3"]


def start_coordinator(procs: Procs, data_dir, *flags: str, host: str = "127.0.0.1"):
    coord = procs.python("-m", "coordinator", "start", "--host", host, "--port", "0",
                         "--data-dir", str(data_dir), *FAST, *flags)
    return coord, coord.ready["url"]


def join_args(key, *flags: str) -> list[str]:
    return [sys.executable, "-m", "peer", "join", "--listen", "127.0.0.1:0", "--key", str(key),
            "--device", "cpu", "--ping-interval", "0.5", *flags]


def start_peer(procs: Procs, key, *flags: str):
    return procs.spawn(join_args(key, *flags))


def run_join(key, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A `peer join` expected to fail before READY."""
    return subprocess.run(join_args(key, *flags), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def meshed(op, ids: set[str]) -> bool:
    """Every peer is active and has pinged every other one over the encrypted transport."""
    peers = {p["peer_id"]: p for p in op.get("/status")["peers"]}
    for pid in ids:
        p = peers.get(pid)
        links = p["stats"].get("links", {}) if p else {}
        if p is None or p["state"] != "active" or not ids - {pid} <= set(links) \
                or any(links[q].get("pings_ok", 0) < 1 for q in ids - {pid}):
            return False
    return True


def test_join_by_invite_string_over_127_0_0_2_and_reuse_the_cached_credential(procs, tmp_path):
    data = tmp_path / "coord"
    coord, url = start_coordinator(procs, data, host="127.0.0.2")  # loopback, not 127.0.0.1
    assert url.startswith("http://127.0.0.2:")
    op = operator_api(url, data)
    a = start_peer(procs, tmp_path / "a.key", "--join", invite(data, "train", "serve"))
    join_b = invite(data, "train")
    b = start_peer(procs, tmp_path / "b.key", "--join", join_b)   # --coordinator from the string
    ids = {a.ready["peer_id"], b.ready["peer_id"]}
    wait_until(lambda: meshed(op, ids), 30, "the two invited peers to mesh")
    cache = CredentialCache(tmp_path / "b.key")
    assert cache.path.stat().st_mode & 0o777 == 0o600
    assert json.loads(cache.path.read_text())["coordinator"] == url

    # The invite was for one key: another key cannot redeem it again.
    refused = run_join(tmp_path / "c.key", "--join", join_b)
    assert refused.returncode == 2 and "not admitted" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and "READY" not in refused.stdout

    # b restarts with the same (spent) join string: its cached credential admits it again.
    b.kill(signal.SIGTERM)
    assert b.wait() == 0
    b2 = start_peer(procs, tmp_path / "b.key", "--join", join_b)
    assert b2.ready["peer_id"] == b.ready["peer_id"]
    wait_until(lambda: meshed(op, ids), 30, "the restarted peer to mesh again")

    # A credential without the train role cannot start a training peer.
    client_only = run_join(tmp_path / "d.key", "--join", invite(data, "client"), "--train", "r")
    assert client_only.returncode == 2 and "--role train" in client_only.stderr, client_only.stderr


def test_token_and_invite_peers_mesh_together(procs, tmp_path):
    data = tmp_path / "coord"
    coord, url = start_coordinator(procs, data, "--token", TOKEN)
    op = operator_api(url, data)
    a = start_peer(procs, tmp_path / "a.key", "--coordinator", url, "--token", TOKEN)
    b = start_peer(procs, tmp_path / "b.key", "--join", invite(data, "train"))
    wait_until(lambda: meshed(op, {a.ready["peer_id"], b.ready["peer_id"]}), 30,
               "a token peer and an invited peer to mesh (credentials, no token on the mesh)")
    a.wait_for_line("admitted by", timeout=5)


def test_open_swarm_admits_anyone_with_the_open_roles(procs, tmp_path):
    data = tmp_path / "coord"
    coord, url = start_coordinator(procs, data, "--open")
    op = operator_api(url, data)
    peers = [start_peer(procs, tmp_path / f"{i}.key", "--coordinator", url) for i in range(2)]
    wait_until(lambda: meshed(op, {p.ready["peer_id"] for p in peers}), 30, "open peers to mesh")
    cred = CredentialCache(tmp_path / "0.key").read()
    assert cred is not None and cred.roles == {"train", "serve", "client"}


def test_revoked_peer_is_cut_from_the_mesh_and_exits(procs, tmp_path):
    data = tmp_path / "coord"
    coord, url = start_coordinator(procs, data, "--token", TOKEN)
    op = operator_api(url, data)
    peers = [start_peer(procs, tmp_path / f"{i}.key", "--coordinator", url, "--token", TOKEN)
             for i in range(3)]
    ids = {p.ready["peer_id"] for p in peers}
    wait_until(lambda: meshed(op, ids), 30, "three peers to mesh")
    victim, survivors = peers[0], peers[1:]
    vid = victim.ready["peer_id"]

    coordinator_cli("revoke", vid, "--data-dir", str(data))
    assert victim.wait(timeout=30) == 1
    line = victim.wait_for_line("revoked", timeout=5)
    assert "new invite" in line, line
    for s in survivors:
        s.wait_for_line("cut 1 revoked identity from the mesh", timeout=15)
    wait_until(lambda: all(vid not in p["stats"].get("links", {}) for p in op.get("/status")["peers"]
                           if p["peer_id"] != vid and p["state"] == "active"),
               15, "the survivors to drop the revoked peer from their link rows")

    # Its credential has not expired, yet a survivor refuses its handshake.
    victim_id = Identity.load_or_create(tmp_path / "0.key")
    cred = CredentialCache(tmp_path / "0.key").read()
    assert cred is not None and cred.expires > time.time()
    target = survivors[0].ready

    async def dial() -> None:
        host = PeerHost(victim_id, None, credential=cred, authority=cred.authority)
        await host.start("127.0.0.1", 0)
        try:
            host.add_route(target["peer_id"], target["address"])
            await host.ping(target["peer_id"], timeout=5)
        finally:
            await host.close()

    with pytest.raises(LowbandError, match="revoked"):
        asyncio.run(dial())
    assert all(s.proc.poll() is None for s in survivors)


@pytest.mark.parametrize("url", ["http://192.0.2.10:8470", "http://coordinator.example:8470"])
def test_plain_http_off_loopback_is_refused_before_connecting(tmp_path, url):
    started = time.monotonic()
    out = run_join(tmp_path / "k", "--coordinator", url, "--token", TOKEN)
    assert out.returncode == 2 and "--insecure" in out.stderr and "https://" in out.stderr, out.stderr
    assert "READY" not in out.stdout and "Traceback" not in out.stderr
    # 192.0.2.0/24 is TEST-NET-1 (unroutable): a connection attempt would take the 5 s request
    # timeout at least; the refusal comes from the URL alone.
    assert time.monotonic() - started < 30
    assert "unreachable" not in out.stderr


def test_https_with_the_join_strings_pinned_certificate(procs, tmp_path):
    data = tmp_path / "coord"
    coord, url = start_coordinator(procs, data, "--tls", "self-signed")
    assert url.startswith("https://") and coord.ready["fingerprint"]
    join = invite(data, "train")
    assert JoinString.decode(join).fingerprint == coord.ready["fingerprint"]
    peer = start_peer(procs, tmp_path / "a.key", "--join", join)
    peer.wait_for_line("admitted by https://", timeout=5)

    # The same join string with another certificate pinned: refused, nothing sent.
    forged = JoinString.decode(invite(data, "train"))
    forged = replace(forged, fingerprint="ab" * 32).encode()
    out = run_join(tmp_path / "b.key", "--join", forged)
    assert out.returncode == 2 and "TLS certificate" in out.stderr, out.stderr
    assert not CredentialCache(tmp_path / "b.key").path.exists()


def test_status_signed_by_an_operator_key(procs, tmp_path):
    data = tmp_path / "coord"
    coord, url = start_coordinator(procs, data, "--token", TOKEN)
    peer = start_peer(procs, tmp_path / "a.key", "--coordinator", url, "--token", TOKEN)
    operator_api(url, data, tmp_path / "op.key")
    cmd = [sys.executable, "-m", "peer", "status", "--coordinator", url, "--json"]
    public = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                       timeout=60, check=True).stdout)
    full = json.loads(subprocess.run(cmd + ["--key", str(tmp_path / "op.key")], cwd=ROOT,
                                     capture_output=True, text=True, timeout=60, check=True).stdout)
    address = peer.ready["address"]
    assert address in json.dumps(full) and address not in json.dumps(public)
    table = subprocess.run(cmd[:-1], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and peer.ready["peer_id"][:12] in table.stdout, table.stderr
    assert "hidden" in table.stdout and address not in table.stdout


# -- the sans-IO rules (peer/access.py) ------------------------------------------------------------
AUTHORITY = Identity.generate()
ME = Identity.generate()


def answer_for(identity: Identity, *, authority: Identity = AUTHORITY, lifetime: float = 3600,
               roles=("train",), token: str | None = None) -> dict:
    from peer.admission import AdmitAnswer, token_mac
    from peer.credentials import issue

    cred = issue(authority, identity.public_bytes, roles, now=time.time(), lifetime_s=lifetime, serial=1)
    mac = token_mac(token, cred.authority, cred.encode()) if token else None
    return AdmitAnswer(cred, mac).to_json()


@pytest.mark.fast
@pytest.mark.parametrize("url, ok", [
    ("http://127.0.0.1:8470", True), ("http://127.0.0.2:8470", True), ("http://localhost:1", True),
    ("http://[::1]:8470", True), ("https://coordinator.example:8470", True),
    ("http://10.0.0.1:8470", False), ("http://coordinator.example", False), ("ftp://x", False),
    ("127.0.0.1:8470", False),
])
def test_url_rule(url, ok):
    from peer.access import AdmissionError, check_url

    if ok:
        assert check_url(url) == url.rstrip("/")
    else:
        with pytest.raises(AdmissionError):
            check_url(url)
    assert check_url("http://10.0.0.1:8470", insecure=True) == "http://10.0.0.1:8470"


@pytest.mark.fast
def test_admission_proofs_and_what_an_answer_must_prove():
    from peer.access import Admission, AdmissionError, accept_answer, admit_request

    token = "k" + TOKEN
    closed = Admission.make(url="http://127.0.0.1:1", token=token)
    request = admit_request(closed, ME.public_bytes)
    assert token not in json.dumps(request.to_json()) and request.token_proof
    assert admit_request(closed, ME.public_bytes, renew=True).to_json() == {}
    assert accept_answer(closed, ME, request, answer_for(ME, token=token)).has("train")
    with pytest.raises(AdmissionError, match="token_mac"):  # an impostor does not know the token
        accept_answer(closed, ME, request, answer_for(ME))
    with pytest.raises(AdmissionError, match="another key"):  # someone else's credential
        accept_answer(closed, ME, request, answer_for(Identity.generate(), token=token))
    with pytest.raises(AdmissionError, match="malformed"):
        accept_answer(closed, ME, request, {"credential": "zz"})

    join = JoinString("http://127.0.0.1:1", AUTHORITY.public_bytes, None, "0" * 16, bytes(32))
    invited = Admission.make(join=join.encode())
    request = admit_request(invited, ME.public_bytes)
    assert request.invite == "0" * 16 and request.proof
    assert accept_answer(invited, ME, request, answer_for(ME)).authority == AUTHORITY.public_bytes
    with pytest.raises(AdmissionError, match="join string"):  # pinned authority
        accept_answer(invited, ME, request, answer_for(ME, authority=Identity.generate()))


@pytest.mark.fast
def test_credential_cache_is_private_per_coordinator_and_renews_early(tmp_path):
    from peer.access import Admission, CredentialCache, accept_answer, admit_request, needs_renewal

    here = Admission.make(url="http://127.0.0.1:1")
    cred = accept_answer(here, ME, admit_request(here, ME.public_bytes), answer_for(ME))
    cache = CredentialCache(tmp_path / "peer.key")
    cache.save(here, cred)
    assert cache.path.name == "peer.key.cred" and cache.path.stat().st_mode & 0o777 == 0o600
    assert cache.load(here, ME) == cred
    assert cache.load(Admission.make(url="http://127.0.0.1:2"), ME) is None   # another coordinator
    assert cache.load(here, Identity.generate()) is None                      # another key
    assert not needs_renewal(cred) and needs_renewal(cred, now=cred.expires - 0.2 * 3600)
    cache.path.write_text("{garbage")
    assert cache.load(here, ME) is None
