"""Swarms with peers behind real NAT routers (issue 15 acceptance), as real processes in network
namespaces (testing/nat.py): a coordinator and two peers on the "public" bridge, two peers each
behind its own home router (nft masquerade, dropping unsolicited inbound). First, the pure parts:
the reach schema (peer/reach.py), relay choice and routes, and the registry publishing each
peer's relays in the view.

The coordinator's database is the oracle: every outer step must be reported by all four peers,
with four participants and one state hash; after the first step no collective attempt may abort
(peers' logs). The heartbeat link rows say how each link is connected (``path``).
"""
from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from coordinator.registry import MembershipRegistry, PeerMeta, Timing
from coordinator.store import Store
from peer.reach import Reach, direct_first_order, pick_relays, relay_candidates, route_for
from testing.netns import unavailable_reason
from tests.harness import Child, Procs, wait_until
from tests.test_train_mesh import TRAIN_FLAGS, corpus

TOKEN = "nat-swarm-token-5c0d7e19a4b2f86e3d1a90c47b5e2f18d6a3c9b0"
RUN = "nat"
STEPS = 3
_NETNS_REASON = unavailable_reason(need_nat=True)
in_netns = pytest.mark.skipif(_NETNS_REASON is not None, reason=_NETNS_REASON or "")
IDS = [f"{i:040x}" for i in range(1, 6)]


# ----------------------------------------------------------------------------- pure parts
def test_reach_schema_round_trips_and_refuses_malformed():
    r = Reach(relay=True, load=3, relays=(IDS[0], IDS[1]))
    assert Reach.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert Reach.from_json({}) == Reach()
    for bad in (None, [], {"relay": 1}, {"load": -1}, {"load": True}, {"relays": "x"},
                {"relays": [IDS[0], IDS[0]]}, {"relays": ["nope"]}, {"relays": IDS},
                {"relay": True, "extra": 1}):
        with pytest.raises(ValueError):
            Reach.from_json(bad)


def test_routes_use_verified_addresses_or_live_reachable_relays():
    rows = {IDS[0]: {"peer_id": IDS[0], "address": "10.0.0.1:1", "reachable": True, "relay": True},
            IDS[1]: {"peer_id": IDS[1], "address": "192.168.1.2:2", "reachable": False,
                     "relays": [IDS[0], IDS[3]]},  # IDS[3] left the view
            IDS[2]: {"peer_id": IDS[2], "address": "10.0.0.3:3", "reachable": None},
            IDS[4]: {"peer_id": IDS[4], "address": "192.168.2.2:4", "reachable": False, "relays": []}}
    assert route_for(rows[IDS[0]], rows).reachable and not route_for(rows[IDS[0]], rows).relays
    nat = route_for(rows[IDS[1]], rows)
    assert not nat.reachable and nat.relays == ((IDS[0], "10.0.0.1:1"),)
    assert route_for(rows[IDS[2]], rows) is None  # not probed yet: never dialled
    assert route_for(rows[IDS[4]], rows) is None  # unreachable and no relay: nobody can reach it


def test_relays_are_picked_by_rtt_times_load_and_kept():
    rows = [{"peer_id": IDS[0], "reachable": True, "relay": True, "relay_load": 0},
            {"peer_id": IDS[1], "reachable": True, "relay": True, "relay_load": 16},
            {"peer_id": IDS[2], "reachable": True, "relay": True, "relay_load": 0},
            {"peer_id": IDS[3], "reachable": False, "relay": True},     # cannot be dialled
            {"peer_id": IDS[4], "reachable": True, "relay": False}]     # --no-relay
    candidates = relay_candidates(rows, self_id=IDS[2])
    assert [c["peer_id"] for c in candidates] == [IDS[0], IDS[1]]
    rtt = {IDS[0]: 0.030, IDS[1]: 0.012, IDS[2]: 0.020}
    # IDS[1] is nearer but carries 16 reservations: 0.012 * 3 > 0.030
    assert pick_relays(relay_candidates(rows, "x"), rtt, n=2) == [IDS[2], IDS[0]]
    assert pick_relays(relay_candidates(rows, "x"), rtt, n=1, keep=[IDS[1]]) == [IDS[1]]
    assert pick_relays(relay_candidates(rows, "x"), {}, n=3) == [IDS[0], IDS[2], IDS[1]]  # unmeasured: by id


def test_direct_first_ring_order_keeps_natted_peers_apart():
    pub, nat = IDS[:2], IDS[2:4]
    order = direct_first_order(pub + nat, nat)
    assert sorted(order) == sorted(pub + nat)
    ring = list(zip(order, order[1:] + order[:1]))
    assert not any(a in nat and b in nat for a, b in ring), order  # no hop between two NATed peers
    assert direct_first_order(reversed(pub + nat), nat) == order  # one order whatever the input
    assert direct_first_order(IDS, []) == sorted(IDS)
    crowded = direct_first_order(IDS, IDS[1:])  # 1 public, 4 NATed: unavoidable neighbours
    assert sorted(crowded) == sorted(IDS) and crowded[0] == IDS[0]
    three = direct_first_order(IDS[:5], IDS[3:5])  # 3 public, 2 NATed
    assert not any(a in IDS[3:5] and b in IDS[3:5] for a, b in zip(three, three[1:] + three[:1])), three


async def test_registry_publishes_relays_from_heartbeats(tmp_path):
    store = Store(tmp_path)
    store.open()
    try:
        reg = MembershipRegistry(store, Timing(0.5, 2.0))
        relay_meta = PeerMeta(device="cpu", memory=None, roles=["train"], throughput=None,
                              extra={"relay": True})
        await reg.join(IDS[0], bytes(32), "10.0.0.1:1", relay_meta)
        await reg.join(IDS[1], bytes(32), "192.168.1.2:2", PeerMeta("cpu", None, ["train"], None, {}))
        view_id, view = await reg.live_view()
        rows = {r["peer_id"]: r for r in json.loads(view)}
        assert (rows[IDS[0]]["relay"], rows[IDS[1]]["relay"], rows[IDS[1]]["relays"]) == (True, False, [])
        await reg.heartbeat(IDS[1], {"reach": Reach(relays=(IDS[0],)).to_json()})
        new_id, view = await reg.live_view()
        assert new_id != view_id and {r["peer_id"]: r for r in json.loads(view)}[IDS[1]]["relays"] == [IDS[0]]
        await reg.heartbeat(IDS[1], {"reach": Reach(relays=(IDS[0],)).to_json()})  # same: view kept
        await reg.heartbeat(IDS[1], {"reach": {"relays": "junk"}})                  # malformed: ignored
        same_id, view = await reg.live_view()
        assert same_id == new_id and {r["peer_id"]: r for r in json.loads(view)}[IDS[1]]["relays"] == [IDS[0]]
        assert next(p for p in await reg.peers() if p["peer_id"] == IDS[1])["relays"] == [IDS[0]]
    finally:
        store.close()


# ----------------------------------------------------------------------------- real swarms in NatLab


def start_swarm_coordinator(procs: Procs, lab, data_dir: Path) -> str:
    coord = procs.spawn(lab.exec_args("coord", [
        sys.executable, "-m", "coordinator", "start", "--host", lab.address("coord"), "--port", "0",
        "--data-dir", str(data_dir), "--token", TOKEN, "--tls", "off", "--insecure",
        "--heartbeat-interval", "0.5", "--peer-timeout", "5"]), ready_timeout=60)
    return coord.ready["url"]


def peer_args(url: str, key: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN,
            "--insecure", "--listen", "0.0.0.0:0", "--key", str(key), "--device", "cpu",
            "--ping-interval", "0.5", *flags]


def query(data_dir: Path, sql: str, *args) -> list[sqlite3.Row]:
    with sqlite3.connect(f"file:{data_dir / 'coordinator.sqlite3'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return db.execute(sql, args).fetchall()


def link_paths(data_dir: Path) -> dict[tuple[str, str], str | None]:
    """(from peer, to peer) -> the path the sender's last heartbeat reported."""
    out = {}
    for row in query(data_dir, "SELECT peer_id, stats FROM peers WHERE state = 'active'"):
        for dst, link in json.loads(row["stats"]).get("links", {}).items():
            out[row["peer_id"], dst] = link.get("path")
    return out


def aborts_after_first_step(child: Child) -> list[str]:
    lines = child.lines
    first = next((i for i, line in enumerate(lines) if f"train {RUN}: step 1 loss" in line), None)
    assert first is not None, "\n".join(lines[-30:])
    return [line for line in lines[first:] if "aborted" in line]


def train_behind_nats(procs: Procs, tmp_path: Path, nats: tuple[str, str]) -> dict:
    from testing.nat import Host, NatLab, Router

    hosts = [Host("coord"), Host("p0"), Host("p1"), Host("a", "ra"), Host("b", "rb")]
    t0 = time.monotonic()
    with NatLab(hosts, {"ra": Router(nats[0]), "rb": Router(nats[1])}) as lab:
        data_dir = tmp_path / "coord"
        url = start_swarm_coordinator(procs, lab, data_dir)
        data = corpus(tmp_path)
        names = ("p0", "p1", "a", "b")
        peers = {name: procs.spawn(lab.exec_args(name, peer_args(
            url, tmp_path / f"{name}.key", "--train", RUN, "--data", str(data), *TRAIN_FLAGS,
            "--outer-steps", str(STEPS), "--min-peers", "4")), wait_ready=False) for name in names}
        for child in peers.values():
            wait_until(lambda: child.ready or child.proc.poll() is not None, 120, "READY")
            assert child.ready, "\n".join(child.lines[-40:])
        ids = {name: child.ready["peer_id"] for name, child in peers.items()}
        for child in peers.values():
            child.wait_for_line(f"train {RUN}: done at step {STEPS}", timeout=150)
        reach = {r["peer_id"]: r["reachable"] for r in query(data_dir, "SELECT peer_id, reachable FROM peers")}
        assert [reach[ids[n]] for n in names] == [1, 1, 0, 0], reach
        reports: dict[int, dict[str, sqlite3.Row]] = {}
        for r in query(data_dir, "SELECT step, peer_id, state_hash, metrics FROM run_reports WHERE run = ?", RUN):
            reports.setdefault(r["step"], {})[r["peer_id"]] = r
        assert sorted(reports) == list(range(1, STEPS + 1)), sorted(reports)
        for step, rows in reports.items():
            assert set(rows) == set(ids.values()), f"step {step} lacks reports: {sorted(rows)}"
            assert len({r["state_hash"] for r in rows.values()}) == 1, f"step {step}: hashes differ"
            assert {json.loads(r["metrics"])["participants"] for r in rows.values()} == {4}, step
        for name, child in peers.items():
            assert not aborts_after_first_step(child), (name, aborts_after_first_step(child))
        paths = link_paths(data_dir)
        print(f"4 peers ({nats[0]} + {nats[1]} NAT) x {STEPS} outer steps in "
              f"{time.monotonic() - t0:.1f}s; paths:",
              {f"{a}->{b}": paths.get((ids[a], ids[b])) for a in names for b in names if a != b})
        return {"ids": ids, "paths": paths}


@pytest.mark.slow
@in_netns
def test_four_peers_two_behind_port_preserving_nats(procs, tmp_path):
    """The NATed pair punches through (or keeps its relay); public<->NATed links are direct
    (the NATed peer dialled out) or reversed."""
    out = train_behind_nats(procs, tmp_path, ("preserving", "preserving"))
    ids, paths = out["ids"], out["paths"]
    for pub in ("p0", "p1"):
        for nat in ("a", "b"):
            assert paths.get((ids[pub], ids[nat])) in ("direct", "reversed"), paths
    assert paths.get((ids["a"], ids["b"])) in ("punched", "relayed"), paths


@pytest.mark.slow
@in_netns
def test_four_peers_two_behind_fully_random_nats_use_a_relay(procs, tmp_path):
    """Randomized-port NAT on both sides: no punch can work, so the NATed pair talks through a
    public peer that relays (end-to-end encrypted)."""
    out = train_behind_nats(procs, tmp_path, ("random", "random"))
    ids, paths = out["ids"], out["paths"]
    assert paths.get((ids["a"], ids["b"])) == "relayed", paths
    assert paths.get((ids["b"], ids["a"])) == "relayed", paths


@pytest.mark.slow
@in_netns
def test_serving_with_the_middle_stage_and_the_client_behind_nats(procs, tmp_path):
    """Stage servers 0:10 and 20:30 public, 10:20 behind a port-preserving NAT; the client behind
    a randomized-port NAT (it cannot be dialled, and reaches the NATed server through a relay).
    Greedy output equals the single-process oracle."""
    from pipeline.generate import generate
    from testing.nat import Host, NatLab, Router
    from tests.harness import reference_model
    from tests.test_serving import MODEL, NEW, PROMPT

    hosts = [Host("coord"), Host("p0"), Host("p1"), Host("a", "ra"), Host("b", "rb")]
    spans = {"p0": "0:10", "a": "10:20", "p1": "20:30"}
    t0 = time.monotonic()
    with NatLab(hosts, {"ra": Router("preserving"), "rb": Router("random")}) as lab:
        data_dir = tmp_path / "coord"
        url = start_swarm_coordinator(procs, lab, data_dir)
        servers = {name: procs.spawn(lab.exec_args(name, peer_args(
            url, tmp_path / f"{name}.key", "--serve", MODEL, "--blocks", span)), wait_ready=False)
            for name, span in spans.items()}
        model, tok = reference_model()
        expected = generate(model, tok, PROMPT, NEW)
        for child in servers.values():
            child.wait_for_line("READY ", timeout=240)
        ids = {name: child.ready["peer_id"] for name, child in servers.items()}
        client = procs.spawn(lab.exec_args("b", [
            sys.executable, "-m", "tests.nat_child", "--coordinator", url, "--token", TOKEN,
            "--key", str(tmp_path / "client.key"), "--model", MODEL, "--servers", "3",
            "--prompt", json.dumps(PROMPT), "--new", str(NEW)]), wait_ready=False)
        line = client.wait_for_line("RESULT ", timeout=120)
        result = json.loads(line.split("RESULT ", 1)[1])
        assert result["text"] == expected, (result, expected)
        route = [tuple(hop) for hop in result["route"]]
        assert route == [(ids["p0"], 0, 10), (ids["a"], 10, 20), (ids["p1"], 20, 30)], route
        assert result["paths"] == {ids["p0"]: "direct", ids["a"]: "relayed", ids["p1"]: "direct"}, result
        print(f"NATed stage + NATed client: {NEW} tokens identical to one process, "
              f"{time.monotonic() - t0:.1f}s in all")
