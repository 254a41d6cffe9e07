"""The `peer` command: `peer join` (run a daemon), `peer status` (membership table), `peer id`.

`peer join` prints human-readable lines (peer id, listen address, coordinator) and then one line
``READY {json}`` (peer_id, address, listen, coordinator, device, pid) once it has joined, for
scripts and tests. It exits 0 after a clean leave on SIGINT/SIGTERM, 2 on a usage/config error
(wrong swarm token included), 1 on a fatal runtime error.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from peer.daemon import DEFAULT_KEY_PATH, DEFAULT_LISTEN, DaemonConfig, DaemonError, PeerDaemon
from peer.errors import LowbandError
from peer.identity import Identity
from peer.membership import CoordinatorClient, CoordinatorError, PeerInfo
from peer.roles import add_role_arguments
from peer.runtime import add_logging_args, read_token, setup_logging, wait_for_stop_signal
from peer.transport import install_event_loop_policy


# -- peer join -----------------------------------------------------------------------------------
async def run_join(config: DaemonConfig) -> int:
    daemon = PeerDaemon(config)
    # Stop signals count from the very start: Ctrl-C while still waiting for the coordinator
    # is a clean exit too.
    stopper = asyncio.create_task(wait_for_stop_signal())
    starter = asyncio.create_task(daemon.start())
    await asyncio.wait({starter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not starter.done():
        starter.cancel()
        await asyncio.gather(starter, return_exceptions=True)
        await daemon.stop()
        print("peer stopped before joining", flush=True)
        return 0
    error = starter.exception()
    if error is not None:
        stopper.cancel()
        await daemon.stop()
        if not isinstance(error, LowbandError):
            raise error
        print(f"peer: {error}", file=sys.stderr, flush=True)
        return 2
    assert daemon.host is not None
    print(f"peer id: {daemon.peer_id}")
    print(f"listening on {daemon.host.address}, announced as {daemon.address}")
    print(f"coordinator: {config.coordinator} (heartbeat every {daemon.heartbeat_interval:g}s)")
    print(f"device: {daemon.device}, roles: {', '.join(sorted(config.roles)) or 'none'}")
    if daemon.metrics_url:
        print(f"metrics: {daemon.metrics_url}")
    print("READY " + json.dumps({"peer_id": daemon.peer_id, "address": daemon.address,
                                 "listen": daemon.host.address, "coordinator": config.coordinator,
                                 "device": daemon.device, "metrics_url": daemon.metrics_url,
                                 "pid": os.getpid()}), flush=True)
    runner = asyncio.create_task(daemon.run())
    await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if runner.done():
        code = 1
        print(f"peer: {runner.exception() or 'daemon stopped unexpectedly'}", file=sys.stderr)
    for task in (runner, stopper):
        task.cancel()
    await asyncio.gather(runner, stopper, return_exceptions=True)
    await daemon.stop()
    print("peer stopped", flush=True)
    return code


# -- peer status ---------------------------------------------------------------------------------
def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"


def _median_ping_ms(p: PeerInfo) -> str:
    rtts = sorted(row["ping_rtt_s"] for row in p.stats.get("links", {}).values()
                  if isinstance(row, dict) and isinstance(row.get("ping_rtt_s"), (int, float)))
    return f"{rtts[len(rtts) // 2] * 1e3:.2f}" if rtts else "-"


def format_table(peers: list[PeerInfo]) -> str:
    """The membership table `peer status` prints (one row per peer, states included)."""
    header = ("PEER", "ADDRESS", "STATE", "ROLES", "DEVICE", "MEMORY", "HB AGE", "GFLOP/S",
              "LINKS", "PING MS")
    rows = [header]
    for p in peers:
        links = p.stats.get("links", {}) if isinstance(p.stats, dict) else {}
        rows.append((p.peer_id[:12], p.address, p.state, ",".join(p.roles) or "-",
                     p.device or "-", _human_bytes(p.memory),
                     "-" if p.heartbeat_age_s is None else f"{p.heartbeat_age_s:.1f}s",
                     "-" if p.throughput is None else f"{p.throughput / 1e9:.1f}",
                     str(len(links)), _median_ping_ms(p)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


async def run_status(url: str, token: str | None, as_json: bool) -> int:
    async with CoordinatorClient(url, token, None) as client:
        try:
            status = await client.status()
        except CoordinatorError as e:
            print(f"peer: {e}", file=sys.stderr)
            return 1
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    peers = [PeerInfo.from_dict(p) for p in status.get("peers", [])]
    counts = status.get("counts", {})
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no peers"
    print(f"coordinator {url}: {summary} (at {time.strftime('%H:%M:%S')})")
    print(format_table(peers))
    return 0


# -- argument parsing ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peer", description="lowband peer: join a swarm, inspect membership, show identity.")
    sub = parser.add_subparsers(dest="command", required=True)

    join = sub.add_parser(
        "join", help="run a peer daemon until SIGINT/SIGTERM",
        description="Register with the coordinator, heartbeat, accept encrypted peer connections, "
                    "keep a mesh view of live peers and ping them (RTT in the stats), rejoin when "
                    "the coordinator comes back, leave cleanly on SIGINT/SIGTERM. Prints "
                    "'READY {json}' once joined.",
        epilog="Exit status: 0 after a clean stop (SIGINT/SIGTERM), 2 when it cannot start "
               "(wrong swarm token, bad flags, missing role plug-in, port in use), 1 on a fatal "
               "error while running. The token may also come from $LOWBAND_TOKEN.")
    join.add_argument("--coordinator", required=True, help="coordinator URL, e.g. http://HOST:8470")
    join.add_argument("--token", help="swarm token (visible in ps; prefer --token-file or $LOWBAND_TOKEN)")
    join.add_argument("--token-file", help="file holding the swarm token")
    join.add_argument("--listen", default=DEFAULT_LISTEN,
                      help=f"HOST:PORT for peer connections (default {DEFAULT_LISTEN}; port 0 = any)")
    join.add_argument("--announce", help="HOST:PORT other peers dial (default: the listen address; "
                                         "for 0.0.0.0 the local IP that routes to the coordinator)")
    join.add_argument("--key", type=Path, default=DEFAULT_KEY_PATH,
                      help=f"Ed25519 identity key file, created if missing (default {DEFAULT_KEY_PATH})")
    join.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="compute device reported to the swarm (auto: cuda if torch sees one)")
    join.add_argument("--train", metavar="NAME",
                      help="also run the 'train' role plug-in (entry-point group lowband.roles)")
    join.add_argument("--serve", metavar="MODEL",
                      help="also run the 'serve' role plug-in (entry-point group lowband.roles)")
    join.add_argument("--blocks", metavar="A:B",
                      help="with --serve: serve blocks A..B-1 (default: where the swarm has the least coverage)")
    join.add_argument("--ping-interval", type=float, default=2.0,
                      help="seconds between RTT pings to each live peer (default 2)")
    join.add_argument("--metrics-port", type=int, metavar="PORT",
                      help="serve Prometheus GET /metrics on the --listen host at PORT (0: any free "
                           "port, shown in the READY line); default: no metrics server")
    add_logging_args(join)
    parser.set_defaults(role_dests=add_role_arguments(join))

    status = sub.add_parser("status", help="print the coordinator's membership table",
                            description="Print every peer the coordinator knows: state, address, "
                                        "roles, device, memory, heartbeat age, throughput, links.")
    status.add_argument("--coordinator", required=True, help="coordinator URL")
    status.add_argument("--token", help="swarm token (status is readable without one)")
    status.add_argument("--json", action="store_true", help="print the raw /api/status JSON")

    ident = sub.add_parser("id", help="print this peer's id (creates the key if missing)",
                           description="Print the peer id (hex sha256 prefix of the public key).")
    ident.add_argument("--key", type=Path, default=DEFAULT_KEY_PATH,
                       help=f"identity key file (default {DEFAULT_KEY_PATH})")
    add_plugin_commands(sub)
    return parser


COMMANDS_GROUP = "lowband.commands"


def add_plugin_commands(sub) -> None:
    """Subcommands from installed plug-ins (entry-point group ``lowband.commands``): each entry
    point is ``fn(subparsers)`` adding its parser with ``set_defaults(run=fn(args) -> int)``, so
    peer/ never imports the packages that implement them (``peer generate``, ``peer gateway``)."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as e:  # a broken plug-in must not take `peer join/status` down with it
            print(f"peer: skipping command plug-in {ep.name!r} ({ep.value}): {type(e).__name__}: {e}",
                  file=sys.stderr)


def _omp_wait_policy(argv: list[str]) -> None:
    """How a serving peer's idle OpenMP workers wait, read by the OpenMP runtime when torch loads
    (which building the parser does: role plug-ins), so decided from the raw arguments; values
    the user set win. Training peers keep the runtime's default.

    A pipeline stage spins briefly (about 2 ms here) before sleeping: a forward is a few hundred
    short parallel ops, and waking sleeping workers for each one cost batch-8 stages 15% (3-stage
    loopback pipeline on 2 cores: servers' compute 95 -> 83 ms per step, the same blocks in one
    process 81 ms), while a short spin leaves the core to co-located stages between forwards
    (the runtime's default spin, ~15 ms, made batch 1 70 ms per token instead of 58). A tensor
    split's peers compute at the same time and wait on each other inside a forward: spinning
    there takes cores that co-located group members need (batch 8: 202 -> 241 ms), so they sleep."""
    serve = None
    for i, arg in enumerate(argv):
        if arg.startswith("--serve="):
            serve = arg.split("=", 1)[1]
        elif arg == "--serve" and i + 1 < len(argv):
            serve = argv[i + 1]
    if serve is None:
        return
    if ",tp=" in serve:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    elif "OMP_WAIT_POLICY" not in os.environ:
        os.environ.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT=os.environ.get("GOMP_SPINCOUNT", "20000"))


def main(argv: list[str] | None = None) -> int:
    _omp_wait_policy(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "id":
        try:
            print(Identity.load_or_create(args.key).peer_id)
        except (OSError, ValueError) as e:
            print(f"peer: cannot load or create key {args.key}: {e}", file=sys.stderr)
            return 2
        return 0
    if getattr(args, "run", None) is not None:
        return args.run(args)
    if args.command == "status":
        return asyncio.run(run_status(args.coordinator, read_token(args.token, None), args.json))
    setup_logging(args.log_format, args.log_level)
    roles = {name: value for name, value in (("train", args.train), ("serve", args.serve)) if value}
    if args.blocks:
        if "serve" not in roles:
            print("peer: --blocks needs --serve MODEL", file=sys.stderr)
            return 2
        roles["serve"] += "@" + args.blocks
    role_options = {name: {dest: getattr(args, dest) for dest in args.role_dests[name]}
                    for name in roles if name in args.role_dests}
    try:
        config = DaemonConfig(coordinator=args.coordinator,
                              token=read_token(args.token, args.token_file) or "",
                              listen=args.listen, announce=args.announce, key_path=args.key,
                              device=args.device, roles=roles, ping_interval=args.ping_interval,
                              role_options=role_options,
                              metrics_port=args.metrics_port)
    except DaemonError as e:
        print(f"peer: {e}", file=sys.stderr)
        return 2
    install_event_loop_policy()  # uvloop where installed; plain asyncio otherwise
    return asyncio.run(run_join(config))


if __name__ == "__main__":
    raise SystemExit(main())
