"""The open-swarm attacks of issue 14, each one function run against a LIVE swarm, shared by
bench/attacks.py (which adds honest throughput before/during and the table) and
tests/test_attacks_bench.py (which keeps them from rotting).

The swarm (``LiveSwarm``) is real processes on 127.0.0.1: a ``coordinator start --open``
(anyone is admitted, so identities are free: the hardest case), three honest ``peer join
--train`` peers on the micro model and, for the serving attacks, a 2-way tensor-split group of a
tiny model whose own chat template loops for hours, plus a ``peer gateway`` with its default
quotas. Attackers are real identities admitted by that coordinator, each from its own loopback
source address (127.0.100.x and up) so that per-address limits meant for them never land on the
honest peers at 127.0.0.1; they speak signed HTTP (testing/signed.py) and the real handshake and
record layer with hand-written frames (testing/rawpeer.py).

Every attack is ``async def attack(target: Target, quick: bool) -> dict`` returning
``{attack, expected, observed, defended, detail}`` (``outcome``). ``defended`` is decided from
what the attack observed, never assumed, so a regression shows up as ``defended: false``.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from peer import admission
from peer.credentials import Credential, issue
from peer.errors import AuthError, LowbandError, ProtocolError, RemoteError
from peer.handshake import Handshake
from peer.identity import Identity
from peer.membership import CoordinatorError
from peer.transport import PeerHost
from peer.wire import FrameDecoder, FrameType
from testing import ROOT
from testing.api import SignedApi, coordinator_cli, invite
from testing.procs import Child, Procs, wait_until
from testing.rawpeer import RawPeer
from testing.signed import Signer
from testing.swarm import corpus, train_flags

RUN = "attacks"
BOGUS = "b" * 64
FAST = ["--heartbeat-interval", "0.5", "--peer-timeout", "5"]
PROMPT = "w1 w2 w3 w4"
NEW = 8
# A serving peer's chat template that would loop for hours (tests/test_gateway_security.py's).
HONEST_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
HOSTILE_TEMPLATE = ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
                    + HONEST_TEMPLATE)
TEMPLATE_TIMEOUT_S = 2.0


def outcome(attack: str, expected: str, observed: str, defended: bool, **detail) -> dict:
    return {"attack": attack, "expected": expected, "observed": observed,
            "defended": bool(defended), "detail": detail}


# -- the live swarm ------------------------------------------------------------------------------
@dataclass
class Target:
    """What the attacks aim at: the coordinator, the honest peers (their READY lines and pids)
    and, when started, the serving group and gateway."""
    url: str
    data_dir: Path
    peers: list[dict]                  # READY dicts of the honest train peers, plus "pid"
    serving: dict | None = None        # {"gateway", "model", "leader", "follower"}
    work: Path = Path(".")
    _next_ip: int = field(default=0, repr=False)
    _api: SignedApi | None = field(default=None, repr=False)

    @property
    def api(self) -> SignedApi:
        """One observer identity (admitted once: admissions per address are rate-limited)."""
        if self._api is None:
            self._api = SignedApi(self.url)
        return self._api

    def ip(self) -> str:
        """A fresh loopback source address for one attacker."""
        self._next_ip += 1
        k = self._next_ip
        return f"127.0.{100 + k // 250}.{1 + k % 250}"


class LiveSwarm:
    """``coordinator start --open`` + honest `peer join --train RUN` peers (+ optional serving)."""

    def __init__(self, procs: Procs, work: Path) -> None:
        self.procs, self.work = procs, work
        self.coordinator: Child | None = None
        self.peers: list[Child] = []

    def start(self, n_peers: int = 3, *, serving: bool = False) -> Target:
        data_dir = self.work / "coordinator"
        self.coordinator = self.procs.python(
            "-m", "coordinator", "start", "--host", "127.0.0.1", "--port", "0",
            "--data-dir", str(data_dir), "--open", *FAST)
        url = self.coordinator.ready["url"]
        data = corpus(self.work / "corpus.txt")
        self.peers = [self.procs.spawn(
            [sys.executable, "-m", "peer", "join", "--coordinator", url, "--listen", "127.0.0.1:0",
             "--key", str(self.work / f"honest{i}.key"), "--device", "cpu", "--ping-interval", "0.5",
             "--train", RUN, "--data", str(data), *train_flags(0)], wait_ready=False)
            for i in range(n_peers)]
        target = Target(url, data_dir, [], work=self.work)
        if serving:
            target.serving = self._start_serving(url)
        for child in self.peers:
            child.wait_for_line("READY ", timeout=180)
            target.peers.append({**child.ready, "pid": child.pid})
        return target

    def _start_serving(self, url: str) -> dict:
        from testing.tiny_serving import write_tiny_model

        model = self.work / "tiny"
        write_tiny_model(model, HOSTILE_TEMPLATE)
        shards = [self.procs.python(
            "-m", "peer", "join", "--coordinator", url, "--listen", "127.0.0.1:0",
            "--key", str(self.work / f"shard{r}.key"), "--device", "cpu",
            "--serve", f"{model},tp=g:{r}/2", wait_ready=False) for r in range(2)]
        gateway = self.procs.python(
            "-m", "peer", "gateway", "--coordinator", url, "--key", str(self.work / "gateway.key"),
            "--port", "0", "--template-timeout", str(TEMPLATE_TIMEOUT_S), wait_ready=False)
        for child in (*shards, gateway):
            child.wait_for_line("READY ", timeout=180)
        return {"gateway": gateway.ready["url"] + "/v1", "model": str(model),
                "leader": shards[0].ready, "follower": shards[1].ready}

    def wait_training(self, target: Target, steps: int = 2, timeout: float = 240) -> int:
        """Block until the run has taken ``steps`` outer steps; the step reached."""
        return wait_until(lambda: (target.api.get(f"/runs/{RUN}").get("step") or 0) >= steps and
                          target.api.get(f"/runs/{RUN}")["step"], timeout, f"{steps} outer steps")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- attacker plumbing ---------------------------------------------------------------------------
async def signer(t: Target, ip: str | None = None, identity: Identity | None = None) -> Signer:
    """A raw signed-HTTP identity speaking from source address ``ip``."""
    s = Signer(t.url, identity)
    s.local_ip = ip
    if ip is not None:  # Signer has no source-address option: swap its session for one with it
        await s._session.close()
        s._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ip, 0)),
                                           timeout=aiohttp.ClientTimeout(total=15))
    return s


async def admitted(t: Target, ip: str) -> tuple[Signer, Credential]:
    """A fresh identity admitted by the open coordinator from ``ip`` (roles train, serve, client)."""
    s = await signer(t, ip)
    answer = await s.admit()
    if answer.status != 200:
        await s.close()
        raise RuntimeError(f"open admission refused from {ip}: {answer.status} {answer.json}")
    return s, admission.AdmitAnswer.from_json(answer.json).credential


async def run_member(t: Target) -> "RunClient":  # noqa: F821 - diloco imported lazily (torch)
    """A fresh identity that joined the swarm (announcing a closed port) and the run."""
    from diloco.run_client import RunClient

    client = RunClient(t.url, None, Identity.generate(), timeout=30)
    await client.join("127.0.0.1:9", {"roles": ["train"]})
    await client.join_run(RUN, {}, [])
    return client


async def mesh_host(cred: Credential, identity: Identity) -> PeerHost:
    host = PeerHost(identity, None, credential=cred, authority=cred.authority, conns_per_peer=1)
    await host.start("127.0.0.1", 0)
    return host


async def run_info(t: Target) -> dict:
    return await asyncio.to_thread(t.api.get, f"/runs/{RUN}")


# -- 1-3, 12-14, 16, 18: the coordinator --------------------------------------------------------
async def replayed_request(t: Target, quick: bool) -> dict:
    s, _ = await admitted(t, t.ip())
    try:
        path = f"/api/runs/{RUN}"
        headers = s.headers("GET", path, b"")
        first = await s.send("GET", path, b"", headers)
        replay = await s.send("GET", path, b"", headers)
        moved = await s.send("GET", "/api/peers", b"", headers)  # same signature, another path
        body = json.dumps({"stats": {}}).encode()
        beat = s.headers("POST", "/api/heartbeat", body)
        swapped = await s.send("POST", "/api/heartbeat", json.dumps({"stats": {"x": 1}}).encode(), beat)
    finally:
        await s.close()
    seen = {"first": first.status, "replay": (replay.status, replay.code),
            "other_path": (moved.status, moved.code), "other_body": (swapped.status, swapped.code)}
    return outcome("1 captured signed request replayed", "403 replayed (nonce seen); signature bound "
                   "to method, path and body", f"replay {replay.status} {replay.code}, other path "
                   f"{moved.status} {moved.code}, other body {swapped.status} {swapped.code}",
                   first.status == 200 and replay.code == "replayed" and moved.status >= 400
                   and swapped.status >= 400, **seen)


async def bearer_token(t: Target, quick: bool) -> dict:
    routes = [("POST", "/api/join"), ("POST", "/api/heartbeat"), ("GET", "/api/peers"),
              ("GET", f"/api/runs/{RUN}"), ("POST", f"/api/runs/{RUN}/sync"),
              ("PUT", f"/api/runs/{RUN}/chunks/" + "0" * 64), ("PUT", f"/api/runs/{RUN}/checkpoints/1"),
              ("POST", "/api/admit")]
    got = {}
    connector = aiohttp.TCPConnector(local_addr=(t.ip(), 0))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=15)) as http:
        for method, path in routes:
            async with http.request(method, t.url + path, data=b"{}", headers={
                    "Authorization": "Bearer " + os.urandom(24).hex()}) as r:
                doc = await r.json(content_type=None)
                got[f"{method} {path}"] = (r.status, doc.get("error") if isinstance(doc, dict) else None)
    ok = all(status in (401, 403) for status, _ in got.values())
    codes = sorted({code for _, code in got.values()})
    return outcome("2 bearer token alone", "401 bearer_not_accepted on every /api route",
                   f"{sum(s in (401, 403) for s, _ in got.values())}/{len(got)} refused, codes {codes}",
                   ok, answers=got)


def _manifest(step: int, claimed: str) -> bytes:
    import torch

    from coordinator.checkpoints import MOMENTUM_PREFIX
    from diloco.state_io import build_manifest

    tensors = {"w": torch.full((256,), -7.0), MOMENTUM_PREFIX + "w": torch.zeros(256)}
    manifest, _ = build_manifest(RUN, step, tensors, meta={"global_state_hash": claimed,
                                                           "outer_step": step})
    return json.dumps(manifest.to_dict()).encode()


async def enter_window(t: Target, clients: list) -> tuple[int, list[dict]]:
    """Fresh members arrive at the next window with the run's agreed base hash (any admitted
    identity may read it), so they are counted as participants of that step, though they never
    send anything to the all-reduce: (step, their answers)."""
    step = int((await run_info(t)).get("step") or 0)
    if not clients:
        return step + 1, []
    base = (await asyncio.to_thread(_wait_agreed, t, step))["state_hashes"][str(step)]
    answers = await asyncio.gather(*(c.sync(RUN, step + 1, base, deadline_s=60) for c in clients))
    return step + 1, list(answers)


async def checkpoint_overwrite(t: Target, quick: bool) -> dict:
    outsider, _ = await admitted(t, t.ip())
    member = await run_member(t)
    seen: dict = {}
    try:
        step, [answer] = await enter_window(t, [member])
        await asyncio.to_thread(_wait_agreed, t, step)  # the honest peers' reports settle it
        before = (await outsider.request("GET", f"/api/runs/{RUN}/checkpoints")).json
        for name, who, m_step, claimed in [("outsider", outsider, step, BOGUS),
                                           ("member_absurd_step", None, 10**9, BOGUS),
                                           ("member_non_majority_hash", None, step, BOGUS)]:
            body = await asyncio.to_thread(_manifest, m_step, claimed)
            path = f"/runs/{RUN}/checkpoints/{m_step}"
            if who is None:  # the peer client's own signed request (it adds /api)
                status, raw = await member._send("PUT", path, body, "application/json")
                code = json.loads(raw or b"{}").get("error")
            else:
                refused = await who.request("PUT", "/api" + path, body)
                status, code = refused.status, refused.code
            seen[name] = (status, code)
        chunk = b"x" * 1000
        put = await outsider.request("PUT", f"/api/runs/{RUN}/chunks/{hashlib.sha256(chunk).hexdigest()}",
                                     chunk, content_type="application/octet-stream")
        seen["outsider_chunk"] = (put.status, put.code)
        after = (await outsider.request("GET", f"/api/runs/{RUN}/checkpoints")).json
    finally:
        await outsider.close()
        await member.leave_run(RUN)
        await member.close()
    refused_all = all(400 <= status < 500 for status, _ in seen.values())
    untouched = after.get("latest") != 10**9 and 10**9 not in (after.get("steps") or [])
    return outcome("3 checkpoint overwrite (non-member; participant with absurd step / non-majority hash)",
                   "403 not_a_participant / 409 step_not_taken / 409 not_majority; latest untouched",
                   f"member was participant of step {step}: {answer.get('participant')}; "
                   + ", ".join(f"{k} {s} {c}" for k, (s, c) in seen.items())
                   + f"; latest {before.get('latest')} -> {after.get('latest')}",
                   refused_all and untouched, answers=seen, member_participant=answer.get("participant"),
                   latest_before=before.get("latest"), latest_after=after.get("latest"))


async def join_flood(t: Target, quick: bool) -> dict:
    ip, n = t.ip(), 30 if quick else 60
    statuses: list[int] = []
    t0 = time.monotonic()
    for _ in range(n):
        s = await signer(t, ip)
        try:
            answer = await s.admit()
            statuses.append(answer.status)
            if answer.status == 200:
                await s.join("127.0.0.1:9")
        finally:
            await s.close()
    elapsed = time.monotonic() - t0
    admitted_n = statuses.count(200)
    from coordinator.defaults import DEFAULT_ADMIT_RATE

    bound = round(40 * DEFAULT_ADMIT_RATE) + DEFAULT_ADMIT_RATE * elapsed + 1
    return outcome("12 join flood from one address", f"admissions per address rate-limited "
                   f"(burst {round(40 * DEFAULT_ADMIT_RATE)}, {DEFAULT_ADMIT_RATE}/s) -> 429",
                   f"{admitted_n} of {n} admitted in {elapsed:.1f}s, {statuses.count(429)} got 429",
                   admitted_n <= bound and 429 in statuses, statuses=statuses, bound=bound)


async def status_scraping(t: Target, quick: bool) -> dict:
    info = await run_info(t)
    secrets = {p["address"] for p in t.peers}
    secrets |= {h for h in (info.get("state_hashes") or {}).values() if isinstance(h, str)}
    secrets |= {h[:16] for h in list(secrets) if len(h) == 64}
    pages, statuses = [], {}
    connector = aiohttp.TCPConnector(local_addr=(t.ip(), 0))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=15)) as http:
        for path in ("/api/status", "/api/status?peers_offset=0&peers_limit=1000&events_limit=1000",
                     "/api/status?view=operator", "/metrics", "/", "/api/peers", f"/api/runs/{RUN}"):
            async with http.get(t.url + path) as r:
                statuses[path] = r.status
                if r.status == 200:
                    pages.append(await r.text())
    text = "\n".join(pages)
    leaked = sorted(s for s in secrets if s in text)
    rows = json.loads(pages[0]).get("peers", []) if pages else []
    return outcome("13 unauthenticated /api/status scraping", "public view: no addresses, state "
                   "hashes or run configs; /api/peers and /api/runs need a signature",
                   f"{len(rows)} peer rows, {len(leaked)} of {len(secrets)} secrets found; "
                   f"/api/peers {statuses['/api/peers']}, /api/runs {statuses[f'/api/runs/{RUN}']}",
                   not leaked and len(rows) >= len(t.peers) and statuses["/api/peers"] == 401
                   and statuses[f"/api/runs/{RUN}"] == 401, leaked=leaked, statuses=statuses)


async def third_party_aim(t: Target, quick: bool) -> dict:
    accepted: list[float] = []

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(time.monotonic())
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.9", 0)
    victim = "127.0.0.9:%d" % server.sockets[0].getsockname()[1]
    s, _ = await admitted(t, t.ip())
    try:
        joined = await s.join(victim)
        hold = 6.0 if quick else 15.0  # heartbeats and several ping rounds with the liar in view
        end = time.monotonic() + hold
        while time.monotonic() < end:
            await s.request("POST", "/api/heartbeat", {"stats": {}})
            await asyncio.sleep(0.5)
        rows = {p["peer_id"]: p for p in (await asyncio.to_thread(t.api.get, "/peers"))["peers"]}
        reachable = rows.get(s.identity.peer_id, {}).get("reachable")
    finally:
        await s.request("POST", "/api/leave", {})
        await s.close()
        server.close()
    return outcome("14 aim the swarm at a third party (announce its address)",
                   "the third party gets at most the coordinator's single probe; peers never dial it",
                   f"third party accepted {len(accepted)} connection(s) in {hold:.0f}s; liar "
                   f"reachable={reachable}", joined.status == 200 and len(accepted) <= 1,
                   connections=len(accepted), reachable=reachable, join_status=joined.status)


async def weak_token(t: Target, quick: bool) -> dict:
    from peer.tokens import check_token_strength

    weak = "correct horse battery staple"
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "coordinator", "start", "--port", "0", "--data-dir",
         str(t.work / "weak-coordinator"), "--token", weak], cwd=ROOT, capture_output=True,
        text=True, timeout=60)
    refused = {"coordinator start": (done.returncode, done.stderr.strip().splitlines()[-1:])}
    for token in (weak, "lowband-swarm-2024", "a" * 64):
        try:
            check_token_strength(token)
            refused[token] = "accepted"
        except ValueError as e:
            refused[token] = str(e)[:80]
    try:
        PeerHost(Identity.generate(), b"short-token")
        refused["bytes token"] = "accepted"
    except ValueError as e:
        refused["bytes token"] = str(e)[:80]
    ok = done.returncode == 2 and "128" in done.stderr and all(
        v != "accepted" for k, v in refused.items() if k != "coordinator start")
    return outcome("16 weak token", "refused at startup (zxcvbn < 128 bits; bytes < 16) with advice",
                   f"coordinator exit {done.returncode}; {sum(v != 'accepted' for v in refused.values())}"
                   f"/{len(refused)} refused", ok, answers=refused)


async def client_role(t: Target, quick: bool) -> dict:
    from peer.joinstring import JoinString

    join = JoinString.decode(await asyncio.to_thread(invite, t.data_dir, "client", url=t.url))
    s = await signer(t, t.ip())
    try:
        assert (await s.admit_invite(join.invite_id, join.invite_secret)).status == 200
        chunk = b"x"
        tries = {
            "join": await s.join(),
            "run": await s.request("POST", f"/api/runs/{RUN}", {"config": {}, "explicit": []}),
            "sync": await s.request("POST", f"/api/runs/{RUN}/sync", {"step": 1, "base_hash": BOGUS}),
            "report": await s.request("POST", f"/api/runs/{RUN}/report", {"step": 1, "state_hash": BOGUS}),
            "offense": await s.request("POST", f"/api/runs/{RUN}/offenses", {"step": 1, "offenses": []}),
            "chunk": await s.request("PUT", f"/api/runs/{RUN}/chunks/{hashlib.sha256(chunk).hexdigest()}",
                                     chunk, content_type="application/octet-stream"),
            "manifest": await s.request("PUT", f"/api/runs/{RUN}/checkpoints/1", {}),
        }
    finally:
        await s.close()
    got = {k: (a.status, a.code) for k, a in tries.items()}
    return outcome("18 client-role credential trains/votes/uploads", "403 forbidden on join, run, "
                   "sync, report, offenses, chunk and manifest",
                   f"{sum(c == 'forbidden' for _, c in got.values())}/{len(got)} forbidden",
                   all(v == (403, "forbidden") for v in got.values()), answers=got)


# -- 4-5: votes -----------------------------------------------------------------------------------
async def ban_attempt(t: Target, quick: bool) -> dict:
    """Two fresh keys take part in one window (so each owns a shard of that step's ring), then
    accuse an honest peer as that shard's screener, and also for shards they do not own."""
    victim = t.peers[0]["peer_id"]
    fresh = [await run_member(t) for _ in range(2)]
    got = []
    try:
        step, answers = await enter_window(t, fresh)
        ring = answers[0].get("participants") or []
        for f in fresh:
            own = ring.index(f.identity.peer_id) if f.identity.peer_id in ring else 0
            for shard in sorted({own, (own + 1) % max(1, len(ring))}):
                try:
                    answer = await f.report_offenses(RUN, step, [{
                        "peer_id": victim, "code": "norm", "detail": "norm 1e9 > 4 x median",
                        "shard": shard}])
                    got.append(("recorded", answer.get("recorded"), answer.get("banned")))
                except CoordinatorError as e:
                    got.append((e.status, e.code))
        states = {p.peer_id: p.state for p in await fresh[0].peers()}
        t0 = time.monotonic()
        later, _ = await enter_window(t, [])  # the honest peers go on without them
        after = await asyncio.to_thread(_wait_agreed, t, later)
        next_step_s = time.monotonic() - t0
    finally:
        for f in fresh:
            await f.leave_run(RUN)
            await f.close()
    banned = any(g[0] == "recorded" and victim in (g[2] or []) for g in got)
    return outcome("4 two fresh keys report an honest peer", "only a shard's screener may report; "
                   "accusations weigh verified contribution (fresh keys have none): no ban",
                   f"participants of step {step}: {sum(f.identity.peer_id in ring for f in fresh)}/2; "
                   f"reports {sorted({str(g[:2]) for g in got})}; victim {states.get(victim)}, run at step "
                   f"{after.get('step')} ({next_step_s:.1f}s for the next step)",
                   not banned and states.get(victim) == "active", reports=got,
                   victim_state=states.get(victim), ring_size=len(ring), next_step_s=next_step_s)


async def bogus_vote(t: Target, quick: bool) -> dict:
    fresh = [await run_member(t) for _ in range(3)]
    try:
        step = int((await run_info(t)).get("step") or 0) + 1
        answers = await asyncio.gather(*(f.sync(RUN, step, BOGUS, deadline_s=60) for f in fresh),
                                       return_exceptions=True)
        # the honest peers' report of that step settles its agreed hash
        info = await asyncio.to_thread(_wait_agreed, t, step)
    finally:
        for f in fresh:
            await f.leave_run(RUN)
            await f.close()
    ok_answers = [a for a in answers if isinstance(a, dict)]
    joined = [a.get("participant") for a in ok_answers]
    agreed = (info.get("state_hashes") or {}).get(str(step))
    return outcome("5 three fresh keys vote one bogus base hash", "outvoted by credit (verified "
                   "contribution): told to resync, never participants; agreed hash stays honest",
                   f"participant={joined}, resync={[a.get('resync') for a in ok_answers]}, "
                   f"agreed hash of step {step}: {str(agreed)[:12]}",
                   len(ok_answers) == 3 and not any(joined) and agreed not in (None, BOGUS),
                   step=step, errors=[repr(a) for a in answers if not isinstance(a, dict)])


async def silent_participants(t: Target, quick: bool) -> dict:
    """Two fresh keys enter consecutive windows with the agreed base hash (so they would be
    counted as participants) and never send anything: each window that counts them makes the
    honest all-reduce wait for them and retry over the survivors. Defence (coordinator/
    benching.py): reports say who averaged; a silent seat is benched, and after a newcomer
    fails newcomers enter behind a growing gate, so the slow windows thin out (~1, 4, 9, 18 ...)."""
    fresh = [await run_member(t) for _ in range(2)]
    windows = 4 if quick else 8
    s0, t0 = int((await run_info(t)).get("step") or 0), time.monotonic()
    await asyncio.sleep(3.0)
    honest_step_s = (time.monotonic() - t0) / max(1, int((await run_info(t)).get("step") or 0) - s0)

    async def alive() -> None:  # an attacker keeps its keys live: heartbeats cost it nothing
        while True:
            await asyncio.gather(*(f.heartbeat({}) for f in fresh), return_exceptions=True)
            await asyncio.sleep(0.5)

    beat = asyncio.ensure_future(alive())
    counted, window_s, t0 = [], [], time.monotonic()
    try:
        for _ in range(windows):
            w0 = time.monotonic()
            step, answers = await enter_window(t, fresh)
            window_s.append(round(time.monotonic() - w0, 2))
            counted.append(sum(bool(a.get("participant")) for a in answers))
        await asyncio.to_thread(_wait_agreed, t, step)
        per_step = (time.monotonic() - t0) / windows
        states = {p.peer_id: p.state for p in await fresh[0].peers()}
    finally:
        beat.cancel()
        for f in fresh:
            await f.leave_run(RUN)
            await f.close()
    # A window that counts them slows the step after it (the all-reduce waits, then retries).
    slow = sum(1 for c in counted if c)
    # The gate opens for newcomers at windows 1, 4, 9, 18, 35 ... (coordinator/benching.py).
    openings = [w for w in (1, 4, 9, 18, 35, 68) if w <= windows]
    return outcome("19 silent participants (fresh keys enter windows, never send)",
                   "benched after their one failed step; fresh keys enter behind a growing newcomer "
                   "gate, so silent seats cost a shrinking fraction of steps",
                   f"counted as participants {counted} in {windows} windows ({slow} slow); "
                   f"{per_step:.1f}s per step vs {honest_step_s:.2f}s honest; seconds per window "
                   f"{window_s}; their state {sorted(set(states.get(f.identity.peer_id) for f in fresh))}",
                   slow <= len(openings),
                   participants_per_window=counted, step_s_with_them=per_step,
                   honest_step_s=honest_step_s, window_s=window_s)


def _wait_agreed(t: Target, step: int, timeout: float = 90) -> dict:
    return wait_until(lambda: (lambda i: str(step) in (i.get("state_hashes") or {}) and i)(
        t.api.get(f"/runs/{RUN}")), timeout, f"agreed hash of step {step}")


# -- 6, 7, 10, 15, 17: the mesh --------------------------------------------------------------------
def closed_by_remote(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """The remote side closed or reset the connection (seen without reading what it sent:
    StreamReader has no public flag for an EOF behind unread data)."""
    return writer.is_closing() or reader.exception() is not None or getattr(reader, "_eof", False)


async def ping_flood(t: Target, quick: bool) -> dict:
    """Eight admitted identities PING far above the rate and never read the PONGs; a flooder
    that is cut off dials again with the same key and goes on, for the whole attack."""
    victim = t.peers[0]
    before = rss_mb(victim["pid"])
    flooders = [await admitted(t, t.ip()) for _ in range(8)]
    honest_s, honest_cred = await admitted(t, t.ip())
    honest = await mesh_host(honest_cred, honest_s.identity)
    raws: dict[int, RawPeer | None] = {}
    cuts, refused, sent = 0, 0, 0
    pings: list[float | None] = []  # honest ping round trips (None: timed out)
    peak = before

    async def dial(i: int) -> None:
        nonlocal refused
        s, cred = flooders[i]
        try:
            raws[i] = await RawPeer.connect(victim["address"], s.identity, None, local_ip=s.local_ip,
                                            credential=cred, authority=cred.authority, timeout=5)
        except (LowbandError, OSError, TimeoutError):
            raws[i], refused = None, refused + 1

    try:
        await asyncio.gather(*(dial(i) for i in range(len(flooders))))
        honest.add_route(victim["peer_id"], victim["address"])
        end = time.monotonic() + (4.0 if quick else 10.0)
        burst = 0
        while time.monotonic() < end:
            burst += 1
            for i, r in list(raws.items()):
                if r is None or closed_by_remote(r.reader, r.writer):
                    if r is not None:
                        r.close()
                        cuts += 1
                    await dial(i)
                    continue
                for k in range(50):
                    r.ping(burst * 50 + k)
                sent += 50
            t0 = time.perf_counter()
            try:
                await honest.ping(victim["peer_id"], timeout=5)
                pings.append(time.perf_counter() - t0)
            except (LowbandError, TimeoutError):
                pings.append(None)
            peak = max(peak, rss_mb(victim["pid"]))
            await asyncio.sleep(0.01)
        still = [r for r in raws.values() if r is not None]
        closed = list(await asyncio.gather(*(r.closed_by_peer(3) for r in still)))
        after = rss_mb(victim["pid"])
    finally:
        for r in raws.values():
            if r is not None:
                r.close()
        await honest.close()
        for s, _ in [*flooders, (honest_s, None)]:
            await s.close()
    answered = [p for p in pings if p is not None]
    worst = max(answered, default=float("inf"))
    return outcome("6 PING flood without reading (8 identities, re-dialling when cut)",
                   "pings rate-limited, flooders cut off, victim RSS bounded, honest pings answered",
                   f"{sent} PINGs sent; victim RSS {before:.0f} -> peak {peak:.0f} MB; flooders cut "
                   f"{cuts + sum(closed)} times, re-dials refused {refused}; honest pings "
                   f"{len(answered)}/{len(pings)} answered, worst {worst * 1000:.0f} ms",
                   peak - before < 100 and cuts + sum(closed) > 0 and len(answered) >= 0.9 * len(pings)
                   and worst < 2.0, rss_before_mb=before, rss_peak_mb=peak, rss_after_mb=after,
                   pings_sent=sent, cuts=cuts + sum(closed), redials_refused=refused,
                   honest_pings=len(pings), honest_pings_answered=len(answered), worst_honest_ping_s=worst)


async def handshake_flood(t: Target, quick: bool) -> dict:
    victim = t.peers[1]
    host, port = victim["address"].rsplit(":", 1)
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    n_addr, per = 24, 24  # 576 connections: more than the 512 pre-auth slots
    hello_sent = 0
    for a in range(n_addr):
        ip = t.ip()
        for k in range(per):
            try:
                r, w = await asyncio.open_connection(host, int(port), local_addr=(ip, 0))
            except OSError:
                continue
            flood.append((r, w))
            if k % 2:  # half of them are fresh identities that send HELLO and never prove
                w.write(Handshake(Identity.generate(), os.urandom(32), initiator=True).data_to_send())
                hello_sent += 1
    s, cred = await admitted(t, t.ip())
    honest = await mesh_host(cred, s.identity)
    t0 = time.monotonic()
    connected, attempts, error = None, 0, None
    try:
        honest.add_route(victim["peer_id"], victim["address"])
        while time.monotonic() - t0 < 20:
            attempts += 1
            try:
                await honest.ping(victim["peer_id"], timeout=5)
                connected = time.monotonic() - t0
                break
            except (LowbandError, OSError, TimeoutError) as e:
                error = str(e)[:120]
                await asyncio.sleep(0.5)
        closed = sum(closed_by_remote(r, w) for r, w in flood)
    finally:
        for _, w in flood:
            w.transport.abort()
        await honest.close()
        await s.close()
    return outcome(f"7 handshake flood ({len(flood)} connections from {n_addr} addresses, "
                   f"{hello_sent} fresh identities)", "pre-auth slots and per-address rate bounded, "
                   "5 s handshake deadline, authenticated peers keep reserved slots: honest peer connects",
                   f"honest peer connected after {connected if connected is None else round(connected, 2)}"
                   f" s ({attempts} tries)", connected is not None and connected < 15,
                   flood_connections=len(flood), honest_connect_s=connected, attempts=attempts,
                   last_error=error, flood_closed_by_victim=closed)


async def malformed_donor(t: Target, quick: bool) -> dict:
    from diloco.errors import StateError
    from diloco.role import SNAPSHOT_METHOD
    from diloco.state_io import parse_snapshot

    head = json.dumps({"run": RUN}).encode()
    answers = [({}, b"{}"), ({"manifest_bytes": "many", "chunk_size": 4}, head),
               ({"manifest_bytes": 4, "chunk_size": 4}, b"\xff\xfe\x00\x01" + head),
               ({"manifest_bytes": 10**12, "chunk_size": 4}, head),
               ({"manifest_bytes": len(head), "chunk_size": 2**40}, head),
               ({"manifest_bytes": 2, "chunk_size": 4}, b"[]"),
               ({"manifest_bytes": -1, "chunk_size": 4}, head), (["manifest_bytes", 3], head)]
    (ds, dcred), (js, jcred) = await admitted(t, t.ip()), await admitted(t, t.ip())
    donor, joiner = await mesh_host(dcred, ds.identity), await mesh_host(jcred, js.identity)
    served = iter(answers)

    async def serve(peer_id, header, payload):
        return next(served)

    donor.handle(SNAPSHOT_METHOD, serve)
    seen = []
    try:
        joiner.add_route(donor.peer_id, donor.address)
        for _ in answers:
            try:  # TrainRole._from_peer: the call, then parse_snapshot; LowbandError skips the donor
                header, payload = await joiner.call(donor.peer_id, SNAPSHOT_METHOD, {"run": RUN}, b"",
                                                    timeout=10)
                parse_snapshot(RUN, header, payload)
                seen.append("ACCEPTED")
            except StateError as e:
                seen.append(f"skipped, StateError: {str(e)[:60]}")
            except LowbandError as e:  # e.g. a non-map header: the transport drops the connection
                seen.append(f"skipped, {type(e).__name__}: {str(e)[:60]}")
            except Exception as e:  # noqa: BLE001 - any other type is the finding
                seen.append(f"{type(e).__name__}: {str(e)[:60]}")
        # the honest donors still serve the joiner the run's state
        honest = t.peers[2]
        joiner.add_route(honest["peer_id"], honest["address"])
        header, payload = await joiner.call(honest["peer_id"], SNAPSHOT_METHOD, {"run": RUN}, b"", timeout=60)
        manifest, _ = parse_snapshot(RUN, header, payload)
        honest_ok = f"step {manifest.step}"
    finally:
        for h in (donor, joiner):
            await h.close()
        await ds.close()
        await js.close()
    return outcome("10 malformed donor snapshot header to a joiner", "every malformed answer is a "
                   "typed error (StateError, or the transport's for a non-map header): donor skipped",
                   f"{sum(x.startswith('skipped') for x in seen)}/{len(seen)} skipped with a typed error; "
                   f"honest donor: {honest_ok}", all(x.startswith("skipped") for x in seen),
                   answers=seen, honest=honest_ok)


async def _responder_frames(address: str, hs: Handshake, local_ip: str) -> list[str]:
    """Run the initiator side of ``hs`` against ``address``; the frame types the responder sent."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(local_ip, 0))
    decoder, types = FrameDecoder(), []
    try:
        writer.write(hs.data_to_send())
        async with asyncio.timeout(10):
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for frame in decoder.feed(data):
                    types.append(FrameType(frame.type).name)
                try:
                    hs.receive_data(data)
                except (AuthError, ProtocolError):
                    pass
                writer.write(hs.data_to_send())
                if hs.done:
                    break
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.transport.abort()
    return types


async def token_oracle(t: Target, quick: bool) -> dict:
    victim = t.peers[2]
    s, cred = await admitted(t, t.ip())
    await s.close()
    fake = Identity.generate()
    me = Identity.generate()
    forged = issue(fake, me.public_bytes, ["train"], now=time.time(), lifetime_s=3600, serial=1)
    live = await _responder_frames(victim["address"], Handshake(
        me, None, initiator=True, credential=forged, authority=cred.authority), t.ip())
    token = os.urandom(32)
    closed = PeerHost(Identity.generate(), token)
    await closed.start("127.0.0.1", 0)
    try:
        wrong = await _responder_frames(closed.address, Handshake(
            Identity.generate(), os.urandom(32), initiator=True), t.ip())
        right = await _responder_frames(closed.address, Handshake(
            Identity.generate(), token, initiator=True), t.ip())
    finally:
        await closed.close()
    ok = "AUTH" not in live and "AUTH" not in wrong and "AUTH" in right
    return outcome("15 offline token oracle (wrong token/credential dialer)", "initiator proves first: "
                   "no responder AUTH (nothing to test a token guess against offline)",
                   f"live peer, forged credential: {live}; token host, wrong token: {wrong}; "
                   f"right token: {right}", ok)


async def revoked_identity(t: Target, quick: bool) -> dict:
    victim = t.peers[2]
    s, cred = await admitted(t, t.ip())
    raw = await RawPeer.connect(victim["address"], s.identity, None, local_ip=s.local_ip,
                                credential=cred, authority=cred.authority)
    try:
        raw.ping(1)
        alive = any(f.type == FrameType.PONG for f in await raw.read_frames(5))
        t0 = time.monotonic()
        await asyncio.to_thread(coordinator_cli, "revoke", s.identity.peer_id, "--data-dir", str(t.data_dir))
        cut = await raw.closed_by_peer(20)
        cut_s = time.monotonic() - t0
        try:
            again = await RawPeer.connect(victim["address"], s.identity, None, local_ip=s.local_ip,
                                          credential=cred, authority=cred.authority)
            again.close()
            redial = "accepted"
        except (AuthError, ProtocolError, ConnectionError) as e:
            redial = str(e)[:300]
        api = await s.request("GET", "/api/peers")
    finally:
        raw.close()
        await s.close()
    return outcome("17 revoked identity", "cut from the mesh (heartbeat 'revoked' -> PeerHost.revoke), "
                   "handshakes and requests refused though the credential has not expired",
                   f"live connection (PONG={alive}) cut={cut} {cut_s:.1f}s after `coordinator revoke`; "
                   f"redial refused: {'revoked' in redial}; /api/peers {api.status} {api.code}",
                   alive and cut and "revoked" in redial and api.code == "revoked", cut_s=cut_s,
                   redial=redial)


# -- 8, 9, 11: serving ------------------------------------------------------------------------------
async def gateway_call(t: Target, path: str, body: dict, timeout: float = 60) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async with http.post(t.serving["gateway"] + path, json=body) as r:
            return r.status, await r.json(content_type=None), time.monotonic() - t0


async def honest_completion(t: Target) -> tuple[int, str | None, float]:
    status, body, took = await gateway_call(t, "/completions", {
        "model": t.serving["model"], "prompt": PROMPT, "max_tokens": NEW, "temperature": 0})
    text = body["choices"][0]["text"] if status == 200 else None
    return status, text, took


async def kv_exhaustion(t: Target, quick: bool) -> dict:
    model = t.serving["model"]
    ref = await honest_completion(t)
    attacks = {"16 prompts x 4096 tokens": {"prompt": [PROMPT] * 16, "max_tokens": 4096},
               "64 prompts": {"prompt": [PROMPT] * 64, "max_tokens": 16},
               "max_tokens 10^9": {"prompt": PROMPT, "max_tokens": 10**9}}
    got = {}
    honest = asyncio.ensure_future(honest_completion(t))
    for name, extra in attacks.items():
        status, body, took = await gateway_call(t, "/completions", {"model": model, **extra})
        err = body.get("error", {}) if isinstance(body, dict) else {}
        got[name] = (status, err.get("code") or err.get("param"), round(took, 2))
    during = await honest
    ok = all(400 <= s < 500 for s, _, _ in got.values()) and during[:2] == ref[:2] and ref[0] == 200
    return outcome("8 gateway: many prompts x huge max_tokens (KV exhaustion)", "400 before any KV is "
                   "reserved (per-key prompts/max_tokens/KV caps; servers charge KV per client)",
                   "; ".join(f"{k}: {s} {c}" for k, (s, c, _) in got.items())
                   + f"; honest answer same={during[:2] == ref[:2]} ({during[2]:.2f}s vs {ref[2]:.2f}s)",
                   ok, answers=got, honest_latency_before_s=ref[2], honest_latency_during_s=during[2])


async def hostile_template(t: Target, quick: bool) -> dict:
    ref = await honest_completion(t)
    attack = asyncio.ensure_future(gateway_call(t, "/chat/completions", {
        "model": t.serving["model"], "messages": [{"role": "user", "content": "w1 w2"}]}))
    await asyncio.sleep(0.3)
    during = await honest_completion(t)
    answered_first = not attack.done()
    status, body, took = await attack
    again = await gateway_call(t, "/chat/completions", {
        "model": t.serving["model"], "messages": [{"role": "user", "content": "w1"}]})
    message = (body.get("error") or {}).get("message", "") if isinstance(body, dict) else ""
    ok = (status == 503 and took < TEMPLATE_TIMEOUT_S + 10 and during[:2] == ref[:2]
          and answered_first and again[0] == 503 and again[2] < 1.0)
    return outcome("9 hostile chat template (serving peer's template loops for hours)",
                   f"bounded worker: 503 after {TEMPLATE_TIMEOUT_S:g} s, remembered; gateway keeps serving",
                   f"chat {status} after {took:.1f}s ({message[:60]}); again {again[0]} in {again[2]:.2f}s; "
                   f"honest completion during it {during[0]} in {during[2]:.2f}s",
                   ok, honest_latency_before_s=ref[2], honest_latency_during_s=during[2])


async def tensor_split_usurper(t: Target, quick: bool) -> dict:
    import torch

    from pipeline.client import InferenceClient
    from pipeline.protocol import TP_STEP, pack_tensor

    follower = t.serving["follower"]
    attacker = InferenceClient(t.url)
    try:
        host = await attacker.connect()
        host.add_route(follower["peer_id"], follower["address"])
        meta, raw = pack_tensor(torch.ones((1, 1), dtype=torch.long))
        header = {**meta, "owner": "victim", "sid": "s", "start": 0, "end": 6, "pos": 0, "chunks": [1],
                  "capacity": 4, "pad": [0], "input": "tokens", "out": "hidden", "wire": "fp32",
                  "members": [host.peer_id, follower["peer_id"]], "prefix": "tp-evil-0"}
        try:
            await host.call(follower["peer_id"], TP_STEP, header, raw, timeout=30)
            observed = "ACCEPTED"
        except RemoteError as e:
            observed = str(e)[:160]
    finally:
        await attacker.aclose()
    after = await honest_completion(t)
    return outcome("11 tensor-split step from a non-leader", "followers take steps only from the "
                   "leader the coordinator's table names", f"{observed}; honest completion {after[0]}",
                   "named by the coordinator" in observed and after[0] == 200, refusal=observed)


Attack = Callable[[Target, bool], Awaitable[dict]]
ATTACKS: list[tuple[str, Attack, bool]] = [  # (name, function, needs the serving swarm)
    ("replay", replayed_request, False), ("bearer", bearer_token, False),
    ("checkpoint", checkpoint_overwrite, False), ("ban", ban_attempt, False),
    ("vote", bogus_vote, False), ("ping_flood", ping_flood, False),
    ("handshake_flood", handshake_flood, False), ("kv", kv_exhaustion, True),
    ("template", hostile_template, True), ("donor", malformed_donor, False),
    ("tensor_split", tensor_split_usurper, True), ("join_flood", join_flood, False),
    ("status", status_scraping, False), ("third_party", third_party_aim, False),
    ("oracle", token_oracle, False), ("weak_token", weak_token, False),
    ("revoked", revoked_identity, False), ("client_role", client_role, False),
    ("silent", silent_participants, False),  # beyond the issue's list: found while building 4
]


async def run_attack(fn: Attack, target: Target, quick: bool, timeout: float = 120) -> dict:
    """One attack, never raising: an attack that errors or hangs is reported as not defended
    (a crash of the harness is not evidence of a defence)."""
    try:
        return await asyncio.wait_for(fn(target, quick), timeout)
    except Exception as e:  # noqa: BLE001 - reported in the table
        name = fn.__name__
        return outcome(name, "-", f"attack harness error: {type(e).__name__}: {str(e)[:200]}", False)
