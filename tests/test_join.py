"""`coordinator start` + `peer join` as real processes over real TCP on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from peer.identity import Identity
from testing.api import SignedApi, operator_api
from tests.harness import ROOT, Child, Procs, free_port, wait_until

TOKEN = "join-test-token-d2b3c497cd25e127cb06d6f8e48b4f3e90e0db73"
INTERVAL, TIMEOUT = 0.5, 3.0


OPERATORS: dict[str, SignedApi] = {}  # coordinator URL -> operator of the one serving it now


def start_coordinator(procs: Procs, data_dir, port: int = 0) -> Child:
    coord = procs.python("-m", "coordinator", "start", "--host", "127.0.0.1", "--port", str(port),
                         "--data-dir", str(data_dir), "--token", TOKEN,
                         "--heartbeat-interval", str(INTERVAL), "--peer-timeout", str(TIMEOUT))
    url = coord.ready["url"]
    OPERATORS[url] = operator_api(url, data_dir, data_dir.parent / f"{data_dir.name}-operator.key")
    return coord


def start_peer(procs: Procs, url: str, key, *extra: str) -> Child:
    return procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN,
                        "--listen", "127.0.0.1:0", "--key", str(key), "--device", "cpu",
                        "--ping-interval", "0.5", *extra)


def status(url: str) -> dict:
    """The operator's view (peer stats and addresses; the public view leaves them out)."""
    return OPERATORS[url].get("/status")


def peers_by_id(url: str) -> dict[str, dict]:
    return {p["peer_id"]: p for p in status(url)["peers"]}


def swarm(procs: Procs, tmp_path, n: int, port: int = 0) -> tuple[Child, str, list[Child]]:
    coord = start_coordinator(procs, tmp_path / "coord", port)
    url = coord.ready["url"]
    peers = [start_peer(procs, url, tmp_path / f"peer{i}.key") for i in range(n)]
    return coord, url, peers


def meshed(url: str, ids: set[str]) -> bool:
    """Every peer is active and has pinged every other peer through the encrypted transport."""
    view = peers_by_id(url)
    for pid in ids:
        p = view.get(pid)
        if p is None or p["state"] != "active":
            return False
        links = p["stats"].get("links", {})
        if set(links) != ids - {pid} or any(l.get("pings_ok", 0) < 1 for l in links.values()):
            return False
    return True


def test_three_peers_join_mesh_ping_and_leave(procs, tmp_path):
    coord, url, peers = swarm(procs, tmp_path, 3)
    ids = {p.ready["peer_id"] for p in peers}
    assert len(ids) == 3
    t0 = time.monotonic()
    wait_until(lambda: meshed(url, ids), 30, "three peers to mesh and ping each other")
    mesh_s = time.monotonic() - t0
    view = peers_by_id(url)
    for pid, p in view.items():
        assert p["device"] == "cpu" and p["memory"] > 0 and p["throughput"] > 0
        for row in p["stats"]["links"].values():
            assert 0 < row["ping_rtt_s"] < 5 and row["bytes_sent"] > 0 and row["bytes_received"] > 0
    peers[0].wait_for_line("ping ", timeout=5)

    operator_key = tmp_path / "coord-operator.key"
    table = subprocess.run([sys.executable, "-m", "peer.cli", "status", "--coordinator", url,
                            "--key", str(operator_key)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    for pid in ids:
        assert pid[:12] in table.stdout
    rows = table.stdout.splitlines()[2:]
    assert len(rows) == 3 and all(r.split()[2] == "active" for r in rows) and "3 active" in table.stdout

    leaver = peers[0]
    leaver.kill(signal.SIGTERM)
    assert leaver.wait(timeout=20) == 0
    leaver.wait_for_line("left the swarm", timeout=5)
    assert peers_by_id(url)[leaver.ready["peer_id"]]["state"] == "left"
    rest = ids - {leaver.ready["peer_id"]}
    wait_until(lambda: all(peers_by_id(url)[p]["stats"].get("mesh_size") == 1 for p in rest),
               15, "the others to drop the leaver from their mesh")
    print(f"mesh formed in {mesh_s:.2f}s")


def test_sigkilled_peer_is_declared_dead_within_timeout(procs, tmp_path):
    coord, url, peers = swarm(procs, tmp_path, 2)
    victim, survivor = peers
    vid = victim.ready["peer_id"]
    wait_until(lambda: meshed(url, {vid, survivor.ready["peer_id"]}), 30, "mesh")
    victim.kill(signal.SIGKILL)
    killed_at = time.time()
    states = []

    def dead() -> bool:
        state = peers_by_id(url)[vid]["state"]
        if not states or states[-1] != state:
            states.append(state)
        return state == "dead"

    wait_until(dead, TIMEOUT + 10, "the killed peer to be declared dead", interval=0.05)
    detected_after = time.time() - killed_at
    assert states[-2:] == ["suspect", "dead"]
    # silence began at the last heartbeat (<= one interval before the kill); the sweep runs
    # every timeout/10 — allow that plus scheduling noise on a shared machine.
    assert detected_after <= TIMEOUT + INTERVAL + 1.5, detected_after
    assert peers_by_id(url)[survivor.ready["peer_id"]]["state"] == "active"
    print(f"declared dead {detected_after:.2f}s after SIGKILL (timeout {TIMEOUT}s)")


def test_coordinator_kill9_restart_keeps_members(procs, tmp_path):
    port = free_port()
    coord, url, peers = swarm(procs, tmp_path, 3, port)
    ids = {p.ready["peer_id"] for p in peers}
    wait_until(lambda: meshed(url, ids), 30, "mesh")
    before = {pid: p["last_heartbeat"] for pid, p in peers_by_id(url).items()}

    coord.kill(signal.SIGKILL)
    coord.wait()
    time.sleep(2 * INTERVAL)  # peers notice; they keep their mesh and retry
    down_at = time.time()
    coord2 = start_coordinator(procs, tmp_path / "coord", port)
    restarted = peers_by_id(url)
    assert set(restarted) == ids  # persisted through kill -9
    assert all(p["state"] in ("active", "suspect") for p in restarted.values())
    wait_until(lambda: all(p["last_heartbeat"] > max(before[pid], down_at) and p["state"] == "active"
                           for pid, p in peers_by_id(url).items()), 20,
               "every peer to heartbeat the restarted coordinator")
    for p in peers:
        p.wait_for_line("reachable again", timeout=10)
        assert p.proc.poll() is None
    assert coord2.proc.poll() is None


def test_peers_reregister_with_a_wiped_coordinator(procs, tmp_path):
    port = free_port()
    coord, url, peers = swarm(procs, tmp_path, 2, port)
    ids = {p.ready["peer_id"] for p in peers}
    wait_until(lambda: meshed(url, ids), 30, "mesh")
    coord.kill(signal.SIGKILL)
    coord.wait()
    start_coordinator(procs, tmp_path / "fresh", port)  # empty database: peers are unknown
    wait_until(lambda: set(peers_by_id(url)) == ids and meshed(url, ids), 30,
               "peers to re-join the wiped coordinator by themselves")
    for p in peers:
        p.wait_for_line("joining again", timeout=5)


@pytest.mark.parametrize("token, says", [
    ("Wr0ng-but-strong-token-1f0c9a7e5b3d2c4e6f8a0b1c2d3e4f5a", "wrong swarm token"),
    ("not-the-token", "too weak"),
])
def test_wrong_or_weak_token_is_a_clear_error(procs, tmp_path, token, says):
    coord = start_coordinator(procs, tmp_path / "coord")
    out = subprocess.run([sys.executable, "-m", "peer.cli", "join", "--coordinator",
                          coord.ready["url"], "--token", token, "--listen", "127.0.0.1:0",
                          "--key", str(tmp_path / "k"), "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert says in out.stderr and "READY" not in out.stdout, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flag", ["--train", "--serve"])
def test_missing_role_plugin_is_a_clear_error(tmp_path, flag):
    site = tmp_path / "site"
    env = {**os.environ, **shadow_lowband(site, "")}
    out = subprocess.run([sys.executable, "-m", "peer.cli", "join", "--coordinator",
                          "http://127.0.0.1:9", "--key", str(tmp_path / "k"),
                          "--device", "cpu", flag, "x"],
                         cwd=site, capture_output=True, text=True, timeout=60, env=env)
    role = flag.lstrip("-")
    assert out.returncode == 2
    assert f"no plug-in provides role {role!r}" in out.stderr and "lowband.roles" in out.stderr


def test_peer_id_command(tmp_path):
    key = tmp_path / "sub" / "id.key"
    out = subprocess.run([sys.executable, "-m", "peer.cli", "id", "--key", str(key)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.strip() == Identity.load_or_create(key).peer_id


ROLE_MODULE = '''
class DemoRole:
    """A minimal role plug-in: publishes a stat, fails on demand."""

    def __init__(self, arg):
        self.arg = arg

    async def start(self, daemon):
        if self.arg == "fail":
            raise RuntimeError("cannot start on purpose")
        daemon.report("demo_role", {"arg": self.arg, "peer": daemon.peer_id})
        print("DEMO ROLE STARTED", self.arg, flush=True)

    async def stop(self):
        print("DEMO ROLE STOPPED", flush=True)
'''


def shadow_lowband(site, entry_points: str) -> dict:
    """A real dist-info named ``lowband`` on PYTHONPATH: importlib.metadata takes the first
    distribution of a name on sys.path, so this one's entry points (roles) replace the installed
    project's - as on a machine where lowband is installed with other role plug-ins, or none.
    Run the child with cwd=site: the checkout's own lowband.egg-info must come later."""
    dist = site / "lowband-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lowband\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(entry_points)
    return {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}


def install_demo_role(site) -> dict:
    """The demo role installed as the 'train' plug-in, in place of diloco's."""
    env = shadow_lowband(site, "[lowband.roles]\ntrain = lowband_demo_role:DemoRole\n")
    (site / "lowband_demo_role.py").write_text(ROLE_MODULE)
    return env


def test_role_plugin_runs_and_reports(procs, tmp_path):
    env = install_demo_role(tmp_path / "site")
    coord = start_coordinator(procs, tmp_path / "coord")
    url = coord.ready["url"]
    peer = procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN,
                        "--listen", "127.0.0.1:0", "--key", str(tmp_path / "k"), "--device", "cpu",
                        "--train", "tiny", "--log-format", "json", env=env, cwd=tmp_path / "site")
    peer.wait_for_line("DEMO ROLE STARTED tiny")
    pid = peer.ready["peer_id"]
    wait_until(lambda: peers_by_id(url)[pid]["stats"].get("demo_role") == {"arg": "tiny", "peer": pid},
               15, "the role's stat in a heartbeat")
    assert peers_by_id(url)[pid]["roles"] == ["train"]
    logs = [json.loads(l) for l in peer.lines if l.startswith("{")]
    assert any("joined" in entry["msg"] and entry["level"] == "info" for entry in logs)
    peer.kill(signal.SIGTERM)
    assert peer.wait() == 0
    peer.wait_for_line("DEMO ROLE STOPPED", timeout=5)

    failing = procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN,
                           "--listen", "127.0.0.1:0", "--key", str(tmp_path / "k2"),
                           "--device", "cpu", "--train", "fail", env=env, wait_ready=False,
                           cwd=tmp_path / "site")
    assert failing.wait(timeout=60) == 2
    failing.wait_for_line("role 'train' failed to start: RuntimeError: cannot start on purpose")


def test_peer_waits_for_a_coordinator_that_starts_later(procs, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    early = procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN,
                         "--listen", "127.0.0.1:0", "--key", str(tmp_path / "a"), "--device", "cpu",
                         wait_ready=False)
    quitter = procs.python("-m", "peer.cli", "join", "--coordinator", url, "--token", TOKEN,
                           "--listen", "127.0.0.1:0", "--key", str(tmp_path / "b"),
                           "--device", "cpu", wait_ready=False)
    early.wait_for_line("unreachable", timeout=30)
    quitter.wait_for_line("unreachable", timeout=30)
    quitter.kill(signal.SIGINT)  # Ctrl-C while still waiting: clean exit
    assert quitter.wait() == 0
    start_coordinator(procs, tmp_path / "coord", port)
    line = early.wait_for_line("READY ", timeout=30)
    assert json.loads(line[6:])["peer_id"] in peers_by_id(url)


@pytest.mark.parametrize("argv, preset, expect", [
    (["join", "--serve", "smollm2-135m"], {}, {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "20000"}),
    (["join", "--serve=smollm2-135m", "--blocks", "0:10"], {}, {"OMP_WAIT_POLICY": "ACTIVE"}),
    (["join", "--serve", "smollm2-135m,tp=b:0/3"], {}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}),
    (["join", "--serve", "smollm2-135m"], {"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE",
                                                                          "GOMP_SPINCOUNT": None}),
    (["join", "--serve", "smollm2-135m"], {"GOMP_SPINCOUNT": "7"}, {"GOMP_SPINCOUNT": "7"}),
    (["join", "--train"], {}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}),
])
def test_serving_peers_choose_how_idle_openmp_workers_wait(monkeypatch, argv, preset, expect):
    from peer.cli import _omp_wait_policy

    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in preset.items():
        monkeypatch.setenv(key, value)
    _omp_wait_policy(argv)
    assert {key: os.environ.get(key) for key in expect} == expect
