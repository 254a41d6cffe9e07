"""Votes that free identities cannot buy (issue 14 item 3): the rendezvous' base-hash majority,
the agreed hash of a step, offense reports and bans weigh verified contribution
(coordinator/votes.py), offense reports count only from the shard owner that screened the
contribution, runs per identity are capped, and a resyncing peer verifies a donor's snapshot
against the coordinator's agreed hash, skipping donors whose answers are malformed.

The coordinator is the real aiohttp app on a real 127.0.0.1 socket (tests/test_runs_api.py's
harness, fake clock); peers are real identities speaking through the shipped RunClient; donors
are real PeerHosts answering ``diloco.snapshot`` over the encrypted mesh. Each attack test also
checks the counterfactual (what counting identities would have decided), so it can fail.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
from types import SimpleNamespace

import pytest

from coordinator.runs import WATCH_PERIOD_S
from coordinator.votes import (CREDIT_SCHEMA, accusation_stands, credit_window, majority,
                               step_majority)
from diloco.errors import StateError
from diloco.role import SNAPSHOT_METHOD, TrainRole
from diloco.run_client import RunClient
from diloco.run_spec import RunConfig
from diloco.state_io import (build_manifest, global_tensors, pack, parse_snapshot,
                             snapshot_from_tensors)
from peer.blobs import CHUNK_SIZE
from peer.identity import Identity
from peer.membership import CoordinatorError
from peer.transport import PeerHost
from tests.test_runs_api import CONFIG, Coord, start
from tests.test_train_mesh import corpus

MESH_TOKEN = b"votes-mesh-token-9a1f5c0e7b2d4863a1c0"
BOGUS = "b" * 64


def h(i: int) -> str:
    return hashlib.sha256(f"state-{i}".encode()).hexdigest()


@pytest.fixture
async def coord(tmp_path):
    c = await start(tmp_path / "coord")
    yield c
    await c.stop()


async def arrivals(coord: Coord, step: int) -> int:
    return await coord.store.run(lambda conn: conn.execute(
        "SELECT COUNT(*) FROM run_arrivals WHERE run = 'r' AND step = ?", (step,)).fetchone()[0])


async def credit_of(coord: Coord, peer_id: str) -> int:
    row = await coord.store.run(lambda conn: conn.execute(
        "SELECT credit FROM run_credit WHERE run = 'r' AND peer_id = ?", (peer_id,)).fetchone())
    return 0 if row is None else row[0]


async def arrive(coord: Coord, clients, step: int, base: str) -> list[asyncio.Task]:
    """Start ``clients``' rendezvous for ``step``; return once the coordinator holds them."""
    before = await arrivals(coord, step)
    tasks = [asyncio.create_task(c.sync("r", step, base, deadline_s=20)) for c in clients]
    for _ in range(500):
        if await arrivals(coord, step) == before + len(clients):
            return tasks
        await asyncio.sleep(0.01)
    raise AssertionError(f"arrivals at step {step} not recorded")


async def answers(coord: Coord, tasks: list[asyncio.Task], clients) -> list[dict]:
    """The answers of a window whose expected peers have all arrived: the fake clock moves on
    one watcher period (after heartbeats, so nobody turns suspect) until it closes."""
    for _ in range(20):
        done, _ = await asyncio.wait(tasks, timeout=0.2)
        if len(done) == len(tasks):
            return [t.result() for t in tasks]
        for c in clients:
            await c.heartbeat({})
        await coord.clock.advance(WATCH_PERIOD_S)
    raise AssertionError("window did not close")


async def steps(coord: Coord, clients, first: int, last: int) -> None:
    """``clients`` take outer steps first..last together: state hash h(s) after step s."""
    for step in range(first, last + 1):
        got = await answers(coord, await arrive(coord, clients, step, h(step - 1)), clients)
        assert all(a["participant"] for a in got), got
        for c in clients:
            await c.report("r", step, h(step), {})


# -- the rules, as pure functions ------------------------------------------------------------
@pytest.mark.fast
def test_majority_weighs_contribution_and_falls_back_to_count():
    ballots = {"a": h(1), "b": h(1), "f1": BOGUS, "f2": BOGUS, "f3": BOGUS}
    assert majority(ballots, {}) == BOGUS                       # counting identities: bought
    assert majority(ballots, {"a": 3, "b": 3}) == h(1)          # weighted: not
    assert majority(ballots, {"a": 1, "f1": 1}) == BOGUS        # equal weight: count decides
    assert majority({"a": h(1), "b": h(2)}, {}, prior=h(2)) == h(2)  # then the prior
    assert majority({"a": h(1), "b": h(2)}, {}) == min(h(1), h(2))   # then the smallest hash
    assert majority({}, {"a": 1}) is None


@pytest.mark.fast
def test_accusation_stands_only_against_the_silent_screeners_weight():
    screeners = ["a", "b", "f1", "f2"]  # every participant but the accused
    weights = {"a": 4, "b": 4}
    assert not accusation_stands({"f1", "f2"}, screeners, weights)   # fresh keys vs credited
    assert accusation_stands({"a", "b"}, screeners, weights)
    assert not accusation_stands({"a"}, screeners, weights)          # 4 vs 4: then count 1 vs 3
    assert accusation_stands({"f1", "f2", "a"}, ["a", "f1", "f2", "x"], {})  # new run: count
    assert not accusation_stands({"f1", "f2"}, screeners, {})        # 2 vs 2 is no majority


@pytest.mark.fast
def test_credit_needs_two_consecutive_windows_and_no_standing_accusation():
    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    conn.executescript("CREATE TABLE run_windows (run, generation, step, closed_at, "
                       "participants, majority_hash);"
                       "CREATE TABLE run_reports (run, generation, step, peer_id, state_hash);"
                       "CREATE TABLE offenses (run, generation, step, peer_id, reporter);"
                       + CREDIT_SCHEMA)

    def window(step: int, peers: list[str], agreed: str) -> None:
        conn.execute("INSERT INTO run_windows VALUES ('r', 1, ?, 1.0, ?, ?)",
                     (step, json.dumps([[p, 1] for p in peers]), agreed))

    window(1, ["a", "b", "x"], h(0))
    assert credit_window(conn, "r", 1, 1, ["a", "b", "x"]) == []  # no step before: nothing
    # a and b (count 2 of 3 screeners of x) accuse x at step 1: the accusation stands.
    conn.executemany("INSERT INTO offenses VALUES ('r', 1, 1, 'x', ?)", [("a",), ("b",)])
    window(2, ["a", "b", "x", "late"], h(1))
    assert credit_window(conn, "r", 1, 2, ["a", "b", "x", "late"]) == ["a", "b"]
    # Agreed hash of step 1 = window 2's majority; of step 2 = decided reports of window 2.
    assert step_majority(conn, "r", 1, 1) == h(1)
    conn.execute("INSERT INTO run_reports VALUES ('r', 1, 2, 'x', ?)", (BOGUS,))
    assert step_majority(conn, "r", 1, 2) is None  # x alone cannot name the state of step 2
    conn.executemany("INSERT INTO run_reports VALUES ('r', 1, 2, ?, ?)", [("a", h(2)), ("b", h(2))])
    assert step_majority(conn, "r", 1, 2) == h(2)


# -- attacks against a live coordinator --------------------------------------------------------
async def test_fresh_keys_cannot_outvote_the_peers_that_carried_the_run(coord):
    (a, _), (b, _) = [await coord.peer() for _ in range(2)]
    honest = sorted([a.identity.peer_id, b.identity.peer_id])
    fresh = []
    try:
        await steps(coord, [a, b], 1, 3)
        assert [await credit_of(coord, p) for p in honest] == [2, 2]  # steps 1 and 2 verified
        fresh = [(await coord.peer())[0] for _ in range(3)]
        # Three fresh keys arrive first, all with one bogus base hash; then the honest two.
        attack = await arrive(coord, fresh, 4, BOGUS)
        honest_tasks = await arrive(coord, [a, b], 4, h(3))
        ballots = await coord.store.run(lambda conn: {r[0]: r[1] for r in conn.execute(
            "SELECT peer_id, base_hash FROM run_arrivals WHERE run = 'r' AND step = 4")})
        assert majority(ballots, {}) == BOGUS  # counted per identity, the attack would win
        *good, = await answers(coord, honest_tasks, [a, b, *fresh])
        bad = await answers(coord, attack, [])
        for ans in good:
            assert ans["participant"] and ans["participants"] == honest
            assert ans["majority_hash"] == h(3)
        for ans in bad:  # the fresh keys resync, from the honest peers
            assert ans["resync"] and not ans["participant"]
            assert sorted(d["peer_id"] for d in ans["donors"]) == honest
        assert {d["peer_id"] for d in (await a.run_info("r"))["donors"]} == set(honest)
        # Their reports for step 4 cannot name its state either: they did not take part in it.
        for f in fresh:
            assert (await f.report("r", 4, BOGUS, {}))["agree"] is False
        for c in (a, b):
            assert (await c.report("r", 4, h(4), {}))["agree"] is True
        info = await a.run_info("r")
        assert info["state_hashes"]["3"] == h(3) and info["state_hashes"]["4"] == h(4)
        # The honest peers keep agreeing; the fresh keys earned nothing.
        await steps(coord, [a, b], 5, 5)
        assert [await credit_of(coord, f.identity.peer_id) for f in fresh] == [0, 0, 0]
        assert [await credit_of(coord, p) for p in honest] == [4, 4]
    finally:
        for c in (a, b, *fresh):
            await c.close()


async def test_fresh_keys_cannot_get_an_honest_peer_banned(coord):
    clients = [(await coord.peer())[0] for _ in range(3)]  # a, b and the victim v
    a, b, v = clients
    vid = v.identity.peer_id
    fresh = []
    try:
        await steps(coord, clients, 1, 3)
        fresh = [(await coord.peer())[0] for _ in range(2)]
        f1, f2 = fresh
        # The fresh keys take part honestly in step 4 (so they own shards and may report).
        tasks = await arrive(coord, fresh, 4, h(3)) + await arrive(coord, clients, 4, h(3))
        got = await answers(coord, tasks, [*clients, *fresh])
        ring = got[0]["participants"]
        assert len(ring) == 5 and all(x["participant"] for x in got)

        def offense(reporter, peer_id: str, shard: int | None = None) -> list[dict]:
            own = ring.index(reporter.identity.peer_id)
            return [{"peer_id": peer_id, "code": "direction", "detail": "cosine -0.9",
                     "shard": own if shard is None else shard}]

        # Only the owner of the shard it names may report, and the shard must exist.
        for shard in (ring.index(a.identity.peer_id), 5):
            with pytest.raises(CoordinatorError) as err:
                await f1.report_offenses("r", 4, offense(f1, vid, shard))
            assert (err.value.status, err.value.code) == (403, "not_shard_owner")
        with pytest.raises(CoordinatorError) as err:
            await f1.report_offenses("r", 4, [{**offense(f1, vid)[0], "shard": "0"}])
        assert err.value.status == 400 and "shard" in str(err.value)
        # Two fresh keys accuse v: recorded, but the credited screeners saw nothing: no ban.
        for f in fresh:
            answer = await f.report_offenses("r", 4, offense(f, vid))
            assert answer["recorded"] == 1 and answer["banned"] == []
        assert len({f.identity.peer_id for f in fresh}) >= 2  # the old rule's ban_after (2) met
        status = {p.peer_id: p.state for p in await a.peers()}
        assert status[vid] != "left"
        # Honest owners catching a real offender still get it banned (a alone: not yet).
        f1id = f1.identity.peer_id
        assert (await a.report_offenses("r", 4, offense(a, f1id)))["banned"] == []
        assert (await b.report_offenses("r", 4, offense(b, f1id)))["banned"] == [f1id]
        assert {p.peer_id: p.state for p in await a.peers()}[f1id] == "left"
        # v is clean and keeps training with the others.
        rest = [*clients, f2]
        for step in (5, 6):
            got = await answers(coord, await arrive(coord, rest, step, h(step - 1)), rest)
            assert all(x["participant"] for x in got) and len(got[0]["participants"]) == 4
        assert await credit_of(coord, f1id) == 0 and await credit_of(coord, vid) == 5
        assert await credit_of(coord, f2.identity.peer_id) == 2
    finally:
        for c in (*clients, *fresh):
            await c.close()


async def test_one_identity_cannot_move_the_run_with_reports(coord):
    """Offline steps (no window) advance the run once the last window's peers report them; one
    fresh key reporting an absurd step does not."""
    (a, _), (b, _) = [await coord.peer() for _ in range(2)]
    f, _ = await coord.peer()
    try:
        await steps(coord, [a, b, f], 1, 1)
        await f.leave_run("r")  # (still a member: it may report) not in step 2: no voter
        await steps(coord, [a, b], 2, 2)
        assert (await a.run_info("r"))["step"] == 2
        await f.report("r", 10**6, BOGUS, {"offline": 1})
        await f.report("r", 3, BOGUS, {"offline": 1})
        await a.report("r", 3, h(3), {"offline": 1})
        assert (await a.run_info("r"))["step"] == 2  # 1 of the 2 voters: not decided yet
        await b.report("r", 3, h(3), {"offline": 1})
        info = await a.run_info("r")
        assert info["step"] == 3 and info["state_hashes"]["3"] == h(3)
    finally:
        for c in (a, b, f):
            await c.close()


async def test_runs_per_identity_are_capped(coord):
    a, _ = await coord.peer()  # created run "r"
    b, _ = await coord.peer()
    try:
        for i in range(7):
            assert (await a.join_run(f"own{i}", dict(CONFIG), []))["created"]
        with pytest.raises(CoordinatorError) as err:
            await a.join_run("one-too-many", dict(CONFIG), [])
        assert (err.value.status, err.value.code) == (409, "too_many_runs_for_identity")
        assert not (await a.join_run("own3", dict(CONFIG), []))["created"]  # joining is fine
        assert (await b.join_run("one-too-many", dict(CONFIG), []))["created"]
    finally:
        for c in (a, b):
            await c.close()


# -- a resyncing peer and its donors -------------------------------------------------------------
@pytest.mark.fast
def test_robust_detect_is_the_default():
    from diloco import train_options
    assert RunConfig().robust == "detect" and RunConfig().robust_config() is not None
    import argparse
    parser = argparse.ArgumentParser()
    train_options.add_arguments(parser)
    assert "(default: detect)" in " ".join(parser.format_help().split())


@pytest.mark.fast
@pytest.mark.parametrize("header, payload, match", [
    (["manifest_bytes", 3], b"{}", "not a map"),
    ({"manifest_bytes": "3", "chunk_size": 4}, b"{}", "manifest_bytes"),
    ({"manifest_bytes": -1, "chunk_size": 4}, b"{}", "manifest_bytes"),
    ({"manifest_bytes": 99, "chunk_size": 4}, b"{}", "manifest_bytes"),
    ({"manifest_bytes": True, "chunk_size": 4}, b"{}", "manifest_bytes"),
    ({"manifest_bytes": 2, "chunk_size": 0}, b"{}", "chunk_size"),
    ({"manifest_bytes": 2, "chunk_size": 2**40}, b"{}", "chunk_size"),
    ({"manifest_bytes": 2, "chunk_size": 4}, b"\xff\xfe", "not JSON"),
    ({"manifest_bytes": 2, "chunk_size": 4}, b"[]", "manifest"),
    ({"manifest_bytes": 2, "chunk_size": 4}, "{}", "not bytes"),
])
def test_malformed_snapshot_answers_are_state_errors(header, payload, match):
    with pytest.raises(StateError, match=match):
        parse_snapshot("r", header, payload)


async def test_resync_checks_the_coordinators_hash_and_skips_bad_donors(coord, tmp_path, caplog):
    """A peer whose hash lost the vote resyncs. Of its six donors, five answer with malformed
    headers or a state the coordinator never agreed on (whose manifest honestly names its own
    hash: the old check trusted that claim; or a step the run never reached), one with the
    agreed state."""
    config = {**CONFIG, "seq_len": 32, "batch_size": 2}
    (a, _), (b, _), (joiner_client, answer) = [await coord.peer(config) for _ in range(3)]
    role = TrainRole("r", {"train_data": str(corpus(tmp_path))})
    role.client, role.loop = joiner_client, asyncio.get_running_loop()
    role.config = RunConfig.from_dict(answer["config"])
    joiner = PeerHost(Identity.generate(), MESH_TOKEN)
    donors: list[PeerHost] = []
    try:
        await joiner.start("127.0.0.1", 0)
        # The daemon's part the role uses: its host, id and device (no coordinator session).
        role.daemon = SimpleNamespace(host=joiner, peer_id=joiner.peer_id, device="cpu",
                                      mesh=lambda: [])
        await asyncio.to_thread(role._setup, answer)
        trainer, seed_hash = role.trainer, role.state_hash

        def moved(delta: float) -> tuple[dict, str]:
            """The global tensors moved by ``delta``, and the hash a trainer holding them has."""
            snap = trainer.snapshot()
            tensors = {n: t + delta for n, t in global_tensors(snap).items()}
            trainer.load_snapshot(snapshot_from_tensors(tensors, 2))
            digest = trainer.global_state_hash()
            trainer.load_snapshot(snap)
            return tensors, digest

        agreed_tensors, agreed = moved(0.25)
        lie_tensors, lie = moved(-0.5)
        assert len({agreed, lie, seed_hash}) == 3 and trainer.global_state_hash() == seed_hash

        def reply(tensors: dict, claimed: str, step: int = 2) -> tuple[dict, bytes]:
            manifest, chunks = build_manifest("r", step, tensors, meta={"global_state_hash": claimed})
            head = json.dumps(manifest.to_dict()).encode()
            return {"manifest_bytes": len(head), "chunk_size": CHUNK_SIZE}, head + pack(manifest, chunks)

        good = reply(agreed_tensors, agreed)
        replies = [
            ({}, good[1]),                                               # fields missing
            ({**good[0], "manifest_bytes": "many"}, good[1]),            # not an integer
            ({**good[0], "manifest_bytes": 4}, b"\xff\xfe\x00\x01" + good[1]),  # not JSON
            reply(lie_tensors, lie),                                     # nobody agreed on it
            reply(agreed_tensors, agreed, step=10**6),                   # a step never reached
            good,
        ]
        for header, payload in replies:
            host = PeerHost(Identity.generate(), MESH_TOKEN)
            donors.append(host)
            address = await host.start("127.0.0.1", 0)

            async def serve(peer_id, _header, _payload, answer=(header, payload)):
                return answer
            host.handle(SNAPSHOT_METHOD, serve)
            await joiner.connect(address, host.peer_id)
        # The run: a and b agree that step 2 ended in ``agreed``; the joiner lost step 2's vote.
        three = [a, b, joiner_client]
        await answers(coord, await arrive(coord, three, 1, h(0)), three)
        told = await answers(coord, await arrive(coord, [a, b], 2, h(1))
                             + await arrive(coord, [joiner_client], 2, BOGUS), three)
        assert told[2]["resync"]
        for c in (a, b):
            await c.report("r", 2, agreed, {})

        ids = [d.peer_id for d in donors]
        with caplog.at_level(logging.WARNING, logger="lowband.train"):
            # Without the good donor nothing is adopted and the state is untouched.
            assert await asyncio.to_thread(role._from_donors, ids[:-1]) is False
            assert trainer.global_state_hash() == seed_hash == role.state_hash
            assert await asyncio.to_thread(role._from_donors, ids) is True
        assert role.state_hash == agreed == trainer.global_state_hash()
        failures = [r.getMessage() for r in caplog.records if "snapshot from" in r.getMessage()]
        assert len(failures) == 10, failures
        for text in ("'manifest_bytes'", "not JSON", f"hashes to {lie[:12]}, expected {agreed[:12]}",
                     "no agreed state hash for step 1000000"):
            assert any(text in f for f in failures), (text, failures)
    finally:
        role._stop.set()
        for host in (*donors, joiner):
            await host.close()
        for c in (a, b, joiner_client):
            await c.close()


# -- the same attacks on an open swarm: a real coordinator process, keys minted on request -------
async def test_open_swarm_sybil_burst_against_a_coordinator_process(procs, tmp_path):
    """``coordinator start --open``: anyone is admitted, so identities are free. Three honest
    peers carry the run; four fresh keys then try to outvote them (bogus base hash: 4 against 3
    identities) and two of them, after taking part honestly, accuse an honest peer. Both fail;
    training goes on."""
    url = procs.python("-m", "coordinator", "start", "--host", "127.0.0.1", "--port", "0",
                       "--data-dir", str(tmp_path / "coord"), "--open", "--heartbeat-interval",
                       "0.5", "--peer-timeout", "5").ready["url"]
    clients: list[RunClient] = []

    async def peer() -> RunClient:
        client = RunClient(url, None, Identity.generate(), timeout=30)  # open admission
        clients.append(client)
        await client.join(f"127.0.0.1:{9000 + len(clients)}", {"roles": ["train"]})
        await client.join_run("r", dict(CONFIG), [])
        return client

    async def heartbeats() -> None:
        while True:
            await asyncio.gather(*(c.heartbeat({}) for c in list(clients)), return_exceptions=True)
            await asyncio.sleep(0.5)

    async def step(peers, n: int, base: str, first=()) -> list[dict]:
        early = [asyncio.create_task(c.sync("r", n, BOGUS if c in first else base, deadline_s=30))
                 for c in first]
        if early:
            await asyncio.sleep(1.0)  # their arrivals are in before the honest peers'
        rest = await asyncio.gather(*(c.sync("r", n, base, deadline_s=30) for c in peers))
        return [*rest, *await asyncio.gather(*early)]

    beat = asyncio.create_task(heartbeats())
    try:
        a, b, v = [await peer() for _ in range(3)]
        honest = [a, b, v]
        ids = sorted(c.identity.peer_id for c in honest)
        for n in (1, 2, 3):
            assert all(x["participant"] for x in await step(honest, n, h(n - 1)))
            for c in honest:
                await c.report("r", n, h(n), {})
        fresh = [await peer() for _ in range(4)]
        got = await step(honest, 4, h(3), first=fresh)
        assert [x["participants"] for x in got[:3]] == [ids] * 3
        for x in got[3:]:  # outvoted, told to resync from the honest peers
            assert x["resync"] and sorted(d["peer_id"] for d in x["donors"]) == ids
        for c in honest:
            await c.report("r", 4, h(4), {})
        # Two fresh keys take part in step 5 honestly, then accuse v as shard owners.
        f1, f2 = fresh[:2]
        got = await step([*honest, f1, f2], 5, h(4))
        ring = got[0]["participants"]
        assert len(ring) == 5
        vid = v.identity.peer_id
        for f in (f1, f2):
            answer = await f.report_offenses("r", 5, [{
                "peer_id": vid, "code": "norm", "detail": "norm 1e9 > 4 x median",
                "shard": ring.index(f.identity.peer_id)}])
            assert answer["recorded"] == 1 and answer["banned"] == []
        for c in [*honest, f1, f2]:
            await c.report("r", 5, h(5), {})
        # v is not banned and everyone keeps agreeing.
        got = await step([*honest, f1, f2], 6, h(5))
        assert all(x["participant"] for x in got) and vid in got[0]["participants"]
        info = await a.run_info("r")
        assert info["state_hashes"]["4"] == h(4) and info["state_hashes"]["5"] == h(5)
    finally:
        beat.cancel()
        for c in clients:
            await c.close()
